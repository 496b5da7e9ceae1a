//! `GuestMemFile`: a guest memory file with guest_memfd's semantics and the
//! live-update freeze.
//!
//! Model: a kernel object (guest_memfd, shmem memfd or hugetlbfs memfd) of a
//! fixed size, plus what the kernel's `gmem_inode` would hold: the creation
//! flags, the FROZEN flag and page-state index (`state`), the shared NUMA
//! policy, and one host mapping made on first use (never at creation: a
//! process may hold 100,000 files, and vm.max_map_count is 65530).
//!
//! Paths (every one validates its input first, then consults FROZEN):
//! 1. `get_folio`: present → returned at once, lock-free, also while frozen;
//!    missing → allocated by fallocate(KEEP_SIZE) of that folio under the
//!    file's policy, then recorded; missing and frozen → EPERM.
//! 2. `fallocate(KEEP_SIZE)`: the range is allocated and recorded; frozen →
//!    EPERM.
//! 3. `fallocate(KEEP_SIZE | PUNCH_HOLE)`: recorded absent, then punched;
//!    frozen → EPERM (punch never reaches the fault path, so this is the
//!    check that stops it; the review's "is this meant to catch the punch
//!    hole case?" — yes, and it is the only check on this path).
//! 4. `freeze(true)`: FROZEN set, then the domain synchronized; `freeze
//!    (false)`: FROZEN cleared, then the unfreeze eventfd signalled.
//!
//! Neither fallocate path goes through `get_folio`, so each path checks the
//! flag exactly once (the seed checked twice on allocation).

use std::ops::Range;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use kvm_ioctls::VmFd;
use rustix::fs::{FallocateFlags, MemfdFlags, SealFlags};
use rustix::io::Errno;

use crate::backend::{self, Backend};
use crate::descriptor::GmemDescriptor;
use crate::error::GmemError;
use crate::policy::{self, MemPolicy, PolicyRanges};
use crate::registry::{self, InodeKey};
use crate::state::{self, FileState, Refused};
use crate::types::{FallocMode, FolioOrder, FolioRun, GmemFlags, PAGE_SIZE, PageIndex};
use crate::validate::{self, FallocateRequest};

/// fstatfs magic numbers (include/uapi/linux/magic.h), used by `restore` to
/// check that an fd is the kind of file its descriptor claims.
const TMPFS_MAGIC: i64 = 0x0102_1994;
const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;
const ANON_INODE_FS_MAGIC: i64 = 0x0904_1934;
/// What /proc/self/fd/N shows for a guest_memfd (its anon inode's name).
const GUEST_MEMFD_LINK: &str = "anon_inode:[kvm-gmem]";

/// A guest memory file; see the module documentation. Shared between
/// threads as `Arc<GuestMemFile>`.
pub struct GuestMemFile {
    fd: OwnedFd,
    size: u64,
    flags: GmemFlags,
    backend: Backend,
    order: FolioOrder,
    state: FileState,
    mapping: OnceLock<RawMapping>,
    policies: Mutex<PolicyRanges>,
    unfreeze_event: OnceLock<OwnedFd>,
    key: InodeKey,
    id: u64,
}

impl std::fmt::Debug for GuestMemFile {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("GuestMemFile")
            .field("fd", &self.fd.as_raw_fd())
            .field("backend", &self.backend)
            .field("size", &self.size)
            .field("flags", &self.flags)
            .field("frozen", &self.is_frozen())
            .finish_non_exhaustive()
    }
}

impl GuestMemFile {
    /// Creates a file of `size` bytes on `backend` (the kvm backend uses the
    /// process-wide holder VM; see [`crate::backend`]).
    ///
    /// Errors: EINVAL (`InvalidSize`: size 0, not 4 KiB aligned, not 2 MiB
    /// aligned on hugetlb, or past 2^63 - 1; `InvalidFlags`: bits other than
    /// MMAP | INIT_SHARED); on the kvm backend ENOENT/EACCES when /dev/kvm
    /// cannot be opened and the kernel's EINVAL for flags it does not offer;
    /// EMFILE/ENFILE when out of fds; ENOMEM (`System`).
    pub fn create(
        size: u64,
        flags: GmemFlags,
        backend: Backend,
    ) -> Result<Arc<GuestMemFile>, GmemError> {
        check_create(size, flags, backend)?;
        let fd = match backend {
            Backend::Kvm => {
                let vm = backend::holder_vm().map_err(|errno| GmemError::System {
                    backend,
                    operation: "open /dev/kvm and create the holder VM",
                    errno,
                })?;
                return GuestMemFile::create_on_vm(vm, size, flags);
            }
            Backend::Memfd => make_memfd(size, MemfdFlags::empty(), backend)?,
            Backend::Hugetlb => {
                make_memfd(size, MemfdFlags::HUGETLB | MemfdFlags::HUGE_2MB, backend)?
            }
        };
        GuestMemFile::build(fd, size, flags, backend, false, |_| Ok(()))
    }

