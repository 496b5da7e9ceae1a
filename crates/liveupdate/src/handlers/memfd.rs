//! The memfd handler: carries a memfd (a VMM's own serialized state, or any
//! shmem/hugetlbfs memfd) across a handover with its contents, exact size,
//! file position and seals (upstream `mm/memfd_luo.c`).
//!
//! Zero copy: the contents stay in the memfd, whose fd travels; the record
//! holds only size, position and seals, and `retrieve` checks that the fd it
//! received matches them and restores the position.
//!
//! While preserved, the size is fixed: [`set_len`] and [`fallocate`] (this
//! crate's API for changing a memfd) return `EPERM`. In-size writes and
//! mmap I/O go on, as upstream allows. The limit of doing this in userspace:
//! upstream freezes the shmem inode in the kernel so that even a raw
//! `ftruncate` fails; userspace can only seal, and seals are permanent, so a
//! sealed size could never change again after an aborted handover. A raw
//! `ftruncate` behind our back is therefore caught only at the handover:
//! `freeze` compares the size with the one preserved and fails with `EBUSY`,
//! which aborts the handover rather than handing over a file that changed.
//!
//! Handler data, version 1, 32 bytes, little-endian:
//!
//! ```text
//!  0  u64  size       file size in bytes (at most i64::MAX)
//!  8  u64  position   file position (at most i64::MAX)
//! 16  u32  seals      F_SEAL_* bits; only SEAL, SHRINK, GROW, WRITE,
//!                     FUTURE_WRITE and EXEC are known (others: EOPNOTSUPP)
//! 20  u32  flags      0 (other values: EOPNOTSUPP)
//! 24  u64  reserved   0
//! ```

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use rustix::fs::{FallocateFlags, SeekFrom};
use rustix::io::Errno;

use crate::fdio;
use crate::handler::{FileHandler, HandlerError, PreservedState, RetrievedObject};
use crate::names::{Compatible, FileIdentity};
use crate::preserved;
use crate::record::blob::BlobError;
use crate::record::wire::{WireReader, WireWriter};

/// The handler's compatible string.
pub const MEMFD_COMPATIBLE: &str = "memfd";
/// The version of its data.
pub const MEMFD_DATA_VERSION: u32 = 1;
/// Bytes of its data.
pub const MEMFD_DATA_LEN: usize = 32;

/// The seals this version preserves (upstream's `MEMFD_LUO_ALL_SEALS`).
pub const KNOWN_SEALS: u32 = (libc::F_SEAL_SEAL
    | libc::F_SEAL_SHRINK
    | libc::F_SEAL_GROW
    | libc::F_SEAL_WRITE
    | libc::F_SEAL_FUTURE_WRITE
    | libc::F_SEAL_EXEC) as u32;

/// Why the memfd handler, or a size change of a preserved memfd, failed.
#[derive(Debug, thiserror::Error)]
pub enum MemfdError {
    /// The fd that arrived is not a memfd (`EINVAL`).
    #[error("the fd is not a memfd (EINVAL)")]
    NotMemfd,
    /// The memfd carries seals this version cannot preserve (`EOPNOTSUPP`).
    #[error(
        "seals {seals:#x} include bits this version cannot preserve (known: {KNOWN_SEALS:#x}) (EOPNOTSUPP)"
    )]
    UnknownSeals {
        /// The memfd's seals.
        seals: u32,
    },
    /// The memfd is preserved: its size cannot change (`EPERM`).
    #[error("the memfd ({identity}) is preserved for a live update: its size is fixed (EPERM)")]
    Preserved {
        /// The file.
        identity: FileIdentity,
    },
    /// The size changed behind the handler's back since `preserve` (`EBUSY`).
    #[error("the memfd's size changed from {preserved} to {now} bytes while preserved (EBUSY)")]
    SizeChanged {
        /// Size at preserve.
        preserved: u64,
        /// Size at freeze.
        now: u64,
    },
    /// The fd that arrived does not match the record (`EINVAL`).
    #[error("the memfd's {field} is {actual:#x}, the record says {record:#x} (EINVAL)")]
    Mismatch {
        /// Which property.
        field: &'static str,
        /// Value in the record.
        record: u64,
        /// Value of the fd.
        actual: u64,
    },
    /// The handler data is malformed.
    #[error("bad memfd handler data: {0}")]
    Data(#[from] BlobError),
    /// A system call failed.
    #[error("{operation} failed: {errno}")]
    System {
        /// The call.
        operation: &'static str,
        /// Its errno.
        errno: Errno,
    },
}

