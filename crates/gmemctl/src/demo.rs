//! `gmemctl demo`: a real guest keeps running while its monitor is
//! live-updated, in every handover mode, with a summary of what each update
//! cost the host and the guest.
//!
//! The controller is `vmm::live::controller`; every VMM process is this
//! same binary started as `gmemctl vmm ...` (a hidden subcommand). Where
//! /dev/kvm cannot be opened (or with `--no-kvm`) the same workload runs on
//! host threads through the fault service instead, and says so.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use anyhow::{Context, bail};
use vmm::live::controller::{DemoConfig, DemoEvent, DemoReport, Outcome, run_demo};
use vmm::live::handler::HandlerChoice;
use vmm::live::{BackendChoice, Injection, Mode};

/// Arguments of `gmemctl demo`.
#[derive(Debug, clap::Args)]
pub struct Arguments {
    /// Guest memory (bytes, or with a K, M or G suffix).
    #[arg(long, default_value = "2G", value_parser = parse_size)]
    size: u64,
    /// vCPUs.
    #[arg(long, default_value_t = 2)]
    vcpus: u32,
    /// Where guest memory lives: memfd (first touches served by the fault
    /// service), hugetlb (2 MiB pages, served too) or kvm (a KVM
    /// guest_memfd, allocated in full).
    #[arg(long, value_enum, default_value_t = BackendChoice::Memfd)]
    backend: BackendChoice,
    /// Number of live updates.
    #[arg(long, default_value_t = 3)]
    updates: u32,
    /// Modes, used in turn.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "exec,transfer,luod"
    )]
    modes: Vec<Mode>,
    /// Transfer: do not prefault the new VM before the switch (the guest
    /// then crawls after it while its shadow page tables are rebuilt).
    #[arg(long)]
    no_prefault: bool,
    /// How long the guest runs before the first update and between two (ms).
    #[arg(long, default_value_t = 2000)]
    interval_ms: u64,
    /// How long each successor watches the guest's recovery (ms).
    #[arg(long, default_value_t = 1000)]
    recovery_window_ms: u64,
    /// Allocate all guest memory before the boot, so the guest runs on fully
    /// populated memory (no first touches, nothing parks).
    #[arg(long)]
    prefill: bool,
    /// Let the guest run frozen before each stop until its vCPUs park in
    /// faults, for at most this many ms (shows the parked-vCPU step).
    #[arg(long, default_value_t = 0)]
    frozen_hold_ms: u64,
    /// The guest-memory file handler: cached (describes the file at
    /// preserve, outside the blackout) or builtin (liveupdate's, which
    /// walks the page index at the handover and at a transfer retrieve).
    #[arg(long, value_enum, default_value_t = HandlerChoice::Cached)]
    handler: HandlerChoice,
    /// Print the report as JSON on stdout (progress still goes to stderr).
    #[arg(long)]
    json: bool,
    /// Run the workload on host threads even where KVM is available.
    #[arg(long)]
    no_kvm: bool,
    /// Inject a fault into an update, as UPDATE:FAULT (tests).
    #[arg(long, hide = true, value_parser = parse_injection)]
    inject: Vec<(u32, Injection)>,
}

fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (digits, shift) = match text.chars().last() {
        Some('K' | 'k') => (&text[..text.len() - 1], 10),
        Some('M' | 'm') => (&text[..text.len() - 1], 20),
        Some('G' | 'g') => (&text[..text.len() - 1], 30),
        _ => (text, 0),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|value| value.checked_mul(1 << shift))
        .filter(|bytes| *bytes > 0)
        .ok_or_else(|| format!("{text:?} is not a size (like 512M or 2G)"))
}

fn parse_injection(text: &str) -> Result<(u32, Injection), String> {
    let (update, fault) = text
        .split_once(':')
        .ok_or_else(|| format!("{text:?} is not UPDATE:FAULT"))?;
    let update = update
        .parse()
        .map_err(|_| format!("{update:?} is not an update number"))?;
    let fault = <Injection as clap::ValueEnum>::from_str(fault, true)?;
    Ok((update, fault))
}

/// Why KVM cannot be used, if it cannot.
fn kvm_missing() -> Option<String> {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => None,
        Err(error) => Some(format!("/dev/kvm cannot be opened ({error})")),
    }
}

/// Runs `gmemctl demo`.
pub fn run(arguments: Arguments) -> anyhow::Result<()> {
    if arguments.modes.is_empty() {
        bail!("--modes needs at least one mode");
    }
    let no_kvm = match (arguments.no_kvm, kvm_missing()) {
        (true, _) => Some("--no-kvm was given".to_owned()),
        (false, missing) => missing,
    };
    if let Some(reason) = &no_kvm {
        eprintln!(
            "NO KVM: {reason}: running the same workload on host threads through the fault service"
        );
    }
    let program = std::env::current_exe().context("finding this executable")?;
    let config = DemoConfig {
        size: arguments.size,
        vcpus: arguments.vcpus,
        backend: arguments.backend,
        updates: arguments.updates,
        modes: arguments.modes.clone(),
        prefault: !arguments.no_prefault,
        interval: Duration::from_millis(arguments.interval_ms),
        recovery_window: Duration::from_millis(arguments.recovery_window_ms),
        injections: arguments.inject.clone(),
        program,
        leading: vec!["vmm".into()],
        host_threads: no_kvm.is_some(),
        prefill: arguments.prefill,
        frozen_hold_ms: arguments.frozen_hold_ms,
        handler: arguments.handler,
    };
    describe_start(&config);
    let mut display = Display::new();
    let report =
        run_demo(&config, &mut |event| display.show(&event)).map_err(anyhow::Error::msg)?;
    display.clear();
    if arguments.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_summary(&report);
    }
    if !report.problems.is_empty() {
        bail!("the demo found {} problem(s)", report.problems.len());
    }
    Ok(())
}

