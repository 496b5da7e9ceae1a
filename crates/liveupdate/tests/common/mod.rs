//! Shared helpers of the process-level tests: spawning the peer binary and
//! luod, reading their lines with timeouts, scratch directories and huge
//! page reservations.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use gmem::hugetlb::HugePageReservation;

pub const PEER: &str = env!("CARGO_BIN_EXE_liveupdate-peer");
pub const LUOD: &str = env!("CARGO_BIN_EXE_luod");
pub const TIMEOUT: Duration = Duration::from_secs(60);

/// A scratch directory under /tmp, world-searchable (a test client may run
/// as another uid), removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Scratch {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let unique = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("lu-{name}-{}-{unique}", std::process::id()));
        std::fs::create_dir_all(&path).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        Scratch(path)
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A child process whose stdout and stderr lines arrive through channels.
pub struct Process {
    pub child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    errors: Receiver<String>,
    pub seen: Vec<String>,
}

fn forward(reader: impl std::io::Read + Send + 'static) -> Receiver<String> {
    let (sender, receiver) = channel();
    std::thread::spawn(move || {
        for line in BufReader::new(reader).lines().map_while(Result::ok) {
            if sender.send(line).is_err() {
                break;
            }
        }
    });
    receiver
}

impl Process {
    pub fn spawn(mut command: Command) -> Process {
        command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn().unwrap();
        let stdin = child.stdin.take();
        let lines = forward(child.stdout.take().unwrap());
        let errors = forward(child.stderr.take().unwrap());
        Process {
            child,
            stdin,
            lines,
            errors,
            seen: Vec::new(),
        }
    }

    pub fn peer(arguments: &[&str]) -> Process {
        let mut command = Command::new(PEER);
        command.args(arguments);
        Process::spawn(command)
    }

    /// Waits for a stdout line starting with `prefix`; panics with
    /// everything seen (and stderr) on timeout or exit.
    pub fn expect(&mut self, prefix: &str) -> String {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.starts_with(prefix) {
                        return line;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    panic!(
                        "no line {prefix:?} within {TIMEOUT:?}; saw {:?}; stderr: {}",
                        self.seen,
                        self.stderr()
                    )
                }
                Err(RecvTimeoutError::Disconnected) => {
                    panic!(
                        "exited before {prefix:?}; saw {:?}; stderr: {}",
                        self.seen,
                        self.stderr()
                    )
                }
            }
        }
    }

    pub fn send_line(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().unwrap();
        writeln!(stdin, "{line}").unwrap();
        stdin.flush().unwrap();
    }

    /// Everything the process wrote to stderr so far.
    pub fn stderr(&self) -> String {
        let mut text = String::new();
        while let Ok(line) = self.errors.recv_timeout(Duration::from_millis(50)) {
            text.push_str(&line);
            text.push('\n');
        }
        text
    }

    pub fn wait(&mut self) -> ExitStatus {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "process did not exit; stderr: {}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn wait_success(&mut self) {
        let status = self.wait();
        let rest: Vec<String> = self.lines.try_iter().collect();
        self.seen.extend(rest);
        assert!(
            status.success(),
            "exit {status}; stdout {:?}; stderr: {}",
            self.seen,
            self.stderr()
        );
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The reservation behind [`huge_available`], held for the whole test
/// process: the peers and luod of several tests use its pages, also after
/// the test that deposited them has ended.
static HUGE_PAGES: Mutex<Option<HugePageReservation>> = Mutex::new(None);

/// Gives the reservation back at exit (statics are never dropped).
extern "C" fn give_back_huge_pages() {
    let reservation = HUGE_PAGES
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .take();
    drop(reservation);
}

/// Whether the guest may include its hugetlb part: 64 huge pages (128 MiB)
/// are reserved once per test binary, enough for the tests of one binary
/// running at once (16 each), and given back when it exits.
pub fn huge_available() -> bool {
    static RESERVED: OnceLock<bool> = OnceLock::new();
    *RESERVED.get_or_init(|| match HugePageReservation::ensure_available(64) {
        Ok(reservation) => {
            *HUGE_PAGES.lock().unwrap_or_else(PoisonError::into_inner) = Some(reservation);
            // SAFETY: atexit only records the handler; the handler takes no
            // arguments and touches nothing but the static above, which
            // outlives every exit handler.
            unsafe { libc::atexit(give_back_huge_pages) };
            true
        }
        Err(error) => {
            test_support::skipped(format_args!("hugetlb: {error}"));
            false
        }
    })
}

/// The peer's guest arguments: seed, and `--huge` when available.
pub fn guest_arguments(seed: u64) -> Vec<String> {
    let mut arguments = vec!["--seed".to_owned(), seed.to_string()];
    if huge_available() {
        arguments.push("--huge".to_owned());
    } else {
        test_support::skipped(format_args!(
            "the hugetlb (2 MiB folio) half of the guest: no huge pages"
        ));
    }
    arguments
}

/// The peer's guest arguments without the hugetlb half, for tests about
/// something else than the memory (they leave the shared huge page pool to
/// the round trips).
pub fn small_guest_arguments(seed: u64) -> Vec<String> {
    vec!["--seed".to_owned(), seed.to_string()]
}

/// A running luod on a scratch socket.
pub struct Luod {
    pub process: Process,
    pub socket: PathBuf,
    pub scratch: Scratch,
}

impl Luod {
    pub fn start(name: &str) -> Luod {
        Luod::start_with(name, &[])
    }

    pub fn start_with(name: &str, arguments: &[&str]) -> Luod {
        let scratch = Scratch::new(name);
        let socket = scratch.join("luod.sock");
        let mut command = Command::new(LUOD);
        command
            .arg("--socket")
            .arg(&socket)
            .args(arguments)
            .env("RUST_LOG", "info");
        let process = Process::spawn(command);
        let deadline = Instant::now() + TIMEOUT;
        while liveupdate::luod::LuodClient::connect(&socket).is_err() {
            assert!(Instant::now() < deadline, "luod did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
        Luod {
            process,
            socket,
            scratch,
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn client(&self) -> liveupdate::luod::LuodClient {
        liveupdate::luod::LuodClient::connect(&self.socket).unwrap()
    }
}
