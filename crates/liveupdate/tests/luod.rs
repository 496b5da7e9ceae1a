//! luod with real processes: a VMM deposits and exits or is SIGKILLed, a
//! separate successor retrieves and verifies every byte; luod refuses other
//! uids, malformed requests, name and token clashes and second retrievals
//! without disturbing other sessions; SIGTERM stops it cleanly.

mod common;

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Luod, PEER, Process, guest_arguments, small_guest_arguments};
use liveupdate::luod::kind;
use liveupdate::record::{FileRecord, Record, SessionRecord, checksum, wire};
use liveupdate::{Compatible, FileIdentity, HandlerRegistry, SessionName, Token, fdio};

fn peer_arguments<'a>(role: &'a str, luod: &'a Luod, rest: &'a [String]) -> Vec<&'a str> {
    let mut all = vec![role, "--socket", luod.socket().to_str().unwrap()];
    all.extend(rest.iter().map(String::as_str));
    all
}

fn deposit(luod: &Luod, session: &str, seed: u64, linger: bool) -> Process {
    deposit_guest(luod, session, guest_arguments(seed), linger)
}

fn deposit_small(luod: &Luod, session: &str, seed: u64) -> Process {
    deposit_guest(luod, session, small_guest_arguments(seed), false)
}

fn deposit_guest(luod: &Luod, session: &str, mut rest: Vec<String>, linger: bool) -> Process {
    rest.extend(["--session".to_owned(), session.to_owned()]);
    if linger {
        rest.push("--linger".to_owned());
    }
    let mut process = Process::peer(&peer_arguments("luod-deposit", luod, &rest));
    process.expect("DEPOSITED");
    process
}

fn retrieve(luod: &Luod, session: &str, seed: u64) -> String {
    retrieve_guest(luod, session, guest_arguments(seed))
}

fn retrieve_small(luod: &Luod, session: &str, seed: u64) -> String {
    retrieve_guest(luod, session, small_guest_arguments(seed))
}

fn retrieve_guest(luod: &Luod, session: &str, mut rest: Vec<String>) -> String {
    rest.extend(["--session".to_owned(), session.to_owned()]);
    let mut process = Process::peer(&peer_arguments("luod-retrieve", luod, &rest));
    let line = process.expect("VERIFIED luod");
    process.wait_success();
    line
}

#[test]
fn luod_round_trip_with_a_separate_successor() {
    let luod = Luod::start("luod-round-trip");
    let mut vmm = deposit(&luod, "vm0", 51, false);
    vmm.wait_success();
    let listed = luod.client().list().unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].name.as_str(), "vm0");
    assert!(!listed[0].retrieved);
    let verified = retrieve(&luod, "vm0", 51);
    assert!(
        verified.contains("small=7022pages") && verified.contains("state@12345"),
        "{verified}"
    );
    // Finished: luod let go.
    assert!(luod.client().list().unwrap().is_empty());
}

#[test]
fn a_vmm_killed_after_handing_over_loses_nothing() {
    let luod = Luod::start("luod-sigkill");
    let mut vmm = deposit(&luod, "vm0", 52, true);
    vmm.child.kill().unwrap(); // SIGKILL
    let status = vmm.wait();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(libc::SIGKILL));
    let verified = retrieve(&luod, "vm0", 52);
    assert!(verified.contains("small=7022pages"), "{verified}");
    if common::huge_available() {
        assert!(verified.contains("huge=11x2MiB"), "{verified}");
    }
}

#[test]
fn a_successor_expecting_other_contents_fails_verification() {
    // The verifier can fail: retrieving with another seed than the deposit
    // reports a difference.
    let luod = Luod::start("luod-mismatch");
    deposit_small(&luod, "vm0", 53).wait_success();
    let mut rest = small_guest_arguments(54);
    rest.extend(["--session".to_owned(), "vm0".to_owned()]);
    let mut process = Process::peer(&peer_arguments("luod-retrieve", &luod, &rest));
    let status = process.wait();
    assert!(!status.success());
    assert!(process.stderr().contains("differs"));
}

fn request_as(luod: &Luod, uid: u32, operation: &str, session: &str) -> String {
    use std::os::unix::process::CommandExt;
    let output = Command::new(PEER)
        .args(["luod-request", "--socket", luod.socket().to_str().unwrap()])
        .args(["--operation", operation, "--session", session])
        .uid(uid)
        .gid(uid)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap().trim().to_owned()
}

