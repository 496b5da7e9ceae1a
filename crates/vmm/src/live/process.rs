//! A VMM process: boots the guest or resumes it as a successor, then
//! serves its controller's commands until it hands the guest over or
//! finishes.
//!
//! The process is started by a controller (`gmemctl demo`) through a binary
//! that calls [`run`] with the parsed [`VmmArgs`] and a [`Launcher`] saying
//! how to start that same binary again (for successors). Main loop: wait up
//! to 50 ms for a command; read the guest's trace rings; send progress once
//! a second. A lost controller stops the guest and ends the process.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::control::{Command, ControlLink, Event, Polled};
use super::vm::LiveVm;
use super::{new, old};

/// How often the main loop looks for a command (and reads the traces).
const POLL: Duration = Duration::from_millis(50);
/// How often progress goes to the controller.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// What this process is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    /// Boot a new guest.
    #[default]
    Boot,
    /// Resume after an exec handover.
    Exec,
    /// A transfer successor: started ahead, receives the session by socket.
    Transfer,
    /// Retrieve the session from luod.
    Luod,
}

impl std::fmt::Display for Role {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(match self {
            Role::Boot => "boot",
            Role::Exec => "exec",
            Role::Transfer => "transfer",
            Role::Luod => "luod",
        })
    }
}

/// The backend of the guest memory file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendChoice {
    /// shmem memfd, first touches served by the fault service.
    #[default]
    Memfd,
    /// hugetlbfs memfd (2 MiB pages), served by the fault service.
    Hugetlb,
    /// KVM guest_memfd, allocated in full at boot (no fault service).
    Kvm,
}

impl From<BackendChoice> for gmem::Backend {
    fn from(choice: BackendChoice) -> Self {
        match choice {
            BackendChoice::Memfd => gmem::Backend::Memfd,
            BackendChoice::Hugetlb => gmem::Backend::Hugetlb,
            BackendChoice::Kvm => gmem::Backend::Kvm,
        }
    }
}

/// A VMM process's arguments.
#[derive(Clone, Debug, clap::Args)]
pub struct VmmArgs {
    /// The controller's socket.
    #[arg(long)]
    pub control: PathBuf,
    /// What this process is.
    #[arg(long, value_enum, default_value_t = Role::Boot)]
    pub role: Role,
    /// Its generation (0 for the first VMM).
    #[arg(long, default_value_t = 0)]
    pub generation: u32,
    /// The update that started it (successors).
    #[arg(long, default_value_t = 0)]
    pub update: u32,
    /// Guest memory in bytes (boot).
    #[arg(long, default_value_t = 2 << 30)]
    pub size: u64,
    /// vCPUs.
    #[arg(long, default_value_t = 2)]
    pub vcpus: u32,
    /// The guest memory file's backend (boot).
    #[arg(long, value_enum, default_value_t = BackendChoice::Memfd)]
    pub backend: BackendChoice,
    /// The session to retrieve (successors).
    #[arg(long, default_value = "")]
    pub session: String,
    /// The old VMM's transfer socket (transfer successor).
    #[arg(long)]
    pub transfer_socket: Option<PathBuf>,
    /// luod's socket (luod successor).
    #[arg(long)]
    pub luod_socket: Option<PathBuf>,
    /// Prefault the new VM over all populated memory before the switch
    /// (transfer successor).
    #[arg(long)]
    pub prefault: bool,
    /// How long to watch the guest's recovery after the resume (ms).
    #[arg(long, default_value_t = 1000)]
    pub recovery_window_ms: u64,
    /// Run the workload on host threads instead of KVM vCPUs.
    #[arg(long)]
    pub host_threads: bool,
    /// Allocate all guest memory before the boot (boot): the guest then
    /// runs on fully populated memory, as the benchmarks want.
    #[arg(long)]
    pub prefill: bool,
    /// The guest-memory file handler (the predecessor's choice).
    #[arg(long, value_enum, default_value_t = super::handler::HandlerChoice::Cached)]
    pub handler: super::handler::HandlerChoice,
    /// Exit after accepting the offer, before the switch (tests).
    #[arg(long)]
    pub die_before_switch: bool,
}

/// How to start this binary again as a VMM process.
#[derive(Clone, Debug)]
pub struct Launcher {
    /// The executable.
    pub program: PathBuf,
    /// Arguments before the VMM arguments (a subcommand).
    pub leading: Vec<OsString>,
    /// The controller's socket, passed on to every successor.
    pub control: PathBuf,
}

