//! Benchmark: preserve + freeze + handover + retrieve of populated guest
//! memory (a `gmem::GuestMemFile`, memfd or hugetlb backend, every folio
//! present) per transport, side by side with copying the same memory out to a
//! file and back (what a snapshot/restore does). Prints one table.
//!
//! ```text
//! cargo run --release -p liveupdate --example handover_bench -- \
//!     [--sizes 1,4] [--with-16g] [--backends memfd,hugetlb] [--repeat 3] [--copy-dir /dev/shm]
//! ```
//!
//! Each measurement runs in fresh processes: the old VMM process populates
//! the memory (untimed), then is timed from its first preserve to the moment
//! the successor process holds every retrieved file. Times come from
//! CLOCK_MONOTONIC, which all processes share. luod runs as the library's
//! daemon on a thread of the bench process (the same code as the `luod`
//! binary). The copy baseline writes the memory to a file in `--copy-dir`
//! (default /dev/shm: memory to memory, no disk, no fsync, the most
//! favourable case for copying), frees the memory, and reads it back into
//! fresh pages. Medians of `--repeat` runs.
//!
//! Columns: preserve (session preserve calls), handover (freeze, record,
//! transport, the successor rebuilding the sessions), retrieve (the
//! handlers' retrieve), total, blackout (from the freeze to the successor
//! holding the files: what a running guest would not run through; for
//! transfer the offer happens before it), copy (out + in), and copy / total.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use gmem::{Backend, FallocMode, GmemFlags, GuestMemFile};
use liveupdate::luod::LuodClient;
use liveupdate::luod::server::{Daemon, DaemonConfig};
use liveupdate::transport::{exec, transfer};
use liveupdate::{HandlerRegistry, Incoming, LiveUpdate, Token};
use rustix::fs::FallocateFlags;

const GIB: u64 = 1 << 30;
const HUGE_PAGE: u64 = 2 << 20;

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

fn argument(name: &str) -> Option<String> {
    let arguments: Vec<String> = std::env::args().collect();
    let position = arguments.iter().position(|argument| argument == name)?;
    arguments.get(position + 1).cloned()
}

fn number(name: &str) -> anyhow::Result<u64> {
    argument(name)
        .with_context(|| format!("missing {name}"))?
        .parse()
        .with_context(|| format!("bad {name}"))
}

fn flag(name: &str) -> bool {
    std::env::args().any(|argument| argument == name)
}

fn result(fields: &[(&str, u64)]) {
    let line: Vec<String> = fields
        .iter()
        .map(|(key, value)| format!("{key}={value}"))
        .collect();
    println!("RESULT {}", line.join(" "));
    let _ = std::io::stdout().flush();
}

fn main() -> anyhow::Result<()> {
    match std::env::args().nth(1).as_deref() {
        Some("exec-old") => exec_old(),
        Some("exec-new") => exec_new(),
        Some("transfer-old") => transfer_old(),
        Some("transfer-new") => transfer_new(),
        Some("luod-old") => luod_old(),
        Some("luod-new") => luod_new(),
        _ => run_all(),
    }
}

// ---- the guest memory of one run ----

fn guest_memory(huge: bool, size: u64) -> anyhow::Result<Arc<GuestMemFile>> {
    let backend = if huge {
        Backend::Hugetlb
    } else {
        Backend::Memfd
    };
    let file = GuestMemFile::create(size, GmemFlags::HOST_ACCESSIBLE, backend)?;
    // Populate every folio (the kernel zeroes them): the memory a running
    // guest has touched.
    file.fallocate(FallocMode::ALLOCATE, 0, size as i64)
        .context("populating")?;
    Ok(file)
}

fn preserve(file: &GuestMemFile) -> anyhow::Result<(LiveUpdate, liveupdate::Session)> {
    let live_update = LiveUpdate::new(HandlerRegistry::with_builtin_handlers());
    let session = live_update.create_session("vm")?;
    session.preserve(Token(0), file.as_fd())?;
    Ok((live_update, session))
}

