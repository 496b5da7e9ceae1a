//! The handover measurement: preserve + freeze + handover + retrieve of
//! populated guest memory per transport, next to copying the same memory
//! out and back in (what a snapshot/restore does). The one implementation
//! behind the table example (`examples/handover_bench.rs`) and `gmemctl
//! bench`. Built only with the `bench` feature.
//!
//! Model: every run uses fresh processes, all of them the calling program
//! started again in a *role* (a [`Launcher`] says how: the program and the
//! arguments that lead to [`run_role`]). The old VMM process creates a
//! [`gmem::GuestMemFile`] (memfd or hugetlb) and populates every folio
//! (untimed), then is timed from its first preserve to the moment the
//! successor holds every retrieved file. Times come from CLOCK_MONOTONIC,
//! which all processes share; each role prints them on one `RESULT` line.
//! luod is the library's daemon on a thread of the measuring process (the
//! same code as the `luod` binary).
//!
//! What each [`Times`] field spans:
//! - `preserve`: the session's preserve calls (the guest memory freezes);
//! - `handover`: freeze, record, transport, the successor rebuilding the
//!   sessions (for luod both round trips; for transfer also the handlers'
//!   retrieve, which the successor runs before it answers the switch);
//! - `retrieve`: the handlers' retrieve (exec, luod) and finish in the
//!   successor, and its check of the retrieved file;
//! - `blackout`: from the freeze to the successor holding the files, what a
//!   running guest would not run through (for transfer the offer happens
//!   before it, while the guest runs).
//!
//! The copy baseline ([`copy_baseline`]) writes the populated memory to a
//! file in a directory (/dev/shm: memory to memory, no disk, no fsync, the
//! most favourable case for copying), frees the memory and reads it back
//! into fresh pages. It needs the memory twice.
//!
//! Success path of one [`HandoverBench::run`]:
//! 1. start the role processes (successor first where it connects ahead);
//! 2. each prints its `RESULT` line and exits 0;
//! 3. the parent combines their time stamps into [`Times`].
//!
//! Failure paths: a role process that exits non-zero or prints no `RESULT`
//! line makes the run fail with `BenchError::Role`; no partial result is
//! returned. Nothing here is random, so there is no seed.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use gmem::{Backend, FallocMode, GmemError, GmemFlags, GuestMemFile};
use rustix::io::Errno;

use crate::luod::LuodClient;
use crate::luod::server::{Daemon, DaemonConfig};
use crate::transport::{exec, transfer};
use crate::{HandlerRegistry, Incoming, LiveUpdate, LuError, Token};

/// Why a measurement failed or could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A live-update operation failed.
    #[error(transparent)]
    Lu(#[from] LuError),
    /// The guest memory file could not be made or populated (ENOMEM, ENOSPC
    /// when huge pages run out).
    #[error(transparent)]
    Gmem(#[from] GmemError),
    /// A system call or file operation failed.
    #[error("{operation}: {errno}")]
    System {
        /// What was being done.
        operation: String,
        /// The kernel's error.
        errno: Errno,
    },
    /// A role process failed, or its arguments or output were malformed.
    #[error("handover bench role: {reason}")]
    Role {
        /// What went wrong.
        reason: String,
    },
}

fn system(operation: impl Into<String>) -> impl FnOnce(Errno) -> BenchError {
    let operation = operation.into();
    move |errno| BenchError::System { operation, errno }
}

fn io(operation: impl Into<String>) -> impl FnOnce(std::io::Error) -> BenchError {
    let operation = operation.into();
    move |error| BenchError::System {
        operation,
        errno: Errno::from_io_error(&error).unwrap_or(Errno::IO),
    }
}

fn role_error(reason: impl Into<String>) -> BenchError {
    BenchError::Role {
        reason: reason.into(),
    }
}

/// How the guest memory crosses to the successor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Transport {
    /// The old process execs the successor in place.
    Exec,
    /// A successor started ahead receives an offer, then the switch.
    Transfer,
    /// The old process hands the session to luod; a successor retrieves it.
    Luod,
}

impl Transport {
    /// Every transport, in table order.
    pub const ALL: [Transport; 3] = [Transport::Exec, Transport::Transfer, Transport::Luod];

