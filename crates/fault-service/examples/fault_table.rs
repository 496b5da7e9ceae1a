//! Prints the fault-service cost table (markdown), the six rows measured
//! side by side in each of 11 rounds (median and min–max over rounds):
//! `cargo run --release -p fault-service --example fault_table`.
//! The measurement is `fault_service::bench` (feature `bench`), shared with
//! the criterion benchmark and `gmemctl bench`.

use fault_service::bench::{self as measure, FirstTouch};
use gmem::bench::spread;

const ROUNDS: usize = 11;
const TOUCHES: u64 = 16_384;

/// The rows in table order: the kind, its label, its target.
const ROWS: [(FirstTouch, &str, &str); 6] = [
    (
        FirstTouch::ThroughService,
        "through the fault service (userfaultfd → get_folio → wake)",
        "<= 1.5x",
    ),
    (
        FirstTouch::ThroughServiceOnOneCpu,
        "the same, toucher and handler on one CPU",
        "<= 1.5x",
    ),
    (
        FirstTouch::InThreadFloor,
        "floor of userfaultfd: the toucher serves its own fault (SIGBUS mode: get_folio + MADV_POPULATE_WRITE in its handler)",
        "",
    ),
    (
        FirstTouch::InThreadZeropage,
        "kernel's lower bound: the same with one UFFDIO_ZEROPAGE instead of get_folio (bypasses gmem; never a service)",
        "",
    ),
    (
        FirstTouch::Plain,
        "plain first touch of a memfd mapping",
        "",
    ),
    (
        FirstTouch::Fallocate,
        "fallocate(KEEP_SIZE) of the page, no touch",
        "",
    ),
];

/// The row every ratio divides by.
const PLAIN: usize = 4;

fn main() {
    // rounds[round][row]: µs per first touch.
    let rounds: Vec<[f64; 6]> = (0..ROUNDS)
        .map(|_| {
            ROWS.map(|(kind, _, _)| {
                let elapsed = measure::first_touch(kind, TOUCHES).expect("first touch");
                elapsed.as_nanos() as f64 / TOUCHES as f64 / 1000.0
            })
        })
        .collect();
    println!("| first touch of a 4 KiB page | µs per page | vs plain first touch | target |");
    println!("| --- | --- | --- | --- |");
    for (row, (_, label, target)) in ROWS.iter().enumerate() {
        let times = rounds.iter().map(|round| round[row]).collect();
        let ratio = if row == PLAIN {
            "1.00x".to_owned()
        } else {
            spread(
                rounds
                    .iter()
                    .map(|round| round[row] / round[PLAIN])
                    .collect(),
                "x",
            )
        };
        println!("| {label} | {} | {ratio} | {target} |", spread(times, ""));
    }
}