/// Retrieves and finishes the session; returns the file so that the caller
/// takes its time stamp before the memory could be freed (closing the last
/// fd of a memfd frees its pages, which is teardown, not handover).
fn retrieve_all(mut incoming: Incoming, size: u64) -> anyhow::Result<Arc<GuestMemFile>> {
    let mut session = incoming.retrieve_session("vm")?;
    let file = session
        .retrieve(Token(0))?
        .downcast::<GuestMemFile>()
        .context("not guest memory")?;
    ensure!(file.size() == size, "retrieved size {}", file.size());
    ensure!(
        file.populated_count() * file.folio_size() == size,
        "retrieved {} folios",
        file.populated_count()
    );
    session.finish()?;
    Ok(file)
}

fn huge_argument() -> bool {
    argument("--backend").as_deref() == Some("hugetlb")
}

// ---- exec ----

fn exec_old() -> anyhow::Result<()> {
    let size = number("--size")?;
    let guest = guest_memory(huge_argument(), size)?;
    let t0 = now();
    let (live_update, _session) = preserve(&guest)?;
    let t1 = now();
    let program = std::env::current_exe()?;
    let arguments = [
        "exec-new".to_owned(),
        "--t0".to_owned(),
        t0.to_string(),
        "--t1".to_owned(),
        t1.to_string(),
        "--size".to_owned(),
        size.to_string(),
    ];
    let arguments: Vec<&std::ffi::OsStr> = arguments.iter().map(std::ffi::OsStr::new).collect();
    let error = exec::exec_in_place(&live_update, &program, &arguments);
    bail!("exec failed: {error}")
}

fn exec_new() -> anyhow::Result<()> {
    let incoming = exec::incoming_from_environment(&HandlerRegistry::with_builtin_handlers())?
        .context("no sessions")?;
    let t2 = now();
    let _file = retrieve_all(incoming, number("--size")?)?;
    let t3 = now();
    let (t0, t1) = (number("--t0")?, number("--t1")?);
    result(&[
        ("preserve", t1 - t0),
        ("handover", t2 - t1),
        ("retrieve", t3 - t2),
        ("blackout", t3 - t1),
    ]);
    Ok(())
}

// ---- transfer ----

fn transfer_old() -> anyhow::Result<()> {
    let size = number("--size")?;
    let socket = PathBuf::from(argument("--socket").context("--socket")?);
    let guest = guest_memory(huge_argument(), size)?;
    let listener = transfer::TransferListener::bind(&socket)?;
    let mut link = listener.accept()?;
    let t0 = now();
    let (live_update, _session) = preserve(&guest)?;
    let t1 = now();
    link.offer(&live_update)?;
    let t2 = now();
    link.switch(&live_update, b"vcpu state")?;
    result(&[("t0", t0), ("t1", t1), ("t2", t2)]);
    Ok(())
}

