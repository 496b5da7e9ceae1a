//! Prints the gmem benchmark table (markdown), every row measured side by
//! side in one run: `cargo run --release -p gmem --example bench_table`.
//! Numbers are medians of several rounds; the ratios compare rows measured
//! in the same round. Do not trust it while other work loads the machine.

use std::time::Duration;

#[path = "../benches/measure.rs"]
mod measure;

use measure::Allocation;

const ROUNDS: usize = 7;

fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

fn nanoseconds(duration: Duration, iterations: u64) -> f64 {
    duration.as_nanos() as f64 / iterations as f64
}

fn main() {
    let threads = std::thread::available_parallelism().map_or(2, |count| count.get().max(2));
    let file = measure::populated_file();
    println!("| measurement | 1 thread | {threads} threads | target |");
    println!("| --- | --- | --- | --- |");

    let present = |threads| {
        median(
            (0..ROUNDS)
                .map(|_| {
                    nanoseconds(
                        measure::get_folio_present(&file, threads, 2_000_000),
                        2_000_000,
                    )
                })
                .collect(),
        )
    };
    println!(
        "| get_folio, present page | {:.1} ns | {:.1} ns | < 20 ns |",
        present(1),
        present(threads)
    );

    let mut missing = Vec::new();
    for count in [1, threads] {
        let iterations = 8_000;
        let mut rounds = Vec::new();
        for _ in 0..ROUNDS {
            let with = nanoseconds(
                measure::allocate_missing(Allocation::GetFolio, count, iterations),
                iterations,
            );
            let without = nanoseconds(
                measure::allocate_missing(
                    Allocation::GetFolioWithoutFreezeCheck,
                    count,
                    iterations,
                ),
                iterations,
            );
            let bare = nanoseconds(
                measure::allocate_missing(Allocation::BareFallocate, count, iterations),
                iterations,
            );
            rounds.push((with, without, bare));
        }
        let with = median(rounds.iter().map(|round| round.0).collect());
        let without = median(rounds.iter().map(|round| round.1).collect());
        let bare = median(rounds.iter().map(|round| round.2).collect());
        let versus_bare = median(rounds.iter().map(|round| round.0 / round.2).collect());
        let check_cost = median(
            rounds
                .iter()
                .map(|round| (round.0 / round.1 - 1.0) * 100.0)
                .collect(),
        );
        missing.push((with, without, bare, versus_bare, check_cost));
    }
    let row =
        |name: &str, pick: fn(&(f64, f64, f64, f64, f64)) -> f64, unit: &str, target: &str| {
            println!(
                "| {name} | {:.2}{unit} | {:.2}{unit} | {target} |",
                pick(&missing[0]),
                pick(&missing[1])
            );
        };
    row(
        "get_folio, missing page (allocates)",
        |m| m.0 / 1000.0,
        " µs",
        "",
    );
    row(
        "bare fallocate(KEEP_SIZE) of one page, memfd",
        |m| m.2 / 1000.0,
        " µs",
        "",
    );
    row(
        "get_folio missing / bare fallocate",
        |m| m.3,
        "x",
        "<= 1.1x",
    );
    row(
        "fault path built without the freeze check",
        |m| m.1 / 1000.0,
        " µs",
        "",
    );
    row(
        "cost of the freeze check on the fault path",
        |m| m.4,
        " %",
        "< 2 %",
    );

    let freeze = |faulting| {
        median(
            (0..ROUNDS)
                .map(|_| nanoseconds(measure::freeze_while_faulting(faulting, 200), 200) / 1000.0)
                .collect(),
        )
    };
    println!(
        "| freeze(true) latency, idle / while {threads} threads fault | {:.1} µs | {:.1} µs | |",
        freeze(0),
        freeze(threads)
    );
}
