//! `luod`: a small daemon that holds sessions between a VMM and its
//! successor, and the client that talks to it.
//!
//! Model: a VMM freezes its sessions and deposits them (record and fds) with
//! luod, after which it may exit or die: luod holds the fds, so the memory
//! lives on. A successor retrieves a session by name, rebuilds it, and
//! tells luod when it has finished; only then does luod let go. Every
//! session belongs to the uid that deposited it (`SO_PEERCRED`); other uids
//! are refused (`EPERM`) and do not see it in lists.
//!
//! Requests (framing in [`crate::transport::channel`], magic "LUOD"); every
//! request gets exactly one reply, OK or ERROR (errno i32, message):
//!
//! ```text
//! DEPOSIT   fds: record memfd, preserved fds  -> OK
//! RETRIEVE  body: name -> OK with fds: the session's record memfd, its fds
//! FINISH    body: name -> OK (luod releases the session)
//! LIST      -> OK with body: the caller's sessions (see SessionSummary)
//! SHOW      body: name -> OK with fds: the session's record memfd
//! DROP      body: name -> OK (luod releases the session unretrieved)
//! ```
//!
//! Rules, per request, checked in this order:
//! - DEPOSIT: the record memfd sealed, the record valid and full, one fd per
//!   file, each fd the file the record names (`EINVAL`/`EPROTO`); every
//!   session name free (`EEXIST`); room for them (`ENOSPC`). All sessions of
//!   one deposit are added or none.
//! - RETRIEVE, SHOW, DROP, FINISH: name valid (`EINVAL`), known (`ENOENT`),
//!   owned by the caller's uid (`EPERM`). RETRIEVE: not held by another live
//!   retrieval (`EINVAL`, as a second retrieval in upstream LUO); FINISH: only
//!   on the connection that retrieved it (`EINVAL`); DROP: not while
//!   retrieved (`EBUSY`).
//! - A connection that retrieved a session and closes without FINISH gives
//!   it back: it can be retrieved again (logged as a warning).
//! - A malformed request gets an `EPROTO` reply and its connection is
//!   closed; nothing else is disturbed.

pub mod server;

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;

use crate::error::LuError;
use crate::fdio;
use crate::handler::HandlerRegistry;
use crate::incoming::Incoming;
use crate::names::SessionName;
use crate::outgoing::LiveUpdate;
use crate::record::wire::{WireReader, WireWriter};
use crate::record::{Record, RecordKind};
use crate::transport::channel::{Channel, Message};
use crate::transport::{decode_error, own_uid};

/// The protocol's magic.
pub const LUOD_MAGIC: u32 = u32::from_le_bytes(*b"LUOD");
/// Where luod listens unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/gmem-lu/luod.sock";

/// Request and reply kinds.
pub mod kind {
    /// Deposit frozen sessions.
    pub const DEPOSIT: u16 = 1;
    /// Retrieve a session.
    pub const RETRIEVE: u16 = 2;
    /// Finish a retrieved session.
    pub const FINISH: u16 = 3;
    /// List the caller's sessions.
    pub const LIST: u16 = 4;
    /// Show a session's record.
    pub const SHOW: u16 = 5;
    /// Drop a session.
    pub const DROP: u16 = 6;
    /// Success reply.
    pub const OK: u16 = 100;
    /// Error reply.
    pub const ERROR: u16 = 101;
}

/// One line of a LIST reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionSummary {
    /// The session's name.
    pub name: SessionName,
    /// The uid that deposited it.
    pub owner_uid: u32,
    /// The pid that deposited it.
    pub owner_pid: i32,
    /// Number of files.
    pub files: u32,
    /// Whether a live connection has retrieved it.
    pub retrieved: bool,
    /// When it was deposited, seconds since the Unix epoch.
    pub deposited_at: u64,
}

