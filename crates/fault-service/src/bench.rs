//! The cost of a first touch of a page through the fault service, next to a
//! plain first touch of a memfd mapping and to `fallocate` of the page: the
//! one implementation behind the criterion benchmark
//! (`benches/first_touch.rs`), the table example (`examples/fault_table.rs`)
//! and `gmemctl bench`. Built only with the `bench` feature.
//!
//! Model: [`first_touch`] creates a fresh memfd-backed guest memory file and
//! a plain memfd of [`PAGES`] pages each, then times `iterations` first
//! touches of one kind, page after page in order; when every page has been
//! touched, both files are punched empty outside the timing (a punch also
//! unmaps the pages, so the next touch is a first touch again). Nothing is
//! random, so there is no seed.
//!
//! Two service rows, because a first touch through the service is two
//! thread wake-ups (toucher to handler, handler to toucher), and what a
//! wake-up costs depends on where the threads run. With the handler on
//! another CPU, a wake-up of an idle CPU is an IPI that, on a nested KVM,
//! costs tens of microseconds (the project machine: 25 to 30 µs each way
//! when the other CPU is idle, about 2 µs when it is busy), which then
//! dominates the figure. [`FirstTouch::ThroughServiceOnOneCpu`] pins the
//! toucher and the handler to one CPU, so each wake-up is a context switch
//! on that CPU: that is the mechanism's own cost, and what a busy host with
//! no idle CPUs pays.
//!
//! The fifth row, [`FirstTouch::InThreadFloor`], is not a way to run the
//! service but the floor under any userfaultfd design: the mapping is
//! registered on a SIGBUS-mode userfaultfd, so a first touch raises SIGBUS
//! in the toucher itself, whose handler calls `get_folio` and maps the page
//! (MADV_POPULATE_WRITE) before the access retries. No thread waits, none is
//! woken, nothing is read from the userfaultfd: what is left is the fault,
//! the signal's delivery and return, and the allocation. It is measured
//! only so the service's rows can be read against what userfaultfd can
//! possibly cost here (vCPU faults cannot take this route, see
//! `Userfaultfd::open_sigbus`). [`FirstTouch::InThreadZeropage`] goes one
//! step further and bypasses `get_folio`, which no service may do: one
//! UFFDIO_ZEROPAGE allocates and maps the page, so its row is the kernel's
//! own lower bound for a first touch served through userfaultfd.

use std::os::fd::OwnedFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use gmem::{Backend, FallocMode, GmemError, GmemFlags, GuestMemFile, PageIndex};
use rustix::fs::FallocateFlags;
use rustix::io::Errno;

use crate::uffd::Userfaultfd;
use crate::{FaultService, FaultServiceError};

/// Pages per file: 64 MiB.
pub const PAGES: u64 = 16_384;
const PAGE: u64 = 4096;

/// Why a measurement could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The guest memory file could not be made, mapped or punched.
    #[error(transparent)]
    Gmem(#[from] GmemError),
    /// The fault service could not start or stop (EPERM without the
    /// privilege userfaultfd needs).
    #[error(transparent)]
    Service(#[from] FaultServiceError),
    /// A system call on the plain memfd baseline failed.
    #[error("benchmark baseline: {operation} failed: {errno}")]
    Kernel {
        /// The call and what it was for.
        operation: &'static str,
        /// The kernel's error.
        errno: Errno,
    },
    /// The in-thread floor could not be set up (EPERM without the
    /// userfaultfd privilege, EOPNOTSUPP without UFFD_FEATURE_SIGBUS).
    #[error("in-thread floor: {operation} failed: {errno}")]
    InThread {
        /// The call and what it was for.
        operation: &'static str,
        /// The kernel's error.
        errno: Errno,
    },
    /// After a batch of first touches the gmem file did not hold exactly the
    /// touched pages, in the kernel or (for the kinds that allocate through
    /// `get_folio`) in its page-state index.
    #[error("{touched} pages touched, but the file holds {in_kernel} and records {recorded}")]
    Unrecorded {
        /// Pages touched in the batch.
        touched: u64,
        /// Pages the kernel object holds (fstat's block count).
        in_kernel: u64,
        /// Folios the file's page-state index holds.
        recorded: u64,
    },
}

fn kernel(operation: &'static str) -> impl FnOnce(Errno) -> BenchError {
    move |errno| BenchError::Kernel { operation, errno }
}

/// How a page gets its first touch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FirstTouch {
    /// A store to a page of a gmem file whose mapping the service handles,
    /// the handler thread placed by the scheduler.
    ThroughService,
    /// The same with the toucher and the service's handler thread pinned to
    /// the CPU the toucher was on (no cross-CPU wake-up).
    ThroughServiceOnOneCpu,
    /// A store to a page of a plain memfd mapping (the kernel's shmem fault).
    Plain,
    /// `fallocate(KEEP_SIZE)` of the page on a plain memfd, no touch.
    Fallocate,
    /// A store to a page of a gmem file registered on a SIGBUS-mode
    /// userfaultfd: the toucher serves its own fault in a signal handler
    /// (`get_folio`, then MADV_POPULATE_WRITE). The floor of userfaultfd,
    /// not a service mode; see the module documentation.
    InThreadFloor,
    /// As [`FirstTouch::InThreadFloor`], but the handler allocates and maps
    /// the page with one UFFDIO_ZEROPAGE, bypassing `get_folio` (nothing
    /// recorded, no freeze): the kernel's lower bound, never a service.
    InThreadZeropage,
}