#[test]
fn luod_refuses_a_peer_of_another_uid() {
    if !rustix::process::geteuid().is_root() {
        test_support::skipped(format_args!("dropping to another uid needs root"));
        return;
    }
    let luod = Luod::start("luod-uid");
    deposit_small(&luod, "vm0", 55).wait_success();
    let nobody = 65534;
    let eperm = format!("ERRNO {}", libc::EPERM);
    for operation in ["retrieve", "show", "drop", "finish"] {
        let line = request_as(&luod, nobody, operation, "vm0");
        assert!(
            line.starts_with(&eperm),
            "{operation} as uid {nobody}: {line}"
        );
    }
    // It does not even see the session.
    assert_eq!(request_as(&luod, nobody, "list", "vm0"), "OK");
    // Nothing was disturbed.
    assert!(retrieve_small(&luod, "vm0", 55).contains("small=7022pages"));
}

fn memfd(name: &str) -> OwnedFd {
    let fd = rustix::fs::memfd_create(name, rustix::fs::MemfdFlags::CLOEXEC).unwrap();
    rustix::fs::ftruncate(&fd, 4096).unwrap();
    fd
}

fn file_record(token: u64, fd: BorrowedFd<'_>) -> FileRecord {
    FileRecord {
        compatible: Compatible::new("memfd", 1).unwrap(),
        token: Token(token),
        identity: FileIdentity::of(fd).unwrap(),
        data: liveupdate::handlers::memfd::MemfdData {
            size: 4096,
            position: 0,
            seals: 0,
        }
        .encode(),
    }
}

