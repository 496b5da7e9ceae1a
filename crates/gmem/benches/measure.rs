//! Measurements shared by the criterion benchmark (`benches/gmem.rs`) and
//! the one-table report (`examples/bench_table.rs`). Each function runs
//! `iterations` operations and returns the time they took (per thread,
//! wall clock, for the threaded ones), so both harnesses time the same code.

#![allow(dead_code)]

use std::hint::black_box;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use gmem::{Backend, FallocMode, GmemFlags, GuestMemFile, PageIndex};

/// Pages in the benchmark files: 64 MiB, so missing-page runs allocate up to
/// 16,384 pages before a punch (outside the timing) empties the file.
pub const PAGES: u64 = 16_384;

/// A memfd-backed file with every page present.
pub fn populated_file() -> Arc<GuestMemFile> {
    let file = GuestMemFile::create(PAGES * 4096, GmemFlags::HOST_ACCESSIBLE, Backend::Memfd)
        .expect("create");
    file.fallocate(FallocMode::ALLOCATE, 0, (PAGES * 4096) as i64)
        .expect("populate");
    file
}

/// A memfd-backed file with no page present.
pub fn empty_file() -> Arc<GuestMemFile> {
    GuestMemFile::create(PAGES * 4096, GmemFlags::HOST_ACCESSIBLE, Backend::Memfd).expect("create")
}

/// A bare memfd of the same size (the kernel alone, no crate).
pub fn bare_memfd() -> OwnedFd {
    let fd = rustix::fs::memfd_create("bare", rustix::fs::MemfdFlags::CLOEXEC).expect("memfd");
    rustix::fs::ftruncate(&fd, PAGES * 4096).expect("size");
    fd
}

/// A page order that defeats prefetching: a stride coprime with PAGES.
fn page(step: u64) -> u64 {
    (step.wrapping_mul(7919)) % PAGES
}

/// `get_folio` of present pages, `threads` threads at once; per-thread time.
pub fn get_folio_present(file: &Arc<GuestMemFile>, threads: usize, iterations: u64) -> Duration {
    run_threads(threads, |thread| {
        let file = file.clone();
        move || {
            let start = Instant::now();
            for step in 0..iterations {
                let folio = file
                    .get_folio(PageIndex(page(step + thread as u64 * 13)))
                    .expect("present");
                black_box(folio);
            }
            start.elapsed()
        }
    })
}

/// Only the freeze check of the fault path (read section + flag load),
/// `threads` threads at once; per-thread time.
pub fn freeze_check_only(file: &Arc<GuestMemFile>, threads: usize, iterations: u64) -> Duration {
    run_threads(threads, |_| {
        let file = file.clone();
        move || {
            let start = Instant::now();
            for _ in 0..iterations {
                black_box(file.freeze_check_for_bench());
            }
            start.elapsed()
        }
    })
}

/// Which allocation a missing-page run times.
#[derive(Clone, Copy, Debug)]
pub enum Allocation {
    /// `get_folio` of a missing page (freeze check, index, fallocate).
    GetFolio,
    /// The same path built without the freeze check.
    GetFolioWithoutFreezeCheck,
    /// A bare `fallocate(KEEP_SIZE)` of one page on a plain memfd.
    BareFallocate,
}

/// Allocates `iterations` missing pages per thread, `threads` threads on
/// disjoint pages; punches the file empty (untimed) whenever a thread runs
/// out of missing pages. Returns the per-thread time.
pub fn allocate_missing(kind: Allocation, threads: usize, iterations: u64) -> Duration {
    let file = empty_file();
    let bare = Arc::new(bare_memfd());
    let per_thread = PAGES / threads as u64;
    let barrier = Arc::new(Barrier::new(threads));
    run_threads(threads, |thread| {
        let (file, bare, barrier) = (file.clone(), bare.clone(), barrier.clone());
        move || {
            let first = thread as u64 * per_thread;
            let mut elapsed = Duration::ZERO;
            let mut done = 0;
            while done < iterations {
                let batch = per_thread.min(iterations - done);
                barrier.wait();
                let start = Instant::now();
                for offset in 0..batch {
                    let index = first + offset;
                    match kind {
                        Allocation::GetFolio => {
                            black_box(file.get_folio(PageIndex(index)).expect("allocate"));
                        }
                        Allocation::GetFolioWithoutFreezeCheck => {
                            black_box(
                                file.get_folio_without_freeze_check(PageIndex(index))
                                    .expect("allocate"),
                            );
                        }
                        Allocation::BareFallocate => {
                            rustix::fs::fallocate(
                                &*bare,
                                rustix::fs::FallocateFlags::KEEP_SIZE,
                                index * 4096,
                                4096,
                            )
                            .expect("fallocate");
                        }
                    }
                }
                elapsed += start.elapsed();
                done += batch;
                // Untimed: once every thread has stopped its clock, empty
                // this thread's pages again.
                barrier.wait();
                let (offset, len) = ((first * 4096) as i64, (batch * 4096) as i64);
                file.fallocate(FallocMode::PUNCH, offset, len)
                    .expect("punch");
                rustix::fs::fallocate(
                    &*bare,
                    rustix::fs::FallocateFlags::KEEP_SIZE | rustix::fs::FallocateFlags::PUNCH_HOLE,
                    offset as u64,
                    len as u64,
                )
                .expect("punch");
            }
            elapsed
        }
    })
}

/// `freeze(true)` latency while `faulting` threads call `get_folio` on
/// random pages of a half-populated file (present ones are served, missing
/// ones meet the freeze); each iteration also unfreezes (untimed).
pub fn freeze_while_faulting(faulting: usize, iterations: u64) -> Duration {
    let file = empty_file();
    file.fallocate(FallocMode::ALLOCATE, 0, (PAGES * 4096 / 2) as i64)
        .expect("half");
    let stop = Arc::new(AtomicBool::new(false));
    let lookups = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..faulting)
        .map(|thread| {
            let (file, stop, lookups) = (file.clone(), stop.clone(), lookups.clone());
            std::thread::spawn(move || {
                let mut step = thread as u64 * 101;
                while !stop.load(Ordering::Relaxed) {
                    step += 1;
                    black_box(file.get_folio(PageIndex(page(step))).ok());
                }
                lookups.fetch_add(step, Ordering::Relaxed);
            })
        })
        .collect();
    let mut elapsed = Duration::ZERO;
    for _ in 0..iterations {
        let start = Instant::now();
        file.freeze(true);
        elapsed += start.elapsed();
        file.freeze(false);
        // Let the faulting threads run between freezes.
        std::thread::sleep(Duration::from_micros(50));
    }
    stop.store(true, Ordering::Relaxed);
    workers
        .into_iter()
        .for_each(|worker| worker.join().expect("worker"));
    elapsed
}

/// Runs `make(thread)`'s closure on `threads` threads; the mean of their
/// returned durations.
fn run_threads<F, W>(threads: usize, make: F) -> Duration
where
    F: Fn(usize) -> W,
    W: FnOnce() -> Duration + Send + 'static,
{
    let handles: Vec<_> = (0..threads)
        .map(|thread| std::thread::spawn(make(thread)))
        .collect();
    let total: Duration = handles
        .into_iter()
        .map(|handle| handle.join().expect("thread"))
        .sum();
    total / threads as u32
}
