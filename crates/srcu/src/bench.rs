//! Read-side and grace-period measurements of this SRCU next to the usual
//! alternatives: the one implementation behind the criterion benchmark
//! (`benches/read_side.rs`), the table example (`examples/compare.rs`) and
//! `gmemctl bench`. Built only with the `bench` feature.
//!
//! Model: a read-side *contender* is a function that enters one read
//! section, reads one shared word and leaves. [`read_rate`] runs a contender
//! in a loop on `threads` threads at once for a fixed time and reports the
//! cost per section per thread and the aggregate rate; a bare `AtomicBool`
//! load is the floor every contender is compared with. [`synchronize_latencies`]
//! times individual grace periods while reader threads loop short sections.
//!
//! Nothing here is random: every thread does the same deterministic work, so
//! two runs differ only by the machine's noise.

use std::hint::black_box;
use std::sync::Barrier;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::Srcu;

/// The domain of the "srcu (membarrier)" contender: the process's read side
/// (membarrier where the kernel offers it, see [`crate::ReadSide::of_process`]).
pub static MEMBARRIER_DOMAIN: Srcu = Srcu::new();
/// The domain of the "srcu (fences)" contender: always the fence read side.
pub static FENCE_DOMAIN: Srcu = Srcu::with_fences();

/// The shared word every read section reads (so a section does real work
/// that the compiler cannot drop).
static WORD: AtomicU64 = AtomicU64::new(1);
/// The flag the floor loads.
static FLAG: AtomicBool = AtomicBool::new(false);
static STD_RWLOCK: std::sync::RwLock<u64> = std::sync::RwLock::new(1);
static PARKING_LOT_RWLOCK: parking_lot::RwLock<u64> = parking_lot::const_rwlock(1);

/// One read-side mechanism under test.
#[derive(Clone, Copy, Debug)]
pub struct Contender {
    /// Short identifier for scripts and criterion ids (`srcu_membarrier`).
    pub id: &'static str,
    /// Name for a human (`srcu (membarrier)`).
    pub name: &'static str,
    /// Enters one read section, reads one word, leaves.
    pub section: fn() -> u64,
}

// The guards are not black-boxed: their drop (the unlock) is an atomic
// store the compiler keeps anyway, and black-boxing a guard built in this
// crate sent it through the stack and cost 20-30% (measured), which would
// time the harness rather than the read side.
fn srcu_membarrier() -> u64 {
    let _guard = MEMBARRIER_DOMAIN.read_lock();
    WORD.load(Ordering::Relaxed)
}

fn srcu_fences() -> u64 {
    let _guard = FENCE_DOMAIN.read_lock();
    WORD.load(Ordering::Relaxed)
}

fn std_rwlock() -> u64 {
    *STD_RWLOCK
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn parking_lot_rwlock() -> u64 {
    *PARKING_LOT_RWLOCK.read()
}

fn crossbeam_epoch_pin() -> u64 {
    let _guard = crossbeam_epoch::pin();
    WORD.load(Ordering::Relaxed)
}

fn atomic_load_floor() -> u64 {
    u64::from(black_box(&FLAG).load(Ordering::Relaxed))
}

/// The floor: a bare relaxed `AtomicBool` load, no read section at all.
pub const FLOOR: Contender = Contender {
    id: "atomic_bool_load_floor",
    name: "AtomicBool load (floor)",
    section: atomic_load_floor,
};

/// Every contender, this crate's two read sides first and the floor last.
pub const CONTENDERS: [Contender; 6] = [
    Contender {
        id: "srcu_membarrier",
        name: "srcu (membarrier)",
        section: srcu_membarrier,
    },
    Contender {
        id: "srcu_fences",
        name: "srcu (fences)",
        section: srcu_fences,
    },
    Contender {
        id: "std_rwlock_read",
        name: "std RwLock read",
        section: std_rwlock,
    },
    Contender {
        id: "parking_lot_rwlock_read",
        name: "parking_lot RwLock read",
        section: parking_lot_rwlock,
    },
    Contender {
        id: "crossbeam_epoch_pin",
        name: "crossbeam_epoch::pin",
        section: crossbeam_epoch_pin,
    },
    FLOOR,
];

/// The result of one [`read_rate`] run.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ReadRate {
    /// Nanoseconds per read section, per thread (the run's length divided
    /// by the mean number of sections one thread completed).
    pub nanoseconds_per_section: f64,
    /// Read sections per second of all threads together, in millions.
    pub aggregate_million_per_second: f64,
}