    /// Creates a kvm-backend file on the caller's VM, so it can also be
    /// bound to that VM as a guest_memfd memslot.
    ///
    /// Errors: as [`GuestMemFile::create`]; the kernel's EINVAL for flags the
    /// VM does not offer.
    pub fn create_on_vm(
        vm: &VmFd,
        size: u64,
        flags: GmemFlags,
    ) -> Result<Arc<GuestMemFile>, GmemError> {
        let backend = Backend::Kvm;
        check_create(size, flags, backend)?;
        let fd =
            backend::create_guest_memfd(vm, size, flags.0).map_err(|errno| GmemError::System {
                backend,
                operation: "create the guest_memfd (KVM_CREATE_GUEST_MEMFD)",
                errno,
            })?;
        // guest_memfd fds are created without O_CLOEXEC; every other fd of
        // this crate has it, and the live-update layer clears it on purpose.
        rustix::io::fcntl_setfd(&fd, rustix::io::FdFlags::CLOEXEC).map_err(|errno| {
            GmemError::System {
                backend,
                operation: "set FD_CLOEXEC on the guest_memfd",
                errno,
            }
        })?;
        GuestMemFile::build(fd, size, flags, backend, false, |_| Ok(()))
    }

    /// Rebuilds a file in a successor process from its fd (inherited or
    /// received), its descriptor and its list of present folios; see
    /// [`GuestMemFile::restore_runs`], which does the same from runs (a word
    /// of the page-state index at a time instead of a folio).
    ///
    /// Errors: as [`GuestMemFile::restore_runs`].
    pub fn restore(
        fd: OwnedFd,
        descriptor: &GmemDescriptor,
        populated: impl IntoIterator<Item = (PageIndex, FolioOrder)>,
    ) -> Result<Arc<GuestMemFile>, GmemError> {
        let runs = populated.into_iter().map(|(start, order)| FolioRun {
            start,
            count: 1,
            order,
        });
        GuestMemFile::restore_runs(fd, descriptor, runs)
    }

    /// Rebuilds a file in a successor process from its fd (inherited or
    /// received), its descriptor and its runs of present folios (what
    /// [`GuestMemFile::populated_runs`] gave the predecessor).
    ///
    /// The page-state index is filled before the object is published (in
    /// this process's registry or to any other thread), whole words at a
    /// time: a fully populated 8 GiB file of 4 KiB folios is 32,768 word
    /// stores. The file comes back frozen if the descriptor says so (a
    /// preserved file does), with its policy ranges re-applied.
    ///
    /// Errors: EINVAL (`Restore`) when the fd is not the descriptor's kind of
    /// file, its size differs, or a run is empty, reaches outside the file,
    /// is misaligned or of the wrong order; EBUSY when this process already
    /// has an object for the same file (use [`crate::lookup`], and
    /// [`GuestMemFile::update_restored`] to bring it up to date); the
    /// errors of [`GuestMemFile::set_policy`] while re-applying policies.
    pub fn restore_runs(
        fd: OwnedFd,
        descriptor: &GmemDescriptor,
        runs: impl IntoIterator<Item = FolioRun>,
    ) -> Result<Arc<GuestMemFile>, GmemError> {
        check_create(descriptor.size, descriptor.flags, descriptor.backend)?;
        check_fd_kind(fd.as_fd(), descriptor.backend).map_err(invalid_restore)?;
        let stat = rustix::fs::fstat(&fd).map_err(|errno| GmemError::Restore {
            reason: "fstat of the fd failed".to_owned(),
            errno,
        })?;
        if stat.st_size as u64 != descriptor.size {
            return Err(invalid_restore(format!(
                "the fd's file has {} bytes, the descriptor says {}",
                stat.st_size, descriptor.size
            )));
        }
        let backend = descriptor.backend;
        let order = backend.folio_order();
        let pages = descriptor.size / PAGE_SIZE;
        let file = GuestMemFile::build(
            fd,
            descriptor.size,
            descriptor.flags,
            backend,
            descriptor.frozen,
            |state| {
                for run in runs {
                    check_restored_run(run, backend, order, pages).map_err(invalid_restore)?;
                    state.record_present_run_unpublished(run.start.0 >> order.0, run.count);
                }
                Ok(())
            },
        )?;
        for (range, policy) in &descriptor.policies {
            file.set_policy(range.clone(), *policy)?;
        }
        Ok(file)
    }

