//! The crate's error type for sessions, retrieval and transports.
//!
//! Every variant names the operation that failed and carries the offending
//! input; [`LuError::errno`] gives the errno a kernel LUO would return for the
//! same failure, so callers (and the rule-table test) can match it exactly.
//! Errors of the record codec ([`RecordError`]) and of file handlers
//! ([`HandlerError`]) are wrapped with their own errno.

use std::fmt;

use rustix::io::Errno;

use crate::handler::HandlerError;
use crate::names::{FileIdentity, SessionName, Token};
use crate::record::RecordError;

/// The short symbolic name of an errno ("EINVAL"), for messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ErrnoName(pub i32);

impl fmt::Display for ErrnoName {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self.0 {
            libc::EPERM => "EPERM",
            libc::ENOENT => "ENOENT",
            libc::EIO => "EIO",
            libc::E2BIG => "E2BIG",
            libc::EBADF => "EBADF",
            libc::EAGAIN => "EAGAIN",
            libc::ENOMEM => "ENOMEM",
            libc::EACCES => "EACCES",
            libc::EBUSY => "EBUSY",
            libc::EEXIST => "EEXIST",
            libc::EINVAL => "EINVAL",
            libc::EMFILE => "EMFILE",
            libc::EFBIG => "EFBIG",
            libc::ENOSPC => "ENOSPC",
            libc::EPIPE => "EPIPE",
            libc::ERANGE => "ERANGE",
            libc::EPROTO => "EPROTO",
            libc::EMSGSIZE => "EMSGSIZE",
            libc::EOPNOTSUPP => "EOPNOTSUPP",
            libc::ECONNRESET => "ECONNRESET",
            libc::ETIMEDOUT => "ETIMEDOUT",
            libc::ECONNREFUSED => "ECONNREFUSED",
            libc::ESTALE => "ESTALE",
            other => return write!(formatter, "errno {other}"),
        };
        formatter.write_str(name)
    }
}

