//! Names and identifiers: session names, file tokens, handler compatible
//! strings and file identities.
//!
//! Each is a newtype so that a token is never passed where an fd number or a
//! length is expected. Every constructor validates its input the way upstream
//! LUO does (`include/uapi/linux/liveupdate.h`: a session name is at most
//! `LIVEUPDATE_SESSION_NAME_LENGTH - 1` = 63 bytes, never truncated).

use std::fmt;
use std::os::fd::AsFd;

use rustix::io::Errno;

use crate::error::LuError;

/// Longest session name in bytes. Upstream LUO reserves a 64-byte field with
/// a terminating NUL, so 63 bytes of name; the record keeps the same field.
pub const SESSION_NAME_MAX: usize = 63;

/// Longest compatible string in bytes: the record's 48-byte field minus its
/// terminating NUL, as upstream's `luo_file_ser.compatible[48]`.
pub const COMPATIBLE_MAX: usize = 47;

/// A session name: 1..=63 bytes of UTF-8 without NUL.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SessionName(String);

impl SessionName {
    /// Validates `name`.
    ///
    /// # Errors
    /// - `EINVAL` ([`LuError::InvalidSessionName`]): empty, longer than
    ///   [`SESSION_NAME_MAX`] bytes, or containing a NUL byte. A long name is
    ///   refused, never truncated.
    pub fn new(name: &str) -> Result<SessionName, LuError> {
        let reason = if name.is_empty() {
            Some("is empty")
        } else if name.len() > SESSION_NAME_MAX {
            Some("is longer than 63 bytes")
        } else if name.as_bytes().contains(&0) {
            Some("contains a NUL byte")
        } else {
            None
        };
        match reason {
            Some(reason) => Err(LuError::InvalidSessionName {
                name: name.to_owned(),
                reason,
            }),
            None => Ok(SessionName(name.to_owned())),
        }
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SessionName {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, formatter)
    }
}

impl fmt::Display for SessionName {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(&self.0)
    }
}

/// The caller-chosen identifier of a preserved file inside its session.
/// Every value is valid, 0 included (upstream LUO accepts token 0).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Token(pub u64);

impl fmt::Debug for Token {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "Token({:#x})", self.0)
    }
}

impl fmt::Display for Token {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "{:#x}", self.0)
    }
}

/// A file handler's identity: a compatible string and the version of its
/// serialized data. The registry is keyed by the string; the version is
/// written into the record and must match on retrieval.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Compatible {
    name: String,
    version: u32,
}

impl Compatible {
    /// Validates a compatible string: 1..=47 bytes of printable ASCII
    /// without spaces (`0x21..=0x7e`), so that it prints unambiguously.
    ///
    /// # Errors
    /// - `EINVAL` ([`LuError::InvalidCompatible`]) otherwise.
    pub fn new(name: &str, version: u32) -> Result<Compatible, LuError> {
        let printable = name.bytes().all(|byte| (0x21..=0x7e).contains(&byte));
        if name.is_empty() || name.len() > COMPATIBLE_MAX || !printable {
            return Err(LuError::InvalidCompatible {
                name: name.to_owned(),
            });
        }
        Ok(Compatible {
            name: name.to_owned(),
            version,
        })
    }

    /// A compatible string of a handler built into this crate, whose
    /// validity a unit test pins (so no run-time check is needed).
    pub(crate) fn builtin(name: &'static str, version: u32) -> Compatible {
        Compatible {
            name: name.to_owned(),
            version,
        }
    }

    /// The compatible string.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The version of the handler's serialized data.
    pub fn version(&self) -> u32 {
        self.version
    }
}

impl fmt::Debug for Compatible {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "{}@v{}", self.name, self.version)
    }
}

impl fmt::Display for Compatible {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "{} v{}", self.name, self.version)
    }
}

/// Which kernel file an fd refers to: device and inode number from `fstat`.
/// Two fds with the same identity are the same file (the kernel's inode), so
/// this is the key for "already preserved in any session" (`EBUSY`), and the
/// record carries it so a receiver can check that each fd is the file the
/// record describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FileIdentity {
    /// `st_dev` of the file.
    pub device: u64,
    /// `st_ino` of the file.
    pub inode: u64,
}

impl FileIdentity {
    /// Reads the identity of the file behind `fd`.
    ///
    /// # Errors
    /// - the errno of `fstat` (`EBADF` cannot happen through a borrowed fd).
    pub fn of(fd: impl AsFd) -> Result<FileIdentity, Errno> {
        let status = rustix::fs::fstat(fd)?;
        Ok(FileIdentity {
            device: status.st_dev,
            inode: status.st_ino,
        })
    }
}

impl fmt::Display for FileIdentity {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "dev {:#x} ino {}", self.device, self.inode)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_name_bounds() {
        assert!(SessionName::new("a").is_ok());
        assert!(SessionName::new(&"n".repeat(63)).is_ok());
        for bad in ["", &"n".repeat(64), "a\0b"] {
            let error = SessionName::new(bad).unwrap_err();
            assert_eq!(error.errno(), libc::EINVAL, "{bad:?}");
        }
    }

    #[test]
    fn compatible_bounds() {
        assert!(Compatible::new("memfd", 1).is_ok());
        assert!(Compatible::new(&"c".repeat(47), 1).is_ok());
        for bad in ["", &"c".repeat(48), "has space", "tab\t", "é"] {
            assert_eq!(
                Compatible::new(bad, 1).unwrap_err().errno(),
                libc::EINVAL,
                "{bad:?}"
            );
        }
    }
}
