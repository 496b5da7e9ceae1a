//! Live update of the monitor across processes, in the three handover
//! modes of DESIGN.md ("Handover modes"), through the `liveupdate` crate.
//!
//! Model: a VMM process runs the guest on a gmem guest memory file served
//! by the fault service ([`crate::backing`]). An update hands the guest to a
//! successor process: the memory file and a state slot (a memfd that will
//! hold the vCPU state) are preserved in one `liveupdate` session, and the
//! session reaches the successor by `exec` in place, by a Unix socket to a
//! successor started ahead (`transfer`), or through the `luod` daemon.
//! Guest memory is never copied: both processes map the same file.
//!
//! Success path of one update (old process, then successor):
//! 1. preserve the memory file (the gmem handler freezes it: from here a
//!    first touch parks in the fault service; the guest runs on) and the
//!    state slot ([`old`]);
//! 2. transfer only: start the successor, offer it the session; it builds
//!    its VM over the file it was offered (and may prefault it) while the
//!    guest still runs, then accepts a second offer to say it is ready;
//! 3. stop the vCPUs, handling vCPUs parked on frozen faults as this KVM
//!    requires ([`crate::parked`]); each vCPU's full state is captured;
//! 4. write the state into the slot; arm the guest's gap probe;
//! 5. hand over: `execve` (exec), SWITCH/SWITCHED/COMMIT (transfer), or
//!    deposit with luod and start the successor (luod); the old process
//!    then exits (its VM is torn down at idle priority);
//! 6. the successor retrieves both files (the memory file comes back
//!    frozen; a transfer successor retrieves them at the switch, before it
//!    answers SWITCHED, which brings its object built ahead up to date),
//!    starts its own fault service on it, builds (or has built) its VM over
//!    it, restores the state and resumes the vCPUs ([`new`]);
//! 7. it finishes the session: the file unfreezes and the successor's fault
//!    service serves the faults that parked meanwhile and every first touch
//!    from then on;
//! 8. it measures the guest's view (gap, recovery) and reports ([`report`]).
//!
//! Failure paths: an error before the handover call completes (in transfer
//! mode this includes a successor whose retrieve fails at the switch)
//! aborts: the vCPUs (if stopped) run again in the old process, the
//! session is closed, which unfreezes the file, and the guest carries on as
//! if nothing happened ([`control::Event::UpdateFailed`] with
//! `guest_running`). A
//! successor that fails after the handover has no guest to give back: it
//! reports and exits with an error (the memory is still in the file).

pub mod control;
pub mod controller;
pub mod handler;
mod new;
mod old;
pub mod process;
pub mod report;
mod vm;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use process::{BackendChoice, Launcher, Role, VmmArgs, run};

/// How the session reaches the successor.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// The process execs the new binary in place.
    #[default]
    Exec,
    /// A successor started ahead receives the session over a socket.
    Transfer,
    /// The session is deposited with luod; a new process retrieves it.
    Luod,
}

impl std::fmt::Display for Mode {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(match self {
            Mode::Exec => "exec",
            Mode::Transfer => "transfer",
            Mode::Luod => "luod",
        })
    }
}

/// A fault injected into one update, for the abort tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Injection {
    /// The successor program does not exist (exec fails; the transfer or
    /// luod successor cannot start).
    MissingSuccessor,
    /// Transfer: the successor exits after accepting the offer, before the
    /// switch.
    SuccessorDiesBeforeSwitch,
}

/// One update, as the controller asks for it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct UpdateRequest {
    /// Its number (1, 2, ...).
    pub update: u32,
    /// The mode.
    pub mode: Mode,
    /// Transfer: prefault the new VM's mappings of the populated memory
    /// before the switch.
    pub prefault: bool,
    /// Where luod listens (luod mode).
    pub luod_socket: Option<PathBuf>,
    /// A directory for the transfer socket.
    pub run_dir: PathBuf,
    /// How long the successor watches the guest after the resume to
    /// measure its recovery, in milliseconds.
    pub recovery_window_ms: u64,
    /// At most how long the guest runs on with its memory frozen
    /// (preserved) before the vCPUs are stopped, in milliseconds (a VMM's
    /// own work between preserve and stop); it ends early once every vCPU
    /// is parked in a fault. A guest that touches new pages meanwhile has
    /// its vCPUs parked at the stop.
    pub frozen_hold_ms: u64,
    /// Which guest-memory handler both ends use.
    pub handler: handler::HandlerChoice,
    /// A fault to inject (tests).
    pub inject: Option<Injection>,
}

/// Sends this process's logs to stderr (`RUST_LOG` filters them; warnings
/// and errors by default). Call once, early in `main`.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// The token of the guest memory file in a session.
pub const MEMORY_TOKEN: liveupdate::Token = liveupdate::Token(0);
/// The token of the state slot in a session.
pub const STATE_TOKEN: liveupdate::Token = liveupdate::Token(1);

/// The session name of update `update` of the VMM with pid `pid` (luod
/// holds sessions of many VMMs at once, so names are unique per VMM).
pub fn session_name(pid: u32, update: u32) -> String {
    format!("vmm-{pid}-update-{update}")
}
