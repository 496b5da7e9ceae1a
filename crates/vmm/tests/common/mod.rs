//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm::guest::{GuestMonitor, GuestOptions, GuestReport};
use vmm::machine::{Machine, MachineConfig, RunningMachine};
use vmm::memory::{GuestMemory, MemfdRam};
use vmm::state::MachineState;

/// Whether /dev/kvm can be used; prints why not.
pub fn kvm_available(test: &str) -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(error) => {
            test_support::skipped(format_args!("{test}: /dev/kvm cannot be opened ({error})"));
            false
        }
    }
}

/// A booted machine over a fresh memfd, started with a [`GuestMonitor`].
pub fn boot(
    memory_size: u64,
    vcpus: u32,
    options: GuestOptions,
) -> (RunningMachine, Arc<GuestMonitor>) {
    let ram = MemfdRam::create(memory_size).expect("memfd");
    let memory = Arc::new(GuestMemory::new(Arc::new(ram)).expect("vm-memory view"));
    boot_on(memory, vcpus, options)
}

/// A booted machine over `memory`, started with a [`GuestMonitor`].
pub fn boot_on(
    memory: Arc<GuestMemory>,
    vcpus: u32,
    options: GuestOptions,
) -> (RunningMachine, Arc<GuestMonitor>) {
    let mut machine =
        Machine::create(Arc::clone(&memory), MachineConfig { vcpus }).expect("machine");
    machine.boot(options).expect("boot");
    let monitor = Arc::new(GuestMonitor::new(*machine.layout(), memory));
    let running = machine.start(monitor.clone()).expect("start");
    (running, monitor)
}

/// Resumes `state` in a new VM over `memory` with the gap probe armed, as a
/// successor does.
pub fn resume_in_new_vm(
    memory: &Arc<GuestMemory>,
    layout: &vmm::layout::GuestLayout,
    state: &MachineState,
) -> RunningMachine {
    vmm::guest::arm_gap_probe(memory.view(), layout).expect("arm the gap probe");
    let vcpus = layout.vcpus();
    let new = Machine::create(Arc::clone(memory), MachineConfig { vcpus }).expect("machine");
    new.arm(Arc::new(GuestMonitor::new(*layout, Arc::clone(memory))))
        .expect("arm")
        .go(Some(state))
        .expect("go")
}

/// Sum of every vCPU's report.
pub fn reports(
    running_memory: &GuestMemory,
    layout: &vmm::layout::GuestLayout,
) -> Vec<GuestReport> {
    (0..layout.vcpus())
        .map(|vcpu| GuestReport::read(running_memory.view(), layout, vcpu).expect("report"))
        .collect()
}

/// Waits until every vCPU has done at least `iterations` iterations.
pub fn wait_for_iterations(
    memory: &GuestMemory,
    layout: &vmm::layout::GuestLayout,
    iterations: u64,
    timeout: Duration,
) {
    let deadline = Instant::now() + timeout;
    loop {
        let all = reports(memory, layout);
        if all.iter().all(|report| report.iterations >= iterations) {
            return;
        }
        assert!(Instant::now() < deadline, "guest too slow: {all:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Waits until every vCPU has done `more` iterations beyond the furthest
/// vCPU's count now.
pub fn wait_for_more_iterations(
    memory: &GuestMemory,
    layout: &vmm::layout::GuestLayout,
    more: u64,
    timeout: Duration,
) {
    let furthest = reports(memory, layout)
        .iter()
        .map(|report| report.iterations)
        .max()
        .expect("at least one vCPU");
    wait_for_iterations(memory, layout, furthest + more, timeout);
}

/// Checks what the guest and the host verified: no vCPU saw a wrong page
/// or register, and the host finds every page as the guest wrote it.
/// Returns the vCPUs' reports for further checks.
pub fn assert_verified(
    memory: &GuestMemory,
    layout: &vmm::layout::GuestLayout,
) -> Vec<GuestReport> {
    let all = reports(memory, layout);
    for report in &all {
        assert_eq!(report.mismatches, 0, "{report:?}");
        assert_eq!(report.register_mismatches, 0, "{report:?}");
    }
    let host = vmm::guest::check_pages(memory.view(), layout).expect("host page check");
    assert_eq!(host.mismatches, 0, "{host:?}");
    all
}

/// Waits until every vCPU's gap probe has caught its gap; returns the gaps.
pub fn wait_for_gaps(
    memory: &GuestMemory,
    layout: &vmm::layout::GuestLayout,
    timeout: Duration,
) -> Vec<u64> {
    let deadline = Instant::now() + timeout;
    loop {
        let gaps = vmm::guest::probed_gaps(memory.view(), layout).expect("gaps");
        if gaps.iter().all(Option::is_some) {
            return gaps.into_iter().flatten().collect();
        }
        assert!(
            Instant::now() < deadline,
            "guest gap probe never caught a gap: {gaps:?}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}
