//! Live-update benchmark: blackout, guest-seen gap, recovery and handover
//! time of each mode at each guest size, with guest memory fully populated
//! (allocated before the boot), next to what copying the same memory out
//! to a snapshot file and back in costs here. Prints one table per size.
//!
//! ```sh
//! cargo run --release -p vmm --example live_bench -- --sizes-gib 2,8 --updates 5
//! ```
//!
//! Timings depend on what else runs: the table header gives the load
//! average before and after each run; run it on a quiet machine.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use vmm::live::controller::{DemoConfig, DemoReport, Outcome, load_average, run_demo};
use vmm::live::handler::HandlerChoice;
use vmm::live::{BackendChoice, Launcher, Mode, VmmArgs};

#[derive(Debug, Parser)]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Internal>,
    #[command(flatten)]
    bench: BenchArgs,
}

#[derive(Debug, Subcommand)]
enum Internal {
    /// A VMM process of a run (this program starts itself as its VMMs).
    #[command(hide = true)]
    Vmm(VmmArgs),
}

#[derive(Debug, clap::Args)]
struct BenchArgs {
    /// Guest sizes in GiB.
    #[arg(long, value_delimiter = ',', default_value = "2,8")]
    sizes_gib: Vec<u64>,
    /// Updates per mode and size.
    #[arg(long, default_value_t = 5)]
    updates: u32,
    /// Transfer updates with the prefault (slow: the prefault walks all of
    /// guest memory in the new VM).
    #[arg(long, default_value_t = 3)]
    prefault_updates: u32,
    /// vCPUs.
    #[arg(long, default_value_t = 2)]
    vcpus: u32,
    /// Backend of guest memory.
    #[arg(long, value_enum, default_value_t = BackendChoice::Memfd)]
    backend: BackendChoice,
    /// Skip the copying snapshot/restore measurement.
    #[arg(long)]
    skip_copy: bool,
    /// Where the copying snapshot is written.
    #[arg(long, default_value = "/tmp")]
    snapshot_dir: std::path::PathBuf,
}

/// Median, min and max of a sample, in ms.
fn summary(mut samples: Vec<Duration>) -> String {
    if samples.is_empty() {
        return "-".into();
    }
    samples.sort();
    let ms = |duration: Duration| duration.as_secs_f64() * 1e3;
    format!(
        "{:.3} ({:.3}..{:.3})",
        ms(samples[samples.len() / 2]),
        ms(samples[0]),
        ms(samples[samples.len() - 1])
    )
}

struct Variant {
    label: String,
    report: DemoReport,
}

fn run_variant(
    bench: &BenchArgs,
    size: u64,
    label: &str,
    modes: Vec<Mode>,
    updates: u32,
    prefault: bool,
    handler: HandlerChoice,
) -> anyhow::Result<Variant> {
    let config = DemoConfig {
        size,
        vcpus: bench.vcpus,
        backend: bench.backend,
        updates,
        modes,
        prefault,
        interval: Duration::from_millis(300),
        recovery_window: Duration::from_millis(if prefault { 1000 } else { 700 }),
        injections: Vec::new(),
        host_threads: false,
        prefill: true,
        frozen_hold_ms: 0,
        handler,
        program: std::env::current_exe()?,
        leading: vec![OsString::from("vmm")],
    };
    eprintln!("  {label}: {updates} updates ...");
    let report = run_demo(&config, &mut |_| {}).map_err(anyhow::Error::msg)?;
    if !report.problems.is_empty() {
        eprintln!("  {label}: problems: {:#?}", report.problems);
    }
    Ok(Variant {
        label: label.to_owned(),
        report,
    })
}

