//! The freeze protocol: the FROZEN flag, the SRCU domain, the page-state
//! index and the invalidate lock, with the kernel calls passed in as closures
//! (so a loom model runs this very code against a modelled kernel).
//!
//! Model (the seed's `kvm_gmem_freeze`, with the review's fixes):
//! - One runtime flag word per file; FROZEN is bit 0. Creation flags live
//!   elsewhere and never change.
//! - Every path that changes which folios exist (fault allocation, fallocate
//!   allocation, punch hole) runs inside a read section of the SRCU domain
//!   and checks FROZEN there, after the caller validated its input (the
//!   review: "Why not let the validation happen like before, then check
//!   kvm_gmem_is_frozen()?").
//! - Range allocations (`fallocate`) hold the invalidate lock shared, punch
//!   hole holds it exclusive (the kernel's `filemap_invalidate_lock`), so
//!   they never interleave their kernel calls and index updates.
//! - The fault path (one folio) takes no lock: the lock's two locked
//!   read-modify-writes, right after the allocation's system call, cost
//!   6 to 8 ns each on the project machine, on every first touch of guest
//!   memory. It detects an overlapping punch instead, with the punch
//!   sequence: a count a punch makes odd before it clears bits and even
//!   again when it is done. A fault reads it before its kernel call and
//!   again after setting its bit; the index's read-modify-write ordering
//!   (see `index`) makes the second read see any punch whose bit clearing
//!   came before the fault's bit was set. On a change, or an odd count at
//!   the start, the fault takes the lock shared (waiting for the punch) and
//!   allocates and records its folio again: the kernel call is idempotent,
//!   and a punch that overlapped may have freed the folio after the fault's
//!   kernel call. A punch waits for nothing but the lock.
//! - A present folio is found by a lock-free index lookup with no read
//!   section at all.
//!
//! Invariant: when `freeze` returns, no operation that could change the set
//! of folios is in flight, and none starts until `unfreeze`; and outside an
//! operation's critical section, the index equals the kernel's set of folios.
//! Within a fault that overlapped a punch, the index may show its folio
//! present before the kernel has it again (until its retry, a system call
//! later): a concurrent `get_folio` of that folio then returns at once, and
//! a touch of it meanwhile is a first touch the kernel itself serves (or,
//! under the fault service, retries until the folio is there).
//!
//! Success path of a fault (`fault`): 1. enter an SRCU read section;
//! 2. FROZEN set → refuse (EPERM); 3. read the punch sequence (odd → step 7);
//! 4. skip the folio if present; 5. allocate in the kernel; 6. set the index
//! bit, read the punch sequence again: unchanged → end section; 7. otherwise
//! take the lock shared, allocate again, set the bit, unlock, end section.
//!
//! Success path of a range allocation (`allocate_range`): 1–2 as above;
//! 3. take the invalidate lock shared; 4. skip folios already present;
//! 5. allocate in the kernel; 6. set the index bits; 7. unlock, end section.
//!
//! Success path of a punch (`punch_range`): 1–2 as above; 3. take the lock
//! exclusive; 4. make the punch sequence odd; 5. clear the bits (so a
//! concurrent lookup takes the fault path, which sees the odd sequence and
//! waits on the lock instead of returning a folio being freed); 6. punch in
//! the kernel; 7. make the sequence even, unlock, end section.
//!
//! Failure paths:
//! 1. Frozen: nothing was done; the caller gets EPERM.
//! 2. Kernel allocation fails for a chunk: the chunk is retried one folio at
//!    a time and each success is recorded, so the index is exact even where
//!    the kernel keeps a prefix of a failed range (guest_memfd does, shmem
//!    does not); the first error is returned.
//! 3. Kernel punch fails: the bits that were cleared are set again (the
//!    conservative direction: preservation may then record a folio that is
//!    gone, which restores as zeros, but never loses one that exists).

use std::ops::Range;

use srcu::Srcu;

