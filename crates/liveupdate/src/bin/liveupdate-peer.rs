//! `liveupdate-peer`: the processes of the integration tests. It plays the
//! old VMM, the successor, or a plain luod client, so the tests run every
//! transport across real process boundaries (real exec, real sockets, real
//! process death).
//!
//! The guest memory it preserves is 64 MiB of guest memory files
//! (`gmem::GuestMemFile`): 32 MiB on the memfd backend, 4 KiB folios, with a
//! NUMA policy (token 0) and, when the caller reserved huge pages, 32 MiB on
//! the hugetlb backend, 2 MiB folios (token 1); both partly populated with a
//! pattern derived from a seed, so a successor can check every byte and
//! every populated folio. A third memfd (token 2) stands for the VMM's own state,
//! with a file position and seals. Results go to stdout as lines the tests
//! match: `VERIFIED ...`, `ERRNO <n> ...`, `CARRIED-ON`...

use std::io::{BufRead, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use clap::{Parser, Subcommand};
use gmem::{
    Backend, FallocMode, FolioOrder, GmemFlags, GuestMemFile, MemPolicy, NodeMask, PageIndex,
};
use liveupdate::handlers::gmem as gmem_handler;
use liveupdate::handlers::gmem_data::GmemData;
use liveupdate::handlers::memfd::MemfdFile;
use liveupdate::luod::LuodClient;
use liveupdate::transport::{exec, transfer};
use liveupdate::{HandlerRegistry, Incoming, IncomingSession, LiveUpdate, LuError, Session, Token};
use rustix::fs::{MemfdFlags, SealFlags, SeekFrom};

const PAGE: u64 = 4096;
const HUGE_PAGE: u64 = 2 << 20;
const SMALL_SIZE: u64 = 32 << 20;
const HUGE_SIZE: u64 = 32 << 20;
const STATE_SIZE: u64 = 64 << 10;
const STATE_POSITION: u64 = 12345;
const SMALL_TOKEN: Token = Token(0);
const HUGE_TOKEN: Token = Token(1);
const STATE_TOKEN: Token = Token(2);
/// Bytes the transfer test's old process writes at the state position
/// after the offer (what a VMM writes at the switch).
const LATE_STATE: &[u8] = b"vcpu state written after the offer";
/// The pages the transfer test's old process rewrites after the offer (the
/// guest keeps running and writing memory it already has).
const REWRITTEN_PAGES: [u64; 3] = [0, 1, 4097];
/// A hole (10 % 7 == 3) that the transfer test's old process fills between
/// offer and switch.
const LATE_PAGE: u64 = 10;
/// A hole that stays a hole: faulted in after finish or after an abort.
const HOLE_PAGE: u64 = 17;
/// A populated page the transfer test's old process frees between offer and
/// switch when asked (`--punch-after-offer`).
const PUNCHED_PAGE: u64 = 5;

/// Plays one side of a live-update test.
#[derive(Debug, Parser)]
struct Arguments {
    #[command(subcommand)]
    role: Role,
}

#[derive(Debug, clap::Args)]
struct Guest {
    /// Seed of the memory pattern.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Include the hugetlb memfd (the caller reserved 16 huge pages).
    #[arg(long)]
    huge: bool,
    /// Session name.
    #[arg(long, default_value = "vm0")]
    session: String,
}

#[derive(Debug, Subcommand)]
enum Role {
    /// Old VMM: preserve, then exec `exec-new` in place.
    ExecOld {
        #[command(flatten)]
        guest: Guest,
    },
    /// New image after exec: check the fds, retrieve, verify.
    ExecNew {
        #[command(flatten)]
        guest: Guest,
        /// Fds inherited from the test harness (not ours), comma-separated.
        #[arg(long, default_value = "")]
        inherited: String,
    },
    /// Old VMM of a transfer: listen, offer, switch when stdin says so.
    TransferOld {
        #[command(flatten)]
        guest: Guest,
        /// Socket path.
        #[arg(long)]
        socket: PathBuf,
        /// Test knob: also free a page the offer listed, between offer and
        /// switch, so that a successor's object built ahead from the offer
        /// no longer matches the file.
        #[arg(long)]
        punch_after_offer: bool,
    },
    /// Successor of a transfer.
    TransferNew {
        #[command(flatten)]
        guest: Guest,
        /// Socket path.
        #[arg(long)]
        socket: PathBuf,
        /// Exit right after accepting the offer.
        #[arg(long)]
        die_before_switch: bool,
        /// Rebuild the small guest memory file object from the offer, as a
        /// VMM building its VM ahead does; the retrieve at the switch then
        /// brings it up to date with the final record (or fails).
        #[arg(long)]
        build_ahead: bool,
    },
    /// Old VMM handing its session to luod.
    LuodDeposit {
        #[command(flatten)]
        guest: Guest,
        /// luod's socket.
        #[arg(long)]
        socket: PathBuf,
        /// Stay alive after depositing (to be killed).
        #[arg(long)]
        linger: bool,
    },
    /// Successor retrieving from luod.
    LuodRetrieve {
        #[command(flatten)]
        guest: Guest,
        /// luod's socket.
        #[arg(long)]
        socket: PathBuf,
    },
    /// One luod request; prints `OK ...` or `ERRNO <n> <message>`.
    LuodRequest {
        /// luod's socket.
        #[arg(long)]
        socket: PathBuf,
        /// list, retrieve, show, drop or finish.
        #[arg(long)]
        operation: String,
        /// Session name.
        #[arg(long, default_value = "vm0")]
        session: String,
    },
}

fn main() -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    match Arguments::parse().role {
        Role::ExecOld { guest } => exec_old(&guest),
        Role::ExecNew { guest, inherited } => exec_new(&guest, &inherited),
        Role::TransferOld {
            guest,
            socket,
            punch_after_offer,
        } => transfer_old(&guest, &socket, punch_after_offer),
        Role::TransferNew {
            guest,
            socket,
            die_before_switch,
            build_ahead,
        } => transfer_new(&guest, &socket, die_before_switch, build_ahead),
        Role::LuodDeposit {
            guest,
            socket,
            linger,
        } => luod_deposit(&guest, &socket, linger),
        Role::LuodRetrieve { guest, socket } => luod_retrieve(&guest, &socket),
        Role::LuodRequest {
            socket,
            operation,
            session,
        } => luod_request(&socket, &operation, &session),
    }
}

