//! The transfer transport between two real processes: a successor started
//! ahead connects to the old VMM's socket, receives everything while the old
//! process still writes its memory, and takes over at the switch; and a
//! successor that dies before the switch leaves the old process running.

mod common;

use common::{Process, Scratch, guest_arguments, small_guest_arguments};

fn arguments<'a>(role: &'a str, socket: &'a str, guest: &'a [String]) -> Vec<&'a str> {
    let mut all = vec![role, "--socket", socket];
    all.extend(guest.iter().map(String::as_str));
    all
}

#[test]
fn transfer_round_trip_with_a_pre_started_successor() {
    let scratch = Scratch::new("transfer");
    let socket = scratch.join("vmm.sock");
    let socket = socket.to_str().unwrap();
    let guest = guest_arguments(42);
    // The successor starts first and waits for the old VMM's socket.
    let mut successor = Process::peer(&arguments("transfer-new", socket, &guest));
    let mut old = Process::peer(&arguments("transfer-old", socket, &guest));
    old.expect("OFFERED");
    successor.expect("READY");
    // The old process rewrote memory and state after the offer; the switch
    // carries only the changed state record and the payload.
    old.send_line("switch");
    old.expect("SWITCHED");
    let verified = successor.expect("VERIFIED transfer");
    old.wait_success();
    successor.wait_success();
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
    let scratch = Scratch::new("transfer-death");
    let socket = scratch.join("vmm.sock");
    let socket = socket.to_str().unwrap();
    let guest = small_guest_arguments(43);
    let mut old = Process::peer(&arguments("transfer-old", socket, &guest));
    old.expect("LISTENING");
    let mut all = arguments("transfer-new", socket, &guest);
    all.push("--die-before-switch");
    let mut successor = Process::peer(&all);
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
    let scratch = Scratch::new("transfer-old-death");
    let socket = scratch.join("vmm.sock");
    let socket = socket.to_str().unwrap();
    let guest = small_guest_arguments(44);
    let mut successor = Process::peer(&arguments("transfer-new", socket, &guest));
    let mut old = Process::peer(&arguments("transfer-old", socket, &guest));
    old.expect("OFFERED");
    successor.expect("READY");
    old.child.kill().unwrap(); // SIGKILL, before any switch
    old.wait();
    let line = successor.expect("NO-SWITCH");
    assert!(line.contains(&format!("errno={}", libc::EPIPE)), "{line}");
    successor.wait_success();
}

#[test]
fn a_successor_that_built_the_memory_object_ahead_gets_it_brought_up_to_date() {
    let scratch = Scratch::new("transfer-ahead");
    let socket = scratch.join("vmm.sock");
    let socket = socket.to_str().unwrap();
    let guest = small_guest_arguments(45);
    let mut all = arguments("transfer-new", socket, &guest);
    all.push("--build-ahead");
    let mut successor = Process::peer(&all);
    let mut old = Process::peer(&arguments("transfer-old", socket, &guest));
    old.expect("OFFERED");
    successor.expect("READY");
    // The old process faults in a page after the offer: the successor's
    // object, restored from the offer, lacks it until the retrieve at the
    // switch records it.
    old.send_line("switch");
    old.expect("SWITCHED");
    let verified = successor.expect("VERIFIED transfer");
    old.wait_success();
    successor.wait_success();
    assert!(verified.contains("small=7023pages"), "{verified}");
}

#[test]
fn a_successor_whose_retrieve_fails_at_the_switch_leaves_the_old_process_running() {
    let scratch = Scratch::new("transfer-retrieve-fails");
    let socket = scratch.join("vmm.sock");
    let socket = socket.to_str().unwrap();
    let guest = small_guest_arguments(46);
    let mut all = arguments("transfer-new", socket, &guest);
    all.push("--build-ahead");
    let mut successor = Process::peer(&all);
    // Between offer and switch the old process also frees a page the offer
    // listed: the successor's object built ahead cannot match the final
    // record, so its retrieve fails, before it answers the switch.
    let mut old_arguments = arguments("transfer-old", socket, &guest);
    old_arguments.push("--punch-after-offer");
    let mut old = Process::peer(&old_arguments);
    old.expect("OFFERED");
    successor.expect("READY");
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
