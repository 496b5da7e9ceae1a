//! The guest-memory-file handler's data: what a successor needs to rebuild a
//! guest memory file object around the fd it receives (size, creation flags,
//! backend, NUMA policy ranges, and which folios exist with their order).
//!
//! Zero copy: the guest's bytes stay in the kernel object (guest_memfd,
//! memfd or hugetlbfs memfd); this is metadata only, and the folio list is
//! stored as runs of equal-order folios, so a fully populated file costs one
//! run whatever its size.
//!
//! Data, version 1, little-endian:
//!
//! ```text
//! Header, 64 bytes
//!  0  u64      size          bytes; > 0, a multiple of 4 KiB (2 MiB for hugetlb)
//!  8  u64      flags         GUEST_MEMFD_FLAG_MMAP = 1, INIT_SHARED = 2;
//!                            other bits: EOPNOTSUPP
//! 16  u32      backend       0 kvm guest_memfd, 1 memfd, 2 hugetlb memfd;
//!                            other values: EOPNOTSUPP
//! 20  u32      policy_count  entries in the policy table
//! 24  u64      run_count     entries in the run table
//! 32  u64      folio_count   total folios of all runs
//! 40  [u8;24]  reserved      0
//! Policy table, policy_count entries of 32 bytes, sorted, disjoint
//!  0  u64      first_page    first page index of the range
//!  8  u64      end_page      one past its last page; first < end <= pages
//! 16  u32      mode          Linux MPOL_*: 0 DEFAULT, 1 PREFERRED, 2 BIND,
//!                            3 INTERLEAVE, 4 LOCAL, 5 PREFERRED_MANY,
//!                            6 WEIGHTED_INTERLEAVE; others: EOPNOTSUPP
//! 20  u32      reserved      0
//! 24  u64      nodemask      nodes 0..63; 0 for DEFAULT and LOCAL, non-zero
//!                            for BIND, INTERLEAVE, PREFERRED_MANY and
//!                            WEIGHTED_INTERLEAVE
//! Run table, run_count entries of 16 bytes, sorted, disjoint
//!  0  u64      first_page    page index of the run's first folio, aligned
//!                            to the folio size
//!  8  u32      folio_count   >= 1 folios of the same order, back to back
//! 12  u8       order         0 (4 KiB) or 9 (2 MiB); hugetlb: 9 only
//! 13  [u8;3]   reserved      0
//! ```
//! The data is exactly 64 + 32 × policy_count + 16 × run_count bytes.

use crate::record::blob::BlobError;
use crate::record::wire::{WireReader, WireWriter};

/// The handler's compatible string.
pub const GMEM_COMPATIBLE: &str = "gmem";
/// The version of its data.
pub const GMEM_DATA_VERSION: u32 = 1;
/// Bytes of a page: a page index times this is a file offset.
pub const PAGE_SIZE: u64 = 4096;
/// Order of a 2 MiB folio.
pub const HUGE_ORDER: u8 = 9;
/// Creation flags this version knows: `GUEST_MEMFD_FLAG_MMAP |
/// GUEST_MEMFD_FLAG_INIT_SHARED`.
pub const KNOWN_FLAGS: u64 = 1 | 2;
/// Highest `MPOL_*` mode known (`MPOL_WEIGHTED_INTERLEAVE`).
pub const MAX_POLICY_MODE: u32 = 6;

const HEADER_LEN: u64 = 64;
const POLICY_LEN: u64 = 32;
const RUN_LEN: u64 = 16;
const MPOL_DEFAULT: u32 = 0;
const MPOL_PREFERRED: u32 = 1;
const MPOL_LOCAL: u32 = 4;

/// Which kind of kernel object holds the guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BackendCode {
    /// A KVM guest_memfd.
    Kvm,
    /// A shmem memfd.
    Memfd,
    /// A hugetlbfs memfd (2 MiB folios).
    Hugetlb,
}

impl BackendCode {
    fn to_wire(self) -> u32 {
        match self {
            BackendCode::Kvm => 0,
            BackendCode::Memfd => 1,
            BackendCode::Hugetlb => 2,
        }
    }

    fn from_wire(value: u32) -> Result<BackendCode, BlobError> {
        match value {
            0 => Ok(BackendCode::Kvm),
            1 => Ok(BackendCode::Memfd),
            2 => Ok(BackendCode::Hugetlb),
            other => Err(BlobError::Unsupported {
                field: "backend",
                value: other.into(),
            }),
        }
    }
}

