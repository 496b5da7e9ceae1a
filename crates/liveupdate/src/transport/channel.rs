//! Framed messages with fds over `SOCK_SEQPACKET` Unix sockets, shared by
//! the transfer transport and luod.
//!
//! Model: one `sendmsg` is one message (seqpacket keeps boundaries), made of
//! a 16-byte header, a body of at most [`MAX_BODY`] bytes and at most
//! [`MAX_FDS`] fds in one `SCM_RIGHTS` control message. Received fds are
//! close-on-exec (`MSG_CMSG_CLOEXEC`) and owned by the [`Message`], so every
//! error path closes them.
//!
//! Header, little-endian:
//!
//! ```text
//!  0  u32  magic      the protocol's: "LUTX" transfer, "LUOD" luod
//!  4  u16  version    1
//!  6  u16  kind       the protocol's message kind
//!  8  u32  body_len   bytes of body after the header, <= MAX_BODY
//! 12  u32  fd_count   fds attached, <= MAX_FDS
//! ```
//!
//! Checks on receipt, in order: end of file (the peer closed or died) →
//! `EPIPE`; truncated data or control message → `EPROTO`; header length,
//! magic, version → `EPROTO`; body length and fd count as declared →
//! `EPROTO`.

use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustix::io::Errno;
use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags,
    SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketAddrUnix, SocketFlags, SocketType,
    UCred, sockopt,
};

use crate::error::LuError;
use crate::record::wire::{WireReader, WireWriter};

/// Bytes of the message header.
pub const HEADER_LEN: usize = 16;
/// Largest body. Requests and replies are small (names, errors, session
/// lists); records travel in a sealed memfd. 60 KiB keeps a message well
/// inside the default socket buffer (`net.core.wmem_default`, 208 KiB).
pub const MAX_BODY: usize = 60 << 10;
/// Most fds in one message: the kernel's `SCM_MAX_FD`.
pub const MAX_FDS: usize = 253;
/// The header version.
pub const VERSION: u16 = 1;

/// One received message.
#[derive(Debug)]
pub struct Message {
    /// The protocol's message kind.
    pub kind: u16,
    /// The body.
    pub body: Vec<u8>,
    /// The fds that came with it, close-on-exec.
    pub fds: Vec<OwnedFd>,
}

/// A connected seqpacket socket speaking one protocol (one magic).
#[derive(Debug)]
pub struct Channel {
    socket: OwnedFd,
    magic: u32,
}

fn peer_gone_or(operation: &'static str, during: &'static str, errno: Errno) -> LuError {
    match errno {
        Errno::PIPE | Errno::CONNRESET | Errno::NOTCONN => LuError::PeerGone { during },
        Errno::AGAIN => LuError::Timeout { during },
        other => LuError::io(operation, other),
    }
}

/// A new close-on-exec seqpacket socket and the address of `path`, for
/// `connect` or `bind`.
fn seqpacket_socket(path: &Path) -> Result<(OwnedFd, SocketAddrUnix), LuError> {
    let socket = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )
    .map_err(|errno| LuError::io("socket", errno))?;
    let address = SocketAddrUnix::new(path).map_err(|errno| LuError::io("socket path", errno))?;
    Ok((socket, address))
}

impl Channel {
    /// Wraps a connected socket.
    pub fn from_socket(socket: OwnedFd, magic: u32) -> Channel {
        Channel { socket, magic }
    }

    /// Connects to the seqpacket socket at `path`.
    ///
    /// # Errors
    /// `Io` with the errno of `socket` or `connect` (`ENOENT`: no such
    /// socket; `ECONNREFUSED`: nobody listens).
    pub fn connect(path: &Path, magic: u32) -> Result<Channel, LuError> {
        let (socket, address) = seqpacket_socket(path)?;
        rustix::net::connect(&socket, &address).map_err(|errno| LuError::io("connect", errno))?;
        Ok(Channel { socket, magic })
    }

    /// The peer's pid, uid and gid as the kernel recorded them at connect
    /// (`SO_PEERCRED`).
    ///
    /// # Errors
    /// `Io` with the errno of `getsockopt`.
    pub fn peer_credentials(&self) -> Result<UCred, LuError> {
        sockopt::socket_peercred(&self.socket).map_err(|errno| LuError::io("SO_PEERCRED", errno))
    }