    /// Brings an object restored ahead of a handover (from an earlier
    /// description of the same file, e.g. a transfer offer) up to date with
    /// a later description, `runs` in ascending page order: the folios it
    /// lists that this object lacks are recorded (the predecessor allocated
    /// them in between, while it had the file unfrozen). Returns how many
    /// folios were recorded; [`GuestMemFile::index_generation`] changes when
    /// that is not 0.
    ///
    /// Only while frozen, so that no allocation or punch of this process
    /// runs meanwhile: the call then only adds what the kernel object
    /// already holds. Only additions: a folio this object has that the
    /// description lacks was freed in between, and a folio recorded present
    /// that the kernel no longer holds would never fault again; such an
    /// object cannot be brought up to date (drop it and restore anew).
    ///
    /// Errors: EBUSY (`Restore`) when the file is not frozen; EINVAL
    /// (`Restore`) when a run is empty, outside the file, misaligned, of the
    /// wrong order or out of ascending order, or when this object has a
    /// folio the description lacks (nothing is recorded then).
    pub fn update_restored(
        &self,
        runs: impl IntoIterator<Item = FolioRun>,
    ) -> Result<u64, GmemError> {
        if !self.is_frozen() {
            return Err(GmemError::Restore {
                reason: "only a frozen file can be brought up to date with a description"
                    .to_owned(),
                errno: Errno::BUSY,
            });
        }
        let order = self.order;
        let mut described: Vec<Range<u64>> = Vec::new();
        for run in runs {
            check_restored_run(run, self.backend, order, self.pages()).map_err(invalid_restore)?;
            let first = run.start.0 >> order.0;
            let end = first + run.count;
            match described.last_mut() {
                Some(last) if last.end == first => last.end = end,
                Some(last) if last.end > first => {
                    return Err(invalid_restore(format!(
                        "the run at {} is not after the one before it",
                        run.start
                    )));
                }
                _ => described.push(first..end),
            }
        }
        // Every maximal run of this object must lie inside one coalesced
        // range of the description.
        let mut ranges = described.iter().peekable();
        for (first, count) in self.state.index().runs() {
            while ranges.next_if(|range| range.end <= first).is_some() {}
            if !ranges
                .peek()
                .is_some_and(|range| range.start <= first && first + count <= range.end)
            {
                return Err(invalid_restore(format!(
                    "this object has folios from {} on that the description lacks (freed since the object was restored)",
                    PageIndex(first << order.0)
                )));
            }
        }
        Ok(described
            .iter()
            .map(|range| {
                self.state
                    .record_present_run(range.start, range.end - range.start)
            })
            .sum())
    }

    /// Makes the object: `fill` may record folios in its state before it is
    /// published (registered, and so reachable by other threads).
    fn build(
        fd: OwnedFd,
        size: u64,
        flags: GmemFlags,
        backend: Backend,
        frozen: bool,
        fill: impl FnOnce(&mut FileState) -> Result<(), GmemError>,
    ) -> Result<Arc<GuestMemFile>, GmemError> {
        let key = registry::inode_key(fd.as_fd()).map_err(|errno| GmemError::System {
            backend,
            operation: "fstat the new file",
            errno,
        })?;
        if registry::is_registered(key) {
            return Err(GmemError::Restore {
                reason: "this process already has an object for this file; use gmem::lookup"
                    .to_owned(),
                errno: Errno::BUSY,
            });
        }
        let order = backend.folio_order();
        let mut state = FileState::new(size >> (order.0 as u32 + crate::types::PAGE_SHIFT));
        fill(&mut state)?;
        if frozen {
            // A new object has no readers yet, so no grace period is needed.
            state.freeze_unpublished();
        }
        let id = registry::next_id();
        let file = Arc::new(GuestMemFile {
            fd,
            size,
            flags,
            backend,
            order,
            state,
            mapping: OnceLock::new(),
            policies: Mutex::new(PolicyRanges::default()),
            unfreeze_event: OnceLock::new(),
            key,
            id,
        });
        registry::register(key, id, &file).map_err(|errno| GmemError::Restore {
            reason: "this process already has an object for this file; use gmem::lookup".to_owned(),
            errno,
        })?;
        Ok(file)
    }

    /// The size in bytes (fixed at creation).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The number of 4 KiB pages.
    pub fn pages(&self) -> u64 {
        self.size / PAGE_SIZE
    }

    /// The creation flags.
    pub fn flags(&self) -> GmemFlags {
        self.flags
    }

    /// The backend.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The folio order (0 for 4 KiB, 9 for 2 MiB).
    pub fn folio_order(&self) -> FolioOrder {
        self.order
    }

    /// The folio size in bytes.
    pub fn folio_size(&self) -> u64 {
        self.order.bytes()
    }

    /// The kernel object's fd (for KVM memslots, preservation, userfaultfd).
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// The metadata a successor needs (with `populated()` and the fd).
    pub fn descriptor(&self) -> GmemDescriptor {
        GmemDescriptor {
            size: self.size,
            flags: self.flags,
            backend: self.backend,
            policies: self.lock_policies().ranges().to_vec(),
            frozen: self.is_frozen(),
        }
    }

