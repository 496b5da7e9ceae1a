//! Prints the gmem benchmark table (markdown), every row measured side by
//! side in one run: `cargo run --release -p gmem --example bench_table`.
//! Each cell is the median of 11 rounds (31 for the missing-page rows) with
//! the (min–max) over rounds; the ratios compare rows measured in the same
//! round. Do not trust it while other work loads the machine.
//! The measurements are `gmem::bench` (feature `bench`), shared with the
//! criterion benchmark and `gmemctl bench`.

use std::time::Duration;

use gmem::bench as measure;
use measure::{Allocation, spread};

const ROUNDS: usize = 11;
/// Rounds of the missing-page rows (see there).
const MISSING_ROUNDS: usize = 31;

fn nanoseconds(duration: Duration, iterations: u64) -> f64 {
    duration.as_nanos() as f64 / iterations as f64
}

fn main() {
    let threads = std::thread::available_parallelism().map_or(2, |count| count.get().max(2));
    let file = measure::populated_file().expect("populated file");
    println!("| measurement | 1 thread | {threads} threads | target |");
    println!("| --- | --- | --- | --- |");

    let present = |threads| {
        spread(
            (0..ROUNDS)
                .map(|_| {
                    nanoseconds(
                        measure::get_folio_present(&file, threads, 2_000_000).expect("present"),
                        2_000_000,
                    )
                })
                .collect(),
            " ns",
        )
    };
    println!(
        "| get_folio, present page | {} | {} | < 20 ns |",
        present(1),
        present(threads)
    );

    let mut missing = Vec::new();
    for count in [1, threads] {
        // The whole file per measurement and more rounds than the other
        // rows: a ratio of two ~0.5 µs system calls drifts by several
        // percent between 4 ms measurements on this machine.
        let iterations = measure::PAGES;
        let mut rounds = Vec::new();
        for round in 0..MISSING_ROUNDS {
            // Alternate the order of the three rows between rounds, so a
            // drift in machine load does not favour one of them.
            let measure_kind = |kind| {
                nanoseconds(
                    measure::allocate_missing(kind, count, iterations).expect("allocate"),
                    iterations,
                )
            };
            let (with, without, bare) = if round % 2 == 0 {
                let with = measure_kind(Allocation::GetFolio);
                let without = measure_kind(Allocation::GetFolioWithoutFreezeCheck);
                (with, without, measure_kind(Allocation::BareFallocate))
            } else {
                let bare = measure_kind(Allocation::BareFallocate);
                let without = measure_kind(Allocation::GetFolioWithoutFreezeCheck);
                (measure_kind(Allocation::GetFolio), without, bare)
            };
            rounds.push((with, without, bare));
        }
        let column =
            |pick: fn(&(f64, f64, f64)) -> f64| rounds.iter().map(pick).collect::<Vec<f64>>();
        missing.push([
            spread(column(|round| round.0 / 1000.0), " µs"),
            spread(column(|round| round.2 / 1000.0), " µs"),
            spread(column(|round| round.0 / round.2), "x"),
            spread(column(|round| round.1 / 1000.0), " µs"),
            spread(column(|round| (round.0 / round.1 - 1.0) * 100.0), " %"),
        ]);
    }
    let check = |threads| {
        spread(
            (0..ROUNDS)
                .map(|_| {
                    nanoseconds(
                        measure::freeze_check_only(&file, threads, 2_000_000),
                        2_000_000,
                    )
                })
                .collect(),
            " ns",
        )
    };
    let rows = [
        ("get_folio, missing page (allocates)", ""),
        ("bare fallocate(KEEP_SIZE) of one page, memfd", ""),
        ("get_folio missing / bare fallocate", "<= 1.1x"),
        ("fault path built without the freeze check", ""),
        ("cost of the freeze check on the fault path", "< 2 %"),
    ];
    for (number, (name, target)) in rows.iter().enumerate() {
        println!(
            "| {name} | {} | {} | {target} |",
            missing[0][number], missing[1][number]
        );
    }
    println!(
        "| the freeze check alone (read section + flag load) | {} | {} | |",
        check(1),
        check(threads)
    );

    // The mean per event of 200 timed events, per round: idle, then with
    // `busy` threads working meanwhile.
    let latency = |measurement: measure::LatencyMeasurement, busy| {
        spread(
            (0..ROUNDS)
                .map(|_| {
                    let latencies = measurement(busy, 200).expect("latency measurement");
                    nanoseconds(latencies.into_iter().sum(), 200) / 1000.0
                })
                .collect(),
            " µs",
        )
    };
    println!(
        "| freeze(true) latency: idle file (column 1), while {threads} threads fault (column 2) | {} | {} | |",
        latency(measure::freeze_while_faulting, 0),
        latency(measure::freeze_while_faulting, threads)
    );
    println!(
        "| punch hole of one mapped page: idle file (column 1), while {threads} threads allocate in it (column 2) | {} | {} | |",
        latency(measure::punch_while_faulting, 0),
        latency(measure::punch_while_faulting, threads)
    );
}
