//! Guest memory files with guest_memfd's semantics and the live-update
//! freeze: the userspace realisation of the seed patch ("freeze the
//! guest_memfd inode while it is being preserved").
//!
//! A [`GuestMemFile`] is a fixed-size file of guest memory on a real kernel
//! object ([`Backend`]: a KVM guest_memfd, a shmem memfd or a hugetlbfs
//! memfd). It offers the kernel's `fallocate` with its validation and
//! errnos, a fault path [`GuestMemFile::get_folio`] (present folios by a
//! lock-free lookup, missing ones allocated under the file's NUMA policy),
//! [`GuestMemFile::freeze`] guarded by one process-wide SRCU domain
//! ([`FREEZE_DOMAIN`]), the shared NUMA policy, a safe view of the mapping,
//! and [`GuestMemFile::populated`] for the preservation layer.
//! [`hugetlb::HugePageReservation`] keeps 2 MiB pages available for the
//! hugetlb backend.
//!
//! Why one global domain and not one per file (the seed's "Global vs.
//! Per-Inode SRCU"): a domain costs per-thread slots; a per-file domain
//! would let whoever creates files multiply that cost. Here a file costs a
//! few hundred bytes plus its page-state index (`tests/memory_per_file.rs`).
//!
//! ```
//! use gmem::{Backend, FallocMode, GmemFlags, GuestMemFile, PageIndex};
//!
//! let file = GuestMemFile::create(1 << 20, GmemFlags::HOST_ACCESSIBLE, Backend::Memfd)?;
//! file.fallocate(FallocMode::ALLOCATE, 0, 4096)?;
//! assert!(file.is_present(PageIndex(0)));
//! file.freeze(true);
//! // Present folios are still served; missing ones are refused with EPERM.
//! assert!(file.get_folio(PageIndex(0)).is_ok());
//! assert_eq!(file.get_folio(PageIndex(1)).unwrap_err().errno(), libc::EPERM);
//! assert_eq!(file.fallocate(FallocMode::PUNCH, 0, 4096).unwrap_err().errno(), libc::EPERM);
//! file.freeze(false);
//! assert_eq!(file.populated().count(), 1);
//! # Ok::<(), gmem::GmemError>(())
//! ```

#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

pub mod backend;
#[cfg(all(feature = "bench", not(loom)))]
pub mod bench;
mod descriptor;
mod error;
mod file;
pub mod hugetlb;
mod index;
pub mod policy;
mod registry;
mod state;
mod sync;
mod types;
pub mod validate;

#[cfg(all(test, loom))]
mod loom_models;

pub use backend::Backend;
pub use descriptor::GmemDescriptor;
pub use error::GmemError;
pub use file::{Folio, GuestMemFile, Mapping};
pub use policy::{MemPolicy, NodeMask};
pub use registry::{lookup, registered_files};
pub use types::{FallocMode, FolioOrder, FolioRun, GmemFlags, PAGE_SHIFT, PAGE_SIZE, PageIndex};

/// The single process-wide freeze domain. Every allocation and punch of
/// every file runs in a read section of it; `freeze(true)` waits for it.
#[cfg(not(loom))]
pub static FREEZE_DOMAIN: srcu::Srcu = srcu::Srcu::new();

/// Under loom a domain cannot be `const`-built; models make their own, and
/// this one exists only so the crate compiles.
#[cfg(loom)]
pub static FREEZE_DOMAIN: std::sync::LazyLock<srcu::Srcu> =
    std::sync::LazyLock::new(srcu::Srcu::new);

#[inline(always)]
fn freeze_domain() -> &'static srcu::Srcu {
    &FREEZE_DOMAIN
}
