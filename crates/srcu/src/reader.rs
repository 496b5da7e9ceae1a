//! Reader slots: the counters a grace period sums, one set per thread.
//!
//! Model: each domain keeps a registry of [`ReaderSlot`]s. A thread that
//! enters a read section of a domain for the first time claims a free slot
//! (or adds one) and caches it in a thread-local, so later read sections find
//! it with one thread-local load and one compare. A slot is owned by at most
//! one thread at a time, and only the owner writes its `lock`/`unlock`
//! counters, so it bumps them with a plain load and store: no locked
//! read-modify-write, no shared cache line written by two threads (slots are
//! cache-padded).
//!
//! Two paths write the `*_shared` counters with `fetch_add` instead:
//! a guard dropped on a thread that does not own its slot (guards are `Send`),
//! and a read section entered while the thread's locals are being torn down
//! (it uses the domain's orphan slot, which nobody owns).
//!
//! Invariants:
//! 1. `owner` is 0 (free), [`ORPHAN_OWNER`] (the orphan slot) or the marker of
//!    the one live thread that owns the slot.
//! 2. Counters only grow (wrapping at 2^64). The grace period compares sums
//!    modulo 2^64; the true difference between all lock and all unlock
//!    increments of one index is the number of live read sections, far below
//!    2^63, so modular equality is true equality and wrap-around cannot fake
//!    a quiescent state.
//! 3. A slot outlives every guard that points at it: the domain's registry
//!    holds it until the domain drops, and guards borrow the domain.
//! 4. When a thread exits its slots are released (owner := 0, Release), and a
//!    later claimer acquires them (Acquire), so it continues from the last
//!    counter values the previous owner stored.

use crate::sync::{Arc, AtomicU64, AtomicUsize, Ordering};
use crossbeam_utils::CachePadded;

/// `owner` value of a domain's orphan slot: never 0 and never a thread marker
/// (markers are addresses of a thread-local byte, which are never 1).
pub(crate) const ORPHAN_OWNER: usize = 1;

/// One thread's counters for one domain.
#[derive(Debug)]
pub(crate) struct ReaderSlot {
    /// Lock increments per index, written by the owner only.
    lock: [AtomicU64; 2],
    /// Unlock increments per index, written by the owner only.
    unlock: [AtomicU64; 2],
    /// Lock increments per index by threads that do not own the slot.
    lock_shared: [AtomicU64; 2],
    /// Unlock increments per index by threads that do not own the slot.
    unlock_shared: [AtomicU64; 2],
    /// Marker of the owning thread, 0 when free (invariant 1).
    owner: AtomicUsize,
}

/// A cache-padded slot as stored in registries and thread-locals.
pub(crate) type SharedSlot = Arc<CachePadded<ReaderSlot>>;

impl ReaderSlot {
    /// A slot owned by `owner` with all counters at zero.
    #[cfg(not(loom))]
    pub(crate) const fn new(owner: usize) -> ReaderSlot {
        ReaderSlot {
            lock: [AtomicU64::new(0), AtomicU64::new(0)],
            unlock: [AtomicU64::new(0), AtomicU64::new(0)],
            lock_shared: [AtomicU64::new(0), AtomicU64::new(0)],
            unlock_shared: [AtomicU64::new(0), AtomicU64::new(0)],
            owner: AtomicUsize::new(owner),
        }
    }

    /// A slot owned by `owner` with all counters at zero.
    #[cfg(loom)]
    pub(crate) fn new(owner: usize) -> ReaderSlot {
        ReaderSlot {
            lock: [AtomicU64::new(0), AtomicU64::new(0)],
            unlock: [AtomicU64::new(0), AtomicU64::new(0)],
            lock_shared: [AtomicU64::new(0), AtomicU64::new(0)],
            unlock_shared: [AtomicU64::new(0), AtomicU64::new(0)],
            owner: AtomicUsize::new(owner),
        }
    }

    /// Counts a lock on `index` by the slot's owner thread.
    #[inline(always)]
    pub(crate) fn owner_lock(&self, index: usize) {
        // `& 1` on every index: indexes are 0 or 1 already, and the mask lets
        // the compiler drop the bounds check from the read-side fast path.
        bump_owned(&self.lock[index & 1]);
    }