fn print_variants(variants: &[Variant]) {
    println!(
        "{:<34} {:>2} {:>26} {:>26} {:>26} {:>26} {:>26} {:>26}",
        "variant (load before/after)",
        "n",
        "host blackout ms",
        "guest gap ms",
        "guest gap from kick ms",
        "recovery to 90% ms",
        "successor start->finish ms",
        "memory frozen ms"
    );
    for variant in variants {
        for mode in [Mode::Transfer, Mode::Exec, Mode::Luod] {
            let rows: Vec<_> = variant
                .report
                .updates
                .iter()
                .filter(|row| row.mode == mode && row.outcome == Outcome::Completed)
                .collect();
            if rows.is_empty() {
                continue;
            }
            let pick = |field: fn(&vmm::live::controller::Derived) -> Option<Duration>| {
                summary(rows.iter().filter_map(|row| field(&row.derived)).collect())
            };
            let unrecovered = rows
                .iter()
                .filter(|row| row.derived.recovery.is_none())
                .count();
            let recovery = if unrecovered > 0 {
                format!(
                    "{} ({unrecovered} > window)",
                    pick(|derived| derived.recovery)
                )
            } else {
                pick(|derived| derived.recovery)
            };
            println!(
                "{:<34} {:>2} {:>26} {:>26} {:>26} {:>26} {:>26} {:>26}",
                format!(
                    "{mode} {} ({:.1}/{:.1})",
                    variant.label, variant.report.load_before[0], variant.report.load_after[0]
                ),
                rows.len(),
                pick(|derived| derived.host_blackout),
                pick(|derived| derived.guest_gap),
                pick(|derived| derived.guest_gap_from_kick),
                recovery,
                pick(|derived| derived.handover),
                pick(|derived| derived.frozen_window),
            );
        }
    }
}

/// Copies `size` bytes of populated memory out to a file (write and
/// fdatasync) and back into fresh memory (read): a copying snapshot and
/// restore of the same memory. Returns (save, restore).
fn copy_snapshot(bench: &BenchArgs, size: u64) -> anyhow::Result<(Duration, Duration)> {
    const CHUNK: usize = 4 << 20;
    // The copy moves bytes whatever the backend; a memfd needs no huge
    // page pool.
    let memory = vmm::backing::Backing::create(size, gmem::Backend::Memfd)?;
    memory
        .file()
        .fallocate(gmem::FallocMode::ALLOCATE, 0, size as i64)?;
    let view = memory.file().mapping()?;
    let mut buffer = vec![0u8; CHUNK];
    let path = bench
        .snapshot_dir
        .join(format!("gmem-lu-snapshot-{}", std::process::id()));
    let mut snapshot = std::fs::File::create(&path)?;
    let started = Instant::now();
    let mut offset = 0;
    while offset < size {
        view.read(offset, &mut buffer)?;
        snapshot.write_all(&buffer)?;
        offset += CHUNK as u64;
    }
    snapshot.sync_data()?;
    let save = started.elapsed();
    drop(memory);
    let fresh = vmm::backing::Backing::create(size, gmem::Backend::Memfd)?;
    let view = fresh.file().mapping()?;
    let mut snapshot = std::fs::File::open(&path)?;
    let started = Instant::now();
    let mut offset = 0;
    while offset < size {
        snapshot.read_exact(&mut buffer)?;
        view.write(offset, &buffer)?;
        offset += CHUNK as u64;
    }
    let restore = started.elapsed();
    std::fs::remove_file(&path)?;
    Ok((save, restore))
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(Internal::Vmm(args)) = cli.command {
        vmm::live::init_logging();
        let launcher = Launcher {
            program: std::env::current_exe()?,
            leading: vec![OsString::from("vmm")],
            control: args.control.clone(),
        };
        std::process::exit(vmm::live::run(&args, &launcher));
    }
    let bench = cli.bench;
    println!(
        "Live-update benchmark: {} vCPUs, {:?} backend, guest memory fully populated; medians (min..max); load average at the start {:.2}",
        bench.vcpus,
        bench.backend,
        load_average()[0]
    );
    for &gib in &bench.sizes_gib {
        let size = gib << 30;
        println!();
        println!("== {gib} GiB");
        if !bench.skip_copy {
            let (save, restore) = copy_snapshot(&bench, size)?;
            println!(
                "copying snapshot of the same memory (load {:.1}): save to a file (write + fdatasync) {:.1} ms, restore from it (page cache) {:.1} ms",
                load_average()[0],
                save.as_secs_f64() * 1e3,
                restore.as_secs_f64() * 1e3
            );
        }
        let mut variants = vec![run_variant(
            &bench,
            size,
            "no prefault",
            vec![Mode::Transfer, Mode::Exec, Mode::Luod],
            3 * bench.updates,
            false,
            HandlerChoice::Cached,
        )?];
        if bench.prefault_updates > 0 {
            variants.push(run_variant(
                &bench,
                size,
                "+ prefault",
                vec![Mode::Transfer],
                bench.prefault_updates,
                true,
                HandlerChoice::Cached,
            )?);
        }
        variants.push(run_variant(
            &bench,
            size,
            "builtin handler",
            vec![Mode::Transfer],
            bench.updates,
            false,
            HandlerChoice::Builtin,
        )?);
        print_variants(&variants);
    }
    Ok(())
}
