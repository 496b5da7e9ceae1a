//! How sessions reach the successor.
//!
//! - [`exec`]: exec in place; fds survive `execve`, the record travels in a
//!   sealed memfd named in the environment.
//! - [`transfer`]: a successor started ahead connects to the running VMM's
//!   Unix socket and receives everything before the switch.
//! - the `luod` daemon ([`crate::luod`]) holds sessions between a VMM and
//!   its successor.
//!
//! [`channel`] frames messages with fds over seqpacket sockets for the last
//! two. Every peer is checked with `SO_PEERCRED`.

pub mod channel;
pub mod exec;
pub mod transfer;

use crate::error::LuError;
use crate::record::wire::{WireReader, WireWriter};

/// Longest error message sent to a peer; longer ones are cut (at a
/// character boundary) so an error reply always fits a message.
pub const MAX_ERROR_MESSAGE: usize = 1024;

/// Encodes an error reply body: errno (i32) then UTF-8 text.
pub fn encode_error(error: &LuError) -> Vec<u8> {
    encode_error_parts(error.errno(), &error.to_string())
}

/// Encodes an error reply body from its parts.
pub fn encode_error_parts(errno: i32, message: &str) -> Vec<u8> {
    let mut message = message.to_owned();
    if message.len() > MAX_ERROR_MESSAGE {
        let mut cut = MAX_ERROR_MESSAGE;
        while !message.is_char_boundary(cut) {
            cut -= 1;
        }
        message.truncate(cut);
    }
    let mut body = Vec::with_capacity(4 + message.len());
    let mut writer = WireWriter::new(&mut body);
    writer.u32(errno as u32);
    writer.bytes(message.as_bytes());
    body
}

/// Decodes an error reply body into [`LuError::Remote`].
pub fn decode_error(body: &[u8]) -> LuError {
    let mut reader = WireReader::new(body, 0);
    match reader.u32() {
        Ok(errno) => LuError::Remote {
            errno: errno as i32,
            message: String::from_utf8_lossy(reader.take(reader.remaining()).unwrap_or(&[]))
                .into_owned(),
        },
        Err(_) => LuError::Protocol {
            detail: "an error reply shorter than its errno".to_owned(),
        },
    }
}

/// The effective uid of this process: the uid a peer must have.
pub fn own_uid() -> u32 {
    rustix::process::geteuid().as_raw()
}