impl FirstTouch {
    /// Whether the kind touches the gmem file (and must leave exactly the
    /// touched pages recorded in it).
    fn touches_gmem_file(self) -> bool {
        match self {
            FirstTouch::ThroughService
            | FirstTouch::ThroughServiceOnOneCpu
            | FirstTouch::InThreadFloor
            | FirstTouch::InThreadZeropage => true,
            FirstTouch::Plain | FirstTouch::Fallocate => false,
        }
    }

    /// Whether every first touch goes through `get_folio` (and so must be
    /// recorded in the file's page-state index).
    fn allocates_through_get_folio(self) -> bool {
        self.touches_gmem_file() && self != FirstTouch::InThreadZeropage
    }
}

/// A plain memfd of [`PAGES`] pages and its shared mapping, unmapped on drop.
struct PlainMemfd {
    fd: OwnedFd,
    base: NonNull<u8>,
}

impl PlainMemfd {
    fn new() -> Result<PlainMemfd, BenchError> {
        let fd = rustix::fs::memfd_create("plain", rustix::fs::MemfdFlags::CLOEXEC)
            .map_err(kernel("memfd_create"))?;
        rustix::fs::ftruncate(&fd, PAGES * PAGE).map_err(kernel("ftruncate"))?;
        // SAFETY: a fresh shared mapping of the whole memfd at an address the
        // kernel picks; it is unmapped only in `drop`.
        let address = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                (PAGES * PAGE) as usize,
                rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                rustix::mm::MapFlags::SHARED,
                &fd,
                0,
            )
        }
        .map_err(kernel("mmap"))?;
        let base = NonNull::new(address.cast()).ok_or(BenchError::Kernel {
            operation: "mmap",
            errno: Errno::FAULT,
        })?;
        Ok(PlainMemfd { fd, base })
    }
}

impl Drop for PlainMemfd {
    fn drop(&mut self) {
        // SAFETY: unmaps the mapping made in `new`; no reference into it
        // outlives `self` (stores go through raw pointers only).
        let _ = unsafe { rustix::mm::munmap(self.base.as_ptr().cast(), (PAGES * PAGE) as usize) };
    }
}

/// The calling thread pinned to the CPU it runs on; the former affinity
/// comes back on drop.
struct PinnedToThisCpu {
    former: rustix::thread::CpuSet,
}

impl PinnedToThisCpu {
    fn new() -> Result<PinnedToThisCpu, BenchError> {
        let former =
            rustix::thread::sched_getaffinity(None).map_err(kernel("sched_getaffinity"))?;
        let mut only = rustix::thread::CpuSet::new();
        only.set(rustix::thread::sched_getcpu());
        rustix::thread::sched_setaffinity(None, &only).map_err(kernel("sched_setaffinity"))?;
        Ok(PinnedToThisCpu { former })
    }
}

