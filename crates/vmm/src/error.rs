//! The crate's error type.
//!
//! One variant per failing operation. Variants that wrap a kernel call carry
//! the operation's name and the errno the kernel returned, so a caller can
//! match on [`VmmError::errno`] as it would on the ioctl's return value; the
//! Display text is what a user reads.

use crate::state::StateFormatError;

/// Everything that can fail in the monitor.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// `/dev/kvm` could not be opened (ENOENT where there is no KVM, EACCES
    /// without permission).
    #[error("cannot open /dev/kvm: {}", errno_text(*.errno))]
    KvmUnavailable {
        /// The errno of the failed open.
        errno: i32,
    },
    /// A KVM ioctl failed.
    #[error("{operation} failed: {}", errno_text(*.errno))]
    Kvm {
        /// The ioctl, as the kernel names it (for example `KVM_SET_SREGS`).
        operation: &'static str,
        /// The errno it returned.
        errno: i32,
    },
    /// A KVM ioctl on one vCPU failed.
    #[error("{operation} on vCPU {vcpu} failed: {}", errno_text(*.errno))]
    VcpuIoctl {
        /// The ioctl, as the kernel names it.
        operation: &'static str,
        /// The vCPU's index.
        vcpu: u32,
        /// The errno it returned.
        errno: i32,
    },
    /// KVM lacks a capability the monitor needs.
    #[error("KVM lacks {capability}, which {needed_for} needs")]
    MissingCapability {
        /// The capability's name.
        capability: &'static str,
        /// What needs it.
        needed_for: &'static str,
    },
    /// A system call on the guest memory file failed.
    #[error("{operation} on the guest memory file failed: {}", errno_text(*.errno))]
    MemoryFile {
        /// The system call.
        operation: &'static str,
        /// The errno it returned.
        errno: i32,
    },
    /// The guest memory size is unusable (zero, not page-aligned, too small
    /// for the guest's layout, or too large for the page tables).
    #[error("guest memory size {size} bytes is invalid: {reason}")]
    InvalidMemorySize {
        /// The size asked for.
        size: u64,
        /// Why it is refused.
        reason: &'static str,
    },
    /// The vCPU count is unusable.
    #[error("{requested} vCPUs is invalid: between 1 and {maximum} are supported")]
    InvalidVcpuCount {
        /// The count asked for.
        requested: u32,
        /// The largest supported count.
        maximum: u32,
    },
    /// rust-vmm's vm-memory refused the mapping or an access.
    #[error("guest memory access at {address:#x} failed: {reason}")]
    GuestMemory {
        /// The guest-physical address.
        address: u64,
        /// vm-memory's description of the failure.
        reason: String,
    },
    /// A vCPU thread could not be started.
    #[error("cannot start the thread of vCPU {vcpu}: {}", errno_text(*.errno))]
    ThreadSpawn {
        /// The vCPU's index.
        vcpu: u32,
        /// The errno of the failed clone.
        errno: i32,
    },
    /// A vCPU thread panicked (a bug in the monitor).
    #[error("the thread of vCPU {vcpu} panicked")]
    ThreadPanicked {
        /// The vCPU's index.
        vcpu: u32,
    },
    /// The guest stopped in a way it never should (triple fault, failed entry,
    /// emulation failure, an unexpected exit).
    #[error("vCPU {vcpu} failed: {exit} (rip {rip:#x})")]
    GuestFailed {
        /// The vCPU's index.
        vcpu: u32,
        /// The exit KVM reported.
        exit: String,
        /// The guest's instruction pointer at the exit, where it could be read.
        rip: u64,
    },
    /// vCPUs did not stop within the time allowed (a vCPU blocked in a
    /// userfaultfd fault ignores signals until the fault is served).
    #[error("vCPUs {vcpus:?} did not stop within {waited_ms} ms")]
    StopTimeout {
        /// The vCPUs still running.
        vcpus: Vec<u32>,
        /// How long the caller waited.
        waited_ms: u64,
    },
    /// Saved state is malformed or does not fit this machine.
    #[error(transparent)]
    State(#[from] StateFormatError),
    /// Saved state does not match the machine it is restored into.
    #[error("saved state does not fit this machine: {reason}")]
    StateMismatch {
        /// What differs.
        reason: String,
    },
}

impl VmmError {
    /// The errno behind the error, where a kernel call returned one.
    ///
    /// Invalid sizes and counts read as EINVAL, as the kernel would report
    /// them; failures that are not a kernel call's return 0.
    pub fn errno(&self) -> i32 {
        match self {
            Self::KvmUnavailable { errno }
            | Self::Kvm { errno, .. }
            | Self::VcpuIoctl { errno, .. }
            | Self::MemoryFile { errno, .. }
            | Self::ThreadSpawn { errno, .. } => *errno,
            Self::InvalidMemorySize { .. }
            | Self::InvalidVcpuCount { .. }
            | Self::State(_)
            | Self::StateMismatch { .. } => libc::EINVAL,
            Self::MissingCapability { .. } => libc::EOPNOTSUPP,
            Self::StopTimeout { .. } => libc::ETIMEDOUT,
            Self::GuestMemory { .. } => libc::EFAULT,
            Self::ThreadPanicked { .. } | Self::GuestFailed { .. } => 0,
        }
    }

    /// Wraps a failed KVM ioctl.
    pub(crate) fn kvm(operation: &'static str, error: kvm_ioctls::Error) -> Self {
        Self::Kvm {
            operation,
            errno: error.errno(),
        }
    }

    /// Wraps a failed KVM ioctl on one vCPU.
    pub(crate) fn vcpu(operation: &'static str, vcpu: u32, error: kvm_ioctls::Error) -> Self {
        Self::VcpuIoctl {
            operation,
            vcpu,
            errno: error.errno(),
        }
    }

    /// Wraps a failed system call on the memory file.
    pub(crate) fn memory_file(operation: &'static str, error: rustix::io::Errno) -> Self {
        Self::MemoryFile {
            operation,
            errno: error.raw_os_error(),
        }
    }
}

/// The text of an errno, with its number, for Display.
pub(crate) fn errno_text(errno: i32) -> String {
    format!(
        "{} (errno {errno})",
        std::io::Error::from_raw_os_error(errno)
    )
}

/// The crate's result type.
pub type Result<T, E = VmmError> = std::result::Result<T, E>;
