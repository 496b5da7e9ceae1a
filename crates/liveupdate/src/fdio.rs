//! Small fd operations the orchestrator and transports share: duplicating an
//! fd number (the `fget` of upstream's preserve ioctl), close-on-exec
//! control, and sealed memfds that carry a record.
//!
//! Every fd this crate creates is close-on-exec; only the exec transport
//! clears the flag, on exactly the fds it hands over, just before `execve`.

use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use rustix::fs::{MemfdFlags, SealFlags};
use rustix::io::{Errno, FdFlags};

use crate::error::LuError;
use crate::record::{MAX_RECORD_LEN, RecordError};

/// The seals a record memfd must carry so that its sender cannot change it
/// after the receiver has validated it.
pub const RECORD_SEALS: SealFlags = SealFlags::WRITE
    .union(SealFlags::GROW)
    .union(SealFlags::SHRINK)
    .union(SealFlags::SEAL);

/// Duplicates fd number `fd` as a new close-on-exec descriptor we own.
///
/// This is how a preserve request names its file (upstream's ioctl takes an
/// fd number and `fget`s it). Taking a number rather than a `BorrowedFd`
/// lets a caller pass a closed or never-opened number and get `EBADF`, as
/// the kernel interface does.
///
/// # Errors
/// - `EBADF`: `fd` is not open; `EMFILE`: no fd left; `EINVAL`: negative.
pub fn duplicate_fd_number(fd: RawFd) -> Result<OwnedFd, Errno> {
    // SAFETY: fcntl(F_DUPFD_CLOEXEC) reads no memory of ours; on any integer
    // it either fails (EBADF for a number that is not open) or creates a new
    // descriptor. It never closes or changes the descriptor `fd` names, so it
    // cannot disturb whoever owns that descriptor.
    let duplicate = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if duplicate < 0 {
        return Err(Errno::from_raw_os_error(
            std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EBADF),
        ));
    }
    // SAFETY: fcntl just created `duplicate`; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(duplicate) })
}

/// Sets or clears close-on-exec on `fd`.
///
/// # Errors
/// The errno of `fcntl`.
pub fn set_close_on_exec(fd: BorrowedFd<'_>, close_on_exec: bool) -> Result<(), Errno> {
    let flags = if close_on_exec {
        FdFlags::CLOEXEC
    } else {
        FdFlags::empty()
    };
    rustix::io::fcntl_setfd(fd, flags)
}

/// Writes `bytes` into a new close-on-exec memfd and seals it against every
/// change ([`RECORD_SEALS`]); the file position is left at 0.
///
/// # Errors
/// `Io` with the errno of `memfd_create`, `write` or `fcntl`.
pub fn sealed_memfd(name: &str, bytes: &[u8]) -> Result<OwnedFd, LuError> {
    let memfd = rustix::fs::memfd_create(name, MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)
        .map_err(|errno| LuError::io("memfd_create for the record", errno))?;
    let mut written = 0;
    while written < bytes.len() {
        let rest = bytes.get(written..).unwrap_or(&[]);
        let count = rustix::io::write(&memfd, rest)
            .map_err(|errno| LuError::io("writing the record memfd", errno))?;
        if count == 0 {
            return Err(LuError::io("writing the record memfd", Errno::IO));
        }
        written += count;
    }
    rustix::fs::fcntl_add_seals(&memfd, RECORD_SEALS)
        .map_err(|errno| LuError::io("sealing the record memfd", errno))?;
    rustix::fs::seek(&memfd, rustix::fs::SeekFrom::Start(0))
        .map_err(|errno| LuError::io("rewinding the record memfd", errno))?;
    Ok(memfd)
}