use crate::index::PageStateIndex;
use crate::sync::{self, AtomicU32, AtomicU64, Ordering, RwLock};

/// Runtime flag: the file is frozen (`GUEST_MEMFD_F_MAPPING_FROZEN`).
const FROZEN: u32 = 1 << 0;

/// Folios per kernel allocation call in a range allocation: 512 base pages
/// (2 MiB), so a failed call costs at most 512 single-folio retries.
const CHUNK_BASE_FOLIOS: u64 = 512;

/// Why a protocol operation did not happen.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Refused<E> {
    /// The file was frozen when the operation checked.
    Frozen,
    /// The kernel call failed with this error.
    Kernel(E),
}

/// The per-file state the freeze protocol guards; see the module docs.
pub(crate) struct FileState {
    /// Runtime flags (FROZEN). Updated only by atomic read-modify-writes.
    flags: AtomicU32,
    index: PageStateIndex,
    /// Range allocations and retried faults shared, punch hole exclusive
    /// (`filemap_invalidate_lock`).
    invalidate: RwLock<()>,
    /// The punch sequence: odd while a punch runs (see the module docs).
    punches: AtomicU64,
}

impl FileState {
    /// The state of a fresh file of `folios` folios: unfrozen, empty.
    pub(crate) fn new(folios: u64) -> FileState {
        FileState {
            flags: AtomicU32::new(0),
            index: PageStateIndex::new(folios),
            invalidate: RwLock::new(()),
            punches: AtomicU64::new(0),
        }
    }

    /// The page-state index (read-only access for lookups and iteration).
    pub(crate) fn index(&self) -> &PageStateIndex {
        &self.index
    }

    /// Whether the file is frozen now.
    pub(crate) fn is_frozen(&self) -> bool {
        // Relaxed: a snapshot for reporting; the protocol's decisions read
        // the flag inside a read section (`check_frozen`).
        self.flags.load(Ordering::Relaxed) & FROZEN != 0
    }

    /// Reads FROZEN inside a read section. Relaxed is enough: the SRCU
    /// contract (every section that begins after `synchronize` returns sees
    /// every store made before it was called) is what orders this load after
    /// the `fetch_or` in `freeze`; the domain's barriers provide it.
    fn check_frozen<E>(&self) -> Result<(), Refused<E>> {
        if self.flags.load(Ordering::Relaxed) & FROZEN != 0 {
            Err(Refused::Frozen)
        } else {
            Ok(())
        }
    }

    /// Sets FROZEN, then waits until no operation that missed it is in
    /// flight. Returns whether the file was frozen already.
    ///
    /// The flag update is a `fetch_or`, not the seed's READ_ONCE/WRITE_ONCE
    /// pair: a concurrent unfreeze (or any future runtime bit) can no longer
    /// be lost between the read and the write.
    pub(crate) fn freeze(&self, domain: &Srcu) -> bool {
        // Relaxed: ordering against readers comes from `synchronize` (see
        // `check_frozen`); the RMW itself is what prevents lost updates.
        let previous = self.flags.fetch_or(FROZEN, Ordering::Relaxed);
        domain.synchronize();
        previous & FROZEN != 0
    }

    /// Clears FROZEN. Returns whether the file was frozen.
    ///
    /// Why no synchronize here (the review: "Why only synchronize on freeze
    /// but not unfreeze?"): `synchronize` exists to wait out operations that
    /// may have missed a flag that forbids them. Clearing FROZEN forbids
    /// nothing. An operation still in flight saw FROZEN either set (it fails
    /// with EPERM, exactly as if it had run a moment earlier, and its caller
    /// retries or parks) or clear (it is allowed anyway). No outcome needs
    /// waiting for, so unfreeze promises only that operations which begin
    /// after it returns (and are ordered after it, e.g. by the unfreeze
    /// notification) see the flag clear.
    pub(crate) fn unfreeze(&self) -> bool {
        // Release: pairs with whoever learns of the unfreeze through a
        // synchronizing channel (the unfreeze eventfd) and then allocates.
        self.flags.fetch_and(!FROZEN, Ordering::Release) & FROZEN != 0
    }

