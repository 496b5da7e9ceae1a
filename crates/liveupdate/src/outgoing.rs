//! Outgoing sessions: what the running VMM preserves for its successor
//! (upstream `luo_session.c` and `luo_file.c`, old-kernel side).
//!
//! Model: a [`LiveUpdate`] owns named sessions; a [`Session`] handle holds
//! preserved files, each under a caller-chosen token with the handler that
//! accepted it. The orchestrator keeps its own close-on-exec duplicate of
//! every preserved fd, so the caller may close its own.
//!
//! Invariants: session names are unique among outgoing sessions; tokens are
//! unique within a session; a file (device, inode) is preserved at most once
//! in the process ([`crate::preserved`]); every failed operation leaves the
//! state exactly as before it (full rollback). All state sits behind one
//! mutex, so every operation below is atomic with respect to the others.
//!
//! Success path of a handover:
//! 1. [`LiveUpdate::create_session`], [`Session::preserve_fd`] while the
//!    workload runs (handler `preserve`: the gmem handler freezes the file).
//! 2. [`LiveUpdate::freeze`]: every file's handler `freeze`, in session
//!    creation order then preservation order; their data form the record.
//!    The result, a [`Handover`], holds the record and the fds.
//! 3. A transport carries the handover and calls [`Handover::complete`]:
//!    the sessions now belong to the successor; closing them here only drops
//!    this process's references.
//!
//! Failure paths:
//! 1. Freeze of file k fails: files 0..k-1 are unfrozen (not k), the record
//!    is discarded, the error is returned; everything stays preserved.
//! 2. The transport fails after the freeze: [`Handover::abort`] (or dropping
//!    the handover) unfreezes every file; everything stays preserved and the
//!    process carries on. Closing the sessions then unpreserves the files.
//! 3. A session closed before any handover: its files are unpreserved in
//!    reverse order of preservation; its name is free again. A session closed
//!    while frozen is closed when the handover is aborted.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::error::LuError;
use crate::fdio;
use crate::handler::{FileHandler, HandlerRegistry, PreservedState};
use crate::names::{FileIdentity, SessionName, Token};
use crate::preserved;
use crate::record::{FileRecord, MAX_FILES, Record, SessionRecord};

/// The orchestrator of outgoing sessions (upstream's `/dev/liveupdate` in
/// the old kernel).
#[derive(Clone)]
pub struct LiveUpdate {
    inner: Arc<Inner>,
}

struct Inner {
    registry: HandlerRegistry,
    state: Mutex<State>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Open,
    Frozen,
    HandedOver,
}

struct State {
    phase: Phase,
    sessions: Vec<OutgoingSession>,
    next_id: u64,
}

struct OutgoingSession {
    id: u64,
    name: SessionName,
    files: Vec<PreservedFile>,
    close_pending: bool,
}

struct PreservedFile {
    token: Token,
    fd: Arc<OwnedFd>,
    identity: FileIdentity,
    handler: Arc<dyn FileHandler>,
    /// `None` only while the file is being unpreserved.
    state: Option<PreservedState>,
    frozen: bool,
}

impl State {
    fn require_open(&self, operation: &'static str) -> Result<(), LuError> {
        match self.phase {
            Phase::Open => Ok(()),
            Phase::Frozen => Err(LuError::HandoverInProgress {
                operation,
                state: "frozen for a handover",
            }),
            Phase::HandedOver => Err(LuError::HandoverInProgress {
                operation,
                state: "handed over",
            }),
        }
    }

