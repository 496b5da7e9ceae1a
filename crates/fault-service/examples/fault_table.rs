//! Prints the fault-service cost table (markdown), the three rows measured
//! side by side in each of several rounds (medians):
//! `cargo run --release -p fault-service --example fault_table`.

#[path = "../benches/measure.rs"]
mod measure;

use measure::FirstTouch;

const ROUNDS: usize = 7;
const TOUCHES: u64 = 16_384;

fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

fn main() {
    let mut rounds = Vec::new();
    for _ in 0..ROUNDS {
        let per_touch =
            |kind| measure::first_touch(kind, TOUCHES).as_nanos() as f64 / TOUCHES as f64 / 1000.0;
        rounds.push((
            per_touch(FirstTouch::ThroughService),
            per_touch(FirstTouch::Plain),
            per_touch(FirstTouch::Fallocate),
        ));
    }
    let service = median(rounds.iter().map(|round| round.0).collect());
    let plain = median(rounds.iter().map(|round| round.1).collect());
    let fallocate = median(rounds.iter().map(|round| round.2).collect());
    let ratio = median(rounds.iter().map(|round| round.0 / round.1).collect());
    println!("| first touch of a 4 KiB page | µs per page | vs plain first touch | target |");
    println!("| --- | --- | --- | --- |");
    println!(
        "| through the fault service (userfaultfd → get_folio → wake) | {service:.2} | {ratio:.2}x | <= 1.5x |"
    );
    println!("| plain first touch of a memfd mapping | {plain:.2} | 1.00x | |");
    println!(
        "| fallocate(KEEP_SIZE) of the page, no touch | {fallocate:.2} | {:.2}x | |",
        fallocate / plain
    );
}