    /// The fault path's slow half: allocate `folio` unless present.
    /// Returns whether this call allocated it.
    pub(crate) fn fault<E>(
        &self,
        domain: &Srcu,
        folio: u64,
        allocate: impl FnMut(u64) -> Result<(), E>,
    ) -> Result<bool, Refused<E>> {
        let _section = domain.read_lock();
        self.check_frozen()?;
        self.fault_without_freeze_check(folio, allocate)
    }

    /// [`FileState::fault`] without the read section and the FROZEN check:
    /// the baseline against which the benchmark prices the freeze check, and
    /// the rest of `fault` itself, so the two differ by exactly the check.
    /// On its own it breaks the freeze, so only `fault` and the `bench`
    /// feature reach it.
    #[inline(always)]
    pub(crate) fn fault_without_freeze_check<E>(
        &self,
        folio: u64,
        mut allocate: impl FnMut(u64) -> Result<(), E>,
    ) -> Result<bool, Refused<E>> {
        // Acquire pairs with the Release that ends a punch: a fault that
        // reads the even count a punch left is ordered after its kernel call.
        let punches = self.punches.load(Ordering::Acquire);
        let mut inserted = false;
        if punches & 1 == 0 {
            if self.index.contains(folio) {
                return Ok(false);
            }
            allocate(folio).map_err(Refused::Kernel)?;
            inserted = self.index.insert(folio);
            // Relaxed is enough: when a punch's bit clearing came before the
            // insert's read-modify-write of the word, the insert acquired it,
            // and the punch's increment, sequenced before its clearing, is
            // then visible here (see `index`).
            if self.punches.load(Ordering::Relaxed) == punches {
                return Ok(inserted);
            }
        }
        self.fault_during_punch(folio, allocate)
            .map(|again| inserted || again)
    }

    /// The fault path when a punch ran meanwhile or is running: under the
    /// lock (so after the punch), allocate and record the folio again.
    /// Returns whether the folio was recorded absent before.
    #[cold]
    #[inline(never)]
    fn fault_during_punch<E>(
        &self,
        folio: u64,
        mut allocate: impl FnMut(u64) -> Result<(), E>,
    ) -> Result<bool, Refused<E>> {
        let _shared = sync::read(&self.invalidate);
        // Even when the bit is set: an overlapping punch may have freed the
        // folio after this fault's first kernel call. Allocating a present
        // folio allocates nothing. On failure the bit stays as it is: set
        // means the folio may exist, the conservative direction (failure
        // path 3).
        allocate(folio).map_err(Refused::Kernel)?;
        Ok(self.index.insert(folio))
    }

    /// Only the freeze check of the fault path (read section + FROZEN load),
    /// so a benchmark can price it on its own, free of the system call's
    /// noise. Returns whether an allocation would be allowed.
    #[cfg(all(feature = "bench", not(loom)))]
    pub(crate) fn freeze_check_only(&self, domain: &Srcu) -> bool {
        let _section = domain.read_lock();
        self.check_frozen::<()>().is_ok()
    }

    /// Sets FROZEN on a state no other thread can see yet (a restored file
    /// that was preserved frozen): with no readers, no grace period is due.
    pub(crate) fn freeze_unpublished(&self) {
        // Relaxed: the state is published later through an Arc, which orders
        // this store before any reader's first access.
        self.flags.fetch_or(FROZEN, Ordering::Relaxed);
    }

