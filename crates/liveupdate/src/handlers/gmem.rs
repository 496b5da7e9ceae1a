//! The guest-memory-file handler: carries a [`gmem::GuestMemFile`] (KVM
//! guest_memfd, memfd or hugetlb backend) to the successor with zero copy,
//! as upstream's guest_memfd preservation series does, plus hugetlb folios
//! and the NUMA policy, which upstream drops.
//!
//! Lifecycle (DESIGN.md, "liveupdate: the orchestrator"):
//! 1. `preserve` freezes the file first (`freeze(true)`: when it returns no
//!    allocation or punch hole is in flight, and none starts). The guest runs
//!    on, on the memory it already has. Then the file is checked (size 0 →
//!    `EINVAL`); every error path unfreezes what preserve froze.
//! 2. `freeze` (the handover moment) walks the now-stable page index into the
//!    record: size, flags, backend, policy ranges, populated folios as runs
//!    ([`super::gmem_data`]). A file found unfrozen here (someone unfroze it
//!    behind the orchestrator's back) is refused with `EBUSY`: its index is
//!    not stable.
//! 3. `retrieve` in the successor rebuilds the object with
//!    [`gmem::GuestMemFile::restore_runs`], frozen; in a process that
//!    already has an object for the file (an in-process handover, or a
//!    transfer successor that restored it ahead from an offer) it returns
//!    that object instead, brought up to date with the record.
//! 4. `finish` unfreezes the retrieved file.
//!
//! Failure paths: `unfreeze` (handover aborted) discards nothing but the
//! record data, which the orchestrator drops: the file stays preserved and
//! frozen; `unpreserve` (session closed) unfreezes it, if preserve was the
//! one that froze it (a file the VMM had frozen for its own reasons stays
//! frozen).
//!
//! The kvm backend's limit (gmem's): the freeze binds this crate's paths,
//! not the kernel's own faults on behalf of a vCPU.

use std::ops::Range;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::Arc;

use gmem::{
    Backend, FolioOrder, FolioRun, GmemDescriptor, GmemFlags, GuestMemFile, MemPolicy, NodeMask,
    PageIndex,
};

use super::gmem_data::{BackendCode, GMEM_COMPATIBLE, GMEM_DATA_VERSION, GmemData, PolicyRange};
use crate::handler::{FileHandler, HandlerError, PreservedState, RetrievedObject};
use crate::names::Compatible;
use crate::record::blob::BlobError;

const MPOL_DEFAULT: u32 = 0;
const MPOL_PREFERRED: u32 = 1;
const MPOL_BIND: u32 = 2;
const MPOL_INTERLEAVE: u32 = 3;

