//! The guest program runs on real KVM and checks itself.

mod common;

use std::time::Duration;

use vmm::guest::{GuestOptions, check_pages, request_final_check};
use vmm::vcpu::VcpuEnd;

#[test]
fn guest_runs_verifies_and_finishes_on_two_vcpus() {
    if !common::kvm_available("guest_runs_verifies_and_finishes_on_two_vcpus") {
        return;
    }
    let (running, monitor) = common::boot(32 << 20, 2, GuestOptions::default());
    let memory = running.memory().clone();
    let layout = *running.layout();
    common::wait_for_iterations(&memory, &layout, 5000, Duration::from_secs(20));
    request_final_check(memory.view(), &layout).unwrap();
    let (machine, report) = running.wait_for_guest(Duration::from_secs(20)).unwrap();
    for end in &report.ends {
        assert!(matches!(end, VcpuEnd::HandlerStopped), "{end:?}");
    }
    let reports = common::reports(&memory, &layout);
    eprintln!("{reports:#?}");
    for report in &reports {
        assert!(report.done);
        assert_eq!(report.mismatches, 0);
        assert_eq!(report.register_mismatches, 0);
        assert!(report.pages_verified > 0);
        assert!(report.final_verified > 0);
        assert!(report.max_gap_ticks > 0);
    }
    assert_eq!(monitor.hellos(), 2);
    assert_eq!(monitor.done(), 2);
    let check = check_pages(memory.view(), &layout).unwrap();
    assert_eq!(check.mismatches, 0, "{check:?}");
    // 5000 iterations wrap each 3.5 MiB partition at least once, so every
    // page but the one in flight is checked.
    assert!(
        check.pages_checked >= (layout.pages_per_vcpu() - 1) * 2,
        "{check:?}"
    );
    for vcpu in machine.vcpus() {
        eprintln!("vcpu {}: {:?}", vcpu.index(), vcpu.counters().snapshot());
    }
}
