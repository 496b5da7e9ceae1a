//! The luod daemon's state machine and event loop.
//!
//! Model: one thread polls the shutdown fd, the listening socket and every
//! connection. A request is handled to completion before the next is read,
//! so there is no locking and nothing is ever half-done: a deposit adds all
//! of its sessions or none, a reply is sent without blocking (a peer that
//! does not read its replies is disconnected), and shutdown happens between
//! requests. On shutdown every held session is released and logged.
//!
//! Bounds (each a [`DaemonConfig`] field): connections, sessions in total,
//! sessions per uid, fds held; requests are bounded by the framing
//! ([`crate::transport::channel`]) and records by [`crate::record`].

use std::collections::BTreeMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use rustix::event::{PollFd, PollFlags};
use rustix::io::Errno;

use super::{LUOD_MAGIC, SessionSummary, kind};
use crate::error::LuError;
use crate::fdio;
use crate::incoming::check_fds;
use crate::names::SessionName;
use crate::record::wire::WireWriter;
use crate::record::{Record, RecordKind, SessionRecord};
use crate::transport::channel::{Channel, Listener, MAX_BODY, Message};
use crate::transport::{encode_error, encode_error_parts};

/// luod's limits and socket.
#[derive(Clone, Debug)]
pub struct DaemonConfig {
    /// Where to listen.
    pub socket: PathBuf,
    /// The socket file's mode. Any uid may connect by default (0666): each
    /// is served only its own sessions.
    pub socket_mode: u32,
    /// Most connections at once; more are closed on accept.
    pub max_connections: usize,
    /// Most sessions held in total.
    pub max_sessions: usize,
    /// Most sessions held for one uid, so one tenant cannot fill luod.
    pub max_sessions_per_uid: usize,
    /// Most preserved fds held in total (kept under `RLIMIT_NOFILE`).
    pub max_held_fds: usize,
}

impl DaemonConfig {
    /// The defaults for a socket at `socket`: 64 connections, 1024 sessions,
    /// 256 per uid (a LIST reply of 256 entries fits one message), 16384 fds.
    pub fn new(socket: impl Into<PathBuf>) -> DaemonConfig {
        DaemonConfig {
            socket: socket.into(),
            socket_mode: 0o666,
            max_connections: 64,
            max_sessions: 1024,
            max_sessions_per_uid: 256,
            max_held_fds: 16384,
        }
    }
}

/// Why luod refused a request.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The request itself, or the record in it, is invalid.
    #[error(transparent)]
    Invalid(#[from] LuError),
    /// No session with this name (`ENOENT`).
    #[error("luod holds no session named {name:?} (ENOENT)")]
    UnknownSession {
        /// The name asked for.
        name: String,
    },
    /// The session belongs to another uid (`EPERM`).
    #[error("session {name} belongs to uid {owner}, not to uid {uid} (EPERM)")]
    NotOwner {
        /// The session.
        name: SessionName,
        /// Its owner.
        owner: u32,
        /// The caller's uid.
        uid: u32,
    },
    /// A session of this name is held already (`EEXIST`).
    #[error("luod already holds a session named {name} (EEXIST)")]
    SessionExists {
        /// The clashing name.
        name: SessionName,
    },
    /// The session is retrieved by another live connection (`EINVAL`, as a
    /// second retrieval in upstream LUO).
    #[error("session {name} is already retrieved (EINVAL)")]
    AlreadyRetrieved {
        /// The session.
        name: SessionName,
    },
    /// FINISH of a session this connection did not retrieve (`EINVAL`).
    #[error("session {name} was not retrieved on this connection (EINVAL)")]
    NotRetrievedHere {
        /// The session.
        name: SessionName,
    },
    /// DROP of a session that is retrieved (`EBUSY`).
    #[error("session {name} is retrieved; finish it instead (EBUSY)")]
    Retrieved {
        /// The session.
        name: SessionName,
    },
    /// A bound would be exceeded (`ENOSPC`).
    #[error("no room: {what} (limit {limit}) (ENOSPC)")]
    NoRoom {
        /// Which bound.
        what: &'static str,
        /// Its value.
        limit: usize,
    },
}

impl DaemonError {
    /// The errno sent to the client.
    pub fn errno(&self) -> i32 {
        match self {
            DaemonError::Invalid(error) => error.errno(),
            DaemonError::UnknownSession { .. } => libc::ENOENT,
            DaemonError::NotOwner { .. } => libc::EPERM,
            DaemonError::SessionExists { .. } => libc::EEXIST,
            DaemonError::AlreadyRetrieved { .. } | DaemonError::NotRetrievedHere { .. } => {
                libc::EINVAL
            }
            DaemonError::Retrieved { .. } => libc::EBUSY,
            DaemonError::NoRoom { .. } => libc::ENOSPC,
        }
    }