fn connect_retry<T>(connect: impl Fn() -> Result<T, liveupdate::LuError>) -> anyhow::Result<T> {
    for _ in 0..2000 {
        if let Ok(connected) = connect() {
            return Ok(connected);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    bail!("could not connect")
}

fn transfer_new() -> anyhow::Result<()> {
    let size = number("--size")?;
    let socket = PathBuf::from(argument("--socket").context("--socket")?);
    let mut successor = connect_retry(|| transfer::TransferSuccessor::connect(&socket))?;
    successor.receive_offer()?;
    let switched = successor.wait_for_switch(&HandlerRegistry::with_builtin_handlers())?;
    let t3 = now();
    let _file = retrieve_all(switched.incoming, size)?;
    let t4 = now();
    result(&[("t3", t3), ("t4", t4)]);
    Ok(())
}

// ---- luod ----

fn luod_old() -> anyhow::Result<()> {
    let size = number("--size")?;
    let socket = PathBuf::from(argument("--socket").context("--socket")?);
    let guest = guest_memory(huge_argument(), size)?;
    let client = connect_retry(|| LuodClient::connect(&socket))?;
    let t0 = now();
    let (live_update, _session) = preserve(&guest)?;
    let t1 = now();
    client.hand_over(&live_update)?;
    let t2 = now();
    result(&[("t0", t0), ("t1", t1), ("t2", t2)]);
    Ok(())
}

fn luod_new() -> anyhow::Result<()> {
    let size = number("--size")?;
    let socket = PathBuf::from(argument("--socket").context("--socket")?);
    let client = connect_retry(|| LuodClient::connect(&socket))?;
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    let t3 = now();
    let incoming = client.retrieve("vm", &HandlerRegistry::with_builtin_handlers())?;
    let t4 = now();
    let _file = retrieve_all(incoming, size)?;
    let t5 = now();
    client.finish("vm")?;
    result(&[("t3", t3), ("t4", t4), ("t5", t5)]);
    Ok(())
}

// ---- the parent ----

#[derive(Clone, Copy, Default)]
struct Times {
    preserve: u64,
    handover: u64,
    retrieve: u64,
    blackout: u64,
}

impl Times {
    fn total(&self) -> u64 {
        self.preserve + self.handover + self.retrieve
    }
}

fn parse_result(line: &str) -> std::collections::HashMap<String, u64> {
    line.trim_start_matches("RESULT ")
        .split_whitespace()
        .filter_map(|field| {
            let (key, value) = field.split_once('=')?;
            Some((key.to_owned(), value.parse().ok()?))
        })
        .collect()
}

fn spawn_role(role: &str, backend: &str, size: u64, extra: &[&str]) -> anyhow::Result<Child> {
    Ok(Command::new(std::env::current_exe()?)
        .args([role, "--backend", backend, "--size", &size.to_string()])
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?)
}

fn result_of(child: &mut Child) -> anyhow::Result<std::collections::HashMap<String, u64>> {
    let stdout = child.stdout.take().context("stdout")?;
    let mut found = None;
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        if line.starts_with("RESULT ") {
            found = Some(parse_result(&line));
        }
    }
    let status = child.wait()?;
    ensure!(status.success(), "a bench process failed: {status}");
    found.context("no RESULT line")
}

fn field(map: &std::collections::HashMap<String, u64>, key: &str) -> anyhow::Result<u64> {
    map.get(key).copied().with_context(|| format!("no {key}"))
}

fn run_exec(backend: &str, size: u64) -> anyhow::Result<Times> {
    let mut child = spawn_role("exec-old", backend, size, &[])?;
    let map = result_of(&mut child)?;
    Ok(Times {
        preserve: field(&map, "preserve")?,
        handover: field(&map, "handover")?,
        retrieve: field(&map, "retrieve")?,
        blackout: field(&map, "blackout")?,
    })
}

fn run_transfer(backend: &str, size: u64, scratch: &Path) -> anyhow::Result<Times> {
    let socket = scratch.join("transfer.sock");
    let socket = socket.to_str().context("path")?;
    let mut successor = spawn_role("transfer-new", backend, size, &["--socket", socket])?;
    let mut old = spawn_role("transfer-old", backend, size, &["--socket", socket])?;
    let old_times = result_of(&mut old)?;
    let new_times = result_of(&mut successor)?;
    let (t0, t1, t2) = (
        field(&old_times, "t0")?,
        field(&old_times, "t1")?,
        field(&old_times, "t2")?,
    );
    let (t3, t4) = (field(&new_times, "t3")?, field(&new_times, "t4")?);
    Ok(Times {
        preserve: t1 - t0,
        handover: t3 - t1,
        retrieve: t4 - t3,
        blackout: t4 - t2,
    })
}

fn run_luod(backend: &str, size: u64, socket: &Path) -> anyhow::Result<Times> {
    let socket = socket.to_str().context("path")?;
    let mut successor = spawn_role("luod-new", backend, size, &["--socket", socket])?;
    let mut old = spawn_role("luod-old", backend, size, &["--socket", socket])?;
    let old_times = result_of(&mut old)?;
    writeln!(successor.stdin.as_mut().context("stdin")?, "go")?;
    let new_times = result_of(&mut successor)?;
    let (t0, t1, t2) = (
        field(&old_times, "t0")?,
        field(&old_times, "t1")?,
        field(&old_times, "t2")?,
    );
    let (t3, t4, t5) = (
        field(&new_times, "t3")?,
        field(&new_times, "t4")?,
        field(&new_times, "t5")?,
    );
    Ok(Times {
        preserve: t1 - t0,
        handover: (t2 - t1) + (t4 - t3),
        retrieve: t5 - t4,
        blackout: (t2 - t1) + (t5 - t3),
    })
}

/// Writes the memory to a file and reads it back into fresh pages.
fn run_copy(huge: bool, size: u64, directory: &Path) -> anyhow::Result<u64> {
    let file = guest_memory(huge, size)?;
    let memfd = file.as_fd();
    let path = directory.join("snapshot");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)?;
    std::fs::remove_file(&path)?;
    // SAFETY: a fresh shared mapping of the whole memfd, unmapped below.
    let mapping = unsafe {
        rustix::mm::mmap(
            std::ptr::null_mut(),
            size as usize,
            rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
            rustix::mm::MapFlags::SHARED,
            memfd,
            0,
        )
    }?;
    // SAFETY: the mapping is `size` bytes long and stays mapped until the
    // munmap below; nothing else writes it meanwhile.
    let memory = unsafe { std::slice::from_raw_parts_mut(mapping.cast::<u8>(), size as usize) };
    let start = now();
    let chunk = 8 << 20;
    for (index, piece) in memory.chunks(chunk).enumerate() {
        write_all_at(&file, piece, (index * chunk) as u64)?;
    }
    // Free the guest's pages: the restore fills fresh ones.
    let punch = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
    rustix::fs::fallocate(memfd, punch, 0, size)?;
    for (index, piece) in memory.chunks_mut(chunk).enumerate() {
        read_exact_at(&file, piece, (index * chunk) as u64)?;
    }
    let elapsed = now() - start;
    // SAFETY: the mapping made above; `memory` is not used after this.
    unsafe { rustix::mm::munmap(mapping, size as usize) }?;
    Ok(elapsed)
}

