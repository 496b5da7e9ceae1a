//! The successor's side of a live update (steps 6 to 8 of the module
//! documentation of [`super`]).
//!
//! Success path, per role:
//! - exec: take the sessions from the environment, retrieve the memory
//!   file (frozen) and the state slot, serve the file, build the VM;
//! - luod: the same, with the sessions retrieved from luod;
//! - transfer: connect to the old process, accept its offer, rebuild the
//!   memory file object from the offer (frozen), serve it, build the VM
//!   and its waiting vCPU threads (and prefault) while the guest still runs
//!   there, then wait for the switch; the retrieve at the switch, before
//!   this process answers it, finds the object built ahead and brings it up
//!   to date if the old process allocated pages after the offer;
//!
//! then, for all: read the state, restore it and release the vCPUs, finish
//! the session (the file unfreezes; the fault service serves what parked),
//! and watch the guest for the recovery window.
//!
//! Failure paths: before the switch (transfer) a failure is reported to
//! the old process, which carries on; after it, the successor has the only
//! guest and reports the error as fatal.

use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use gmem::GuestMemFile;
use liveupdate::handlers::gmem::{descriptor_of, runs_of};
use liveupdate::handlers::gmem_data::{GMEM_COMPATIBLE, GmemData};
use liveupdate::handlers::memfd::MemfdFile;
use liveupdate::luod::LuodClient;
use liveupdate::transport::transfer::{Offer, TransferSuccessor};
use liveupdate::{Incoming, IncomingSession};

use super::handler::note_built_ahead;
use super::process::{Role, VmmArgs};
use super::report::NewSide;
use super::vm::{Cpus, LiveVm, monitor_for};
use super::{MEMORY_TOKEN, STATE_TOKEN};
use crate::backing::{Backing, pages_in};
use crate::guest::{GuestMonitor, offsets, probed_gaps};
use crate::host_cpus::{HostCpus, ThreadsRecord};
use crate::layout::{CODE_ADDRESS, CONTROL_BLOCK_BASE, GuestLayout, PAGE_SIZE, read_object};
use crate::machine::{ArmedMachine, Machine, MachineConfig};
use crate::measure::{TraceCollector, recovery};
use crate::memory::populate_mapping;
use crate::state::MachineState;
use crate::time::instant_ns;
use crate::update::wait_first_entry;
use crate::vcpu::ExitHandler;

/// The window before the stop over which the guest's former rate is taken.
const RATE_BEFORE: Duration = Duration::from_millis(100);
/// The window over which the guest's rate after the resume is compared.
const RATE_WINDOW: Duration = Duration::from_millis(5);
/// The warm-up range: control blocks, stacks and the program (allocated at
/// the first boot with the rest of the fixed area, so always populated).
const WARM_UP: std::ops::Range<u64> = CONTROL_BLOCK_BASE
    ..(CODE_ADDRESS + crate::guest::PROGRAM.len() as u64).next_multiple_of(PAGE_SIZE);

/// How often the trace rings are read during the recovery window.
const TRACE_POLL: Duration = Duration::from_millis(50);

/// A successor's failure: what failed, and whether the old process still
/// has the guest (a failure before the transfer switch).
pub(crate) type Failure = String;

/// What will run the guest here.
enum Target {
    /// A VM with its vCPU threads waiting for the state.
    Kvm(ArmedMachine),
    /// Host threads, started once the state is read.
    Threads,
}

/// The handlers this successor retrieves with: the ones its predecessor
/// preserved with.
fn registry(args: &VmmArgs) -> Result<liveupdate::HandlerRegistry, Failure> {
    super::handler::registry(args.handler)
        .map_err(|error| format!("registering the file handlers: {error}"))
}

/// The machine built over the retrieved memory, waiting for the state.
struct Built {
    backing: Backing,
    target: Target,
    monitor: Arc<GuestMonitor>,
    layout: GuestLayout,
}

