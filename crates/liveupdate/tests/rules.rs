//! The rule-table test: every row of DESIGN.md's "Upstream LUO's rules"
//! table as test cases with their exact errno and ordering, run on real
//! kernel objects (memfds, pipes, regular files, /dev/null).
//!
//! A scripted handler for pipes stands in for handlers that fail on demand
//! (handler errors passed through, a freeze failing at file k, a can_finish
//! refusal, a failing retrieve) and logs every call so the order can be
//! checked.

use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex};

use liveupdate::handlers::memfd::{self, MemfdData, MemfdFile};
use liveupdate::record::{Record, SessionRecord};
use liveupdate::{
    Compatible, FileHandler, FileIdentity, HandlerError, HandlerRegistry, Incoming, LiveUpdate,
    RetrievedObject, Token,
};
use rustix::fs::{FallocateFlags, MemfdFlags, SealFlags};

#[derive(Default)]
struct Script {
    log: Vec<String>,
    fail_preserve: Option<i32>,
    fail_freeze_inode: Option<u64>,
    fail_retrieve: Option<i32>,
    refuse_finish: bool,
}

/// A handler for pipes whose failures the test scripts.
struct PipeHandler {
    compatible: Compatible,
    script: Arc<Mutex<Script>>,
}

#[derive(Debug)]
struct PipeObject {
    fd: OwnedFd,
}

impl RetrievedObject for PipeObject {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

fn inode(fd: BorrowedFd<'_>) -> u64 {
    FileIdentity::of(fd).unwrap().inode
}

impl PipeHandler {
    fn log(&self, entry: String) {
        self.script.lock().unwrap().log.push(entry);
    }
}

impl FileHandler for PipeHandler {
    fn compatible(&self) -> &Compatible {
        &self.compatible
    }

    fn can_preserve(&self, file: BorrowedFd<'_>) -> bool {
        rustix::fs::fstat(file).is_ok_and(|status| status.st_mode & libc::S_IFMT == libc::S_IFIFO)
    }

    fn preserve(
        &self,
        file: BorrowedFd<'_>,
    ) -> Result<Box<dyn std::any::Any + Send>, HandlerError> {
        if let Some(errno) = self.script.lock().unwrap().fail_preserve {
            return Err(HandlerError::new(errno, "scripted preserve failure"));
        }
        self.log(format!("preserve {}", inode(file)));
        Ok(Box::new(inode(file)))
    }

    fn unpreserve(&self, file: BorrowedFd<'_>, _state: Box<dyn std::any::Any + Send>) {
        self.log(format!("unpreserve {}", inode(file)));
    }

    fn freeze(
        &self,
        file: BorrowedFd<'_>,
        _state: &mut Box<dyn std::any::Any + Send>,
    ) -> Result<Vec<u8>, HandlerError> {
        let file_inode = inode(file);
        if self.script.lock().unwrap().fail_freeze_inode == Some(file_inode) {
            self.log(format!("freeze-fail {file_inode}"));
            return Err(HandlerError::new(libc::EIO, "scripted freeze failure"));
        }
        self.log(format!("freeze {file_inode}"));
        Ok(file_inode.to_le_bytes().to_vec())
    }

    fn unfreeze(&self, file: BorrowedFd<'_>, _state: &mut Box<dyn std::any::Any + Send>) {
        self.log(format!("unfreeze {}", inode(file)));
    }

    fn retrieve(
        &self,
        file: OwnedFd,
        data: &[u8],
    ) -> Result<Arc<dyn RetrievedObject>, HandlerError> {
        self.log(format!("retrieve {}", inode(file.as_fd())));
        if let Some(errno) = self.script.lock().unwrap().fail_retrieve {
            return Err(HandlerError::new(errno, "scripted retrieve failure"));
        }
        assert_eq!(data, inode(file.as_fd()).to_le_bytes());
        Ok(Arc::new(PipeObject { fd: file }))
    }

    fn can_finish(&self, _retrieved: Option<&Arc<dyn RetrievedObject>>, _data: &[u8]) -> bool {
        !self.script.lock().unwrap().refuse_finish
    }

    fn finish(&self, retrieved: Option<&Arc<dyn RetrievedObject>>, data: &[u8]) {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(data);
        let state = if retrieved.is_some() {
            "retrieved"
        } else {
            "unretrieved"
        };
        self.log(format!("finish {} {state}", u64::from_le_bytes(bytes)));
    }
}

struct Fixture {
    registry: HandlerRegistry,
    script: Arc<Mutex<Script>>,
    live_update: LiveUpdate,
}

fn fixture() -> Fixture {
    fixture_with(Arc::default())
}

/// A fixture whose pipe handler follows `script` (shared with an earlier
/// fixture to script a successor).
fn fixture_with(script: Arc<Mutex<Script>>) -> Fixture {
    let mut registry = HandlerRegistry::with_builtin_handlers();
    registry
        .register(Arc::new(PipeHandler {
            compatible: Compatible::new("test-pipe", 1).unwrap(),
            script: script.clone(),
        }))
        .unwrap();
    Fixture {
        live_update: LiveUpdate::new(registry.clone()),
        registry,
        script,
    }
}

impl Fixture {
    fn log(&self) -> Vec<String> {
        std::mem::take(&mut self.script.lock().unwrap().log)
    }

