//! Newtypes for the values a guest memory file deals in.
//!
//! A page index is never a byte offset and a folio order is never a page
//! count: each has its own type, so the compiler catches a mix-up. The flag
//! and mode types carry the kernel's bit values (`GUEST_MEMFD_FLAG_*`,
//! `FALLOC_FL_*`) and accept raw bits too, because conformance tests must be
//! able to pass the kernel's unknown bits through unchanged.

use std::fmt;

/// Bytes in a base page: the unit of guest_memfd's alignment rules.
pub const PAGE_SIZE: u64 = 4096;

/// log2 of [`PAGE_SIZE`].
pub const PAGE_SHIFT: u32 = 12;

/// The index of a base (4 KiB) page in a file: byte offset / 4096.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct PageIndex(pub u64);

impl PageIndex {
    /// The page containing byte `offset`.
    pub const fn containing(offset: u64) -> PageIndex {
        PageIndex(offset >> PAGE_SHIFT)
    }

    /// The byte offset of the page's first byte.
    pub const fn byte_offset(self) -> u64 {
        self.0 << PAGE_SHIFT
    }
}

impl fmt::Display for PageIndex {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "page {}", self.0)
    }
}

/// The size of a folio as a power of two in base pages (the kernel's
/// `folio_order`): 0 is 4 KiB, 9 is 2 MiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FolioOrder(pub u8);

impl FolioOrder {
    /// A 4 KiB folio (memfd and kvm backends).
    pub const BASE: FolioOrder = FolioOrder(0);
    /// A 2 MiB folio (hugetlb backend, x86-64 PMD size).
    pub const HUGE_2M: FolioOrder = FolioOrder(9);

    /// Base pages in one folio of this order.
    pub const fn pages(self) -> u64 {
        1 << self.0
    }

    /// Bytes in one folio of this order.
    pub const fn bytes(self) -> u64 {
        PAGE_SIZE << self.0
    }
}

impl fmt::Display for FolioOrder {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "order {} ({} KiB)", self.0, self.bytes() / 1024)
    }
}

/// Creation flags, with the kernel's `GUEST_MEMFD_FLAG_*` values.
///
/// kvm-bindings 0.14 predates these constants, so they are defined here from
/// `include/uapi/linux/kvm.h` of Linux 6.18:
/// `#define GUEST_MEMFD_FLAG_MMAP (1ULL << 0)` and
/// `#define GUEST_MEMFD_FLAG_INIT_SHARED (1ULL << 1)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct GmemFlags(pub u64);

impl GmemFlags {
    /// No flags: the file cannot be mapped by the host (kvm backend).
    pub const NONE: GmemFlags = GmemFlags(0);
    /// The file may be mmap()ed by the host (`GUEST_MEMFD_FLAG_MMAP`).
    pub const MMAP: GmemFlags = GmemFlags(1 << 0);
    /// Memory starts shared with the host, so a host mapping can touch it
    /// (`GUEST_MEMFD_FLAG_INIT_SHARED`); without it the kvm backend's pages
    /// are private and a host access raises SIGBUS.
    pub const INIT_SHARED: GmemFlags = GmemFlags(1 << 1);
    /// Every flag this crate knows.
    pub const KNOWN: GmemFlags = GmemFlags(Self::MMAP.0 | Self::INIT_SHARED.0);
    /// The flags a host-accessible file needs: MMAP and INIT_SHARED.
    pub const HOST_ACCESSIBLE: GmemFlags = Self::KNOWN;

    /// Whether every bit of `other` is set in `self`.
    pub const fn contains(self, other: GmemFlags) -> bool {
        self.0 & other.0 == other.0
    }

    /// Bits outside [`GmemFlags::KNOWN`].
    pub const fn unknown_bits(self) -> u64 {
        self.0 & !Self::KNOWN.0
    }
}

impl std::ops::BitOr for GmemFlags {
    type Output = GmemFlags;
    fn bitor(self, other: GmemFlags) -> GmemFlags {
        GmemFlags(self.0 | other.0)
    }
}

/// An fallocate mode, with the kernel's `FALLOC_FL_*` values
/// (`include/uapi/linux/falloc.h`). Any raw `i32` is accepted, so that the
/// validation can be compared bit for bit with the kernel's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FallocMode(pub i32);

impl FallocMode {
    /// `FALLOC_FL_KEEP_SIZE`: do not change the file size.
    pub const KEEP_SIZE: FallocMode = FallocMode(0x01);
    /// `FALLOC_FL_PUNCH_HOLE`: free the range (needs KEEP_SIZE).
    pub const PUNCH_HOLE: FallocMode = FallocMode(0x02);
    /// The one allocation mode guest_memfd accepts.
    pub const ALLOCATE: FallocMode = Self::KEEP_SIZE;
    /// The one deallocation mode guest_memfd accepts.
    pub const PUNCH: FallocMode = FallocMode(Self::KEEP_SIZE.0 | Self::PUNCH_HOLE.0);

    /// Whether every bit of `other` is set in `self`.
    pub const fn contains(self, other: FallocMode) -> bool {
        self.0 & other.0 == other.0
    }
}

impl std::ops::BitOr for FallocMode {
    type Output = FallocMode;
    fn bitor(self, other: FallocMode) -> FallocMode {
        FallocMode(self.0 | other.0)
    }
}

impl fmt::Display for FallocMode {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "{:#x}", self.0)
    }
}

/// A run of present folios: `count` folios of one order, back to back, the
/// first at page `start` (aligned to the order). How a file's populated
/// folios are described and restored in bulk
/// ([`crate::GuestMemFile::populated_runs`], [`crate::GuestMemFile::restore_runs`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FolioRun {
    /// The first page of the first folio.
    pub start: PageIndex,
    /// How many folios (at least 1 in a description).
    pub count: u64,
    /// Their order.
    pub order: FolioOrder,
}

impl FolioRun {
    /// The number of 4 KiB pages the run covers, `None` on overflow.
    pub const fn pages(self) -> Option<u64> {
        self.count.checked_mul(self.order.pages())
    }

    /// The page after the run's last page, `None` on overflow.
    pub const fn end(self) -> Option<PageIndex> {
        match self.pages() {
            Some(pages) => match self.start.0.checked_add(pages) {
                Some(end) => Some(PageIndex(end)),
                None => None,
            },
            None => None,
        }
    }
}