impl Drop for PinnedToThisCpu {
    fn drop(&mut self) {
        // The former set held this thread a moment ago, so it is valid.
        let _ = rustix::thread::sched_setaffinity(None, &self.former);
    }
}

/// What the in-thread floor's SIGBUS handler serves: one gmem file's
/// mapping. Published in [`IN_THREAD_TARGET`] while a run is on.
struct InThreadTarget {
    file: Arc<GuestMemFile>,
    base: usize,
    len: usize,
    /// The SIGBUS-mode userfaultfd the mapping is registered on; freeing
    /// the target closes it, which unregisters the mapping.
    userfaultfd: Userfaultfd,
    /// Allocate with UFFDIO_ZEROPAGE instead of `get_folio`.
    zeropage: bool,
}

/// The target of [`serve_own_fault`]; null while no in-thread run is on.
static IN_THREAD_TARGET: AtomicPtr<InThreadTarget> = AtomicPtr::new(std::ptr::null_mut());

/// Handlers between their load of [`IN_THREAD_TARGET`] and their last use
/// of it, so that a run's teardown frees the target only after them.
static IN_THREAD_HANDLERS: AtomicUsize = AtomicUsize::new(0);

/// One in-thread run at a time per process (the handler is process-wide).
static IN_THREAD_RUN: Mutex<()> = Mutex::new(());

/// An in-thread floor run: the file's mapping registered on a SIGBUS-mode
/// userfaultfd and [`serve_own_fault`] installed for SIGBUS. Drop puts the
/// former SIGBUS action back, then unregisters the mapping.
struct InThreadFloor {
    former: libc::sigaction,
    target: *mut InThreadTarget,
    _serial: MutexGuard<'static, ()>,
}

impl InThreadFloor {
    fn start(
        file: &Arc<GuestMemFile>,
        base: *mut u8,
        zeropage: bool,
    ) -> Result<InThreadFloor, BenchError> {
        let serial = IN_THREAD_RUN
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let in_thread = |operation| move |errno| BenchError::InThread { operation, errno };
        let userfaultfd =
            Userfaultfd::open_sigbus().map_err(in_thread("open a SIGBUS-mode userfaultfd"))?;
        let len = PAGES * PAGE;
        userfaultfd
            .register(base as u64, len)
            .map_err(in_thread("register the file's mapping"))?;
        let target = Box::into_raw(Box::new(InThreadTarget {
            file: file.clone(),
            base: base as usize,
            len: len as usize,
            userfaultfd,
            zeropage,
        }));
        // SeqCst: pairs with the handler's SeqCst load (see `serve_own_fault`).
        IN_THREAD_TARGET.store(target, Ordering::SeqCst);
        // SAFETY: an all-zero sigaction is a valid value (empty mask, no
        // flags) that the fields below complete.
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = serve_own_fault as *const () as libc::sighandler_t;
        action.sa_flags = libc::SA_SIGINFO;
        // SAFETY: as above; sigaction overwrites it with the former action.
        let mut former: libc::sigaction = unsafe { std::mem::zeroed() };
        // SAFETY: both pointers are to live sigaction values; the handler
        // is an `extern "C"` function of the SA_SIGINFO signature.
        if unsafe { libc::sigaction(libc::SIGBUS, &action, &mut former) } != 0 {
            // SeqCst: as above. No handler is installed, so none holds it.
            IN_THREAD_TARGET.store(std::ptr::null_mut(), Ordering::SeqCst);
            // SAFETY: `target` came from Box::into_raw above, is unpublished
            // again and no handler ran with it; take it back.
            drop(unsafe { Box::from_raw(target) });
            return Err(BenchError::InThread {
                operation: "install the SIGBUS handler",
                errno: Errno::from_io_error(&std::io::Error::last_os_error())
                    .unwrap_or(Errno::INVAL),
            });
        }
        Ok(InThreadFloor {
            former,
            target,
            _serial: serial,
        })
    }
}

