//! `gmemctl bench`: one report of every headline figure of gmem-lu, measured
//! side by side in one process on this machine, with plots.
//!
//! The measurements are the crates' own (`srcu::bench`, `gmem::bench`,
//! `fault_service::bench`, `liveupdate::bench`, each behind its crate's
//! `bench` feature), the same code their criterion benchmarks and table
//! examples run; this module only plans them (`measure`), turns the samples
//! into figures with medians, p99s and ratios to baselines (`report`),
//! draws them (`plots`) and shows progress (`progress`). What every figure
//! means is in `docs/performance.md`.
//!
//! Output: the table on stdout; with `--json` the JSON report on stdout and
//! the table on stderr (after the progress lines), so one run yields both;
//! `--json-out FILE` writes the JSON to a file as well; `--plots DIR`
//! writes the SVG plots; `--from-json FILE` measures nothing and prints (and
//! plots) a saved report. The run fails (after printing everything) if any
//! figure is not finite and positive.
//!
//! The live-update figures need fresh processes: they are this program
//! started again as `gmemctl bench -- ROLE ARGUMENTS...` (hidden), which
//! plays one side of a handover and exits.

mod measure;
mod plots;
mod progress;
mod report;

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, bail};
use liveupdate::bench::Launcher;

use measure::{Collector, Plan};
use progress::Progress;
use report::{Machine, Report};

/// Arguments of `gmemctl bench`.
#[derive(Debug, clap::Args)]
pub struct Arguments {
    /// A run under a minute: smaller guest sizes and fewer repetitions, the
    /// same figures.
    #[arg(long)]
    quick: bool,
    /// Print the report as JSON on stdout (the table goes to stderr).
    #[arg(long)]
    json: bool,
    /// Also write the JSON report to this file.
    #[arg(long, value_name = "FILE")]
    json_out: Option<PathBuf>,
    /// Write SVG plots (read_side.svg, blackout.svg, freeze_latency.svg)
    /// into this directory.
    #[arg(long, value_name = "DIR")]
    plots: Option<PathBuf>,
    /// Populated guest sizes of the live-update figures, in MiB
    /// (default 1024,2048,4096,8192; quick: 128,256). Multiples of 2 MiB.
    #[arg(long, value_name = "MIB", value_delimiter = ',')]
    sizes_mib: Option<Vec<u64>>,
    /// Where the copy baseline writes its snapshot (memory-backed is the
    /// fairest: no disk in the way).
    #[arg(long, value_name = "DIR", default_value = "/dev/shm")]
    copy_dir: PathBuf,
    /// Measure nothing: print (and plot) the report saved by an earlier
    /// `--json` or `--json-out` run.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["quick", "sizes_mib"])]
    from_json: Option<PathBuf>,
    /// Internal: play one process of a live-update measurement.
    #[arg(last = true, hide = true)]
    role: Vec<String>,
}

/// How the live-update measurement starts this program in a role.
fn launcher() -> anyhow::Result<Launcher> {
    Ok(Launcher::current_exe(["bench", "--"])?)
}

/// Runs `gmemctl bench`.
pub fn run(arguments: Arguments) -> anyhow::Result<()> {
    if !arguments.role.is_empty() {
        return Ok(liveupdate::bench::run_role(&arguments.role, &launcher()?)?);
    }
    let sizes = match &arguments.sizes_mib {
        Some(sizes) => {
            if let Some(bad) = sizes
                .iter()
                .find(|size| **size == 0 || !size.is_multiple_of(2))
            {
                bail!(
                    "--sizes-mib: {bad} is not a positive multiple of 2 MiB (the huge page size)"
                );
            }
            Some(sizes.iter().map(|size| size << 20).collect())
        }
        None => None,
    };
    prepare_outputs(&arguments)?;
    let report = match &arguments.from_json {
        Some(path) => saved_report(path)?,
        None => measure_all(&arguments, sizes)?,
    };
    emit(&arguments, &report)?;
    let problems = report.problems();
    if !problems.is_empty() {
        bail!("broken measurements:\n{}", problems.join("\n"));
    }
    Ok(())
}

fn saved_report(path: &std::path::Path) -> anyhow::Result<Report> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text)
        .with_context(|| format!("{} is not a gmemctl bench report", path.display()))
}