/// Reads the state from the slot, restores it and lets the CPUs run;
/// returns them and the guest TSC's rate.
fn start_cpus(
    target: Target,
    slot: &MemfdFile,
    backing: &Backing,
    layout: GuestLayout,
    side: &mut NewSide,
) -> Result<(Cpus, u32), Failure> {
    let reading = Instant::now();
    match target {
        Target::Kvm(armed) => {
            let state = MachineState::from_slot(slot.as_fd())
                .map_err(|error| format!("reading the vCPU state: {error}"))?;
            side.phases.read_state = reading.elapsed();
            let restoring = Instant::now();
            let running = armed
                .go(Some(&state))
                .map_err(|error| format!("restoring the vCPU state: {error}"))?;
            let first_entry = wait_first_entry(&running, Duration::from_secs(5));
            side.phases.restore = first_entry.saturating_duration_since(restoring);
            side.first_entry_ns = instant_ns(first_entry);
            let khz = state.vcpus.first().map_or(0, |vcpu| vcpu.tsc.khz);
            Ok((Cpus::Kvm(running), khz))
        }
        Target::Threads => {
            let record = ThreadsRecord::read(slot.as_fd())
                .map_err(|error| format!("reading the host-thread state: {error}"))?;
            if record.vcpus != layout.vcpus() || record.memory_size != backing.memory().size() {
                return Err(format!(
                    "the state is for {} threads and {} bytes, this successor has {} and {}",
                    record.vcpus,
                    record.memory_size,
                    layout.vcpus(),
                    backing.memory().size()
                ));
            }
            side.phases.read_state = reading.elapsed();
            let restoring = Instant::now();
            let threads = HostCpus::start(backing.memory(), layout)
                .map_err(|error| format!("starting the host threads: {error}"))?;
            let started = Instant::now();
            side.phases.restore = started - restoring;
            side.first_entry_ns = instant_ns(started);
            Ok((Cpus::Threads(threads), record.tsc_khz))
        }
    }
}

/// Resumes the guest handed over to this process; see the module
/// documentation.
pub(crate) fn resume(args: &VmmArgs, started_ns: u64) -> Result<(LiveVm, NewSide), Failure> {
    let mut side = NewSide {
        update: args.update,
        generation: args.generation,
        started_ns,
        ..NewSide::default()
    };
    let mut luod = None;
    let (mut session, built) = match args.role {
        Role::Exec => {
            side.mode = super::Mode::Exec;
            let started = Instant::now();
            let incoming = liveupdate::transport::exec::incoming_from_environment(&registry(args)?)
                .map_err(|error| format!("taking the sessions from the exec handover: {error}"))?
                .ok_or("this process was not started by an exec handover")?;
            retrieve_and_build(args, incoming, started, &mut side)?
        }
        Role::Luod => {
            side.mode = super::Mode::Luod;
            let started = Instant::now();
            let socket = args
                .luod_socket
                .as_ref()
                .ok_or("a luod successor needs --luod-socket")?;
            let client = LuodClient::connect(socket)
                .map_err(|error| format!("connecting to luod: {error}"))?;
            let incoming = client
                .retrieve(&args.session, &registry(args)?)
                .map_err(|error| {
                    format!("retrieving session {} from luod: {error}", args.session)
                })?;
            let retrieved = retrieve_and_build(args, incoming, started, &mut side)?;
            luod = Some(client);
            retrieved
        }
        Role::Transfer => {
            side.mode = super::Mode::Transfer;
            transfer(args, &mut side)?
        }
        Role::Boot => return Err("a boot is not a successor".into()),
    };
    let slot = session
        .retrieve(STATE_TOKEN)
        .map_err(|error| format!("retrieving the state slot: {error}"))?;
    let slot = slot
        .downcast::<MemfdFile>()
        .ok_or("the state slot is not a memfd")?;
    let Built {
        backing,
        target,
        monitor,
        layout,
    } = built;
    let stop_tsc = (0..layout.vcpus())
        .map(|vcpu| {
            read_object::<u64>(
                backing.memory().view(),
                layout.control_block(vcpu) + offsets::LAST_TSC,
            )
        })
        .collect::<crate::Result<Vec<u64>>>()
        .map_err(|error| format!("reading the guest's last TSCs: {error}"))?;
    let (cpus, tsc_khz) = start_cpus(target, &slot, &backing, layout, &mut side)?;
    let finishing = Instant::now();
    side.faults_parked_before_finish = backing.fault_counters().parked;
    session
        .finish()
        .map_err(|error| format!("finishing the session: {error}"))?;
    if let Some(client) = &luod {
        client
            .finish(&args.session)
            .map_err(|error| format!("finishing the session with luod: {error}"))?;
    }
    let finished = Instant::now();
    side.phases.finish = finished - finishing;
    side.finished_ns = instant_ns(finished);
    drop(session);
    drop(luod);
    let mut vm = LiveVm {
        generation: args.generation,
        cpus: Some(cpus),
        monitor,
        collector: TraceCollector::new(layout.vcpus()),
        layout,
        tsc_khz,
        host_threads: args.host_threads,
        backing,
    };
    watch_recovery(
        &mut vm,
        &stop_tsc,
        Duration::from_millis(args.recovery_window_ms),
        &mut side,
    );
    Ok((vm, side))
}