impl Launcher {
    /// The leading arguments, `--control`, then `extra`.
    pub fn all_arguments(&self, extra: Vec<OsString>) -> Vec<OsString> {
        let mut arguments = self.leading.clone();
        arguments.push("--control".into());
        arguments.push(self.control.clone().into());
        arguments.extend(extra);
        arguments
    }
}

/// Runs a VMM process; returns its exit code (it may also end inside a
/// successful handover).
pub fn run(args: &VmmArgs, launcher: &Launcher) -> i32 {
    let started_ns = crate::time::monotonic_ns();
    let (vm, new_side) = match args.role {
        Role::Boot => match LiveVm::boot(args) {
            Ok(vm) => (vm, None),
            Err(error) => return fatal(args, &format!("booting the guest: {error}")),
        },
        Role::Exec | Role::Transfer | Role::Luod => match new::resume(args, started_ns) {
            Ok((vm, side)) => (vm, Some(side)),
            Err(error) => return fatal(args, &format!("resuming the guest: {error}")),
        },
    };
    let mut link = match ControlLink::connect(&args.control) {
        Ok(link) => link,
        Err(error) => {
            tracing::error!(%error, "cannot reach the controller; stopping the guest");
            return 1;
        }
    };
    let hello = Event::Hello {
        generation: vm.generation,
        update: args.update,
        pid: std::process::id(),
        kvm: vm.in_kvm(),
        backend: vm.backing.file().backend().to_string(),
    };
    let mut sent = link.send(&hello);
    if let Some(side) = new_side {
        sent = sent.and_then(|()| link.send(&Event::NewSide(Box::new(side))));
    }
    if let Err(error) = sent {
        tracing::error!(%error, "cannot talk to the controller; stopping the guest");
        return 1;
    }
    serve(vm, link, launcher)
}

/// Tells the controller (if it can be reached) why this process gives up.
fn fatal(args: &VmmArgs, error: &str) -> i32 {
    tracing::error!(error, "the VMM process gives up");
    if let Ok(mut link) = ControlLink::connect(&args.control) {
        let _ = link.send(&Event::Fatal {
            update: args.update,
            error: error.to_owned(),
        });
    }
    1
}

/// The main loop.
fn serve(mut vm: LiveVm, mut link: ControlLink, launcher: &Launcher) -> i32 {
    let mut last_progress = Instant::now();
    loop {
        match link.poll(POLL) {
            Ok(Polled::Command(Command::Update(request))) => {
                let failed = old::update(&mut vm, &request, &mut link, launcher);
                let event = Event::UpdateFailed {
                    update: request.update,
                    mode: request.mode,
                    error: failed.error,
                    guest_running: failed.guest_running,
                    frozen: vm.backing.file().is_frozen(),
                };
                if link.send(&event).is_err() || !failed.guest_running {
                    return 1;
                }
            }
            Ok(Polled::Command(Command::CheckPresent { pages })) => {
                let file = vm.backing.file();
                let missing = pages
                    .iter()
                    .copied()
                    .filter(|page| !file.is_present(gmem::PageIndex(*page)))
                    .collect();
                let event = Event::Present {
                    checked: pages.len() as u64,
                    missing,
                };
                if link.send(&event).is_err() {
                    return 1;
                }
            }
            Ok(Polled::Command(Command::Finish)) => {
                let event = match vm.finish() {
                    Ok(report) => Event::Final(Box::new(report)),
                    Err(error) => Event::Fatal {
                        update: 0,
                        error: format!("the final check: {error}"),
                    },
                };
                let failed = matches!(event, Event::Fatal { .. });
                let _ = link.send(&event);
                return i32::from(failed);
            }
            Ok(Polled::Idle) => {}
            Ok(Polled::Closed) | Err(_) => {
                tracing::error!("the controller is gone; stopping the guest");
                if let Some(cpus) = vm.cpus.take() {
                    cpus.abandon();
                }
                return 1;
            }
        }
        vm.poll_trace();
        if last_progress.elapsed() >= PROGRESS_EVERY {
            last_progress = Instant::now();
            if link.send(&Event::Progress(vm.progress())).is_err() {
                return 1;
            }
        }
    }
}
