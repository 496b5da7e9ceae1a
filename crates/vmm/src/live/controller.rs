//! The controller of a live-update run (`gmemctl demo`): starts the first
//! VMM process, asks it (and then each successor) for live updates, and
//! collects and judges what every process measured.
//!
//! Model: the controller plays the management layer (what libvirt is to
//! QEMU). It owns a run directory with its control socket and, when an
//! update uses the luod mode, a luod daemon on a thread of its own. It is a
//! child subreaper, so successors whose parent VMM exited are its children,
//! and it reaps every VMM process before it returns.
//!
//! Success path: 1. start generation 0 and wait for its hello; 2. per
//! update: let the guest run for the interval, send the update, collect the
//! old side's report, accept the successor's connection and its report (or
//! the old side's failure); 3. ask the last VMM for the final check;
//! 4. reap, judge ([`DemoReport::problems`]) and clean up.
//! Failure paths: a VMM that dies or reports a fatal error, or an update
//! that does not complete in time, ends the run with the problem recorded;
//! every VMM process still alive is killed and reaped.

use std::ffi::OsString;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::control::{Command as ControlCommand, Event, VmmConnection};
use super::report::{FinalReport, NewSide, OldSide, Progress};
use super::{BackendChoice, Injection, Mode, UpdateRequest};

/// How long a VMM process may take to boot or to say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(60);
/// How long one update may take, beyond the prefault and the recovery
/// window.
const UPDATE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the final check may take.
const FINAL_TIMEOUT: Duration = Duration::from_secs(180);
/// How long the controller waits for its VMM processes to exit at the end.
const REAP_TIMEOUT: Duration = Duration::from_secs(10);
/// The granularity of the controller's waits.
const TICK: Duration = Duration::from_millis(2);

/// What to run.
#[derive(Clone, Debug)]
pub struct DemoConfig {
    /// Guest memory in bytes.
    pub size: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// The guest memory file's backend.
    pub backend: BackendChoice,
    /// Number of live updates.
    pub updates: u32,
    /// Modes, used in turn.
    pub modes: Vec<Mode>,
    /// Transfer: prefault the new VM before the switch.
    pub prefault: bool,
    /// How long the guest runs before the first update and between two.
    pub interval: Duration,
    /// How long each successor watches the guest's recovery.
    pub recovery_window: Duration,
    /// Faults to inject: (update number, fault).
    pub injections: Vec<(u32, Injection)>,
    /// Run the workload on host threads instead of KVM vCPUs.
    pub host_threads: bool,
    /// Allocate all guest memory before the boot.
    pub prefill: bool,
    /// How long each update lets the guest run frozen before the stop (ms).
    pub frozen_hold_ms: u64,
    /// The guest-memory file handler of the updates.
    pub handler: super::handler::HandlerChoice,
    /// The VMM executable.
    pub program: PathBuf,
    /// Its arguments before the VMM arguments (a subcommand).
    pub leading: Vec<OsString>,
}

/// What the controller reports while it runs.
#[derive(Debug)]
pub enum DemoEvent<'a> {
    /// A VMM process said hello.
    Hello {
        /// Its generation.
        generation: u32,
        /// Its pid.
        pid: u32,
    },
    /// The running guest's counters.
    Progress(&'a Progress),
    /// An update was sent.
    UpdateStarted {
        /// Which.
        update: u32,
        /// Its mode.
        mode: Mode,
    },
    /// An update ended (completed or not).
    UpdateEnded(&'a UpdateRow),
    /// The final check was asked for.
    Finishing,
}

/// How an update ended.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The successor runs the guest.
    #[default]
    Completed,
    /// The update failed and the old process carries on.
    Aborted {
        /// Why.
        error: String,
        /// Whether the memory file was still frozen after the abort.
        frozen: bool,
    },
    /// The update failed and no process runs the guest.
    Failed {
        /// Why.
        error: String,
    },
}

