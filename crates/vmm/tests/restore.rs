//! A guest stopped, saved, and resumed in a new VM over the same memory
//! continues with no mismatch, its registers intact, and a TSC that kept
//! counting real time.

mod common;

use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm::guest::{
    GuestMonitor, GuestOptions, arm_gap_probe, check_pages, probed_gaps, request_final_check,
};
use vmm::machine::{Machine, MachineConfig};
use vmm::memory::{GuestMemory, MemfdRam};
use vmm::state::MachineState;
use vmm::vcpu::VcpuEnd;

#[test]
fn guest_resumes_in_a_new_vm_over_the_same_memory() {
    if !common::kvm_available("guest_resumes_in_a_new_vm_over_the_same_memory") {
        return;
    }
    let vcpus = 2;
    let (running, _monitor) = common::boot(64 << 20, vcpus, GuestOptions::default());
    let memory = running.memory().clone();
    let layout = *running.layout();
    common::wait_for_iterations(&memory, &layout, 20_000, Duration::from_secs(20));

    let kicked_at = Instant::now();
    let (old, stop) = running
        .stop(Duration::from_secs(5))
        .map_err(|error| error.error().to_string())
        .unwrap();
    assert!(stop.ends.iter().all(|end| matches!(end, VcpuEnd::Kicked)));
    let before = common::reports(&memory, &layout);
    let check = check_pages(memory.view(), &layout).unwrap();
    assert_eq!(check.mismatches, 0, "{check:?}");
    let (state, _) = MachineState::capture(&old).unwrap();
    arm_gap_probe(memory.view(), &layout).unwrap();
    let record = state.to_memfd().unwrap();

    // The successor's view: the memory file mapped again, the state read back.
    let file = memory.ram().file().try_clone_to_owned().unwrap();
    let ram = MemfdRam::from_file(file).unwrap();
    let new_memory = Arc::new(GuestMemory::new(Arc::new(ram)).unwrap());
    let restored = MachineState::from_fd(record.as_fd()).unwrap();
    assert_eq!(restored, state);
    let new = Machine::create(Arc::clone(&new_memory), MachineConfig { vcpus }).unwrap();
    restored.restore(&new).unwrap();
    drop(old);
    let monitor = Arc::new(GuestMonitor::new(layout, Arc::clone(&new_memory)));
    let running = new.start(monitor.clone()).unwrap();

    // The guest continues from where it stopped...
    common::wait_for_iterations(
        &new_memory,
        &layout,
        before.iter().map(|report| report.iterations).max().unwrap() + 20_000,
        Duration::from_secs(20),
    );
    let first_entry = running.first_entries().into_iter().flatten().min().unwrap();
    let gaps = probed_gaps(new_memory.view(), &layout).unwrap();
    // ... and saw a gap of the real blackout: not less (the TSC did not go
    // back), not much more (it did not skip time).
    let khz = state.vcpus[0].tsc.khz.max(1);
    let host_window = first_entry.duration_since(kicked_at);
    for gap in &gaps {
        let gap =
            Duration::from_micros(gap.expect("guest gap probe missing") * 1000 / u64::from(khz));
        eprintln!("guest gap {gap:?}, host kick-to-resume {host_window:?}");
        assert!(
            gap + Duration::from_micros(200) >= host_window,
            "gap shorter than the blackout"
        );
        assert!(
            gap <= host_window + Duration::from_millis(100),
            "gap longer than the blackout"
        );
    }

    request_final_check(new_memory.view(), &layout).unwrap();
    let (_machine, report) = running
        .wait_for_guest(Duration::from_secs(20))
        .map_err(|error| error.error().to_string())
        .unwrap();
    assert!(
        report
            .ends
            .iter()
            .all(|end| matches!(end, VcpuEnd::HandlerStopped))
    );
    for (after, before) in common::reports(&new_memory, &layout).iter().zip(&before) {
        assert!(after.done);
        assert_eq!(after.mismatches, 0, "{after:?}");
        assert_eq!(
            after.register_mismatches, 0,
            "vector registers lost: {after:?}"
        );
        assert!(after.iterations > before.iterations);
        assert!(after.final_verified >= layout.pages_per_vcpu() - 1);
    }
    assert_eq!(
        monitor.hellos(),
        0,
        "the guest restarted instead of resuming"
    );
    let check = check_pages(new_memory.view(), &layout).unwrap();
    assert_eq!(check.mismatches, 0, "{check:?}");
}

/// The register check has teeth: restoring without the XSAVE area (the
/// upper halves of the AVX registers) is noticed by the guest itself.
#[test]
fn guest_notices_lost_vector_registers() {
    if !common::kvm_available("guest_notices_lost_vector_registers") {
        return;
    }
    let (running, _monitor) = common::boot(16 << 20, 1, GuestOptions::default());
    let memory = running.memory().clone();
    let layout = *running.layout();
    common::wait_for_iterations(&memory, &layout, 70_000, Duration::from_secs(20));
    let (old, _) = running
        .stop(Duration::from_secs(5))
        .map_err(|error| error.error().to_string())
        .unwrap();
    let (mut state, _) = MachineState::capture(&old).unwrap();
    if state.vcpus[0].xsave.is_none() {
        test_support::skipped(format_args!(
            "guest_notices_lost_vector_registers: KVM has no XSAVE"
        ));
        return;
    }
    let before = common::reports(&memory, &layout)[0];
    state.vcpus[0].xsave = None;
    drop(old);
    let new = Machine::create(Arc::clone(&memory), MachineConfig { vcpus: 1 }).unwrap();
    state.restore(&new).unwrap();
    let monitor = Arc::new(GuestMonitor::new(layout, Arc::clone(&memory)));
    let running = new.start(monitor.clone()).unwrap();
    // Two progress reports (each checks the register) later:
    common::wait_for_iterations(
        &memory,
        &layout,
        before.iterations + (2 << GuestOptions::default().report_shift),
        Duration::from_secs(20),
    );
    let _ = running.stop(Duration::from_secs(5));
    let after = common::reports(&memory, &layout)[0];
    assert!(
        after.register_mismatches > 0,
        "the guest did not notice its AVX state was dropped: {after:?}"
    );
}