impl Drop for InThreadFloor {
    fn drop(&mut self) {
        // SAFETY: `former` is the action sigaction returned in `start`.
        unsafe { libc::sigaction(libc::SIGBUS, &self.former, std::ptr::null_mut()) };
        // SeqCst with the handler's SeqCst increment and load: a handler
        // that loaded the old pointer incremented first, so it is counted
        // below until it is done with the target.
        IN_THREAD_TARGET.store(std::ptr::null_mut(), Ordering::SeqCst);
        while IN_THREAD_HANDLERS.load(Ordering::SeqCst) != 0 {
            std::thread::yield_now();
        }
        // SAFETY: `target` came from Box::into_raw in `start`; the pointer
        // is unpublished and no handler still uses it (waited above). This
        // also closes the userfaultfd, after the former action is back.
        drop(unsafe { Box::from_raw(self.target) });
    }
}

/// The in-thread floor's SIGBUS handler: serves a fault in the target's
/// mapping through `get_folio` and maps the page, so the access succeeds
/// when it retries. Any other SIGBUS (another address, or an allocation
/// that fails) puts the default action back, so the retried access dies of
/// it as it would have without this handler.
///
/// Signal safety: `get_folio` may allocate (an SRCU reader slot on a
/// thread's first read section, an error message). That is safe here only
/// because the interrupted code is `first_touch`'s store loop, never inside
/// the allocator: which is why this is a benchmark, not a service mode.
extern "C" fn serve_own_fault(
    _signal: libc::c_int,
    info: *mut libc::siginfo_t,
    _context: *mut libc::c_void,
) {
    // SAFETY: installed with SA_SIGINFO, so the kernel passes a valid siginfo.
    let address = unsafe { (*info).si_addr() } as usize;
    // SeqCst: pairs with the teardown's SeqCst store and load (see Drop).
    IN_THREAD_HANDLERS.fetch_add(1, Ordering::SeqCst);
    let target = IN_THREAD_TARGET.load(Ordering::SeqCst);
    // SAFETY: a non-null target stays allocated until the teardown has seen
    // this handler's decrement below.
    let served = unsafe { target.as_ref() }.is_some_and(|target| serve(target, address));
    // Release: the handler's reads of the target happen before the
    // teardown's SeqCst load that sees this decrement.
    IN_THREAD_HANDLERS.fetch_sub(1, Ordering::Release);
    if !served {
        // SAFETY: signal(2) is async-signal-safe; SIG_DFL is a valid action.
        unsafe { libc::signal(libc::SIGBUS, libc::SIG_DFL) };
    }
}

fn serve(target: &InThreadTarget, address: usize) -> bool {
    let Some(offset) = address.checked_sub(target.base) else {
        return false;
    };
    if offset >= target.len {
        return false;
    }
    let page = offset as u64 / PAGE;
    let page_start = (target.base + (page * PAGE) as usize) as *mut libc::c_void;
    if target.zeropage {
        // EEXIST: the page appeared meanwhile, nothing left to do.
        return matches!(
            target.userfaultfd.zeropage(page_start as u64, PAGE),
            Ok(()) | Err(Errno::EXIST)
        );
    }
    if target.file.get_folio(PageIndex(page)).is_err() {
        return false;
    }
    // Map the page now: otherwise the retried access faults once more to
    // map it (about 1.3 µs on the project machine, a third of the floor).
    // A failure leaves that to the retry.
    // SAFETY: MADV_POPULATE_WRITE on one page of the live, registered
    // mapping only faults the page (now present) into the page tables.
    let _ = unsafe {
        rustix::mm::madvise(
            page_start,
            PAGE as usize,
            rustix::mm::Advice::LinuxPopulateWrite,
        )
    };
    true
}

/// Pages the kernel object behind `file` holds (fstat's 512-byte blocks).
fn kernel_pages(file: &GuestMemFile) -> Result<u64, BenchError> {
    let stat = rustix::fs::fstat(file.as_fd()).map_err(kernel("fstat of the gmem file"))?;
    Ok(stat.st_blocks as u64 * 512 / PAGE)
}