/// Why a live-update operation failed.
#[derive(Debug, thiserror::Error)]
pub enum LuError {
    /// A session name is empty, too long or contains NUL (`EINVAL`).
    #[error("invalid session name {name:?}: it {reason} (EINVAL)")]
    InvalidSessionName {
        /// The name given.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A handler compatible string is empty, too long or not printable
    /// ASCII (`EINVAL`).
    #[error("invalid handler compatible string {name:?} (EINVAL)")]
    InvalidCompatible {
        /// The string given.
        name: String,
    },
    /// An outgoing session with this name exists already (`EEXIST`).
    #[error("session {name} already exists (EEXIST)")]
    SessionExists {
        /// The clashing name.
        name: SessionName,
    },
    /// The token is already used in this session (`EEXIST`); checked before
    /// the fd is looked at.
    #[error("token {token} is already used in session {session} (EEXIST)")]
    TokenExists {
        /// The session.
        session: SessionName,
        /// The clashing token.
        token: Token,
    },
    /// Preserving one more file would exceed what one handover can carry
    /// (`ENOSPC`).
    #[error(
        "cannot preserve token {token}: {limit} files are preserved already, the most one handover carries (ENOSPC)"
    )]
    TooManyFiles {
        /// The token asked for.
        token: Token,
        /// The limit.
        limit: usize,
    },
    /// The fd number is not an open file (`EBADF`), or duplicating it failed.
    #[error("cannot preserve fd {fd}: {} ({})", errno, ErrnoName(errno.raw_os_error()))]
    BadFd {
        /// The fd number given.
        fd: i32,
        /// Why duplicating it failed (normally `EBADF`).
        errno: Errno,
    },
    /// No registered handler accepts this file (`ENOENT`).
    #[error("no file handler can preserve fd {fd} (token {token}) (ENOENT)")]
    NoHandler {
        /// The fd number given.
        fd: i32,
        /// The token asked for.
        token: Token,
    },
    /// The same file is already preserved in some session (`EBUSY`).
    #[error("cannot preserve token {token}: the file ({identity}) is already preserved (EBUSY)")]
    AlreadyPreserved {
        /// The token asked for.
        token: Token,
        /// The file.
        identity: FileIdentity,
    },
    /// A file handler failed; its errno is passed through.
    #[error("{operation} of token {token} by handler {compatible} failed: {source}")]
    Handler {
        /// Which handler operation failed ("preserve", "freeze", ...).
        operation: &'static str,
        /// The handler's compatible string.
        compatible: String,
        /// The file's token.
        token: Token,
        /// The handler's error.
        source: HandlerError,
    },
    /// The sessions are frozen for a handover, or were handed over: they
    /// cannot change now (`EBUSY`).
    #[error("cannot {operation}: the sessions are {state} (EBUSY)")]
    HandoverInProgress {
        /// What was attempted.
        operation: &'static str,
        /// "frozen for a handover" or "handed over".
        state: &'static str,
    },
    /// A handler with this compatible string is registered already (`EEXIST`).
    #[error("a file handler with compatible string {compatible:?} is already registered (EEXIST)")]
    HandlerExists {
        /// The clashing compatible string.
        compatible: String,
    },
    /// A record names a handler that is not registered here (`ENOENT`).
    #[error("no file handler {compatible:?} is registered to retrieve token {token} (ENOENT)")]
    UnknownHandler {
        /// The compatible string in the record.
        compatible: String,
        /// The file's token.
        token: Token,
    },
    /// A record's handler data has another version than the registered
    /// handler understands (`EOPNOTSUPP`).
    #[error(
        "handler {compatible:?} understands version {handler_version}, the record has version {record_version} (EOPNOTSUPP)"
    )]
    HandlerVersion {
        /// The compatible string.
        compatible: String,
        /// The version in the record.
        record_version: u32,
        /// The version the registered handler understands.
        handler_version: u32,
    },
    /// No incoming session has this name (`ENOENT`).
    #[error("no incoming session named {name:?} (ENOENT)")]
    UnknownSession {
        /// The name asked for.
        name: String,
    },
    /// The incoming session was retrieved already (`EINVAL`).
    #[error("session {name} was already retrieved (EINVAL)")]
    SessionAlreadyRetrieved {
        /// The session.
        name: SessionName,
    },
    /// No file with this token is in the session (`ENOENT`).
    #[error("session {session} has no file with token {token} (ENOENT)")]
    UnknownToken {
        /// The session.
        session: SessionName,
        /// The token asked for.
        token: Token,
    },
    /// An earlier retrieve of this file failed; the error is sticky.
    #[error("retrieving token {token} of session {session} failed before ({}): {message}", ErrnoName(*errno))]
    RetrieveFailed {
        /// The session.
        session: SessionName,
        /// The file's token.
        token: Token,
        /// The errno of the first failure.
        errno: i32,
        /// The first failure's message.
        message: String,
    },
    /// A handler refused `can_finish`: nothing was finished (`EBUSY`).
    #[error("cannot finish session {session}: the handler of token {token} refuses (EBUSY)")]
    FinishRefused {
        /// The session.
        session: SessionName,
        /// The refusing file's token.
        token: Token,
    },
    /// A record arrived with another number of fds than it has files
    /// (`EINVAL`).
    #[error("the record has {expected} files but {received} fds arrived (EINVAL)")]
    FdCountMismatch {
        /// Files in the record.
        expected: usize,
        /// Fds received.
        received: usize,
    },
    /// An fd that arrived is not the file the record describes (`EINVAL`).
    #[error("fd {index} is {actual}, the record describes {expected} (EINVAL)")]
    FdMismatch {
        /// Position of the fd in the list.
        index: usize,
        /// The identity in the record.
        expected: FileIdentity,
        /// The identity of the fd.
        actual: FileIdentity,
    },
    /// The handover record is invalid.
    #[error("invalid handover record: {0}")]
    Record(#[from] RecordError),
    /// A system call failed.
    #[error("{operation} failed: {errno}")]
    Io {
        /// What was being done.
        operation: &'static str,
        /// The errno.
        errno: Errno,
    },
    /// A socket peer runs under a uid this side does not serve (`EPERM`).
    #[error("peer pid {pid} runs as uid {uid}, only uid {expected} is served (EPERM)")]
    PeerCredentials {
        /// The peer's pid.
        pid: i32,
        /// The peer's uid.
        uid: u32,
        /// The uid served.
        expected: u32,
    },
    /// The peer sent something the protocol does not allow (`EPROTO`).
    #[error("protocol error: {detail} (EPROTO)")]
    Protocol {
        /// What was wrong.
        detail: String,
    },
    /// The peer closed the connection or died (`EPIPE`).
    #[error("the peer went away during {during} (EPIPE)")]
    PeerGone {
        /// The step in progress.
        during: &'static str,
    },
    /// The peer did not answer in time (`ETIMEDOUT`).
    #[error("the peer did not answer during {during} in time (ETIMEDOUT)")]
    Timeout {
        /// The step in progress.
        during: &'static str,
    },
    /// The peer refused a request with an errno and a message.
    #[error("the peer refused: {message} ({})", ErrnoName(*errno))]
    Remote {
        /// The errno the peer returned.
        errno: i32,
        /// The peer's message.
        message: String,
    },
    /// An environment variable of the exec transport is malformed (`EINVAL`).
    #[error("environment variable {variable}: {detail} (EINVAL)")]
    Environment {
        /// The variable.
        variable: &'static str,
        /// What is wrong with it.
        detail: String,
    },
    /// Sessions or files changed between a transfer offer and the switch
    /// (`EBUSY`): offer again.
    #[error("the preserved files changed since the offer to the successor: {detail} (EBUSY)")]
    ChangedSinceOffer {
        /// What changed.
        detail: String,
    },
}

