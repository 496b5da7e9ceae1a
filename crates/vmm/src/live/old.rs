//! The old process's side of a live update (steps 1 to 5 of the module
//! documentation of [`super`]).
//!
//! Success ends the process (exec replaces it; after transfer and luod it
//! exits), so [`update`] returns only when the update failed; the returned
//! [`Failed`] says whether the guest still runs here.
//!
//! Abort rule: until the handover call succeeds the old process owns the
//! guest. Any failure before that restarts the stopped vCPUs (if they were
//! stopped) and closes the session, which unpreserves the memory file and
//! so unfreezes it; faults parked meanwhile are then served by this
//! process's fault service and the guest carries on.

use std::ffi::OsString;
use std::os::fd::{AsFd, OwnedFd};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use fault_service::FaultEvent;
use liveupdate::luod::LuodClient;
use liveupdate::transport::transfer::{TransferLink, TransferListener};
use liveupdate::{LiveUpdate, Session};

use super::control::{ControlLink, Event};
use super::process::{Launcher, Role};
use super::report::OldSide;
use super::vm::{Cpus, LiveVm};
use super::{Injection, MEMORY_TOKEN, Mode, STATE_TOKEN, UpdateRequest, session_name};
use crate::guest::arm_gap_probe;
use crate::host_cpus::{HostCpus, ThreadsRecord};
use crate::machine::{Machine, StopError};
use crate::parked::{stop_frozen, stop_threads_frozen};
use crate::state::MachineState;
use crate::time::instant_ns;
use crate::vcpu::ExitHandler;

/// How long the kick waits before a vCPU counts as stuck in a fault.
const KICK_WAIT: Duration = Duration::from_millis(50);
/// How long a stuck vCPU may take to stop once its fault is served.
const SERVED_WAIT: Duration = Duration::from_secs(5);
/// How long a transfer successor may take to connect.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a transfer successor may take to build (and prefault) its VM:
/// prefaulting 8 GiB of 4 KiB pages takes about 15 s here.
const BUILD_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the vCPUs run between a transfer successor's "ready" and the
/// kick. The successor builds its VM in a burst of CPU use just before it
/// answers, and on a host with no spare CPU that burst leaves a vCPU
/// thread waiting for a CPU; kicked at once, that wait joins the blackout
/// the guest sees (about 0.3 to 0.4 ms here). A moment on the CPUs first
/// keeps it out. It costs frozen time, not blackout: the guest runs
/// meanwhile. Measured with `live_bench`, 2 vCPUs on 2 CPUs: guest-seen
/// gap medians 0.89 to 1.06 ms with it, 1.14 to 1.34 ms without.
const SETTLE_BEFORE_KICK: Duration = Duration::from_millis(1);

/// An update that failed.
#[derive(Debug)]
pub(crate) struct Failed {
    /// What failed.
    pub(crate) error: String,
    /// Whether the guest still runs in this process.
    pub(crate) guest_running: bool,
}

/// The session of one update.
struct Preserved {
    live_update: LiveUpdate,
    session: Session,
    slot: OwnedFd,
    name: String,
}

/// The guest's CPUs, stopped with their state saved.
enum Stopped {
    /// The old VM, its vCPUs stopped (still able to run again).
    Kvm(Box<Machine>),
    /// The host threads, ended (their state is in the control blocks).
    Threads,
}

/// What the old side has measured so far.
#[derive(Default)]
struct Clock {
    side: OldSide,
    /// The fault service's `parked` counter just before the file froze.
    parked_at_freeze: u64,
    /// How long to run frozen before the stop.
    frozen_hold: Duration,
}

/// Runs one update; returns only on failure (see the module documentation).
pub(crate) fn update(
    vm: &mut LiveVm,
    request: &UpdateRequest,
    link: &mut ControlLink,
    launcher: &Launcher,
) -> Failed {
    let requested = Instant::now();
    let mut clock = Clock::default();
    clock.side.update = request.update;
    clock.side.mode = request.mode;
    clock.side.generation = vm.generation;
    clock.side.requested_ns = instant_ns(requested);
    clock.frozen_hold = Duration::from_millis(request.frozen_hold_ms);
    // Baselines taken before the preserve: a fault can park as soon as the
    // gmem handler has frozen the file, before the preserve returns.
    clock.parked_at_freeze = vm.backing.fault_counters().parked;
    let _ = vm.backing.drain_fault_events();
    let preserved = match preserve(vm, request) {
        Ok(preserved) => preserved,
        Err(error) => {
            return Failed {
                error,
                guest_running: true,
            };
        }
    };
    let frozen_at = Instant::now();
    clock.side.frozen_ns = instant_ns(frozen_at);
    clock.side.phases.preserve = frozen_at - requested;
    let result = match request.mode {
        Mode::Exec => exec(vm, request, link, launcher, &preserved, &mut clock),
        Mode::Transfer => transfer(vm, request, link, launcher, &preserved, &mut clock),
        Mode::Luod => luod(vm, request, link, launcher, &preserved, &mut clock),
    };
    // Only failures get here.
    let (error, machine) = match result {
        Err(failure) => failure,
        Ok(never) => match never {},
    };
    abort(vm, machine, preserved, error)
}

