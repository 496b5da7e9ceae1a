//! The same resume, across a real exec: the guest's memory file and a state
//! memfd are inherited by a separate program (`vmm-resume`), which maps the
//! memory into its own new VM, restores and runs the guest.

mod common;

use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::Duration;

use vmm::guest::{GuestOptions, arm_gap_probe, check_pages};
use vmm::state::MachineState;

#[test]
fn guest_resumes_in_an_exec_successor() {
    if !common::kvm_available("guest_resumes_in_an_exec_successor") {
        return;
    }
    let (running, _monitor) = common::boot(64 << 20, 2, GuestOptions::default());
    let memory = running.memory().clone();
    let layout = *running.layout();
    common::wait_for_iterations(&memory, &layout, 20_000, Duration::from_secs(20));
    let (old, stop) = running
        .stop(Duration::from_secs(5))
        .map_err(|error| error.error().to_string())
        .unwrap();
    let kicked_ns = vmm::time::instant_ns(stop.kicked_at);
    let (state, _) = MachineState::capture(&old).unwrap();
    assert_eq!(check_pages(memory.view(), &layout).unwrap().mismatches, 0);
    arm_gap_probe(memory.view(), &layout).unwrap();
    let before = common::reports(&memory, &layout);
    let record = state.to_memfd().unwrap();
    drop(old);

    let memory_fd = memory.ram().file().as_raw_fd();
    let state_fd = record.as_fd().as_raw_fd();
    let mut command = Command::new(env!("CARGO_BIN_EXE_vmm-resume"));
    command.args([
        "--memory-fd",
        &memory_fd.to_string(),
        "--state-fd",
        &state_fd.to_string(),
        "--run-ms",
        "200",
        "--final-check",
    ]);
    // SAFETY: runs in the child between fork and exec and only calls fcntl,
    // which is async-signal-safe, on two descriptors this process owns.
    unsafe {
        command.pre_exec(move || {
            for fd in [memory_fd, state_fd] {
                if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let output = command.output().expect("run vmm-resume");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "vmm-resume failed: {stderr}");
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON report");
    eprintln!("{report:#}");

    assert_eq!(
        report["hellos"], 0,
        "the guest restarted instead of resuming"
    );
    assert_eq!(report["pages"]["mismatches"], 0);
    let khz = report["tsc_khz"].as_u64().unwrap().max(1);
    let first_entry_ns = report["first_entry_ns"].as_u64().unwrap();
    let host_window = vmm::time::between(kicked_ns, first_entry_ns);
    for gap in report["guest_gaps_ticks"].as_array().unwrap() {
        let ticks = gap.as_u64().expect("guest gap probe missing");
        let gap = Duration::from_micros(ticks * 1000 / khz);
        eprintln!("guest gap {gap:?}, host kick-to-resume {host_window:?}");
        assert!(gap + Duration::from_micros(200) >= host_window);
        assert!(gap <= host_window + Duration::from_millis(200));
    }
    for (after, before) in report["guest"].as_array().unwrap().iter().zip(&before) {
        assert_eq!(after["done"], true);
        assert_eq!(after["mismatches"], 0, "{after}");
        assert_eq!(after["register_mismatches"], 0, "{after}");
        assert!(after["iterations"].as_u64().unwrap() > before.iterations);
        assert!(after["final_verified"].as_u64().unwrap() >= layout.pages_per_vcpu() - 1);
    }
    // The successor's writes are in this process's mapping too.
    let check = check_pages(memory.view(), &layout).unwrap();
    assert_eq!(check.mismatches, 0, "{check:?}");
}