/// A NUMA policy over a range of pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PolicyRange {
    /// First page index.
    pub first_page: u64,
    /// One past the last page index.
    pub end_page: u64,
    /// Linux `MPOL_*` mode.
    pub mode: u32,
    /// Nodes 0..63.
    pub nodemask: u64,
}

/// Folios of one order, back to back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FolioRun {
    /// Page index of the first folio.
    pub first_page: u64,
    /// Number of folios (at least 1).
    pub folio_count: u32,
    /// Their order (0 or 9).
    pub order: u8,
}

impl FolioRun {
    fn pages(&self) -> Option<u64> {
        u64::from(self.folio_count).checked_mul(1u64.checked_shl(u32::from(self.order))?)
    }

    fn end_page(&self) -> Option<u64> {
        self.first_page.checked_add(self.pages()?)
    }
}

/// The gmem handler's data for one file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GmemData {
    /// Size in bytes.
    pub size: u64,
    /// Creation flags.
    pub flags: u64,
    /// Backend.
    pub backend: BackendCode,
    /// NUMA policy ranges, sorted and disjoint.
    pub policies: Vec<PolicyRange>,
    /// Populated folios as runs, sorted and disjoint.
    pub runs: Vec<FolioRun>,
}

impl GmemData {
    /// Builds the data from a folio list in ascending page order
    /// (`(page index, order)`), merging neighbours of equal order into runs.
    ///
    /// # Errors
    /// Those of [`GmemData::validate`].
    pub fn from_folios(
        size: u64,
        flags: u64,
        backend: BackendCode,
        policies: Vec<PolicyRange>,
        folios: impl IntoIterator<Item = (u64, u8)>,
    ) -> Result<GmemData, BlobError> {
        let runs = folios.into_iter().map(|(page, order)| (page, 1, order));
        GmemData::from_runs(size, flags, backend, policies, runs)
    }

    /// Builds the data from runs of folios in ascending page order
    /// (`(first page, folio count, order)`), merging neighbours of equal
    /// order and splitting runs longer than a run entry holds (`u32::MAX`
    /// folios). Costs a step per run, not per folio.
    ///
    /// # Errors
    /// Those of [`GmemData::validate`].
    pub fn from_runs(
        size: u64,
        flags: u64,
        backend: BackendCode,
        policies: Vec<PolicyRange>,
        folio_runs: impl IntoIterator<Item = (u64, u64, u8)>,
    ) -> Result<GmemData, BlobError> {
        let mut runs: Vec<FolioRun> = Vec::new();
        for (first_page, count, order) in folio_runs {
            push_folios(&mut runs, first_page, count, order);
        }
        let data = GmemData {
            size,
            flags,
            backend,
            policies,
            runs,
        };
        data.validate()?;
        Ok(data)
    }

