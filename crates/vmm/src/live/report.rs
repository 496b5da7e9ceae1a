//! What each side of a live update measures, and what the guest says.
//!
//! Times that span two processes are CLOCK_MONOTONIC nanoseconds
//! ([`crate::time`]), shared by every process on the host: the host
//! blackout of an update is the successor's `first_entry_ns` minus the old
//! process's `last_stop_ns`. Durations measured inside one process are
//! [`Duration`]s.

use std::time::Duration;

use fault_service::FaultCounters;
use serde::{Deserialize, Serialize};

use super::Mode;
use crate::guest::{GuestReport, PageCheck};
use crate::machine::BuildTimings;
use crate::measure::Recovery;
use crate::parked::ParkedStep;

/// The fault service's counters ([`FaultCounters`]), in a form that
/// crosses the control channel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultTally {
    /// Faults served at once.
    pub served: u64,
    /// Faults parked (frozen file or failed allocation).
    pub parked: u64,
    /// Parked faults served later.
    pub served_after_unfreeze: u64,
    /// Allocation failures other than the freeze.
    pub failed: u64,
    /// Total time served faults spent parked, in nanoseconds.
    pub parked_nanoseconds: u64,
    /// Faults parked right now.
    pub parked_now: u64,
}

impl From<FaultCounters> for FaultTally {
    fn from(counters: FaultCounters) -> Self {
        Self {
            served: counters.served,
            parked: counters.parked,
            served_after_unfreeze: counters.served_after_unfreeze,
            failed: counters.failed,
            parked_nanoseconds: counters.parked_nanoseconds,
            parked_now: counters.parked_now,
        }
    }
}

/// Counters of the running guest, summed over its vCPUs.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// The VMM's generation.
    pub generation: u32,
    /// Loop iterations.
    pub iterations: u64,
    /// Pages written.
    pub pages_written: u64,
    /// Pages verified correct by the guest.
    pub pages_verified: u64,
    /// Pages that failed the guest's verification.
    pub mismatches: u64,
    /// Vector-register checks that failed.
    pub register_mismatches: u64,
    /// Pages of the guest memory file that exist (its page index).
    pub populated_pages: u64,
    /// Pages of the file.
    pub total_pages: u64,
    /// The fault service's counters in this process.
    pub faults: FaultTally,
    /// Whether the guest memory file is frozen.
    pub frozen: bool,
}

/// Durations of the old side's phases.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OldPhases {
    /// Creating the session and preserving the memory file (which freezes
    /// it: from here new faults park) and the state slot.
    pub preserve: Duration,
    /// Transfer: binding the socket, starting the successor and its accept.
    pub connect: Duration,
    /// Transfer: the first offer, until the successor accepted it.
    pub offer: Duration,
    /// Transfer: waiting for the successor to build its VM (and prefault),
    /// the guest still running.
    pub successor_build: Duration,
    /// From the kick until the last vCPU stopped (including the parked
    /// step, if any vCPU was stuck).
    pub stop: Duration,
    /// Reading the VM-wide state after the stop (vCPUs capture their own
    /// state as they stop) and writing the record into the slot.
    pub save: Duration,
    /// The handover call: transfer's switch (freeze, delta, SWITCH,
    /// SWITCHED, COMMIT), luod's deposit, or the time up to `execve`.
    pub handover: Duration,
}

