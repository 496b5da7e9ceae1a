//! Argument validation for create and fallocate, in the kernel's order.
//!
//! A guest_memfd fallocate passes two sets of checks: the VFS's
//! (`vfs_fallocate` in fs/open.c) and then guest_memfd's own
//! (`kvm_gmem_fallocate` in virt/kvm/guest_memfd.c). Which errno a bad call
//! gets depends on their order, so this module replays both, in order, as
//! pure functions. `tests/conformance.rs` runs the same inputs against a real
//! kernel guest_memfd: the kernel is the reference.
//!
//! VFS, Linux 6.18:
//! 1. offset < 0 or len <= 0 → EINVAL
//! 2. a bit outside the known modes and KEEP_SIZE → EOPNOTSUPP
//! 3. the mode part (bits other than KEEP_SIZE) must be exactly one mode:
//!    none (allocate), UNSHARE or ZERO_RANGE pass; PUNCH_HOLE needs
//!    KEEP_SIZE; COLLAPSE, INSERT and WRITE_ZEROES refuse KEEP_SIZE; any
//!    combination → EOPNOTSUPP
//! 4. offset + len wraps or passes the largest file size → EFBIG
//!
//! guest_memfd:
//! 5. no KEEP_SIZE → EOPNOTSUPP
//! 6. a bit other than KEEP_SIZE and PUNCH_HOLE → EOPNOTSUPP
//! 7. offset or len not page-aligned → EINVAL (folio-aligned on hugetlb,
//!    which is what the guest_memfd hugetlb series requires)
//! 8. allocate reaching past the size → EINVAL; punch hole past the size is
//!    accepted and clamped

use std::ops::Range;

use rustix::io::Errno;

use crate::types::{FallocMode, PAGE_SIZE};

/// `FALLOC_FL_NO_HIDE_STALE`: reserved, refused everywhere.
const NO_HIDE_STALE: i32 = 0x04;
/// `FALLOC_FL_COLLAPSE_RANGE`.
const COLLAPSE_RANGE: i32 = 0x08;
/// `FALLOC_FL_ZERO_RANGE`.
const ZERO_RANGE: i32 = 0x10;
/// `FALLOC_FL_INSERT_RANGE`.
const INSERT_RANGE: i32 = 0x20;
/// `FALLOC_FL_UNSHARE_RANGE`.
const UNSHARE_RANGE: i32 = 0x40;
/// `FALLOC_FL_WRITE_ZEROES` (Linux 6.17).
const WRITE_ZEROES: i32 = 0x80;
/// `FALLOC_FL_MODE_MASK`: the mode part of the bits.
const MODE_MASK: i32 = FallocMode::PUNCH_HOLE.0
    | COLLAPSE_RANGE
    | ZERO_RANGE
    | INSERT_RANGE
    | UNSHARE_RANGE
    | WRITE_ZEROES;

const _: () = assert!(NO_HIDE_STALE & (MODE_MASK | FallocMode::KEEP_SIZE.0) == 0);

/// The largest file size (`MAX_LFS_FILESIZE` on 64-bit: the superblock's
/// `s_maxbytes` for tmpfs, hugetlbfs and the anon-inode fs alike).
pub(crate) const MAX_FILE_SIZE: i64 = i64::MAX;

/// What a validated fallocate asks for, in bytes clamped to the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum FallocateRequest {
    /// Allocate these bytes (never past the size).
    Allocate(Range<u64>),
    /// Punch these bytes (clamped to the size; may be empty).
    PunchHole(Range<u64>),
}

/// A rejected call: the kernel's errno and the rule it broke.
pub(crate) type Rejection = (Errno, &'static str);

/// Validates a create's size; `folio_bytes` is the backend's folio size.
/// (Flags are checked by the backend, which knows what it offers.)
pub(crate) fn create(size: u64, folio_bytes: u64) -> Result<(), &'static str> {
    if size == 0 {
        return Err("the size must be greater than zero");
    }
    if size > MAX_FILE_SIZE as u64 {
        return Err("the size is larger than the largest file size (2^63 - 1)");
    }
    if !size.is_multiple_of(PAGE_SIZE) {
        return Err("the size must be a multiple of the 4 KiB page size");
    }
    if !size.is_multiple_of(folio_bytes) {
        return Err("the size must be a multiple of the 2 MiB huge page size");
    }
    Ok(())
}