/// Why the gmem handler failed.
#[derive(Debug, thiserror::Error)]
pub enum GmemHandlerError {
    /// The fd has no guest memory file object in this process (`ENOENT`).
    #[error("the fd has no guest memory file in this process (ENOENT)")]
    NotGuestMemory,
    /// The file cannot be preserved: size 0 (`EINVAL`).
    #[error("a guest memory file of {size} bytes cannot be preserved (EINVAL)")]
    BadSize {
        /// Its size.
        size: u64,
    },
    /// The file was unfrozen behind the orchestrator's back (`EBUSY`).
    #[error(
        "the guest memory file is not frozen at the handover: its page index is not stable (EBUSY)"
    )]
    NotFrozen,
    /// The data cannot describe the file, or the record's data is bad.
    #[error("guest memory data: {0}")]
    Data(#[from] BlobError),
    /// A policy the record holds has no gmem form (`EOPNOTSUPP`).
    #[error("NUMA policy mode {mode} with nodes {nodemask:#x} has no gmem form (EOPNOTSUPP)")]
    Policy {
        /// The MPOL mode.
        mode: u32,
        /// The node mask.
        nodemask: u64,
    },
    /// gmem refused (`restore`).
    #[error("gmem: {0}")]
    Gmem(#[from] gmem::GmemError),
    /// In-process retrieval found an object that is not the recorded file
    /// (`EINVAL`).
    #[error("this process's object for the file differs from the record: {detail} (EINVAL)")]
    Mismatch {
        /// What differs.
        detail: String,
    },
}

impl GmemHandlerError {
    /// The errno for this failure.
    pub fn errno(&self) -> i32 {
        match self {
            GmemHandlerError::NotGuestMemory => libc::ENOENT,
            GmemHandlerError::BadSize { .. } | GmemHandlerError::Mismatch { .. } => libc::EINVAL,
            GmemHandlerError::NotFrozen => libc::EBUSY,
            GmemHandlerError::Data(error) => error.errno(),
            GmemHandlerError::Policy { .. } => libc::EOPNOTSUPP,
            GmemHandlerError::Gmem(error) => error.errno(),
        }
    }
}

impl From<GmemHandlerError> for HandlerError {
    fn from(error: GmemHandlerError) -> HandlerError {
        HandlerError::new(error.errno(), error.to_string())
    }
}

/// What can be frozen and checked at preserve; the real implementation is
/// [`GuestMemFile`], tests substitute a file whose checks fail.
pub(crate) trait Freezable {
    /// `freeze(bool)`, returning whether it was frozen before.
    fn set_frozen(&self, frozen: bool) -> bool;
    /// The size in bytes.
    fn size_bytes(&self) -> u64;
}

impl Freezable for GuestMemFile {
    fn set_frozen(&self, frozen: bool) -> bool {
        self.freeze(frozen)
    }

    fn size_bytes(&self) -> u64 {
        self.size()
    }
}

/// The preserve step: freeze first, then check; on error, undo the freeze.
/// Returns whether this call froze the file.
pub(crate) fn freeze_and_check(file: &impl Freezable) -> Result<bool, GmemHandlerError> {
    let was_frozen = file.set_frozen(true);
    let froze_it = !was_frozen;
    let size = file.size_bytes();
    if size == 0 {
        if froze_it {
            file.set_frozen(false);
        }
        return Err(GmemHandlerError::BadSize { size });
    }
    Ok(froze_it)
}

struct GmemPreserved {
    file: Arc<GuestMemFile>,
    froze_it: bool,
}

impl RetrievedObject for GuestMemFile {
    fn as_fd(&self) -> BorrowedFd<'_> {
        GuestMemFile::as_fd(self)
    }
}

/// The guest-memory-file handler.
#[derive(Debug)]
pub struct GmemHandler {
    compatible: Compatible,
}

impl Default for GmemHandler {
    fn default() -> GmemHandler {
        GmemHandler::new()
    }
}

impl GmemHandler {
    /// The handler.
    pub fn new() -> GmemHandler {
        GmemHandler {
            compatible: Compatible::builtin(GMEM_COMPATIBLE, GMEM_DATA_VERSION),
        }
    }
}

fn backend_code(backend: Backend) -> BackendCode {
    match backend {
        Backend::Kvm => BackendCode::Kvm,
        Backend::Memfd => BackendCode::Memfd,
        Backend::Hugetlb => BackendCode::Hugetlb,
    }
}

fn backend_of(code: BackendCode) -> Backend {
    match code {
        BackendCode::Kvm => Backend::Kvm,
        BackendCode::Memfd => Backend::Memfd,
        BackendCode::Hugetlb => Backend::Hugetlb,
    }
}

fn policy_range(range: &Range<PageIndex>, policy: MemPolicy) -> PolicyRange {
    let (mode, nodemask) = match policy {
        MemPolicy::Default => (MPOL_DEFAULT, 0),
        MemPolicy::Preferred(node) => (MPOL_PREFERRED, NodeMask::single(node).0),
        MemPolicy::Bind(mask) => (MPOL_BIND, mask.0),
        MemPolicy::Interleave(mask) => (MPOL_INTERLEAVE, mask.0),
    };
    PolicyRange {
        first_page: range.start.0,
        end_page: range.end.0,
        mode,
        nodemask,
    }
}

fn policy_of(range: &PolicyRange) -> Result<(Range<PageIndex>, MemPolicy), GmemHandlerError> {
    let unsupported = || GmemHandlerError::Policy {
        mode: range.mode,
        nodemask: range.nodemask,
    };
    let policy = match range.mode {
        MPOL_DEFAULT => MemPolicy::Default,
        MPOL_PREFERRED if range.nodemask.count_ones() == 1 => {
            MemPolicy::Preferred(range.nodemask.trailing_zeros())
        }
        MPOL_BIND => MemPolicy::Bind(NodeMask(range.nodemask)),
        MPOL_INTERLEAVE => MemPolicy::Interleave(NodeMask(range.nodemask)),
        _ => return Err(unsupported()),
    };
    Ok((
        PageIndex(range.first_page)..PageIndex(range.end_page),
        policy,
    ))
}

