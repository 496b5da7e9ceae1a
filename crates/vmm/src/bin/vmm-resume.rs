//! `vmm-resume`: the successor half of a live update, as a separate program.
//!
//! It is started (by exec) with two inherited file descriptors: the guest's
//! memory file and a sealed memfd holding the saved machine state. It maps
//! the memory, builds a new VM over it, restores the state, resumes the
//! guest, lets it run, optionally asks it for its final self-check, and
//! prints a JSON report of what it measured and found on stdout.

use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use vmm::guest::{
    GuestMonitor, GuestReport, PageCheck, check_pages, probed_gaps, request_final_check,
};
use vmm::machine::{BuildTimings, Machine, MachineConfig};
use vmm::memory::{GuestMemory, MemfdRam};
use vmm::state::{MachineState, StateTimings};
use vmm::vcpu::VcpuEnd;

/// Restore a saved guest from inherited file descriptors and run it.
#[derive(Debug, Parser)]
struct Options {
    /// The inherited guest memory file descriptor.
    #[arg(long)]
    memory_fd: i32,
    /// The inherited saved-state memfd.
    #[arg(long)]
    state_fd: i32,
    /// How long to let the guest run after the resume, in milliseconds.
    #[arg(long, default_value_t = 300)]
    run_ms: u64,
    /// Ask the guest to verify every page it wrote before stopping it.
    #[arg(long)]
    final_check: bool,
}

/// What the successor reports (JSON on stdout).
#[derive(Debug, serde::Serialize)]
struct Report {
    /// CLOCK_MONOTONIC ns at `main` entry (after exec).
    started_ns: u64,
    /// CLOCK_MONOTONIC ns when the first vCPU entered the guest.
    first_entry_ns: u64,
    /// Reading and validating the state record.
    read_state: Duration,
    /// Building the VM.
    build: BuildTimings,
    /// Restoring the state.
    restore: StateTimings,
    /// Per vCPU, the gap the guest saw across the update, in TSC ticks.
    guest_gaps_ticks: Vec<Option<u64>>,
    /// The guest's TSC frequency (kHz).
    tsc_khz: u32,
    /// Per vCPU, the guest's counters at the end.
    guest: Vec<GuestReport>,
    /// The host's check of the guest's pages.
    pages: PageCheck,
    /// Restarts of the guest program (must be 0: it resumes, not reboots).
    hellos: u64,
}

fn main() -> anyhow::Result<()> {
    let started_ns = vmm::time::monotonic_ns();
    let options = Options::parse();
    // SAFETY: the parent passed these descriptors open and owned by nobody
    // else in this process; each is wrapped exactly once.
    let (memory_file, state_file) = unsafe {
        (
            OwnedFd::from_raw_fd(options.memory_fd),
            OwnedFd::from_raw_fd(options.state_fd),
        )
    };
    let clock = Instant::now();
    let state = MachineState::from_fd(&state_file).context("reading the saved state")?;
    let read_state = clock.elapsed();
    let memory = Arc::new(GuestMemory::new(Arc::new(
        MemfdRam::from_file(memory_file).context("mapping guest memory")?,
    ))?);
    let vcpus = u32::try_from(state.vcpus.len())?;
    let machine =
        Machine::create(Arc::clone(&memory), MachineConfig { vcpus }).context("building the VM")?;
    let build = machine.build_timings();
    let restore = state.restore(&machine).context("restoring the state")?;
    let layout = *machine.layout();
    let monitor = Arc::new(GuestMonitor::new(layout, Arc::clone(&memory)));
    let running = machine.start(monitor.clone())?;
    std::thread::sleep(Duration::from_millis(options.run_ms));
    let first_entry = running
        .first_entries()
        .into_iter()
        .flatten()
        .min()
        .context("no vCPU entered the guest")?;
    let (_machine, stop) = if options.final_check {
        request_final_check(memory.view(), &layout)?;
        running.wait_for_guest(Duration::from_secs(30))
    } else {
        running.stop(Duration::from_secs(5))
    }
    .map_err(|error| anyhow::anyhow!("stopping the guest: {}", error.error()))?;
    for (index, end) in stop.ends.iter().enumerate() {
        if let VcpuEnd::Failed(_) | VcpuEnd::MemoryFault { .. } = end {
            bail!("vCPU {index} failed: {}", error_text(end));
        }
    }
    let report = Report {
        started_ns,
        first_entry_ns: vmm::time::instant_ns(first_entry),
        read_state,
        build,
        restore,
        guest_gaps_ticks: probed_gaps(memory.view(), &layout)?,
        tsc_khz: state.vcpus[0].tsc.khz,
        guest: (0..vcpus)
            .map(|vcpu| GuestReport::read(memory.view(), &layout, vcpu))
            .collect::<Result<_, _>>()?,
        pages: check_pages(memory.view(), &layout)?,
        hellos: monitor.hellos(),
    };
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

fn error_text(end: &VcpuEnd) -> String {
    match end {
        VcpuEnd::Failed(error) => error.to_string(),
        other => format!("{other:?}"),
    }
}
