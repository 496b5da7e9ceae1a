//! The kernel objects a guest memory file can live in, and how to pick one.
//!
//! - `kvm`: a real KVM guest_memfd. guest_memfd can only be created on a VM
//!   fd, so the crate keeps one process-wide *holder VM*, created lazily on
//!   first use (0.2–0.4 ms here) and never run; a VMM that wants the file
//!   bound to its own VM (to use it as a private guest_memfd memslot, which
//!   must come from the same VM) passes its `VmFd` to
//!   `GuestMemFile::create_on_vm`. The kernel allocates on vCPU faults by
//!   itself, so on this backend the freeze binds this crate's paths
//!   (fallocate, get_folio) but not the kernel's internal faults.
//! - `memfd`: shmem from memfd_create, its size sealed (F_SEAL_SHRINK,
//!   F_SEAL_GROW, F_SEAL_SEAL) since guest_memfd's size is fixed too. With
//!   the fault service every first touch reaches `get_folio`, so the freeze
//!   binds every allocation.
//! - `hugetlb`: memfd with MFD_HUGETLB | MFD_HUGE_2MB: 2 MiB folios from the
//!   huge page pool, which is empty until root raises it
//!   (`crate::hugetlb::HugePageReservation`).

use std::fmt;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::OnceLock;

use kvm_bindings::kvm_create_guest_memfd;
use kvm_ioctls::{Kvm, VmFd};
use rustix::io::Errno;

use crate::types::{FolioOrder, GmemFlags};

/// `KVM_CAP_GUEST_MEMFD` (include/uapi/linux/kvm.h).
pub(crate) const KVM_CAP_GUEST_MEMFD: u32 = 234;

/// `KVM_CAP_GUEST_MEMFD_FLAGS`: the flags KVM_CREATE_GUEST_MEMFD accepts.
/// kvm-bindings 0.14 lacks it; the value is from include/uapi/linux/kvm.h of
/// Linux 6.18 (`#define KVM_CAP_GUEST_MEMFD_FLAGS 244`), and this machine's
/// KVM_CHECK_EXTENSION answers 3 (MMAP | INIT_SHARED) for it.
pub(crate) const KVM_CAP_GUEST_MEMFD_FLAGS: u32 = 244;

/// Where a guest memory file's pages live; fixed at creation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Backend {
    /// A KVM guest_memfd (`KVM_CREATE_GUEST_MEMFD`).
    Kvm,
    /// A shmem memfd (`memfd_create`), 4 KiB folios.
    Memfd,
    /// A hugetlbfs memfd (`MFD_HUGETLB | MFD_HUGE_2MB`), 2 MiB folios.
    Hugetlb,
}

impl Backend {
    /// The folio order of this backend's pages.
    pub const fn folio_order(self) -> FolioOrder {
        match self {
            Backend::Kvm | Backend::Memfd => FolioOrder::BASE,
            Backend::Hugetlb => FolioOrder::HUGE_2M,
        }
    }

    /// The name used in messages and descriptors: "kvm", "memfd", "hugetlb".
    pub const fn name(self) -> &'static str {
        match self {
            Backend::Kvm => "kvm",
            Backend::Memfd => "memfd",
            Backend::Hugetlb => "hugetlb",
        }
    }

    /// Parses [`Backend::name`].
    pub fn from_name(name: &str) -> Option<Backend> {
        [Backend::Kvm, Backend::Memfd, Backend::Hugetlb]
            .into_iter()
            .find(|backend| backend.name() == name)
    }

    /// `kvm` where /dev/kvm offers guest_memfd with host mmap of shared
    /// memory, else `memfd`. Logs the choice and its reason (tracing, info).
    pub fn auto() -> Backend {
        let (backend, reason) = Backend::auto_with_reason();
        tracing::info!(backend = backend.name(), %reason, "guest memory backend chosen");
        backend
    }

    /// [`Backend::auto`] with the reason for the choice, for a VMM to print.
    pub fn auto_with_reason() -> (Backend, String) {
        match holder_vm() {
            Err(errno) => (
                Backend::Memfd,
                format!("memfd: no usable /dev/kvm ({errno})"),
            ),
            Ok(vm) => {
                if vm.check_extension_raw(KVM_CAP_GUEST_MEMFD.into()) <= 0 {
                    return (
                        Backend::Memfd,
                        "memfd: KVM lacks KVM_CAP_GUEST_MEMFD".to_owned(),
                    );
                }
                let offered = offered_flags(vm);
                if !GmemFlags(offered).contains(GmemFlags::HOST_ACCESSIBLE) {
                    return (
                        Backend::Memfd,
                        format!(
                            "memfd: KVM guest_memfd offers flags {offered:#x}, not MMAP | INIT_SHARED"
                        ),
                    );
                }
                (
                    Backend::Kvm,
                    format!("kvm: /dev/kvm offers guest_memfd with flags {offered:#x}"),
                )
            }
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.name())
    }
}

/// The process-wide holder VM; see the module documentation. `Err` (cached)
/// where /dev/kvm cannot be opened or a VM cannot be created.
pub fn holder_vm() -> Result<&'static VmFd, Errno> {
    static HOLDER: OnceLock<Result<(Kvm, VmFd), Errno>> = OnceLock::new();
    let holder = HOLDER.get_or_init(|| {
        let kvm = Kvm::new().map_err(|error| Errno::from_raw_os_error(error.errno()))?;
        let vm = kvm
            .create_vm()
            .map_err(|error| Errno::from_raw_os_error(error.errno()))?;
        Ok((kvm, vm))
    });
    match holder {
        Ok((_kvm, vm)) => Ok(vm),
        Err(errno) => Err(*errno),
    }
}

/// The GUEST_MEMFD_FLAG_* bits `vm` accepts (0 where the capability is
/// unknown to the kernel).
pub fn offered_flags(vm: &VmFd) -> u64 {
    u64::try_from(vm.check_extension_raw(KVM_CAP_GUEST_MEMFD_FLAGS.into())).unwrap_or(0)
}

/// Issues KVM_CREATE_GUEST_MEMFD on `vm`.
pub(crate) fn create_guest_memfd(vm: &VmFd, size: u64, flags: u64) -> Result<OwnedFd, Errno> {
    let request = kvm_create_guest_memfd {
        size,
        flags,
        reserved: [0; 6],
    };
    let raw = vm
        .create_guest_memfd(request)
        .map_err(|error| Errno::from_raw_os_error(error.errno()))?;
    // SAFETY: KVM_CREATE_GUEST_MEMFD returned a new fd that nothing else
    // owns; wrapping it makes this the only owner.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    debug_assert_eq!(fd.as_raw_fd(), raw);
    Ok(fd)
}