impl SessionSummary {
    /// Appends the wire form: name length (u8), name, owner uid (u32),
    /// owner pid (i32), files (u32), retrieved (u8), deposited at (u64).
    pub fn encode(&self, writer: &mut WireWriter<'_>) {
        let name = self.name.as_str().as_bytes();
        writer.u8(name.len() as u8);
        writer.bytes(name);
        writer.u32(self.owner_uid);
        writer.u32(self.owner_pid as u32);
        writer.u32(self.files);
        writer.u8(u8::from(self.retrieved));
        writer.u64(self.deposited_at);
    }

    /// Reads the wire form.
    ///
    /// # Errors
    /// `EPROTO` ([`LuError::Protocol`]) for a short or invalid entry.
    pub fn decode(reader: &mut WireReader<'_>) -> Result<SessionSummary, LuError> {
        let short = |_| LuError::Protocol {
            detail: "a truncated session list".to_owned(),
        };
        let length = reader.u8().map_err(short)?;
        let name = reader.take(length.into()).map_err(short)?;
        let name = std::str::from_utf8(name)
            .ok()
            .and_then(|name| SessionName::new(name).ok())
            .ok_or_else(|| LuError::Protocol {
                detail: "a session list with an invalid name".to_owned(),
            })?;
        Ok(SessionSummary {
            name,
            owner_uid: reader.u32().map_err(short)?,
            owner_pid: reader.u32().map_err(short)? as i32,
            files: reader.u32().map_err(short)?,
            retrieved: reader.u8().map_err(short)? != 0,
            deposited_at: reader.u64().map_err(short)?,
        })
    }
}

/// A connection to luod.
#[derive(Debug)]
pub struct LuodClient {
    channel: Channel,
}

impl LuodClient {
    /// Connects to luod at `path`. luod must run as root or as this
    /// process's uid (`SO_PEERCRED`), so that an impostor listening on the
    /// path cannot collect the sessions.
    ///
    /// # Errors
    /// - `Io` from `connect` (`ENOENT`, `ECONNREFUSED`);
    /// - `EPERM` ([`LuError::PeerCredentials`]): luod runs as another uid.
    pub fn connect(path: &Path) -> Result<LuodClient, LuError> {
        let channel = Channel::connect(path, LUOD_MAGIC)?;
        let credentials = channel.peer_credentials()?;
        let daemon_uid = credentials.uid.as_raw();
        if daemon_uid != 0 && daemon_uid != own_uid() {
            return Err(LuError::PeerCredentials {
                pid: credentials.pid.as_raw_nonzero().get(),
                uid: daemon_uid,
                expected: own_uid(),
            });
        }
        Ok(LuodClient { channel })
    }

