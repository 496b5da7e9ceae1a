//! The crate's one error type.
//!
//! Every variant names the operation that failed and the input it failed on,
//! and carries the errno the kernel's guest_memfd would return for it, so a
//! caller can `match` on [`GmemError::errno`] exactly as on the kernel's.

use std::ops::Range;

use rustix::io::Errno;

use crate::backend::Backend;
use crate::policy::MemPolicy;
use crate::types::{FallocMode, PageIndex};

/// What went wrong in a guest memory file operation.
#[derive(Debug, thiserror::Error)]
pub enum GmemError {
    /// `create`: the size is zero, not aligned to the backend's folio, or
    /// larger than the largest file size (EINVAL).
    #[error("cannot create a {backend} guest memory file of {size} bytes: {reason}")]
    InvalidSize {
        /// The backend asked for.
        backend: Backend,
        /// The size asked for.
        size: u64,
        /// Which rule the size broke.
        reason: &'static str,
    },

    /// `create`: flags outside MMAP | INIT_SHARED, or not offered by this
    /// KVM (EINVAL).
    #[error("cannot create a {backend} guest memory file with flags {flags:#x}: {reason}")]
    InvalidFlags {
        /// The backend asked for.
        backend: Backend,
        /// The flags asked for.
        flags: u64,
        /// Which bits were wrong and why.
        reason: String,
    },

    /// `create` or `restore`: a system call failed.
    #[error("cannot {operation} for a {backend} guest memory file: {errno}")]
    System {
        /// The backend.
        backend: Backend,
        /// The system call and what it was for.
        operation: &'static str,
        /// The kernel's error.
        errno: Errno,
    },

    /// `fallocate`: the arguments were rejected by validation (EINVAL,
    /// EOPNOTSUPP or EFBIG, as the kernel would).
    #[error("fallocate(mode {mode}, offset {offset}, len {len}) rejected: {reason}")]
    FallocateRejected {
        /// The mode bits given.
        mode: FallocMode,
        /// The offset given.
        offset: i64,
        /// The length given.
        len: i64,
        /// The kernel's errno for this rule.
        errno: Errno,
        /// Which rule the arguments broke.
        reason: &'static str,
    },

    /// `fallocate` or `get_folio`: the file is frozen for a live update, so
    /// nothing may be allocated or punched (EPERM).
    #[error("{operation} refused: the file is frozen (it is being preserved for a live update)")]
    Frozen {
        /// The refused operation and its input.
        operation: String,
    },

    /// `fallocate`: the kernel call itself failed (ENOSPC, ENOMEM, EINTR...).
    #[error("fallocate(mode {mode}, offset {offset}, len {len}) failed in the kernel: {errno}")]
    Fallocate {
        /// The mode bits given.
        mode: FallocMode,
        /// The offset given.
        offset: i64,
        /// The length given.
        len: i64,
        /// The kernel's error.
        errno: Errno,
    },

    /// `get_folio`, `policy_at`: the page is outside the file (EINVAL).
    #[error("{index} is outside the file, which has {pages} pages")]
    IndexOutOfRange {
        /// The index given.
        index: PageIndex,
        /// Pages in the file.
        pages: u64,
    },

    /// `get_folio`: allocating the missing folio failed in the kernel.
    #[error("cannot allocate the folio of {index}: {errno}")]
    Allocate {
        /// The index given.
        index: PageIndex,
        /// The kernel's error (ENOSPC, ENOMEM, EINTR...).
        errno: Errno,
    },

    /// `mapping`: the file cannot be mapped into the host (ENODEV, as the
    /// kernel's mmap of a guest_memfd without GUEST_MEMFD_FLAG_MMAP).
    #[error("the file cannot be mapped: {reason}")]
    NotMappable {
        /// Why not.
        reason: &'static str,
    },

    /// `mapping`: the mmap call failed.
    #[error("mmap of the file ({len} bytes) failed: {errno}")]
    Map {
        /// Bytes asked for.
        len: u64,
        /// The kernel's error.
        errno: Errno,
    },

    /// `Mapping::read` / `Mapping::write`: the byte range leaves the file
    /// (EFAULT).
    #[error("bytes {offset}..{offset}+{len} are outside the file of {size} bytes")]
    OutOfBounds {
        /// First byte asked for.
        offset: u64,
        /// Bytes asked for.
        len: u64,
        /// The file size.
        size: u64,
    },

    /// `set_policy`: the policy or range is invalid (EINVAL), e.g. a node
    /// that does not exist on this machine.
    #[error("cannot apply {policy:?} to pages {}..{}: {reason}", range.start.0, range.end.0)]
    PolicyRejected {
        /// The policy given.
        policy: MemPolicy,
        /// The page range given.
        range: Range<PageIndex>,
        /// Which rule it broke.
        reason: String,
    },

    /// `set_policy` / `policy_at`: mbind or get_mempolicy failed.
    #[error("{operation} failed: {errno}")]
    Policy {
        /// The system call and its input.
        operation: String,
        /// The kernel's error.
        errno: Errno,
    },

    /// `restore`: the fd or the saved state does not describe a valid file.
    #[error("cannot restore the guest memory file: {reason}")]
    Restore {
        /// What did not match.
        reason: String,
        /// EINVAL for bad saved state, EBADF for a wrong kind of fd.
        errno: Errno,
    },
}

impl GmemError {
    /// The errno the kernel would return for this error.
    pub fn errno(&self) -> i32 {
        self.error_code().raw_os_error()
    }

    /// The errno as rustix's type.
    pub fn error_code(&self) -> Errno {
        match self {
            GmemError::InvalidSize { .. }
            | GmemError::InvalidFlags { .. }
            | GmemError::IndexOutOfRange { .. }
            | GmemError::PolicyRejected { .. } => Errno::INVAL,
            GmemError::System { errno, .. }
            | GmemError::FallocateRejected { errno, .. }
            | GmemError::Fallocate { errno, .. }
            | GmemError::Allocate { errno, .. }
            | GmemError::Map { errno, .. }
            | GmemError::Policy { errno, .. }
            | GmemError::Restore { errno, .. } => *errno,
            GmemError::Frozen { .. } => Errno::PERM,
            GmemError::NotMappable { .. } => Errno::NODEV,
            GmemError::OutOfBounds { .. } => Errno::FAULT,
        }
    }

    /// Whether this is the freeze's EPERM (the caller should park or exit
    /// to its VMM logic, not fail).
    pub fn is_frozen(&self) -> bool {
        matches!(self, GmemError::Frozen { .. })
    }
}
