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

use std::os::fd::OwnedFd;
use std::ptr::NonNull;
use std::time::{Duration, Instant};

use gmem::{Backend, FallocMode, GmemError, GmemFlags, GuestMemFile};
use rustix::fs::FallocateFlags;
use rustix::io::Errno;

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
        FirstTouch::Plain | FirstTouch::Fallocate => None,
    };
    let plain = PlainMemfd::new()?;
    let base = match kind {
        FirstTouch::ThroughService | FirstTouch::ThroughServiceOnOneCpu => {
            file.mapping()?.host_address().as_ptr()
        }
        FirstTouch::Plain | FirstTouch::Fallocate => plain.base.as_ptr(),
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
                Err(error) => panic!("{kind:?}: {error}"),
            }
        }
    }
}