    /// The connection, for sending raw requests (tests of luod's checks).
    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// Sends one request and returns the OK reply.
    ///
    /// # Errors
    /// [`LuError::Remote`] with luod's errno for an ERROR reply (also when
    /// luod refused the connection before the request: `EAGAIN` for too many
    /// connections); transport errors (`EPIPE`, `EPROTO`).
    pub fn request(
        &self,
        request: u16,
        body: &[u8],
        fds: &[BorrowedFd<'_>],
    ) -> Result<Message, LuError> {
        let reply = match self.exchange(request, body, fds) {
            Ok(reply) => reply,
            // luod may have refused the connection itself (too many) and
            // closed it: its reason waits in the socket's receive queue,
            // behind the ECONNRESET the kernel reports first.
            Err(error @ LuError::PeerGone { .. }) => self
                .channel
                .receive("reading luod's refusal", true)
                .map_err(|_| error)?,
            Err(error) => return Err(error),
        };
        match reply.kind {
            kind::OK => Ok(reply),
            kind::ERROR => Err(decode_error(&reply.body)),
            other => Err(LuError::Protocol {
                detail: format!("luod replied with kind {other}"),
            }),
        }
    }

    fn exchange(
        &self,
        request: u16,
        body: &[u8],
        fds: &[BorrowedFd<'_>],
    ) -> Result<Message, LuError> {
        self.channel.send(request, body, fds, false)?;
        self.channel.receive("waiting for luod's reply", false)
    }

    /// Freezes `live_update`'s sessions and deposits them with luod. On
    /// success the handover is complete: this process may exit or die. On
    /// failure it is aborted (files unfrozen, still preserved).
    ///
    /// # Errors
    /// Those of [`LiveUpdate::freeze`]; luod's refusals ([`LuError::Remote`]:
    /// `EEXIST` for a session name it holds, `ENOSPC`...); transport errors.
    pub fn hand_over(&self, live_update: &LiveUpdate) -> Result<(), LuError> {
        let handover = live_update.freeze()?;
        let deposited = fdio::sealed_memfd("gmem-lu-deposit", handover.bytes()).and_then(|memfd| {
            let mut fds = vec![memfd.as_fd()];
            fds.extend(handover.fds());
            self.request(kind::DEPOSIT, &[], &fds).map(drop)
        });
        match deposited {
            Ok(()) => {
                handover.complete();
                Ok(())
            }
            Err(error) => {
                tracing::warn!(%error, "luod refused the deposit; aborting the handover");
                handover.abort();
                Err(error)
            }
        }
    }

    /// Retrieves session `name` and rebuilds it. Call
    /// [`LuodClient::finish`] on this connection when done with it.
    ///
    /// # Errors
    /// luod's refusals ([`LuError::Remote`]: `ENOENT`, `EPERM`, `EINVAL`);
    /// record errors; those of [`Incoming::decode`].
    pub fn retrieve(&self, name: &str, registry: &HandlerRegistry) -> Result<Incoming, LuError> {
        let reply = self.request(kind::RETRIEVE, name.as_bytes(), &[])?;
        let (record, fds) = split_record(reply)?;
        Incoming::from_parts(registry, record, fds)
    }

    /// Tells luod the retrieved session `name` is finished: luod lets go.
    ///
    /// # Errors
    /// luod's refusals ([`LuError::Remote`]: `ENOENT`, `EPERM`, `EINVAL`).
    pub fn finish(&self, name: &str) -> Result<(), LuError> {
        self.request(kind::FINISH, name.as_bytes(), &[]).map(drop)
    }

    /// The caller's sessions held by luod.
    ///
    /// # Errors
    /// Transport errors; `EPROTO` for a malformed list.
    pub fn list(&self) -> Result<Vec<SessionSummary>, LuError> {
        let reply = self.request(kind::LIST, &[], &[])?;
        let mut reader = WireReader::new(&reply.body, 0);
        let count = reader.u32().map_err(|_| LuError::Protocol {
            detail: "an empty session list reply".to_owned(),
        })?;
        let mut sessions = Vec::new();
        for _ in 0..count {
            sessions.push(SessionSummary::decode(&mut reader)?);
        }
        Ok(sessions)
    }

    /// The record of session `name` (without its fds).
    ///
    /// # Errors
    /// luod's refusals ([`LuError::Remote`]: `ENOENT`, `EPERM`); record
    /// errors.
    pub fn show(&self, name: &str) -> Result<Record, LuError> {
        let reply = self.request(kind::SHOW, name.as_bytes(), &[])?;
        Ok(split_record(reply)?.0)
    }

    /// Makes luod release session `name` without anyone retrieving it (its
    /// memory is lost).
    ///
    /// # Errors
    /// luod's refusals ([`LuError::Remote`]: `ENOENT`, `EPERM`, `EBUSY`).
    pub fn drop_session(&self, name: &str) -> Result<(), LuError> {
        self.request(kind::DROP, name.as_bytes(), &[]).map(drop)
    }
}

fn split_record(reply: Message) -> Result<(Record, Vec<OwnedFd>), LuError> {
    let mut fds = reply.fds.into_iter();
    let memfd = fds.next().ok_or_else(|| LuError::Protocol {
        detail: "a reply without its record".to_owned(),
    })?;
    let record = Record::decode(&fdio::read_sealed_memfd(memfd.as_fd())?)?;
    if record.kind != RecordKind::Full {
        return Err(crate::record::RecordError::WrongKind { expected: "full" }.into());
    }
    Ok((record, fds.collect()))
}
