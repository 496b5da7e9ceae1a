//! Benchmark: preserve + freeze + handover + retrieve of populated guest
//! memory (a `gmem::GuestMemFile`, memfd or hugetlb backend, every folio
//! present) per transport, side by side with copying the same memory out to a
//! file and back (what a snapshot/restore does). Prints one table.
//!
//! ```text
//! cargo run --release -p liveupdate --example handover_bench -- \
//!     [--sizes 1,4] [--with-16g] [--backends memfd,hugetlb] [--repeat 3] [--copy-dir /dev/shm]
//! ```
//!
//! The measurement is `liveupdate::bench` (feature `bench`), shared with
//! `gmemctl bench`; its documentation says what each column spans. This
//! program plays the role processes too (its first argument names the
//! role). Medians of `--repeat` runs.
//!
//! Columns: preserve, handover, retrieve, total, blackout, copy (out + in),
//! and copy / total.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use gmem::Backend;
use gmem::hugetlb::HugePageReservation;
use liveupdate::bench::{
    HandoverBench, Launcher, Times, Transport, copy_baseline, is_role, run_role,
};

const GIB: u64 = 1 << 30;

fn argument(name: &str) -> Option<String> {
    let arguments: Vec<String> = std::env::args().collect();
    let position = arguments.iter().position(|argument| argument == name)?;
    arguments.get(position + 1).cloned()
}

fn flag(name: &str) -> bool {
    std::env::args().any(|argument| argument == name)
}

fn main() -> anyhow::Result<()> {
    let arguments: Vec<String> = std::env::args().skip(1).collect();
    let launcher = Launcher::current_exe(Vec::<String>::new())?;
    match arguments.first() {
        Some(role) if is_role(role) => Ok(run_role(&arguments, &launcher)?),
        _ => {
            // The hugetlb rows raise the huge page pool; a Ctrl-C must not
            // leave it raised.
            gmem::hugetlb::give_back_when_ended_by_signal()?;
            run_all(launcher)
        }
    }
}

fn median(mut values: Vec<Duration>) -> Duration {
    values.sort_unstable();
    values.get(values.len() / 2).copied().unwrap_or_default()
}

fn median_times(runs: &[Times]) -> Times {
    Times {
        preserve: median(runs.iter().map(|times| times.preserve).collect()),
        handover: median(runs.iter().map(|times| times.handover).collect()),
        retrieve: median(runs.iter().map(|times| times.retrieve).collect()),
        blackout: median(runs.iter().map(|times| times.blackout).collect()),
    }
}

fn milliseconds(duration: Duration) -> String {
    format!("{:.3}", duration.as_secs_f64() * 1e3)
}

fn run_all(launcher: Launcher) -> anyhow::Result<()> {
    let sizes: Vec<u64> = argument("--sizes")
        .unwrap_or_else(|| "1,4".to_owned())
        .split(',')
        .map(|size| size.parse::<u64>().map(|gib| gib * GIB))
        .collect::<Result<_, _>>()?;
    let backends_argument = argument("--backends").unwrap_or_else(|| "memfd,hugetlb".to_owned());
    let backends = backends_argument
        .split(',')
        .map(|name| match name {
            "memfd" => Ok(Backend::Memfd),
            "hugetlb" => Ok(Backend::Hugetlb),
            other => anyhow::bail!("unknown backend {other}"),
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let repeat: usize = argument("--repeat").map_or(Ok(3), |text| text.parse())?;
    let copy_directory =
        PathBuf::from(argument("--copy-dir").unwrap_or_else(|| "/dev/shm".to_owned()));
    std::fs::create_dir_all(&copy_directory)?;
    let bench = HandoverBench::start(launcher)?;

    let mut configurations: Vec<(Backend, u64)> = Vec::new();
    for backend in &backends {
        for size in &sizes {
            configurations.push((*backend, *size));
        }
    }
    if flag("--with-16g") {
        configurations.push((Backend::Memfd, 16 * GIB));
    }
    println!(
        "| backend | size | transport | preserve ms | handover ms | retrieve ms | total ms | blackout ms | copy out+in ms | copy / total |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for (backend, size) in configurations {
        let _reservation = if backend == Backend::Hugetlb {
            match HugePageReservation::for_bytes(size) {
                Ok(reservation) => Some(reservation),
                Err(error) => {
                    println!(
                        "| hugetlb | {} GiB | (all) | not measured: {error} |||||||",
                        size / GIB
                    );
                    continue;
                }
            }
        } else {
            None
        };
        // Copying 16 GiB needs the memory twice (memfd and page cache): more
        // than this machine has.
        let copy = if size <= 4 * GIB {
            let runs: Vec<Duration> = (0..repeat)
                .map(|_| copy_baseline(backend, size, &copy_directory))
                .collect::<Result<_, _>>()
                .context("copy baseline")?;
            Some(median(runs))
        } else {
            None
        };
        for transport in Transport::ALL {
            let runs: Vec<Times> = (0..repeat)
                .map(|_| bench.run(transport, backend, size))
                .collect::<Result<_, _>>()
                .with_context(|| format!("{} handover", transport.name()))?;
            let times = median_times(&runs);
            let (copy_text, ratio) = match copy {
                Some(copy) => (
                    milliseconds(copy),
                    format!("{:.0}x", copy.as_secs_f64() / times.total().as_secs_f64()),
                ),
                None => ("not measured (RAM)".to_owned(), "-".to_owned()),
            };
            println!(
                "| {backend} | {} GiB | {} | {} | {} | {} | {} | {} | {copy_text} | {ratio} |",
                size / GIB,
                transport.name(),
                milliseconds(times.preserve),
                milliseconds(times.handover),
                milliseconds(times.retrieve),
                milliseconds(times.total()),
                milliseconds(times.blackout),
            );
        }
    }
    Ok(())
}
