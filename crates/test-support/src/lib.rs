//! Helpers shared by the workspace's tests; a dev-dependency only.
//!
//! Contract: a test that cannot run (part of) its check on this machine
//! (no /dev/kvm, no huge pages, not root, ...) calls [`skipped`] with the
//! reason and returns, so it never passes silently. libtest captures
//! `eprintln!` of a passing test, which would hide the notice; [`skipped`]
//! writes to the process's stderr directly, which `cargo test` shows.

use std::fmt::Display;
use std::io::Write;

/// Prints `SKIPPED: <what>` where `cargo test` shows it, even for a test
/// that passes.
pub fn skipped(what: impl Display) {
    // Locking stderr keeps the line whole between parallel tests; a failed
    // write to stderr has nowhere better to be reported.
    let _ = writeln!(std::io::stderr().lock(), "SKIPPED: {what}");
}