/// The old process's half of an update.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct OldSide {
    /// Which update.
    pub update: u32,
    /// Its mode.
    pub mode: Mode,
    /// The old VMM's generation.
    pub generation: u32,
    /// When the update was requested.
    pub requested_ns: u64,
    /// When the memory file was frozen (preserved).
    pub frozen_ns: u64,
    /// When the successor process was started (transfer, luod), or exec
    /// was called (exec): the start of the whole handover.
    pub successor_started_ns: u64,
    /// When the kick was sent.
    pub kicked_ns: u64,
    /// The host TSC just before the kick: where the guest TSC is the host's
    /// (this KVM), `kicked_tsc - stop_tsc` of a vCPU is how long before the
    /// kick its loop last ran (time it spent waiting for a host CPU, which
    /// its gap includes).
    pub kicked_tsc: u64,
    /// When the last vCPU stopped: the start of the host blackout.
    pub last_stop_ns: u64,
    /// Phase durations.
    pub phases: OldPhases,
    /// What the stop found parked and did about it.
    pub parked: ParkedStep,
    /// Faults parked while the file was frozen, before the stop.
    pub faults_parked_before_stop: u64,
    /// The pages (file page indices) of those faults: each must exist in
    /// the successor once it has finished.
    pub parked_pages: Vec<u64>,
    /// Bytes of the vCPU state record.
    pub state_bytes: usize,
    /// The guest's counters at the stop (without the populated count).
    pub guest_at_stop: Progress,
}

/// Durations of the successor's phases.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewPhases {
    /// Getting the sessions (exec: from the environment; luod: retrieve)
    /// and retrieving both files, which rebuilds the memory file object
    /// (frozen). Transfer: taking the files from the switch, which
    /// retrieved them before the successor answered it (that retrieve is
    /// part of the old side's handover).
    pub retrieve: Duration,
    /// Starting the fault service over the memory file and mapping it.
    pub adopt: Duration,
    /// VM, irqchip, memslot and vCPUs.
    pub build: BuildTimings,
    /// Running the prefault program (or only the warm-up) before the switch.
    pub prefault: Duration,
    /// Spawning the waiting vCPU threads.
    pub arm: Duration,
    /// Reading the state record from its slot.
    pub read_state: Duration,
    /// Writing the state into the new VM and releasing the vCPUs, until the
    /// first vCPU entered the guest.
    pub restore: Duration,
    /// Finishing the session (the memory file unfreezes; parked faults are
    /// served) and, for luod, telling luod.
    pub finish: Duration,
}

/// The successor's half of an update.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct NewSide {
    /// Which update.
    pub update: u32,
    /// Its mode.
    pub mode: Mode,
    /// The successor's generation.
    pub generation: u32,
    /// When its `main` began (for exec: right after `execve`).
    pub started_ns: u64,
    /// When the switch happened for it: the sessions were in hand.
    pub retrieved_ns: u64,
    /// When its first vCPU entered the guest: the end of the host blackout.
    pub first_entry_ns: u64,
    /// When its session was finished (the memory file unfrozen).
    pub finished_ns: u64,
    /// Phase durations.
    pub phases: NewPhases,
    /// Pages the prefault program touched.
    pub prefault_pages: u64,
    /// Transfer: the memory file object built ahead was behind the final
    /// record (the old VMM served parked faults after the offer) and was
    /// brought up to date at the switch.
    pub updated_at_switch: bool,
    /// Per vCPU, the gap its own loop saw across the update, in ns (None:
    /// the probe caught nothing, which fails the demo).
    pub guest_gaps_ns: Vec<Option<u64>>,
    /// Per vCPU, the guest TSC of its last loop iteration before the stop.
    pub stop_tsc: Vec<u64>,
    /// The guest TSC's frequency (kHz).
    pub tsc_khz: u32,
    /// Per vCPU, its rate before and its recovery after.
    pub recovery: Vec<Recovery>,
    /// Faults parked in this process before its finish (repeated accesses
    /// of interrupted vCPUs, new first touches).
    pub faults_parked_before_finish: u64,
    /// The fault service's counters after the recovery window.
    pub faults: FaultTally,
    /// The guest's counters after the recovery window.
    pub guest: Progress,
}

/// The final check, after the last update.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FinalReport {
    /// The VMM's generation.
    pub generation: u32,
    /// Per vCPU, the guest's counters after its final self-check.
    pub guest: Vec<GuestReport>,
    /// The host's check of every page the guest wrote.
    pub pages: PageCheck,
    /// Whether the guest memory file was frozen at the end (must be false).
    pub frozen: bool,
    /// The fault service's counters in the last process.
    pub faults: FaultTally,
    /// Pages of the guest memory file that exist.
    pub populated_pages: u64,
}