    /// Lower-case name (`exec`, `transfer`, `luod`).
    pub fn name(self) -> &'static str {
        match self {
            Transport::Exec => "exec",
            Transport::Transfer => "transfer",
            Transport::Luod => "luod",
        }
    }
}

/// How to start this program again in a role: `program prefix... ROLE
/// ARGUMENTS...` must reach [`run_role`] with `ROLE ARGUMENTS...`.
#[derive(Clone, Debug)]
pub struct Launcher {
    program: PathBuf,
    prefix: Vec<OsString>,
}

impl Launcher {
    /// The running executable, with `prefix` before the role.
    ///
    /// Errors: `System` when /proc/self/exe cannot be read.
    pub fn current_exe<I, S>(prefix: I) -> Result<Launcher, BenchError>
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        Ok(Launcher {
            program: std::env::current_exe().map_err(io("finding the running executable"))?,
            prefix: prefix.into_iter().map(Into::into).collect(),
        })
    }

    fn arguments(&self, role: Role, rest: &[String]) -> Vec<OsString> {
        let mut arguments = self.prefix.clone();
        arguments.push(role.name().into());
        arguments.extend(rest.iter().map(OsString::from));
        arguments
    }

    fn spawn(&self, role: Role, rest: &[String]) -> Result<Child, BenchError> {
        Command::new(&self.program)
            .args(self.arguments(role, rest))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(io(format!("starting the {} process", role.name())))
    }
}

/// The processes of one run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    ExecOld,
    ExecNew,
    TransferOld,
    TransferNew,
    LuodOld,
    LuodNew,
}

impl Role {
    const ALL: [Role; 6] = [
        Role::ExecOld,
        Role::ExecNew,
        Role::TransferOld,
        Role::TransferNew,
        Role::LuodOld,
        Role::LuodNew,
    ];

    fn name(self) -> &'static str {
        match self {
            Role::ExecOld => "exec-old",
            Role::ExecNew => "exec-new",
            Role::TransferOld => "transfer-old",
            Role::TransferNew => "transfer-new",
            Role::LuodOld => "luod-old",
            Role::LuodNew => "luod-new",
        }
    }
}

/// Whether `name` is a role [`run_role`] plays (so a program can dispatch
/// on its first argument).
pub fn is_role(name: &str) -> bool {
    Role::ALL.iter().any(|role| role.name() == name)
}

/// Plays the role named by `arguments[0]` with the rest as its arguments,
/// as started by [`HandoverBench::run`]; prints its `RESULT` line on
/// stdout. `launcher` must be the one the measuring process used (the exec
/// role starts its successor with it).
///
/// Errors: `Role` for an unknown role or missing arguments; those of the
/// live-update operations the role performs.
pub fn run_role(arguments: &[String], launcher: &Launcher) -> Result<(), BenchError> {
    let (name, rest) = arguments
        .split_first()
        .ok_or_else(|| role_error("no role given"))?;
    let role = Role::ALL
        .into_iter()
        .find(|role| role.name() == name)
        .ok_or_else(|| role_error(format!("unknown role {name:?}")))?;
    let options = RoleOptions::parse(rest)?;
    match role {
        Role::ExecOld => exec_old(&options, launcher),
        Role::ExecNew => exec_new(&options),
        Role::TransferOld => transfer_old(&options),
        Role::TransferNew => transfer_new(&options),
        Role::LuodOld => luod_old(&options),
        Role::LuodNew => luod_new(&options),
    }
}

/// `--key value` pairs of a role.
struct RoleOptions(HashMap<String, String>);

impl RoleOptions {
    fn parse(arguments: &[String]) -> Result<RoleOptions, BenchError> {
        let mut options = HashMap::new();
        for pair in arguments.chunks(2) {
            match pair {
                [key, value] if key.starts_with("--") => {
                    options.insert(key[2..].to_owned(), value.clone());
                }
                _ => return Err(role_error(format!("malformed role arguments {pair:?}"))),
            }
        }
        Ok(RoleOptions(options))
    }