/// Puts the guest back: restarts stopped vCPUs, closes the session.
fn abort(vm: &mut LiveVm, stopped: Option<Stopped>, preserved: Preserved, error: String) -> Failed {
    tracing::warn!(%error, "live update failed; the guest carries on in this process");
    let restarted = match stopped {
        None => Ok(()),
        Some(Stopped::Kvm(machine)) => {
            let handler: Arc<dyn ExitHandler> = vm.monitor.clone();
            machine
                .start(handler)
                .map(|running| vm.cpus = Some(Cpus::Kvm(running)))
        }
        Some(Stopped::Threads) => HostCpus::start(vm.memory(), vm.layout)
            .map(|threads| vm.cpus = Some(Cpus::Threads(threads))),
    };
    if let Err(restart) = restarted {
        tracing::error!(%restart, "cannot restart the stopped guest");
    }
    let guest_running = vm.cpus.is_some();
    // Closing the session unpreserves the files: the memory file unfreezes
    // and the fault service serves what parked meanwhile.
    drop(preserved.session);
    drop(preserved.live_update);
    drop(preserved.slot);
    Failed {
        error,
        guest_running,
    }
}

/// Uninhabited: the success of a handover never comes back.
enum Never {}

type Step<T> = Result<T, (String, Option<Stopped>)>;

fn running_failure<E: std::fmt::Display>(
    context: &'static str,
) -> impl FnOnce(E) -> (String, Option<Stopped>) {
    move |error| (format!("{context}: {error}"), None)
}

/// Step 1: the session with the memory file (frozen by its handler) and a
/// fresh state slot.
fn preserve(vm: &LiveVm, request: &UpdateRequest) -> Result<Preserved, String> {
    let slot = MachineState::new_slot(vm.layout.vcpus())
        .map_err(|error| format!("creating the state slot: {error}"))?;
    let registry = super::handler::registry(request.handler)
        .map_err(|error| format!("registering the file handlers: {error}"))?;
    let live_update = LiveUpdate::new(registry);
    let name = session_name(std::process::id(), request.update);
    let session = live_update
        .create_session(&name)
        .map_err(|error| format!("creating session {name}: {error}"))?;
    session
        .preserve(MEMORY_TOKEN, vm.backing.file().as_fd())
        .map_err(|error| format!("preserving the guest memory file: {error}"))?;
    session
        .preserve(STATE_TOKEN, &slot)
        .map_err(|error| format!("preserving the state slot: {error}"))?;
    Ok(Preserved {
        live_update,
        session,
        slot,
        name,
    })
}