    fn file_count(&self) -> usize {
        self.sessions
            .iter()
            .map(|session| session.files.len())
            .sum()
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A handler that panicked mid-operation is a bug in that handler;
        // the state it could have left is no worse than the panic itself.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl LiveUpdate {
    /// An orchestrator using `registry`'s handlers.
    pub fn new(registry: HandlerRegistry) -> LiveUpdate {
        LiveUpdate {
            inner: Arc::new(Inner {
                registry,
                state: Mutex::new(State {
                    phase: Phase::Open,
                    sessions: Vec::new(),
                    next_id: 0,
                }),
            }),
        }
    }

    /// The handlers in use.
    pub fn registry(&self) -> &HandlerRegistry {
        &self.inner.registry
    }

    /// Creates an empty outgoing session.
    ///
    /// # Errors
    /// - `EINVAL` ([`LuError::InvalidSessionName`]): name empty, over 63
    ///   bytes or with a NUL;
    /// - `EBUSY` ([`LuError::HandoverInProgress`]): frozen or handed over;
    /// - `EEXIST` ([`LuError::SessionExists`]): an outgoing session has
    ///   this name.
    pub fn create_session(&self, name: &str) -> Result<Session, LuError> {
        let name = SessionName::new(name)?;
        let mut state = self.inner.lock();
        state.require_open("create a session")?;
        if state.sessions.iter().any(|session| session.name == name) {
            return Err(LuError::SessionExists { name });
        }
        let id = state.next_id;
        state.next_id += 1;
        state.sessions.push(OutgoingSession {
            id,
            name: name.clone(),
            files: Vec::new(),
            close_pending: false,
        });
        tracing::info!(session = %name, "created outgoing session");
        Ok(Session {
            inner: self.inner.clone(),
            id,
            name,
        })
    }

    /// Names of the outgoing sessions, in creation order.
    pub fn session_names(&self) -> Vec<SessionName> {
        let state = self.inner.lock();
        state
            .sessions
            .iter()
            .map(|session| session.name.clone())
            .collect()
    }

    /// Whether a handover of these sessions was completed.
    pub fn is_handed_over(&self) -> bool {
        self.inner.lock().phase == Phase::HandedOver
    }

    /// The handover moment: freezes every preserved file (sessions in
    /// creation order, files in preservation order) and builds the record.
    ///
    /// # Errors
    /// - `EBUSY` ([`LuError::HandoverInProgress`]): already frozen or
    ///   handed over;
    /// - a handler's `freeze` error ([`LuError::Handler`]): the files frozen
    ///   before it were unfrozen, nothing else changed;
    /// - a record error (too long, `EFBIG`): everything was unfrozen.
    pub fn freeze(&self) -> Result<Handover, LuError> {
        let mut state = self.inner.lock();
        state.require_open("freeze")?;
        let mut sessions = Vec::with_capacity(state.sessions.len());
        let mut fds = Vec::with_capacity(state.file_count());
        let mut failure = None;
        'sessions: for session in &mut state.sessions {
            let mut files = Vec::with_capacity(session.files.len());
            for file in &mut session.files {
                match freeze_one(file) {
                    Ok(data) => {
                        files.push(FileRecord {
                            compatible: file.handler.compatible().clone(),
                            token: file.token,
                            identity: file.identity,
                            data,
                        });
                        fds.push(file.fd.clone());
                    }
                    Err(error) => {
                        tracing::warn!(session = %session.name, token = %file.token, %error, "freeze failed; unfreezing the files frozen before it");
                        failure = Some(error);
                        break 'sessions;
                    }
                }
            }
            sessions.push(SessionRecord {
                name: session.name.clone(),
                files,
            });
        }
        if let Some(error) = failure {
            unfreeze_all(&mut state);
            return Err(error);
        }
        let record = Record::full(sessions);
        let bytes = match record.encode() {
            Ok(bytes) => bytes,
            Err(error) => {
                unfreeze_all(&mut state);
                return Err(error.into());
            }
        };
        state.phase = Phase::Frozen;
        tracing::info!(
            sessions = record.sessions.len(),
            files = record.file_count(),
            record_bytes = bytes.len(),
            "froze outgoing sessions for a handover"
        );
        Ok(Handover {
            inner: self.inner.clone(),
            record,
            bytes,
            fds,
            settled: false,
        })
    }

    /// Serializes the sessions as they are now without handing them over:
    /// a freeze immediately aborted (every handler's `freeze` then
    /// `unfreeze`). The transfer transport offers this to a successor ahead
    /// of the switch.
    ///
    /// # Errors
    /// Those of [`LiveUpdate::freeze`].
    pub fn preview(&self) -> Result<(Record, Vec<Arc<OwnedFd>>), LuError> {
        let mut handover = self.freeze()?;
        let record = handover.record.clone();
        let fds = std::mem::take(&mut handover.fds);
        handover.abort();
        Ok((record, fds))
    }
}