/// Runs `section` in a loop on `threads` threads at once for `duration`;
/// the sections each thread completed.
///
/// Each thread first runs 10,000 untimed sections (claiming its SRCU slot,
/// faulting in code and data), then all start together at a barrier.
///
/// # Panics
/// If `threads` is 0.
pub fn run_readers(section: fn() -> u64, threads: usize, duration: Duration) -> Vec<u64> {
    assert!(threads > 0, "run_readers needs at least one thread");
    let start = Barrier::new(threads);
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                let start = &start;
                scope.spawn(move || {
                    for _ in 0..10_000 {
                        black_box(section());
                    }
                    start.wait();
                    let deadline = Instant::now() + duration;
                    let mut count = 0u64;
                    // Blocks of 1024 keep the clock reads out of the cost.
                    while Instant::now() < deadline {
                        for _ in 0..1024 {
                            black_box(section());
                        }
                        count += 1024;
                    }
                    count
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|handle| handle.join().unwrap_or(0))
            .collect()
    })
}

/// [`run_readers`] summarised as a cost per section and an aggregate rate.
///
/// # Panics
/// If `threads` is 0.
pub fn read_rate(section: fn() -> u64, threads: usize, duration: Duration) -> ReadRate {
    let counts = run_readers(section, threads, duration);
    let total: u64 = counts.iter().sum();
    let per_thread = total as f64 / threads as f64;
    ReadRate {
        nanoseconds_per_section: duration.as_nanos() as f64 / per_thread.max(1.0),
        aggregate_million_per_second: total as f64 / duration.as_secs_f64() / 1e6,
    }
}

/// `samples` individual `synchronize` latencies on `domain` while `readers`
/// threads loop short read sections of it (256 sections between checks of
/// the stop flag).
///
/// The first sample is taken only once every reader has finished a batch of
/// sections: woken from the start barrier, the readers may not have run yet,
/// and grace periods with no reader on a CPU cost no IPI at all, so without
/// the wait a fast run measured the idle case under the busy label.
pub fn synchronize_latencies(
    domain: &'static Srcu,
    readers: usize,
    samples: usize,
) -> Vec<Duration> {
    let stop = AtomicBool::new(false);
    let reading = AtomicUsize::new(0);
    std::thread::scope(|scope| {
        for _ in 0..readers {
            let (stop, reading) = (&stop, &reading);
            scope.spawn(move || {
                let mut counted = false;
                while !stop.load(Ordering::Relaxed) {
                    for _ in 0..256 {
                        let _guard = domain.read_lock();
                        black_box(WORD.load(Ordering::Relaxed));
                    }
                    if !counted {
                        // Relaxed: a count, read only to decide when to
                        // start timing; nothing else is published by it.
                        reading.fetch_add(1, Ordering::Relaxed);
                        counted = true;
                    }
                }
            });
        }
        while reading.load(Ordering::Relaxed) < readers {
            std::thread::yield_now();
        }
        let mut latencies = Vec::with_capacity(samples);
        for _ in 0..samples {
            let begin = Instant::now();
            domain.synchronize();
            latencies.push(begin.elapsed());
        }
        stop.store(true, Ordering::Relaxed);
        latencies
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_contender_runs_and_reports_a_positive_rate() {
        for contender in CONTENDERS {
            let rate = read_rate(contender.section, 2, Duration::from_millis(5));
            assert!(
                rate.nanoseconds_per_section > 0.0 && rate.aggregate_million_per_second > 0.0,
                "{}: {rate:?}",
                contender.name
            );
        }
    }

    #[test]
    fn synchronize_latencies_returns_one_sample_per_grace_period() {
        let latencies = synchronize_latencies(&FENCE_DOMAIN, 1, 7);
        assert_eq!(latencies.len(), 7);
    }
}
