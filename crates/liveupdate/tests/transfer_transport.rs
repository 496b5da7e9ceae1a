//! The transfer transport between two real processes: a successor started
//! ahead connects to the old VMM's socket, receives everything while the old
//! process still writes its memory, and takes over at the switch; and a
//! successor that dies before the switch leaves the old process running.

mod common;

use common::{Process, Scratch, guest_arguments, small_guest_arguments};

/// A scratch directory and the path of the old VMM's socket in it.
fn scratch_with_socket(name: &str) -> (Scratch, String) {
    let scratch = Scratch::new(name);
    let socket = scratch.join("vmm.sock");
    let socket = socket.to_str().expect("a UTF-8 scratch path").to_owned();
    (scratch, socket)
}

/// Starts the peer binary in `role` on `socket` with the guest's arguments
/// and `flags`.
fn peer(role: &str, socket: &str, guest: &[String], flags: &[&str]) -> Process {
    let mut all = vec![role, "--socket", socket];
    all.extend(guest.iter().map(String::as_str));
    all.extend_from_slice(flags);
    Process::peer(&all)
}

/// Starts a successor (with `successor_flags`) ahead of the old VMM (with
/// `old_flags`) on `socket` and waits until the old VMM has offered and the
/// successor accepted. Returns (old, successor).
fn offered(
    socket: &str,
    guest: &[String],
    successor_flags: &[&str],
    old_flags: &[&str],
) -> (Process, Process) {
    // The successor starts first and waits for the old VMM's socket.
    let mut successor = peer("transfer-new", socket, guest, successor_flags);
    let mut old = peer("transfer-old", socket, guest, old_flags);
    old.expect("OFFERED");
    successor.expect("READY");
    (old, successor)
}

/// Switches over and returns the successor's VERIFIED line, once both
/// processes have ended well.
fn switch_successfully(mut old: Process, mut successor: Process) -> String {
    old.send_line("switch");
    old.expect("SWITCHED");
    let verified = successor.expect("VERIFIED transfer");
    old.wait_success();
    successor.wait_success();
    verified
}

#[test]
fn transfer_round_trip_with_a_pre_started_successor() {
    let (_scratch, socket) = scratch_with_socket("transfer");
    let guest = guest_arguments(42);
    let (old, successor) = offered(&socket, &guest, &[], &[]);
    // The old process rewrote memory and state after the offer; the switch
    // carries only the changed state record and the payload.
    let verified = switch_successfully(old, successor);
    // 7022 pages plus the one the old VMM faulted in between offer and
    // switch, which only the switch's delta told the successor about.
    assert!(verified.contains("small=7023pages"), "{verified}");
    assert!(verified.contains("state@12379"), "{verified}");
    assert!(verified.contains("unfrozen-at-finish"), "{verified}");
    if common::huge_available() {
        assert!(verified.contains("huge=11x2MiB"), "{verified}");
    }
}

#[test]
fn a_successor_dying_before_the_switch_leaves_the_old_process_running() {
    let (_scratch, socket) = scratch_with_socket("transfer-death");
    let guest = small_guest_arguments(43);
    let mut old = peer("transfer-old", &socket, &guest, &[]);
    old.expect("LISTENING");
    let mut successor = peer("transfer-new", &socket, &guest, &["--die-before-switch"]);
    successor.expect("READY");
    assert_eq!(successor.wait().code(), Some(17));
    old.send_line("switch");
    let failed = old.expect("SWITCH-FAILED");
    assert!(
        failed.contains(&format!("errno={}", libc::EPIPE)),
        "{failed}"
    );
    // It kept its guest: memory intact, writable, allocatable again.
    old.expect("CARRIED-ON");
    old.wait_success();
}

#[test]
fn the_old_process_dying_before_the_switch_stops_the_successor() {
    let (_scratch, socket) = scratch_with_socket("transfer-old-death");
    let guest = small_guest_arguments(44);
    let (mut old, mut successor) = offered(&socket, &guest, &[], &[]);
    old.child.kill().unwrap(); // SIGKILL, before any switch
    old.wait();
    let line = successor.expect("NO-SWITCH");
    assert!(line.contains(&format!("errno={}", libc::EPIPE)), "{line}");
    successor.wait_success();
}

#[test]
fn a_successor_that_built_the_memory_object_ahead_gets_it_brought_up_to_date() {
    let (_scratch, socket) = scratch_with_socket("transfer-ahead");
    let guest = small_guest_arguments(45);
    let (old, successor) = offered(&socket, &guest, &["--build-ahead"], &[]);
    // The old process faults in a page after the offer: the successor's
    // object, restored from the offer, lacks it until the retrieve at the
    // switch records it.
    let verified = switch_successfully(old, successor);
    assert!(verified.contains("small=7023pages"), "{verified}");
}

#[test]
fn a_successor_whose_retrieve_fails_at_the_switch_leaves_the_old_process_running() {
    let (_scratch, socket) = scratch_with_socket("transfer-retrieve-fails");
    let guest = small_guest_arguments(46);
    // Between offer and switch the old process also frees a page the offer
    // listed: the successor's object built ahead cannot match the final
    // record, so its retrieve fails, before it answers the switch.
    let (mut old, mut successor) = offered(
        &socket,
        &guest,
        &["--build-ahead"],
        &["--punch-after-offer"],
    );
    old.send_line("switch");
    let failed = old.expect("SWITCH-FAILED");
    assert!(
        failed.contains(&format!("errno={}", libc::EINVAL)),
        "{failed}"
    );
    assert!(failed.contains("populated folios differ"), "{failed}");
    let refused = successor.expect("NO-SWITCH");
    assert!(
        refused.contains(&format!("errno={}", libc::EINVAL)),
        "{refused}"
    );
    successor.wait_success();
    // The old process kept its guest: memory intact, writable, allocatable
    // again.
    old.expect("CARRIED-ON");
    old.wait_success();
}