    fn is_malformed(&self) -> bool {
        matches!(self, DaemonError::Invalid(LuError::Protocol { .. }))
    }
}

struct Connection {
    id: u64,
    channel: Channel,
    uid: u32,
    pid: i32,
}

struct Held {
    record: SessionRecord,
    fds: Vec<OwnedFd>,
    owner_uid: u32,
    owner_pid: i32,
    deposited_at: u64,
    retrieved_by: Option<u64>,
}

struct Reply {
    body: Vec<u8>,
    fds: Vec<OwnedFd>,
}

impl Reply {
    fn empty() -> Reply {
        Reply {
            body: Vec::new(),
            fds: Vec::new(),
        }
    }
}

/// The daemon.
pub struct Daemon {
    config: DaemonConfig,
    listener: Listener,
    connections: Vec<Connection>,
    sessions: BTreeMap<SessionName, Held>,
    next_connection: u64,
}

impl std::fmt::Debug for Daemon {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Daemon")
            .field("socket", &self.config.socket)
            .field("connections", &self.connections.len())
            .field("sessions", &self.sessions.len())
            .finish()
    }
}

impl Daemon {
    /// Binds the socket.
    ///
    /// # Errors
    /// Those of [`Listener::bind`]; `Io` from making it nonblocking.
    pub fn bind(config: DaemonConfig) -> Result<Daemon, LuError> {
        let listener = Listener::bind(&config.socket, LUOD_MAGIC, config.socket_mode)?;
        rustix::io::ioctl_fionbio(&listener, true)
            .map_err(|errno| LuError::io("making the listener nonblocking", errno))?;
        tracing::info!(socket = %config.socket.display(), "luod listening");
        Ok(Daemon {
            config,
            listener,
            connections: Vec::new(),
            sessions: BTreeMap::new(),
            next_connection: 0,
        })
    }

    /// The socket path.
    pub fn socket_path(&self) -> &Path {
        self.listener.path()
    }

    /// Number of sessions held.
    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// Serves until `shutdown` becomes readable (the binary passes a
    /// signalfd for SIGTERM and SIGINT).
    ///
    /// # Errors
    /// `Io` if `poll` fails for another reason than `EINTR`.
    pub fn run(&mut self, shutdown: BorrowedFd<'_>) -> Result<(), LuError> {
        loop {
            let (stop, accept, ready) = self.wait(shutdown)?;
            if stop {
                tracing::info!(sessions = self.sessions.len(), "luod shutting down");
                return Ok(());
            }
            if accept {
                self.accept();
            }
            for id in ready {
                self.serve(id);
            }
        }
    }

    fn wait(&self, shutdown: BorrowedFd<'_>) -> Result<(bool, bool, Vec<u64>), LuError> {
        let mut polled = vec![
            PollFd::new(&shutdown, PollFlags::IN),
            PollFd::new(&self.listener, PollFlags::IN),
        ];
        polled.extend(
            self.connections
                .iter()
                .map(|connection| PollFd::new(&connection.channel, PollFlags::IN)),
        );
        loop {
            match rustix::event::poll(&mut polled, None) {
                Ok(_) => break,
                Err(Errno::INTR) => continue,
                Err(errno) => return Err(LuError::io("poll", errno)),
            }
        }
        let mut events = polled.iter().map(|fd| !fd.revents().is_empty());
        let stop = events.next().unwrap_or(false);
        let accept = events.next().unwrap_or(false);
        let ready = self
            .connections
            .iter()
            .zip(events)
            .filter(|(_, ready)| *ready)
            .map(|(connection, _)| connection.id)
            .collect();
        Ok((stop, accept, ready))
    }

    fn accept(&mut self) {
        let channel = match self.listener.accept() {
            Ok(channel) => channel,
            Err(error) => {
                tracing::debug!(%error, "accept found nothing");
                return;
            }
        };
        let credentials = match channel.peer_credentials() {
            Ok(credentials) => credentials,
            Err(error) => {
                tracing::warn!(%error, "cannot read a peer's credentials; closing it");
                return;
            }
        };
        let uid = credentials.uid.as_raw();
        let pid = credentials.pid.as_raw_nonzero().get();
        if self.connections.len() >= self.config.max_connections {
            tracing::warn!(
                uid,
                pid,
                limit = self.config.max_connections,
                "too many connections; closing the new one"
            );
            let error = LuError::io("connecting to luod", Errno::AGAIN);
            let _ = channel.send(kind::ERROR, &encode_error(&error), &[], true);
            return;
        }
        let id = self.next_connection;
        self.next_connection += 1;
        tracing::info!(connection = id, uid, pid, "client connected");
        self.connections.push(Connection {
            id,
            channel,
            uid,
            pid,
        });
    }

