//! Fault-path, freeze and memory measurements of guest memory files: the one
//! implementation behind the criterion benchmark (`benches/gmem.rs`), the
//! table example (`examples/bench_table.rs`) and `gmemctl bench`. Built only
//! with the `bench` feature, which also builds the fault path without the
//! freeze check that [`Allocation::GetFolioWithoutFreezeCheck`] times (it
//! breaks the freeze, so it stays private to this module).
//!
//! Model: each timing function runs `iterations` operations and returns the
//! time they took (per thread, for the threaded ones), so a harness can
//! divide by `iterations` or hand the time to criterion's `iter_custom`.
//! Files are memfd-backed and [`PAGES`] pages long; pages are visited in a
//! fixed order (a stride coprime with [`PAGES`]) that defeats prefetching.
//! Nothing here is random, so there is no seed: two runs differ only by the
//! machine's noise.
//!
//! [`memory_per_file`] counts this process's heap bytes (glibc's
//! `mallinfo2`) around the creation of many small files, next to the same
//! files each given their own SRCU domain: the per-inode design the seed
//! rejects.

use std::hint::black_box;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use rustix::io::Errno;

use crate::{Backend, FallocMode, GmemError, GmemFlags, GuestMemFile, PageIndex};

/// Pages in the benchmark files: 64 MiB, so missing-page runs allocate up to
/// 16,384 pages before a punch (outside the timing) empties the file.
pub const PAGES: u64 = 16_384;
const PAGE: u64 = 4096;

/// Why a measurement could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A guest memory file operation failed.
    #[error(transparent)]
    Gmem(#[from] GmemError),
    /// A system call on the benchmark's own baseline objects failed.
    #[error("benchmark baseline: {operation} failed: {errno}")]
    Kernel {
        /// The call and what it was for.
        operation: &'static str,
        /// The kernel's error.
        errno: Errno,
    },
    /// The measurement cannot run in this process.
    #[error("benchmark cannot run: {reason}")]
    Unsupported {
        /// Why not.
        reason: String,
    },
}

fn kernel(operation: &'static str) -> impl FnOnce(Errno) -> BenchError {
    move |errno| BenchError::Kernel { operation, errno }
}

/// A memfd-backed file of [`PAGES`] pages with every page present.
///
/// Errors: those of [`GuestMemFile::create`] and [`GuestMemFile::fallocate`]
/// (ENOMEM, ENOSPC).
pub fn populated_file() -> Result<Arc<GuestMemFile>, BenchError> {
    let file = empty_file()?;
    file.fallocate(FallocMode::ALLOCATE, 0, (PAGES * PAGE) as i64)?;
    Ok(file)
}

/// A memfd-backed file of [`PAGES`] pages with no page present.
///
/// Errors: those of [`GuestMemFile::create`].
pub fn empty_file() -> Result<Arc<GuestMemFile>, BenchError> {
    Ok(GuestMemFile::create(
        PAGES * PAGE,
        GmemFlags::HOST_ACCESSIBLE,
        Backend::Memfd,
    )?)
}

/// A bare memfd of the same size (the kernel alone, no crate).
fn bare_memfd() -> Result<OwnedFd, BenchError> {
    let fd = rustix::fs::memfd_create("bare", rustix::fs::MemfdFlags::CLOEXEC)
        .map_err(kernel("memfd_create"))?;
    rustix::fs::ftruncate(&fd, PAGES * PAGE).map_err(kernel("ftruncate"))?;
    Ok(fd)
}

/// The fixed page order: a stride coprime with [`PAGES`].
fn page(step: u64) -> u64 {
    (step.wrapping_mul(7919)) % PAGES
}

/// `get_folio` of present pages of `file` (from [`populated_file`]),
/// `threads` threads at once; the mean per-thread time.
///
/// Errors: those of [`GuestMemFile::get_folio`] (a page of `file` missing
/// and the allocation failing).
pub fn get_folio_present(
    file: &Arc<GuestMemFile>,
    threads: usize,
    iterations: u64,
) -> Result<Duration, BenchError> {
    run_threads(threads, |thread| {
        let file = file.clone();
        move || {
            let index = |step: u64| PageIndex(page(step + thread as u64 * 13));
            let start = Instant::now();
            // Failures are counted, not returned at once, and only a
            // register-sized summary of each folio is black-boxed: returning
            // the error from inside the loop, or black-boxing the whole
            // `Folio`, made this 2 ns lookup three to four times slower
            // (measured: the value went through the stack and stalled store
            // forwarding), which would time the harness, not the lookup.
            let mut failures = 0u64;
            for step in 0..iterations {
                let folio = file.get_folio(index(step));
                let summary = folio.map_or(u64::MAX, |folio| folio.index().0);
                failures += u64::from(summary == u64::MAX);
                black_box(summary);
            }
            let elapsed = start.elapsed();
            if failures > 0 {
                // Off the clock: find the failing lookup again for its error.
                for step in 0..iterations {
                    file.get_folio(index(step))?;
                }
            }
            Ok(elapsed)
        }
    })
}

