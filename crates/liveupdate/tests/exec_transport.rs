//! The exec transport across a real `execve`: a helper process fills 64 MiB
//! of guest memory (4 KiB and, with huge pages, 2 MiB folios) and a state
//! memfd, preserves them and execs itself; the new image checks that
//! exactly the preserved fds and the record survived, retrieves, and
//! verifies every byte, every populated page, size, position and seals.

mod common;

use std::os::fd::{AsRawFd, RawFd};

use common::{Process, guest_arguments};
use liveupdate::transport::exec;
use liveupdate::{HandlerRegistry, LiveUpdate, Token};

#[test]
fn exec_round_trip_verifies_every_byte() {
    let mut arguments = vec!["exec-old".to_owned()];
    arguments.extend(guest_arguments(41));
    let arguments: Vec<&str> = arguments.iter().map(String::as_str).collect();
    let mut peer = Process::peer(&arguments);
    let verified = peer.expect("VERIFIED exec");
    peer.wait_success();
    assert!(verified.contains("small=7022pages"), "{verified}");
    assert!(verified.contains("state@12345"), "{verified}");
    assert!(verified.contains("unfrozen-at-finish"), "{verified}");
    if common::huge_available() {
        assert!(verified.contains("huge=11x2MiB"), "{verified}");
    }
}

fn non_cloexec_fds() -> Vec<RawFd> {
    let listed: Vec<RawFd> = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    listed
        .into_iter()
        // SAFETY: F_GETFD only reads the fd table.
        .filter(|fd| unsafe { libc::fcntl(*fd, libc::F_GETFD) } == 0)
        .collect()
}

#[test]
fn a_failed_exec_aborts_and_the_process_carries_on() {
    let memfd = rustix::fs::memfd_create("kept", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
    rustix::fs::ftruncate(&memfd, 4096).unwrap();
    let live_update = LiveUpdate::new(HandlerRegistry::with_builtin_handlers());
    let session = live_update.create_session("vm0").unwrap();
    session.preserve(Token(0), &memfd).unwrap();
    let before = non_cloexec_fds();
    let error = exec::exec_in_place(&live_update, std::path::Path::new("/nonexistent/vmm"), &[]);
    assert_eq!(error.errno(), libc::ENOENT, "{error}");
    // Close-on-exec is back on everything of ours, the record memfd is gone.
    assert_eq!(non_cloexec_fds(), before);
    // The handover was aborted: the files stay preserved and can be frozen
    // again.
    assert!(!live_update.is_handed_over());
    assert_eq!(
        liveupdate::handlers::memfd::set_len(&memfd, 8192)
            .unwrap_err()
            .errno(),
        libc::EPERM
    );
    live_update.freeze().unwrap().abort();
    drop(session);
    liveupdate::handlers::memfd::set_len(&memfd, 8192).unwrap();
    assert!(memfd.as_raw_fd() > 2);
}

#[test]
fn without_the_variables_there_is_nothing_to_take() {
    // This test process was not started by an exec handover.
    let incoming = exec::incoming_from_environment(&HandlerRegistry::with_builtin_handlers());
    assert!(incoming.unwrap().is_none());
}
