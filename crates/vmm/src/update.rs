//! A live update of the monitor inside one process: the KVM half of every
//! handover mode, measured phase by phase.
//!
//! A successor process does exactly this after receiving the memory file
//! and the state record (exec and luod modes) or before the switch
//! (transfer mode); doing it in-process isolates the KVM costs from the
//! transport's. The new VM sees guest memory through a fresh mapping of the
//! same file, as a successor process would.
//!
//! Success path:
//! 1. (`prebuild`) map the memory file again and build the new VM, memslot
//!    and vCPUs while the guest still runs; (`populate`) fill the new
//!    mapping's page tables for all of guest memory (`MADV_POPULATE_WRITE`);
//!    (`prefault`) run the prefault program over the populated memory in
//!    the new VM, so its shadow page tables exist before the switch;
//!    The new vCPU threads are spawned then too, waiting ([`Machine::arm`]);
//! 2. kick every vCPU; each vCPU thread captures its own state as soon as
//!    it stops, in parallel (the blackout starts at the last stop);
//! 3. read the VM-wide state, encode everything into a sealed memfd and
//!    decode it back (the bytes a successor would receive);
//! 4. record each vCPU's last TSC and arm the guest's gap probe;
//! 5. (without `prebuild`) map, build and arm now, inside the blackout;
//! 6. restore: VM-wide state here, each vCPU's on its own waiting thread,
//!    in parallel, then release them into the guest (the blackout ends at
//!    the first vCPU entry); retire the old VM off the critical path.
//!
//! Failure paths (the error carries what is left of the old machine,
//! [`OldMachine`]):
//! 1. building the successor ahead fails: the old machine is still running;
//! 2. a vCPU does not stop within `stop_timeout` (blocked in a fault nobody
//!    serves): the old machine comes back running, kicked;
//! 3. anything in steps 3 to 6 fails before the new vCPUs start: the old
//!    machine comes back stopped and intact, to be started again, and the
//!    guest carries on as if nothing happened.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::{Result, VmmError};
use crate::guest::{arm_gap_probe, offsets};
use crate::layout::{DATA_BASE, GuestLayout, read_object};
use crate::machine::{
    ArmedMachine, BuildTimings, Machine, MachineConfig, RunningMachine, StopError,
};
use crate::memory::{GuestMemory, MemfdRam, populate_mapping, populated_ranges};
use crate::state::MachineState;
use crate::time::instant_ns;
use crate::vcpu::ExitHandler;

/// How to update.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UpdateOptions {
    /// Build the new VM (and its waiting vCPU threads) before stopping the
    /// old one (transfer mode).
    pub prebuild: bool,
    /// Populate the new mapping's page tables before the switch.
    pub populate: bool,
    /// Run the prefault program over the populated memory in the new VM
    /// before the switch ([`crate::prefault`]).
    pub prefault: bool,
    /// Without `prefault`: still run the prefault program over the guest's
    /// fixed low area (page tables, program, control blocks, stacks, trace
    /// rings; a few MiB), which also pays each new vCPU's first `KVM_RUN`
    /// (milliseconds on this machine's KVM) before the switch.
    pub warm_up: bool,
    /// How long to wait for the vCPUs to stop.
    pub stop_timeout: Duration,
}

impl Default for UpdateOptions {
    fn default() -> Self {
        Self {
            prebuild: true,
            populate: false,
            prefault: false,
            warm_up: true,
            stop_timeout: Duration::from_secs(5),
        }
    }
}

/// Time spent in each phase.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct UpdatePhases {
    /// Mapping the memory file again.
    pub map: Duration,
    /// Building VM, memslot and vCPUs.
    pub build: BuildTimings,
    /// Populating the new mapping's page tables.
    pub populate: Duration,
    /// Running the prefault program (or the warm-up) in the new VM.
    pub prefault: Duration,
    /// Spawning the new vCPU threads (waiting).
    pub arm: Duration,
    /// From the kick until the last vCPU stopped.
    pub stop: Duration,
    /// From the last stop until every vCPU's state and the VM's were read.
    pub capture: Duration,
    /// Encoding into a sealed memfd and decoding it back.
    pub record: Duration,
    /// Writing the state into the new VM (VM-wide, then all vCPUs in parallel).
    pub restore: Duration,
    /// From releasing the vCPU threads to the first vCPU entry.
    pub start: Duration,
}