/// The record data describing `file` now: the walk of its page index, a
/// run (and a word of 64 folios) at a time.
///
/// # Errors
/// `EINVAL`/`EOPNOTSUPP` ([`GmemHandlerError::Data`]) if the file cannot be
/// described (it always can for a file gmem created).
pub fn describe(file: &GuestMemFile) -> Result<GmemData, GmemHandlerError> {
    let descriptor = file.descriptor();
    let policies = descriptor
        .policies
        .iter()
        .map(|(range, policy)| policy_range(range, *policy))
        .collect();
    let runs = file
        .populated_runs()
        .map(|run| (run.start.0, run.count, run.order.0));
    Ok(GmemData::from_runs(
        descriptor.size,
        descriptor.flags.0,
        backend_code(descriptor.backend),
        policies,
        runs,
    )?)
}

/// The populated folios of `data` as gmem runs, for
/// [`GuestMemFile::restore_runs`] and [`GuestMemFile::update_restored`].
pub fn runs_of(data: &GmemData) -> impl Iterator<Item = FolioRun> + '_ {
    data.runs.iter().map(|run| FolioRun {
        start: PageIndex(run.first_page),
        count: u64::from(run.folio_count),
        order: FolioOrder(run.order),
    })
}

/// The descriptor a successor restores from `data` (frozen: a preserved
/// file comes back frozen until finish).
///
/// # Errors
/// `EOPNOTSUPP` ([`GmemHandlerError::Policy`]) for a policy gmem cannot
/// express.
pub fn descriptor_of(data: &GmemData) -> Result<GmemDescriptor, GmemHandlerError> {
    Ok(GmemDescriptor {
        size: data.size,
        flags: GmemFlags(data.flags),
        backend: backend_of(data.backend),
        policies: data
            .policies
            .iter()
            .map(policy_of)
            .collect::<Result<_, _>>()?,
        frozen: true,
    })
}

fn state_of(state: &PreservedState) -> Result<&GmemPreserved, HandlerError> {
    state
        .downcast_ref::<GmemPreserved>()
        .ok_or_else(|| HandlerError::new(libc::EINVAL, "gmem handler given a foreign state"))
}

/// In a process that already holds an object for the file, `restore` would
/// refuse a second one (`EBUSY`): use the existing one if it is the
/// recorded file. That process is either the one that preserved the file
/// (an in-process handover: the object is the record's source), or a
/// transfer successor that restored the object ahead from an offer; the old
/// process may have allocated folios since (its explicit parked-fault
/// step), which the object then gets recorded
/// ([`GuestMemFile::update_restored`]). An object with a folio the record
/// lacks, or of another size, flags or backend, is refused.
fn existing_object(
    fd: BorrowedFd<'_>,
    descriptor: &GmemDescriptor,
    data: &GmemData,
) -> Result<Arc<GuestMemFile>, GmemHandlerError> {
    let file = gmem::lookup(fd).ok_or(GmemHandlerError::NotGuestMemory)?;
    if file.size() != descriptor.size
        || file.flags() != descriptor.flags
        || file.backend() != descriptor.backend
    {
        return Err(GmemHandlerError::Mismatch {
            detail: format!("size, flags or backend differ ({file:?})"),
        });
    }
    if describe(&file)?.runs != data.runs {
        let recorded =
            file.update_restored(runs_of(data))
                .map_err(|error| GmemHandlerError::Mismatch {
                    detail: format!("the populated folios differ: {error}"),
                })?;
        tracing::info!(
            recorded,
            "this process's object for the file was brought up to date with the record"
        );
    }
    Ok(file)
}

impl FileHandler for GmemHandler {
    fn compatible(&self) -> &Compatible {
        &self.compatible
    }

    fn can_preserve(&self, file: BorrowedFd<'_>) -> bool {
        gmem::lookup(file).is_some()
    }

    fn preserve(&self, file: BorrowedFd<'_>) -> Result<PreservedState, HandlerError> {
        let object = gmem::lookup(file).ok_or(GmemHandlerError::NotGuestMemory)?;
        let froze_it = freeze_and_check(&*object)?;
        tracing::info!(size = object.size(), backend = %object.backend(), froze_it, "guest memory file frozen for preservation");
        Ok(Box::new(GmemPreserved {
            file: object,
            froze_it,
        }))
    }

    fn unpreserve(&self, _file: BorrowedFd<'_>, state: PreservedState) {
        if let Ok(preserved) = state.downcast::<GmemPreserved>()
            && preserved.froze_it
        {
            preserved.file.freeze(false);
        }
    }