    /// `fallocate(2)` with guest_memfd's semantics: `KEEP_SIZE` allocates,
    /// `KEEP_SIZE | PUNCH_HOLE` frees; performed on the real fd and recorded
    /// in the page-state index.
    ///
    /// Errors, in the kernel's order (see [`crate::validate`]): EINVAL
    /// (offset < 0, len <= 0, unaligned offset or len, allocation past the
    /// size); EOPNOTSUPP (unknown or unsupported mode bits, no KEEP_SIZE);
    /// EFBIG (offset + len past 2^63 - 1); then EPERM (`Frozen`) when the
    /// file is frozen; then the kernel's ENOSPC, ENOMEM or EINTR
    /// (`Fallocate`).
    pub fn fallocate(&self, mode: FallocMode, offset: i64, len: i64) -> Result<(), GmemError> {
        let request = validate::fallocate(mode, offset, len, self.size, self.folio_size())
            .map_err(|(errno, reason)| GmemError::FallocateRejected {
                mode,
                offset,
                len,
                errno,
                reason,
            })?;
        let folio_bytes = self.folio_size();
        let result = match request {
            FallocateRequest::Allocate(bytes) => self.state.allocate_range(
                crate::freeze_domain(),
                bytes.start / folio_bytes..bytes.end / folio_bytes,
                state::chunk_folios(self.order.pages()),
                |folios| self.kernel_allocate(folios),
            ),
            FallocateRequest::PunchHole(bytes) => self.state.punch_range(
                crate::freeze_domain(),
                bytes.start / folio_bytes..bytes.end / folio_bytes,
                || self.kernel_punch(bytes.clone()),
            ),
        };
        result.map_err(|refused| match refused {
            Refused::Frozen => GmemError::Frozen {
                operation: format!("fallocate(mode {mode}, offset {offset}, len {len})"),
            },
            Refused::Kernel(errno) => GmemError::Fallocate {
                mode,
                offset,
                len,
                errno,
            },
        })
    }