/// What one update measured.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct UpdateReport {
    /// Per phase.
    pub phases: UpdatePhases,
    /// From the last vCPU stop to the first vCPU entry in the new VM.
    pub host_blackout: Duration,
    /// CLOCK_MONOTONIC ns of the kick.
    pub kicked_ns: u64,
    /// CLOCK_MONOTONIC ns of the first entry in the new VM.
    pub resumed_ns: u64,
    /// Per vCPU, the guest TSC of its last iteration before the stop.
    pub stop_tsc: Vec<u64>,
    /// Bytes of the state record.
    pub record_bytes: usize,
    /// The guest TSC frequency (kHz), to turn guest ticks into time.
    pub tsc_khz: u32,
    /// The host TSC just before the kick. Comparable with `stop_tsc` only
    /// where the guest TSC is the host's (PVM; a VMX or SVM guest has an
    /// offset): then `kick_host_tsc - stop_tsc` is how long before the kick
    /// the guest last ran its loop.
    pub kick_host_tsc: u64,
}

/// Where a failed update left the old machine.
#[derive(Debug)]
pub enum OldMachine {
    /// Stopped and intact: the caller restarts it and the guest carries on.
    Stopped(Box<Machine>),
    /// Still running: some vCPUs did not stop (blocked in a fault).
    Running(Box<RunningMachine>),
    /// Gone (a vCPU thread panicked).
    Lost,
}

/// An update that failed, with what is left of the old machine.
#[derive(Debug)]
pub struct UpdateError {
    /// The old machine.
    pub old: OldMachine,
    /// What failed.
    pub error: VmmError,
}

/// The new side of an update, built before or after the stop.
struct Successor {
    machine: ArmedMachine,
    phases: UpdatePhases,
}

fn build_successor(
    old_memory: &GuestMemory,
    vcpus: u32,
    options: &UpdateOptions,
    make_handler: impl FnOnce(Arc<GuestMemory>, GuestLayout) -> Arc<dyn ExitHandler>,
) -> Result<Successor> {
    let mut phases = UpdatePhases::default();
    let started = Instant::now();
    let file = old_memory
        .ram()
        .file()
        .try_clone_to_owned()
        .map_err(|error| VmmError::MemoryFile {
            operation: "dup",
            errno: error.raw_os_error().unwrap_or(libc::EMFILE),
        })?;
    let memory = Arc::new(GuestMemory::new(Arc::new(MemfdRam::from_file(file)?))?);
    phases.map = started.elapsed();
    let mut machine = Machine::create(Arc::clone(&memory), MachineConfig { vcpus })?;
    phases.build = machine.build_timings();
    let started = Instant::now();
    if options.populate {
        populate_mapping(memory.ram().as_ref(), 0, memory.size())?;
    }
    phases.populate = started.elapsed();
    let started = Instant::now();
    if options.prefault || options.warm_up {
        let mut ranges = populated_ranges(memory.ram().as_ref())?;
        if !options.prefault {
            ranges = ranges
                .into_iter()
                .filter(|range| range.start < DATA_BASE)
                .map(|range| range.start..range.end.min(DATA_BASE))
                .collect();
        }
        machine.prefault(&ranges, memory.ram().page_size(), None)?;
    }
    phases.prefault = started.elapsed();
    let started = Instant::now();
    let handler = make_handler(Arc::clone(&memory), *machine.layout());
    let machine = machine.arm(handler)?;
    phases.arm = started.elapsed();
    Ok(Successor { machine, phases })
}

