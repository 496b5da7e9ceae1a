//! `gmemctl demo` end to end, as a user runs it: small sizes, every mode,
//! the JSON report checked; and the host-thread fallback, labelled as such.

use std::process::Command;

const GMEMCTL: &str = env!("CARGO_BIN_EXE_gmemctl");

fn demo(extra: &[&str]) -> (serde_json::Value, String) {
    let output = Command::new(GMEMCTL)
        .args([
            "demo",
            "--size",
            "64M",
            "--updates",
            "3",
            "--interval-ms",
            "300",
            "--recovery-window-ms",
            "200",
            "--json",
        ])
        .args(extra)
        .output()
        .expect("run gmemctl demo");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(
        output.status.success(),
        "gmemctl demo failed: {stderr}\n{}",
        String::from_utf8_lossy(&output.stdout)
    );
    let report = serde_json::from_slice(&output.stdout).expect("a JSON report on stdout");
    (report, stderr)
}

fn check(report: &serde_json::Value) {
    assert_eq!(report["problems"], serde_json::json!([]), "{report:#}");
    let updates = report["updates"].as_array().expect("updates");
    let modes: Vec<&str> = updates
        .iter()
        .map(|row| row["mode"].as_str().unwrap())
        .collect();
    assert_eq!(modes, ["exec", "transfer", "luod"]);
    for row in updates {
        assert_eq!(row["outcome"], "completed", "{row:#}");
        assert_eq!(row["derived"]["mismatches"], 0, "{row:#}");
        assert_eq!(row["derived"]["faults_unserved"], 0, "{row:#}");
        let gaps = row["new"]["guest_gaps_ns"].as_array().expect("gaps");
        assert!(gaps.iter().all(|gap| gap.as_u64().is_some()), "{row:#}");
    }
    let pages = &report["final_check"]["pages"];
    assert_eq!(pages["mismatches"], 0);
    assert!(pages["pages_checked"].as_u64().unwrap() > 0);
}

#[test]
fn the_demo_live_updates_a_running_guest_in_every_mode() {
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        test_support::skipped(format_args!(
            "the_demo_live_updates_a_running_guest_in_every_mode: no /dev/kvm"
        ));
        return;
    }
    let (report, _) = demo(&[]);
    assert_eq!(report["kvm"], true);
    check(&report);
}

/// Whether userfaultfd (which the fault service needs) works here.
fn userfaultfd_available() -> bool {
    // SAFETY: userfaultfd(2) takes flags only and returns a new fd or -1;
    // the fd, if any, is closed right away and nothing else is touched.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC) };
    if fd < 0 {
        return false;
    }
    // SAFETY: `fd` was just returned by the kernel and is owned here.
    unsafe { libc::close(fd as i32) };
    true
}

#[test]
fn without_kvm_the_demo_runs_the_workload_on_host_threads_and_says_so() {
    if !userfaultfd_available() {
        test_support::skipped(format_args!(
            "without_kvm_the_demo_runs_the_workload_on_host_threads_and_says_so: no userfaultfd here"
        ));
        return;
    }
    let (report, stderr) = demo(&["--no-kvm"]);
    assert!(stderr.contains("NO KVM"), "{stderr}");
    assert!(stderr.contains("host threads"), "{stderr}");
    assert_eq!(report["kvm"], false);
    check(&report);
}

#[test]
fn the_demo_refuses_bad_options_with_a_message() {
    let output = Command::new(GMEMCTL)
        .args(["demo", "--size", "lots"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("is not a size"));
}