fn freeze_one(file: &mut PreservedFile) -> Result<Vec<u8>, LuError> {
    let Some(state) = file.state.as_mut() else {
        return Err(LuError::io(
            "freeze of a file being unpreserved",
            rustix::io::Errno::INVAL,
        ));
    };
    let data = file
        .handler
        .freeze(file.fd.as_fd(), state)
        .map_err(|source| LuError::Handler {
            operation: "freeze",
            compatible: file.handler.compatible().name().to_owned(),
            token: file.token,
            source,
        })?;
    file.frozen = true;
    Ok(data)
}

/// Unfreezes every frozen file, in freeze order (as upstream's
/// `__luo_file_unfreeze` walks its list), then closes the sessions whose
/// close was deferred by the freeze.
fn unfreeze_all(state: &mut State) {
    for session in &mut state.sessions {
        for file in &mut session.files {
            if file.frozen {
                if let Some(handler_state) = file.state.as_mut() {
                    file.handler.unfreeze(file.fd.as_fd(), handler_state);
                }
                file.frozen = false;
            }
        }
    }
    state.phase = Phase::Open;
    let pending: Vec<u64> = state
        .sessions
        .iter()
        .filter(|session| session.close_pending)
        .map(|session| session.id)
        .collect();
    for id in pending {
        close_session(state, id);
    }
}

/// Removes session `id`; while open, unpreserves its files in reverse order.
fn close_session(state: &mut State, id: u64) {
    let Some(position) = state.sessions.iter().position(|session| session.id == id) else {
        return;
    };
    match state.phase {
        Phase::Frozen => {
            if let Some(session) = state.sessions.get_mut(position) {
                tracing::warn!(session = %session.name, "session closed while frozen; closing it when the handover ends");
                session.close_pending = true;
            }
        }
        Phase::Open => {
            let mut session = state.sessions.remove(position);
            while let Some(mut file) = session.files.pop() {
                if let Some(handler_state) = file.state.take() {
                    file.handler.unpreserve(file.fd.as_fd(), handler_state);
                }
                preserved::release(file.identity);
            }
            tracing::info!(session = %session.name, "closed outgoing session; its files are unpreserved");
        }
        Phase::HandedOver => {
            let session = state.sessions.remove(position);
            for file in &session.files {
                preserved::release(file.identity);
            }
            tracing::debug!(session = %session.name, "dropped a handed-over session's references");
        }
    }
}

/// A handle on one outgoing session (upstream: the session fd). Dropping it
/// closes the session.
pub struct Session {
    inner: Arc<Inner>,
    id: u64,
    name: SessionName,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Session")
            .field("name", &self.name)
            .finish()
    }
}

impl Session {
    /// The session's name.
    pub fn name(&self) -> &SessionName {
        &self.name
    }

    /// The tokens of its files, in preservation order.
    pub fn tokens(&self) -> Vec<Token> {
        let state = self.inner.lock();
        state
            .sessions
            .iter()
            .find(|session| session.id == self.id)
            .map(|session| session.files.iter().map(|file| file.token).collect())
            .unwrap_or_default()
    }

    /// Preserves the file behind `fd` under `token`. See
    /// [`Session::preserve_fd`].
    ///
    /// # Errors
    /// Those of [`Session::preserve_fd`].
    pub fn preserve(&self, token: Token, fd: impl AsFd) -> Result<(), LuError> {
        self.preserve_fd(token, fd.as_fd().as_raw_fd())
    }