    fn serve(&mut self, id: u64) {
        let Some(connection) = self
            .connections
            .iter()
            .find(|connection| connection.id == id)
        else {
            return;
        };
        let (uid, pid) = (connection.uid, connection.pid);
        let outcome = match connection.channel.receive("reading a request", true) {
            Ok(message) => self.dispatch(id, uid, pid, message),
            Err(LuError::Timeout { .. }) => return,
            Err(LuError::PeerGone { .. }) => {
                self.close(id);
                return;
            }
            Err(error) => Err(DaemonError::Invalid(error)),
        };
        let malformed = outcome.as_ref().is_err_and(DaemonError::is_malformed);
        let sent = match &outcome {
            Ok(reply) => {
                let fds: Vec<BorrowedFd<'_>> = reply.fds.iter().map(|fd| fd.as_fd()).collect();
                self.send(id, kind::OK, &reply.body, &fds)
            }
            Err(error) => {
                tracing::warn!(connection = id, uid, pid, %error, "request refused");
                let encoded = encode_error_parts(error.errno(), &error.to_string());
                self.send(id, kind::ERROR, &encoded, &[])
            }
        };
        if malformed || !sent {
            self.close(id);
        }
    }

    fn send(&self, id: u64, reply: u16, body: &[u8], fds: &[BorrowedFd<'_>]) -> bool {
        let Some(connection) = self
            .connections
            .iter()
            .find(|connection| connection.id == id)
        else {
            return false;
        };
        match connection.channel.send(reply, body, fds, true) {
            Ok(()) => true,
            Err(error) => {
                tracing::warn!(connection = id, %error, "cannot reply; disconnecting");
                false
            }
        }
    }

    fn close(&mut self, id: u64) {
        self.connections.retain(|connection| connection.id != id);
        for (name, held) in &mut self.sessions {
            if held.retrieved_by == Some(id) {
                held.retrieved_by = None;
                tracing::warn!(session = %name, connection = id, "retrieved but never finished; it can be retrieved again");
            }
        }
        tracing::info!(connection = id, "client disconnected");
    }

    fn dispatch(
        &mut self,
        id: u64,
        uid: u32,
        pid: i32,
        message: Message,
    ) -> Result<Reply, DaemonError> {
        if message.kind != kind::DEPOSIT && !message.fds.is_empty() {
            return Err(LuError::Protocol {
                detail: format!("request kind {} carries fds", message.kind),
            }
            .into());
        }
        match message.kind {
            kind::DEPOSIT => self.deposit(uid, pid, message.fds),
            kind::RETRIEVE => self.retrieve(id, uid, &message.body),
            kind::FINISH => self.finish(id, uid, &message.body),
            kind::LIST => self.list(uid),
            kind::SHOW => self.show(uid, &message.body),
            kind::DROP => self.drop_session(uid, &message.body),
            other => Err(LuError::Protocol {
                detail: format!("unknown request kind {other}"),
            }
            .into()),
        }
    }

    fn deposit(&mut self, uid: u32, pid: i32, fds: Vec<OwnedFd>) -> Result<Reply, DaemonError> {
        let mut fds = fds.into_iter();
        let memfd = fds.next().ok_or_else(|| LuError::Protocol {
            detail: "a deposit without its record".to_owned(),
        })?;
        let record = Record::decode(&fdio::read_sealed_memfd(&memfd)?).map_err(LuError::from)?;
        if record.kind != RecordKind::Full {
            return Err(
                LuError::from(crate::record::RecordError::WrongKind { expected: "full" }).into(),
            );
        }
        let fds: Vec<OwnedFd> = fds.collect();
        check_fds(&record, &fds)?;
        for session in &record.sessions {
            if self.sessions.contains_key(&session.name) {
                return Err(DaemonError::SessionExists {
                    name: session.name.clone(),
                });
            }
        }
        self.check_room(uid, &record, fds.len())?;
        let deposited_at = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|elapsed| elapsed.as_secs())
            .unwrap_or(0);
        let mut fds = fds.into_iter();
        for session in record.sessions {
            let session_fds: Vec<OwnedFd> = fds.by_ref().take(session.files.len()).collect();
            tracing::info!(session = %session.name, uid, pid, files = session.files.len(), "deposited");
            self.sessions.insert(
                session.name.clone(),
                Held {
                    record: session,
                    fds: session_fds,
                    owner_uid: uid,
                    owner_pid: pid,
                    deposited_at,
                    retrieved_by: None,
                },
            );
        }
        Ok(Reply::empty())
    }