/// Exec and luod: retrieve both files, serve the memory file, build the VM.
fn retrieve_and_build(
    args: &VmmArgs,
    mut incoming: Incoming,
    started: Instant,
    side: &mut NewSide,
) -> Result<(IncomingSession, Built), Failure> {
    let mut session = incoming
        .retrieve_session(&args.session)
        .map_err(|error| format!("retrieving session {}: {error}", args.session))?;
    let file = retrieve_memory(&mut session)?;
    let retrieved = Instant::now();
    side.retrieved_ns = instant_ns(retrieved);
    side.phases.retrieve = retrieved - started;
    let built = build(args, file, false, side)?;
    Ok((session, built))
}

fn retrieve_memory(session: &mut IncomingSession) -> Result<Arc<GuestMemFile>, Failure> {
    session
        .retrieve(MEMORY_TOKEN)
        .map_err(|error| format!("retrieving the guest memory file: {error}"))?
        .downcast::<GuestMemFile>()
        .ok_or_else(|| "the memory token is not a guest memory file".into())
}

/// Serves `file`, builds the VM over it, prefaults (or warms up) when
/// asked, and spawns the waiting vCPU threads.
fn build(
    args: &VmmArgs,
    file: Arc<GuestMemFile>,
    ahead: bool,
    side: &mut NewSide,
) -> Result<Built, Failure> {
    let adopting = Instant::now();
    let backing =
        Backing::adopt(file).map_err(|error| format!("serving the guest memory file: {error}"))?;
    side.phases.adopt = adopting.elapsed();
    let memory = Arc::clone(backing.memory());
    if args.host_threads {
        let layout = GuestLayout::new(memory.size(), args.vcpus)
            .map_err(|error| format!("the guest layout: {error}"))?;
        return Ok(Built {
            monitor: monitor_for(&memory, layout),
            backing,
            target: Target::Threads,
            layout,
        });
    }
    let mut machine = Machine::create(Arc::clone(&memory), MachineConfig { vcpus: args.vcpus })
        .map_err(|error| format!("building the VM: {error}"))?;
    side.phases.build = machine.build_timings();
    if ahead {
        // Only populated pages may be touched: the file is frozen, and a
        // touch of a hole would park this thread. Without the prefault, the
        // warm-up touches only what every vCPU uses at once (control
        // blocks, stacks, the program), which also pays each vCPU's costly
        // first KVM_RUN here rather than after the switch.
        let prefaulting = Instant::now();
        let ranges = if args.prefault {
            backing.populated_ranges()
        } else {
            vec![WARM_UP]
        };
        // Map the pages in this process first: KVM then fills up to eight
        // neighbouring shadow entries per fault from the host page tables.
        // Present pages only, so no fault reaches the (frozen) service.
        for range in &ranges {
            populate_mapping(memory.ram().as_ref(), range.start, range.end - range.start)
                .map_err(|error| format!("mapping the populated memory: {error}"))?;
        }
        machine
            .prefault(&ranges, memory.ram().page_size(), None)
            .map_err(|error| format!("prefaulting the new VM: {error}"))?;
        side.prefault_pages = pages_in(&ranges);
        side.phases.prefault = prefaulting.elapsed();
    }
    let layout = *machine.layout();
    let monitor = monitor_for(&memory, layout);
    let arming = Instant::now();
    let handler: Arc<dyn ExitHandler> = monitor.clone();
    let armed = machine
        .arm(handler)
        .map_err(|error| format!("starting the vCPU threads: {error}"))?;
    side.phases.arm = arming.elapsed();
    Ok(Built {
        backing,
        target: Target::Kvm(armed),
        monitor,
        layout,
    })
}