    /// Counts a lock on `index` by a thread that does not own the slot.
    pub(crate) fn shared_lock(&self, index: usize) {
        self.lock_shared[index & 1].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts an unlock on `index` by whichever thread drops the guard.
    #[inline(always)]
    pub(crate) fn unlock(&self, index: usize) {
        if self.owner.load(Ordering::Relaxed) == thread_marker() {
            // We own the slot: no other thread writes `unlock`, see the
            // module invariants.
            bump_owned(&self.unlock[index & 1]);
        } else {
            self.unlock_shared[index & 1].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// All lock increments on `index` (wrapping sum).
    pub(crate) fn locks(&self, index: usize) -> u64 {
        self.lock[index]
            .load(Ordering::Relaxed)
            .wrapping_add(self.lock_shared[index].load(Ordering::Relaxed))
    }

    /// All unlock increments on `index` (wrapping sum).
    pub(crate) fn unlocks(&self, index: usize) -> u64 {
        self.unlock[index]
            .load(Ordering::Relaxed)
            .wrapping_add(self.unlock_shared[index].load(Ordering::Relaxed))
    }

    /// Tries to make the calling thread the owner of a free slot.
    pub(crate) fn try_claim(&self, marker: usize) -> bool {
        // Acquire pairs with the Release in `release`: the new owner's plain
        // load-and-store bumps start from the previous owner's last values.
        self.owner
            .compare_exchange(0, marker, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
    }

    /// Gives the slot back when its owner thread exits.
    pub(crate) fn release(&self, marker: usize) {
        // Release pairs with the Acquire in `try_claim` (invariant 4). A
        // failed exchange means the slot was never ours: nothing to give back.
        let _ = self
            .owner
            .compare_exchange(marker, 0, Ordering::Release, Ordering::Relaxed);
    }
}

/// Bumps a counter only the calling thread writes: a relaxed load and store
/// instead of a locked read-modify-write, which is what keeps the read side
/// near the cost of a plain load.
#[inline(always)]
fn bump_owned(counter: &AtomicU64) {
    let value = counter.load(Ordering::Relaxed);
    counter.store(value.wrapping_add(1), Ordering::Relaxed);
}

#[cfg(not(loom))]
std::thread_local! {
    /// Its address identifies the thread (see [`thread_marker`]).
    static MARKER: u8 = const { 0 };
    /// The slot of the domain this thread entered last: `(domain id, slot)`.
    /// No destructor, so reading it costs one thread-local load.
    static LAST: std::cell::Cell<(u64, *const ReaderSlot)> =
        const { std::cell::Cell::new((0, std::ptr::null())) };
    /// Every slot this thread owns, keeping them alive; releases them at exit.
    static OWNED: OwnedSlots = const { OwnedSlots { slots: std::cell::RefCell::new(Vec::new()) } };
}

#[cfg(loom)]
loom::thread_local! {
    static MARKER: u8 = 0;
    static LAST: std::cell::Cell<(u64, *const ReaderSlot)> = std::cell::Cell::new((0, std::ptr::null()));
    static OWNED: OwnedSlots = OwnedSlots { slots: std::cell::RefCell::new(Vec::new()) };
}

/// A number unique among live threads: the address of a thread-local byte.
/// 0 (which owns nothing) once the thread's locals are being destroyed.
#[inline(always)]
pub(crate) fn thread_marker() -> usize {
    MARKER
        .try_with(|marker| marker as *const u8 as usize)
        .unwrap_or(0)
}

/// The calling thread's slots, released when the thread exits.
pub(crate) struct OwnedSlots {
    /// `(domain id, slot, marker the slot was claimed with)`.
    slots: std::cell::RefCell<Vec<(u64, SharedSlot, usize)>>,
}

impl Drop for OwnedSlots {
    fn drop(&mut self) {
        // Forget the fast-path pointer first: once the Arcs below are gone it
        // could dangle. A thread-local that is already destroyed is fine too.
        let _ = LAST.try_with(|last| last.set((0, std::ptr::null())));
        for (_, slot, marker) in self.slots.get_mut().drain(..) {
            slot.release(marker);
        }
    }
}

/// The calling thread's slot for domain `domain_id`, from the one-entry cache.
#[inline(always)]
pub(crate) fn cached_slot(domain_id: u64) -> Option<*const ReaderSlot> {
    let (cached_id, slot) = LAST.try_with(std::cell::Cell::get).ok()?;
    (cached_id == domain_id).then_some(slot)
}

/// Finds or claims the calling thread's slot for a domain, caching it.
///
/// `claim` is called (under the domain's registry lock) when the thread has
/// no slot for the domain yet; it must return a slot the thread now owns.
/// Returns `None` while the thread's locals are being destroyed; the caller
/// then uses the domain's orphan slot.
pub(crate) fn find_or_claim(
    domain_id: u64,
    claim: impl FnOnce(usize) -> SharedSlot,
) -> Option<*const ReaderSlot> {
    let marker = thread_marker();
    if marker == 0 {
        return None;
    }
    let found = OWNED
        .try_with(|owned| {
            let mut slots = owned.slots.try_borrow_mut().ok()?;
            if let Some((_, slot, _)) = slots.iter().find(|(id, _, _)| *id == domain_id) {
                return Some(&***slot as *const ReaderSlot);
            }
            // A slot whose domain was dropped is held by us alone: forget it
            // here, so threads that outlive many domains do not accumulate.
            slots.retain(|(_, slot, _)| Arc::strong_count(slot) > 1);
            let slot = claim(marker);
            let pointer = &**slot as *const ReaderSlot;
            slots.push((domain_id, slot, marker));
            Some(pointer)
        })
        .ok()
        .flatten()?;
    // Cache only after `OWNED` holds the Arc (see `OwnedSlots::drop`).
    LAST.try_with(|last| last.set((domain_id, found))).ok()?;
    Some(found)
}
