//! End to end: a guest on a fault-served gmem file is live-updated into
//! successor processes in every mode (exec, transfer, luod) and must come
//! out intact: no guest- or host-found mismatch, every parked fault served,
//! the guest's own gap measured, no fd leaked.

mod common;

use std::time::Duration;

use vmm::live::controller::{DemoConfig, DemoReport, run_demo};
use vmm::live::{BackendChoice, Mode};

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
