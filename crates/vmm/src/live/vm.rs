//! The guest as one VMM process holds it: memory, machine, monitor, trace.
//!
//! The guest's CPUs are vCPUs in KVM or, where there is no KVM, host threads
//! running the same workload ([`crate::host_cpus`]).
//!
//! Invariant: `cpus` is `Some` whenever control is back in the process's
//! main loop; an update takes it out and either hands the guest over (the
//! process then ends) or puts the CPUs back running.

use std::sync::Arc;
use std::time::Duration;

use gmem::{Backend, FallocMode};

use super::process::VmmArgs;

use super::report::{FinalReport, Progress};
use crate::backing::Backing;
use crate::error::{Result, VmmError};
use crate::guest::{
    GuestMonitor, GuestOptions, GuestReport, GuestSetup, check_pages, request_final_check,
};
use crate::host_cpus::HostCpus;
use crate::layout::{DATA_BASE, GuestLayout};
use crate::machine::{Machine, MachineConfig, RunningMachine};
use crate::measure::TraceCollector;
use crate::memory::GuestMemory;
use crate::vcpu::{ExitHandler, VcpuEnd};

/// How long the guest's final self-check may take: it verifies every page
/// it wrote (8 GiB at about 1 GiB/s here), with room for a loaded machine.
const FINAL_CHECK_TIMEOUT: Duration = Duration::from_secs(120);

/// What runs the guest.
pub(crate) enum Cpus {
    /// vCPUs in a KVM VM.
    Kvm(RunningMachine),
    /// The workload on host threads.
    Threads(HostCpus),
}

impl Cpus {
    /// Stops the CPUs where the guest is abandoned (its controller is gone).
    pub(crate) fn abandon(self) {
        match self {
            Cpus::Kvm(running) => {
                let _ = running.stop(Duration::from_secs(5));
            }
            Cpus::Threads(threads) => {
                let _ = threads.stop(Duration::from_secs(5));
            }
        }
    }
}

/// The guest in this process.
pub(crate) struct LiveVm {
    pub(crate) generation: u32,
    // Field order: the CPUs (vCPU threads, VM) go before the memory.
    pub(crate) cpus: Option<Cpus>,
    pub(crate) monitor: Arc<GuestMonitor>,
    pub(crate) collector: TraceCollector,
    pub(crate) layout: GuestLayout,
    /// The guest TSC's frequency (kHz), to turn its ticks into time.
    pub(crate) tsc_khz: u32,
    /// Whether the CPUs are host threads (no KVM).
    pub(crate) host_threads: bool,
    pub(crate) backing: Backing,
}

/// The exit handler of a guest in `memory` with `layout`.
pub(crate) fn monitor_for(memory: &Arc<GuestMemory>, layout: GuestLayout) -> Arc<GuestMonitor> {
    Arc::new(GuestMonitor::new(layout, Arc::clone(memory)))
}

impl LiveVm {
    /// A first boot: memory file, fault service, VM (or host threads),
    /// guest program.
    ///
    /// # Errors
    /// Those of [`Backing::create`], [`Machine::create`], [`Machine::boot`]
    /// and [`Machine::start`], or [`HostCpus::start`]; ENOMEM/ENOSPC from
    /// the prefill.
    pub(crate) fn boot(args: &VmmArgs) -> Result<Self> {
        let (size, vcpus, host_threads) = (args.size, args.vcpus, args.host_threads);
        let backing = Backing::create(size, Backend::from(args.backend))?;
        // The fixed area below the data pages (page tables, program,
        // control blocks, stacks, trace rings) is the monitor's own layout:
        // allocate it now, so that only the guest's data pages are ever
        // first-touched (and parked) later.
        let fixed = if args.prefill {
            size
        } else {
            DATA_BASE.min(size)
        };
        backing
            .file()
            .fallocate(FallocMode::ALLOCATE, 0, fixed as i64)
            .map_err(|error| VmmError::MemoryFile {
                operation: "allocate the guest's fixed area",
                errno: error.errno(),
            })?;
        let memory = Arc::clone(backing.memory());
        let (cpus, layout, tsc_khz) = if host_threads {
            let layout = GuestLayout::new(size, vcpus)?;
            GuestSetup {
                layout,
                options: GuestOptions::default(),
            }
            .write(memory.view())?;
            let khz = crate::host_cpus::tsc_khz();
            (
                Cpus::Threads(HostCpus::start(&memory, layout)?),
                layout,
                khz,
            )
        } else {
            let mut machine = Machine::create(Arc::clone(&memory), MachineConfig { vcpus })?;
            machine.boot(GuestOptions::default())?;
            let layout = *machine.layout();
            let handler: Arc<dyn ExitHandler> = monitor_for(&memory, layout);
            let khz = machine.tsc_khz();
            (Cpus::Kvm(machine.start(handler)?), layout, khz)
        };
        Ok(Self {
            generation: 0,
            cpus: Some(cpus),
            monitor: monitor_for(&memory, layout),
            collector: TraceCollector::new(vcpus),
            layout,
            tsc_khz,
            host_threads,
            backing,
        })
    }