    /// Allocates every folio of `folios` that is not present, in chunks; see
    /// failure path 2 of the module documentation. `chunk_folios` is how many
    /// folios one kernel call covers.
    pub(crate) fn allocate_range<E>(
        &self,
        domain: &Srcu,
        folios: Range<u64>,
        chunk_folios: u64,
        mut allocate: impl FnMut(Range<u64>) -> Result<(), E>,
    ) -> Result<(), Refused<E>> {
        let _section = domain.read_lock();
        self.check_frozen()?;
        let _shared = sync::read(&self.invalidate);
        let chunk_folios = chunk_folios.max(1);
        let mut start = folios.start;
        while start < folios.end {
            let end = folios.end.min(start.saturating_add(chunk_folios));
            if (start..end).all(|folio| self.index.contains(folio)) {
                start = end;
                continue;
            }
            match allocate(start..end) {
                Ok(()) => {
                    self.index.insert_run(start, end - start);
                }
                // A failed chunk: pin down exactly which folios exist. If
                // every folio then succeeds alone (say the chunk was merely
                // interrupted), the chunk is complete and the range goes on.
                Err(_chunk_error) => self
                    .retry_one_by_one(start..end, &mut allocate)
                    .map_err(Refused::Kernel)?,
            }
            start = end;
        }
        Ok(())
    }

