//! End to end: a guest on a fault-served gmem file is live-updated into
//! successor processes in every mode (exec, transfer, luod) and must come
//! out intact: no guest- or host-found mismatch, every parked fault served,
//! the guest's own gap measured, no fd leaked.

mod common;

use std::time::Duration;

use vmm::live::controller::{DemoConfig, DemoReport, Outcome, run_demo};
use vmm::live::handler::HandlerChoice;
use vmm::live::{BackendChoice, Injection, Mode};

fn config(modes: Vec<Mode>, updates: u32) -> DemoConfig {
    DemoConfig {
        size: 64 << 20,
        vcpus: 2,
        backend: BackendChoice::Memfd,
        updates,
        modes,
        prefault: true,
        interval: Duration::from_millis(400),
        recovery_window: Duration::from_millis(300),
        injections: Vec::new(),
        host_threads: false,
        prefill: false,
        frozen_hold_ms: 0,
        handler: HandlerChoice::Cached,
        program: env!("CARGO_BIN_EXE_vmm-live").into(),
        leading: Vec::new(),
    }
}

/// The tests of this file run one at a time: each counts this process's
/// fds before and after its run, which another run would disturb.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Whether the fault service can run here (userfaultfd); prints why not.
fn fault_service_available(test: &str) -> bool {
    match vmm::backing::Backing::create(4 << 20, gmem::Backend::Memfd) {
        Ok(_) => true,
        Err(error) => {
            test_support::skipped(format_args!(
                "{test}: the fault service cannot start here ({error})"
            ));
            false
        }
    }
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn run(config: &DemoConfig) -> DemoReport {
    let report = run_demo(config, &mut |event| eprintln!("{event:?}")).unwrap();
    eprintln!("{}", report.table());
    report
}

#[test]
fn a_guest_survives_live_updates_in_every_mode() {
    let _serial = serial();
    if !common::kvm_available("a_guest_survives_live_updates_in_every_mode") {
        return;
    }
    let fds_before = open_fds();
    let report = run(&config(vec![Mode::Exec, Mode::Transfer, Mode::Luod], 3));
    assert!(report.problems.is_empty(), "{:#?}", report.problems);
    assert_eq!(report.updates.len(), 3);
    assert_eq!(open_fds(), fds_before, "the controller leaked fds");
}

#[test]
fn without_kvm_the_workload_runs_on_host_threads_and_survives_updates() {
    let _serial = serial();
    let test = "without_kvm_the_workload_runs_on_host_threads_and_survives_updates";
    if !fault_service_available(test) {
        return;
    }
    let fds_before = open_fds();
    // With liveupdate's builtin gmem handler, for coverage of both.
    let config = DemoConfig {
        host_threads: true,
        handler: HandlerChoice::Builtin,
        ..config(vec![Mode::Exec, Mode::Transfer, Mode::Luod], 3)
    };
    let report = run(&config);
    assert!(!report.kvm);
    assert!(report.problems.is_empty(), "{:#?}", report.problems);
    assert_eq!(report.updates.len(), 3);
    let done = report.final_check.expect("final check");
    assert!(done.pages.pages_checked > 1000, "{:?}", done.pages);
    assert_eq!(open_fds(), fds_before, "the controller leaked fds");
}

#[test]
fn vcpus_parked_on_frozen_faults_at_the_stop_are_served_and_counted_in_every_mode() {
    let _serial = serial();
    let test = "vcpus_parked_on_frozen_faults_at_the_stop_are_served_and_counted_in_every_mode";
    if !common::kvm_available(test) {
        return;
    }
    // 256 MiB: the guest is still touching new pages (generation 0) at
    // every update, and runs frozen before each stop until its vCPUs park
    // (500 ms at most), so they are parked in faults when kicked.
    let config = DemoConfig {
        size: 256 << 20,
        frozen_hold_ms: 500,
        ..config(vec![Mode::Exec, Mode::Transfer, Mode::Luod], 3)
    };
    let report = run(&config);
    assert!(report.problems.is_empty(), "{:#?}", report.problems);
    for row in &report.updates {
        let old = row.old.as_ref().expect("old side");
        assert!(
            old.parked.parked_at_kick >= 1,
            "update {}: no vCPU was parked at the stop: {:?}",
            row.update,
            old.parked
        );
        assert!(
            row.derived.parked_pages_checked >= old.parked.parked_at_kick,
            "{:?}",
            row.derived
        );
        assert!(
            row.derived.parked_pages_missing.is_empty(),
            "{:?}",
            row.derived
        );
        assert_eq!(row.derived.faults_served, row.derived.parked_pages_checked);
        assert_eq!(row.derived.faults_unserved, 0, "{:?}", row.derived);
    }
}

#[test]
fn updates_aborted_after_the_freeze_leave_the_guest_running_unfrozen() {
    let _serial = serial();
    let test = "updates_aborted_after_the_freeze_leave_the_guest_running_unfrozen";
    if !common::kvm_available(test) {
        return;
    }
    let config = DemoConfig {
        injections: vec![
            (1, Injection::MissingSuccessor),
            (2, Injection::SuccessorDiesBeforeSwitch),
            (3, Injection::MissingSuccessor),
        ],
        ..config(
            vec![Mode::Exec, Mode::Transfer, Mode::Transfer, Mode::Luod],
            4,
        )
    };
    let report = run(&config);
    assert!(report.problems.is_empty(), "{:#?}", report.problems);
    for row in &report.updates[..3] {
        match &row.outcome {
            Outcome::Aborted { frozen, .. } => assert!(!frozen, "update {}", row.update),
            other => panic!("update {}: {other:?}", row.update),
        }
    }
    // The guest carried on in the first VMM, intact, and a later update
    // still works.
    assert_eq!(report.updates[3].outcome, Outcome::Completed);
    let done = report.final_check.expect("final check");
    assert_eq!(done.pages.mismatches, 0);
    assert!(
        done.guest
            .iter()
            .all(|vcpu| vcpu.done && vcpu.mismatches == 0)
    );
}

#[test]
fn host_threads_parked_at_the_stop_take_the_explicit_step_in_every_mode() {
    let _serial = serial();
    let test = "host_threads_parked_at_the_stop_take_the_explicit_step_in_every_mode";
    if !fault_service_available(test) {
        return;
    }
    // A host thread blocked in a fault cannot be interrupted: each update
    // finds the threads parked (the guest still populates 1 GiB and runs
    // frozen until they park), serves their faults by the explicit
    // unfreeze-serve-refreeze step, and a transfer successor brings its
    // copy of the page index, built from the offer, up to date at the
    // switch.
    let config = DemoConfig {
        size: 1 << 30,
        host_threads: true,
        frozen_hold_ms: 500,
        interval: Duration::from_millis(150),
        recovery_window: Duration::from_millis(150),
        ..config(vec![Mode::Exec, Mode::Transfer, Mode::Luod], 3)
    };
    let report = run(&config);
    assert!(report.problems.is_empty(), "{:#?}", report.problems);
    for row in &report.updates {
        let old = row.old.as_ref().expect("old side");
        assert!(
            !old.parked.stuck_vcpus.is_empty(),
            "update {}: {:?}",
            row.update,
            old.parked
        );
        assert!(old.parked.served_for_stuck >= old.parked.stuck_vcpus.len() as u64);
        assert!(
            row.derived.parked_pages_missing.is_empty(),
            "{:?}",
            row.derived
        );
        if row.mode == Mode::Transfer {
            assert!(row.new.as_ref().expect("new side").updated_at_switch);
        }
    }
}