    fn freeze(
        &self,
        _file: BorrowedFd<'_>,
        state: &mut PreservedState,
    ) -> Result<Vec<u8>, HandlerError> {
        let preserved = state_of(state)?;
        if !preserved.file.is_frozen() {
            return Err(GmemHandlerError::NotFrozen.into());
        }
        Ok(describe(&preserved.file)?.encode())
    }

    fn unfreeze(&self, _file: BorrowedFd<'_>, _state: &mut PreservedState) {
        // The serialized list lived only in the record, which the
        // orchestrator discards; the file stays frozen while preserved.
    }

    fn retrieve(
        &self,
        file: OwnedFd,
        data: &[u8],
    ) -> Result<Arc<dyn RetrievedObject>, HandlerError> {
        let data = GmemData::decode(data).map_err(GmemHandlerError::from)?;
        let descriptor = descriptor_of(&data)?;
        if gmem::lookup(std::os::fd::AsFd::as_fd(&file)).is_some() {
            let existing = existing_object(std::os::fd::AsFd::as_fd(&file), &descriptor, &data)?;
            tracing::info!("retrieved guest memory file is this process's own object");
            return Ok(existing);
        }
        let restored = GuestMemFile::restore_runs(file, &descriptor, runs_of(&data))
            .map_err(GmemHandlerError::Gmem)?;
        Ok(restored)
    }

    fn can_finish(&self, _retrieved: Option<&Arc<dyn RetrievedObject>>, _data: &[u8]) -> bool {
        true
    }

    fn finish(&self, retrieved: Option<&Arc<dyn RetrievedObject>>, _data: &[u8]) {
        let Some(retrieved) = retrieved else {
            return;
        };
        let any: Arc<dyn std::any::Any + Send + Sync> = retrieved.clone();
        if let Ok(file) = any.downcast::<GuestMemFile>() {
            file.freeze(false);
            tracing::info!(size = file.size(), "guest memory file unfrozen at finish");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;

    struct FakeFile {
        frozen: Cell<bool>,
        size: u64,
    }

    impl Freezable for FakeFile {
        fn set_frozen(&self, frozen: bool) -> bool {
            self.frozen.replace(frozen)
        }

        fn size_bytes(&self) -> u64 {
            // The size is read after the freeze: a check that happens under
            // the freeze, as the DESIGN orders it.
            assert!(self.frozen.get(), "checked before freezing");
            self.size
        }
    }

    #[test]
    fn compatible_is_valid() {
        let checked = Compatible::new(GMEM_COMPATIBLE, GMEM_DATA_VERSION).unwrap();
        assert_eq!(&checked, GmemHandler::new().compatible());
    }

    #[test]
    fn size_zero_is_einval_and_the_error_path_unfreezes() {
        let file = FakeFile {
            frozen: Cell::new(false),
            size: 0,
        };
        let error = freeze_and_check(&file).unwrap_err();
        assert_eq!(error.errno(), libc::EINVAL);
        assert!(!file.frozen.get(), "the error path unfroze the file");
        // A file frozen by someone else stays frozen on the error path.
        let frozen = FakeFile {
            frozen: Cell::new(true),
            size: 0,
        };
        assert!(freeze_and_check(&frozen).is_err());
        assert!(frozen.frozen.get());
    }

    #[test]
    fn success_leaves_the_file_frozen() {
        let file = FakeFile {
            frozen: Cell::new(false),
            size: 4096,
        };
        assert!(freeze_and_check(&file).unwrap());
        assert!(file.frozen.get());
    }

    #[test]
    fn policies_map_both_ways_and_unknown_modes_are_eopnotsupp() {
        let cases = [
            MemPolicy::Default,
            MemPolicy::Preferred(0),
            MemPolicy::Bind(NodeMask(1)),
            MemPolicy::Interleave(NodeMask(3)),
        ];
        for policy in cases {
            let range = PageIndex(0)..PageIndex(8);
            let wire = policy_range(&range, policy);
            assert_eq!(policy_of(&wire).unwrap(), (range, policy));
        }
        let local = PolicyRange {
            first_page: 0,
            end_page: 8,
            mode: 4,
            nodemask: 0,
        };
        assert_eq!(policy_of(&local).unwrap_err().errno(), libc::EOPNOTSUPP);
        let two_preferred = PolicyRange {
            mode: MPOL_PREFERRED,
            nodemask: 3,
            ..local
        };
        assert_eq!(
            policy_of(&two_preferred).unwrap_err().errno(),
            libc::EOPNOTSUPP
        );
    }
}