    fn text(&self, key: &str) -> Result<&str, BenchError> {
        self.0
            .get(key)
            .map(String::as_str)
            .ok_or_else(|| role_error(format!("missing --{key}")))
    }

    fn number(&self, key: &str) -> Result<u64, BenchError> {
        let text = self.text(key)?;
        text.parse()
            .map_err(|_| role_error(format!("--{key} {text:?} is not a number")))
    }

    fn backend(&self) -> Result<Backend, BenchError> {
        match self.text("backend")? {
            "memfd" => Ok(Backend::Memfd),
            "hugetlb" => Ok(Backend::Hugetlb),
            other => Err(role_error(format!(
                "backend {other:?} is not memfd or hugetlb"
            ))),
        }
    }

    fn socket(&self) -> Result<PathBuf, BenchError> {
        Ok(PathBuf::from(self.text("socket")?))
    }
}

/// CLOCK_MONOTONIC in nanoseconds: one clock for every process, so times
/// taken in the old process and the successor can be subtracted.
fn now() -> u64 {
    let mut time = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into `time`, which lives
    // across the call; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut time) };
    time.tv_sec as u64 * 1_000_000_000 + time.tv_nsec as u64
}

fn print_result(fields: &[(&str, u64)]) -> Result<(), BenchError> {
    let line: Vec<String> = fields
        .iter()
        .map(|(key, value)| format!("{key}={value}"))
        .collect();
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "RESULT {}", line.join(" ")).map_err(io("printing the result"))?;
    stdout.flush().map_err(io("printing the result"))
}

/// A guest memory file of `size` bytes with every folio populated (the
/// kernel zeroes them): the memory a running guest has touched.
///
/// Errors: those of [`GuestMemFile::create`] and of populating it (ENOMEM,
/// ENOSPC when the huge page pool is too small).
pub fn populated_guest_memory(
    backend: Backend,
    size: u64,
) -> Result<Arc<GuestMemFile>, BenchError> {
    let file = GuestMemFile::create(size, GmemFlags::HOST_ACCESSIBLE, backend)?;
    file.fallocate(FallocMode::ALLOCATE, 0, size as i64)?;
    Ok(file)
}

fn preserve(file: &GuestMemFile) -> Result<(LiveUpdate, crate::Session), BenchError> {
    let live_update = LiveUpdate::new(HandlerRegistry::with_builtin_handlers());
    let session = live_update.create_session("vm")?;
    session.preserve(Token(0), file.as_fd())?;
    Ok((live_update, session))
}

/// Retrieves and finishes the session; returns the file so that the caller
/// takes its time stamp before the memory could be freed (closing the last
/// fd of a memfd frees its pages, which is teardown, not handover).
fn retrieve_all(mut incoming: Incoming, size: u64) -> Result<Arc<GuestMemFile>, BenchError> {
    let mut session = incoming.retrieve_session("vm")?;
    let file = session
        .retrieve(Token(0))?
        .downcast::<GuestMemFile>()
        .ok_or_else(|| role_error("the retrieved file is not guest memory"))?;
    if file.size() != size || file.populated_count() * file.folio_size() != size {
        return Err(role_error(format!(
            "retrieved {} bytes with {} folios, expected {size} bytes all populated",
            file.size(),
            file.populated_count()
        )));
    }
    session.finish()?;
    Ok(file)
}

// ---- exec ----

fn exec_old(options: &RoleOptions, launcher: &Launcher) -> Result<(), BenchError> {
    let size = options.number("size")?;
    let guest = populated_guest_memory(options.backend()?, size)?;
    let t0 = now();
    let (live_update, _session) = preserve(&guest)?;
    let t1 = now();
    let rest = [
        "--t0".to_owned(),
        t0.to_string(),
        "--t1".to_owned(),
        t1.to_string(),
        "--size".to_owned(),
        size.to_string(),
    ];
    let arguments = launcher.arguments(Role::ExecNew, &rest);
    let arguments: Vec<&OsStr> = arguments.iter().map(OsString::as_os_str).collect();
    // Returns only if the exec failed.
    Err(exec::exec_in_place(&live_update, &launcher.program, &arguments).into())
}

