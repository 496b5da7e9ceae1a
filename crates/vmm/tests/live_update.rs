//! End to end: a guest on a fault-served gmem file is live-updated into
//! successor processes in every mode (exec, transfer, luod) and must come
//! out intact: no guest- or host-found mismatch, every parked fault served,
//! the guest's own gap measured, no fd leaked.

mod common;

use std::time::Duration;

use vmm::live::controller::{DemoConfig, DemoReport, Outcome, run_demo};
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
        program: env!("CARGO_BIN_EXE_vmm-live").into(),
        leading: Vec::new(),
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
    let fds_before = open_fds();
    let config = DemoConfig {
        host_threads: true,
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