fn deposit_raw(
    luod: &Luod,
    bytes: &[u8],
    fds: &[BorrowedFd<'_>],
) -> Result<(), liveupdate::LuError> {
    let memfd = fdio::sealed_memfd("raw", bytes).unwrap();
    let mut all = vec![memfd.as_fd()];
    all.extend_from_slice(fds);
    luod.client().request(kind::DEPOSIT, &[], &all).map(drop)
}

#[test]
fn luod_refuses_malformed_requests_clashes_and_second_retrievals_undisturbed() {
    let luod = Luod::start("luod-refusals");
    deposit_small(&luod, "vm0", 56).wait_success();

    // A malformed request: an EPROTO reply, then the connection is closed.
    let client = luod.client();
    client
        .channel()
        .send_raw(b"definitely not a request", &[])
        .unwrap();
    let reply = client.channel().receive("test", false).unwrap();
    assert_eq!(reply.kind, kind::ERROR);
    let error = liveupdate::transport::decode_error(&reply.body);
    assert_eq!(error.errno(), libc::EPROTO, "{error}");
    assert_eq!(
        client.channel().receive("test", false).unwrap_err().errno(),
        libc::EPIPE
    );
    // An unknown request kind and a retrieve carrying fds are malformed too.
    let unknown = luod.client().request(77, &[], &[]).unwrap_err();
    assert_eq!(unknown.errno(), libc::EPROTO);
    let extra = memfd("extra");
    let with_fds = luod
        .client()
        .request(kind::RETRIEVE, b"vm0", &[extra.as_fd()])
        .unwrap_err();
    assert_eq!(with_fds.errno(), libc::EPROTO);
    // A deposit whose record memfd is not sealed.
    let unsealed = rustix::fs::memfd_create("unsealed", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
    let refused = luod
        .client()
        .request(kind::DEPOSIT, &[], &[unsealed.as_fd()])
        .unwrap_err();
    assert_eq!(refused.errno(), libc::EPROTO);

    // A token clash inside a deposited session: EEXIST.
    let (first, second) = (memfd("first"), memfd("second"));
    let record = Record::full(vec![SessionRecord {
        name: SessionName::new("clash").unwrap(),
        files: vec![
            file_record(1, first.as_fd()),
            file_record(2, second.as_fd()),
        ],
    }]);
    let mut bytes = record.encode().unwrap();
    let second_token = wire::HEADER_LEN + wire::SESSION_ENTRY_LEN + wire::FILE_ENTRY_LEN + 56;
    bytes[second_token] = 1;
    let sum = checksum(&bytes);
    bytes[wire::CHECKSUM_OFFSET..wire::CHECKSUM_OFFSET + 4].copy_from_slice(&sum.to_le_bytes());
    let clash = deposit_raw(&luod, &bytes, &[first.as_fd(), second.as_fd()]).unwrap_err();
    assert_eq!(clash.errno(), libc::EEXIST, "{clash}");
    // A record whose fds are other files than it names: EINVAL.
    let good = record.encode().unwrap();
    let swapped = deposit_raw(&luod, &good, &[second.as_fd(), first.as_fd()]).unwrap_err();
    assert_eq!(swapped.errno(), libc::EINVAL, "{swapped}");
    // A session name clash with the held vm0: EEXIST, and nothing of the
    // deposit is kept (all sessions or none).
    let both = Record::full(vec![
        SessionRecord {
            name: SessionName::new("fresh").unwrap(),
            files: vec![file_record(1, first.as_fd())],
        },
        SessionRecord {
            name: SessionName::new("vm0").unwrap(),
            files: vec![file_record(1, second.as_fd())],
        },
    ]);
    let name_clash = deposit_raw(
        &luod,
        &both.encode().unwrap(),
        &[first.as_fd(), second.as_fd()],
    )
    .unwrap_err();
    assert_eq!(name_clash.errno(), libc::EEXIST);
    let names: Vec<String> = luod
        .client()
        .list()
        .unwrap()
        .iter()
        .map(|s| s.name.to_string())
        .collect();
    assert_eq!(names, vec!["vm0"]);

    // A second retrieval while the first connection holds it: EINVAL.
    let registry = HandlerRegistry::with_builtin_handlers();
    let holder = luod.client();
    let mut incoming = holder.retrieve("vm0", &registry).unwrap();
    let second_try = luod.client().retrieve("vm0", &registry).unwrap_err();
    assert_eq!(second_try.errno(), libc::EINVAL);
    assert_eq!(
        luod.client().drop_session("vm0").unwrap_err().errno(),
        libc::EBUSY
    );
    assert_eq!(
        luod.client().finish("vm0").unwrap_err().errno(),
        libc::EINVAL
    );
    assert_eq!(
        luod.client()
            .retrieve("nothing", &registry)
            .unwrap_err()
            .errno(),
        libc::ENOENT
    );
    assert_eq!(luod.client().show("").unwrap_err().errno(), libc::EINVAL);
    // A retriever that disconnects without finishing gives the session back.
    drop(incoming.retrieve_session("vm0").unwrap());
    drop(holder);
    let deadline = Instant::now() + Duration::from_secs(10);
    while luod.client().list().unwrap()[0].retrieved {
        assert!(
            Instant::now() < deadline,
            "luod did not notice the disconnect"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // None of this disturbed vm0: a real successor verifies every byte.
    let shown = luod.client().show("vm0").unwrap();
    assert_eq!(shown.sessions[0].name.as_str(), "vm0");
    assert!(retrieve_small(&luod, "vm0", 56).contains("small=7022pages"));
}

#[test]
fn sigterm_stops_luod_cleanly_and_logs_what_it_releases() {
    let mut luod = Luod::start("luod-sigterm");
    deposit_small(&luod, "kept", 57).wait_success();
    let pid = rustix::process::Pid::from_child(&luod.process.child);
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    let status = luod.process.wait();
    assert!(status.success(), "{status}");
    assert!(!luod.socket.exists(), "the socket file is removed");
    let log = luod.process.stderr();
    assert!(log.contains("luod shutting down"), "{log}");
    assert!(
        log.contains("releasing a session nobody retrieved") && log.contains("kept"),
        "{log}"
    );
}

#[test]
fn luod_bounds_its_connections() {
    let luod = Luod::start_with("luod-connections", &["--max-connections", "2"]);
    let first = luod.client();
    let second = luod.client();
    assert!(first.list().unwrap().is_empty());
    assert!(second.list().unwrap().is_empty());
    // The third is accepted, told EAGAIN and closed; the others go on.
    let third = luod.client();
    assert_eq!(third.list().unwrap_err().errno(), libc::EAGAIN);
    assert!(first.list().unwrap().is_empty());
    drop(second);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match luod.client().list() {
            Ok(sessions) => {
                assert!(sessions.is_empty());
                break;
            }
            Err(error) => {
                assert_eq!(error.errno(), libc::EAGAIN, "{error}");
                assert!(
                    Instant::now() < deadline,
                    "the freed connection slot was not reused"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}