fn exec_new(options: &RoleOptions) -> Result<(), BenchError> {
    let incoming = exec::incoming_from_environment(&HandlerRegistry::with_builtin_handlers())?
        .ok_or_else(|| role_error("exec-new found no sessions in its environment"))?;
    let t2 = now();
    let _file = retrieve_all(incoming, options.number("size")?)?;
    let t3 = now();
    let (t0, t1) = (options.number("t0")?, options.number("t1")?);
    print_result(&[
        ("preserve", t1 - t0),
        ("handover", t2 - t1),
        ("retrieve", t3 - t2),
        ("blackout", t3 - t1),
    ])
}

// ---- transfer ----

fn transfer_old(options: &RoleOptions) -> Result<(), BenchError> {
    let size = options.number("size")?;
    let guest = populated_guest_memory(options.backend()?, size)?;
    let listener = transfer::TransferListener::bind(&options.socket()?)?;
    let mut link = listener.accept()?;
    let t0 = now();
    let (live_update, _session) = preserve(&guest)?;
    let t1 = now();
    link.offer(&live_update)?;
    let t2 = now();
    link.switch(&live_update, b"vcpu state")?;
    print_result(&[("t0", t0), ("t1", t1), ("t2", t2)])
}

/// Retries `connect` every 5 ms for up to 10 s: the peer may still be
/// populating its guest memory before it listens.
fn connect_retry<T>(connect: impl Fn() -> Result<T, LuError>) -> Result<T, BenchError> {
    let mut last = None;
    for _ in 0..2000 {
        match connect() {
            Ok(connected) => return Ok(connected),
            Err(error) => last = Some(error),
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Err(role_error(format!(
        "could not connect within 10 s: {}",
        last.map_or_else(String::new, |error| error.to_string())
    )))
}

fn transfer_new(options: &RoleOptions) -> Result<(), BenchError> {
    let size = options.number("size")?;
    let socket = options.socket()?;
    let mut successor = connect_retry(|| transfer::TransferSuccessor::connect(&socket))?;
    successor.receive_offer()?;
    let switched = successor.wait_for_switch(&HandlerRegistry::with_builtin_handlers())?;
    let t3 = now();
    let _file = retrieve_all(switched.incoming, size)?;
    let t4 = now();
    print_result(&[("t3", t3), ("t4", t4)])
}

// ---- luod ----

fn luod_old(options: &RoleOptions) -> Result<(), BenchError> {
    let size = options.number("size")?;
    let socket = options.socket()?;
    let guest = populated_guest_memory(options.backend()?, size)?;
    let client = connect_retry(|| LuodClient::connect(&socket))?;
    let t0 = now();
    let (live_update, _session) = preserve(&guest)?;
    let t1 = now();
    client.hand_over(&live_update)?;
    let t2 = now();
    print_result(&[("t0", t0), ("t1", t1), ("t2", t2)])
}

fn luod_new(options: &RoleOptions) -> Result<(), BenchError> {
    let size = options.number("size")?;
    let socket = options.socket()?;
    let client = connect_retry(|| LuodClient::connect(&socket))?;
    // Wait until the old process has handed over and exited.
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .map_err(io("waiting for the go"))?;
    let t3 = now();
    let incoming = client.retrieve("vm", &HandlerRegistry::with_builtin_handlers())?;
    let t4 = now();
    let _file = retrieve_all(incoming, size)?;
    let t5 = now();
    client.finish("vm")?;
    print_result(&[("t3", t3), ("t4", t4), ("t5", t5)])
}

// ---- the measuring process ----

/// One handover's times.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Times {
    /// The session's preserve calls.
    pub preserve: Duration,
    /// Freeze, record, transport, the successor rebuilding the sessions
    /// (transfer: and retrieving every file, before it answers the switch).
    pub handover: Duration,
    /// The handlers' retrieve (exec, luod) and finish in the successor.
    pub retrieve: Duration,
    /// From the freeze to the successor holding the files.
    pub blackout: Duration,
}

impl Times {
    /// Preserve + handover + retrieve: request to successor holding all.
    pub fn total(&self) -> Duration {
        self.preserve + self.handover + self.retrieve
    }
}

type Stamps = HashMap<String, u64>;

fn parse_result(line: &str) -> Stamps {
    line.trim_start_matches("RESULT ")
        .split_whitespace()
        .filter_map(|field| {
            let (key, value) = field.split_once('=')?;
            Some((key.to_owned(), value.parse().ok()?))
        })
        .collect()
}

fn result_of(child: &mut Child) -> Result<Stamps, BenchError> {
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| role_error("a role's stdout was not captured"))?;
    let mut found = None;
    for line in BufReader::new(stdout).lines() {
        let line = line.map_err(io("reading a role's output"))?;
        if line.starts_with("RESULT ") {
            found = Some(parse_result(&line));
        }
    }
    let status = child.wait().map_err(io("waiting for a role process"))?;
    if !status.success() {
        return Err(role_error(format!("a role process failed: {status}")));
    }
    found.ok_or_else(|| role_error("a role process printed no RESULT line"))
}