impl MemfdError {
    /// The errno for this failure.
    pub fn errno(&self) -> i32 {
        match self {
            MemfdError::NotMemfd | MemfdError::Mismatch { .. } => libc::EINVAL,
            MemfdError::UnknownSeals { .. } => libc::EOPNOTSUPP,
            MemfdError::Preserved { .. } => libc::EPERM,
            MemfdError::SizeChanged { .. } => libc::EBUSY,
            MemfdError::Data(error) => error.errno(),
            MemfdError::System { errno, .. } => errno.raw_os_error(),
        }
    }

    fn system(operation: &'static str) -> impl FnOnce(Errno) -> MemfdError {
        move |errno| MemfdError::System { operation, errno }
    }
}

impl From<MemfdError> for HandlerError {
    fn from(error: MemfdError) -> HandlerError {
        HandlerError::new(error.errno(), error.to_string())
    }
}

/// The memfd handler's data for one file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemfdData {
    /// File size in bytes.
    pub size: u64,
    /// File position.
    pub position: u64,
    /// `F_SEAL_*` bits.
    pub seals: u32,
}

impl MemfdData {
    /// Encodes the 32-byte layout.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(MEMFD_DATA_LEN);
        let mut writer = WireWriter::new(&mut out);
        writer.u64(self.size);
        writer.u64(self.position);
        writer.u32(self.seals);
        writer.u32(0);
        writer.u64(0);
        out
    }

    /// Decodes and validates the 32-byte layout.
    ///
    /// # Errors
    /// - `EINVAL`: wrong length, reserved bytes set, size or position past
    ///   `i64::MAX`;
    /// - `EOPNOTSUPP`: unknown seal or flag bits.
    pub fn decode(bytes: &[u8]) -> Result<MemfdData, BlobError> {
        if bytes.len() != MEMFD_DATA_LEN {
            return Err(BlobError::WrongLength {
                expected: MEMFD_DATA_LEN as u64,
                found: bytes.len(),
            });
        }
        let mut reader = WireReader::new(bytes, 0);
        let data = MemfdData {
            size: reader.u64()?,
            position: reader.u64()?,
            seals: reader.u32()?,
        };
        let flags = reader.u32()?;
        let reserved = reader.u64()?;
        for (field, value) in [("size", data.size), ("position", data.position)] {
            if value > i64::MAX as u64 {
                return Err(BlobError::Invalid {
                    field,
                    value,
                    reason: "larger than a file offset can be",
                });
            }
        }
        if data.seals & !KNOWN_SEALS != 0 {
            return Err(BlobError::Unsupported {
                field: "seals",
                value: data.seals.into(),
            });
        }
        if flags != 0 {
            return Err(BlobError::Unsupported {
                field: "flags",
                value: flags.into(),
            });
        }
        if reserved != 0 {
            return Err(BlobError::ReservedNotZero { field: "reserved" });
        }
        Ok(data)
    }
}

/// Checks that `seals` has only bits this version preserves.
///
/// # Errors
/// - `EOPNOTSUPP` ([`MemfdError::UnknownSeals`]).
pub fn check_seals(seals: u32) -> Result<(), MemfdError> {
    if seals & !KNOWN_SEALS != 0 {
        return Err(MemfdError::UnknownSeals { seals });
    }
    Ok(())
}

fn read_seals(fd: BorrowedFd<'_>) -> Result<u32, MemfdError> {
    let seals = rustix::fs::fcntl_get_seals(fd).map_err(MemfdError::system("F_GET_SEALS"))?;
    Ok(seals.bits())
}

fn read_size(fd: BorrowedFd<'_>) -> Result<u64, MemfdError> {
    let status = rustix::fs::fstat(fd).map_err(MemfdError::system("fstat"))?;
    Ok(status.st_size as u64)
}

/// Changes the size of a memfd unless it is preserved.
///
/// # Errors
/// - `EPERM` ([`MemfdError::Preserved`]): the memfd is preserved;
/// - the errno of `fstat` or `ftruncate`.
pub fn set_len(fd: impl AsFd, length: u64) -> Result<(), MemfdError> {
    let fd = fd.as_fd();
    let identity = FileIdentity::of(fd).map_err(MemfdError::system("fstat"))?;
    // Holding the set's lock across the call keeps a concurrent preserve
    // from slipping in between the check and the change.
    let preserved_files = preserved::lock();
    if preserved_files.contains(&identity) {
        return Err(MemfdError::Preserved { identity });
    }
    rustix::fs::ftruncate(fd, length).map_err(MemfdError::system("ftruncate"))
}

