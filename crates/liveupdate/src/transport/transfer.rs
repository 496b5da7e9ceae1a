//! The `transfer` transport: a successor started ahead receives the
//! sessions over a Unix socket while the guest still runs in the old
//! process, builds everything it needs, and at the switch only what changed
//! crosses.
//!
//! Model: the old VMM listens on a seqpacket socket ([`TransferListener`]).
//! The successor connects ([`TransferSuccessor::connect`]); each side checks
//! the other's uid with `SO_PEERCRED` (only the same uid is served). The
//! memory never moves: fds cross by `SCM_RIGHTS`, records in sealed memfds.
//!
//! Messages (framing in [`super::channel`], magic "LUTX"):
//!
//! ```text
//! OFFER     old -> new  fds: record memfd, then the preserved fds
//! READY     new -> old  the offer was valid; the successor builds ahead
//! SWITCH    old -> new  fds: delta record memfd; body: the caller's payload
//!                       (vCPU state, at most MAX_SWITCH_PAYLOAD bytes)
//! SWITCHED  new -> old  the final record is valid and every file of it is
//!                       retrieved: the successor can run
//! COMMIT    old -> new  the old process has let go: run
//! ERROR     either      errno (i32) and a message
//! ```
//!
//! Success path:
//! 1. Old: [`TransferLink::offer`]: a preview of the sessions (every
//!    handler's freeze then unfreeze) goes out with all the fds; the successor
//!    validates it ([`TransferSuccessor::receive_offer`]) and answers READY.
//!    The guest runs on. Offers may repeat; the last one counts.
//! 2. Old, at the switch ([`TransferLink::switch`]): the real freeze; the
//!    delta between offer and final record (the files whose handler data
//!    changed) and the payload go out.
//! 3. New ([`TransferSuccessor::wait_for_switch`]): applies the delta,
//!    rebuilds the incoming sessions, retrieves every file of them (each
//!    handler rebuilds and checks its object: the gmem handler restores the
//!    guest memory file, or brings the object restored ahead up to date),
//!    and only then answers SWITCHED; then it waits for COMMIT.
//! 4. Old: on SWITCHED it completes the handover, sends COMMIT and returns;
//!    it must not touch guest memory again (the files stay frozen) and
//!    normally exits.
//!
//! Invariant: the guest has one owner at every moment. The old process owns
//! it until it has SWITCHED in hand, and the successor answers SWITCHED only
//! when nothing it still has to do can fail for lack of a valid record or
//! file, so a failed retrieve never strands the guest.
//!
//! Failure paths (either side dying before the switch aborts cleanly):
//! 1. The successor dies, refuses (ERROR: a bad delta or record, a file
//!    whose retrieve fails) or times out before SWITCHED: the old process
//!    aborts the handover (files unfrozen, still preserved) and carries on;
//!    `switch` returns the error.
//! 2. The sessions changed between offer and switch (files preserved or
//!    closed): `switch` aborts with `EBUSY`; offer again.
//! 3. The old process dies or aborts before COMMIT: the successor gets
//!    `EPIPE` or the old side's error and must not run the guest (the
//!    objects it retrieved are dropped; a frozen guest memory file object
//!    changes nothing in the kernel object).

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::time::Duration;

use crate::error::LuError;
use crate::fdio;
use crate::handler::HandlerRegistry;
use crate::incoming::{Incoming, check_fds};
use crate::outgoing::LiveUpdate;
use crate::record::{Record, RecordError, RecordKind};
use crate::transport::channel::{Channel, Listener, Message};
use crate::transport::{decode_error, encode_error, own_uid};

/// The protocol's magic.
pub const TRANSFER_MAGIC: u32 = u32::from_le_bytes(*b"LUTX");
/// Largest switch payload: room for the vCPU state of a small VM (a vCPU's
/// registers, sregs, FPU/XSAVE and MSRs take about 5 KiB) while staying well
/// inside one message.
pub const MAX_SWITCH_PAYLOAD: usize = 32 << 10;
/// How long the old process waits for each answer by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

