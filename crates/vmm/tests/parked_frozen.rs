//! The stop protocol of a live update ([`vmm::parked::stop_frozen`]) with
//! the real fault service: vCPUs parked on faults of a frozen gmem file stop,
//! their state resumes in a new VM, and every parked fault is served once
//! the file is unfrozen.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use gmem::Backend;
use vmm::backing::Backing;
use vmm::guest::{GuestOptions, check_pages};
use vmm::parked::stop_frozen;

#[test]
fn vcpus_parked_on_a_frozen_file_stop_and_resume_with_their_faults_served() {
    let test = "vcpus_parked_on_a_frozen_file_stop_and_resume_with_their_faults_served";
    if !common::kvm_available(test) {
        return;
    }
    let backing = match Backing::create(64 << 20, Backend::Memfd) {
        Ok(backing) => backing,
        Err(error) => {
            test_support::skipped(format_args!("{test}: no fault service here ({error})"));
            return;
        }
    };
    let memory = Arc::clone(backing.memory());
    let (running, _monitor) = common::boot_on(Arc::clone(&memory), 2, GuestOptions::default());
    let layout = *running.layout();
    // Generation 0: every iteration touches a page never touched before.
    common::wait_for_iterations(&memory, &layout, 2_000, Duration::from_secs(20));
    let served_before = backing.fault_counters().served;
    assert!(served_before > 4_000, "{:?}", backing.fault_counters());

    backing.file().freeze(true);
    let deadline = Instant::now() + Duration::from_secs(10);
    while backing.fault_counters().parked_now < 2 {
        assert!(Instant::now() < deadline, "{:?}", backing.fault_counters());
        std::thread::sleep(Duration::from_millis(1));
    }
    let populated = backing.file().populated_count();
    let (old, _, state, step) = stop_frozen(
        running,
        &backing,
        Duration::from_millis(50),
        Duration::from_secs(5),
    )
    .map_err(|error| error.error().to_string())
    .unwrap();
    assert!(
        backing.file().is_frozen(),
        "the stop left the file unfrozen"
    );
    assert_eq!(step.parked_at_kick, 2, "{step:?}");
    if step.stuck_vcpus.is_empty() {
        // This KVM: the kick interrupted both faults; they stay parked and
        // nothing was allocated while frozen.
        assert_eq!(step.interrupted, 2, "{step:?}");
        assert_eq!(step.served_for_stuck, 0);
        assert_eq!(backing.file().populated_count(), populated);
    } else {
        assert!(
            step.served_for_stuck >= step.stuck_vcpus.len() as u64,
            "{step:?}"
        );
    }
    assert_eq!(check_pages(memory.view(), &layout).unwrap().mismatches, 0);

    // Resume in a new VM while still frozen: the repeated accesses park
    // again; the unfreeze (a successor's finish) serves them all.
    let running = common::resume_in_new_vm(&memory, &layout, &state);
    drop(old);
    std::thread::sleep(Duration::from_millis(20));
    backing.file().freeze(false);
    common::wait_for_gaps(&memory, &layout, Duration::from_secs(20));
    common::wait_for_more_iterations(&memory, &layout, 2_000, Duration::from_secs(20));
    let _ = running.stop(Duration::from_secs(5));
    let counters = backing.fault_counters();
    assert_eq!(
        counters.parked_now, 0,
        "a fault was never served: {counters:?}"
    );
    assert!(counters.served_after_unfreeze >= 2, "{counters:?}");
    common::assert_verified(&memory, &layout);
}