fn stamp(stamps: &Stamps, key: &str) -> Result<u64, BenchError> {
    stamps
        .get(key)
        .copied()
        .ok_or_else(|| role_error(format!("no {key} in a RESULT line")))
}

fn nanoseconds(from: u64, to: u64) -> Duration {
    Duration::from_nanos(to.saturating_sub(from))
}

fn backend_name(backend: Backend) -> Result<&'static str, BenchError> {
    match backend {
        Backend::Memfd => Ok("memfd"),
        Backend::Hugetlb => Ok("hugetlb"),
        Backend::Kvm => Err(role_error(
            "the handover bench measures memfd and hugetlb guest memory only",
        )),
    }
}

/// The measuring side: a scratch directory for sockets and luod on a thread,
/// both cleaned up on drop.
pub struct HandoverBench {
    launcher: Launcher,
    scratch: PathBuf,
    luod_socket: PathBuf,
    stop_luod: Option<OwnedFd>,
    luod: Option<JoinHandle<Result<(), LuError>>>,
}

impl HandoverBench {
    /// Makes the scratch directory and starts luod on a thread.
    ///
    /// Errors: `System` when the directory or the stop pipe cannot be made;
    /// those of [`Daemon::bind`] (EADDRINUSE...).
    pub fn start(launcher: Launcher) -> Result<HandoverBench, BenchError> {
        let scratch = std::env::temp_dir().join(format!("lu-bench-{}", std::process::id()));
        std::fs::create_dir_all(&scratch).map_err(io(format!("creating {}", scratch.display())))?;
        let luod_socket = scratch.join("luod.sock");
        let mut daemon = Daemon::bind(DaemonConfig::new(&luod_socket))?;
        let (stop_reader, stop_writer) = rustix::pipe::pipe().map_err(system("pipe"))?;
        let luod = std::thread::spawn(move || daemon.run(stop_reader.as_fd()));
        Ok(HandoverBench {
            launcher,
            scratch,
            luod_socket,
            stop_luod: Some(stop_writer),
            luod: Some(luod),
        })
    }

    /// One handover of `size` bytes of populated `backend` guest memory
    /// over `transport`, in fresh processes.
    ///
    /// Errors: `Role` when a role process fails (its own error is on its
    /// stderr, which is this process's), e.g. ENOMEM or ENOSPC populating
    /// the memory; `System` when a process cannot be started.
    pub fn run(
        &self,
        transport: Transport,
        backend: Backend,
        size: u64,
    ) -> Result<Times, BenchError> {
        let common = [
            "--backend".to_owned(),
            backend_name(backend)?.to_owned(),
            "--size".to_owned(),
            size.to_string(),
        ];
        match transport {
            Transport::Exec => self.run_exec(&common),
            Transport::Transfer => self.run_transfer(&common),
            Transport::Luod => self.run_luod(&common),
        }
    }

    fn with_socket(common: &[String], socket: &Path) -> Vec<String> {
        let mut arguments = common.to_vec();
        arguments.push("--socket".to_owned());
        arguments.push(socket.to_string_lossy().into_owned());
        arguments
    }