/// `fallocate` on a memfd unless it is preserved.
///
/// # Errors
/// - `EPERM` ([`MemfdError::Preserved`]): the memfd is preserved;
/// - the errno of `fstat` or `fallocate`.
pub fn fallocate(
    fd: impl AsFd,
    mode: FallocateFlags,
    offset: u64,
    length: u64,
) -> Result<(), MemfdError> {
    let fd = fd.as_fd();
    let identity = FileIdentity::of(fd).map_err(MemfdError::system("fstat"))?;
    let preserved_files = preserved::lock();
    if preserved_files.contains(&identity) {
        return Err(MemfdError::Preserved { identity });
    }
    rustix::fs::fallocate(fd, mode, offset, length).map_err(MemfdError::system("fallocate"))
}

/// The memfd handler.
#[derive(Debug)]
pub struct MemfdHandler {
    compatible: Compatible,
}

impl Default for MemfdHandler {
    fn default() -> MemfdHandler {
        MemfdHandler::new()
    }
}

impl MemfdHandler {
    /// The handler.
    pub fn new() -> MemfdHandler {
        MemfdHandler {
            compatible: Compatible::builtin(MEMFD_COMPATIBLE, MEMFD_DATA_VERSION),
        }
    }
}

/// What `preserve` remembers: the size that must not change.
struct MemfdPreserved {
    size: u64,
}

impl FileHandler for MemfdHandler {
    fn compatible(&self) -> &Compatible {
        &self.compatible
    }

    fn can_preserve(&self, file: BorrowedFd<'_>) -> bool {
        fdio::is_unlinked_shmem(file)
    }

    fn preserve(&self, file: BorrowedFd<'_>) -> Result<PreservedState, HandlerError> {
        check_seals(read_seals(file)?)?;
        Ok(Box::new(MemfdPreserved {
            size: read_size(file)?,
        }))
    }