    /// Checks that the peer runs as `uid`.
    ///
    /// # Errors
    /// `EPERM` ([`LuError::PeerCredentials`]) otherwise; `Io` if the
    /// credentials cannot be read.
    pub fn require_peer_uid(&self, uid: u32) -> Result<UCred, LuError> {
        let credentials = self.peer_credentials()?;
        if credentials.uid.as_raw() != uid {
            return Err(LuError::PeerCredentials {
                pid: credentials.pid.as_raw_nonzero().get(),
                uid: credentials.uid.as_raw(),
                expected: uid,
            });
        }
        Ok(credentials)
    }

    /// Limits how long [`Channel::receive`] waits; `None` waits forever.
    ///
    /// # Errors
    /// `Io` with the errno of `setsockopt`.
    pub fn set_receive_timeout(&self, timeout: Option<Duration>) -> Result<(), LuError> {
        sockopt::set_socket_timeout(&self.socket, sockopt::Timeout::Recv, timeout)
            .map_err(|errno| LuError::io("SO_RCVTIMEO", errno))
    }

    /// Sends one message; never blocks when `nonblocking`.
    ///
    /// # Errors
    /// - `EMSGSIZE` (`Io`): body or fd list over the bounds;
    /// - `EPIPE` ([`LuError::PeerGone`]): the peer is gone;
    /// - `ETIMEDOUT` ([`LuError::Timeout`]): nonblocking and the peer's
    ///   buffer is full;
    /// - `Io` otherwise.
    pub fn send(
        &self,
        kind: u16,
        body: &[u8],
        fds: &[BorrowedFd<'_>],
        nonblocking: bool,
    ) -> Result<(), LuError> {
        if body.len() > MAX_BODY || fds.len() > MAX_FDS {
            return Err(LuError::io("sending a message", Errno::MSGSIZE));
        }
        let mut header = Vec::with_capacity(HEADER_LEN);
        let mut writer = WireWriter::new(&mut header);
        writer.u32(self.magic);
        writer.u16(VERSION);
        writer.u16(kind);
        writer.u32(body.len() as u32);
        writer.u32(fds.len() as u32);
        let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(fds.len()))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
            return Err(LuError::io("attaching fds", Errno::MSGSIZE));
        }
        let mut flags = SendFlags::NOSIGNAL;
        if nonblocking {
            flags |= SendFlags::DONTWAIT;
        }
        let slices = [IoSlice::new(&header), IoSlice::new(body)];
        let sent = rustix::net::sendmsg(&self.socket, &slices, &mut control, flags)
            .map_err(|errno| peer_gone_or("sendmsg", "sending a message", errno))?;
        if sent != HEADER_LEN + body.len() {
            return Err(LuError::Protocol {
                detail: format!("sent {sent} of {} bytes", HEADER_LEN + body.len()),
            });
        }
        Ok(())
    }

    /// Receives one message; `during` names the step for errors.
    ///
    /// # Errors
    /// - `EPIPE` ([`LuError::PeerGone`]): the peer closed or died;
    /// - `ETIMEDOUT` ([`LuError::Timeout`]): the receive timeout passed, or
    ///   nothing is waiting when `nonblocking`;
    /// - `EPROTO` ([`LuError::Protocol`]): a malformed message (see the
    ///   module documentation); any fds it carried are closed.
    pub fn receive(&self, during: &'static str, nonblocking: bool) -> Result<Message, LuError> {
        let mut buffer = vec![0u8; HEADER_LEN + MAX_BODY];
        let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let mut flags = RecvFlags::CMSG_CLOEXEC;
        if nonblocking {
            flags |= RecvFlags::DONTWAIT;
        }
        let received = {
            let mut slices = [IoSliceMut::new(&mut buffer)];
            let mut result = rustix::net::recvmsg(&self.socket, &mut slices, &mut control, flags);
            if matches!(result, Err(Errno::CONNRESET)) {
                // A peer that closed with our message unread makes the kernel
                // report ECONNRESET once, before the messages it sent last
                // (its reply, its reason for hanging up): read those, and
                // take "nothing there" as the peer being gone.
                result = rustix::net::recvmsg(
                    &self.socket,
                    &mut slices,
                    &mut control,
                    flags | RecvFlags::DONTWAIT,
                )
                .map_err(|errno| {
                    if errno == Errno::AGAIN {
                        Errno::CONNRESET
                    } else {
                        errno
                    }
                });
            }
            result.map_err(|errno| peer_gone_or("recvmsg", during, errno))?
        };
        let mut fds = Vec::new();
        for message in control.drain() {
            if let RecvAncillaryMessage::ScmRights(rights) = message {
                fds.extend(rights);
            }
        }
        if received.bytes == 0 && fds.is_empty() {
            return Err(LuError::PeerGone { during });
        }
        if received
            .flags
            .intersects(ReturnFlags::TRUNC | ReturnFlags::CTRUNC)
        {
            return Err(LuError::Protocol {
                detail: "message or its fds truncated: over the size bounds".to_owned(),
            });
        }
        let bytes = buffer.get(..received.bytes).unwrap_or(&[]);
        self.parse(bytes, fds)
    }

    fn parse(&self, bytes: &[u8], fds: Vec<OwnedFd>) -> Result<Message, LuError> {
        let mut reader = WireReader::new(bytes, 0);
        let malformed = |detail: String| LuError::Protocol { detail };
        let truncated = |_| LuError::Protocol {
            detail: format!("a {}-byte message is shorter than its header", bytes.len()),
        };
        let magic = reader.u32().map_err(truncated)?;
        let version = reader.u16().map_err(truncated)?;
        let kind = reader.u16().map_err(truncated)?;
        let body_len = reader.u32().map_err(truncated)? as usize;
        let fd_count = reader.u32().map_err(truncated)? as usize;
        if magic != self.magic {
            return Err(malformed(format!(
                "magic {magic:#010x}, expected {:#010x}",
                self.magic
            )));
        }
        if version != VERSION {
            return Err(malformed(format!("version {version}, expected {VERSION}")));
        }
        if body_len != reader.remaining() {
            return Err(malformed(format!(
                "the header announces {body_len} body bytes, {} came",
                reader.remaining()
            )));
        }
        if fd_count != fds.len() {
            return Err(malformed(format!(
                "the header announces {fd_count} fds, {} came",
                fds.len()
            )));
        }
        let body = reader.take(body_len).map_err(truncated)?.to_vec();
        Ok(Message { kind, body, fds })
    }

    /// Sends raw bytes as one message, bypassing the framing: for tests of
    /// a peer's handling of malformed input.
    ///
    /// # Errors
    /// As [`Channel::send`].
    pub fn send_raw(&self, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> Result<(), LuError> {
        let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(fds.len()))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
            return Err(LuError::io("attaching fds", Errno::MSGSIZE));
        }
        rustix::net::sendmsg(
            &self.socket,
            &[IoSlice::new(bytes)],
            &mut control,
            SendFlags::NOSIGNAL,
        )
        .map_err(|errno| peer_gone_or("sendmsg", "sending raw bytes", errno))?;
        Ok(())
    }
}