    fn run_exec(&self, common: &[String]) -> Result<Times, BenchError> {
        let mut child = self.launcher.spawn(Role::ExecOld, common)?;
        let stamps = result_of(&mut child)?;
        Ok(Times {
            preserve: Duration::from_nanos(stamp(&stamps, "preserve")?),
            handover: Duration::from_nanos(stamp(&stamps, "handover")?),
            retrieve: Duration::from_nanos(stamp(&stamps, "retrieve")?),
            blackout: Duration::from_nanos(stamp(&stamps, "blackout")?),
        })
    }

    fn run_transfer(&self, common: &[String]) -> Result<Times, BenchError> {
        let socket = self.scratch.join("transfer.sock");
        let arguments = Self::with_socket(common, &socket);
        let mut successor = self.launcher.spawn(Role::TransferNew, &arguments)?;
        let mut old = self.launcher.spawn(Role::TransferOld, &arguments)?;
        let old_stamps = result_of(&mut old)?;
        let new_stamps = result_of(&mut successor)?;
        let (t0, t1, t2) = (
            stamp(&old_stamps, "t0")?,
            stamp(&old_stamps, "t1")?,
            stamp(&old_stamps, "t2")?,
        );
        let (t3, t4) = (stamp(&new_stamps, "t3")?, stamp(&new_stamps, "t4")?);
        Ok(Times {
            preserve: nanoseconds(t0, t1),
            handover: nanoseconds(t1, t3),
            retrieve: nanoseconds(t3, t4),
            blackout: nanoseconds(t2, t4),
        })
    }

    fn run_luod(&self, common: &[String]) -> Result<Times, BenchError> {
        let arguments = Self::with_socket(common, &self.luod_socket);
        let mut successor = self.launcher.spawn(Role::LuodNew, &arguments)?;
        let mut old = self.launcher.spawn(Role::LuodOld, &arguments)?;
        let old_stamps = result_of(&mut old)?;
        let go = successor
            .stdin
            .as_mut()
            .ok_or_else(|| role_error("the successor's stdin was not captured"))?;
        writeln!(go, "go").map_err(io("telling the successor to go"))?;
        let new_stamps = result_of(&mut successor)?;
        let (t0, t1, t2) = (
            stamp(&old_stamps, "t0")?,
            stamp(&old_stamps, "t1")?,
            stamp(&old_stamps, "t2")?,
        );
        let (t3, t4, t5) = (
            stamp(&new_stamps, "t3")?,
            stamp(&new_stamps, "t4")?,
            stamp(&new_stamps, "t5")?,
        );
        Ok(Times {
            preserve: nanoseconds(t0, t1),
            handover: nanoseconds(t1, t2) + nanoseconds(t3, t4),
            retrieve: nanoseconds(t4, t5),
            blackout: nanoseconds(t1, t2) + nanoseconds(t3, t5),
        })
    }
}

impl Drop for HandoverBench {
    fn drop(&mut self) {
        if let Some(stop) = self.stop_luod.take() {
            let _ = rustix::io::write(&stop, b"x");
        }
        if let Some(luod) = self.luod.take() {
            let _ = luod.join();
        }
        let _ = std::fs::remove_dir_all(&self.scratch);
    }
}

/// The copy baseline: populates `size` bytes of `backend` guest memory
/// (untimed), then times writing it to an unlinked file in `directory`,
/// freeing the memory and reading it back into fresh pages.
///
/// Errors: those of [`populated_guest_memory`]; `System` for the file, the
/// mapping or the copy (ENOSPC when `directory` is full).
pub fn copy_baseline(
    backend: Backend,
    size: u64,
    directory: &Path,
) -> Result<Duration, BenchError> {
    let guest = populated_guest_memory(backend, size)?;
    let path = directory.join(format!("lu-bench-snapshot-{}", std::process::id()));
    let snapshot = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .map_err(io(format!("creating {}", path.display())))?;
    std::fs::remove_file(&path).map_err(io(format!("unlinking {}", path.display())))?;
    let mapping = guest.mapping()?;
    let base = mapping.host_address().as_ptr();
    // SAFETY: the mapping is `size` bytes long and lives as long as `guest`
    // and `mapping`, both alive until the end of this function; no one else
    // touches this memory meanwhile (the file was just created here).
    let memory = unsafe { std::slice::from_raw_parts_mut(base, size as usize) };
    let start = now();
    // 8 MiB per call: large enough that system call overhead vanishes.
    let chunk = 8 << 20;
    for (index, piece) in memory.chunks(chunk).enumerate() {
        write_all_at(&snapshot, piece, (index * chunk) as u64)?;
    }
    // Free the guest's pages: the restore fills fresh ones.
    guest.fallocate(FallocMode::PUNCH, 0, size as i64)?;
    for (index, piece) in memory.chunks_mut(chunk).enumerate() {
        read_exact_at(&snapshot, piece, (index * chunk) as u64)?;
    }
    Ok(nanoseconds(start, now()))
}

