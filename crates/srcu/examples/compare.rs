//! Read-side cost and grace-period latency of this SRCU next to the usual
//! alternatives, measured side by side in one run and printed as one table.
//!
//! Run: `cargo run --release -p srcu --example compare [-- --quick]`.
//!
//! Read side: each thread loops "enter a read section, read one shared word,
//! leave" for a fixed time; the table gives nanoseconds per section per
//! thread and the aggregate rate, at 1, 2 and N threads (N = available
//! cores), for: this SRCU with the membarrier read side, this SRCU with the
//! fence read side, `std::sync::RwLock::read`, `parking_lot::RwLock::read`,
//! `crossbeam_epoch::pin`, and a bare `AtomicBool` load (the floor).
//! Grace periods: `synchronize` latency (median, p99) with no readers and
//! with N threads looping short read sections.

use std::hint::black_box;
use std::sync::Barrier;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use srcu::{ReadSide, Srcu};

static MEMBARRIER_DOMAIN: Srcu = Srcu::new();
static FENCE_DOMAIN: Srcu = Srcu::with_fences();
static WORD: AtomicU64 = AtomicU64::new(1);
static FLAG: AtomicBool = AtomicBool::new(false);

/// One read-side mechanism under test: enter, read `WORD`, leave.
struct Contender {
    name: &'static str,
    section: fn() -> u64,
}

fn srcu_membarrier() -> u64 {
    let _guard = black_box(MEMBARRIER_DOMAIN.read_lock());
    WORD.load(Ordering::Relaxed)
}

fn srcu_fences() -> u64 {
    let _guard = black_box(FENCE_DOMAIN.read_lock());
    WORD.load(Ordering::Relaxed)
}

static STD_RWLOCK: std::sync::RwLock<u64> = std::sync::RwLock::new(1);
fn std_rwlock() -> u64 {
    *STD_RWLOCK
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

static PL_RWLOCK: parking_lot::RwLock<u64> = parking_lot::const_rwlock(1);
fn parking_lot_rwlock() -> u64 {
    *PL_RWLOCK.read()
}

fn crossbeam_epoch_pin() -> u64 {
    let _guard = black_box(crossbeam_epoch::pin());
    WORD.load(Ordering::Relaxed)
}

fn atomic_load_floor() -> u64 {
    u64::from(black_box(&FLAG).load(Ordering::Relaxed))
}

/// Sections per thread in `duration` with `threads` threads looping.
fn run_readers(section: fn() -> u64, threads: usize, duration: Duration) -> Vec<u64> {
    let start = Barrier::new(threads);
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                let start = &start;
                scope.spawn(move || {
                    // Warm up: claim the SRCU slot, fault in code and data.
                    for _ in 0..10_000 {
                        black_box(section());
                    }
                    start.wait();
                    let deadline = Instant::now() + duration;
                    let mut count = 0u64;
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

/// `synchronize` latencies while `readers` threads loop short sections.
fn synchronize_latencies(domain: &'static Srcu, readers: usize, samples: usize) -> Vec<Duration> {
    let stop = AtomicBool::new(false);
    let running = Barrier::new(readers + 1);
    std::thread::scope(|scope| {
        for _ in 0..readers {
            let (stop, running) = (&stop, &running);
            scope.spawn(move || {
                running.wait();
                while !stop.load(Ordering::Relaxed) {
                    for _ in 0..256 {
                        let _guard = domain.read_lock();
                        black_box(WORD.load(Ordering::Relaxed));
                    }
                }
            });
        }
        running.wait();
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

fn percentile(sorted: &[Duration], fraction: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * fraction).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

fn main() {
    let quick = std::env::args().any(|argument| argument == "--quick");
    let duration = Duration::from_millis(if quick { 100 } else { 500 });
    let cores = std::thread::available_parallelism().map_or(2, usize::from);
    let mut thread_counts = vec![1, 2, cores];
    thread_counts.dedup();

    let process_side = ReadSide::of_process();
    println!(
        "srcu read side compare: {cores} cores, kernel {}, process read side {process_side:?}",
        kernel_release()
    );
    if process_side != ReadSide::Membarrier {
        println!(
            "NOTE: membarrier unavailable (or GMEM_SRCU_FENCES set): the 'srcu (membarrier)' row uses fences"
        );
    }

    let contenders = [
        Contender {
            name: "srcu (membarrier)",
            section: srcu_membarrier,
        },
        Contender {
            name: "srcu (fences)",
            section: srcu_fences,
        },
        Contender {
            name: "std RwLock read",
            section: std_rwlock,
        },
        Contender {
            name: "parking_lot RwLock read",
            section: parking_lot_rwlock,
        },
        Contender {
            name: "crossbeam_epoch::pin",
            section: crossbeam_epoch_pin,
        },
        Contender {
            name: "AtomicBool load (floor)",
            section: atomic_load_floor,
        },
    ];

    println!();
    print!("{:<26}", "read lock+unlock");
    for threads in &thread_counts {
        print!(" | {:>9} {:>10}", format!("{threads}T ns/op"), "Mops/s all");
    }
    println!();
    let mut single_thread_ns = Vec::new();
    let mut two_thread_ns = Vec::new();
    for contender in &contenders {
        print!("{:<26}", contender.name);
        for &threads in &thread_counts {
            let counts = run_readers(contender.section, threads, duration);
            let total: u64 = counts.iter().sum();
            let per_thread = total as f64 / threads as f64;
            let nanos_per_op = duration.as_nanos() as f64 / per_thread.max(1.0);
            let aggregate_mops = total as f64 / duration.as_secs_f64() / 1e6;
            print!(" | {nanos_per_op:>9.2} {aggregate_mops:>10.1}");
            if threads == 1 {
                single_thread_ns.push((contender.name, nanos_per_op));
            }
            if threads == 2 {
                two_thread_ns.push((contender.name, nanos_per_op));
            }
        }
        println!();
    }

    let lookup = |table: &[(&str, f64)], name: &str| {
        table
            .iter()
            .find(|(row, _)| *row == name)
            .map_or(f64::NAN, |(_, value)| *value)
    };
    let floor = lookup(&single_thread_ns, "AtomicBool load (floor)");
    println!();
    println!("ratios (same run):");
    for name in ["srcu (membarrier)", "srcu (fences)"] {
        println!(
            "  {name}: {:.2}x the floor at 1 thread; std RwLock read is {:.1}x slower at 2 threads",
            lookup(&single_thread_ns, name) / floor,
            lookup(&two_thread_ns, "std RwLock read") / lookup(&two_thread_ns, name),
        );
    }

    println!();
    println!(
        "{:<26} | {:>10} | {:>10} | {:>10}",
        "synchronize latency", "readers", "median us", "p99 us"
    );
    let samples = if quick { 200 } else { 2000 };
    for (name, domain) in [
        ("srcu (membarrier)", &MEMBARRIER_DOMAIN),
        ("srcu (fences)", &FENCE_DOMAIN),
    ] {
        for readers in [0, cores] {
            let mut latencies = synchronize_latencies(domain, readers, samples);
            latencies.sort_unstable();
            println!(
                "{name:<26} | {readers:>10} | {:>10.1} | {:>10.1}",
                percentile(&latencies, 0.5).as_secs_f64() * 1e6,
                percentile(&latencies, 0.99).as_secs_f64() * 1e6,
            );
        }
    }
}

fn kernel_release() -> String {
    rustix::system::uname()
        .release()
        .to_string_lossy()
        .into_owned()
}