/// Figures derived from both sides of an update.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Derived {
    /// Last vCPU stop (old) to first vCPU entry (successor), host clock.
    pub host_blackout: Option<Duration>,
    /// The longest gap any vCPU's loop saw across the update.
    pub guest_gap: Option<Duration>,
    /// The slowest vCPU's recovery to 90% of its former rate (None: not
    /// within the window, or not measured).
    pub recovery: Option<Duration>,
    /// Successor start (or exec) to finish.
    pub handover: Option<Duration>,
    /// The longest gap any vCPU's loop saw counted from the kick (its gap
    /// less the time it had not run before the kick): the part of the
    /// guest's gap the update itself caused.
    pub guest_gap_from_kick: Option<Duration>,
    /// The longest time any vCPU's loop had not run before the kick (it was
    /// parked on a frozen fault, or waited for a host CPU): the part of the
    /// guest's gap that precedes the stop. Where the guest TSC is the
    /// host's (this KVM, host threads).
    pub idle_before_kick: Option<Duration>,
    /// Memory frozen (preserve) to finish (unfreeze).
    pub frozen_window: Option<Duration>,
    /// Pages the guest verified since the previous update's report.
    pub pages_verified: u64,
    /// Guest-reported mismatches (pages and vector registers) since then.
    pub mismatches: u64,
    /// Faults parked in the old process while its memory was frozen (from
    /// the preserve until its vCPUs stopped).
    pub faults_parked: u64,
    /// Of those, the ones whose page exists in the successor after its
    /// window (served there after the vCPU repeated the access, or by the
    /// explicit step in the old process).
    pub faults_served: u64,
    /// Faults parked in the successor before its finish (the repeated
    /// accesses, new first touches); all are served at the finish.
    pub successor_parked: u64,
    /// Faults never served: old parked pages still missing, plus faults
    /// still parked in the successor after its window.
    pub faults_unserved: u64,
    /// Pages of faults parked in the old process, checked in the successor.
    pub parked_pages_checked: u64,
    /// Those still missing there: faults never served.
    pub parked_pages_missing: Vec<u64>,
}

/// One update's row.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct UpdateRow {
    /// Its number.
    pub update: u32,
    /// Its mode.
    pub mode: Mode,
    /// The fault injected, if any.
    pub injected: Option<Injection>,
    /// How it ended.
    pub outcome: Outcome,
    /// The old process's report.
    pub old: Option<OldSide>,
    /// The successor's report.
    pub new: Option<NewSide>,
    /// Derived figures.
    pub derived: Derived,
}

/// The whole run.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DemoReport {
    /// Guest memory in bytes.
    pub size: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// Backend.
    pub backend: String,
    /// Whether the guest ran in KVM.
    pub kvm: bool,
    /// The load average (1, 5, 15 minutes) at the start.
    pub load_before: [f64; 3],
    /// The load average at the end.
    pub load_after: [f64; 3],
    /// One row per update.
    pub updates: Vec<UpdateRow>,
    /// The final check.
    pub final_check: Option<FinalReport>,
    /// Per VMM generation, its open fds once running (all must be equal,
    /// but for the first VMM of a kvm-backend run, which also holds gmem's
    /// holder VM).
    pub open_fds: Vec<(u32, u64)>,
    /// VMM processes that exited with a status other than expected.
    pub bad_exits: Vec<String>,
    /// Everything that makes the run fail; empty for a pass.
    pub problems: Vec<String>,
}

/// The load average now.
pub fn load_average() -> [f64; 3] {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut fields = text
        .split_whitespace()
        .map(|field| field.parse().unwrap_or(0.0));
    [
        fields.next().unwrap_or(0.0),
        fields.next().unwrap_or(0.0),
        fields.next().unwrap_or(0.0),
    ]
}