    /// Every populated folio as `(page index, order)`, ascending.
    pub fn folios(&self) -> impl Iterator<Item = (u64, u8)> + '_ {
        self.runs.iter().flat_map(|run| {
            (0..u64::from(run.folio_count))
                .map(move |folio| (run.first_page + (folio << run.order), run.order))
        })
    }

    /// Total number of folios.
    pub fn folio_count(&self) -> u64 {
        self.runs.iter().map(|run| u64::from(run.folio_count)).sum()
    }

    /// Bytes of populated memory.
    pub fn populated_bytes(&self) -> u64 {
        self.runs
            .iter()
            .map(|run| run.pages().unwrap_or(0) * PAGE_SIZE)
            .sum()
    }

    /// Checks every rule of the layout's documentation.
    ///
    /// # Errors
    /// - `EINVAL`: bad size, ranges unsorted, overlapping, out of the file
    ///   or misaligned, empty runs, bad nodemask;
    /// - `EOPNOTSUPP`: unknown flags, policy modes or folio orders.
    pub fn validate(&self) -> Result<(), BlobError> {
        let huge = self.backend == BackendCode::Hugetlb;
        let granule = if huge {
            PAGE_SIZE << HUGE_ORDER
        } else {
            PAGE_SIZE
        };
        if self.size == 0 || !self.size.is_multiple_of(granule) || self.size > i64::MAX as u64 {
            return Err(BlobError::Invalid {
                field: "size",
                value: self.size,
                reason: "must be a positive multiple of the page size",
            });
        }
        if self.flags & !KNOWN_FLAGS != 0 {
            return Err(BlobError::Unsupported {
                field: "flags",
                value: self.flags,
            });
        }
        let pages = self.size / PAGE_SIZE;
        validate_policies(&self.policies, pages)?;
        validate_runs(&self.runs, pages, huge)
    }

    /// Encodes the layout.
    pub fn encode(&self) -> Vec<u8> {
        let length = HEADER_LEN as usize
            + POLICY_LEN as usize * self.policies.len()
            + RUN_LEN as usize * self.runs.len();
        let mut out = Vec::with_capacity(length);
        let mut writer = WireWriter::new(&mut out);
        writer.u64(self.size);
        writer.u64(self.flags);
        writer.u32(self.backend.to_wire());
        writer.u32(self.policies.len() as u32);
        writer.u64(self.runs.len() as u64);
        writer.u64(self.folio_count());
        writer.zeros(24);
        for policy in &self.policies {
            writer.u64(policy.first_page);
            writer.u64(policy.end_page);
            writer.u32(policy.mode);
            writer.u32(0);
            writer.u64(policy.nodemask);
        }
        for run in &self.runs {
            writer.u64(run.first_page);
            writer.u32(run.folio_count);
            writer.u8(run.order);
            writer.zeros(3);
        }
        out
    }

    /// Decodes and validates the layout.
    ///
    /// # Errors
    /// - `EINVAL`: a length that does not match the counts, reserved bytes
    ///   set, a folio count that does not match the runs, and every
    ///   `EINVAL` of [`GmemData::validate`];
    /// - `EOPNOTSUPP`: unknown backend, and those of [`GmemData::validate`].
    pub fn decode(bytes: &[u8]) -> Result<GmemData, BlobError> {
        let mut reader = WireReader::new(bytes, 0);
        let size = reader.u64()?;
        let flags = reader.u64()?;
        let backend = BackendCode::from_wire(reader.u32()?)?;
        let policy_count = reader.u32()?;
        let run_count = reader.u64()?;
        let folio_count = reader.u64()?;
        if reader.array::<24>()? != [0; 24] {
            return Err(BlobError::ReservedNotZero {
                field: "header reserved",
            });
        }
        let expected = u64::from(policy_count)
            .checked_mul(POLICY_LEN)
            .and_then(|policies| run_count.checked_mul(RUN_LEN)?.checked_add(policies))
            .and_then(|tables| tables.checked_add(HEADER_LEN));
        if expected != Some(bytes.len() as u64) {
            return Err(BlobError::WrongLength {
                expected: expected.unwrap_or(u64::MAX),
                found: bytes.len(),
            });
        }
        // The length check bounds both counts by the input's size.
        let mut policies = Vec::with_capacity(policy_count as usize);
        for _ in 0..policy_count {
            let first_page = reader.u64()?;
            let end_page = reader.u64()?;
            let mode = reader.u32()?;
            if reader.u32()? != 0 {
                return Err(BlobError::ReservedNotZero {
                    field: "policy reserved",
                });
            }
            policies.push(PolicyRange {
                first_page,
                end_page,
                mode,
                nodemask: reader.u64()?,
            });
        }
        let mut runs = Vec::with_capacity(run_count as usize);
        for _ in 0..run_count {
            let first_page = reader.u64()?;
            let count = reader.u32()?;
            let order = reader.u8()?;
            if reader.array::<3>()? != [0; 3] {
                return Err(BlobError::ReservedNotZero {
                    field: "run reserved",
                });
            }
            runs.push(FolioRun {
                first_page,
                folio_count: count,
                order,
            });
        }
        let data = GmemData {
            size,
            flags,
            backend,
            policies,
            runs,
        };
        data.validate()?;
        if data.folio_count() != folio_count {
            return Err(BlobError::Invalid {
                field: "folio_count",
                value: folio_count,
                reason: "does not match the runs",
            });
        }
        Ok(data)
    }
}