/// Only the freeze check of the fault path (read section + flag load),
/// `threads` threads at once; the mean per-thread time.
pub fn freeze_check_only(file: &Arc<GuestMemFile>, threads: usize, iterations: u64) -> Duration {
    let timed = run_threads(threads, |_| {
        let file = file.clone();
        move || {
            let start = Instant::now();
            for _ in 0..iterations {
                black_box(file.freeze_check_for_bench());
            }
            Ok(start.elapsed())
        }
    });
    // The closures cannot fail.
    timed.unwrap_or_default()
}

/// Which allocation a missing-page run times.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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
/// out of missing pages. Returns the mean per-thread time.
///
/// Errors: the allocation's (ENOMEM, ENOSPC), or EINVAL (`Unsupported`)
/// for 0 threads or more threads than [`PAGES`].
pub fn allocate_missing(
    kind: Allocation,
    threads: usize,
    iterations: u64,
) -> Result<Duration, BenchError> {
    if threads == 0 || threads as u64 > PAGES {
        return Err(BenchError::Unsupported {
            reason: format!("allocate_missing with {threads} threads"),
        });
    }
    let file = empty_file()?;
    let bare = Arc::new(bare_memfd()?);
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
                for index in first..first + batch {
                    allocate_one(kind, &file, &bare, index)?;
                }
                elapsed += start.elapsed();
                done += batch;
                // Untimed: once every thread has stopped its clock, empty
                // this thread's pages again.
                barrier.wait();
                let (offset, len) = (first * PAGE, batch * PAGE);
                file.fallocate(FallocMode::PUNCH, offset as i64, len as i64)?;
                let punch =
                    rustix::fs::FallocateFlags::KEEP_SIZE | rustix::fs::FallocateFlags::PUNCH_HOLE;
                rustix::fs::fallocate(&*bare, punch, offset, len)
                    .map_err(kernel("fallocate(PUNCH_HOLE)"))?;
            }
            Ok(elapsed)
        }
    })
}

#[inline(always)]
fn allocate_one(
    kind: Allocation,
    file: &GuestMemFile,
    bare: &OwnedFd,
    index: u64,
) -> Result<(), BenchError> {
    match kind {
        Allocation::GetFolio => {
            black_box(file.get_folio(PageIndex(index))?);
        }
        Allocation::GetFolioWithoutFreezeCheck => {
            black_box(file.get_folio_without_freeze_check(PageIndex(index))?);
        }
        Allocation::BareFallocate => {
            let keep_size = rustix::fs::FallocateFlags::KEEP_SIZE;
            rustix::fs::fallocate(bare, keep_size, index * PAGE, PAGE)
                .map_err(kernel("fallocate(KEEP_SIZE)"))?;
        }
    }
    Ok(())
}

/// The shape of the latency measurements ([`freeze_while_faulting`],
/// [`punch_while_faulting`]): (threads working meanwhile, events to time)
/// to one duration per event.
pub type LatencyMeasurement = fn(usize, u64) -> Result<Vec<Duration>, BenchError>;

/// `iterations` individual `freeze(true)` latencies while `faulting`
/// threads call `get_folio` on the pages of a half-populated file in the
/// fixed order (present ones are served, missing ones meet the freeze or
/// are allocated); each iteration also unfreezes, punches the upper half
/// empty again (both untimed) and lets the faulting threads run for 50 µs.
/// The punch keeps the file half-populated: without it the threads fill it
/// within a few dozen iterations and the rest time freezes over present-page
/// lookups only, a much shorter grace period than over allocations.
///
/// Errors: those of [`empty_file`], of populating half of it and of the
/// punch.
pub fn freeze_while_faulting(
    faulting: usize,
    iterations: u64,
) -> Result<Vec<Duration>, BenchError> {
    let file = empty_file()?;
    let half = (PAGES * PAGE / 2) as i64;
    file.fallocate(FallocMode::ALLOCATE, 0, half)?;
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
    let mut latencies = Vec::with_capacity(iterations as usize);
    let mut punched = Ok(());
    for _ in 0..iterations {
        let start = Instant::now();
        file.freeze(true);
        latencies.push(start.elapsed());
        file.freeze(false);
        punched = file.fallocate(FallocMode::PUNCH, half, half);
        if punched.is_err() {
            break;
        }
        std::thread::sleep(Duration::from_micros(50));
    }
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        if let Err(panic) = worker.join() {
            std::panic::resume_unwind(panic);
        }
    }
    punched?;
    Ok(latencies)
}