/// Reads the whole content of a record memfd after checking that it is
/// sealed against change and no longer than [`MAX_RECORD_LEN`].
///
/// # Errors
/// - `EPROTO` ([`LuError::Protocol`]): the fd is not a memfd sealed
///   against writes, growing and shrinking;
/// - `EFBIG` ([`RecordError::TooLong`]): longer than the bound;
/// - `Io`: `fstat` or `pread` failed.
pub fn read_sealed_memfd(fd: impl AsFd) -> Result<Vec<u8>, LuError> {
    let fd = fd.as_fd();
    let required = SealFlags::WRITE | SealFlags::GROW | SealFlags::SHRINK;
    let seals = rustix::fs::fcntl_get_seals(fd).map_err(|_| LuError::Protocol {
        detail: "the record fd is not a memfd".to_owned(),
    })?;
    if !seals.contains(required) {
        return Err(LuError::Protocol {
            detail: format!("the record memfd is not sealed against writes ({seals:?})"),
        });
    }
    let size = rustix::fs::fstat(fd)
        .map_err(|errno| LuError::io("fstat of the record memfd", errno))?
        .st_size as u64;
    if size > MAX_RECORD_LEN as u64 {
        return Err(RecordError::TooLong {
            length: size,
            max: MAX_RECORD_LEN,
        }
        .into());
    }
    let mut bytes = vec![0u8; size as usize];
    let mut done = 0usize;
    while done < bytes.len() {
        let rest = bytes.get_mut(done..).unwrap_or(&mut []);
        let count = rustix::io::pread(fd, rest, done as u64)
            .map_err(|errno| LuError::io("reading the record memfd", errno))?;
        if count == 0 {
            return Err(LuError::io("reading the record memfd", Errno::IO));
        }
        done += count;
    }
    Ok(bytes)
}

/// Whether `fd` is a shmem or hugetlbfs regular file with no name left in
/// any directory: a memfd (upstream memfd_luo: `shmem_file && !i_nlink`).
pub fn is_unlinked_shmem(fd: BorrowedFd<'_>) -> bool {
    let Ok(statfs) = rustix::fs::fstatfs(fd) else {
        return false;
    };
    let filesystem = statfs.f_type;
    let shmem = filesystem == libc::TMPFS_MAGIC || filesystem == libc::HUGETLBFS_MAGIC;
    let Ok(status) = rustix::fs::fstat(fd) else {
        return false;
    };
    let regular = status.st_mode & libc::S_IFMT == libc::S_IFREG;
    shmem && regular && status.st_nlink == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_closed_number_is_ebadf() {
        let error = duplicate_fd_number(1 << 20).unwrap_err();
        assert_eq!(error, Errno::BADF);
        assert_eq!(duplicate_fd_number(-1).unwrap_err(), Errno::BADF);
    }

    #[test]
    fn duplicates_are_close_on_exec() {
        let memfd = rustix::fs::memfd_create("dup", MemfdFlags::empty()).unwrap();
        use std::os::fd::AsRawFd;
        let duplicate = duplicate_fd_number(memfd.as_raw_fd()).unwrap();
        assert!(
            rustix::io::fcntl_getfd(&duplicate)
                .unwrap()
                .contains(FdFlags::CLOEXEC)
        );
    }

    #[test]
    fn sealed_memfd_round_trip_and_unsealed_refusal() {
        let memfd = sealed_memfd("record", b"hello record").unwrap();
        assert_eq!(read_sealed_memfd(&memfd).unwrap(), b"hello record");
        assert!(
            rustix::io::write(&memfd, b"x").is_err(),
            "sealed against writes"
        );
        let open = rustix::fs::memfd_create("open", MemfdFlags::ALLOW_SEALING).unwrap();
        assert_eq!(read_sealed_memfd(&open).unwrap_err().errno(), libc::EPROTO);
    }

    #[test]
    fn memfds_are_unlinked_shmem_and_pipes_are_not() {
        let memfd = rustix::fs::memfd_create("m", MemfdFlags::empty()).unwrap();
        assert!(is_unlinked_shmem(memfd.as_fd()));
        let (reader, _writer) = rustix::pipe::pipe().unwrap();
        assert!(!is_unlinked_shmem(reader.as_fd()));
    }
}