/// The luod daemon on a thread of the controller.
struct LuodThread {
    socket: PathBuf,
    stop: std::os::fd::OwnedFd,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl LuodThread {
    fn start(socket: PathBuf) -> Result<Self, String> {
        let mut daemon = liveupdate::luod::server::Daemon::bind(
            liveupdate::luod::server::DaemonConfig::new(&socket),
        )
        .map_err(|error| format!("starting luod at {}: {error}", socket.display()))?;
        let stop = rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC)
            .map_err(|errno| format!("eventfd for luod: {errno}"))?;
        let stop_for_thread = stop
            .try_clone()
            .map_err(|error| format!("dup for luod: {error}"))?;
        let thread = std::thread::Builder::new()
            .name("luod".into())
            .spawn(move || {
                use std::os::fd::AsFd;
                if let Err(error) = daemon.run(stop_for_thread.as_fd()) {
                    tracing::error!(%error, "luod stopped");
                }
            })
            .map_err(|error| format!("spawning luod: {error}"))?;
        Ok(Self {
            socket,
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for LuodThread {
    fn drop(&mut self) {
        let _ = rustix::io::write(&self.stop, &1u64.to_ne_bytes());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The run directory, removed on drop.
struct RunDir(PathBuf);

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// State of a run in progress.
struct Run<'a> {
    config: &'a DemoConfig,
    listener: UnixListener,
    control: PathBuf,
    current: Option<VmmConnection>,
    current_pid: u32,
    pids: Vec<u32>,
    report: DemoReport,
    last_progress: Progress,
    observer: &'a mut dyn FnMut(DemoEvent<'_>),
}

/// Runs the demo; see the module documentation. The report's `problems`
/// say whether it passed.
///
/// # Errors
/// Only for a run that cannot start at all: the run directory, the control
/// socket or luod cannot be set up, or the first VMM cannot be started.
pub fn run_demo(
    config: &DemoConfig,
    observer: &mut dyn FnMut(DemoEvent<'_>),
) -> Result<DemoReport, String> {
    // One run at a time per process: a run reaps its VMM processes with
    // waitpid(-1) (orphaned successors are reparented to this process, so
    // there is no other way), which would reap another run's too.
    static ONE_RUN: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_run = ONE_RUN
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let directory =
        std::env::temp_dir().join(format!("gmem-lu-demo-{}-{}", std::process::id(), unique()));
    std::fs::create_dir_all(&directory)
        .map_err(|error| format!("creating {}: {error}", directory.display()))?;
    let run_dir = RunDir(directory);
    let control = run_dir.0.join("control.sock");
    let listener = UnixListener::bind(&control)
        .map_err(|error| format!("binding {}: {error}", control.display()))?;
    listener
        .set_nonblocking(true)
        .map_err(|error| format!("nonblocking control socket: {error}"))?;
    // SAFETY: prctl(PR_SET_CHILD_SUBREAPER, 1) only changes how this
    // process's orphaned descendants are reparented.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    let _huge_pages = if config.backend == BackendChoice::Hugetlb {
        Some(
            gmem::hugetlb::HugePageReservation::for_bytes(config.size)
                .map_err(|error| error.to_string())?,
        )
    } else {
        None
    };
    let luod = if config.modes.contains(&Mode::Luod) {
        Some(LuodThread::start(run_dir.0.join("luod.sock"))?)
    } else {
        None
    };
    let mut run = Run {
        config,
        listener,
        control,
        current: None,
        current_pid: 0,
        pids: Vec::new(),
        report: DemoReport {
            size: config.size,
            vcpus: config.vcpus,
            backend: format!("{:?}", config.backend).to_lowercase(),
            kvm: !config.host_threads,
            load_before: load_average(),
            ..DemoReport::default()
        },
        last_progress: Progress::default(),
        observer,
    };
    let result = run.drive(&run_dir.0, luod.as_ref().map(|luod| luod.socket.clone()));
    if let Err(problem) = result {
        run.report.problems.push(problem);
    }
    run.reap();
    drop(luod);
    run.report.load_after = load_average();
    run.judge();
    Ok(run.report)
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    // Relaxed: only uniqueness within this process matters.
    NEXT.fetch_add(1, Ordering::Relaxed)
}

impl Run<'_> {
    fn drive(&mut self, run_dir: &std::path::Path, luod: Option<PathBuf>) -> Result<(), String> {
        self.start_first()?;
        for update in 1..=self.config.updates {
            self.let_guest_run(self.config.interval)?;
            let mode = self.config.modes[(update as usize - 1) % self.config.modes.len()];
            let request = UpdateRequest {
                update,
                mode,
                prefault: self.config.prefault,
                luod_socket: luod.clone(),
                run_dir: run_dir.to_path_buf(),
                recovery_window_ms: self.config.recovery_window.as_millis() as u64,
                frozen_hold_ms: self.config.frozen_hold_ms,
                handler: self.config.handler,
                inject: self
                    .config
                    .injections
                    .iter()
                    .find(|(number, _)| *number == update)
                    .map(|(_, injection)| *injection),
            };
            let mut row = self.update(request)?;
            if matches!(row.outcome, Outcome::Completed) {
                self.check_parked_pages(&mut row)?;
            }
            let stop = matches!(row.outcome, Outcome::Failed { .. });
            (self.observer)(DemoEvent::UpdateEnded(&row));
            self.report.updates.push(row);
            if stop {
                return Err(format!("update {update} lost the guest"));
            }
        }
        self.let_guest_run(self.config.interval.min(Duration::from_secs(1)))?;
        (self.observer)(DemoEvent::Finishing);
        self.finish()
    }

    fn start_first(&mut self) -> Result<(), String> {
        let mut arguments = self.config.leading.clone();
        if self.config.host_threads {
            arguments.push("--host-threads".into());
        }
        if self.config.prefill {
            arguments.push("--prefill".into());
        }
        let extra: [OsString; 10] = [
            "--control".into(),
            self.control.clone().into(),
            "--role".into(),
            "boot".into(),
            "--size".into(),
            self.config.size.to_string().into(),
            "--vcpus".into(),
            self.config.vcpus.to_string().into(),
            "--backend".into(),
            format!("{:?}", self.config.backend).to_lowercase().into(),
        ];
        arguments.extend(extra);
        let child = Command::new(&self.config.program)
            .args(arguments)
            .stdin(Stdio::null())
            .spawn()
            .map_err(|error| format!("starting {}: {error}", self.config.program.display()))?;
        self.pids.push(child.id());
        // Reaped with waitpid(-1) like the successors: dropping the handle
        // neither waits nor kills.
        drop(child);
        let deadline = Instant::now() + HELLO_TIMEOUT;
        let mut connection = self.accept(deadline)?;
        self.expect_hello(&mut connection, deadline)?;
        self.current = Some(connection);
        Ok(())
    }

    fn accept(&mut self, deadline: Instant) -> Result<VmmConnection, String> {
        loop {
            if let Some(connection) = self.try_accept()? {
                return Ok(connection);
            }
            if Instant::now() >= deadline {
                return Err("no VMM process connected in time".into());
            }
            std::thread::sleep(TICK);
        }
    }

    fn try_accept(&mut self) -> Result<Option<VmmConnection>, String> {
        match self.listener.accept() {
            Ok((stream, _)) => {
                stream
                    .set_nonblocking(false)
                    .map_err(|error| format!("control connection: {error}"))?;
                VmmConnection::new(stream)
                    .map(Some)
                    .map_err(|error| format!("control connection: {error}"))
            }
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => Ok(None),
            Err(error) => Err(format!("accepting a VMM: {error}")),
        }
    }

    fn expect_hello(
        &mut self,
        connection: &mut VmmConnection,
        deadline: Instant,
    ) -> Result<(), String> {
        loop {
            match connection.receive(TICK) {
                Ok(Some(Event::Hello {
                    generation, pid, ..
                })) => {
                    self.note_hello(generation, pid);
                    return Ok(());
                }
                Ok(Some(Event::Fatal { error, .. })) => return Err(error),
                Ok(Some(other)) => return Err(format!("expected a hello, got {other:?}")),
                Ok(None) => {}
                Err(error) => return Err(format!("a VMM went away before its hello: {error}")),
            }
            if Instant::now() >= deadline {
                return Err("the VMM did not say hello in time".into());
            }
        }
    }

    fn note_hello(&mut self, generation: u32, pid: u32) {
        self.current_pid = pid;
        if !self.pids.contains(&pid) {
            self.pids.push(pid);
        }
        if let Some(fds) = open_fds(pid) {
            self.report.open_fds.push((generation, fds));
        }
        (self.observer)(DemoEvent::Hello { generation, pid });
    }

    /// Reads progress from the current VMM for `duration`.
    fn let_guest_run(&mut self, duration: Duration) -> Result<(), String> {
        let until = Instant::now() + duration;
        while Instant::now() < until {
            let Some(current) = self.current.as_mut() else {
                return Err("no VMM runs the guest".into());
            };
            match current.receive(Duration::from_millis(20)) {
                Ok(Some(Event::Progress(progress))) => {
                    (self.observer)(DemoEvent::Progress(&progress));
                    self.last_progress = progress;
                }
                Ok(Some(Event::Fatal { error, .. })) => return Err(error),
                Ok(Some(other)) => tracing::debug!(?other, "event while the guest runs"),
                Ok(None) => {}
                Err(error) => return Err(format!("the VMM went away: {error}")),
            }
        }
        Ok(())
    }

    fn update(&mut self, request: UpdateRequest) -> Result<UpdateRow, String> {
        let mut row = UpdateRow {
            update: request.update,
            mode: request.mode,
            injected: request.inject,
            ..UpdateRow::default()
        };
        (self.observer)(DemoEvent::UpdateStarted {
            update: request.update,
            mode: request.mode,
        });
        let Some(mut current) = self.current.take() else {
            return Err("no VMM runs the guest".into());
        };
        let old_pid = self.current_pid;
        let fds_before = open_fds(old_pid);
        current
            .send(&ControlCommand::Update(request.clone()))
            .map_err(|error| format!("sending update {}: {error}", request.update))?;
        let mut old_alive = true;
        let mut successor: Option<VmmConnection> = None;
        let budget = UPDATE_TIMEOUT
            + self.config.recovery_window
            + if request.prefault {
                Duration::from_secs(15 * self.config.size.div_ceil(1 << 30))
            } else {
                Duration::ZERO
            };
        let deadline = Instant::now() + budget;
        loop {
            if old_alive {
                match current.receive(TICK) {
                    Ok(Some(Event::OldSide(side))) => row.old = Some(*side),
                    Ok(Some(Event::UpdateFailed {
                        error,
                        guest_running,
                        frozen,
                        ..
                    })) => {
                        row.outcome = if guest_running {
                            self.current = Some(current);
                            let fds_after = open_fds(old_pid);
                            if fds_after != fds_before {
                                self.report.problems.push(format!(
                                    "update {}: the aborted VMM holds {fds_after:?} fds, {fds_before:?} before",
                                    request.update
                                ));
                            }
                            Outcome::Aborted { error, frozen }
                        } else {
                            Outcome::Failed { error }
                        };
                        return Ok(row);
                    }
                    Ok(Some(Event::Progress(progress))) => self.last_progress = progress,
                    Ok(Some(Event::Fatal { error, .. })) => {
                        row.outcome = Outcome::Failed { error };
                        return Ok(row);
                    }
                    Ok(Some(_)) | Ok(None) => {}
                    Err(_) => old_alive = false,
                }
            }
            if successor.is_none() {
                successor = self.try_accept()?;
            }
            if let Some(connection) = successor.as_mut() {
                match connection.receive(TICK) {
                    // A process of an earlier, aborted update (a transfer
                    // successor that failed after its old VMM gave up).
                    Ok(Some(Event::Hello { update, .. } | Event::Fatal { update, .. }))
                        if update != request.update =>
                    {
                        tracing::warn!(update, "ignoring a VMM of an earlier update");
                        successor = None;
                    }
                    Ok(Some(Event::Hello {
                        generation, pid, ..
                    })) => self.note_hello(generation, pid),
                    Ok(Some(Event::NewSide(side))) => {
                        row.new = Some(*side);
                        self.current = successor.take();
                        row.derived = derive(&row, &self.last_progress);
                        if let Some(new) = &row.new {
                            self.last_progress = new.guest.clone();
                        }
                        return Ok(row);
                    }
                    Ok(Some(Event::Fatal { error, .. })) => {
                        row.outcome = Outcome::Failed { error };
                        return Ok(row);
                    }
                    Ok(Some(_)) | Ok(None) => {}
                    Err(error) => {
                        row.outcome = Outcome::Failed {
                            error: format!("the successor went away: {error}"),
                        };
                        return Ok(row);
                    }
                }
            }
            if Instant::now() >= deadline {
                row.outcome = Outcome::Failed {
                    error: format!("update {} did not complete in {budget:?}", request.update),
                };
                return Ok(row);
            }
        }
    }

    /// Asks the successor whether every page that parked in the old
    /// process exists now.
    fn check_parked_pages(&mut self, row: &mut UpdateRow) -> Result<(), String> {
        let pages = row
            .old
            .as_ref()
            .map(|old| old.parked_pages.clone())
            .unwrap_or_default();
        let Some(current) = self.current.as_mut() else {
            return Err("no VMM runs the guest".into());
        };
        current
            .send(&ControlCommand::CheckPresent { pages })
            .map_err(|error| format!("asking for the parked pages: {error}"))?;
        let deadline = Instant::now() + HELLO_TIMEOUT;
        loop {
            match current.receive(Duration::from_millis(20)) {
                Ok(Some(Event::Present { checked, missing })) => {
                    let derived = &mut row.derived;
                    derived.parked_pages_checked = checked;
                    derived.faults_served = checked.saturating_sub(missing.len() as u64);
                    derived.faults_unserved += missing.len() as u64;
                    derived.parked_pages_missing = missing;
                    return Ok(());
                }
                Ok(Some(Event::Progress(progress))) => self.last_progress = progress,
                Ok(Some(Event::Fatal { error, .. })) => return Err(error),
                Ok(Some(_)) | Ok(None) => {}
                Err(error) => return Err(format!("the VMM went away: {error}")),
            }
            if Instant::now() >= deadline {
                return Err("no answer about the parked pages".into());
            }
        }
    }

    fn finish(&mut self) -> Result<(), String> {
        let Some(current) = self.current.as_mut() else {
            return Err("no VMM runs the guest".into());
        };
        current
            .send(&ControlCommand::Finish)
            .map_err(|error| format!("asking for the final check: {error}"))?;
        let deadline = Instant::now() + FINAL_TIMEOUT;
        loop {
            match current.receive(Duration::from_millis(20)) {
                Ok(Some(Event::Final(report))) => {
                    self.report.final_check = Some(*report);
                    return Ok(());
                }
                Ok(Some(Event::Fatal { error, .. })) => return Err(error),
                Ok(Some(_)) | Ok(None) => {}
                Err(error) => {
                    return Err(format!("the VMM went away during the final check: {error}"));
                }
            }
            if Instant::now() >= deadline {
                return Err("the final check did not complete in time".into());
            }
        }
    }

    /// Waits for every VMM process (children and orphans reparented here);
    /// kills what is left after the timeout.
    fn reap(&mut self) {
        self.current = None;
        let deadline = Instant::now() + REAP_TIMEOUT;
        loop {
            let mut status = 0;
            // SAFETY: waitpid with a valid status pointer; WNOHANG never
            // blocks.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid > 0 {
                let code = if libc::WIFEXITED(status) {
                    libc::WEXITSTATUS(status)
                } else {
                    -1
                };
                // An injected successor that dies before the switch exits 3.
                let injected_death =
                    code == 3
                        && self.config.injections.iter().any(|(_, injection)| {
                            *injection == Injection::SuccessorDiesBeforeSwitch
                        });
                if code != 0 && !injected_death {
                    self.report
                        .bad_exits
                        .push(format!("pid {pid} exited with status {status:#x}"));
                }
                continue;
            }
            if pid < 0 {
                return; // ECHILD: nothing left.
            }
            if Instant::now() >= deadline {
                for pid in &self.pids {
                    // SAFETY: kill only sends a signal; a pid that already
                    // exited and was reaped may have been reused, but these
                    // are pids of this process's own children or orphans
                    // reparented to it, still unreaped (so not reused).
                    unsafe { libc::kill(*pid as i32, libc::SIGKILL) };
                }
                self.report
                    .bad_exits
                    .push("VMM processes were still running at the end and were killed".into());
                std::thread::sleep(Duration::from_millis(100));
                // One more pass reaps them.
                while {
                    let mut status = 0;
                    // SAFETY: as above.
                    unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) > 0 }
                } {}
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Records every problem of the run in `report.problems`.
    fn judge(&mut self) {
        let report = &mut self.report;
        let mut problems = Vec::new();
        for row in &report.updates {
            let name = format!("update {} ({})", row.update, row.mode);
            match (&row.outcome, row.injected) {
                (Outcome::Completed, None) => {}
                (Outcome::Completed, Some(injection)) => {
                    problems.push(format!(
                        "{name}: completed despite the injected {injection:?}"
                    ));
                }
                (Outcome::Aborted { frozen, .. }, Some(_)) => {
                    if *frozen {
                        problems.push(format!("{name}: the memory stayed frozen after the abort"));
                    }
                }
                (Outcome::Aborted { error, .. }, None) | (Outcome::Failed { error }, _) => {
                    problems.push(format!("{name}: {error}"));
                }
            }
            if let Some(new) = &row.new {
                if new.guest_gaps_ns.iter().any(Option::is_none) || new.guest_gaps_ns.is_empty() {
                    problems.push(format!("{name}: the guest's gap measurement is missing"));
                }
                if !row.derived.parked_pages_missing.is_empty() {
                    problems.push(format!(
                        "{name}: pages {:?} parked in the old VMM were never allocated",
                        row.derived.parked_pages_missing
                    ));
                }
                if row.derived.faults_unserved > 0 {
                    problems.push(format!(
                        "{name}: {} faults were never served",
                        row.derived.faults_unserved
                    ));
                }
            }
            if row.derived.mismatches > 0 {
                problems.push(format!(
                    "{name}: the guest reported {} mismatches",
                    row.derived.mismatches
                ));
            }
        }
        match &report.final_check {
            Some(done) => {
                let guest_mismatches: u64 = done
                    .guest
                    .iter()
                    .map(|vcpu| vcpu.mismatches + vcpu.register_mismatches)
                    .sum();
                if guest_mismatches > 0 {
                    problems.push(format!("the guest found {guest_mismatches} mismatches"));
                }
                if done.pages.mismatches > 0 {
                    problems.push(format!(
                        "the host found {} mismatched pages (first at {:#x?})",
                        done.pages.mismatches, done.pages.first_mismatch
                    ));
                }
                if done.guest.iter().any(|vcpu| !vcpu.done) {
                    problems.push("a vCPU did not complete its final check".into());
                }
                if done.frozen {
                    problems.push("the guest memory file was still frozen at the end".into());
                }
                if done.faults.parked_now > 0 {
                    problems.push(format!(
                        "{} faults were never served in the last VMM",
                        done.faults.parked_now
                    ));
                }
            }
            None => problems.push("no final check".into()),
        }
        // The first VMM of a kvm-backend run also holds gmem's holder VM
        // (/dev/kvm and a VM fd), which created the guest_memfd; its
        // successors got the file without it.
        let compared: Vec<u64> = report
            .open_fds
            .iter()
            .filter(|(generation, _)| {
                !(self.config.backend == BackendChoice::Kvm && *generation == 0)
            })
            .map(|(_, fds)| *fds)
            .collect();
        if compared.windows(2).any(|pair| pair[0] != pair[1]) {
            problems.push(format!(
                "VMM generations hold different numbers of fds (a leak): {:?}",
                report.open_fds
            ));
        }
        problems.extend(report.bad_exits.iter().cloned());
        report.problems.extend(problems);
    }
}

/// The number of fds process `pid` has open.
fn open_fds(pid: u32) -> Option<u64> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()
        .map(|entries| entries.count() as u64)
}

/// Figures of a completed update; `before` is the guest's progress as last
/// reported before it.
fn derive(row: &UpdateRow, before: &Progress) -> Derived {
    let (Some(old), Some(new)) = (&row.old, &row.new) else {
        return Derived::default();
    };
    let between = |from: u64, to: u64| (to > from).then(|| Duration::from_nanos(to - from));
    let guest_gap = new
        .guest_gaps_ns
        .iter()
        .flatten()
        .max()
        .map(|ns| Duration::from_nanos(*ns));
    let recovery = if new.recovery.iter().all(|vcpu| vcpu.recovery.is_some()) {
        new.recovery.iter().filter_map(|vcpu| vcpu.recovery).max()
    } else {
        None
    };
    let after = &new.guest;
    let khz = u64::from(new.tsc_khz.max(1));
    let idle_before_kick = new
        .stop_tsc
        .iter()
        .map(|stop| old.kicked_tsc.saturating_sub(*stop) * 1_000_000 / khz)
        .max()
        .map(Duration::from_nanos);
    let guest_gap_from_kick = new
        .guest_gaps_ns
        .iter()
        .zip(&new.stop_tsc)
        .filter_map(|(gap, stop)| {
            let idle = old.kicked_tsc.saturating_sub(*stop) * 1_000_000 / khz;
            gap.map(|gap| gap.saturating_sub(idle))
        })
        .max()
        .map(Duration::from_nanos);
    Derived {
        idle_before_kick,
        guest_gap_from_kick,
        host_blackout: between(old.last_stop_ns, new.first_entry_ns),
        guest_gap,
        recovery,
        handover: between(old.successor_started_ns, new.finished_ns),
        frozen_window: between(old.frozen_ns, new.finished_ns),
        pages_verified: after.pages_verified.saturating_sub(before.pages_verified),
        mismatches: (after.mismatches + after.register_mismatches)
            .saturating_sub(before.mismatches + before.register_mismatches),
        faults_parked: old.parked_pages.len() as u64,
        successor_parked: new.faults_parked_before_finish,
        faults_unserved: new.faults.parked_now,
        ..Derived::default()
    }
}

fn milliseconds(duration: Option<Duration>) -> String {
    duration.map_or_else(
        || "-".into(),
        |duration| format!("{:.3}", duration.as_secs_f64() * 1e3),
    )
}

impl DemoReport {
    /// The summary table, one row per update, times in milliseconds.
    pub fn table(&self) -> String {
        let mut out = String::new();
        // (header, width) per column; a row is an array of the same length,
        // so the compiler keeps cells and headers in step.
        const COLUMNS: [(&str, usize); 21] = [
            ("#", 2),
            ("mode", 8),
            ("outcome", 8),
            ("preserve", 8),
            ("stop", 6),
            ("save", 6),
            ("handover", 8),
            ("retrieve", 8),
            ("build", 7),
            ("restore", 7),
            ("finish", 6),
            ("host blk", 8),
            ("guest gap", 9),
            ("from kick", 9),
            ("recovery", 9),
            ("start->fin", 10),
            ("verified", 8),
            ("mism", 4),
            ("parked", 6),
            ("served", 6),
            ("unserved", 8),
        ];
        let line = |cells: [String; 21]| -> String {
            cells
                .iter()
                .zip(COLUMNS)
                .map(|(cell, (_, width))| format!("{cell:>width$}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        out.push_str(&line(COLUMNS.map(|(name, _)| name.to_owned())));
        out.push('\n');
        for row in &self.updates {
            let outcome = match &row.outcome {
                Outcome::Completed => "ok",
                Outcome::Aborted { .. } => "aborted",
                Outcome::Failed { .. } => "FAILED",
            };
            let old = row.old.clone().unwrap_or_default();
            let new = row.new.clone().unwrap_or_default();
            let have_old = row.old.is_some();
            let have_new = row.new.is_some();
            let ms = |duration: Duration, present: bool| milliseconds(present.then_some(duration));
            let derived = &row.derived;
            let cells = [
                row.update.to_string(),
                row.mode.to_string(),
                outcome.to_string(),
                ms(old.phases.preserve, have_old),
                ms(old.phases.stop, have_old),
                ms(old.phases.save, have_old),
                ms(old.phases.handover, have_old),
                ms(new.phases.retrieve, have_new),
                ms(
                    new.phases.adopt + new.phases.build.total() + new.phases.arm,
                    have_new,
                ),
                ms(new.phases.read_state + new.phases.restore, have_new),
                ms(new.phases.finish, have_new),
                milliseconds(derived.host_blackout),
                milliseconds(derived.guest_gap),
                milliseconds(derived.guest_gap_from_kick),
                if have_new {
                    milliseconds(derived.recovery).replace('-', "> window")
                } else {
                    "-".into()
                },
                milliseconds(derived.handover),
                derived.pages_verified.to_string(),
                derived.mismatches.to_string(),
                derived.faults_parked.to_string(),
                derived.faults_served.to_string(),
                derived.faults_unserved.to_string(),
            ];
            out.push_str(&line(cells));
            out.push('\n');
        }
        out
    }
}