fn describe_start(config: &DemoConfig) {
    let modes: Vec<String> = config.modes.iter().map(Mode::to_string).collect();
    eprintln!(
        "gmemctl demo: {} MiB guest, {} vCPUs, {:?} backend{}, {} live updates ({}), transfer prefault {}",
        config.size >> 20,
        config.vcpus,
        config.backend,
        if config.host_threads {
            " on HOST THREADS (no KVM)"
        } else {
            " in KVM"
        },
        config.updates,
        modes.join(", "),
        if config.prefault { "on" } else { "off" },
    );
}

/// The progress display: one line rewritten in place on a terminal, a line
/// per event otherwise.
struct Display {
    terminal: bool,
    dirty: bool,
}

impl Display {
    fn new() -> Self {
        Self {
            terminal: std::io::stderr().is_terminal(),
            dirty: false,
        }
    }

    fn line(&mut self, text: &str, transient: bool) {
        let mut stderr = std::io::stderr();
        if self.terminal {
            let _ = write!(stderr, "\r\x1b[2K{text}");
            if !transient {
                let _ = writeln!(stderr);
            }
            self.dirty = transient;
        } else if !transient {
            let _ = writeln!(stderr, "{text}");
        }
        let _ = stderr.flush();
    }

    fn clear(&mut self) {
        if self.terminal && self.dirty {
            let _ = write!(std::io::stderr(), "\r\x1b[2K");
        }
    }

    fn show(&mut self, event: &DemoEvent<'_>) {
        match event {
            DemoEvent::Hello { generation, pid } => {
                self.line(
                    &format!("  VMM generation {generation} running (pid {pid})"),
                    false,
                );
            }
            DemoEvent::Progress(progress) => {
                let populated = progress.populated_pages * 100 / progress.total_pages.max(1);
                self.line(
                    &format!(
                        "  gen {} | {} iterations | {} pages verified | {} mismatches | memory {}% populated | faults served {} parked now {}",
                        progress.generation,
                        progress.iterations,
                        progress.pages_verified,
                        progress.mismatches + progress.register_mismatches,
                        populated,
                        progress.faults.served,
                        progress.faults.parked_now,
                    ),
                    true,
                );
            }
            DemoEvent::UpdateStarted { update, mode } => {
                self.line(&format!("  update {update}: {mode} ..."), false);
            }
            DemoEvent::UpdateEnded(row) => {
                let text = match &row.outcome {
                    Outcome::Completed => format!(
                        "  update {} ({}): host blackout {} ms, guest gap {} ms",
                        row.update,
                        row.mode,
                        milliseconds(row.derived.host_blackout),
                        milliseconds(row.derived.guest_gap),
                    ),
                    Outcome::Aborted { error, .. } => format!(
                        "  update {} ({}): aborted, the guest runs on in the old VMM: {error}",
                        row.update, row.mode
                    ),
                    Outcome::Failed { error } => {
                        format!("  update {} ({}): FAILED: {error}", row.update, row.mode)
                    }
                };
                self.line(&text, false);
            }
            DemoEvent::Finishing => {
                self.line(
                    "  final check: the guest verifies every page, then the host",
                    false,
                );
            }
        }
    }
}

/// Runs one VMM process (`gmemctl vmm`, started by the demo and by its
/// VMMs); exits with its status.
pub fn vmm_process(arguments: &vmm::live::VmmArgs) -> anyhow::Result<()> {
    vmm::live::init_logging();
    let launcher = vmm::live::Launcher {
        program: std::env::current_exe().context("finding this executable")?,
        leading: vec!["vmm".into()],
        control: arguments.control.clone(),
    };
    std::process::exit(vmm::live::run(arguments, &launcher));
}

fn milliseconds(duration: Option<Duration>) -> String {
    duration.map_or_else(
        || "-".into(),
        |duration| format!("{:.3}", duration.as_secs_f64() * 1e3),
    )
}

fn print_summary(report: &DemoReport) {
    println!();
    println!(
        "Live updates of a {} MiB, {}-vCPU guest ({} backend, {}); times in ms; load average {:.2} before, {:.2} after",
        report.size >> 20,
        report.vcpus,
        report.backend,
        if report.kvm {
            "KVM"
        } else {
            "HOST THREADS, no KVM"
        },
        report.load_before[0],
        report.load_after[0],
    );
    print!("{}", report.table());
    println!(
        "host blk: last vCPU stop to first vCPU entry; guest gap: the longest gap the guest's own loop saw (TSC); from kick: that gap less the time the vCPU had not run before the kick (parked on a frozen fault, or waiting for a host CPU); recovery: until the guest runs at 90% of its former rate; start->fin: successor start (or exec) to finish; parked: faults parked in the old VMM while frozen; served: of those, pages present in the successor afterwards; unserved: must be 0"
    );
    if let Some(done) = &report.final_check {
        let verified: u64 = done.guest.iter().map(|vcpu| vcpu.final_verified).sum();
        println!(
            "final check: the guest verified {verified} pages, the host {} pages ({} mismatches); {} of {} MiB populated; memory frozen at the end: {}",
            done.pages.pages_checked,
            done.pages.mismatches,
            (done.populated_pages * 4096) >> 20,
            report.size >> 20,
            done.frozen,
        );
    }
    if report.problems.is_empty() {
        println!("PASS: no mismatch, every parked fault served, every gap measured, no fd leaked");
    } else {
        for problem in &report.problems {
            println!("FAIL: {problem}");
        }
    }
}