impl AsFd for Channel {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }
}

/// A listening seqpacket socket bound to a path; the path is removed when
/// the listener is dropped.
#[derive(Debug)]
pub struct Listener {
    socket: OwnedFd,
    path: PathBuf,
    magic: u32,
}

impl Listener {
    /// Binds and listens at `path`, replacing a stale socket file there (one
    /// nobody accepts on); `mode` sets the socket file's permissions.
    ///
    /// # Errors
    /// - `EADDRINUSE` (`Io`): a live listener owns the path, or the path is
    ///   not a socket;
    /// - `Io` with the errno of `socket`, `bind`, `chmod` or `listen`.
    pub fn bind(path: &Path, magic: u32, mode: u32) -> Result<Listener, LuError> {
        remove_stale_socket(path, magic)?;
        let (socket, address) = seqpacket_socket(path)?;
        rustix::net::bind(&socket, &address).map_err(|errno| LuError::io("bind", errno))?;
        let listener = Listener {
            socket,
            path: path.to_owned(),
            magic,
        };
        rustix::fs::chmod(path, rustix::fs::Mode::from_raw_mode(mode))
            .map_err(|errno| LuError::io("chmod of the socket", errno))?;
        // The backlog only bounds connections not yet accepted; 16 is plenty
        // for a VMM and a successor or a handful of gmemctl calls.
        rustix::net::listen(&listener.socket, 16).map_err(|errno| LuError::io("listen", errno))?;
        Ok(listener)
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Accepts one connection (blocking unless the socket was made
    /// nonblocking).
    ///
    /// # Errors
    /// `Io` with the errno of `accept4`.
    pub fn accept(&self) -> Result<Channel, LuError> {
        let socket = rustix::net::accept_with(&self.socket, SocketFlags::CLOEXEC)
            .map_err(|errno| LuError::io("accept", errno))?;
        Ok(Channel::from_socket(socket, self.magic))
    }
}

impl AsFd for Listener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.socket.as_fd()
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn remove_stale_socket(path: &Path, magic: u32) -> Result<(), LuError> {
    use std::os::unix::fs::FileTypeExt;
    let Ok(metadata) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !metadata.file_type().is_socket() {
        return Err(LuError::io(
            "binding over a file that is not a socket",
            Errno::ADDRINUSE,
        ));
    }
    match Channel::connect(path, magic) {
        Ok(_) => Err(LuError::io(
            "binding where a listener is live",
            Errno::ADDRINUSE,
        )),
        Err(_) => std::fs::remove_file(path).map_err(|error| {
            LuError::io(
                "removing a stale socket",
                Errno::from_io_error(&error).unwrap_or(Errno::IO),
            )
        }),
    }
}

/// A connected pair, for tests and in-process use.
///
/// # Errors
/// `Io` with the errno of `socketpair`.
pub fn pair(magic: u32) -> Result<(Channel, Channel), LuError> {
    let (left, right) = rustix::net::socketpair(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )
    .map_err(|errno| LuError::io("socketpair", errno))?;
    Ok((
        Channel::from_socket(left, magic),
        Channel::from_socket(right, magic),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAGIC: u32 = u32::from_le_bytes(*b"TEST");

    #[test]
    fn messages_carry_bodies_and_fds() {
        let (left, right) = pair(MAGIC).unwrap();
        let memfd = rustix::fs::memfd_create("carried", rustix::fs::MemfdFlags::empty()).unwrap();
        rustix::io::write(&memfd, b"payload").unwrap();
        left.send(7, b"body", &[memfd.as_fd()], false).unwrap();
        let message = right.receive("test", false).unwrap();
        assert_eq!(message.kind, 7);
        assert_eq!(message.body, b"body");
        assert_eq!(message.fds.len(), 1);
        let flags = rustix::io::fcntl_getfd(&message.fds[0]).unwrap();
        assert!(flags.contains(rustix::io::FdFlags::CLOEXEC));
        let mut back = [0u8; 7];
        rustix::io::pread(&message.fds[0], &mut back, 0).unwrap();
        assert_eq!(&back, b"payload");
    }

    #[test]
    fn malformed_messages_are_eproto_and_eof_is_epipe() {
        let (left, right) = pair(MAGIC).unwrap();
        left.send_raw(b"short", &[]).unwrap();
        assert_eq!(
            right.receive("test", false).unwrap_err().errno(),
            libc::EPROTO
        );
        let mut wrong_magic = Vec::new();
        WireWriter::new(&mut wrong_magic).u32(1);
        wrong_magic.extend_from_slice(&[1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        left.send_raw(&wrong_magic, &[]).unwrap();
        assert_eq!(
            right.receive("test", false).unwrap_err().errno(),
            libc::EPROTO
        );
        // A header announcing an fd that does not come.
        let mut lying = Vec::new();
        let mut writer = WireWriter::new(&mut lying);
        writer.u32(MAGIC);
        writer.u16(VERSION);
        writer.u16(1);
        writer.u32(0);
        writer.u32(1);
        left.send_raw(&lying, &[]).unwrap();
        assert_eq!(
            right.receive("test", false).unwrap_err().errno(),
            libc::EPROTO
        );
        assert_eq!(
            right.receive("test", true).unwrap_err().errno(),
            libc::ETIMEDOUT
        );
        drop(left);
        assert_eq!(
            right.receive("test", false).unwrap_err().errno(),
            libc::EPIPE
        );
    }

    #[test]
    fn a_reply_queued_before_the_peer_hung_up_is_still_read() {
        let (left, right) = pair(MAGIC).unwrap();
        left.send(1, b"request", &[], false).unwrap();
        right.send(2, b"reason", &[], false).unwrap();
        // Closed with the request unread: the kernel reports ECONNRESET
        // first, then the reply.
        drop(right);
        let reply = left.receive("test", false).unwrap();
        assert_eq!((reply.kind, reply.body.as_slice()), (2, &b"reason"[..]));
        assert_eq!(
            left.receive("test", false).unwrap_err().errno(),
            libc::EPIPE
        );
    }

    #[test]
    fn oversized_messages_are_refused_by_the_sender() {
        let (left, _right) = pair(MAGIC).unwrap();
        let big = vec![0u8; MAX_BODY + 1];
        assert_eq!(
            left.send(1, &big, &[], false).unwrap_err().errno(),
            libc::EMSGSIZE
        );
    }
}