/// Updates `running` into a new VM in this process. `make_handler` builds
/// the exit handler of the new VM from its memory and layout.
///
/// # Errors
/// [`UpdateError`], carrying what is left of the old machine.
pub fn update_in_process(
    running: RunningMachine,
    make_handler: impl FnOnce(Arc<GuestMemory>, GuestLayout) -> Arc<dyn ExitHandler>,
    options: UpdateOptions,
) -> std::result::Result<(RunningMachine, UpdateReport), UpdateError> {
    let layout = *running.layout();
    let mut report = UpdateReport::default();
    let mut make_handler = Some(make_handler);
    let prebuilt = if options.prebuild {
        let make = make_handler.take();
        match make.map(|make| build_successor(running.memory(), layout.vcpus(), &options, make)) {
            Some(Ok(successor)) => Some(successor),
            Some(Err(error)) => {
                return Err(UpdateError {
                    old: OldMachine::Running(Box::new(running)),
                    error,
                });
            }
            None => None,
        }
    } else {
        None
    };

    let kicked_at = Instant::now();
    report.kick_host_tsc = crate::state::tsc::host_tsc();
    let (old, stop, state) = running
        .stop_capturing(options.stop_timeout)
        .map_err(|error| match error {
            StopError::Running(machine, error) => UpdateError {
                old: OldMachine::Running(machine),
                error,
            },
            StopError::Captured(machine, error) => UpdateError {
                old: OldMachine::Stopped(machine),
                error,
            },
            StopError::Lost(error) => UpdateError {
                old: OldMachine::Lost,
                error,
            },
        })?;
    let captured_at = Instant::now();
    report.kicked_ns = instant_ns(kicked_at);
    report.phases.stop = stop.last_stopped_at.saturating_duration_since(kicked_at);
    report.phases.capture = captured_at.saturating_duration_since(stop.last_stopped_at);
    report.tsc_khz = state.vcpus.first().map_or(0, |vcpu| vcpu.tsc.khz);
    let keep = |machine: Machine| {
        move |error| UpdateError {
            old: OldMachine::Stopped(Box::new(machine)),
            error,
        }
    };

    let started = Instant::now();
    let decoded = match state
        .to_memfd()
        .and_then(|file| MachineState::from_fd(&file).map(|state| (state, file)))
    {
        Ok((decoded, file)) => {
            report.record_bytes = rustix::fs::fstat(&file)
                .map(|stat| stat.st_size as usize)
                .unwrap_or(0);
            decoded
        }
        Err(error) => return Err(keep(old)(error)),
    };
    report.phases.record = started.elapsed();
    let marks = (0..layout.vcpus())
        .map(|vcpu| {
            read_object::<u64>(
                old.memory().view(),
                layout.control_block(vcpu) + offsets::LAST_TSC,
            )
        })
        .collect::<Result<Vec<u64>>>()
        .and_then(|marks| arm_gap_probe(old.memory().view(), &layout).map(|()| marks));
    report.stop_tsc = match marks {
        Ok(marks) => marks,
        Err(error) => return Err(keep(old)(error)),
    };

    let successor = match (prebuilt, make_handler) {
        (Some(successor), _) => successor,
        (None, Some(make)) => match build_successor(old.memory(), layout.vcpus(), &options, make) {
            Ok(successor) => successor,
            Err(error) => return Err(keep(old)(error)),
        },
        (None, None) => {
            return Err(keep(old)(VmmError::StateMismatch {
                reason: "no successor was built".into(),
            }));
        }
    };
    let phases = successor.phases;
    report.phases.map = phases.map;
    report.phases.build = phases.build;
    report.phases.populate = phases.populate;
    report.phases.prefault = phases.prefault;
    report.phases.arm = phases.arm;
    let started = Instant::now();
    let new = match successor.machine.go(Some(&decoded)) {
        Ok(new) => new,
        Err(error) => return Err(keep(old)(error)),
    };
    let released = Instant::now();
    report.phases.restore = released.saturating_duration_since(started);
    let first_entry = wait_first_entry(&new, Duration::from_secs(5));
    report.phases.start = first_entry.saturating_duration_since(released);
    report.host_blackout = first_entry.saturating_duration_since(stop.last_stopped_at);
    report.resumed_ns = instant_ns(first_entry);
    retire(old);
    Ok((new, report))
}

/// Tears the old VM down off the critical path: destroying a VM frees all
/// its shadow page tables, which takes milliseconds of CPU; done right at
/// the resume it competed with the new vCPUs and the guest saw it as part of
/// its gap. A background thread waits a little and then drops it.
fn retire(old: Machine) {
    const GRACE: Duration = Duration::from_millis(50);
    let spawned = std::thread::Builder::new()
        .name("vm-retire".into())
        .spawn(move || {
            std::thread::sleep(GRACE);
            drop(old);
        });
    if let Err(error) = spawned {
        tracing::warn!(%error, "no thread to retire the old VM; dropping it inline");
    }
}

/// Spins (with short sleeps) until some vCPU of `running` entered the guest.
pub(crate) fn wait_first_entry(running: &RunningMachine, timeout: Duration) -> Instant {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(first) = running.first_entries().into_iter().flatten().min() {
            return first;
        }
        if Instant::now() >= deadline {
            return Instant::now();
        }
        std::thread::yield_now();
    }
}
