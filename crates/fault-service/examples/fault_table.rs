//! Prints the fault-service cost table (markdown), the five rows measured
//! side by side in each of 11 rounds (median and min–max over rounds):
//! `cargo run --release -p fault-service --example fault_table`.
//! The measurement is `fault_service::bench` (feature `bench`), shared with
//! the criterion benchmark and `gmemctl bench`.

use fault_service::bench::{self as measure, FirstTouch};
use gmem::bench::spread;

const ROUNDS: usize = 11;
const TOUCHES: u64 = 16_384;

fn main() {
    let mut rounds = Vec::new();
    for _ in 0..ROUNDS {
        let per_touch = |kind| {
            let elapsed = measure::first_touch(kind, TOUCHES).expect("first touch");
            elapsed.as_nanos() as f64 / TOUCHES as f64 / 1000.0
        };
        rounds.push((
            per_touch(FirstTouch::ThroughService),
            per_touch(FirstTouch::ThroughServiceOnOneCpu),
            per_touch(FirstTouch::Plain),
            per_touch(FirstTouch::Fallocate),
            per_touch(FirstTouch::InThreadFloor),
        ));
    }
    let column =
        |pick: fn(&(f64, f64, f64, f64, f64)) -> f64| rounds.iter().map(pick).collect::<Vec<f64>>();
    println!("| first touch of a 4 KiB page | µs per page | vs plain first touch | target |");
    println!("| --- | --- | --- | --- |");
    println!(
        "| through the fault service (userfaultfd → get_folio → wake) | {} | {} | <= 1.5x |",
        spread(column(|round| round.0), ""),
        spread(column(|round| round.0 / round.2), "x")
    );
    println!(
        "| the same, toucher and handler on one CPU | {} | {} | <= 1.5x |",
        spread(column(|round| round.1), ""),
        spread(column(|round| round.1 / round.2), "x")
    );
    println!(
        "| floor of userfaultfd: the toucher serves its own fault (SIGBUS mode: get_folio + MADV_POPULATE_WRITE in its handler) | {} | {} | |",
        spread(column(|round| round.4), ""),
        spread(column(|round| round.4 / round.2), "x")
    );
    println!(
        "| plain first touch of a memfd mapping | {} | 1.00x | |",
        spread(column(|round| round.2), "")
    );
    println!(
        "| fallocate(KEEP_SIZE) of the page, no touch | {} | {} | |",
        spread(column(|round| round.3), ""),
        spread(column(|round| round.3 / round.2), "x")
    );
}
