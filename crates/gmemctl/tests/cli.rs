//! `gmemctl inspect` and `gmemctl sessions` against real records and a real
//! luod (the daemon's library, run on a thread of this test).

use std::os::fd::AsFd;
use std::path::PathBuf;
use std::process::{Command, Output};

use liveupdate::handlers::gmem_data::{BackendCode, GmemData, PolicyRange};
use liveupdate::handlers::memfd::MemfdData;
use liveupdate::luod::LuodClient;
use liveupdate::luod::server::{Daemon, DaemonConfig};
use liveupdate::record::{FileRecord, Record, SessionRecord};
use liveupdate::{Compatible, FileIdentity, HandlerRegistry, LiveUpdate, SessionName, Token};

const GMEMCTL: &str = env!("CARGO_BIN_EXE_gmemctl");

fn scratch(name: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!("gmemctl-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&path).unwrap();
    path
}

fn gmemctl(arguments: &[&str]) -> Output {
    Command::new(GMEMCTL).args(arguments).output().unwrap()
}

fn stdout(output: &Output) -> String {
    assert!(
        output.status.success(),
        "gmemctl failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout.clone()).unwrap()
}

fn sample_record() -> Record {
    let gmem = GmemData::from_folios(
        64 << 20,
        1,
        BackendCode::Memfd,
        vec![PolicyRange {
            first_page: 0,
            end_page: 512,
            mode: 2,
            nodemask: 1,
        }],
        (0..16).map(|page| (page, 0)).chain([(512, 9)]),
    )
    .unwrap();
    let identity = FileIdentity {
        device: 0x10,
        inode: 77,
    };
    Record::full(vec![SessionRecord {
        name: SessionName::new("vm0").unwrap(),
        files: vec![
            FileRecord {
                compatible: Compatible::new("gmem", 1).unwrap(),
                token: Token(0),
                identity,
                data: gmem.encode(),
            },
            FileRecord {
                compatible: Compatible::new("memfd", 1).unwrap(),
                token: Token(9),
                identity: FileIdentity {
                    inode: 78,
                    ..identity
                },
                data: MemfdData {
                    size: 4096,
                    position: 7,
                    seals: libc::F_SEAL_GROW as u32,
                }
                .encode(),
            },
        ],
    }])
}

#[test]
fn inspect_decodes_a_record_for_a_human() {
    let directory = scratch("inspect");
    let path = directory.join("record");
    let bytes = sample_record().encode().unwrap();
    std::fs::write(&path, &bytes).unwrap();
    let text = stdout(&gmemctl(&["inspect", path.to_str().unwrap()]));
    for expected in [
        "record: version 1, full, 1 sessions, 2 files",
        "session \"vm0\" (2 files)",
        "token 0x0  gmem v1  dev 0x10 ino 77",
        "gmem: size 64 MiB, flags MMAP, backend memfd, 1 policy ranges, 2 runs, 17 folios",
        "policy pages [0, 512) BIND nodes 0x1",
        "run from page 0: 16 x 4 KiB",
        "run from page 512: 1 x 2 MiB",
        "token 0x9  memfd v1",
        "memfd: size 4 KiB, position 7, seals GROW",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
    }
    // A corrupted record is a clear error, not a panic.
    let mut corrupted = bytes.clone();
    corrupted[100] ^= 0xff;
    std::fs::write(&path, &corrupted).unwrap();
    let output = gmemctl(&["inspect", path.to_str().unwrap()]);
    assert!(!output.status.success());
    let error = String::from_utf8_lossy(&output.stderr);
    assert!(
        error.contains("is not a valid handover record") && error.contains("checksum"),
        "{error}"
    );
    std::fs::write(&path, b"short").unwrap();
    let output = gmemctl(&["inspect", path.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&output.stderr).contains("truncated"));
    std::fs::remove_dir_all(directory).unwrap();
}

#[test]
fn sessions_list_show_and_drop_talk_to_luod() {
    let directory = scratch("sessions");
    let socket = directory.join("luod.sock");
    let mut daemon = Daemon::bind(DaemonConfig::new(&socket)).unwrap();
    let (stop_reader, stop_writer) = rustix::pipe::pipe().unwrap();
    let server = std::thread::spawn(move || daemon.run(stop_reader.as_fd()).unwrap());

    let memfd = rustix::fs::memfd_create("state", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
    rustix::fs::ftruncate(&memfd, 8192).unwrap();
    let live_update = LiveUpdate::new(HandlerRegistry::with_builtin_handlers());
    let session = live_update.create_session("vm7").unwrap();
    session.preserve(Token(3), &memfd).unwrap();
    LuodClient::connect(&socket)
        .unwrap()
        .hand_over(&live_update)
        .unwrap();

    let socket_argument = socket.to_str().unwrap();
    let listed = stdout(&gmemctl(&["sessions", "--socket", socket_argument, "list"]));
    assert!(
        listed.contains("vm7") && listed.contains("held"),
        "{listed}"
    );
    let shown = stdout(&gmemctl(&[
        "sessions",
        "--socket",
        socket_argument,
        "show",
        "vm7",
    ]));
    assert!(
        shown.contains("token 0x3  memfd v1") && shown.contains("size 8 KiB"),
        "{shown}"
    );
    let missing = gmemctl(&["sessions", "--socket", socket_argument, "show", "nope"]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("ENOENT"));
    let dropped = stdout(&gmemctl(&[
        "sessions",
        "--socket",
        socket_argument,
        "drop",
        "vm7",
    ]));
    assert!(dropped.contains("dropped session vm7"), "{dropped}");
    let empty = stdout(&gmemctl(&["sessions", "--socket", socket_argument, "list"]));
    assert!(empty.contains("no sessions"), "{empty}");

    rustix::io::write(&stop_writer, b"x").unwrap();
    server.join().unwrap();
    drop(session);
    std::fs::remove_dir_all(directory).unwrap();
}
