//! Repeated in-process live updates, in every variant, leave the guest
//! running with every page intact; the prefault program touches memory
//! without changing it.

mod common;

use std::sync::Arc;
use std::time::Duration;

use vmm::guest::{GuestMonitor, GuestOptions, request_final_check};
use vmm::machine::{Machine, MachineConfig};
use vmm::memory::{GuestMemory, populated_ranges};
use vmm::state::MachineState;
use vmm::update::{UpdateOptions, update_in_process};
use vmm::vcpu::{ExitHandler, VcpuEnd};

fn handler(memory: Arc<GuestMemory>, layout: vmm::layout::GuestLayout) -> Arc<dyn ExitHandler> {
    Arc::new(GuestMonitor::new(layout, memory))
}

#[test]
fn repeated_updates_in_every_variant_keep_the_guest_intact() {
    if !common::kvm_available("repeated_updates_in_every_variant_keep_the_guest_intact") {
        return;
    }
    let (mut running, _monitor) = common::boot(32 << 20, 2, GuestOptions::default());
    let layout = *running.layout();
    let variants = [
        UpdateOptions {
            prebuild: false,
            ..Default::default()
        },
        UpdateOptions::default(),
        UpdateOptions {
            populate: true,
            ..Default::default()
        },
        UpdateOptions {
            populate: true,
            prefault: true,
            ..Default::default()
        },
    ];
    for options in variants {
        let before = common::reports(running.memory(), &layout);
        let target = before
            .iter()
            .map(|report| report.iterations)
            .max()
            .unwrap_or(0)
            + 20_000;
        common::wait_for_iterations(running.memory(), &layout, target, Duration::from_secs(20));
        let (next, report) = update_in_process(running, handler, options)
            .map_err(|failure| failure.error.to_string())
            .unwrap();
        running = next;
        assert_eq!(report.stop_tsc.len(), 2);
        assert!(report.host_blackout > Duration::ZERO);
        assert!(report.record_bytes > 0);
        let gaps = common::wait_for_gaps(running.memory(), &layout, Duration::from_secs(20));
        assert_eq!(gaps.len(), 2, "{options:?}");
    }
    let memory = Arc::clone(running.memory());
    request_final_check(memory.view(), &layout).unwrap();
    let (_machine, stop) = running
        .wait_for_guest(Duration::from_secs(20))
        .map_err(|error| error.error().to_string())
        .unwrap();
    assert!(
        stop.ends
            .iter()
            .all(|end| matches!(end, VcpuEnd::HandlerStopped))
    );
    for report in common::assert_verified(&memory, &layout) {
        assert!(report.done, "{report:?}");
    }
}

#[test]
fn prefault_reads_guest_memory_without_changing_it() {
    if !common::kvm_available("prefault_reads_guest_memory_without_changing_it") {
        return;
    }
    let (running, _monitor) = common::boot(32 << 20, 2, GuestOptions::default());
    let memory = Arc::clone(running.memory());
    let layout = *running.layout();
    common::wait_for_iterations(&memory, &layout, 10_000, Duration::from_secs(20));
    let (old, _) = running
        .stop(Duration::from_secs(5))
        .map_err(|error| error.error().to_string())
        .unwrap();
    let (state, _) = MachineState::capture(&old).unwrap();
    let ranges = populated_ranges(memory.ram().as_ref()).unwrap();
    // Only populated pages are read: reading a hole would allocate it.
    let snapshot = |memory: &GuestMemory| {
        let mut bytes = Vec::new();
        for range in &ranges {
            let mut part = vec![0u8; (range.end - range.start) as usize];
            vm_memory::Bytes::read_slice(
                memory.view(),
                &mut part,
                vm_memory::GuestAddress(range.start),
            )
            .unwrap();
            bytes.extend_from_slice(&part);
        }
        bytes
    };
    let before = snapshot(&memory);
    let mut new = Machine::create(Arc::clone(&memory), MachineConfig { vcpus: 2 }).unwrap();
    let report = new
        .prefault(&ranges, memory.ram().page_size(), None)
        .unwrap();
    let total: u64 = ranges.iter().map(|range| range.end - range.start).sum();
    assert_eq!(report.pages, total / 4096);
    assert_eq!(
        populated_ranges(memory.ram().as_ref()).unwrap(),
        ranges,
        "the prefault allocated pages"
    );
    assert!(
        before == snapshot(&memory),
        "the prefault changed guest memory"
    );
    // The prefaulted VM takes the saved state like a fresh one.
    vmm::guest::arm_gap_probe(memory.view(), &layout).unwrap();
    state.restore(&new).unwrap();
    drop(old);
    let running = new.start(handler(Arc::clone(&memory), layout)).unwrap();
    common::wait_for_gaps(&memory, &layout, Duration::from_secs(20));
    let (_machine, _) = running
        .stop(Duration::from_secs(5))
        .map_err(|error| error.error().to_string())
        .unwrap();
    common::assert_verified(&memory, &layout);
}

/// A switch whose restore fails in the new VM (here: an MSR KVM refuses)
/// runs nothing there; the old machine restarts and the guest carries on.
#[test]
fn a_failed_restore_leaves_the_old_machine_to_resume() {
    if !common::kvm_available("a_failed_restore_leaves_the_old_machine_to_resume") {
        return;
    }
    let (running, _monitor) = common::boot(32 << 20, 2, GuestOptions::default());
    let memory = Arc::clone(running.memory());
    let layout = *running.layout();
    common::wait_for_iterations(&memory, &layout, 10_000, Duration::from_secs(20));
    let new = Machine::create(Arc::clone(&memory), MachineConfig { vcpus: 2 }).unwrap();
    let armed = new.arm(handler(Arc::clone(&memory), layout)).unwrap();
    let (old, _, mut state) = running
        .stop_capturing(Duration::from_secs(5))
        .map_err(|error| error.error().to_string())
        .unwrap();
    let before = common::reports(&memory, &layout);
    state.vcpus[1].msrs.push(kvm_bindings::kvm_msr_entry {
        index: 0xdead_beef,
        ..Default::default()
    });
    let error = armed.go(Some(&state)).unwrap_err();
    assert!(error.to_string().contains("0xdeadbeef"), "{error}");
    // Nothing ran in the new VM: the guest's counters did not move.
    assert_eq!(common::reports(&memory, &layout), before);
    let running = old.start(handler(Arc::clone(&memory), layout)).unwrap();
    common::wait_for_more_iterations(&memory, &layout, 10_000, Duration::from_secs(20));
    let _ = running.stop(Duration::from_secs(5));
    common::assert_verified(&memory, &layout);
}