/// Appends `count` folios of `order` from `first_page` to `runs`: into the
/// last run when they follow it with its order, in new runs of at most
/// `u32::MAX` folios otherwise. Arithmetic saturates: a run that would
/// overflow is kept as it is and refused by [`GmemData::validate`].
fn push_folios(runs: &mut Vec<FolioRun>, mut first_page: u64, mut count: u64, order: u8) {
    let pages_of = |folios: u64| {
        folios
            .checked_shl(u32::from(order))
            .filter(|pages| pages >> order == folios)
            .unwrap_or(u64::MAX)
    };
    while count > 0 {
        let taken = match runs.last_mut() {
            Some(last)
                if last.order == order
                    && last.end_page() == Some(first_page)
                    && last.folio_count < u32::MAX =>
            {
                let taken = count.min(u64::from(u32::MAX - last.folio_count));
                last.folio_count += taken as u32;
                taken
            }
            _ => {
                let taken = count.min(u64::from(u32::MAX));
                runs.push(FolioRun {
                    first_page,
                    folio_count: taken as u32,
                    order,
                });
                taken
            }
        };
        count -= taken;
        first_page = first_page.saturating_add(pages_of(taken));
    }
}

fn validate_policies(policies: &[PolicyRange], pages: u64) -> Result<(), BlobError> {
    let mut previous_end = 0;
    for policy in policies {
        if policy.first_page < previous_end
            || policy.first_page >= policy.end_page
            || policy.end_page > pages
        {
            return Err(BlobError::Invalid {
                field: "policy range",
                value: policy.first_page,
                reason: "ranges must be non-empty, sorted, disjoint and inside the file",
            });
        }
        if policy.mode > MAX_POLICY_MODE {
            return Err(BlobError::Unsupported {
                field: "policy mode",
                value: policy.mode.into(),
            });
        }
        let needs_nodes = !matches!(policy.mode, MPOL_DEFAULT | MPOL_LOCAL | MPOL_PREFERRED);
        let forbids_nodes = matches!(policy.mode, MPOL_DEFAULT | MPOL_LOCAL);
        if (needs_nodes && policy.nodemask == 0) || (forbids_nodes && policy.nodemask != 0) {
            return Err(BlobError::Invalid {
                field: "policy nodemask",
                value: policy.nodemask,
                reason: "DEFAULT and LOCAL take no nodes; BIND and the interleaves need some",
            });
        }
        previous_end = policy.end_page;
    }
    Ok(())
}

