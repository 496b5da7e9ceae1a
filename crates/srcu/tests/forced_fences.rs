//! `GMEM_SRCU_FENCES=1` forces the fence read side for the whole process.
//!
//! The process mode is decided once, before `main`, so the check needs a
//! fresh process: the test re-runs its own binary with the variable set and
//! lets the child assert what it sees.

use std::process::Command;

use srcu::{FORCE_FENCES_ENV, ReadSide, Srcu};

const CHILD_MARKER: &str = "SRCU_FORCED_FENCES_CHILD";

#[test]
fn environment_variable_forces_the_fence_read_side() {
    if std::env::var_os(CHILD_MARKER).is_some() {
        // Child: everything below must run on fences, and still work.
        assert_eq!(ReadSide::of_process(), ReadSide::Fences);
        let domain = Srcu::new();
        assert_eq!(domain.read_side(), ReadSide::Fences);
        drop(domain.read_lock());
        domain.synchronize();
        return;
    }
    let status = Command::new(std::env::current_exe().expect("test binary path"))
        .args([
            "--exact",
            "environment_variable_forces_the_fence_read_side",
            "--test-threads=1",
        ])
        .env(FORCE_FENCES_ENV, "1")
        .env(CHILD_MARKER, "1")
        .status()
        .expect("re-run the test binary");
    assert!(
        status.success(),
        "child with {FORCE_FENCES_ENV}=1 failed: {status}"
    );
}