const OFFER: u16 = 1;
const READY: u16 = 2;
const SWITCH: u16 = 3;
const SWITCHED: u16 = 4;
const COMMIT: u16 = 5;
const ERROR: u16 = 6;

fn unexpected(kind: u16, during: &str) -> LuError {
    LuError::Protocol {
        detail: format!("unexpected message kind {kind} while {during}"),
    }
}

/// The old VMM's listening socket.
#[derive(Debug)]
pub struct TransferListener {
    listener: Listener,
}

impl TransferListener {
    /// Listens at `path` (socket file mode 0600: the successor runs as the
    /// same user).
    ///
    /// # Errors
    /// Those of [`Listener::bind`].
    pub fn bind(path: &Path) -> Result<TransferListener, LuError> {
        Ok(TransferListener {
            listener: Listener::bind(path, TRANSFER_MAGIC, 0o600)?,
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        self.listener.path()
    }

    /// Waits for a successor to connect.
    ///
    /// # Errors
    /// - `EPERM` ([`LuError::PeerCredentials`]): it runs as another uid (the
    ///   connection is closed);
    /// - `Io` from `accept`.
    pub fn accept(&self) -> Result<TransferLink, LuError> {
        let channel = self.listener.accept()?;
        let credentials = channel.require_peer_uid(own_uid())?;
        tracing::info!(
            pid = credentials.pid.as_raw_nonzero().get(),
            "successor connected"
        );
        channel.set_receive_timeout(Some(DEFAULT_TIMEOUT))?;
        Ok(TransferLink {
            channel,
            offer: None,
        })
    }
}

/// The old VMM's side of one connected successor.
#[derive(Debug)]
pub struct TransferLink {
    channel: Channel,
    offer: Option<Record>,
}

impl TransferLink {
    /// Changes how long the old process waits for each answer.
    ///
    /// # Errors
    /// `Io` from `setsockopt`.
    pub fn set_timeout(&self, timeout: Duration) -> Result<(), LuError> {
        self.channel.set_receive_timeout(Some(timeout))
    }

    /// Sends the sessions as they are now, with every preserved fd, and
    /// waits for the successor to accept them. The guest keeps running.
    ///
    /// # Errors
    /// - those of [`LiveUpdate::preview`];
    /// - `EPIPE`/`ETIMEDOUT`: the successor went away or did not answer;
    /// - [`LuError::Remote`]: the successor refused the offer.
    pub fn offer(&mut self, live_update: &LiveUpdate) -> Result<(), LuError> {
        let (record, fds) = live_update.preview()?;
        let memfd = fdio::sealed_memfd("gmem-lu-offer", &record.encode()?)?;
        let mut attached: Vec<BorrowedFd<'_>> = vec![memfd.as_fd()];
        attached.extend(fds.iter().map(|fd| fd.as_fd()));
        self.channel.send(OFFER, &[], &attached, false)?;
        let answer = self
            .channel
            .receive("waiting for the successor to accept the offer", false)?;
        match answer.kind {
            READY => {
                tracing::info!(files = record.file_count(), "successor accepted the offer");
                self.offer = Some(record);
                Ok(())
            }
            ERROR => Err(decode_error(&answer.body)),
            other => Err(unexpected(other, "waiting for READY")),
        }
    }

    /// The switch: freezes, sends the delta since the offer and `payload`,
    /// and returns once the successor has taken over. On any error the
    /// handover is aborted and the old process carries on.
    ///
    /// # Errors
    /// - `EPROTO`: no offer was accepted before;
    /// - `EMSGSIZE` (`Io`): `payload` is longer than [`MAX_SWITCH_PAYLOAD`];
    /// - those of [`LiveUpdate::freeze`];
    /// - `EBUSY` ([`LuError::ChangedSinceOffer`]): sessions or files changed
    ///   since the offer;
    /// - `EPIPE`/`ETIMEDOUT`/[`LuError::Remote`]: the successor went away,
    ///   did not answer, or refused.
    pub fn switch(self, live_update: &LiveUpdate, payload: &[u8]) -> Result<(), LuError> {
        let Some(offer) = &self.offer else {
            return Err(LuError::Protocol {
                detail: "switch before the successor accepted an offer".to_owned(),
            });
        };
        if payload.len() > MAX_SWITCH_PAYLOAD {
            return Err(LuError::io("switch payload", rustix::io::Errno::MSGSIZE));
        }
        let handover = live_update.freeze()?;
        let result = self.switch_frozen(offer, handover.record(), payload);
        match result {
            Ok(()) => {
                handover.complete();
                tracing::info!("switched over to the successor");
                Ok(())
            }
            Err(error) => {
                tracing::warn!(%error, "switch failed; aborting the handover");
                handover.abort();
                Err(error)
            }
        }
    }

    fn switch_frozen(&self, offer: &Record, now: &Record, payload: &[u8]) -> Result<(), LuError> {
        let delta = now
            .delta_from(offer)
            .ok_or_else(|| LuError::ChangedSinceOffer {
                detail: "sessions or files were added or removed".to_owned(),
            })?;
        let memfd = fdio::sealed_memfd("gmem-lu-delta", &delta.encode()?)?;
        self.channel
            .send(SWITCH, payload, &[memfd.as_fd()], false)?;
        let answer = self
            .channel
            .receive("waiting for the successor to switch", false)?;
        match answer.kind {
            SWITCHED => {}
            ERROR => return Err(decode_error(&answer.body)),
            other => return Err(unexpected(other, "waiting for SWITCHED")),
        }
        // Until this send succeeds the successor must not run; after it the
        // old process must not touch guest memory.
        self.channel.send(COMMIT, &[], &[], false)
    }
}

/// The offer a successor holds before the switch.
#[derive(Debug)]
pub struct Offer {
    /// The sessions as they were at the offer.
    pub record: Record,
    /// The preserved fds, file `i` of the record being fd `i`. The successor
    /// may map them and build its VM ahead of the switch.
    pub fds: Vec<OwnedFd>,
}

/// What the successor has after the switch.
#[derive(Debug)]
pub struct Switched {
    /// The incoming sessions, every file already retrieved: retrieving a
    /// session and its files returns the objects built before SWITCHED.
    pub incoming: Incoming,
    /// The payload the old process sent at the switch.
    pub payload: Vec<u8>,
}

/// The successor's side.
#[derive(Debug)]
pub struct TransferSuccessor {
    channel: Channel,
    offer: Option<Offer>,
}

impl TransferSuccessor {
    /// Connects to the old VMM at `path`.
    ///
    /// # Errors
    /// - `Io` from `connect`;
    /// - `EPERM` ([`LuError::PeerCredentials`]): the listener runs as
    ///   another uid.
    pub fn connect(path: &Path) -> Result<TransferSuccessor, LuError> {
        let channel = Channel::connect(path, TRANSFER_MAGIC)?;
        channel.require_peer_uid(own_uid())?;
        Ok(TransferSuccessor {
            channel,
            offer: None,
        })
    }

    /// Waits for the old process's offer, validates it and accepts it.
    ///
    /// # Errors
    /// - `EPIPE`: the old process went away;
    /// - record and fd errors of the offer (the old process is told).
    pub fn receive_offer(&mut self) -> Result<&Offer, LuError> {
        let message = self.channel.receive("waiting for the offer", false)?;
        match message.kind {
            OFFER => self.accept_offer(message),
            ERROR => Err(decode_error(&message.body)),
            other => Err(unexpected(other, "waiting for OFFER")),
        }
    }

    /// The offer accepted last, if any.
    pub fn offer(&self) -> Option<&Offer> {
        self.offer.as_ref()
    }

    fn accept_offer(&mut self, message: Message) -> Result<&Offer, LuError> {
        match validate_offer(message) {
            Ok(offer) => {
                self.channel.send(READY, &[], &[], false)?;
                Ok(self.offer.insert(offer))
            }
            Err(error) => {
                let _ = self.channel.send(ERROR, &encode_error(&error), &[], false);
                Err(error)
            }
        }
    }

    /// Waits for the switch (accepting newer offers meanwhile), retrieves
    /// every file of the final record, and returns the incoming sessions
    /// once the old process has committed.
    ///
    /// # Errors
    /// - `EPIPE`: the old process went away before COMMIT (do not run);
    /// - [`LuError::Remote`]: it reported an error;
    /// - record and delta errors, and every file's retrieve error
    ///   ([`Incoming::retrieve_all`]): the old process is told before it
    ///   lets go, and carries on.
    pub fn wait_for_switch(mut self, registry: &HandlerRegistry) -> Result<Switched, LuError> {
        loop {
            let message = self.channel.receive("waiting for the switch", false)?;
            match message.kind {
                OFFER => {
                    self.accept_offer(message)?;
                }
                SWITCH => return self.switch(message, registry),
                ERROR => return Err(decode_error(&message.body)),
                other => return Err(unexpected(other, "waiting for SWITCH")),
            }
        }
    }

    fn switch(mut self, message: Message, registry: &HandlerRegistry) -> Result<Switched, LuError> {
        let built = self.build_incoming(message, registry);
        let switched = match built {
            Ok(switched) => switched,
            Err(error) => {
                let _ = self.channel.send(ERROR, &encode_error(&error), &[], false);
                return Err(error);
            }
        };
        self.channel.send(SWITCHED, &[], &[], false)?;
        let commit = self.channel.receive("waiting for the commit", false)?;
        match commit.kind {
            COMMIT => Ok(switched),
            ERROR => Err(decode_error(&commit.body)),
            other => Err(unexpected(other, "waiting for COMMIT")),
        }
    }

    fn build_incoming(
        &mut self,
        message: Message,
        registry: &HandlerRegistry,
    ) -> Result<Switched, LuError> {
        let offer = self.offer.take().ok_or_else(|| LuError::Protocol {
            detail: "a switch without an offer".to_owned(),
        })?;
        if message.body.len() > MAX_SWITCH_PAYLOAD {
            return Err(LuError::Protocol {
                detail: format!("a switch payload of {} bytes", message.body.len()),
            });
        }
        let [delta_fd] =
            <[OwnedFd; 1]>::try_from(message.fds).map_err(|fds| LuError::Protocol {
                detail: format!("a switch with {} fds instead of the delta's one", fds.len()),
            })?;
        let delta = Record::decode(&fdio::read_sealed_memfd(&delta_fd)?)?;
        let mut record = offer.record;
        record.apply_delta(&delta)?;
        let mut incoming = Incoming::from_parts(registry, record, offer.fds)?;
        // Before SWITCHED: a file that cannot be retrieved must fail the
        // switch while the old process still owns the guest.
        incoming.retrieve_all()?;
        Ok(Switched {
            incoming,
            payload: message.body,
        })
    }
}

fn validate_offer(message: Message) -> Result<Offer, LuError> {
    let mut fds = message.fds.into_iter();
    let record_fd = fds.next().ok_or_else(|| LuError::Protocol {
        detail: "an offer without its record".to_owned(),
    })?;
    let record = Record::decode(&fdio::read_sealed_memfd(&record_fd)?)?;
    if record.kind != RecordKind::Full {
        return Err(RecordError::WrongKind { expected: "full" }.into());
    }
    let fds: Vec<OwnedFd> = fds.collect();
    check_fds(&record, &fds)?;
    Ok(Offer { record, fds })
}