/// Steps 3 and 4: stop (with the parked step), save into the slot, arm the
/// guest's gap probe. On failure the guest is running again, or the stopped
/// CPUs come back in the error.
fn stop_and_save(vm: &mut LiveVm, preserved: &Preserved, clock: &mut Clock) -> Step<Stopped> {
    let Some(cpus) = vm.cpus.take() else {
        return Err(("no running guest to update".into(), None));
    };
    // The frozen hold ends early once every vCPU is parked in a fault.
    let hold_until = Instant::now() + clock.frozen_hold;
    while Instant::now() < hold_until
        && vm.backing.fault_counters().parked_now < u64::from(vm.layout.vcpus())
    {
        std::thread::sleep(Duration::from_millis(1));
    }
    clock.side.faults_parked_before_stop = vm
        .backing
        .fault_counters()
        .parked
        .saturating_sub(clock.parked_at_freeze);
    let kicked = Instant::now();
    clock.side.kicked_tsc = crate::state::tsc::host_tsc();
    let (stopped, last_stop, record) = match cpus {
        Cpus::Kvm(running) => {
            let (machine, report, state, step) =
                match stop_frozen(running, &vm.backing, KICK_WAIT, SERVED_WAIT) {
                    Ok(stopped) => stopped,
                    Err(StopError::Running(running, error)) => {
                        vm.cpus = Some(Cpus::Kvm(*running));
                        return Err((format!("stopping the vCPUs: {error}"), None));
                    }
                    Err(StopError::Captured(machine, error)) => {
                        return Err((
                            format!("capturing the vCPU state: {error}"),
                            Some(Stopped::Kvm(machine)),
                        ));
                    }
                    Err(StopError::Lost(error)) => {
                        return Err((format!("a vCPU thread was lost: {error}"), None));
                    }
                };
            clock.side.parked = step;
            let record = state.write_to_slot(&preserved.slot);
            (
                Stopped::Kvm(Box::new(machine)),
                report.last_stopped_at,
                record,
            )
        }
        Cpus::Threads(threads) => {
            match stop_threads_frozen(threads, &vm.backing, KICK_WAIT, SERVED_WAIT) {
                Ok(step) => clock.side.parked = step,
                Err((threads, stuck)) => {
                    vm.cpus = Some(Cpus::Threads(threads));
                    return Err((format!("host threads {stuck:?} did not stop"), None));
                }
            }
            let record = ThreadsRecord {
                vcpus: vm.layout.vcpus(),
                tsc_khz: vm.tsc_khz,
                memory_size: vm.memory().size(),
            };
            let written = record.write(preserved.slot.as_fd()).map(|()| 0);
            (Stopped::Threads, Instant::now(), written)
        }
    };
    clock.side.kicked_ns = instant_ns(kicked);
    clock.side.last_stop_ns = instant_ns(last_stop);
    clock.side.phases.stop = last_stop.saturating_duration_since(kicked);
    let written =
        record.and_then(|bytes| arm_gap_probe(vm.memory().view(), &vm.layout).map(|()| bytes));
    match written {
        Ok(bytes) => clock.side.state_bytes = bytes,
        Err(error) => return Err((format!("saving the vCPU state: {error}"), Some(stopped))),
    }
    clock.side.phases.save = last_stop.elapsed();
    clock.side.guest_at_stop = vm.progress_light();
    Ok(stopped)
}

/// The arguments a successor of `role` gets, after the launcher's own.
fn successor_arguments(
    vm: &LiveVm,
    request: &UpdateRequest,
    preserved: &Preserved,
    role: Role,
) -> Vec<OsString> {
    let mut arguments: Vec<OsString> = vec![
        "--role".into(),
        role.to_string().into(),
        "--generation".into(),
        (vm.generation + 1).to_string().into(),
        "--update".into(),
        request.update.to_string().into(),
        "--session".into(),
        preserved.name.clone().into(),
        "--vcpus".into(),
        vm.layout.vcpus().to_string().into(),
        "--recovery-window-ms".into(),
        request.recovery_window_ms.to_string().into(),
    ];
    if request.prefault {
        arguments.push("--prefault".into());
    }
    if !vm.in_kvm() {
        arguments.push("--host-threads".into());
    }
    arguments.push("--handler".into());
    arguments.push(
        match request.handler {
            super::handler::HandlerChoice::Cached => "cached",
            super::handler::HandlerChoice::Builtin => "builtin",
        }
        .into(),
    );
    if request.inject == Some(Injection::SuccessorDiesBeforeSwitch) {
        arguments.push("--die-before-switch".into());
    }
    arguments
}

/// The program to start or exec (a missing one when the test asks).
fn successor_program(launcher: &Launcher, request: &UpdateRequest) -> std::path::PathBuf {
    if request.inject == Some(Injection::MissingSuccessor) {
        launcher.program.with_file_name("gmem-lu-missing-successor")
    } else {
        launcher.program.clone()
    }
}

fn spawn(
    launcher: &Launcher,
    request: &UpdateRequest,
    extra: Vec<OsString>,
) -> std::io::Result<Child> {
    Command::new(successor_program(launcher, request))
        .args(launcher.all_arguments(extra))
        .stdin(Stdio::null())
        .spawn()
}

/// The pages of the faults parked since the freeze, from the fault
/// service's events. An event is sent just after its fault is counted, so
/// wait (briefly) until there are as many as the counter says.
fn collect_parked_pages(vm: &LiveVm, clock: &mut Clock) {
    const EVENT_LAG: Duration = Duration::from_millis(20);
    let expected = vm
        .backing
        .fault_counters()
        .parked
        .saturating_sub(clock.parked_at_freeze) as usize;
    let deadline = Instant::now() + EVENT_LAG;
    loop {
        clock
            .side
            .parked_pages
            .extend(
                vm.backing
                    .drain_fault_events()
                    .into_iter()
                    .filter_map(|event| match event {
                        FaultEvent::Parked { index, .. } => Some(index.0),
                        _ => None,
                    }),
            );
        if clock.side.parked_pages.len() >= expected || Instant::now() >= deadline {
            return;
        }
        std::thread::sleep(Duration::from_micros(100));
    }
}

