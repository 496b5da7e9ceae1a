//! Ctrl-C during `gmemctl bench` gives the huge page pool back: a real
//! `gmemctl bench --quick` process is sent SIGINT while a hugetlb figure
//! holds pages it added to the 2 MiB pool; afterwards the pool must be the
//! size it had before the run, and the process must have ended by SIGINT.
//! Needs root (to raise the pool) and a 2 MiB pool; says so where either is
//! missing. Alone in its test binary: nothing else may resize the pool
//! meanwhile.

use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use gmem::hugetlb;

const GMEMCTL: &str = env!("CARGO_BIN_EXE_gmemctl");

#[test]
fn ctrl_c_during_the_bench_gives_the_huge_pages_back() {
    let former = match hugetlb::pool_size() {
        Ok(pages) => pages,
        Err(error) => {
            test_support::skipped(format_args!("no 2 MiB huge page pool here: {error}"));
            return;
        }
    };
    if !rustix::process::geteuid().is_root() {
        test_support::skipped("not root: the bench cannot raise the huge page pool");
        return;
    }
    let mut bench = Command::new(GMEMCTL)
        .args(["bench", "--quick", "--sizes-mib", "4"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start gmemctl bench");
    // The hugetlb figures come last; each holds its reservation for the
    // size's handover runs (hundreds of milliseconds).
    let deadline = Instant::now() + Duration::from_secs(300);
    let raised = loop {
        let pool = hugetlb::pool_size().expect("pool size");
        if pool > former {
            break pool;
        }
        if let Some(status) = bench.try_wait().expect("wait for gmemctl") {
            test_support::skipped(format_args!(
                "gmemctl bench ended ({status}) without raising the pool (no huge pages to be had here?)"
            ));
            return;
        }
        assert!(
            Instant::now() < deadline,
            "gmemctl bench never raised the pool"
        );
        std::thread::sleep(Duration::from_millis(1));
    };
    let pid = rustix::process::Pid::from_child(&bench);
    rustix::process::kill_process(pid, rustix::process::Signal::INT).expect("send SIGINT");
    let status = bench.wait().expect("wait for gmemctl");
    assert_eq!(
        status.signal(),
        Some(libc::SIGINT),
        "gmemctl bench did not end by the SIGINT: {status}"
    );
    let after = hugetlb::pool_size().expect("pool size");
    if after != former {
        // Failing: put the pool back first, so the failure leaks nothing.
        let pool_file = format!("{}/nr_hugepages", hugetlb::POOL_DIRECTORY);
        let _ = std::fs::write(pool_file, former.to_string());
    }
    assert_eq!(
        after, former,
        "the pool was {raised} pages at the SIGINT and was not given back"
    );
}