    /// The fault path: the folio holding page `index`. A present folio is
    /// returned at once (a lock-free index lookup, also while frozen); a
    /// missing one is allocated under the file's NUMA policy and recorded.
    ///
    /// Errors: EINVAL (`IndexOutOfRange`); EPERM (`Frozen`) when the folio is
    /// missing and the file frozen — the caller exits to its VMM logic (or
    /// the fault service parks the fault); ENOSPC, ENOMEM, EINTR from the
    /// kernel (`Allocate`).
    #[inline]
    pub fn get_folio(&self, index: PageIndex) -> Result<Folio<'_>, GmemError> {
        let folio = self.folio_number(index)?;
        if !self.state.index().contains(folio) {
            self.allocate_folio::<true>(index, folio)?;
        }
        Ok(self.folio_handle(folio))
    }

    /// [`GuestMemFile::get_folio`] built without the freeze check (no read
    /// section, no FROZEN test), so a benchmark can compare the two paths
    /// side by side. It breaks the freeze, so only [`crate::bench`] reaches it.
    #[cfg(all(feature = "bench", not(loom)))]
    pub(crate) fn get_folio_without_freeze_check(
        &self,
        index: PageIndex,
    ) -> Result<Folio<'_>, GmemError> {
        let folio = self.folio_number(index)?;
        if !self.state.index().contains(folio) {
            self.allocate_folio::<false>(index, folio)?;
        }
        Ok(self.folio_handle(folio))
    }

    /// Runs only the freeze check of the fault path (the SRCU read section
    /// and the FROZEN load), for the benchmark that prices it. Returns
    /// whether an allocation would be allowed now.
    #[cfg(all(feature = "bench", not(loom)))]
    pub(crate) fn freeze_check_for_bench(&self) -> bool {
        self.state.freeze_check_only(crate::freeze_domain())
    }

    #[inline]
    fn folio_number(&self, index: PageIndex) -> Result<u64, GmemError> {
        if index.0 >= self.pages() {
            return Err(GmemError::IndexOutOfRange {
                index,
                pages: self.pages(),
            });
        }
        Ok(index.0 >> self.order.0)
    }

    #[inline]
    fn folio_handle(&self, folio: u64) -> Folio<'_> {
        Folio {
            file: self,
            index: PageIndex(folio << self.order.0),
            order: self.order,
        }
    }

    #[cold]
    #[inline(never)]
    fn allocate_folio<const FREEZE_CHECK: bool>(
        &self,
        index: PageIndex,
        folio: u64,
    ) -> Result<(), GmemError> {
        let allocate = |folio: u64| self.kernel_allocate(folio..folio + 1);
        let result = if FREEZE_CHECK {
            self.state.fault(crate::freeze_domain(), folio, allocate)
        } else {
            self.state.fault_without_freeze_check(folio, allocate)
        };
        match result {
            Ok(_) => Ok(()),
            Err(Refused::Frozen) => Err(GmemError::Frozen {
                operation: format!("allocating the folio of {index}"),
            }),
            Err(Refused::Kernel(errno)) => Err(GmemError::Allocate { index, errno }),
        }
    }

    /// The kernel call behind every allocation: fallocate(KEEP_SIZE) of the
    /// folios. On hugetlb (no shared policy in the kernel) the thread's
    /// policy is set to the file's for the call; see [`crate::policy`].
    fn kernel_allocate(&self, folios: Range<u64>) -> Result<(), Errno> {
        let folio_bytes = self.folio_size();
        let offset = folios.start * folio_bytes;
        let len = (folios.end - folios.start) * folio_bytes;
        let policy = if self.backend == Backend::Hugetlb {
            self.lock_policies()
                .at(PageIndex(folios.start << self.order.0))
        } else {
            MemPolicy::Default
        };
        if policy == MemPolicy::Default {
            return rustix::fs::fallocate(&self.fd, FallocateFlags::KEEP_SIZE, offset, len);
        }
        let previous = policy::set_thread_policy(policy)?;
        let result = rustix::fs::fallocate(&self.fd, FallocateFlags::KEEP_SIZE, offset, len);
        policy::set_thread_policy(previous)?;
        result
    }

    fn kernel_punch(&self, bytes: Range<u64>) -> Result<(), Errno> {
        if bytes.is_empty() {
            return Ok(());
        }
        rustix::fs::fallocate(
            &self.fd,
            FallocateFlags::KEEP_SIZE | FallocateFlags::PUNCH_HOLE,
            bytes.start,
            bytes.end - bytes.start,
        )
    }

    /// Freezes (`true`) or unfreezes (`false`) the file; returns whether it
    /// was frozen before.
    ///
    /// `freeze(true)` returns only when no allocation or punch hole that
    /// could have missed the flag is still running; from then until
    /// `freeze(false)` every allocation and punch fails with EPERM, while
    /// present folios are still served. On the kvm backend this binds this
    /// crate's paths (fallocate, get_folio), not the kernel's own faults on
    /// behalf of a vCPU. Must not be called from inside a read section of
    /// [`crate::FREEZE_DOMAIN`] (it would wait for itself).
    pub fn freeze(&self, freeze: bool) -> bool {
        if freeze {
            self.state.freeze(crate::freeze_domain())
        } else {
            let was_frozen = self.state.unfreeze();
            self.notify_unfrozen();
            was_frozen
        }
    }

    /// Whether the file is frozen now.
    pub fn is_frozen(&self) -> bool {
        self.state.is_frozen()
    }

    /// An eventfd that becomes readable (count += 1) at every
    /// `freeze(false)`, so a fault service can serve parked faults without
    /// polling. Created on first call (a file never asked costs no fd).
    ///
    /// To not miss an unfreeze: get the eventfd, then check `is_frozen`,
    /// then wait; drain it by reading 8 bytes.
    ///
    /// Errors: EMFILE, ENFILE, ENOMEM from eventfd(2) (`System`).
    pub fn unfreeze_eventfd(&self) -> Result<BorrowedFd<'_>, GmemError> {
        if let Some(fd) = self.unfreeze_event.get() {
            return Ok(fd.as_fd());
        }
        let fresh = rustix::event::eventfd(
            0,
            rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK,
        )
        .map_err(|errno| GmemError::System {
            backend: self.backend,
            operation: "create the unfreeze eventfd",
            errno,
        })?;
        // A racing caller may have installed one first; theirs wins and
        // ours is closed.
        let _ = self.unfreeze_event.set(fresh);
        let installed = self.unfreeze_event.get().ok_or(GmemError::System {
            backend: self.backend,
            operation: "install the unfreeze eventfd",
            errno: Errno::NOMEM,
        })?;
        Ok(installed.as_fd())
    }

    fn notify_unfrozen(&self) {
        if let Some(event) = self.unfreeze_event.get() {
            // The counter cannot overflow in practice (2^64 - 2 unfreezes);
            // EAGAIN would only mean it is already signalled.
            let _ = rustix::io::write(event, &1u64.to_ne_bytes());
        }
    }

    /// The present folios, in index order, as (first page, order): what the
    /// preservation layer records. Stable while the file is frozen.
    pub fn populated(&self) -> impl Iterator<Item = (PageIndex, FolioOrder)> + '_ {
        let order = self.order;
        let mut from = 0;
        std::iter::from_fn(move || {
            let folio = self.state.index().next_present(from)?;
            from = folio + 1;
            Some((PageIndex(folio << order.0), order))
        })
    }

    /// The present folios as maximal runs, in index order: what the
    /// preservation layer records, walked a word (64 folios) at a time
    /// (never-used parts of the index cost nothing, a full word one
    /// comparison). Stable while the file is frozen.
    pub fn populated_runs(&self) -> impl Iterator<Item = FolioRun> + '_ {
        let order = self.order;
        self.state
            .index()
            .runs()
            .map(move |(first, count)| FolioRun {
                start: PageIndex(first << order.0),
                count,
                order,
            })
    }

    /// A counter that changes whenever the set of present folios changes
    /// (allocation, punch hole, restore, [`GuestMemFile::update_restored`]),
    /// so a caller that described the file can tell later, without a walk,
    /// whether its description still holds. Exact while the file is frozen
    /// (`freeze(true)` waits for every allocation and punch, and none starts
    /// until unfreeze); a change racing the read shows in a later read.
    pub fn index_generation(&self) -> u64 {
        self.state.index().generation()
    }

    /// How many folios are present.
    pub fn populated_count(&self) -> u64 {
        self.state.index().count()
    }

    /// Whether the folio holding `index` is present (lock-free; no
    /// allocation).
    pub fn is_present(&self, index: PageIndex) -> bool {
        index.0 < self.pages() && self.state.index().contains(index.0 >> self.order.0)
    }

    /// Heap bytes of this file's page-state index (memory report).
    pub fn index_heap_bytes(&self) -> usize {
        self.state.index().heap_bytes()
    }

    /// Sets the shared NUMA policy of pages `range` (mbind on the mapping).
    ///
    /// Errors: EINVAL (`PolicyRejected`) for an empty range, a range past the
    /// end or not folio-aligned, or a node that does not exist; ENODEV when
    /// the file cannot be mapped; the kernel's mbind errors (`Policy`).
    pub fn set_policy(&self, range: Range<PageIndex>, policy: MemPolicy) -> Result<(), GmemError> {
        let rejected = |reason: String| GmemError::PolicyRejected {
            policy,
            range: range.clone(),
            reason,
        };
        if range.start >= range.end || range.end.0 > self.pages() {
            return Err(rejected(format!(
                "the range must be non-empty and inside the file's {} pages",
                self.pages()
            )));
        }
        if !range.start.0.is_multiple_of(self.order.pages())
            || !range.end.0.is_multiple_of(self.order.pages())
        {
            return Err(rejected(format!(
                "the range must be aligned to the file's {}",
                self.order
            )));
        }
        policy.check_nodes().map_err(rejected)?;
        let mapping = self.raw_mapping(true)?;
        let address = mapping.address.as_ptr() as usize + range.start.byte_offset() as usize;
        let len = (range.end.0 - range.start.0) * PAGE_SIZE;
        let mut policies = self.lock_policies();
        policy::mbind(address, len as usize, policy).map_err(|errno| GmemError::Policy {
            operation: format!(
                "mbind({policy:?}) of pages {}..{}",
                range.start.0, range.end.0
            ),
            errno,
        })?;
        policies.set(range, policy);
        Ok(())
    }

    /// The NUMA policy in force at page `index`, as the kernel reports it
    /// (get_mempolicy with MPOL_F_ADDR on the mapping).
    ///
    /// Errors: EINVAL (`IndexOutOfRange`); ENODEV when the file cannot be
    /// mapped; the kernel's get_mempolicy errors (`Policy`).
    pub fn policy_at(&self, index: PageIndex) -> Result<MemPolicy, GmemError> {
        self.folio_number(index)?;
        let mapping = self.raw_mapping(true)?;
        let address = mapping.address.as_ptr() as usize + index.byte_offset() as usize;
        policy::policy_at_address(address).map_err(|errno| GmemError::Policy {
            operation: format!("get_mempolicy at {index}"),
            errno,
        })
    }

    fn lock_policies(&self) -> std::sync::MutexGuard<'_, PolicyRanges> {
        // Poisoning is ignored: `PolicyRanges::set` cannot panic halfway.
        self.policies.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A safe view of the file's host mapping (made on first use).
    ///
    /// Errors: ENODEV (`NotMappable`) without GUEST_MEMFD_FLAG_MMAP, or on
    /// the kvm backend without INIT_SHARED (a host access would SIGBUS);
    /// the kernel's mmap errors (`Map`), e.g. ENOMEM.
    pub fn mapping(&self) -> Result<Mapping<'_>, GmemError> {
        let raw = self.raw_mapping(false)?;
        Ok(Mapping { file: self, raw })
    }

    /// The mapping; `internal` allows it for policy calls on memfd files
    /// without MMAP (mbind needs an address, no byte is touched).
    fn raw_mapping(&self, internal: bool) -> Result<&RawMapping, GmemError> {
        if let Some(raw) = self.mapping.get() {
            if !internal {
                self.check_mappable()?;
            }
            return Ok(raw);
        }
        if !(internal && self.backend != Backend::Kvm) {
            self.check_mappable()?;
        }
        let fresh = RawMapping::new(&self.fd, self.size, self.backend)?;
        // A racing caller may have mapped first: keep theirs (the fault
        // service may have registered it) and unmap ours.
        let _ = self.mapping.set(fresh);
        self.mapping.get().ok_or(GmemError::Map {
            len: self.size,
            errno: Errno::NOMEM,
        })
    }

    fn check_mappable(&self) -> Result<(), GmemError> {
        if !self.flags.contains(GmemFlags::MMAP) {
            return Err(GmemError::NotMappable {
                reason: "the file was created without GUEST_MEMFD_FLAG_MMAP",
            });
        }
        if self.backend == Backend::Kvm && !self.flags.contains(GmemFlags::INIT_SHARED) {
            return Err(GmemError::NotMappable {
                reason: "a kvm guest_memfd without INIT_SHARED is private: host access would raise SIGBUS",
            });
        }
        Ok(())
    }
}

