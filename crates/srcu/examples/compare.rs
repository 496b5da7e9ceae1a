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
//! with N threads looping short read sections. The measurements themselves
//! are `srcu::bench` (feature `bench`), shared with the criterion benchmark
//! and `gmemctl bench`.

use std::time::Duration;

use srcu::ReadSide;
use srcu::bench::{
    CONTENDERS, FENCE_DOMAIN, FLOOR, MEMBARRIER_DOMAIN, read_rate, synchronize_latencies,
};

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

    println!();
    print!("{:<26}", "read lock+unlock");
    for threads in &thread_counts {
        print!(" | {:>9} {:>10}", format!("{threads}T ns/op"), "Mops/s all");
    }
    println!();
    let mut single_thread_ns = Vec::new();
    let mut two_thread_ns = Vec::new();
    for contender in &CONTENDERS {
        print!("{:<26}", contender.name);
        for &threads in &thread_counts {
            let rate = read_rate(contender.section, threads, duration);
            let nanos_per_op = rate.nanoseconds_per_section;
            let aggregate_mops = rate.aggregate_million_per_second;
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
    let floor = lookup(&single_thread_ns, FLOOR.name);
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