fn validate_runs(runs: &[FolioRun], pages: u64, huge: bool) -> Result<(), BlobError> {
    let mut previous_end = 0;
    for run in runs {
        let order_known = run.order == 0 || run.order == HUGE_ORDER;
        if !order_known || (huge && run.order != HUGE_ORDER) {
            return Err(BlobError::Unsupported {
                field: "folio order",
                value: run.order.into(),
            });
        }
        let aligned = run.first_page.is_multiple_of(1u64 << run.order);
        let end = run.end_page();
        let inside = end.is_some_and(|end| end <= pages);
        if run.folio_count == 0 || !aligned || !inside || run.first_page < previous_end {
            return Err(BlobError::Invalid {
                field: "folio run",
                value: run.first_page,
                reason: "runs must be non-empty, aligned to their folio size, sorted, disjoint and inside the file",
            });
        }
        previous_end = end.unwrap_or(pages);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> GmemData {
        let folios = (0..16u64)
            .map(|page| (page, 0))
            .chain([(512, 9), (1024, 9), (2048, 0)]);
        GmemData::from_folios(
            64 << 20,
            1,
            BackendCode::Memfd,
            vec![PolicyRange {
                first_page: 0,
                end_page: 512,
                mode: 2,
                nodemask: 1,
            }],
            folios,
        )
        .unwrap()
    }

    #[test]
    fn runs_merge_neighbours_of_equal_order() {
        let data = sample();
        assert_eq!(
            data.runs,
            vec![
                FolioRun {
                    first_page: 0,
                    folio_count: 16,
                    order: 0
                },
                FolioRun {
                    first_page: 512,
                    folio_count: 2,
                    order: 9
                },
                FolioRun {
                    first_page: 2048,
                    folio_count: 1,
                    order: 0
                },
            ]
        );
        assert_eq!(data.folio_count(), 19);
        assert_eq!(data.populated_bytes(), 17 * 4096 + 2 * (2 << 20));
        let listed: Vec<_> = data.folios().collect();
        assert_eq!(listed.len(), 19);
        assert_eq!(listed[16], (512, 9));
        assert_eq!(listed[17], (1024, 9));
    }

    #[test]
    fn runs_merge_like_folios_and_split_at_the_entry_limit() {
        let by_runs = GmemData::from_runs(
            64 << 20,
            1,
            BackendCode::Memfd,
            sample().policies,
            [
                (0, 10, 0),
                (10, 6, 0),
                (512, 1, 9),
                (1024, 1, 9),
                (2048, 1, 0),
            ],
        )
        .unwrap();
        assert_eq!(by_runs, sample());
        // An empty run adds nothing.
        let mut runs = Vec::new();
        push_folios(&mut runs, 7, 0, 0);
        assert!(runs.is_empty());
        // 2^33 folios (32 TiB of 4 KiB pages): entries of u32::MAX folios.
        push_folios(&mut runs, 0, 1 << 32, 0);
        push_folios(&mut runs, 1 << 32, 1 << 32, 0);
        let max = u64::from(u32::MAX);
        assert_eq!(
            runs.iter()
                .map(|run| (run.first_page, u64::from(run.folio_count)))
                .collect::<Vec<_>>(),
            vec![(0, max), (max, max), (2 * max, 2)]
        );
        // An order whose pages overflow is kept and refused by validation.
        let mut hostile = Vec::new();
        push_folios(&mut hostile, 0, 3, 200);
        push_folios(&mut hostile, 8, 1, 200);
        assert_eq!(hostile.len(), 2);
        let data = GmemData {
            runs: hostile,
            ..sample()
        };
        assert!(data.validate().is_err());
    }

    #[test]
    fn round_trip() {
        let data = sample();
        let bytes = data.encode();
        assert_eq!(bytes.len(), 64 + 32 + 3 * 16);
        assert_eq!(GmemData::decode(&bytes).unwrap(), data);
    }

    #[test]
    fn refusals() {
        let bytes = sample().encode();
        let patched = |offset: usize, value: u8| {
            let mut copy = bytes.clone();
            copy[offset] = value;
            GmemData::decode(&copy).map(|_| ()).unwrap_err().errno()
        };
        assert_eq!(patched(8, 4), libc::EOPNOTSUPP, "unknown flag");
        assert_eq!(patched(16, 3), libc::EOPNOTSUPP, "unknown backend");
        assert_eq!(patched(40, 1), libc::EINVAL, "reserved header byte");
        assert_eq!(patched(32, 20), libc::EINVAL, "folio count");
        assert_eq!(patched(64 + 16, 9), libc::EOPNOTSUPP, "policy mode");
        assert_eq!(patched(64 + 20, 1), libc::EINVAL, "policy reserved");
        assert_eq!(patched(64 + 24, 0), libc::EINVAL, "BIND without nodes");
        assert_eq!(patched(96 + 12, 3), libc::EOPNOTSUPP, "folio order");
        assert_eq!(patched(96 + 13, 1), libc::EINVAL, "run reserved");
        assert_eq!(patched(96 + 16, 1), libc::EINVAL, "huge run misaligned");
        assert_eq!(patched(96 + 8, 0), libc::EINVAL, "empty run");
        assert_eq!(patched(96 + 16 + 1, 0), libc::EINVAL, "runs out of order");
        assert_eq!(patched(0, 1), libc::EINVAL, "size not page aligned");
        assert!(GmemData::decode(&bytes[..bytes.len() - 1]).is_err());
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(GmemData::decode(&longer).is_err());
        // A run reaching past the end of the file.
        let past_end = GmemData {
            runs: vec![FolioRun {
                first_page: 16383,
                folio_count: 2,
                order: 0,
            }],
            ..sample()
        };
        assert_eq!(past_end.validate().unwrap_err().errno(), libc::EINVAL);
        // hugetlb holds 2 MiB folios only, and a 2 MiB multiple of bytes.
        let huge_small = GmemData {
            backend: BackendCode::Hugetlb,
            ..sample()
        };
        assert_eq!(huge_small.validate().unwrap_err().errno(), libc::EOPNOTSUPP);
        let huge_size = GmemData {
            backend: BackendCode::Hugetlb,
            size: 4096,
            runs: vec![],
            policies: vec![],
            ..sample()
        };
        assert_eq!(huge_size.validate().unwrap_err().errno(), libc::EINVAL);
    }

    #[test]
    fn hostile_counts_are_refused_before_allocating() {
        let mut bytes = sample().encode();
        bytes[24..32].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            GmemData::decode(&bytes),
            Err(BlobError::WrongLength { .. })
        ));
    }
}