    /// After a failed chunk: allocate each folio alone and record every one
    /// that exists afterwards (a one-folio fallocate of a present folio
    /// succeeds without allocating, so success means present, and failure
    /// means absent). Returns the first error, after trying every folio.
    fn retry_one_by_one<E>(
        &self,
        folios: Range<u64>,
        allocate: &mut impl FnMut(Range<u64>) -> Result<(), E>,
    ) -> Result<(), E> {
        let mut first_error = None;
        for folio in folios {
            match allocate(folio..folio + 1) {
                Ok(()) => {
                    self.index.insert(folio);
                }
                Err(error) => {
                    first_error.get_or_insert(error);
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Punches the folios `folios` (already clamped to the file); see the
    /// punch path in the module documentation.
    pub(crate) fn punch_range<E>(
        &self,
        domain: &Srcu,
        folios: Range<u64>,
        punch: impl FnOnce() -> Result<(), E>,
    ) -> Result<(), Refused<E>> {
        let _section = domain.read_lock();
        self.check_frozen()?;
        let _exclusive = sync::write(&self.invalidate);
        let _running = PunchRunning::begin(&self.punches);
        let cleared = self
            .index
            .clear_run(folios.start, folios.end.saturating_sub(folios.start));
        punch().map_err(|error| {
            self.index.restore_cleared(&cleared);
            Refused::Kernel(error)
        })
    }

    /// Records a folio that exists already (the tests' and loom models'
    /// way to start from a populated file).
    #[cfg(test)]
    pub(crate) fn record_present(&self, folio: u64) -> bool {
        self.index.insert(folio)
    }

    /// Records a run of folios that exist already in a state no other
    /// thread can see yet (restore, before the file is published): whole
    /// words at a time, no atomic read-modify-write. Returns how many were
    /// not recorded before.
    pub(crate) fn record_present_run_unpublished(&mut self, first: u64, count: u64) -> u64 {
        self.index.insert_run_unpublished(first, count)
    }

    /// Records a run of folios that exist already in a published, frozen
    /// state (an object restored ahead being brought up to date with a later
    /// description of its file). The caller checked FROZEN: no allocation or
    /// punch runs, so the run only adds what the kernel already holds.
    /// Returns how many were not recorded before.
    pub(crate) fn record_present_run(&self, first: u64, count: u64) -> u64 {
        self.index.insert_run(first, count)
    }
}

/// The punch sequence odd for as long as it lives: made even again on every
/// exit of `punch_range` (a panic included), before the lock is released.
struct PunchRunning<'a> {
    punches: &'a AtomicU64,
}

impl<'a> PunchRunning<'a> {
    fn begin(punches: &'a AtomicU64) -> PunchRunning<'a> {
        // Relaxed: a fault that must see this increment sees it through the
        // index word the punch clears next (sequenced after it; see `fault`).
        punches.fetch_add(1, Ordering::Relaxed);
        PunchRunning { punches }
    }
}

impl Drop for PunchRunning<'_> {
    fn drop(&mut self) {
        // Release: pairs with the Acquire first read in `fault`, so a fault
        // that sees the punch over is ordered after its kernel call.
        self.punches.fetch_add(1, Ordering::Release);
    }
}

/// The number of folios a range allocation hands to one kernel call for
/// folios of `folio_pages` base pages.
pub(crate) fn chunk_folios(folio_pages: u64) -> u64 {
    (CHUNK_BASE_FOLIOS / folio_pages.max(1)).max(1)
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::collections::BTreeSet;

    static DOMAIN: Srcu = Srcu::new();

    /// A modelled kernel page cache that fails allocations at given folios.
    struct FakeKernel {
        pages: RefCell<BTreeSet<u64>>,
        failing: BTreeSet<u64>,
        keeps_prefix: bool,
    }

    impl FakeKernel {
        fn allocate(&self, folios: Range<u64>) -> Result<(), &'static str> {
            let mut added = Vec::new();
            for folio in folios {
                if self.failing.contains(&folio) {
                    if !self.keeps_prefix {
                        // shmem: undo what this call added.
                        let mut pages = self.pages.borrow_mut();
                        added.iter().for_each(|folio| {
                            pages.remove(folio);
                        });
                    }
                    return Err("ENOSPC");
                }
                if self.pages.borrow_mut().insert(folio) {
                    added.push(folio);
                }
            }
            Ok(())
        }
    }

    fn index_set(state: &FileState) -> BTreeSet<u64> {
        let mut set = BTreeSet::new();
        let mut from = 0;
        while let Some(folio) = state.index().next_present(from) {
            set.insert(folio);
            from = folio + 1;
        }
        set
    }

    #[test]
    fn failed_chunk_leaves_the_index_exact_for_both_kernel_behaviours() {
        for keeps_prefix in [true, false] {
            let state = FileState::new(2048);
            let kernel = FakeKernel {
                pages: RefCell::new(BTreeSet::from([3, 700])),
                failing: BTreeSet::from([600]),
                keeps_prefix,
            };
            state.record_present(3);
            state.record_present(700);
            let result = state.allocate_range(&DOMAIN, 0..1024, 512, |r| kernel.allocate(r));
            assert_eq!(result, Err(Refused::Kernel("ENOSPC")));
            assert_eq!(
                index_set(&state),
                *kernel.pages.borrow(),
                "keeps_prefix {keeps_prefix}"
            );
            assert!(state.index().contains(511) && !state.index().contains(600));
        }
    }

    #[test]
    fn frozen_refuses_allocation_and_punch_but_not_lookup() {
        let state = FileState::new(16);
        assert_eq!(state.fault(&DOMAIN, 1, |_| Ok::<(), ()>(())), Ok(true));
        assert!(!state.freeze(&DOMAIN));
        assert!(state.freeze(&DOMAIN), "second freeze reports frozen");
        assert_eq!(
            state.fault(&DOMAIN, 2, |_| Ok::<(), ()>(())),
            Err(Refused::Frozen)
        );
        assert_eq!(
            state.punch_range(&DOMAIN, 0..16, || Ok::<(), ()>(())),
            Err(Refused::Frozen)
        );
        assert!(state.index().contains(1), "a present folio stays served");
        assert!(state.unfreeze());
        assert!(!state.unfreeze());
        assert_eq!(
            state.punch_range(&DOMAIN, 0..16, || Ok::<(), ()>(())),
            Ok(())
        );
        assert!(!state.index().contains(1));
    }

    #[test]
    fn failed_punch_restores_the_bits_it_cleared() {
        let state = FileState::new(16);
        state.record_present(4);
        state.record_present(9);
        assert_eq!(
            state.punch_range(&DOMAIN, 0..8, || Err("EIO")),
            Err(Refused::Kernel("EIO"))
        );
        assert_eq!(index_set(&state), BTreeSet::from([4, 9]));
    }
}