/// Validates an fallocate against a file of `size` bytes whose folios are
/// `folio_bytes` long; see the module documentation for the order.
pub(crate) fn fallocate(
    mode: FallocMode,
    offset: i64,
    len: i64,
    size: u64,
    folio_bytes: u64,
) -> Result<FallocateRequest, Rejection> {
    let keep_size = FallocMode::KEEP_SIZE.0;
    let punch_hole = FallocMode::PUNCH_HOLE.0;
    // VFS 1.
    if offset < 0 || len <= 0 {
        return Err((Errno::INVAL, "offset must be >= 0 and len > 0"));
    }
    // VFS 2.
    if mode.0 & !(MODE_MASK | keep_size) != 0 {
        return Err((Errno::NOTSUP, "unknown mode bits"));
    }
    // VFS 3.
    match mode.0 & MODE_MASK {
        0 | UNSHARE_RANGE | ZERO_RANGE => {}
        PUNCH_HOLE_MODE => {
            if mode.0 & keep_size == 0 {
                return Err((Errno::NOTSUP, "PUNCH_HOLE needs KEEP_SIZE"));
            }
        }
        COLLAPSE_RANGE | INSERT_RANGE | WRITE_ZEROES => {
            if mode.0 & keep_size != 0 {
                return Err((Errno::NOTSUP, "this mode cannot be combined with KEEP_SIZE"));
            }
        }
        _ => return Err((Errno::NOTSUP, "more than one fallocate mode given")),
    }
    // VFS 4: offset and len are non-negative here, so the sum fits in u64.
    let end = offset as u64 + len as u64;
    if end > MAX_FILE_SIZE as u64 {
        return Err((Errno::FBIG, "offset + len passes the largest file size"));
    }
    // guest_memfd 5 and 6.
    if mode.0 & keep_size == 0 {
        return Err((Errno::NOTSUP, "guest memory only allocates with KEEP_SIZE"));
    }
    if mode.0 & !(keep_size | punch_hole) != 0 {
        return Err((
            Errno::NOTSUP,
            "guest memory supports only KEEP_SIZE and KEEP_SIZE | PUNCH_HOLE",
        ));
    }
    // guest_memfd 7.
    let (offset, len) = (offset as u64, len as u64);
    if offset % PAGE_SIZE != 0 || len % PAGE_SIZE != 0 {
        return Err((Errno::INVAL, "offset and len must be 4 KiB aligned"));
    }
    if offset % folio_bytes != 0 || len % folio_bytes != 0 {
        return Err((
            Errno::INVAL,
            "offset and len must be 2 MiB aligned on hugetlb",
        ));
    }
    // guest_memfd 8.
    if mode.0 & punch_hole != 0 {
        Ok(FallocateRequest::PunchHole(offset.min(size)..end.min(size)))
    } else if end > size {
        Err((Errno::INVAL, "allocation reaches past the end of the file"))
    } else {
        Ok(FallocateRequest::Allocate(offset..end))
    }
}

/// `FALLOC_FL_PUNCH_HOLE`, as a pattern constant.
const PUNCH_HOLE_MODE: i32 = FallocMode::PUNCH_HOLE.0;

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn errno(mode: i32, offset: i64, len: i64) -> Option<Errno> {
        fallocate(FallocMode(mode), offset, len, MIB, PAGE_SIZE)
            .err()
            .map(|(errno, _)| errno)
    }

    #[test]
    fn order_follows_vfs_then_guest_memfd() {
        // EINVAL for a bad offset wins over a bad mode.
        assert_eq!(errno(0x100, -1, 4096), Some(Errno::INVAL));
        // EFBIG comes from the VFS, before guest_memfd refuses mode 0.
        assert_eq!(errno(0, i64::MAX - 4095, 4096), Some(Errno::FBIG));
        // Mode 0 with unaligned offset: guest_memfd's EOPNOTSUPP first.
        assert_eq!(errno(0, 1, 4096), Some(Errno::NOTSUP));
        // ZERO_RANGE passes the VFS but not guest_memfd.
        assert_eq!(errno(ZERO_RANGE | 1, 0, 4096), Some(Errno::NOTSUP));
        assert_eq!(errno(1, 0, 2 * MIB as i64), Some(Errno::INVAL));
        assert_eq!(errno(3, 0, 2 * MIB as i64), None);
        assert_eq!(errno(1, 4096, 4096), None);
    }

    #[test]
    fn punch_past_the_size_is_clamped() {
        let request = fallocate(FallocMode::PUNCH, MIB as i64, 4096, MIB, PAGE_SIZE);
        assert_eq!(request, Ok(FallocateRequest::PunchHole(MIB..MIB)));
    }

    #[test]
    fn hugetlb_needs_2m_alignment() {
        let huge = 2 * MIB;
        let rejected = fallocate(FallocMode::ALLOCATE, 4096, huge as i64, 4 * MIB, huge);
        assert_eq!(rejected.map_err(|(errno, _)| errno), Err(Errno::INVAL));
        assert!(create(huge + 4096, huge).is_err());
        assert!(create(huge, huge).is_ok());
    }
}