impl LuError {
    /// The errno a kernel LUO returns for this failure.
    pub fn errno(&self) -> i32 {
        match self {
            LuError::InvalidSessionName { .. }
            | LuError::InvalidCompatible { .. }
            | LuError::SessionAlreadyRetrieved { .. }
            | LuError::FdCountMismatch { .. }
            | LuError::FdMismatch { .. }
            | LuError::Environment { .. } => libc::EINVAL,
            LuError::SessionExists { .. }
            | LuError::TokenExists { .. }
            | LuError::HandlerExists { .. } => libc::EEXIST,
            LuError::TooManyFiles { .. } => libc::ENOSPC,
            LuError::BadFd { errno, .. } | LuError::Io { errno, .. } => errno.raw_os_error(),
            LuError::NoHandler { .. }
            | LuError::UnknownHandler { .. }
            | LuError::UnknownSession { .. }
            | LuError::UnknownToken { .. } => libc::ENOENT,
            LuError::AlreadyPreserved { .. }
            | LuError::HandoverInProgress { .. }
            | LuError::FinishRefused { .. }
            | LuError::ChangedSinceOffer { .. } => libc::EBUSY,
            LuError::Handler { source, .. } => source.errno(),
            LuError::HandlerVersion { .. } => libc::EOPNOTSUPP,
            LuError::RetrieveFailed { errno, .. } | LuError::Remote { errno, .. } => *errno,
            LuError::Record(error) => error.errno(),
            LuError::PeerCredentials { .. } => libc::EPERM,
            LuError::Protocol { .. } => libc::EPROTO,
            LuError::PeerGone { .. } => libc::EPIPE,
            LuError::Timeout { .. } => libc::ETIMEDOUT,
        }
    }

    /// Wraps a failed system call.
    pub(crate) fn io(operation: &'static str, errno: Errno) -> LuError {
        LuError::Io { operation, errno }
    }
}
