//! A thin, safe wrapper over one userfaultfd.
//!
//! Built on `rustix::mm::userfaultfd` and the uapi structs and ioctl numbers
//! of `linux-raw-sys` (features general, ioctl), not on the `userfaultfd`
//! crate: its -sys build script runs bindgen, which needs libclang, and fresh
//! machines lack it.
//!
//! What it supports: MISSING-mode registration of shared file mappings
//! (shmem, hugetlbfs), reading page-fault messages, UFFDIO_WAKE, and for the
//! benchmark a SIGBUS-mode fd ([`Userfaultfd::open_sigbus`]) and
//! UFFDIO_ZEROPAGE. No
//! non-cooperative events are requested (fork, remap, remove, unmap): after a
//! fork the child's copy of a registered range is not registered (the kernel
//! drops the context without UFFD_FEATURE_EVENT_FORK), and an mremap()ed or
//! munmap()ed range leaves the service's control likewise; faults there are
//! served by the kernel directly.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use linux_raw_sys::general::{
    _UFFDIO_WAKE, UFFD_API, UFFD_EVENT_PAGEFAULT, UFFD_FEATURE_SIGBUS, UFFD_FEATURE_THREAD_ID,
    UFFD_PAGEFAULT_FLAG_WRITE, UFFDIO_REGISTER_MODE_MISSING, uffd_msg, uffdio_api, uffdio_range,
    uffdio_register, uffdio_zeropage,
};
use linux_raw_sys::ioctl::{
    UFFDIO_API, UFFDIO_REGISTER, UFFDIO_UNREGISTER, UFFDIO_WAKE, UFFDIO_ZEROPAGE,
};
use rustix::io::Errno;
use rustix::ioctl::{Opcode, Setter, Updater};

/// Messages read per `read_faults` call (2 KiB of `uffd_msg`).
pub const READ_BATCH: usize = 64;

/// One page fault read from the userfaultfd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageFault {
    /// The faulting address (page-aligned by the kernel unless
    /// UFFD_FEATURE_EXACT_ADDRESS, which is not requested).
    pub address: u64,
    /// Whether the access was a write.
    pub write: bool,
    /// The faulting thread's id, when the kernel reports it.
    pub thread: Option<u32>,
}

/// A userfaultfd in non-blocking mode.
#[derive(Debug)]
pub struct Userfaultfd {
    fd: OwnedFd,
    reports_thread: bool,
}

impl Userfaultfd {
    /// Opens a userfaultfd (O_CLOEXEC | O_NONBLOCK) and negotiates the API,
    /// asking for the faulting thread's id where offered.
    ///
    /// Errors: EPERM when unprivileged userfaultfd is off and the caller
    /// lacks CAP_SYS_PTRACE; ENOSYS without the syscall; EINVAL from
    /// UFFDIO_API.
    pub fn open() -> Result<Userfaultfd, Errno> {
        let fd = new_fd()?;
        match negotiate(&fd, UFFD_FEATURE_THREAD_ID) {
            Ok(features) => Ok(Userfaultfd {
                fd,
                reports_thread: features & u64::from(UFFD_FEATURE_THREAD_ID) != 0,
            }),
            Err(Errno::INVAL) => {
                // The feature is unknown to this kernel: a fresh fd, no
                // features (UFFDIO_API may be issued once per fd).
                let fd = new_fd()?;
                negotiate(&fd, 0)?;
                Ok(Userfaultfd {
                    fd,
                    reports_thread: false,
                })
            }
            Err(errno) => Err(errno),
        }
    }

    /// Opens a userfaultfd in SIGBUS mode (UFFD_FEATURE_SIGBUS): a fault in a
    /// range registered on it does not wait for a reader, it raises SIGBUS
    /// in the faulting thread. Nothing is ever read from it. The fault
    /// service does not use it (a vCPU's fault in such a range becomes an
    /// MMIO exit on the project machine's KVM, see DESIGN); the benchmark's
    /// in-thread floor does (`bench`, feature `bench`).
    ///
    /// Errors: as [`Userfaultfd::open`]; EOPNOTSUPP where the kernel lacks
    /// the feature.
    pub fn open_sigbus() -> Result<Userfaultfd, Errno> {
        let fd = new_fd()?;
        let features = negotiate(&fd, UFFD_FEATURE_SIGBUS).map_err(|errno| match errno {
            Errno::INVAL => Errno::NOTSUP,
            errno => errno,
        })?;
        if features & u64::from(UFFD_FEATURE_SIGBUS) == 0 {
            return Err(Errno::NOTSUP);
        }
        Ok(Userfaultfd {
            fd,
            reports_thread: false,
        })
    }