impl Drop for GuestMemFile {
    fn drop(&mut self) {
        registry::unregister(self.key, self.id);
    }
}

/// A restore's EINVAL for bad saved state.
fn invalid_restore(reason: String) -> GmemError {
    GmemError::Restore {
        reason,
        errno: Errno::INVAL,
    }
}

/// Checks a run of a description against a file of `pages` pages on
/// `backend` (folios of `order`); `Err` says why it does not fit.
fn check_restored_run(
    run: FolioRun,
    backend: Backend,
    order: FolioOrder,
    pages: u64,
) -> Result<(), String> {
    let start = run.start;
    if run.order != order {
        return Err(format!(
            "the run at {start} has {}, the {backend} backend uses {order}",
            run.order
        ));
    }
    if run.count == 0 {
        return Err(format!("the run at {start} is empty"));
    }
    if !start.0.is_multiple_of(order.pages()) {
        return Err(format!("{start} is not aligned to its {order}"));
    }
    if run.end().is_none_or(|end| end.0 > pages) {
        return Err(format!(
            "the run of {} folios at {start} reaches outside the file of {pages} pages",
            run.count
        ));
    }
    Ok(())
}

fn check_create(size: u64, flags: GmemFlags, backend: Backend) -> Result<(), GmemError> {
    if flags.unknown_bits() != 0 {
        return Err(GmemError::InvalidFlags {
            backend,
            flags: flags.0,
            reason: format!(
                "unknown bits {:#x} (known: MMAP = 0x1, INIT_SHARED = 0x2)",
                flags.unknown_bits()
            ),
        });
    }
    validate::create(size, backend.folio_order().bytes()).map_err(|reason| GmemError::InvalidSize {
        backend,
        size,
        reason,
    })
}