/// Tells the controller the old side is done.
fn report_old_side(link: &mut ControlLink, vm: &LiveVm, clock: &mut Clock) {
    collect_parked_pages(vm, clock);
    if let Err(error) = link.send(&Event::OldSide(Box::new(clock.side.clone()))) {
        tracing::warn!(%error, "cannot report the old side to the controller");
    }
}

/// The guest is the successor's now: let go of the old VM at idle priority
/// (destroying it frees all its shadow pages, milliseconds of CPU that
/// would otherwise compete with the resumed vCPUs) and exit.
fn retire_and_exit(stopped: Stopped) -> ! {
    // SAFETY: sched_setscheduler on the calling thread (pid 0) with a valid
    // sched_param; it changes only this thread's scheduling.
    unsafe {
        let parameters = libc::sched_param { sched_priority: 0 };
        libc::sched_setscheduler(0, libc::SCHED_IDLE, &parameters);
    }
    drop(stopped);
    std::process::exit(0)
}

fn exec(
    vm: &mut LiveVm,
    request: &UpdateRequest,
    link: &mut ControlLink,
    launcher: &Launcher,
    preserved: &Preserved,
    clock: &mut Clock,
) -> Step<Never> {
    let saved = stop_and_save(vm, preserved, clock)?;
    let arguments = launcher.all_arguments(successor_arguments(vm, request, preserved, Role::Exec));
    let arguments: Vec<&std::ffi::OsStr> = arguments.iter().map(OsString::as_os_str).collect();
    let program = successor_program(launcher, request);
    clock.side.successor_started_ns = crate::time::monotonic_ns();
    report_old_side(link, vm, clock);
    // Returns only if the exec failed (the handover is then aborted).
    let error =
        liveupdate::transport::exec::exec_in_place(&preserved.live_update, &program, &arguments);
    Err((
        format!("exec of {}: {error}", program.display()),
        Some(saved),
    ))
}

fn transfer(
    vm: &mut LiveVm,
    request: &UpdateRequest,
    link: &mut ControlLink,
    launcher: &Launcher,
    preserved: &Preserved,
    clock: &mut Clock,
) -> Step<Never> {
    let started = Instant::now();
    let path = request.run_dir.join(format!(
        "transfer-{}-{}.sock",
        std::process::id(),
        request.update
    ));
    let _ = std::fs::remove_file(&path);
    let listener =
        TransferListener::bind(&path).map_err(running_failure("binding the transfer socket"))?;
    let mut extra = successor_arguments(vm, request, preserved, Role::Transfer);
    extra.push("--transfer-socket".into());
    extra.push(path.clone().into());
    clock.side.successor_started_ns = crate::time::monotonic_ns();
    let mut child = spawn(launcher, request, extra)
        .map_err(running_failure("starting the transfer successor"))?;
    let successor = Successor {
        listener: &listener,
        path: &path,
        child: &mut child,
        started,
    };
    let handed_over = hand_over_by_transfer(vm, preserved, clock, successor);
    let _ = std::fs::remove_file(&path);
    let saved = match handed_over {
        Ok(saved) => saved,
        Err(failure) => {
            // A successor that did not take over must never run the guest:
            // end it (it may be waiting for a switch that will not come).
            let _ = child.kill();
            let _ = child.wait();
            return Err(failure);
        }
    };
    report_old_side(link, vm, clock);
    // The successor is this process's child until it exits; the controller
    // (a child subreaper) inherits it.
    drop(child);
    retire_and_exit(saved)
}

/// A transfer successor being started.
struct Successor<'a> {
    listener: &'a TransferListener,
    path: &'a std::path::Path,
    child: &'a mut Child,
    /// When the socket was bound.
    started: Instant,
}