    fn check_room(&self, uid: u32, record: &Record, new_fds: usize) -> Result<(), DaemonError> {
        let new = record.sessions.len();
        if self.sessions.len() + new > self.config.max_sessions {
            return Err(DaemonError::NoRoom {
                what: "sessions held",
                limit: self.config.max_sessions,
            });
        }
        let owned = self
            .sessions
            .values()
            .filter(|held| held.owner_uid == uid)
            .count();
        if owned + new > self.config.max_sessions_per_uid {
            return Err(DaemonError::NoRoom {
                what: "sessions held for this uid",
                limit: self.config.max_sessions_per_uid,
            });
        }
        let held_fds: usize = self.sessions.values().map(|held| held.fds.len()).sum();
        if held_fds + new_fds > self.config.max_held_fds {
            return Err(DaemonError::NoRoom {
                what: "fds held",
                limit: self.config.max_held_fds,
            });
        }
        Ok(())
    }

    fn owned(&mut self, uid: u32, body: &[u8]) -> Result<(SessionName, &mut Held), DaemonError> {
        let name = std::str::from_utf8(body).map_err(|_| LuError::InvalidSessionName {
            name: String::from_utf8_lossy(body).into_owned(),
            reason: "is not UTF-8",
        })?;
        let name = SessionName::new(name)?;
        let Some(held) = self.sessions.get_mut(&name) else {
            return Err(DaemonError::UnknownSession {
                name: name.to_string(),
            });
        };
        if held.owner_uid != uid {
            return Err(DaemonError::NotOwner {
                name,
                owner: held.owner_uid,
                uid,
            });
        }
        Ok((name, held))
    }

    fn retrieve(&mut self, id: u64, uid: u32, body: &[u8]) -> Result<Reply, DaemonError> {
        let (name, held) = self.owned(uid, body)?;
        if held.retrieved_by.is_some() {
            return Err(DaemonError::AlreadyRetrieved { name });
        }
        let mut fds = vec![session_record_memfd(&held.record)?];
        for fd in &held.fds {
            fds.push(
                rustix::io::fcntl_dupfd_cloexec(fd, 0)
                    .map_err(|errno| LuError::io("duplicating a held fd", errno))?,
            );
        }
        held.retrieved_by = Some(id);
        tracing::info!(session = %name, connection = id, "retrieved");
        Ok(Reply {
            body: Vec::new(),
            fds,
        })
    }

    fn finish(&mut self, id: u64, uid: u32, body: &[u8]) -> Result<Reply, DaemonError> {
        let (name, held) = self.owned(uid, body)?;
        if held.retrieved_by != Some(id) {
            return Err(DaemonError::NotRetrievedHere { name });
        }
        self.sessions.remove(&name);
        tracing::info!(session = %name, connection = id, "finished; released");
        Ok(Reply::empty())
    }

    fn list(&self, uid: u32) -> Result<Reply, DaemonError> {
        let mut body = Vec::new();
        let mut writer = WireWriter::new(&mut body);
        let owned: Vec<SessionSummary> = self
            .sessions
            .iter()
            .filter(|(_, held)| held.owner_uid == uid)
            .map(|(name, held)| SessionSummary {
                name: name.clone(),
                owner_uid: held.owner_uid,
                owner_pid: held.owner_pid,
                files: held.fds.len() as u32,
                retrieved: held.retrieved_by.is_some(),
                deposited_at: held.deposited_at,
            })
            .collect();
        writer.u32(owned.len() as u32);
        for summary in &owned {
            summary.encode(&mut writer);
        }
        if body.len() > MAX_BODY {
            return Err(DaemonError::NoRoom {
                what: "sessions in one list reply",
                limit: self.config.max_sessions_per_uid,
            });
        }
        Ok(Reply {
            body,
            fds: Vec::new(),
        })
    }

    fn show(&mut self, uid: u32, body: &[u8]) -> Result<Reply, DaemonError> {
        let (_, held) = self.owned(uid, body)?;
        Ok(Reply {
            body: Vec::new(),
            fds: vec![session_record_memfd(&held.record)?],
        })
    }

    fn drop_session(&mut self, uid: u32, body: &[u8]) -> Result<Reply, DaemonError> {
        let (name, held) = self.owned(uid, body)?;
        if held.retrieved_by.is_some() {
            return Err(DaemonError::Retrieved { name });
        }
        if let Some(held) = self.sessions.remove(&name) {
            tracing::warn!(session = %name, files = held.fds.len(), "dropped unretrieved; its memory is released");
        }
        Ok(Reply::empty())
    }
}

fn session_record_memfd(session: &SessionRecord) -> Result<OwnedFd, LuError> {
    let bytes = Record::full(vec![session.clone()]).encode()?;
    fdio::sealed_memfd("gmem-lu-session", &bytes)
}

impl Drop for Daemon {
    fn drop(&mut self) {
        for (name, held) in &self.sessions {
            tracing::warn!(
                session = %name,
                owner_uid = held.owner_uid,
                files = held.fds.len(),
                "luod exiting: releasing a session nobody retrieved"
            );
        }
    }
}