/// `iterations` individual latencies of a punch hole of one page that was
/// touched through the file's mapping (so the punch also unmaps it), while
/// `allocating` threads fault pages of the upper half of the same file and
/// punch their share of it empty again after each pass. The timed pages
/// are in the lower half, one per iteration, faulted and written untimed.
///
/// Errors: those of [`empty_file`], of mapping and writing the file, and of
/// the faults and punches; EINVAL (`Unsupported`) for more allocating
/// threads than pages in half the file.
pub fn punch_while_faulting(
    allocating: usize,
    iterations: u64,
) -> Result<Vec<Duration>, BenchError> {
    let half = PAGES / 2;
    if allocating as u64 > half {
        return Err(BenchError::Unsupported {
            reason: format!("punch_while_faulting with {allocating} allocating threads"),
        });
    }
    let file = empty_file()?;
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..allocating)
        .map(|thread| {
            let (file, stop) = (file.clone(), stop.clone());
            let share = half / allocating as u64;
            let first = half + thread as u64 * share;
            std::thread::spawn(move || -> Result<(), BenchError> {
                while !stop.load(Ordering::Relaxed) {
                    for index in first..first + share {
                        black_box(file.get_folio(PageIndex(index))?);
                    }
                    file.fallocate(
                        FallocMode::PUNCH,
                        (first * PAGE) as i64,
                        (share * PAGE) as i64,
                    )?;
                }
                Ok(())
            })
        })
        .collect();
    let mut latencies = Vec::with_capacity(iterations as usize);
    let measured = (|| -> Result<(), BenchError> {
        let mapping = file.mapping()?;
        for step in 0..iterations {
            let index = step % half;
            file.get_folio(PageIndex(index))?;
            mapping.write(index * PAGE, &[1])?;
            let start = Instant::now();
            file.fallocate(FallocMode::PUNCH, (index * PAGE) as i64, PAGE as i64)?;
            latencies.push(start.elapsed());
        }
        Ok(())
    })();
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        match worker.join() {
            Ok(result) => result?,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
    measured?;
    Ok(latencies)
}

/// Runs `make(thread)`'s closure on `threads` threads; the mean of their
/// returned durations, or the first error. A panic in a thread is resumed.
fn run_threads<F, W>(threads: usize, make: F) -> Result<Duration, BenchError>
where
    F: Fn(usize) -> W,
    W: FnOnce() -> Result<Duration, BenchError> + Send + 'static,
{
    let handles: Vec<_> = (0..threads.max(1))
        .map(|thread| std::thread::spawn(make(thread)))
        .collect();
    let mut total = Duration::ZERO;
    let mut first_error = None;
    for handle in handles {
        match handle.join() {
            Ok(Ok(elapsed)) => total += elapsed,
            Ok(Err(error)) => {
                first_error.get_or_insert(error);
            }
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
    match first_error {
        Some(error) => Err(error),
        None => Ok(total / threads.max(1) as u32),
    }
}

/// Heap bytes per guest memory file, ours next to the per-file SRCU domain
/// design.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MemoryPerFile {
    /// Files created for the measurement.
    pub files: usize,
    /// Size of each file.
    pub file_size: u64,
    /// Heap bytes one of our files costs, its page-state index included.
    pub bytes_per_file: f64,
    /// Of which the page-state index (exact, from the file).
    pub index_bytes: usize,
    /// Heap bytes one SRCU domain per file would add once `reader_threads`
    /// threads have read each file (the per-inode design the seed rejects:
    /// it grows with the threads, ours does not).
    pub per_file_domain_bytes: f64,
    /// The reader threads of that measurement.
    pub reader_threads: usize,
}

/// Live heap bytes of the process: glibc's allocated chunks plus its mmap'd
/// ones, over every arena.
fn heap_in_use() -> Result<usize, BenchError> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallinfo2 takes no arguments and returns a struct by
        // value; it only reads the allocator's own statistics.
        let info = unsafe { libc::mallinfo2() };
        Ok(info.uordblks + info.hblkhd)
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    Err(BenchError::Unsupported {
        reason: "heap accounting needs glibc's mallinfo2".to_owned(),
    })
}