/// Steps 2 to 5 of a transfer, once the successor process is started: its
/// connection, the offers, the stop, the switch.
fn hand_over_by_transfer(
    vm: &mut LiveVm,
    preserved: &Preserved,
    clock: &mut Clock,
    successor: Successor<'_>,
) -> Step<Stopped> {
    let mut transfer_link = accept_within(
        successor.listener,
        successor.path,
        successor.child,
        CONNECT_TIMEOUT,
    )
    .map_err(|error| (error, None))?;
    clock.side.phases.connect = successor.started.elapsed();
    let offered = Instant::now();
    transfer_link
        .offer(&preserved.live_update)
        .map_err(running_failure("offering the session to the successor"))?;
    clock.side.phases.offer = offered.elapsed();
    // The successor builds its VM over the offered file now; it answers a
    // second offer only once it waits for the switch, i.e. is ready.
    let building = Instant::now();
    transfer_link
        .set_timeout(BUILD_TIMEOUT)
        .map_err(running_failure("setting the successor's timeout"))?;
    transfer_link
        .offer(&preserved.live_update)
        .map_err(running_failure("waiting for the successor to build its VM"))?;
    clock.side.phases.successor_build = building.elapsed();
    std::thread::sleep(SETTLE_BEFORE_KICK);
    let saved = stop_and_save(vm, preserved, clock)?;
    // The vCPU state travels in the preserved state slot, so the switch
    // needs no payload. If the explicit parked step allocated pages after
    // the offer, the delta carries the new description of the memory file,
    // and the successor brings its object built ahead up to date with it
    // before it answers the switch (or refuses, and the guest stays here).
    let switching = Instant::now();
    if let Err(error) = transfer_link.switch(&preserved.live_update, &[]) {
        return Err((format!("the switch: {error}"), Some(saved)));
    }
    clock.side.phases.handover = switching.elapsed();
    Ok(saved)
}

/// Accepts the successor's connection, giving up if it exits first or
/// does not connect within `timeout`. The listener's accept cannot time
/// out, so it runs on a helper thread; giving up connects to the socket
/// once more to release that thread.
fn accept_within(
    listener: &TransferListener,
    path: &std::path::Path,
    child: &mut Child,
    timeout: Duration,
) -> Result<TransferLink, String> {
    let (sender, receiver) = mpsc::channel();
    std::thread::scope(|scope| {
        scope.spawn(|| {
            let _ = sender.send(listener.accept());
        });
        let deadline = Instant::now() + timeout;
        let outcome = loop {
            match receiver.recv_timeout(Duration::from_millis(5)) {
                Ok(Ok(link)) => break Ok(link),
                Ok(Err(error)) => break Err(format!("accepting the successor: {error}")),
                Err(_) => {}
            }
            if let Ok(Some(status)) = child.try_wait() {
                break Err(format!(
                    "the transfer successor exited before connecting ({status})"
                ));
            }
            if Instant::now() >= deadline {
                break Err("the transfer successor did not connect in time".into());
            }
        };
        if outcome.is_err() {
            // Release the accepting thread with a connection of our own.
            let _ = std::os::unix::net::UnixStream::connect(path);
            let _ = receiver.recv_timeout(Duration::from_secs(1));
        }
        outcome
    })
}

fn luod(
    vm: &mut LiveVm,
    request: &UpdateRequest,
    link: &mut ControlLink,
    launcher: &Launcher,
    preserved: &Preserved,
    clock: &mut Clock,
) -> Step<Never> {
    let Some(socket) = request.luod_socket.clone() else {
        return Err(("luod mode needs luod's socket".into(), None));
    };
    // Connect before the stop: it is not part of the handover.
    let client = LuodClient::connect(&socket).map_err(running_failure("connecting to luod"))?;
    let saved = stop_and_save(vm, preserved, clock)?;
    let depositing = Instant::now();
    if let Err(error) = client.hand_over(&preserved.live_update) {
        return Err((format!("depositing with luod: {error}"), Some(saved)));
    }
    let mut extra = successor_arguments(vm, request, preserved, Role::Luod);
    extra.push("--luod-socket".into());
    extra.push(socket.into());
    clock.side.successor_started_ns = crate::time::monotonic_ns();
    let spawned = spawn(launcher, request, extra);
    clock.side.phases.handover = depositing.elapsed();
    match spawned {
        Ok(child) => {
            report_old_side(link, vm, clock);
            drop(child);
            retire_and_exit(saved)
        }
        Err(error) => {
            // The session is luod's now: the guest can only resume from
            // there. Say so; a later successor can still retrieve it.
            tracing::error!(%error, session = preserved.name, "the luod successor could not start; the session stays with luod");
            Err((
                format!(
                    "starting the luod successor: {error} (session {} stays with luod)",
                    preserved.name
                ),
                None,
            ))
        }
    }
}