    /// Registers `[start, start + len)` in MISSING mode and checks that
    /// UFFDIO_WAKE is available on it.
    ///
    /// Errors: EINVAL when the range is not page-aligned or its memory cannot
    /// take userfaultfd (e.g. a KVM guest_memfd mapping); EBUSY when another
    /// userfaultfd holds it; ENOMEM when the range is not mapped.
    pub fn register(&self, start: u64, len: u64) -> Result<(), Errno> {
        let mut register = uffdio_register {
            range: uffdio_range { start, len },
            mode: UFFDIO_REGISTER_MODE_MISSING.into(),
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and writes one `uffdio_register`.
        unsafe {
            rustix::ioctl::ioctl(
                &self.fd,
                Updater::<{ UFFDIO_REGISTER as Opcode }, _>::new(&mut register),
            )
        }?;
        if register.ioctls & (1 << _UFFDIO_WAKE) == 0 {
            let _ = self.unregister(start, len);
            return Err(Errno::NOTSUP);
        }
        Ok(())
    }

    /// Unregisters a range; the kernel wakes every fault waiting in it, which
    /// then retries without the userfaultfd.
    ///
    /// Errors: EINVAL for a misaligned range.
    pub fn unregister(&self, start: u64, len: u64) -> Result<(), Errno> {
        let range = uffdio_range { start, len };
        // SAFETY: UFFDIO_UNREGISTER reads one `uffdio_range`.
        unsafe {
            rustix::ioctl::ioctl(
                &self.fd,
                Setter::<{ UFFDIO_UNREGISTER as Opcode }, _>::new(range),
            )
        }
    }

    /// Wakes the threads waiting on faults in `[start, start + len)`; they
    /// retry their access (and find the page the handler allocated).
    ///
    /// Errors: EINVAL for a misaligned or unregistered range.
    pub fn wake(&self, start: u64, len: u64) -> Result<(), Errno> {
        let range = uffdio_range { start, len };
        // SAFETY: UFFDIO_WAKE reads one `uffdio_range`.
        unsafe {
            rustix::ioctl::ioctl(&self.fd, Setter::<{ UFFDIO_WAKE as Opcode }, _>::new(range))
        }
    }

    /// Allocates zeroed pages for `[start, start + len)` and maps them
    /// (UFFDIO_ZEROPAGE), waking their waiters. The fault service never
    /// calls it: its allocations go through `get_folio`. The benchmark's
    /// lower bound does (`bench`, feature `bench`).
    ///
    /// Errors: EEXIST when a page of the range is present already; EINVAL
    /// for a misaligned or unregistered range.
    pub fn zeropage(&self, start: u64, len: u64) -> Result<(), Errno> {
        let mut zeropage = uffdio_zeropage {
            range: uffdio_range { start, len },
            mode: 0,
            zeropage: 0,
        };
        // SAFETY: UFFDIO_ZEROPAGE reads and writes one `uffdio_zeropage`.
        unsafe {
            rustix::ioctl::ioctl(
                &self.fd,
                Updater::<{ UFFDIO_ZEROPAGE as Opcode }, _>::new(&mut zeropage),
            )
        }
    }

    /// Reads the pending page faults into `faults` (cleared first), up to
    /// [`READ_BATCH`] per call. An empty result means none were pending (EAGAIN, e.g.
    /// another reader or a raced wake took them).
    ///
    /// Errors: the kernel's read errors other than EAGAIN and EINTR.
    pub fn read_faults(&self, faults: &mut Vec<PageFault>) -> Result<(), Errno> {
        faults.clear();
        let mut buffer = [0u8; READ_BATCH * std::mem::size_of::<uffd_msg>()];
        let bytes = match rustix::io::read(&self.fd, &mut buffer) {
            Ok(bytes) => bytes,
            Err(Errno::AGAIN | Errno::INTR) => return Ok(()),
            Err(errno) => return Err(errno),
        };
        for chunk in buffer[..bytes].chunks_exact(std::mem::size_of::<uffd_msg>()) {
            // SAFETY: `chunk` holds exactly one `uffd_msg` written by the
            // kernel; `uffd_msg` is plain old data, read unaligned.
            let message: uffd_msg = unsafe { std::ptr::read_unaligned(chunk.as_ptr().cast()) };
            if u32::from(message.event) != UFFD_EVENT_PAGEFAULT {
                // No other event was requested; ignore anything else.
                continue;
            }
            // SAFETY: for UFFD_EVENT_PAGEFAULT the `pagefault` member of the
            // union is the one the kernel filled.
            let pagefault = unsafe { message.arg.pagefault };
            // SAFETY: `ptid` is the only member of its union; the kernel sets
            // it when UFFD_FEATURE_THREAD_ID was negotiated, else leaves 0.
            let thread = unsafe { pagefault.feat.ptid };
            faults.push(PageFault {
                address: pagefault.address,
                write: pagefault.flags & u64::from(UFFD_PAGEFAULT_FLAG_WRITE) != 0,
                thread: self.reports_thread.then_some(thread),
            });
        }
        Ok(())
    }
}

/// A new userfaultfd (O_CLOEXEC | O_NONBLOCK), API not yet negotiated.
fn new_fd() -> Result<OwnedFd, Errno> {
    use rustix::mm::UserfaultfdFlags;
    // SAFETY: userfaultfd(2) only creates a new fd; the unsafety in rustix is
    // that the fd can later block page faults, which is our purpose.
    unsafe { rustix::mm::userfaultfd(UserfaultfdFlags::CLOEXEC | UserfaultfdFlags::NONBLOCK) }
}

/// Negotiates the API on a fresh userfaultfd, asking for `features`;
/// returns the features the kernel granted.
///
/// Errors: EINVAL when the kernel does not know a requested feature (the
/// fd is then unusable: UFFDIO_API may be issued once per fd).
fn negotiate(fd: &OwnedFd, features: u32) -> Result<u64, Errno> {
    let mut api = uffdio_api {
        api: UFFD_API.into(),
        features: features.into(),
        ioctls: 0,
    };
    // SAFETY: UFFDIO_API reads and writes one `uffdio_api`, which `api` is,
    // on a userfaultfd.
    unsafe { rustix::ioctl::ioctl(fd, Updater::<{ UFFDIO_API as Opcode }, _>::new(&mut api)) }?;
    Ok(api.features)
}

impl AsFd for Userfaultfd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}