    fn unpreserve(&self, _file: BorrowedFd<'_>, _state: PreservedState) {}

    fn freeze(
        &self,
        file: BorrowedFd<'_>,
        state: &mut PreservedState,
    ) -> Result<Vec<u8>, HandlerError> {
        let preserved_size = state
            .downcast_ref::<MemfdPreserved>()
            .map(|preserved| preserved.size)
            .ok_or_else(|| {
                HandlerError::new(libc::EINVAL, "memfd handler given a foreign state")
            })?;
        let size = read_size(file)?;
        if size != preserved_size {
            return Err(MemfdError::SizeChanged {
                preserved: preserved_size,
                now: size,
            }
            .into());
        }
        let seals = read_seals(file)?;
        check_seals(seals)?;
        // The position may have moved since preserve; upstream's freeze
        // records it at this point too.
        let position = rustix::fs::tell(file).map_err(MemfdError::system("lseek"))?;
        Ok(MemfdData {
            size,
            position,
            seals,
        }
        .encode())
    }

    fn unfreeze(&self, _file: BorrowedFd<'_>, _state: &mut PreservedState) {}

    fn retrieve(
        &self,
        file: OwnedFd,
        data: &[u8],
    ) -> Result<Arc<dyn RetrievedObject>, HandlerError> {
        let data = MemfdData::decode(data).map_err(MemfdError::from)?;
        if !fdio::is_unlinked_shmem(file.as_fd()) {
            return Err(MemfdError::NotMemfd.into());
        }
        let size = read_size(file.as_fd())?;
        if size != data.size {
            return Err(MemfdError::Mismatch {
                field: "size",
                record: data.size,
                actual: size,
            }
            .into());
        }
        let seals = read_seals(file.as_fd())?;
        if seals != data.seals {
            return Err(MemfdError::Mismatch {
                field: "seals",
                record: data.seals.into(),
                actual: seals.into(),
            }
            .into());
        }
        rustix::fs::seek(&file, SeekFrom::Start(data.position))
            .map_err(MemfdError::system("lseek"))?;
        Ok(Arc::new(MemfdFile { fd: file, data }))
    }

    fn can_finish(&self, _retrieved: Option<&Arc<dyn RetrievedObject>>, _data: &[u8]) -> bool {
        true
    }

    fn finish(&self, _retrieved: Option<&Arc<dyn RetrievedObject>>, _data: &[u8]) {}
}

/// A retrieved memfd.
#[derive(Debug)]
pub struct MemfdFile {
    fd: OwnedFd,
    data: MemfdData,
}

impl MemfdFile {
    /// Its size as preserved.
    pub fn size(&self) -> u64 {
        self.data.size
    }

    /// Its file position at the handover.
    pub fn position(&self) -> u64 {
        self.data.position
    }

    /// Its seals.
    pub fn seals(&self) -> u32 {
        self.data.seals
    }

    /// A new close-on-exec fd for the memfd.
    ///
    /// # Errors
    /// The errno of `fcntl(F_DUPFD_CLOEXEC)`.
    pub fn try_clone_fd(&self) -> Result<OwnedFd, Errno> {
        rustix::io::fcntl_dupfd_cloexec(&self.fd, 0)
    }
}

impl AsFd for MemfdFile {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl RetrievedObject for MemfdFile {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::fs::MemfdFlags;

    #[test]
    fn compatible_is_valid() {
        let checked = Compatible::new(MEMFD_COMPATIBLE, MEMFD_DATA_VERSION).unwrap();
        assert_eq!(&checked, MemfdHandler::new().compatible());
        assert_eq!(MemfdHandler::new().compatible().name(), "memfd");
    }

    #[test]
    fn data_round_trip_and_refusals() {
        let data = MemfdData {
            size: 12345,
            position: 77,
            seals: (libc::F_SEAL_GROW | libc::F_SEAL_SEAL) as u32,
        };
        let bytes = data.encode();
        assert_eq!(bytes.len(), MEMFD_DATA_LEN);
        assert_eq!(MemfdData::decode(&bytes), Ok(data));
        assert!(matches!(
            MemfdData::decode(&bytes[..31]),
            Err(BlobError::WrongLength { .. })
        ));
        let mut unknown_seal = bytes.clone();
        unknown_seal[16] = 0x40;
        assert_eq!(
            MemfdData::decode(&unknown_seal).unwrap_err().errno(),
            libc::EOPNOTSUPP
        );
        let mut flags = bytes.clone();
        flags[20] = 1;
        assert_eq!(
            MemfdData::decode(&flags).unwrap_err().errno(),
            libc::EOPNOTSUPP
        );
        let mut reserved = bytes.clone();
        reserved[31] = 1;
        assert_eq!(
            MemfdData::decode(&reserved).unwrap_err().errno(),
            libc::EINVAL
        );
        let mut huge = bytes;
        huge[7] = 0x80;
        assert_eq!(MemfdData::decode(&huge).unwrap_err().errno(), libc::EINVAL);
    }

    #[test]
    fn unknown_seal_bits_are_eopnotsupp() {
        assert!(check_seals(KNOWN_SEALS).is_ok());
        assert_eq!(check_seals(0x40).unwrap_err().errno(), libc::EOPNOTSUPP);
        assert_eq!(
            check_seals(0x8000_0000).unwrap_err().errno(),
            libc::EOPNOTSUPP
        );
    }

    #[test]
    fn freeze_refuses_a_size_changed_behind_our_back() {
        let handler = MemfdHandler::new();
        let memfd = rustix::fs::memfd_create("size", MemfdFlags::empty()).unwrap();
        rustix::fs::ftruncate(&memfd, 4096).unwrap();
        let mut state = handler.preserve(memfd.as_fd()).unwrap();
        rustix::fs::ftruncate(&memfd, 8192).unwrap();
        let error = handler.freeze(memfd.as_fd(), &mut state).unwrap_err();
        assert_eq!(error.errno(), libc::EBUSY);
    }

    #[test]
    fn retrieve_checks_size_and_seals_and_restores_position() {
        let handler = MemfdHandler::new();
        let memfd = rustix::fs::memfd_create("r", MemfdFlags::ALLOW_SEALING).unwrap();
        rustix::fs::ftruncate(&memfd, 8192).unwrap();
        rustix::fs::fcntl_add_seals(&memfd, rustix::fs::SealFlags::GROW).unwrap();
        let good = MemfdData {
            size: 8192,
            position: 100,
            seals: libc::F_SEAL_GROW as u32,
        };
        let clone = || rustix::io::fcntl_dupfd_cloexec(&memfd, 0).unwrap();
        let object = handler.retrieve(clone(), &good.encode()).unwrap();
        assert_eq!(rustix::fs::tell(object.as_fd()).unwrap(), 100);
        let wrong_size = MemfdData { size: 4096, ..good };
        assert_eq!(
            handler
                .retrieve(clone(), &wrong_size.encode())
                .unwrap_err()
                .errno(),
            libc::EINVAL
        );
        let wrong_seals = MemfdData { seals: 0, ..good };
        assert_eq!(
            handler
                .retrieve(clone(), &wrong_seals.encode())
                .unwrap_err()
                .errno(),
            libc::EINVAL
        );
        let (pipe, _writer) = rustix::pipe::pipe().unwrap();
        assert_eq!(
            handler.retrieve(pipe, &good.encode()).unwrap_err().errno(),
            libc::EINVAL
        );
    }
}