/// Makes the memfd of a memfd or hugetlb file: its size fixed for good by
/// seals, as guest_memfd's is (a raw ftruncate on the fd then fails with
/// EPERM where guest_memfd says EINVAL). F_SEAL_SEAL stops anyone adding
/// F_SEAL_WRITE later, which would make punch hole and faults fail.
fn make_memfd(size: u64, memfd_flags: MemfdFlags, backend: Backend) -> Result<OwnedFd, GmemError> {
    let system = |operation| {
        move |errno| GmemError::System {
            backend,
            operation,
            errno,
        }
    };
    let fd = rustix::fs::memfd_create(
        "gmem",
        memfd_flags | MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
    )
    .map_err(system("memfd_create"))?;
    rustix::fs::ftruncate(&fd, size).map_err(system("ftruncate the memfd to the file size"))?;
    rustix::fs::fcntl_add_seals(&fd, SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL)
        .map_err(system("seal the memfd's size"))?;
    Ok(fd)
}

/// Checks that `fd` is the kind of file `backend` makes; `Err` says why not.
fn check_fd_kind(fd: BorrowedFd<'_>, backend: Backend) -> Result<(), String> {
    let statfs = rustix::fs::fstatfs(fd).map_err(|errno| format!("fstatfs failed: {errno}"))?;
    let magic = statfs.f_type as i64;
    let expected = match backend {
        Backend::Memfd => TMPFS_MAGIC,
        Backend::Hugetlb => HUGETLBFS_MAGIC,
        Backend::Kvm => ANON_INODE_FS_MAGIC,
    };
    if magic != expected {
        return Err(format!(
            "the fd is on a filesystem with magic {magic:#x}, a {backend} file is on {expected:#x}"
        ));
    }
    if backend == Backend::Kvm {
        let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
            .map_err(|error| format!("cannot read /proc/self/fd: {error}"))?;
        if link.as_os_str() != GUEST_MEMFD_LINK {
            return Err(format!("the fd is {}, not a guest_memfd", link.display()));
        }
    }
    Ok(())
}

/// A folio of a file: its first page, its order and (when the file can be
/// mapped) its host address. Borrowing the file keeps the mapping alive.
///
/// The handle does not pin the folio: a later punch hole frees it, and a
/// touch after that faults again (through the fault service where one runs).
#[derive(Debug, Clone, Copy)]
pub struct Folio<'file> {
    file: &'file GuestMemFile,
    index: PageIndex,
    order: FolioOrder,
}

impl<'file> Folio<'file> {
    /// The first page of the folio.
    pub fn index(&self) -> PageIndex {
        self.index
    }

    /// The folio's order.
    pub fn order(&self) -> FolioOrder {
        self.order
    }

    /// The folio's size in bytes.
    pub fn size(&self) -> u64 {
        self.order.bytes()
    }

    /// The host address of the folio's first byte in the file's mapping
    /// (made on first use).
    ///
    /// Errors: those of [`GuestMemFile::mapping`].
    pub fn host_address(&self) -> Result<NonNull<u8>, GmemError> {
        let mapping = self.file.mapping()?;
        // The index is inside the file, so the offset is inside the mapping.
        Ok(mapping.raw.at(self.index.byte_offset()))
    }
}

/// The file's host mapping: one `MAP_SHARED` mapping of the whole file,
/// made once, unmapped when the file drops.
struct RawMapping {
    address: NonNull<u8>,
    len: usize,
}

// SAFETY: a RawMapping is an address range owned by its file; it has no
// thread affinity, and every access through it is by copy (see `Mapping`).
unsafe impl Send for RawMapping {}
// SAFETY: as above; shared access only reads the two fields.
unsafe impl Sync for RawMapping {}