fn write_all_at(file: &std::fs::File, mut bytes: &[u8], mut offset: u64) -> anyhow::Result<()> {
    while !bytes.is_empty() {
        let written = rustix::io::pwrite(file, bytes, offset)?;
        bytes = &bytes[written..];
        offset += written as u64;
    }
    Ok(())
}

fn read_exact_at(
    file: &std::fs::File,
    mut bytes: &mut [u8],
    mut offset: u64,
) -> anyhow::Result<()> {
    while !bytes.is_empty() {
        let count = rustix::io::pread(file, &mut *bytes, offset)?;
        ensure!(count > 0, "short read");
        bytes = &mut bytes[count..];
        offset += count as u64;
    }
    Ok(())
}

fn median(mut values: Vec<u64>) -> u64 {
    values.sort_unstable();
    values.get(values.len() / 2).copied().unwrap_or(0)
}

fn median_times(runs: &[Times]) -> Times {
    Times {
        preserve: median(runs.iter().map(|times| times.preserve).collect()),
        handover: median(runs.iter().map(|times| times.handover).collect()),
        retrieve: median(runs.iter().map(|times| times.retrieve).collect()),
        blackout: median(runs.iter().map(|times| times.blackout).collect()),
    }
}

fn milliseconds(nanoseconds: u64) -> String {
    format!("{:.3}", nanoseconds as f64 / 1e6)
}

/// Makes `pages` huge pages free; returns the previous pool size to restore.
fn reserve_huge(pages: u64) -> anyhow::Result<Option<u64>> {
    let total: u64 = std::fs::read_to_string("/proc/sys/vm/nr_hugepages")?
        .trim()
        .parse()?;
    std::fs::write("/proc/sys/vm/nr_hugepages", (total + pages).to_string())?;
    let meminfo = std::fs::read_to_string("/proc/meminfo")?;
    let free: u64 = meminfo
        .lines()
        .find(|line| line.starts_with("HugePages_Free:"))
        .and_then(|line| line.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0);
    if free < pages {
        std::fs::write("/proc/sys/vm/nr_hugepages", total.to_string())?;
        return Ok(None);
    }
    Ok(Some(total))
}