/// Runs every measurement of the plan; the report.
fn measure_all(arguments: &Arguments, sizes: Option<Vec<u64>>) -> anyhow::Result<Report> {
    // The hugetlb figures raise the huge page pool for minutes; a Ctrl-C,
    // a kill or a closed terminal must not leave it raised.
    gmem::hugetlb::give_back_when_ended_by_signal()
        .context("installing the handler that gives huge pages back on Ctrl-C")?;
    let plan = Plan::new(arguments.quick, sizes, arguments.copy_dir.clone());
    let load_before = load_average();
    let mut collector = Collector {
        measured: Vec::new(),
        skipped: Vec::new(),
        series: report::Series::default(),
        progress: Progress::new(plan.steps()),
    };
    let machine_backend = gmem::Backend::auto_with_reason();
    // Memory first: its heap count needs a process with no other threads.
    measure::memory_figures(&plan, &mut collector)?;
    measure::srcu_figures(&plan, &mut collector);
    measure::gmem_figures(&plan, &mut collector)?;
    measure::first_touch_figures(&plan, &mut collector)?;
    measure::handover_figures(&plan, launcher()?, &mut collector)?;
    collector.progress.finish();

    Ok(Report {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        machine: Machine {
            cores: std::thread::available_parallelism().map_or(1, usize::from),
            kernel: kernel_release(),
            backend: machine_backend.0.name().to_owned(),
            backend_reason: machine_backend.1,
            srcu_read_side: format!("{:?}", srcu::ReadSide::of_process()),
            memory_bytes: memory_total(),
            load_before,
            load_after: load_average(),
        },
        settings: plan.settings(),
        figures: report::figures(&sort_for_table(collector.measured)),
        skipped: collector.skipped,
        series: collector.series,
    })
}

/// Table order: the sections in the order of `docs/performance.md`.
fn sort_for_table(mut measured: Vec<report::Measured>) -> Vec<report::Measured> {
    const ORDER: [&str; 6] = [
        "srcu.read",
        "srcu.sync",
        "gmem.",
        "fault.",
        "lu.",
        "memory.",
    ];
    let section = |id: &str| ORDER.iter().position(|prefix| id.starts_with(prefix));
    // Stable: figures keep their measured order within a section.
    measured.sort_by_key(|figure| section(&figure.id));
    measured
}

/// Creates the directories the outputs go to, before minutes of
/// measuring, so a bad path fails at once.
fn prepare_outputs(arguments: &Arguments) -> anyhow::Result<()> {
    let json_directory = arguments
        .json_out
        .as_deref()
        .and_then(std::path::Path::parent)
        .filter(|parent| !parent.as_os_str().is_empty());
    for directory in json_directory.into_iter().chain(arguments.plots.as_deref()) {
        std::fs::create_dir_all(directory)
            .with_context(|| format!("creating {}", directory.display()))?;
    }
    Ok(())
}

/// Prints the report first (so an output that fails later loses nothing),
/// then writes the JSON file and the plots.
fn emit(arguments: &Arguments, report: &Report) -> anyhow::Result<()> {
    let json = serde_json::to_string_pretty(report).context("serializing the report")?;
    let table = report.table();
    if arguments.json {
        eprint!("{table}");
        writeln!(std::io::stdout(), "{json}").context("writing the JSON report")?;
    } else {
        write!(std::io::stdout(), "{table}").context("writing the table")?;
    }
    if let Some(path) = &arguments.json_out {
        std::fs::write(path, format!("{json}\n"))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(directory) = &arguments.plots {
        for path in plots::write_all(report, directory)? {
            eprintln!("wrote {}", path.display());
        }
    }
    Ok(())
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or_else(|_| "unknown".to_owned(), |text| text.trim().to_owned())
}

fn load_average() -> [f64; 3] {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut fields = text
        .split_whitespace()
        .map(|field| field.parse().unwrap_or(f64::NAN));
    [(); 3].map(|()| fields.next().unwrap_or(f64::NAN))
}

fn memory_total() -> u64 {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    text.lines()
        .find(|line| line.starts_with("MemTotal:"))
        .and_then(|line| line.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}