impl RawMapping {
    fn new(fd: &OwnedFd, size: u64, backend: Backend) -> Result<RawMapping, GmemError> {
        let len = usize::try_from(size).map_err(|_| GmemError::Map {
            len: size,
            errno: Errno::NOMEM,
        })?;
        // hugetlb mmap would reserve huge pages for the whole file; the pool
        // holds only what is allocated, so reserve nothing at mmap time.
        let flags = if backend == Backend::Hugetlb {
            rustix::mm::MapFlags::SHARED | rustix::mm::MapFlags::NORESERVE
        } else {
            rustix::mm::MapFlags::SHARED
        };
        // SAFETY: a new mapping at an address the kernel picks (null hint)
        // replaces nothing; it covers the file's `len` bytes, which exist
        // for the file's lifetime (the size is fixed).
        let address = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                len,
                rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                flags,
                fd,
                0,
            )
        }
        .map_err(|errno| GmemError::Map { len: size, errno })?;
        let address = NonNull::new(address.cast::<u8>()).ok_or(GmemError::Map {
            len: size,
            errno: Errno::NOMEM,
        })?;
        Ok(RawMapping { address, len })
    }

    /// The address `offset` bytes in; the caller keeps `offset < len`.
    fn at(&self, offset: u64) -> NonNull<u8> {
        debug_assert!(offset < self.len as u64);
        // SAFETY: `offset` is below `len` (callers check against the file
        // size, which is `len`), so the result stays inside the mapping.
        unsafe { self.address.add(offset as usize) }
    }
}

impl Drop for RawMapping {
    fn drop(&mut self) {
        // SAFETY: the range was mapped by `new` and is unmapped once, here;
        // no `Mapping` or `Folio` outlives the file that owns this.
        let _ = unsafe { rustix::mm::munmap(self.address.as_ptr().cast(), self.len) };
    }
}

/// A safe view of a file's host mapping: the host address and length for a
/// KVM memslot, and byte copies in and out.
///
/// Guest memory is shared with the guest and other threads, so the view
/// hands out no references into it, only copies (as vm-memory does).
/// `write` allocates missing folios through `get_folio`, so it obeys the
/// freeze; `read` returns zeros for missing folios without allocating.
#[derive(Clone, Copy)]
pub struct Mapping<'file> {
    file: &'file GuestMemFile,
    raw: &'file RawMapping,
}

impl std::fmt::Debug for Mapping<'_> {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Mapping")
            .field("address", &self.raw.address)
            .field("len", &self.raw.len)
            .finish()
    }
}

impl Mapping<'_> {
    /// The host address of byte 0 (a memslot's `userspace_addr`).
    pub fn host_address(&self) -> NonNull<u8> {
        self.raw.address
    }

    /// The mapping's length in bytes (the file size).
    pub fn len(&self) -> u64 {
        self.raw.len as u64
    }

    /// Whether the mapping is empty (never: files have a size > 0).
    pub fn is_empty(&self) -> bool {
        self.raw.len == 0
    }

    fn check(&self, offset: u64, len: usize) -> Result<(), GmemError> {
        let end = offset.checked_add(len as u64);
        if end.is_none_or(|end| end > self.len()) {
            return Err(GmemError::OutOfBounds {
                offset,
                len: len as u64,
                size: self.len(),
            });
        }
        Ok(())
    }

    /// Copies `buffer.len()` bytes from file offset `offset`; missing
    /// folios read as zeros and stay missing.
    ///
    /// Errors: EFAULT (`OutOfBounds`) when the range leaves the file.
    pub fn read(&self, offset: u64, buffer: &mut [u8]) -> Result<(), GmemError> {
        self.check(offset, buffer.len())?;
        let folio_bytes = self.file.folio_size();
        let mut done = 0usize;
        while done < buffer.len() {
            let position = offset + done as u64;
            let chunk = ((folio_bytes - position % folio_bytes) as usize).min(buffer.len() - done);
            let target = &mut buffer[done..done + chunk];
            if self.file.is_present(PageIndex::containing(position)) {
                // SAFETY: `position..position + chunk` is inside the mapping
                // (checked above), the folio is present so the read does not
                // allocate, and the copy goes into a buffer we own. Guest
                // memory may change under the copy (shared memory, as with
                // vm-memory); the bytes are plain data.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        self.raw.at(position).as_ptr(),
                        target.as_mut_ptr(),
                        chunk,
                    );
                }
            } else {
                target.fill(0);
            }
            done += chunk;
        }
        Ok(())
    }

    /// Copies `data` to file offset `offset`, allocating missing folios
    /// through `get_folio` first.
    ///
    /// Errors: EFAULT (`OutOfBounds`); those of [`GuestMemFile::get_folio`]
    /// (EPERM while frozen and a folio is missing; ENOSPC, ENOMEM). Folios
    /// before the failing one are already written.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<(), GmemError> {
        self.check(offset, data.len())?;
        let folio_bytes = self.file.folio_size();
        let mut done = 0usize;
        while done < data.len() {
            let position = offset + done as u64;
            let chunk = ((folio_bytes - position % folio_bytes) as usize).min(data.len() - done);
            self.file.get_folio(PageIndex::containing(position))?;
            // SAFETY: in bounds (checked above) and the folio is present (just
            // allocated or found), so the store does not fault into an
            // allocation behind `get_folio`'s back; the source is our slice.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    data[done..].as_ptr(),
                    self.raw.at(position).as_ptr(),
                    chunk,
                );
            }
            done += chunk;
        }
        Ok(())
    }
}