fn run_all() -> anyhow::Result<()> {
    let sizes: Vec<u64> = argument("--sizes")
        .unwrap_or_else(|| "1,4".to_owned())
        .split(',')
        .map(|size| size.parse::<u64>().map(|gib| gib * GIB))
        .collect::<Result<_, _>>()?;
    let backends_argument = argument("--backends").unwrap_or_else(|| "memfd,hugetlb".to_owned());
    let backends: Vec<&str> = backends_argument.split(',').collect();
    let repeat: usize = argument("--repeat").map_or(Ok(3), |text| text.parse())?;
    let copy_directory =
        PathBuf::from(argument("--copy-dir").unwrap_or_else(|| "/dev/shm".to_owned()));
    std::fs::create_dir_all(&copy_directory)?;
    let scratch = std::env::temp_dir().join(format!("lu-bench-{}", std::process::id()));
    std::fs::create_dir_all(&scratch)?;
    let luod_socket = scratch.join("luod.sock");
    let mut daemon = Daemon::bind(DaemonConfig::new(&luod_socket))?;
    let (stop_reader, stop_writer) = rustix::pipe::pipe()?;
    let server = std::thread::spawn(move || daemon.run(stop_reader.as_fd()));

    let mut configurations: Vec<(&str, u64)> = Vec::new();
    for backend in &backends {
        for size in &sizes {
            configurations.push((backend, *size));
        }
    }
    if flag("--with-16g") {
        configurations.push(("memfd", 16 * GIB));
    }
    println!(
        "| backend | size | transport | preserve ms | handover ms | retrieve ms | total ms | blackout ms | copy out+in ms | copy / total |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for (backend, size) in configurations {
        let huge = backend == "hugetlb";
        let restore_pool = if huge {
            match reserve_huge(size / HUGE_PAGE)? {
                Some(previous) => Some(previous),
                None => {
                    println!(
                        "| hugetlb | {} GiB | (all) | not measured: the kernel could not reserve {} huge pages |||||||",
                        size / GIB,
                        size / HUGE_PAGE
                    );
                    continue;
                }
            }
        } else {
            None
        };
        // Copying 16 GiB needs the memory twice (memfd and page cache): more
        // than this machine has.
        let copy = if size <= 4 * GIB {
            let runs: Vec<u64> = (0..repeat)
                .map(|_| run_copy(huge, size, &copy_directory))
                .collect::<Result<_, _>>()?;
            Some(median(runs))
        } else {
            None
        };
        for transport in ["exec", "transfer", "luod"] {
            let mut runs = Vec::new();
            for _ in 0..repeat {
                runs.push(match transport {
                    "exec" => run_exec(backend, size)?,
                    "transfer" => run_transfer(backend, size, &scratch)?,
                    _ => run_luod(backend, size, &luod_socket)?,
                });
            }
            let times = median_times(&runs);
            let (copy_text, ratio) = match copy {
                Some(copy) => (
                    milliseconds(copy),
                    format!("{:.0}x", copy as f64 / times.total() as f64),
                ),
                None => ("not measured (RAM)".to_owned(), "-".to_owned()),
            };
            println!(
                "| {backend} | {} GiB | {transport} | {} | {} | {} | {} | {} | {copy_text} | {ratio} |",
                size / GIB,
                milliseconds(times.preserve),
                milliseconds(times.handover),
                milliseconds(times.retrieve),
                milliseconds(times.total()),
                milliseconds(times.blackout),
            );
        }
        if let Some(previous) = restore_pool {
            std::fs::write("/proc/sys/vm/nr_hugepages", previous.to_string())?;
        }
    }
    rustix::io::write(&stop_writer, b"x")?;
    let _ = server.join();
    let _ = std::fs::remove_dir_all(&scratch);
    Ok(())
}
