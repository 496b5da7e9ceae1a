//! What this machine's KVM does with a vCPU blocked in a userfaultfd fault
//! when the monitor kicks it, and that the stop protocol gets every vCPU out
//! either way, with a state that saves and resumes correctly:
//!
//! - measured here (Linux 6.18, PVM): the kick (immediate_exit plus a
//!   signal that has a handler, so it is pending) interrupts the fault: KVM
//!   faults guest memory in interruptibly, `KVM_RUN` returns EINTR with the
//!   faulting instruction not executed, and the fault stays parked, never
//!   served; the guest repeats the access after the resume;
//! - DESIGN "Handover modes" records a vCPU that stayed blocked until its
//!   fault was served (a signal that is ignored is never pending, and a
//!   kernel-internal access may wait killably): the protocol then serves
//!   the parked faults and waits again.

mod common;
#[path = "common/uffd.rs"]
mod uffd;

use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm::guest::{GuestMonitor, GuestOptions, arm_gap_probe, check_pages};
use vmm::machine::{Machine, MachineConfig};
use vmm::memory::{GuestMemory, MemfdRam};
use vmm::state::MachineState;
use vmm::vcpu::VcpuEnd;

#[test]
fn a_vcpu_parked_on_a_fault_stops_and_resumes_intact() {
    if !common::kvm_available("a_vcpu_parked_on_a_fault_stops_and_resumes_intact") {
        return;
    }
    let memory = Arc::new(GuestMemory::new(Arc::new(MemfdRam::create(64 << 20).unwrap())).unwrap());
    let mut machine = Machine::create(Arc::clone(&memory), MachineConfig { vcpus: 2 }).unwrap();
    machine.boot(GuestOptions::default()).unwrap();
    let layout = *machine.layout();
    let base = memory.ram().host_address().as_ptr() as u64;
    let faults = match uffd::FaultServer::register(base, memory.size()) {
        Ok(server) => server,
        Err(error) => {
            test_support::skipped(format_args!(
                "a_vcpu_parked_on_a_fault_stops_and_resumes_intact: userfaultfd unavailable ({error})"
            ));
            return;
        }
    };
    let monitor = Arc::new(GuestMonitor::new(layout, Arc::clone(&memory)));
    let mut running = machine.start(monitor).unwrap();
    // The guest is in its first generation: every iteration touches a new page.
    common::wait_for_iterations(&memory, &layout, 2_000, Duration::from_secs(20));
    assert!(faults.served() > 0, "no fault reached the server");

    // Freeze: faults park from now on; each vCPU soon blocks on one.
    faults.freeze();
    let deadline = Instant::now() + Duration::from_secs(10);
    while faults.parked().len() < 2 {
        assert!(
            Instant::now() < deadline,
            "vCPUs never parked: {:?}",
            faults.parked()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    running.vcpus().kick();
    let stuck = running.vcpus().wait_stopped(Duration::from_millis(300));
    if stuck.is_empty() {
        eprintln!("observed: the kick interrupted both parked faults; none was served");
        assert_eq!(faults.parked().len(), 2, "the parked faults disappeared");
    } else {
        eprintln!("observed: vCPUs {stuck:?} stayed blocked in their faults after the kick");
        let served = faults.serve_parked();
        assert!(served >= stuck.len());
        let stuck = running.vcpus().wait_stopped(Duration::from_secs(5));
        assert!(
            stuck.is_empty(),
            "vCPUs {stuck:?} did not stop after their faults were served"
        );
    }
    let (old, report) = running
        .stop(Duration::from_secs(1))
        .map_err(|error| error.error().to_string())
        .unwrap();
    assert!(
        report.ends.iter().all(|end| matches!(end, VcpuEnd::Kicked)),
        "{:?}",
        report.ends
    );

    // The state read after the kick is complete: a new VM resumes it.
    let (state, _) = MachineState::capture(&old).unwrap();
    assert_eq!(check_pages(memory.view(), &layout).unwrap().mismatches, 0);
    arm_gap_probe(memory.view(), &layout).unwrap();
    faults.unfreeze();
    let new = Machine::create(Arc::clone(&memory), MachineConfig { vcpus: 2 }).unwrap();
    state.restore(&new).unwrap();
    drop(old);
    let monitor = Arc::new(GuestMonitor::new(layout, Arc::clone(&memory)));
    let running = new.start(monitor).unwrap();
    common::wait_for_gaps(&memory, &layout, Duration::from_secs(20));
    common::wait_for_more_iterations(&memory, &layout, 2_000, Duration::from_secs(20));
    let _ = running.stop(Duration::from_secs(5));
    common::assert_verified(&memory, &layout);
}