    /// Freezes, completes and rebuilds the sessions in this process, as a
    /// successor would after any transport.
    fn hand_over(&self) -> Incoming {
        let handover = self.live_update.freeze().unwrap();
        let fds: Vec<OwnedFd> = handover
            .fds()
            .iter()
            .map(|fd| fd.try_clone_to_owned().unwrap())
            .collect();
        let bytes = handover.bytes().to_vec();
        handover.complete();
        Incoming::decode(&self.registry, &bytes, fds).unwrap()
    }
}

fn memfd(name: &str, contents: &[u8]) -> OwnedFd {
    let fd =
        rustix::fs::memfd_create(name, MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING).unwrap();
    rustix::io::write(&fd, contents).unwrap();
    fd
}

fn pipe() -> OwnedFd {
    rustix::pipe::pipe().unwrap().0
}

fn errno<T: std::fmt::Debug>(result: Result<T, liveupdate::LuError>) -> i32 {
    result.unwrap_err().errno()
}

// ---- create session ----

#[test]
fn create_session_name_is_1_to_63_bytes_never_truncated() {
    let fixture = fixture();
    assert_eq!(errno(fixture.live_update.create_session("")), libc::EINVAL);
    assert_eq!(
        errno(fixture.live_update.create_session(&"x".repeat(64))),
        libc::EINVAL
    );
    assert_eq!(
        errno(fixture.live_update.create_session("nul\0inside")),
        libc::EINVAL
    );
    let longest = "y".repeat(63);
    let session = fixture.live_update.create_session(&longest).unwrap();
    assert_eq!(session.name().as_str(), longest);
    // The 64-byte name was refused, not truncated into the 63-byte one.
    assert_eq!(fixture.live_update.session_names().len(), 1);
}

#[test]
fn create_session_name_used_by_an_outgoing_session_is_eexist_until_closed() {
    let fixture = fixture();
    let first = fixture.live_update.create_session("vm0").unwrap();
    assert_eq!(
        errno(fixture.live_update.create_session("vm0")),
        libc::EEXIST
    );
    first.close();
    let again = fixture.live_update.create_session("vm0").unwrap();
    assert_eq!(again.name().as_str(), "vm0");
}

#[test]
fn incoming_sessions_are_a_separate_namespace() {
    let fixture = fixture();
    let session = fixture.live_update.create_session("vm0").unwrap();
    let state = memfd("state", b"abc");
    session.preserve(Token(1), &state).unwrap();
    let mut incoming = fixture.hand_over();
    drop(session);
    // The successor creates an outgoing "vm0" while the incoming "vm0" is
    // still unretrieved, then retrieves the incoming one: no clash.
    let successor = LiveUpdate::new(fixture.registry.clone());
    let outgoing = successor.create_session("vm0").unwrap();
    let mut retrieved = incoming.retrieve_session("vm0").unwrap();
    assert_eq!(retrieved.tokens(), vec![Token(1)]);
    retrieved.finish().unwrap();
    drop(outgoing);
}

// ---- preserve file ----

#[test]
fn preserve_duplicate_token_is_eexist_before_the_fd_is_looked_at() {
    let fixture = fixture();
    let session = fixture.live_update.create_session("s").unwrap();
    let first = memfd("a", b"");
    session.preserve(Token(5), &first).unwrap();
    // A bad fd, an fd no handler accepts and the already-preserved file all
    // lose to the token check.
    assert_eq!(errno(session.preserve_fd(Token(5), -1)), libc::EEXIST);
    assert_eq!(errno(session.preserve_fd(Token(5), 1 << 20)), libc::EEXIST);
    let null = std::fs::File::open("/dev/null").unwrap();
    assert_eq!(errno(session.preserve(Token(5), &null)), libc::EEXIST);
    assert_eq!(errno(session.preserve(Token(5), &first)), libc::EEXIST);
    // The same token in another session is fine.
    let other = fixture.live_update.create_session("t").unwrap();
    other.preserve(Token(5), memfd("b", b"")).unwrap();
}

#[test]
fn preserve_bad_fd_is_ebadf() {
    let fixture = fixture();
    let session = fixture.live_update.create_session("s").unwrap();
    // Not a just-closed fd: the test threads of this binary run at once, and
    // another one may be handed that number before the call. No fd can be
    // open at a number past the process's fd limit.
    let never_open = i32::MAX;
    assert_eq!(
        errno(session.preserve_fd(Token(1), never_open)),
        libc::EBADF
    );
    assert_eq!(errno(session.preserve_fd(Token(1), -1)), libc::EBADF);
    assert!(session.tokens().is_empty());
}

#[test]
fn preserve_without_a_handler_is_enoent_checked_before_ebusy() {
    let fixture = fixture();
    let session = fixture.live_update.create_session("s").unwrap();
    let null = std::fs::File::open("/dev/null").unwrap();
    assert_eq!(errno(session.preserve(Token(1), &null)), libc::ENOENT);
    // A regular file on a disk filesystem is not a memfd.
    let path = std::env::temp_dir().join(format!("lu-rules-{}", std::process::id()));
    let regular = std::fs::File::create(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    assert_eq!(errno(session.preserve(Token(2), &regular)), libc::ENOENT);
    assert!(session.tokens().is_empty());
}

#[test]
fn preserve_the_same_file_in_any_session_is_ebusy() {
    let fixture = fixture();
    let first = fixture.live_update.create_session("first").unwrap();
    let second = fixture.live_update.create_session("second").unwrap();
    let file = memfd("shared", b"x");
    first.preserve(Token(1), &file).unwrap();
    assert_eq!(errno(first.preserve(Token(2), &file)), libc::EBUSY);
    assert_eq!(errno(second.preserve(Token(1), &file)), libc::EBUSY);
    // Another fd of the same file is the same file.
    let duplicate = file.try_clone().unwrap();
    assert_eq!(errno(second.preserve(Token(3), &duplicate)), libc::EBUSY);
    // The same for a handler-scripted pipe.
    let pipe = pipe();
    first.preserve(Token(10), &pipe).unwrap();
    assert_eq!(errno(second.preserve(Token(10), &pipe)), libc::EBUSY);
    assert_eq!(first.tokens(), vec![Token(1), Token(10)]);
    assert!(second.tokens().is_empty());
}

#[test]
fn preserve_passes_handler_errors_through_and_rolls_back() {
    let fixture = fixture();
    let session = fixture.live_update.create_session("s").unwrap();
    let pipe = pipe();
    fixture.script.lock().unwrap().fail_preserve = Some(libc::EIO);
    assert_eq!(errno(session.preserve(Token(1), &pipe)), libc::EIO);
    assert!(session.tokens().is_empty());
    assert!(!liveupdate::preserved::is_preserved(
        FileIdentity::of(&pipe).unwrap()
    ));
    // Nothing of the failed attempt remains: the same token and file work.
    fixture.script.lock().unwrap().fail_preserve = None;
    session.preserve(Token(1), &pipe).unwrap();
    assert_eq!(session.tokens(), vec![Token(1)]);
}

#[test]
fn preserve_token_zero_empty_memfd_and_closing_the_callers_fd() {
    let fixture = fixture();
    let session = fixture.live_update.create_session("s").unwrap();
    let empty = memfd("empty", b"");
    session.preserve(Token(0), &empty).unwrap();
    let full = memfd("full", b"kept after the caller's close");
    session.preserve(Token(u64::MAX), &full).unwrap();
    drop(empty);
    drop(full);
    let mut incoming = fixture.hand_over();
    drop(session);
    let mut session = incoming.retrieve_session("s").unwrap();
    let empty = session
        .retrieve(Token(0))
        .unwrap()
        .downcast::<MemfdFile>()
        .unwrap();
    assert_eq!(empty.size(), 0);
    let full = session
        .retrieve(Token(u64::MAX))
        .unwrap()
        .downcast::<MemfdFile>()
        .unwrap();
    let mut buffer = vec![0u8; 64];
    let count = rustix::io::pread(full.as_fd(), &mut buffer, 0).unwrap();
    assert_eq!(&buffer[..count], b"kept after the caller's close");
    session.finish().unwrap();
}

#[test]
fn preserve_beyond_the_file_limit_is_enospc_after_the_token_check() {
    let fixture = fixture();
    let session = fixture.live_update.create_session("many").unwrap();
    let limit = liveupdate::record::MAX_FILES as u64;
    for token in 0..limit {
        session.preserve(Token(token), memfd("m", b"")).unwrap();
    }
    assert_eq!(
        errno(session.preserve(Token(0), memfd("m", b""))),
        libc::EEXIST
    );
    // ENOSPC comes before the fd is looked at.
    assert_eq!(errno(session.preserve_fd(Token(limit), -1)), libc::ENOSPC);
    assert_eq!(
        errno(session.preserve(Token(limit), memfd("m", b""))),
        libc::ENOSPC
    );
}

// ---- close an outgoing session ----

#[test]
fn close_unpreserves_in_reverse_order_and_frees_the_name() {
    let fixture = fixture();
    let session = fixture.live_update.create_session("s").unwrap();
    let pipes: Vec<OwnedFd> = (0..3).map(|_| pipe()).collect();
    let state = memfd("state", b"");
    for (token, pipe) in pipes.iter().enumerate() {
        session.preserve(Token(token as u64), pipe).unwrap();
    }
    session.preserve(Token(9), &state).unwrap();
    assert_eq!(
        memfd::set_len(&state, 4096).unwrap_err().errno(),
        libc::EPERM
    );
    fixture.log();
    session.close();
    let inodes: Vec<u64> = pipes.iter().map(|pipe| inode(pipe.as_fd())).collect();
    assert_eq!(
        fixture.log(),
        vec![
            format!("unpreserve {}", inodes[2]),
            format!("unpreserve {}", inodes[1]),
            format!("unpreserve {}", inodes[0]),
        ]
    );
    memfd::set_len(&state, 4096).unwrap();
    for pipe in &pipes {
        assert!(!liveupdate::preserved::is_preserved(
            FileIdentity::of(pipe).unwrap()
        ));
    }
    fixture.live_update.create_session("s").unwrap();
}

// ---- freeze ----

#[test]
fn freeze_failure_at_file_k_unfreezes_files_before_k_only() {
    let fixture = fixture();
    let first = fixture.live_update.create_session("first").unwrap();
    let second = fixture.live_update.create_session("second").unwrap();
    let pipes: Vec<OwnedFd> = (0..4).map(|_| pipe()).collect();
    let inodes: Vec<u64> = pipes.iter().map(|pipe| inode(pipe.as_fd())).collect();
    first.preserve(Token(0), &pipes[0]).unwrap();
    first.preserve(Token(1), &pipes[1]).unwrap();
    second.preserve(Token(0), &pipes[2]).unwrap();
    second.preserve(Token(1), &pipes[3]).unwrap();
    fixture.log();
    fixture.script.lock().unwrap().fail_freeze_inode = Some(inodes[2]);
    assert_eq!(errno(fixture.live_update.freeze()), libc::EIO);
    assert_eq!(
        fixture.log(),
        vec![
            format!("freeze {}", inodes[0]),
            format!("freeze {}", inodes[1]),
            format!("freeze-fail {}", inodes[2]),
            format!("unfreeze {}", inodes[0]),
            format!("unfreeze {}", inodes[1]),
        ]
    );
    // Everything stays preserved and the sessions stay usable.
    assert_eq!(first.tokens(), vec![Token(0), Token(1)]);
    assert_eq!(second.tokens(), vec![Token(0), Token(1)]);
    for pipe in &pipes {
        assert!(liveupdate::preserved::is_preserved(
            FileIdentity::of(pipe).unwrap()
        ));
    }
    first.preserve(Token(2), memfd("later", b"")).unwrap();
    // A retry after the cause is gone freezes in preservation order.
    fixture.script.lock().unwrap().fail_freeze_inode = None;
    let handover = fixture.live_update.freeze().unwrap();
    let frozen: Vec<String> = fixture.log();
    assert_eq!(
        frozen,
        inodes
            .iter()
            .map(|inode| format!("freeze {inode}"))
            .collect::<Vec<_>>()
    );
    let tokens: Vec<(String, u64)> = handover
        .record()
        .files()
        .map(|(session, file)| (session.name.to_string(), file.token.0))
        .collect();
    assert_eq!(
        tokens,
        vec![
            ("first".into(), 0),
            ("first".into(), 1),
            ("first".into(), 2),
            ("second".into(), 0),
            ("second".into(), 1)
        ]
    );
    handover.abort();
}

#[test]
fn while_frozen_sessions_cannot_change_and_abort_reopens_them() {
    let fixture = fixture();
    let session = fixture.live_update.create_session("s").unwrap();
    let pipe = pipe();
    session.preserve(Token(1), &pipe).unwrap();
    let handover = fixture.live_update.freeze().unwrap();
    assert_eq!(
        errno(session.preserve(Token(2), memfd("m", b""))),
        libc::EBUSY
    );
    assert_eq!(errno(fixture.live_update.create_session("t")), libc::EBUSY);
    assert_eq!(errno(fixture.live_update.freeze()), libc::EBUSY);
    fixture.log();
    handover.abort();
    assert_eq!(
        fixture.log(),
        vec![format!("unfreeze {}", inode(pipe.as_fd()))]
    );
    session.preserve(Token(2), memfd("m", b"")).unwrap();
    // A session closed while frozen is closed by the abort.
    let handover = fixture.live_update.freeze().unwrap();
    session.close();
    assert!(liveupdate::preserved::is_preserved(
        FileIdentity::of(&pipe).unwrap()
    ));
    fixture.log();
    handover.abort();
    let inode = inode(pipe.as_fd());
    assert_eq!(
        fixture.log(),
        vec![format!("unfreeze {inode}"), format!("unpreserve {inode}")]
    );
    assert!(!liveupdate::preserved::is_preserved(
        FileIdentity::of(&pipe).unwrap()
    ));
}

// ---- retrieve session and files ----

#[test]
fn retrieve_session_unknown_is_enoent_and_twice_is_einval() {
    let fixture = fixture();
    let session = fixture.live_update.create_session("vm0").unwrap();
    session.preserve(Token(1), memfd("m", b"")).unwrap();
    let mut incoming = fixture.hand_over();
    assert_eq!(errno(incoming.retrieve_session("vm1")), libc::ENOENT);
    let mut retrieved = incoming.retrieve_session("vm0").unwrap();
    assert_eq!(errno(incoming.retrieve_session("vm0")), libc::EINVAL);
    retrieved.finish().unwrap();
    assert_eq!(errno(incoming.retrieve_session("vm0")), libc::EINVAL);
}

#[test]
fn retrieve_file_unknown_token_sticky_failure_and_same_file_again() {
    let fixture = fixture();
    let session = fixture.live_update.create_session("s").unwrap();
    let good = pipe();
    let bad = pipe();
    session.preserve(Token(1), &good).unwrap();
    session.preserve(Token(2), &bad).unwrap();
    let mut incoming = fixture.hand_over();
    let mut session = incoming.retrieve_session("s").unwrap();
    assert_eq!(errno(session.retrieve(Token(3))), libc::ENOENT);
    fixture.log();
    let first = session.retrieve(Token(1)).unwrap();
    let second = session.retrieve(Token(1)).unwrap();
    assert!(first.same_object(&second));
    assert_eq!(fixture.log().len(), 1, "the handler retrieved once");
    fixture.script.lock().unwrap().fail_retrieve = Some(libc::ENOMEM);
    assert_eq!(errno(session.retrieve(Token(2))), libc::ENOMEM);
    // The error is sticky even after the cause is gone, without a new try.
    fixture.script.lock().unwrap().fail_retrieve = None;
    let again = session.retrieve(Token(2)).unwrap_err();
    assert_eq!(again.errno(), libc::ENOMEM);
    assert!(matches!(again, liveupdate::LuError::RetrieveFailed { .. }));
    assert_eq!(
        fixture.log(),
        vec![format!("retrieve {}", inode(bad.as_fd()))]
    );
}

// ---- finish ----

#[test]
fn finish_is_all_or_nothing_in_reverse_order_and_releases_unretrieved_files() {
    let fixture = fixture();
    let session = fixture.live_update.create_session("s").unwrap();
    let pipes: Vec<OwnedFd> = (0..3).map(|_| pipe()).collect();
    for (token, pipe) in pipes.iter().enumerate() {
        session.preserve(Token(token as u64 + 100), pipe).unwrap();
    }
    let mut incoming = fixture.hand_over();
    drop(session);
    let mut session = incoming.retrieve_session("s").unwrap();
    session.retrieve(Token(100)).unwrap();
    session.retrieve(Token(102)).unwrap();
    fixture.log();
    fixture.script.lock().unwrap().refuse_finish = true;
    assert_eq!(errno(session.finish()), libc::EBUSY);
    assert!(fixture.log().is_empty(), "nothing was finished");
    assert!(!session.is_finished());
    // The session is intact: its files can still be retrieved.
    session.retrieve(Token(101)).unwrap();
    session.retrieve(Token(100)).unwrap();
    fixture.script.lock().unwrap().refuse_finish = false;
    // Finishing with token 101 never retrieved, on fresh files, capturing
    // the warning that names it.
    drop(session);
    let fresh: Vec<OwnedFd> = (0..3).map(|_| pipe()).collect();
    let fresh_inodes: Vec<u64> = fresh.iter().map(|pipe| inode(pipe.as_fd())).collect();
    let (warnings, log) = capture_warnings(|| {
        let fixture = fixture_with(fixture.script.clone());
        let outgoing = fixture.live_update.create_session("s2").unwrap();
        for (token, pipe) in fresh.iter().enumerate() {
            outgoing.preserve(Token(token as u64 + 100), pipe).unwrap();
        }
        let mut incoming = fixture.hand_over();
        let mut retrieved = incoming.retrieve_session("s2").unwrap();
        retrieved.retrieve(Token(100)).unwrap();
        retrieved.retrieve(Token(102)).unwrap();
        fixture.log();
        retrieved.finish().unwrap();
        assert!(retrieved.is_finished());
        assert_eq!(errno(retrieved.retrieve(Token(100))), libc::ENOENT);
        fixture.log()
    });
    assert_eq!(
        log,
        vec![
            format!("finish {} retrieved", fresh_inodes[2]),
            format!("finish {} unretrieved", fresh_inodes[1]),
            format!("finish {} retrieved", fresh_inodes[0]),
        ]
    );
    assert!(
        warnings.contains("never retrieved") && warnings.contains("0x65"),
        "no warning naming token 0x65 (101): {warnings}"
    );
}

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn capture_warnings<T>(body: impl FnOnce() -> T) -> (String, T) {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::WARN)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let result = tracing::subscriber::with_default(subscriber, body);
    let text = String::from_utf8_lossy(&captured.0.lock().unwrap()).into_owned();
    (text, result)
}

// ---- handler registry ----

#[test]
fn registering_a_compatible_string_twice_is_eexist() {
    let mut registry = HandlerRegistry::with_builtin_handlers();
    let error = registry
        .register(Arc::new(memfd::MemfdHandler::new()))
        .unwrap_err();
    assert_eq!(error.errno(), libc::EEXIST);
    let script = Arc::new(Mutex::new(Script::default()));
    let clash = PipeHandler {
        compatible: Compatible::new("memfd", 7).unwrap(),
        script,
    };
    assert_eq!(
        registry.register(Arc::new(clash)).unwrap_err().errno(),
        libc::EEXIST
    );
}

#[test]
fn a_record_naming_an_unregistered_handler_or_version_is_refused() {
    let fixture = fixture();
    let session = fixture.live_update.create_session("s").unwrap();
    session.preserve(Token(1), pipe()).unwrap();
    let handover = fixture.live_update.freeze().unwrap();
    let fd = || vec![handover.fds()[0].try_clone_to_owned().unwrap()];
    let memfd_only = HandlerRegistry::with_builtin_handlers();
    assert_eq!(
        errno(Incoming::decode(&memfd_only, handover.bytes(), fd())),
        libc::ENOENT
    );
    let script = Arc::new(Mutex::new(Script::default()));
    let mut newer = HandlerRegistry::new();
    newer
        .register(Arc::new(PipeHandler {
            compatible: Compatible::new("test-pipe", 2).unwrap(),
            script,
        }))
        .unwrap();
    assert_eq!(
        errno(Incoming::decode(&newer, handover.bytes(), fd())),
        libc::EOPNOTSUPP
    );
    // Fds that do not match the record.
    assert_eq!(
        errno(Incoming::decode(
            &fixture.registry,
            handover.bytes(),
            vec![]
        )),
        libc::EINVAL
    );
    let other = vec![memfd("other", b"")];
    assert_eq!(
        errno(Incoming::decode(&fixture.registry, handover.bytes(), other)),
        libc::EINVAL
    );
    handover.abort();
}

// ---- memfd handler ----

#[test]
fn memfd_handler_carries_contents_size_position_and_seals() {
    let fixture = fixture();
    let session = fixture.live_update.create_session("vmm").unwrap();
    let state = memfd("state", &[7u8; 10000]);
    rustix::fs::seek(&state, rustix::fs::SeekFrom::Start(1234)).unwrap();
    rustix::fs::fcntl_add_seals(&state, SealFlags::GROW | SealFlags::SHRINK).unwrap();
    session.preserve(Token(3), &state).unwrap();
    // The position may move after preserve; freeze records it.
    rustix::fs::seek(&state, rustix::fs::SeekFrom::Start(4321)).unwrap();
    let mut incoming = fixture.hand_over();
    let mut session = incoming.retrieve_session("vmm").unwrap();
    let file = session
        .retrieve(Token(3))
        .unwrap()
        .downcast::<MemfdFile>()
        .unwrap();
    assert_eq!(file.size(), 10000);
    assert_eq!(file.position(), 4321);
    assert_eq!(rustix::fs::tell(file.as_fd()).unwrap(), 4321);
    assert_eq!(
        file.seals(),
        (libc::F_SEAL_GROW | libc::F_SEAL_SHRINK) as u32
    );
    let mut contents = vec![0u8; 10000];
    rustix::io::pread(file.as_fd(), &mut contents, 0).unwrap();
    assert!(contents.iter().all(|byte| *byte == 7));
    session.finish().unwrap();
}

#[test]
fn memfd_handler_refuses_unknown_seal_bits_in_the_record() {
    let fixture = fixture();
    let session = fixture.live_update.create_session("s").unwrap();
    let state = memfd("state", b"");
    session.preserve(Token(1), &state).unwrap();
    let handover = fixture.live_update.freeze().unwrap();
    let mut record: Record = handover.record().clone();
    let hostile = MemfdData {
        size: 0,
        position: 0,
        seals: 0x100,
    };
    record.sessions = vec![SessionRecord {
        files: vec![liveupdate::record::FileRecord {
            data: hostile.encode(),
            ..record.sessions[0].files[0].clone()
        }],
        ..record.sessions[0].clone()
    }];
    let fds = vec![handover.fds()[0].try_clone_to_owned().unwrap()];
    let mut incoming = Incoming::from_parts(&fixture.registry, record, fds).unwrap();
    let mut retrieved = incoming.retrieve_session("s").unwrap();
    assert_eq!(errno(retrieved.retrieve(Token(1))), libc::EOPNOTSUPP);
    handover.abort();
    // A real memfd cannot carry unknown seals; the check that preserve
    // makes is the same function.
    assert_eq!(
        memfd::check_seals(0x100).unwrap_err().errno(),
        libc::EOPNOTSUPP
    );
}

#[test]
fn memfd_size_is_fixed_while_preserved_but_io_goes_on() {
    let fixture = fixture();
    let session = fixture.live_update.create_session("s").unwrap();
    let state = memfd("state", &[0u8; 8192]);
    session.preserve(Token(1), &state).unwrap();
    assert_eq!(
        memfd::set_len(&state, 4096).unwrap_err().errno(),
        libc::EPERM
    );
    assert_eq!(
        memfd::fallocate(&state, FallocateFlags::KEEP_SIZE, 0, 4096)
            .unwrap_err()
            .errno(),
        libc::EPERM
    );
    assert_eq!(
        memfd::fallocate(
            &state,
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
            0,
            4096
        )
        .unwrap_err()
        .errno(),
        libc::EPERM
    );
    // Writes inside the size and mmap I/O go on.
    rustix::io::pwrite(&state, b"written while preserved", 100).unwrap();
    let mut back = [0u8; 23];
    rustix::io::pread(&state, &mut back, 100).unwrap();
    assert_eq!(&back, b"written while preserved");
    // SAFETY: a fresh shared mapping of a memfd we own, unmapped below.
    let mapping = unsafe {
        rustix::mm::mmap(
            std::ptr::null_mut(),
            8192,
            rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
            rustix::mm::MapFlags::SHARED,
            &state,
            0,
        )
    }
    .unwrap();
    // SAFETY: offset 5000 lies inside the 8192-byte mapping.
    unsafe { mapping.cast::<u8>().add(5000).write(0x5a) };
    let mut byte = [0u8];
    rustix::io::pread(&state, &mut byte, 5000).unwrap();
    assert_eq!(byte[0], 0x5a);
    // SAFETY: the mapping made above, not used afterwards.
    unsafe { rustix::mm::munmap(mapping, 8192) }.unwrap();
    session.close();
    memfd::set_len(&state, 4096).unwrap();
    memfd::fallocate(&state, FallocateFlags::KEEP_SIZE, 0, 4096).unwrap();
}

// ---- concurrency ----

#[test]
fn stress_concurrent_preserves_of_one_file_admit_exactly_one() {
    // Claim: the test-and-insert of the preserved set and of session names
    // is atomic. Eight threads race for the same file and the same name,
    // many rounds, bounded to about a second.
    let started = std::time::Instant::now();
    let mut rounds = 0;
    while started.elapsed() < std::time::Duration::from_secs(1) && rounds < 200 {
        rounds += 1;
        let fixture = fixture();
        let file = Arc::new(memfd("contended", b""));
        let barrier = Arc::new(std::sync::Barrier::new(8));
        let results: Vec<(bool, i32)> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..8)
                .map(|thread| {
                    let live_update = fixture.live_update.clone();
                    let file = file.clone();
                    let barrier = barrier.clone();
                    scope.spawn(move || {
                        barrier.wait();
                        let named = live_update.create_session("same-name");
                        let own = live_update.create_session(&format!("t{thread}")).unwrap();
                        let preserved = own.preserve(Token(1), &*file);
                        let name_won = named.is_ok();
                        let preserve_errno = preserved.err().map_or(0, |error| error.errno());
                        // Keep the sessions alive until everyone has tried.
                        barrier.wait();
                        (name_won, preserve_errno)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|handle| handle.join().unwrap())
                .collect()
        });
        assert_eq!(results.iter().filter(|(won, _)| *won).count(), 1);
        assert_eq!(results.iter().filter(|(_, errno)| *errno == 0).count(), 1);
        assert!(
            results
                .iter()
                .all(|(_, errno)| *errno == 0 || *errno == libc::EBUSY)
        );
    }
    assert!(rounds > 0);
}

// ---- gmem handler ----

use gmem::hugetlb::HugePageReservation;
use gmem::{Backend, FallocMode, GmemFlags, GuestMemFile, MemPolicy, NodeMask, PageIndex};
use liveupdate::handlers::gmem_data::GmemData;

fn guest_file(size: u64, backend: Backend) -> Arc<GuestMemFile> {
    GuestMemFile::create(size, GmemFlags::HOST_ACCESSIBLE, backend).unwrap()
}

#[test]
fn gmem_preserve_freezes_first_and_close_unfreezes() {
    let fixture = fixture();
    let file = guest_file(8 << 20, Backend::Memfd);
    file.fallocate(FallocMode::ALLOCATE, 0, 16 * 4096).unwrap();
    let session = fixture.live_update.create_session("vm").unwrap();
    session.preserve(Token(0), file.as_fd()).unwrap();
    assert!(file.is_frozen(), "preserve froze the file");
    assert_eq!(
        file.fallocate(FallocMode::ALLOCATE, 1 << 20, 4096)
            .unwrap_err()
            .errno(),
        libc::EPERM
    );
    assert_eq!(
        file.fallocate(FallocMode::PUNCH, 0, 4096)
            .unwrap_err()
            .errno(),
        libc::EPERM
    );
    assert_eq!(
        file.get_folio(PageIndex(100)).unwrap_err().errno(),
        libc::EPERM
    );
    assert!(
        file.get_folio(PageIndex(3)).is_ok(),
        "present folios are still served"
    );
    // The guest keeps writing the memory it has.
    file.mapping()
        .unwrap()
        .write(4096, b"still running")
        .unwrap();
    session.close();
    assert!(!file.is_frozen(), "unpreserve unfroze the file");
    file.fallocate(FallocMode::ALLOCATE, 1 << 20, 4096).unwrap();
}

#[test]
fn gmem_a_file_frozen_before_preserve_stays_frozen_after_close() {
    let fixture = fixture();
    let file = guest_file(1 << 20, Backend::Memfd);
    file.freeze(true);
    let session = fixture.live_update.create_session("vm").unwrap();
    session.preserve(Token(0), file.as_fd()).unwrap();
    session.close();
    assert!(file.is_frozen());
    file.freeze(false);
}

#[test]
fn gmem_files_go_to_the_gmem_handler_not_the_memfd_one() {
    let fixture = fixture();
    let file = guest_file(1 << 20, Backend::Memfd);
    let session = fixture.live_update.create_session("vm").unwrap();
    session.preserve(Token(0), file.as_fd()).unwrap();
    let handover = fixture.live_update.freeze().unwrap();
    assert_eq!(
        handover.record().sessions[0].files[0].compatible.name(),
        "gmem"
    );
    handover.abort();
}

#[test]
fn gmem_freeze_walks_the_page_index_into_the_record() {
    let fixture = fixture();
    let small = guest_file(16 << 20, Backend::Memfd);
    small.fallocate(FallocMode::ALLOCATE, 0, 16 * 4096).unwrap();
    small
        .fallocate(FallocMode::ALLOCATE, 100 * 4096, 4096)
        .unwrap();
    small
        .mapping()
        .unwrap()
        .write(4000 * 4096, b"first touch")
        .unwrap();
    small
        .set_policy(PageIndex(0)..PageIndex(512), MemPolicy::Bind(NodeMask(1)))
        .unwrap();
    let session = fixture.live_update.create_session("vm").unwrap();
    session.preserve(Token(0), small.as_fd()).unwrap();
    let huge_pages = HugePageReservation::ensure_available(8)
        .inspect_err(|error| test_support::skipped(format_args!("the hugetlb part: {error}")))
        .ok();
    let huge = if huge_pages.is_some() {
        let huge = guest_file(8 << 20, Backend::Hugetlb);
        huge.fallocate(FallocMode::ALLOCATE, 2 << 20, 4 << 20)
            .unwrap();
        session.preserve(Token(1), huge.as_fd()).unwrap();
        Some(huge)
    } else {
        None
    };
    let handover = fixture.live_update.freeze().unwrap();
    let files = &handover.record().sessions[0].files;
    let data = GmemData::decode(&files[0].data).unwrap();
    assert_eq!(data.size, 16 << 20);
    assert_eq!(data.flags, GmemFlags::HOST_ACCESSIBLE.0);
    let recorded: Vec<(u64, u8)> = data.folios().collect();
    let actual: Vec<(u64, u8)> = small
        .populated()
        .map(|(index, order)| (index.0, order.0))
        .collect();
    assert_eq!(recorded, actual);
    assert_eq!(recorded.len(), 18);
    assert_eq!(data.runs.len(), 3, "{:?}", data.runs);
    assert_eq!(data.policies.len(), 1);
    assert_eq!((data.policies[0].mode, data.policies[0].nodemask), (2, 1));
    if let Some(huge) = &huge {
        let data = GmemData::decode(&files[1].data).unwrap();
        let recorded: Vec<(u64, u8)> = data.folios().collect();
        assert_eq!(recorded, vec![(512, 9), (1024, 9)]);
        assert_eq!(huge.populated_count(), 2);
    }
    handover.abort();
}

#[test]
fn gmem_freeze_refuses_a_file_unfrozen_behind_its_back() {
    let fixture = fixture();
    let file = guest_file(1 << 20, Backend::Memfd);
    let state = memfd("state", b"");
    let session = fixture.live_update.create_session("vm").unwrap();
    session.preserve(Token(0), &state).unwrap();
    session.preserve(Token(1), file.as_fd()).unwrap();
    file.freeze(false);
    assert_eq!(errno(fixture.live_update.freeze()), libc::EBUSY);
    // Everything stays preserved; refreezing makes the handover possible.
    file.freeze(true);
    fixture.live_update.freeze().unwrap().abort();
    assert!(file.is_frozen());
}

#[test]
fn gmem_in_process_handover_retrieves_the_same_object_and_finish_unfreezes() {
    let fixture = fixture();
    let file = guest_file(4 << 20, Backend::Memfd);
    file.mapping().unwrap().write(0, b"guest bytes").unwrap();
    let session = fixture.live_update.create_session("vm").unwrap();
    session.preserve(Token(7), file.as_fd()).unwrap();
    let mut incoming = fixture.hand_over();
    drop(session);
    let mut retrieved = incoming.retrieve_session("vm").unwrap();
    let object = retrieved
        .retrieve(Token(7))
        .unwrap()
        .downcast::<GuestMemFile>()
        .unwrap();
    assert!(Arc::ptr_eq(&object, &file));
    assert!(object.is_frozen(), "frozen until finish");
    retrieved.finish().unwrap();
    assert!(!file.is_frozen(), "finish unfroze it");
    file.fallocate(FallocMode::ALLOCATE, 4096, 4096).unwrap();
    let mut back = [0u8; 11];
    file.mapping().unwrap().read(0, &mut back).unwrap();
    assert_eq!(&back, b"guest bytes");
}