fn write_all_at(file: &std::fs::File, mut bytes: &[u8], mut offset: u64) -> Result<(), BenchError> {
    while !bytes.is_empty() {
        let written =
            rustix::io::pwrite(file, bytes, offset).map_err(system("writing the snapshot"))?;
        bytes = &bytes[written..];
        offset += written as u64;
    }
    Ok(())
}

fn read_exact_at(
    file: &std::fs::File,
    mut bytes: &mut [u8],
    mut offset: u64,
) -> Result<(), BenchError> {
    while !bytes.is_empty() {
        let count =
            rustix::io::pread(file, &mut *bytes, offset).map_err(system("reading the snapshot"))?;
        if count == 0 {
            return Err(BenchError::System {
                operation: "reading the snapshot: short file".to_owned(),
                errno: Errno::IO,
            });
        }
        bytes = &mut bytes[count..];
        offset += count as u64;
    }
    Ok(())
}

/// `MemAvailable` of /proc/meminfo in bytes: what can be allocated without
/// swapping or evicting much.
///
/// Errors: `System` when /proc/meminfo cannot be read or lacks the line.
pub fn available_memory() -> Result<u64, BenchError> {
    meminfo_field("MemAvailable:").map(|kib| kib * 1024)
}

/// Bytes an unprivileged writer may still put into the file system holding
/// `directory` (for sizing the copy baseline's snapshot).
///
/// Errors: `System` with statvfs's errno (ENOENT for a missing directory).
pub fn free_space(directory: &Path) -> Result<u64, BenchError> {
    let stat = rustix::fs::statvfs(directory)
        .map_err(system(format!("statvfs of {}", directory.display())))?;
    Ok(stat.f_bavail.saturating_mul(stat.f_frsize))
}

fn meminfo_field(name: &str) -> Result<u64, BenchError> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").map_err(io("reading /proc/meminfo"))?;
    meminfo
        .lines()
        .find(|line| line.starts_with(name))
        .and_then(|line| line.split_whitespace().nth(1)?.parse().ok())
        .ok_or_else(|| BenchError::System {
            operation: format!("finding {name} in /proc/meminfo"),
            errno: Errno::NOENT,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_options_parse_pairs_and_refuse_anything_else() {
        let options = RoleOptions::parse(&["--size".to_owned(), "4096".to_owned()]).unwrap();
        assert_eq!(options.number("size").unwrap(), 4096);
        assert!(options.number("t0").is_err());
        assert!(RoleOptions::parse(&["--size".to_owned()]).is_err());
        assert!(RoleOptions::parse(&["size".to_owned(), "1".to_owned()]).is_err());
    }

    #[test]
    fn every_role_is_recognised_and_nothing_else() {
        for role in Role::ALL {
            assert!(is_role(role.name()));
        }
        assert!(!is_role("exec"));
    }

    #[test]
    fn result_lines_parse_into_stamps() {
        let stamps = parse_result("RESULT t0=5 t1=9 junk");
        assert_eq!(stamp(&stamps, "t1").unwrap(), 9);
        assert!(stamp(&stamps, "junk").is_err());
    }

    #[test]
    fn the_copy_baseline_copies_and_takes_time() {
        let elapsed = copy_baseline(Backend::Memfd, 4 << 20, &std::env::temp_dir()).unwrap();
        assert!(elapsed > Duration::ZERO);
    }
}