/// Transfer: connect, accept the offer, build ahead, wait for the switch.
fn transfer(args: &VmmArgs, side: &mut NewSide) -> Result<(IncomingSession, Built), Failure> {
    let socket = args
        .transfer_socket
        .as_ref()
        .ok_or("a transfer successor needs --transfer-socket")?;
    let mut successor = TransferSuccessor::connect(socket)
        .map_err(|error| format!("connecting to the old VMM: {error}"))?;
    let offer = successor
        .receive_offer()
        .map_err(|error| format!("receiving the offer: {error}"))?;
    if args.die_before_switch {
        tracing::warn!("exiting before the switch, as asked (--die-before-switch)");
        std::process::exit(3);
    }
    let file = restore_from_offer(offer)?;
    let built = build(args, Arc::clone(&file), true, side)?;
    let generation_ahead = file.index_generation();
    // The switch retrieves every file before this process answers it: a
    // failure there leaves the guest with the old process.
    let switched = successor
        .wait_for_switch(&registry(args)?)
        .map_err(|error| format!("waiting for the switch: {error}"))?;
    let started = Instant::now();
    let mut incoming = switched.incoming;
    let mut session = incoming
        .retrieve_session(&args.session)
        .map_err(|error| format!("retrieving session {}: {error}", args.session))?;
    let retrieved = retrieve_memory(&mut session)?;
    if file.index_generation() != generation_ahead {
        // The old VMM served parked faults after the offer: the retrieve
        // recorded their pages in the object built ahead.
        tracing::info!("the page index changed after the offer; brought up to date at the switch");
        side.updated_at_switch = true;
    }
    if !Arc::ptr_eq(&retrieved, &file) {
        return Err("the retrieved guest memory file is not the one built ahead".into());
    }
    let now = Instant::now();
    side.retrieved_ns = instant_ns(now);
    side.phases.retrieve = now - started;
    Ok((session, built))
}

/// Rebuilds the memory file object from the offer (frozen, as preserved):
/// the retrieve at the switch then finds this object and checks it against
/// the final record (bringing it up to date where the old process
/// allocated pages since).
fn restore_from_offer(offer: &Offer) -> Result<Arc<GuestMemFile>, Failure> {
    let (position, file) = offer
        .record
        .files()
        .enumerate()
        .find(|(_, (_, file))| file.token == MEMORY_TOKEN)
        .map(|(position, (_, file))| (position, file))
        .ok_or("the offer holds no guest memory file")?;
    if file.compatible.name() != GMEM_COMPATIBLE
        && file.compatible.name() != super::handler::COMPATIBLE
    {
        return Err(format!(
            "the memory token was preserved by {}, not the gmem handler",
            file.compatible.name()
        ));
    }
    let data =
        GmemData::decode(&file.data).map_err(|error| format!("the offer's gmem data: {error}"))?;
    let descriptor =
        descriptor_of(&data).map_err(|error| format!("the offer's gmem descriptor: {error}"))?;
    let fd = offer
        .fds
        .get(position)
        .ok_or("the offer has fewer fds than files")?
        .try_clone()
        .map_err(|error| format!("duplicating the offered fd: {error}"))?;
    let restored = GuestMemFile::restore_runs(fd, &descriptor, runs_of(&data))
        .map_err(|error| format!("rebuilding the guest memory file: {error}"))?;
    note_built_ahead(&restored, &file.data);
    Ok(restored)
}

/// Step 8: watches the guest for `window`, then computes its gap and
/// recovery per vCPU.
fn watch_recovery(vm: &mut LiveVm, stop_tsc: &[u64], window: Duration, side: &mut NewSide) {
    let tsc_khz = vm.tsc_khz;
    let deadline = Instant::now() + window;
    vm.poll_trace();
    while Instant::now() < deadline {
        std::thread::sleep(TRACE_POLL);
        vm.poll_trace();
    }
    let khz = u64::from(tsc_khz.max(1));
    let gaps = probed_gaps(vm.memory().view(), &vm.layout).unwrap_or_default();
    side.guest_gaps_ns = gaps
        .iter()
        .map(|gap| gap.map(|ticks| ticks * 1_000_000 / khz))
        .collect();
    side.recovery = gaps
        .iter()
        .zip(stop_tsc)
        .zip(vm.collector.entries())
        .map(|((gap, stop), entries)| {
            recovery(
                entries,
                *stop,
                stop + gap.unwrap_or(0),
                tsc_khz,
                RATE_BEFORE,
                RATE_WINDOW,
            )
        })
        .collect();
    side.stop_tsc = stop_tsc.to_vec();
    side.tsc_khz = tsc_khz;
    side.faults = vm.backing.fault_counters().into();
    side.guest = vm.progress();
}