    /// Preserves the file behind fd number `fd` under `token` (upstream's
    /// `LIVEUPDATE_SESSION_PRESERVE_FD`). The orchestrator keeps its own
    /// duplicate; the caller may close `fd` afterwards.
    ///
    /// # Errors
    /// Checked in this order; every failure rolls back completely:
    /// - `EBUSY` ([`LuError::HandoverInProgress`]): frozen or handed over;
    /// - `EEXIST` ([`LuError::TokenExists`]): the token is used in this
    ///   session (before the fd is even looked at);
    /// - `ENOSPC` ([`LuError::TooManyFiles`]): [`MAX_FILES`] files are
    ///   preserved already;
    /// - `EBADF` ([`LuError::BadFd`]): `fd` is not open (or `EMFILE`);
    /// - `ENOENT` ([`LuError::NoHandler`]): no handler accepts the file;
    /// - `EBUSY` ([`LuError::AlreadyPreserved`]): the same file is preserved
    ///   in some session already;
    /// - the handler's `preserve` error ([`LuError::Handler`]).
    pub fn preserve_fd(&self, token: Token, fd: RawFd) -> Result<(), LuError> {
        let mut state = self.inner.lock();
        state.require_open("preserve a file")?;
        let file_count = state.file_count();
        let Some(session) = state
            .sessions
            .iter_mut()
            .find(|session| session.id == self.id)
        else {
            return Err(LuError::UnknownSession {
                name: self.name.to_string(),
            });
        };
        if session.files.iter().any(|file| file.token == token) {
            return Err(LuError::TokenExists {
                session: session.name.clone(),
                token,
            });
        }
        if file_count >= MAX_FILES {
            return Err(LuError::TooManyFiles {
                token,
                limit: MAX_FILES,
            });
        }
        let duplicate =
            fdio::duplicate_fd_number(fd).map_err(|errno| LuError::BadFd { fd, errno })?;
        let handler = self
            .inner
            .registry
            .find_for(duplicate.as_fd())
            .ok_or(LuError::NoHandler { fd, token })?
            .clone();
        let identity = FileIdentity::of(&duplicate).map_err(|errno| LuError::io("fstat", errno))?;
        if !preserved::claim(identity) {
            return Err(LuError::AlreadyPreserved { token, identity });
        }
        let handler_state = match handler.preserve(duplicate.as_fd()) {
            Ok(handler_state) => handler_state,
            Err(source) => {
                preserved::release(identity);
                return Err(LuError::Handler {
                    operation: "preserve",
                    compatible: handler.compatible().name().to_owned(),
                    token,
                    source,
                });
            }
        };
        tracing::info!(session = %session.name, %token, handler = %handler.compatible(), "preserved file");
        session.files.push(PreservedFile {
            token,
            fd: Arc::new(duplicate),
            identity,
            handler,
            state: Some(handler_state),
            frozen: false,
        });
        Ok(())
    }

    /// Closes the session: its files are unpreserved in reverse order of
    /// preservation and its name is free again. While frozen for a
    /// handover, the close happens when the handover is aborted; after a
    /// completed handover only this process's references are dropped.
    pub fn close(self) {
        // Drop does the work.
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let mut state = self.inner.lock();
        close_session(&mut state, self.id);
    }
}

/// Frozen sessions on their way to the successor: the record and the fds,
/// file `i` of the record being fd `i`. Dropping it without
/// [`Handover::complete`] aborts the handover.
pub struct Handover {
    inner: Arc<Inner>,
    record: Record,
    bytes: Vec<u8>,
    fds: Vec<Arc<OwnedFd>>,
    settled: bool,
}

impl std::fmt::Debug for Handover {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Handover")
            .field("record", &self.record)
            .field("fds", &self.fds.len())
            .finish()
    }
}

impl Handover {
    /// The record.
    pub fn record(&self) -> &Record {
        &self.record
    }

    /// The record's encoded bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The preserved fds, in record order.
    pub fn fds(&self) -> Vec<BorrowedFd<'_>> {
        self.fds.iter().map(|fd| fd.as_fd()).collect()
    }

    /// The handover failed: unfreezes every file (in freeze order). The
    /// files stay preserved and the sessions open.
    pub fn abort(mut self) {
        self.settle_abort();
    }

    /// The successor has the sessions: they are handed over. From now on
    /// closing them here releases only this process's references (the files
    /// stay frozen for the successor).
    pub fn complete(mut self) {
        self.settled = true;
        let mut state = self.inner.lock();
        state.phase = Phase::HandedOver;
        tracing::info!(files = self.fds.len(), "handover complete");
    }

    fn settle_abort(&mut self) {
        if self.settled {
            return;
        }
        self.settled = true;
        let mut state = self.inner.lock();
        unfreeze_all(&mut state);
        tracing::info!(
            files = self.fds.len(),
            "handover aborted; files unfrozen and still preserved"
        );
    }
}

impl Drop for Handover {
    fn drop(&mut self) {
        if !self.settled {
            tracing::warn!("a handover was dropped without completing; aborting it");
            self.settle_abort();
        }
    }
}