    /// Whether the guest runs in KVM (false: on host threads).
    pub(crate) fn in_kvm(&self) -> bool {
        !self.host_threads
    }

    /// The guest memory view.
    pub(crate) fn memory(&self) -> &Arc<GuestMemory> {
        self.backing.memory()
    }

    /// Every vCPU's control block.
    pub(crate) fn guest_reports(&self) -> Result<Vec<GuestReport>> {
        (0..self.layout.vcpus())
            .map(|vcpu| GuestReport::read(self.memory().view(), &self.layout, vcpu))
            .collect()
    }

    /// The counters now.
    pub(crate) fn progress(&self) -> Progress {
        let file = self.backing.file();
        Progress {
            populated_pages: file.populated_count() * file.folio_size() / gmem::PAGE_SIZE,
            ..self.progress_light()
        }
    }

    /// The counters now, without the populated page count (which walks the
    /// file's page index: milliseconds per GiB, too slow for a blackout).
    pub(crate) fn progress_light(&self) -> Progress {
        let reports = self.guest_reports().unwrap_or_default();
        let sum = |field: fn(&GuestReport) -> u64| reports.iter().map(field).sum();
        let file = self.backing.file();
        Progress {
            generation: self.generation,
            iterations: sum(|report| report.iterations),
            pages_written: sum(|report| report.pages_written),
            pages_verified: sum(|report| report.pages_verified),
            mismatches: sum(|report| report.mismatches),
            register_mismatches: sum(|report| report.register_mismatches),
            populated_pages: 0,
            total_pages: file.pages(),
            faults: self.backing.fault_counters().into(),
            frozen: file.is_frozen(),
        }
    }

    /// Reads the guest's trace rings (call a few times a second: a ring
    /// holds about a second of a guest at full speed).
    pub(crate) fn poll_trace(&mut self) {
        if let Err(error) = self
            .collector
            .poll(self.backing.memory().view(), &self.layout)
        {
            tracing::warn!(%error, "cannot read the guest's trace rings");
        }
    }

    /// Asks the guest for its final self-check, waits for it, checks every
    /// page from the host and reports.
    ///
    /// # Errors
    /// - [`VmmError::StopTimeout`]: the guest did not finish its check.
    /// - [`VmmError::GuestFailed`]: a vCPU failed.
    /// - [`VmmError::GuestMemory`]: the control blocks cannot be read.
    pub(crate) fn finish(mut self) -> Result<FinalReport> {
        let cpus = self.cpus.take().ok_or(VmmError::StateMismatch {
            reason: "no running guest to finish".into(),
        })?;
        request_final_check(self.memory().view(), &self.layout)?;
        match cpus {
            Cpus::Kvm(running) => {
                let (_machine, stop) =
                    running
                        .wait_for_guest(FINAL_CHECK_TIMEOUT)
                        .map_err(|error| VmmError::StateMismatch {
                            reason: format!("the guest's final check: {}", error.error()),
                        })?;
                for (vcpu, end) in stop.ends.iter().enumerate() {
                    if !matches!(end, VcpuEnd::HandlerStopped) {
                        return Err(VmmError::StateMismatch {
                            reason: format!("vCPU {vcpu} ended its final check with {end:?}"),
                        });
                    }
                }
            }
            Cpus::Threads(threads) => {
                if !threads.wait_finished(FINAL_CHECK_TIMEOUT) {
                    return Err(VmmError::StateMismatch {
                        reason: "the host threads did not finish their final check".into(),
                    });
                }
            }
        }
        let file = self.backing.file();
        Ok(FinalReport {
            generation: self.generation,
            guest: self.guest_reports()?,
            pages: check_pages(self.memory().view(), &self.layout)?,
            frozen: file.is_frozen(),
            faults: self.backing.fault_counters().into(),
            populated_pages: file.populated_count() * file.folio_size() / gmem::PAGE_SIZE,
        })
    }
}