/// Times `iterations` first touches of `kind`; returns the total.
///
/// Errors: those of creating, mapping and punching the files (ENOMEM), and
/// of starting the fault service (EPERM without the userfaultfd privilege).
pub fn first_touch(kind: FirstTouch, iterations: u64) -> Result<Duration, BenchError> {
    let file = GuestMemFile::create(PAGES * PAGE, GmemFlags::HOST_ACCESSIBLE, Backend::Memfd)?;
    // Before the service starts: its handler thread inherits the affinity.
    let _pinned = match kind {
        FirstTouch::ThroughServiceOnOneCpu => Some(PinnedToThisCpu::new()?),
        _ => None,
    };
    let service = match kind {
        FirstTouch::ThroughService | FirstTouch::ThroughServiceOnOneCpu => {
            Some(FaultService::start([file.clone()])?)
        }
        FirstTouch::Plain
        | FirstTouch::Fallocate
        | FirstTouch::InThreadFloor
        | FirstTouch::InThreadZeropage => None,
    };
    let plain = PlainMemfd::new()?;
    let base = if kind.touches_gmem_file() {
        file.mapping()?.host_address().as_ptr()
    } else {
        plain.base.as_ptr()
    };
    // Dropped (handler and userfaultfd gone) before the file is.
    let _in_thread = match kind {
        FirstTouch::InThreadFloor => Some(InThreadFloor::start(&file, base, false)?),
        FirstTouch::InThreadZeropage => Some(InThreadFloor::start(&file, base, true)?),
        _ => None,
    };
    let mut elapsed = Duration::ZERO;
    let mut done = 0;
    while done < iterations {
        let batch = PAGES.min(iterations - done);
        let start = Instant::now();
        for page in 0..batch {
            match kind {
                FirstTouch::ThroughService
                | FirstTouch::ThroughServiceOnOneCpu
                | FirstTouch::InThreadFloor
                | FirstTouch::InThreadZeropage
                | FirstTouch::Plain => {
                    // SAFETY: page < PAGES, so the byte is inside the
                    // PAGES-page mapping; a plain volatile store.
                    unsafe { base.add((page * PAGE) as usize).write_volatile(1) };
                }
                FirstTouch::Fallocate => {
                    rustix::fs::fallocate(&plain.fd, FallocateFlags::KEEP_SIZE, page * PAGE, PAGE)
                        .map_err(kernel("fallocate(KEEP_SIZE)"))?;
                }
            }
        }
        elapsed += start.elapsed();
        done += batch;
        if kind.touches_gmem_file() {
            let in_kernel = kernel_pages(&file)?;
            let recorded = file.populated_count();
            if in_kernel != batch || (kind.allocates_through_get_folio() && recorded != batch) {
                return Err(BenchError::Unrecorded {
                    touched: batch,
                    in_kernel,
                    recorded,
                });
            }
        }
        // Untimed: empty both files again.
        file.fallocate(FallocMode::PUNCH, 0, (PAGES * PAGE) as i64)?;
        let punch = FallocateFlags::KEEP_SIZE | FallocateFlags::PUNCH_HOLE;
        rustix::fs::fallocate(&plain.fd, punch, 0, PAGES * PAGE)
            .map_err(kernel("fallocate(PUNCH_HOLE)"))?;
    }
    if let Some((service, _events)) = service {
        service.shutdown().map_err(|(_, error)| error)?;
    }
    Ok(elapsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_of_first_touch_takes_time() {
        for kind in [
            FirstTouch::ThroughService,
            FirstTouch::ThroughServiceOnOneCpu,
            FirstTouch::Plain,
            FirstTouch::Fallocate,
            FirstTouch::InThreadFloor,
            FirstTouch::InThreadZeropage,
        ] {
            let affinity = rustix::thread::sched_getaffinity(None).expect("affinity");
            match first_touch(kind, 64) {
                Ok(elapsed) => {
                    assert!(elapsed > Duration::ZERO, "{kind:?}");
                    let after = rustix::thread::sched_getaffinity(None).expect("affinity");
                    assert!(after == affinity, "{kind:?} left the thread pinned");
                }
                Err(BenchError::Service(error)) => {
                    eprintln!("SKIPPED: {kind:?}: the fault service cannot start here: {error}");
                }
                Err(error @ BenchError::InThread { .. }) => {
                    eprintln!("SKIPPED: {kind:?}: {error}");
                }
                Err(error) => panic!("{kind:?}: {error}"),
            }
        }
    }
}
