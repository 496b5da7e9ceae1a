//! Stopping the vCPUs of a guest whose memory is frozen, where some may be
//! parked in a fault.
//!
//! Model: once a live update has preserved (frozen) guest memory, a vCPU
//! that touches a page for the first time blocks in the fault service's
//! userfaultfd, parked until the file is unfrozen. The handover must not
//! wait for that. What this machine's KVM (PVM, Linux 6.18) does with the
//! kick (`immediate_exit` and a pending signal) is measured by
//! `tests/parked_vcpu.rs`: it interrupts the fault, `KVM_RUN` returns EINTR
//! with the faulting instruction not executed, and the vCPU's state is
//! complete; the successor's vCPU repeats the access and faults there, where
//! the successor's fault service parks it until its finish. DESIGN.md
//! records a kernel where the vCPU instead stays blocked until its fault is
//! served.
//!
//! Protocol ([`stop_frozen`]):
//! 1. kick every vCPU (each captures its own state as it stops) and wait
//!    `kick_wait`; the usual outcome here: all stopped, nothing else to do;
//! 2. vCPUs still blocked are counted and logged, then — only then — the
//!    explicit step: unfreeze the file, which makes the fault service serve
//!    the parked faults, wait for those vCPUs to finish their instruction
//!    and stop, freeze the file again; the faults it served are counted.
//!    Nothing is allocated while the file is frozen: the step is a real
//!    unfreeze, visible in the file's index and in the counters.
//!
//! Failure paths: a vCPU still blocked after its fault was served (or a
//! capture failure) comes back as [`StopError`]; the file is frozen again in
//! every case, as it was on entry.

use std::time::{Duration, Instant};

use crate::backing::Backing;
use crate::error::VmmError;
use crate::machine::{Machine, RunningMachine, StopError, StopReport};
use crate::state::MachineState;

/// What the stop found and did about parked faults.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ParkedStep {
    /// Faults parked in the fault service when the kick was sent.
    pub parked_at_kick: u64,
    /// vCPUs still blocked after the kick (parked in a fault the kick did
    /// not interrupt).
    pub stuck_vcpus: Vec<u32>,
    /// Faults the explicit unfreeze-serve-refreeze step served (0 when no
    /// vCPU was stuck).
    pub served_for_stuck: u64,
    /// How long that step took.
    pub step: Duration,
    /// Faults left parked after the stop: their vCPUs were interrupted by
    /// the kick and repeat the access after the resume.
    pub interrupted: u64,
}

/// Stops every vCPU of `running`, whose memory `backing` holds frozen,
/// capturing each vCPU's state; see the module documentation.
///
/// # Errors
/// [`StopError`] as [`RunningMachine::stop_capturing`]: `Running` when a
/// vCPU stayed blocked even after its fault was served, `Captured` when a
/// capture failed, `Lost` when a vCPU thread panicked.
pub fn stop_frozen(
    running: RunningMachine,
    backing: &Backing,
    kick_wait: Duration,
    served_wait: Duration,
) -> Result<(Machine, StopReport, MachineState, ParkedStep), StopError> {
    let kicked_at = Instant::now();
    let mut step = ParkedStep {
        parked_at_kick: backing.fault_counters().parked_now,
        ..ParkedStep::default()
    };
    let (machine, mut report, state) = match running.stop_capturing(kick_wait) {
        Ok(stopped) => stopped,
        Err(StopError::Running(running, VmmError::StopTimeout { vcpus, .. })) => {
            step.stuck_vcpus = vcpus;
            serve_for_stuck(*running, backing, served_wait, &mut step)?
        }
        Err(other) => return Err(other),
    };
    report.kicked_at = kicked_at;
    step.interrupted = backing.fault_counters().parked_now;
    Ok((machine, report, state, step))
}

/// Step 2: the explicit unfreeze, serve, refreeze.
fn serve_for_stuck(
    running: RunningMachine,
    backing: &Backing,
    served_wait: Duration,
    step: &mut ParkedStep,
) -> Result<(Machine, StopReport, MachineState), StopError> {
    tracing::warn!(
        vcpus = ?step.stuck_vcpus,
        parked = backing.fault_counters().parked_now,
        "vCPUs stayed blocked in parked faults after the kick: unfreezing the guest memory to serve them, then freezing it again"
    );
    let result = served_while_unfrozen(backing, step, || running.stop_capturing(served_wait));
    tracing::warn!(
        served = step.served_for_stuck,
        took_us = step.step.as_micros() as u64,
        "served the parked faults of stuck vCPUs; guest memory frozen again"
    );
    result
}

/// The heart of step 2: runs `stop` with the guest memory unfrozen, so the
/// parked faults are served, freezes it again if it was frozen, and records
/// in `step` how many were served and how long it took.
fn served_while_unfrozen<T>(
    backing: &Backing,
    step: &mut ParkedStep,
    stop: impl FnOnce() -> T,
) -> T {
    let started = Instant::now();
    let file = backing.file();
    let before = backing.fault_counters().served_after_unfreeze;
    let was_frozen = file.freeze(false);
    let result = stop();
    if was_frozen {
        file.freeze(true);
    }
    step.served_for_stuck = backing
        .fault_counters()
        .served_after_unfreeze
        .saturating_sub(before);
    step.step = started.elapsed();
    result
}

/// [`stop_frozen`] for the workload on host threads (no KVM): a thread
/// blocked in a parked fault cannot be interrupted at all (the kernel
/// retries a user fault after any signal), so every parked thread takes the
/// explicit step 2.
///
/// # Errors
/// The threads still blocked after their faults were served, given back
/// with their indices; the file is frozen again either way.
pub fn stop_threads_frozen(
    cpus: crate::host_cpus::HostCpus,
    backing: &Backing,
    kick_wait: Duration,
    served_wait: Duration,
) -> Result<ParkedStep, (crate::host_cpus::HostCpus, Vec<u32>)> {
    let mut step = ParkedStep {
        parked_at_kick: backing.fault_counters().parked_now,
        ..ParkedStep::default()
    };
    // Threads blocked in parked faults never stop by themselves: as soon as
    // every thread still running is matched by a parked fault, go on.
    let parked_now = || backing.fault_counters().parked_now as usize;
    match cpus.stop_unless(kick_wait, |running| running <= parked_now()) {
        Ok(()) => {}
        Err((cpus, stuck)) => {
            step.stuck_vcpus = stuck;
            tracing::warn!(
                threads = ?step.stuck_vcpus,
                "host threads blocked in parked faults: unfreezing the guest memory to serve them, then freezing it again"
            );
            served_while_unfrozen(backing, &mut step, || cpus.stop(served_wait))?;
        }
    }
    step.interrupted = backing.fault_counters().parked_now;
    Ok(step)
}