/// Creates `files` memfd-backed files of `file_size` bytes at once and
/// counts the heap bytes each costs; then gives `files` fresh SRCU domains
/// one read section from each of `reader_threads` threads and counts what
/// each domain costs. Counts glibc's heap, so it is meaningful only in a
/// process that allocates through glibc malloc (the default allocator) and
/// where no other thread allocates meanwhile. Kernel memory (the memfd's
/// inode, the fd) is not counted.
///
/// Errors: those of [`GuestMemFile::create`] (EMFILE when `files` exceeds
/// the fd limit), `Unsupported` without glibc or for `files == 0`.
pub fn memory_per_file(
    files: usize,
    file_size: u64,
    reader_threads: usize,
) -> Result<MemoryPerFile, BenchError> {
    if files == 0 {
        return Err(BenchError::Unsupported {
            reason: "memory_per_file of 0 files".to_owned(),
        });
    }
    let create = || GuestMemFile::create(file_size, GmemFlags::HOST_ACCESSIBLE, Backend::Memfd);
    // Warm lazily built process-wide state (registry, domain) first.
    drop(create()?);
    let mut held = Vec::with_capacity(files);
    let before = heap_in_use()?;
    for _ in 0..files {
        held.push(create()?);
    }
    let bytes_per_file = heap_in_use()?.saturating_sub(before) as f64 / files as f64;
    let index_bytes = held[0].index_heap_bytes();
    drop(held);

    let mut domains: Vec<Box<srcu::Srcu>> = Vec::with_capacity(files);
    let before = heap_in_use()?;
    domains.extend((0..files).map(|_| Box::new(srcu::Srcu::new())));
    std::thread::scope(|scope| {
        for _ in 0..reader_threads {
            let domains = &domains;
            scope.spawn(move || {
                for domain in domains {
                    drop(black_box(domain.read_lock()));
                }
            });
        }
    });
    let per_file_domain_bytes = heap_in_use()?.saturating_sub(before) as f64 / files as f64;
    drop(domains);
    Ok(MemoryPerFile {
        files,
        file_size,
        bytes_per_file,
        index_bytes,
        per_file_domain_bytes,
        reader_threads,
    })
}

/// The median of `samples` (the upper middle for an even count); NaN for
/// none. Shared by the table examples and `gmemctl bench`.
pub fn median(samples: &[f64]) -> f64 {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied().unwrap_or(f64::NAN)
}

/// "median (min–max)" of per-round values, `unit` after the median: how
/// the table examples print a cell, the spread showing the noise.
pub fn spread(samples: Vec<f64>, unit: &str) -> String {
    let low = samples.iter().copied().fold(f64::INFINITY, f64::min);
    let high = samples.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{:.2}{unit} ({low:.2}–{high:.2})", median(&samples))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_is_the_upper_middle_and_spread_shows_min_and_max() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 3.0);
        assert!(median(&[]).is_nan());
        assert_eq!(spread(vec![2.5, 1.0, 9.0], " ns"), "2.50 ns (1.00–9.00)");
    }

    #[test]
    fn every_allocation_kind_allocates_and_takes_time() {
        for kind in [
            Allocation::GetFolio,
            Allocation::GetFolioWithoutFreezeCheck,
            Allocation::BareFallocate,
        ] {
            let elapsed = allocate_missing(kind, 2, 64).unwrap();
            assert!(elapsed > Duration::ZERO, "{kind:?}");
        }
    }

    #[test]
    fn allocate_missing_refuses_zero_threads() {
        assert!(matches!(
            allocate_missing(Allocation::GetFolio, 0, 1),
            Err(BenchError::Unsupported { .. })
        ));
    }

    #[test]
    fn freeze_while_faulting_returns_one_latency_per_freeze() {
        assert_eq!(freeze_while_faulting(1, 5).unwrap().len(), 5);
    }

    #[test]
    fn punch_while_faulting_times_every_punch_and_refuses_too_many_threads() {
        for allocating in [0, 2] {
            let latencies = punch_while_faulting(allocating, 40).unwrap();
            assert_eq!(latencies.len(), 40);
            assert!(latencies.iter().all(|latency| *latency > Duration::ZERO));
        }
        assert!(matches!(
            punch_while_faulting(PAGES as usize, 1),
            Err(BenchError::Unsupported { .. })
        ));
    }
}