fn say(line: &str) {
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "{line}");
    let _ = stdout.flush();
}

// ---- the memory pattern ----

fn mix(mut value: u64) -> u64 {
    // splitmix64: every 8-byte word of every file gets its own value.
    value = value.wrapping_add(0x9e37_79b9_7f4a_7c15);
    value = (value ^ (value >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    value = (value ^ (value >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    value ^ (value >> 31)
}

fn pattern_page(seed: u64, file: u64, page: u64, generation: u64) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(PAGE as usize);
    for word in 0..PAGE / 8 {
        let key = seed ^ (file << 56) ^ (generation << 48) ^ (page * (PAGE / 8) + word);
        bytes.extend_from_slice(&mix(key).to_le_bytes());
    }
    bytes
}

fn small_populated(page: u64) -> bool {
    page % 7 != 3
}

fn huge_populated(huge_page: u64) -> bool {
    huge_page % 3 != 1
}

/// Generation of a page's pattern: the transfer test rewrites some pages
/// after the offer, with generation 1.
fn small_generation(page: u64, rewritten: bool) -> u64 {
    u64::from(rewritten && REWRITTEN_PAGES.contains(&page))
}

struct GuestFiles {
    small: Arc<GuestMemFile>,
    huge: Option<Arc<GuestMemFile>>,
    state: OwnedFd,
}

/// The NUMA policy the small guest file carries over its first 2 MiB.
fn small_policy() -> (std::ops::Range<PageIndex>, MemPolicy) {
    (PageIndex(0)..PageIndex(512), MemPolicy::Bind(NodeMask(1)))
}

fn create_guest(guest: &Guest) -> anyhow::Result<GuestFiles> {
    let small = GuestMemFile::create(SMALL_SIZE, GmemFlags::HOST_ACCESSIBLE, Backend::Memfd)?;
    let (range, policy) = small_policy();
    small.set_policy(range, policy)?;
    let mapping = small.mapping()?;
    for page in (0..SMALL_SIZE / PAGE).filter(|page| small_populated(*page)) {
        mapping.write(page * PAGE, &pattern_page(guest.seed, 0, page, 0))?;
    }
    let huge = if guest.huge {
        let huge = GuestMemFile::create(HUGE_SIZE, GmemFlags::HOST_ACCESSIBLE, Backend::Hugetlb)
            .context("hugetlb guest memory")?;
        let mapping = huge.mapping()?;
        for huge_page in (0..HUGE_SIZE / HUGE_PAGE).filter(|page| huge_populated(*page)) {
            for page in 0..HUGE_PAGE / PAGE {
                let offset = huge_page * HUGE_PAGE + page * PAGE;
                mapping.write(offset, &pattern_page(guest.seed, 1, offset / PAGE, 0))?;
            }
        }
        Some(huge)
    } else {
        eprintln!("SKIPPED: hugetlb part of the guest (no --huge: huge pages not reserved)");
        None
    };
    let state =
        rustix::fs::memfd_create("vmm-state", MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)?;
    for page in 0..STATE_SIZE / PAGE {
        rustix::io::pwrite(&state, &pattern_page(guest.seed, 2, page, 0), page * PAGE)?;
    }
    rustix::fs::seek(&state, SeekFrom::Start(STATE_POSITION))?;
    rustix::fs::fcntl_add_seals(&state, SealFlags::GROW | SealFlags::SHRINK)?;
    Ok(GuestFiles { small, huge, state })
}

fn preserve_guest(guest: &Guest, files: &GuestFiles) -> anyhow::Result<(LiveUpdate, Session)> {
    let live_update = LiveUpdate::new(HandlerRegistry::with_builtin_handlers());
    let session = live_update.create_session(&guest.session)?;
    session.preserve(SMALL_TOKEN, files.small.as_fd())?;
    ensure!(
        files.small.is_frozen(),
        "preserve did not freeze the guest memory"
    );
    if let Some(huge) = &files.huge {
        session.preserve(HUGE_TOKEN, huge.as_fd())?;
    }
    session.preserve(STATE_TOKEN, &files.state)?;
    Ok((live_update, session))
}

// ---- verification ----

fn data_extents(fd: BorrowedFd<'_>, size: u64) -> anyhow::Result<Vec<(u64, u64)>> {
    let mut extents = Vec::new();
    let mut offset = 0;
    while offset < size {
        let start = match rustix::fs::seek(fd, SeekFrom::Data(offset)) {
            Ok(start) => start,
            Err(rustix::io::Errno::NXIO) => break,
            Err(errno) => return Err(errno.into()),
        };
        let end = rustix::fs::seek(fd, SeekFrom::Hole(start))?;
        extents.push((start / PAGE, end / PAGE));
        offset = end;
    }
    Ok(extents)
}

/// The small file's populated pages: the pattern's, plus the page the
/// transfer test's old process adds between offer and switch.
fn small_expected(page: u64, late: bool) -> bool {
    small_populated(page) || (late && page == LATE_PAGE)
}

fn expected_extents(pages: u64, late: bool) -> Vec<(u64, u64)> {
    let mut extents: Vec<(u64, u64)> = Vec::new();
    for page in (0..pages).filter(|page| small_expected(*page, late)) {
        match extents.last_mut() {
            Some(last) if last.1 == page => last.1 = page + 1,
            _ => extents.push((page, page + 1)),
        }
    }
    extents
}

fn small_page_expected(guest: &Guest, page: u64, late: bool) -> Vec<u8> {
    if late && page == LATE_PAGE {
        pattern_page(guest.seed, 0, page, 2)
    } else {
        pattern_page(guest.seed, 0, page, small_generation(page, late))
    }
}

fn verify_gmem_common(file: &GuestMemFile, size: u64, backend: Backend) -> anyhow::Result<()> {
    ensure!(file.size() == size, "size {} != {size}", file.size());
    ensure!(
        file.backend() == backend,
        "backend {} != {backend}",
        file.backend()
    );
    ensure!(
        file.flags() == GmemFlags::HOST_ACCESSIBLE,
        "flags {:?}",
        file.flags()
    );
    ensure!(
        file.is_frozen(),
        "a retrieved file must stay frozen until finish"
    );
    Ok(())
}

fn verify_small(guest: &Guest, file: &GuestMemFile, late: bool) -> anyhow::Result<String> {
    verify_gmem_common(file, SMALL_SIZE, Backend::Memfd)?;
    let expected: Vec<(PageIndex, FolioOrder)> = (0..SMALL_SIZE / PAGE)
        .filter(|page| small_expected(*page, late))
        .map(|page| (PageIndex(page), FolioOrder::BASE))
        .collect();
    let populated: Vec<(PageIndex, FolioOrder)> = file.populated().collect();
    ensure!(
        populated == expected,
        "populated folios differ from the old process's"
    );
    // The kernel object agrees: its data extents are the same pages.
    let extents = data_extents(file.as_fd(), SMALL_SIZE)?;
    ensure!(
        extents == expected_extents(SMALL_SIZE / PAGE, late),
        "kernel extents {extents:?}"
    );
    let (range, policy) = small_policy();
    ensure!(
        file.descriptor().policies == vec![(range, policy)],
        "policies {:?}",
        file.descriptor().policies
    );
    ensure!(
        file.policy_at(PageIndex(3))? == policy,
        "the kernel has another policy"
    );
    let mapping = file.mapping()?;
    let zero = vec![0u8; PAGE as usize];
    let mut page_bytes = vec![0u8; PAGE as usize];
    for page in 0..SMALL_SIZE / PAGE {
        mapping.read(page * PAGE, &mut page_bytes)?;
        if small_expected(page, late) {
            ensure!(
                page_bytes == small_page_expected(guest, page, late),
                "small page {page} differs"
            );
        } else {
            ensure!(page_bytes == zero, "small hole {page} is not zero");
        }
    }
    Ok(format!("small={}pages", expected.len()))
}

fn verify_huge(guest: &Guest, file: &GuestMemFile) -> anyhow::Result<String> {
    verify_gmem_common(file, HUGE_SIZE, Backend::Hugetlb)?;
    let expected: Vec<(PageIndex, FolioOrder)> = (0..HUGE_SIZE / HUGE_PAGE)
        .filter(|page| huge_populated(*page))
        .map(|page| (PageIndex(page * 512), FolioOrder::HUGE_2M))
        .collect();
    let populated: Vec<(PageIndex, FolioOrder)> = file.populated().collect();
    ensure!(populated == expected, "populated huge folios {populated:?}");
    let blocks = rustix::fs::fstat(file.as_fd())?.st_blocks as u64 * 512;
    ensure!(
        blocks == expected.len() as u64 * HUGE_PAGE,
        "hugetlbfs holds {blocks} bytes, expected {} huge pages",
        expected.len()
    );
    let mapping = file.mapping()?;
    let zero = vec![0u8; PAGE as usize];
    let mut bytes = vec![0u8; PAGE as usize];
    for page in 0..HUGE_SIZE / PAGE {
        mapping.read(page * PAGE, &mut bytes)?;
        if huge_populated(page * PAGE / HUGE_PAGE) {
            ensure!(
                bytes == pattern_page(guest.seed, 1, page, 0),
                "huge memory differs at page {page}"
            );
        } else {
            ensure!(bytes == zero, "huge hole at page {page} is not zero");
        }
    }
    Ok(format!("huge={}x2MiB", expected.len()))
}

fn verify_state(guest: &Guest, file: &MemfdFile, late: bool) -> anyhow::Result<String> {
    ensure!(file.size() == STATE_SIZE, "state size {}", file.size());
    let seals = (libc::F_SEAL_GROW | libc::F_SEAL_SHRINK) as u32;
    ensure!(
        file.seals() == seals,
        "state seals {:#x} != {seals:#x}",
        file.seals()
    );
    let position = if late {
        STATE_POSITION + LATE_STATE.len() as u64
    } else {
        STATE_POSITION
    };
    ensure!(
        file.position() == position,
        "state position {} != {position}",
        file.position()
    );
    ensure!(
        rustix::fs::tell(file.as_fd())? == position,
        "the fd's position was not restored"
    );
    let mut expected = Vec::new();
    for page in 0..STATE_SIZE / PAGE {
        expected.extend(pattern_page(guest.seed, 2, page, 0));
    }
    if late {
        let start = STATE_POSITION as usize;
        expected[start..start + LATE_STATE.len()].copy_from_slice(LATE_STATE);
    }
    let mut contents = vec![0u8; STATE_SIZE as usize];
    read_exact_at(file.as_fd(), &mut contents, 0)?;
    ensure!(contents == expected, "state contents differ");
    Ok(format!("state@{position}"))
}

fn read_exact_at(fd: BorrowedFd<'_>, buffer: &mut [u8], offset: u64) -> anyhow::Result<()> {
    let mut done = 0;
    while done < buffer.len() {
        let count = rustix::io::pread(fd, &mut buffer[done..], offset + done as u64)?;
        ensure!(count > 0, "short read at {offset}");
        done += count;
    }
    Ok(())
}

fn take<T: liveupdate::RetrievedObject>(
    session: &mut IncomingSession,
    token: Token,
) -> anyhow::Result<Arc<T>> {
    session
        .retrieve(token)?
        .downcast::<T>()
        .context("another kind of file")
}

fn verify_session(
    guest: &Guest,
    mut session: IncomingSession,
    late: bool,
) -> anyhow::Result<String> {
    let mut expected_tokens = vec![SMALL_TOKEN, STATE_TOKEN];
    if guest.huge {
        expected_tokens.insert(1, HUGE_TOKEN);
    }
    ensure!(
        session.tokens() == expected_tokens,
        "tokens {:?}",
        session.tokens()
    );
    let small = take::<GuestMemFile>(&mut session, SMALL_TOKEN)?;
    let mut report = vec![verify_small(guest, &small, late)?];
    let huge = if guest.huge {
        let huge = take::<GuestMemFile>(&mut session, HUGE_TOKEN)?;
        report.push(verify_huge(guest, &huge)?);
        Some(huge)
    } else {
        None
    };
    report.push(verify_state(
        guest,
        &*take::<MemfdFile>(&mut session, STATE_TOKEN)?,
        late,
    )?);
    session.finish()?;
    // Finish unfroze the guest memory: the successor's guest can fault in
    // new pages.
    ensure!(!small.is_frozen(), "finish did not unfreeze");
    small.fallocate(FallocMode::ALLOCATE, (HOLE_PAGE * PAGE) as i64, PAGE as i64)?;
    if let Some(huge) = huge {
        ensure!(
            !huge.is_frozen(),
            "finish did not unfreeze the hugetlb file"
        );
    }
    report.push("unfrozen-at-finish".to_owned());
    Ok(report.join(" "))
}

fn verify_incoming(guest: &Guest, mut incoming: Incoming, late: bool) -> anyhow::Result<String> {
    let names = incoming.session_names();
    ensure!(
        names.len() == 1 && names[0].as_str() == guest.session,
        "sessions {names:?}"
    );
    let session = incoming.retrieve_session(&guest.session)?;
    verify_session(guest, session, late)
}

// ---- exec ----

fn open_fds() -> anyhow::Result<Vec<RawFd>> {
    let listed: Vec<RawFd> = std::fs::read_dir("/proc/self/fd")?
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    // The directory's own fd is listed and closed by now: keep only the
    // fds still open.
    Ok(listed
        .into_iter()
        // SAFETY: F_GETFD only reads the fd table; a closed number fails.
        .filter(|fd| unsafe { libc::fcntl(*fd, libc::F_GETFD) } >= 0)
        .collect())
}

fn exec_old(guest: &Guest) -> anyhow::Result<()> {
    let inherited: Vec<String> = open_fds()?
        .into_iter()
        .filter(|fd| *fd > 2)
        // SAFETY: F_GETFD only reads the fd table.
        .filter(|fd| unsafe { libc::fcntl(*fd, libc::F_GETFD) } & libc::FD_CLOEXEC == 0)
        .map(|fd| fd.to_string())
        .collect();
    let files = create_guest(guest)?;
    let (live_update, _session) = preserve_guest(guest, &files)?;
    // Our own fds: close them so that only the orchestrator's duplicates
    // remain, and prove the preserved files live on without them.
    drop(files);
    let program = std::env::current_exe()?;
    let seed = guest.seed.to_string();
    let inherited = inherited.join(",");
    let mut arguments = vec![
        "exec-new",
        "--seed",
        &seed,
        "--session",
        &guest.session,
        "--inherited",
        &inherited,
    ];
    if guest.huge {
        arguments.push("--huge");
    }
    let arguments: Vec<&std::ffi::OsStr> = arguments.iter().map(std::ffi::OsStr::new).collect();
    let error = exec::exec_in_place(&live_update, &program, &arguments);
    bail!("exec failed: {error}")
}

fn exec_new(guest: &Guest, inherited: &str) -> anyhow::Result<()> {
    let mut expected: Vec<RawFd> = vec![0, 1, 2];
    expected.extend(
        inherited
            .split(',')
            .filter_map(|fd| fd.parse::<RawFd>().ok()),
    );
    let record: RawFd = std::env::var(exec::RECORD_FD_VARIABLE)?.parse()?;
    expected.push(record);
    let listed = std::env::var(exec::FDS_VARIABLE)?;
    let preserved: Vec<RawFd> = listed
        .split(',')
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    expected.extend(&preserved);
    expected.sort_unstable();
    let open = open_fds()?;
    ensure!(
        open == expected,
        "open fds after exec {open:?}, expected {expected:?}"
    );
    let incoming = exec::incoming_from_environment(&HandlerRegistry::with_builtin_handlers())?
        .context("no sessions in the environment")?;
    // The record memfd is closed and the preserved fds are close-on-exec.
    ensure!(
        !open_fds()?.contains(&record),
        "the record memfd is still open"
    );
    for fd in &preserved {
        // SAFETY: F_GETFD only reads the fd table.
        let flags = unsafe { libc::fcntl(*fd, libc::F_GETFD) };
        ensure!(
            flags & libc::FD_CLOEXEC != 0,
            "fd {fd} is not close-on-exec again"
        );
    }
    let report = verify_incoming(guest, incoming, false)?;
    say(&format!("VERIFIED exec fds={} {report}", preserved.len()));
    Ok(())
}

// ---- transfer ----

fn transfer_old(guest: &Guest, socket: &Path, punch_after_offer: bool) -> anyhow::Result<()> {
    let files = create_guest(guest)?;
    let (live_update, session) = preserve_guest(guest, &files)?;
    let listener = transfer::TransferListener::bind(socket)?;
    say("LISTENING");
    let mut link = listener.accept()?;
    link.offer(&live_update)?;
    say("OFFERED");
    // The guest keeps running: it rewrites memory it already has (allowed
    // while frozen), and the VMM, at the switch, unfreezes, serves a parked
    // fault on a missing page, and freezes again (the explicit step of the
    // DESIGN): the switch's delta must carry the new folio. The VMM also
    // writes its state, which moves the state memfd's position.
    {
        let mapping = files.small.mapping()?;
        for page in REWRITTEN_PAGES {
            mapping.write(page * PAGE, &pattern_page(guest.seed, 0, page, 1))?;
        }
        ensure!(
            mapping.write(LATE_PAGE * PAGE, b"x").is_err(),
            "a new page was allocated behind the freeze"
        );
        files.small.freeze(false);
        mapping.write(LATE_PAGE * PAGE, &pattern_page(guest.seed, 0, LATE_PAGE, 2))?;
        if punch_after_offer {
            files
                .small
                .fallocate(FallocMode::PUNCH, (PUNCHED_PAGE * PAGE) as i64, PAGE as i64)?;
        }
        files.small.freeze(true);
    }
    let written = rustix::io::write(&files.state, LATE_STATE)?;
    ensure!(written == LATE_STATE.len(), "short state write");
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    ensure!(line.trim() == "switch", "unexpected control line {line:?}");
    match link.switch(&live_update, b"vcpu registers at the switch") {
        Ok(()) => {
            say("SWITCHED");
            Ok(())
        }
        Err(error) => {
            say(&format!("SWITCH-FAILED errno={} {error}", error.errno()));
            carry_on(guest, live_update, session, &files)
        }
    }
}

/// After a failed switch: the old process keeps its guest. Its memory is
/// readable and writable, and once the session is closed its size can change
/// again and new pages can be allocated.
fn carry_on(
    guest: &Guest,
    live_update: LiveUpdate,
    session: Session,
    files: &GuestFiles,
) -> anyhow::Result<()> {
    ensure!(!live_update.is_handed_over(), "the handover completed");
    ensure!(files.small.is_frozen(), "still preserved: still frozen");
    // The VMM gives up on this update: closing the session unpreserves and
    // unfreezes.
    session.close();
    drop(live_update);
    ensure!(
        !files.small.is_frozen(),
        "closing the session did not unfreeze"
    );
    let mapping = files.small.mapping()?;
    // A first touch of a hole allocates it again, and fallocate works.
    mapping.write(HOLE_PAGE * PAGE, b"new page after the abort")?;
    let mut back = [0u8; 24];
    mapping.read(HOLE_PAGE * PAGE, &mut back)?;
    ensure!(&back == b"new page after the abort");
    files
        .small
        .fallocate(FallocMode::ALLOCATE, (24 * PAGE) as i64, PAGE as i64)?;
    let mut first = vec![0u8; PAGE as usize];
    mapping.read(0, &mut first)?;
    ensure!(first == pattern_page(guest.seed, 0, 0, 1), "memory changed");
    // The state memfd is no longer preserved (its own seals still fix its
    // size) and its contents are the VMM's again.
    ensure!(
        !liveupdate::preserved::is_preserved(liveupdate::FileIdentity::of(&files.state)?),
        "the state memfd is still preserved"
    );
    rustix::io::pwrite(&files.state, b"carrying on", 0)?;
    say("CARRIED-ON");
    Ok(())
}

fn connect_with_retry<T>(
    socket: &Path,
    connect: impl Fn(&Path) -> Result<T, LuError>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match connect(socket) {
            Ok(connected) => return Ok(connected),
            Err(error) if Instant::now() < deadline => {
                tracing::debug!(%error, "not listening yet");
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(error) => return Err(error.into()),
        }
    }
}

/// Rebuilds the small guest memory file object from the offer (frozen, as
/// preserved), as a VMM that builds its VM ahead of the switch does.
fn restore_small_from_offer(offer: &transfer::Offer) -> anyhow::Result<Arc<GuestMemFile>> {
    let (position, file) = offer
        .record
        .files()
        .enumerate()
        .find(|(_, (_, file))| file.token == SMALL_TOKEN)
        .map(|(position, (_, file))| (position, file))
        .context("the offer holds no small guest memory file")?;
    let data = GmemData::decode(&file.data)?;
    let descriptor = gmem_handler::descriptor_of(&data)?;
    let fd = offer.fds[position].try_clone()?;
    Ok(GuestMemFile::restore_runs(
        fd,
        &descriptor,
        gmem_handler::runs_of(&data),
    )?)
}

fn transfer_new(
    guest: &Guest,
    socket: &Path,
    die_before_switch: bool,
    build_ahead: bool,
) -> anyhow::Result<()> {
    let mut successor = connect_with_retry(socket, transfer::TransferSuccessor::connect)?;
    let offer = successor.receive_offer()?;
    // Build ahead while the guest runs: map the guest memory and look at it.
    ensure!(offer.record.file_count() == offer.fds.len());
    let mut page = vec![0u8; PAGE as usize];
    read_exact_at(offer.fds[0].as_fd(), &mut page, 2 * PAGE)?;
    ensure!(
        page == pattern_page(guest.seed, 0, 2, 0),
        "offered memory differs"
    );
    let ahead = if build_ahead {
        let ahead = restore_small_from_offer(offer)?;
        ensure!(
            !ahead.is_present(PageIndex(LATE_PAGE)),
            "the offer predates the late page"
        );
        Some(ahead)
    } else {
        None
    };
    say("READY");
    if die_before_switch {
        // Dies without a word, as a crash would.
        std::process::exit(17);
    }
    let switched = match successor.wait_for_switch(&HandlerRegistry::with_builtin_handlers()) {
        Ok(switched) => switched,
        Err(error) => {
            // The old process went away or gave up before committing: the
            // successor must not run the guest.
            say(&format!("NO-SWITCH errno={} {error}", error.errno()));
            return Ok(());
        }
    };
    ensure!(
        switched.payload == b"vcpu registers at the switch",
        "payload differs"
    );
    if let Some(ahead) = &ahead {
        // The retrieve before SWITCHED recorded the late page in the object
        // built ahead (it is this process's only object for the file).
        ensure!(
            ahead.is_present(PageIndex(LATE_PAGE)),
            "the object built ahead was not brought up to date"
        );
    }
    let report = verify_incoming(guest, switched.incoming, true)?;
    say(&format!("VERIFIED transfer {report}"));
    Ok(())
}

// ---- luod ----

fn luod_deposit(guest: &Guest, socket: &Path, linger: bool) -> anyhow::Result<()> {
    let files = create_guest(guest)?;
    let (live_update, _session) = preserve_guest(guest, &files)?;
    let client = connect_with_retry(socket, LuodClient::connect)?;
    client.hand_over(&live_update)?;
    ensure!(live_update.is_handed_over());
    say("DEPOSITED");
    if linger {
        loop {
            std::thread::sleep(Duration::from_secs(60));
        }
    }
    Ok(())
}

fn luod_retrieve(guest: &Guest, socket: &Path) -> anyhow::Result<()> {
    let client = connect_with_retry(socket, LuodClient::connect)?;
    let incoming = client.retrieve(&guest.session, &HandlerRegistry::with_builtin_handlers())?;
    let report = verify_incoming(guest, incoming, false)?;
    client.finish(&guest.session)?;
    say(&format!("VERIFIED luod {report}"));
    Ok(())
}

fn luod_request(socket: &Path, operation: &str, session: &str) -> anyhow::Result<()> {
    let client = connect_with_retry(socket, LuodClient::connect)?;
    let registry = HandlerRegistry::with_builtin_handlers();
    let result = match operation {
        "list" => client.list().map(|sessions| {
            let names: Vec<String> = sessions.iter().map(|s| s.name.to_string()).collect();
            format!("OK {}", names.join(","))
        }),
        "retrieve" => client
            .retrieve(session, &registry)
            .map(|incoming| format!("OK {} sessions", incoming.session_names().len())),
        "show" => client
            .show(session)
            .map(|record| format!("OK {} files", record.file_count())),
        "drop" => client.drop_session(session).map(|()| "OK".to_owned()),
        "finish" => client.finish(session).map(|()| "OK".to_owned()),
        other => bail!("unknown operation {other}"),
    };
    match result {
        Ok(line) => say(&line),
        Err(error) => say(&format!("ERRNO {} {error}", error.errno())),
    }
    Ok(())
}
