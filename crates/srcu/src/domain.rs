//! The SRCU domain: read sections and grace periods.
//!
//! Model (Linux `kernel/rcu/srcutree.c`, userspace form): a domain has a
//! one-bit index and, per reader slot, lock and unlock counters for each
//! index value. A reader loads the index, bumps `lock[index]`, runs its
//! critical section and bumps `unlock[index]` of the same index. A grace
//! period waits until no reader can be inside a critical section that began
//! before it:
//!
//! 1. Drain the inactive index: readers that loaded the index just before the
//!    previous flip may have bumped it late.
//! 2. Flip the index, so new readers use the other counters.
//! 3. Drain the old index.
//!
//! "Drain index i" repeats a check until it succeeds: sum all `unlock[i]`,
//! full barrier (A), sum all `lock[i]`; equal sums mean no reader is inside
//! a section counted under i. Reading unlocks before locks makes the check
//! immune to readers moving between counters: a reader whose unlock was seen
//! had its lock increment ordered before it (its own barrier C sits between),
//! so the lock is seen too, and equal sums leave no unmatched lock.
//!
//! Ordering argument (the barriers are named as in srcutree.c):
//! * B (reader, after the lock bump) pairs with A (writer, between the sums):
//!   a store-buffering pair. Either the writer's lock sum sees the reader's
//!   increment, and the grace period waits for the reader, or the reader's
//!   accesses after B see every store the writer made before A, which
//!   includes every store made before `synchronize` was called.
//! * C (reader, before the unlock bump) pairs with A as a message-passing
//!   pair: once the writer has seen the unlock, everything the reader did
//!   inside its section happens before what the writer does after A, which
//!   includes everything after `synchronize` returns.
//! * srcutree also puts full barriers E and D around the flip, and its own
//!   comments call both redundant: E is implied by the control dependency
//!   from the equal sums to the flip, and D's guarantee (a reader whose
//!   unlock the writer missed sees the flip at its next lock) is also given
//!   by A in the next check. They are left out here, so a grace period costs
//!   two writer barriers, not four: with the membarrier read side each one is
//!   an IPI to every CPU running a thread of the process, about 15 µs on
//!   this nested KVM, and four of them made the median `synchronize` with
//!   two busy readers about 60 µs; with two it measures 31 to 34 µs
//!   (`cargo run --release -p srcu --example compare`). Every writer
//!   barrier that remains pairs with the readers and is a membarrier under
//!   that read side, never a plain fence (see `barrier`). The loom models pass without E and D at
//!   preemption bound 5 and fail when A, B, C or either drain is removed.
//!   Progress stays bounded: after the first check's A every reader's next
//!   lock sees the flip, so each thread can add at most one late section to
//!   the old index.
//!
//! `synchronize` callers share grace periods: a caller needs one grace period
//! that starts after it called. Under the `grace` mutex it computes the
//! sequence number of the first grace period that starts after it took the
//! mutex (the mutex orders its earlier stores before that period's first
//! barrier), and waits on a condition variable until that one completes,
//! running it itself when nobody is. Waiting callers sleep on the condition
//! variable, so no wake-up is lost; the grace period itself polls readers a
//! few quick rounds, then yields, then sleeps with a bounded backoff.

use std::marker::PhantomData;
use std::time::Duration;

use crossbeam_utils::CachePadded;

use crate::barrier::ReadSide;
use crate::reader::{self, ORPHAN_OWNER, ReaderSlot, SharedSlot};
use crate::sync::{self, Arc, AtomicU64, AtomicUsize, Condvar, Mutex, Ordering};

/// Source of domain ids; 0 means "not assigned yet".
static NEXT_DOMAIN_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// Quick checks before a grace period starts to yield: read sections are
/// usually short (one page-cache lookup in gmem), so most grace periods end
/// within a few checks.
const QUICK_CHECKS: u32 = 3;
/// Checks that yield the CPU before the waiter starts to sleep.
const YIELDING_CHECKS: u32 = 8;
/// First sleep between checks once readers look long (they may sleep).
const FIRST_SLEEP: Duration = Duration::from_micros(10);
/// Longest sleep between checks: bounds the latency added after the last
/// reader leaves while keeping a waiter's CPU use negligible.
const LONGEST_SLEEP: Duration = Duration::from_millis(1);

/// A sleepable-RCU domain.
///
/// One domain can guard any number of objects (gmem uses a single
/// process-wide static domain for every guest memory file, as the seed
/// does, so that nothing per-CPU or per-thread is allocated per object).
/// Memory: the domain itself plus one 128-byte slot per thread that ever
/// entered one of its read sections (slots of exited threads are reused).
///
/// ```
/// use srcu::Srcu;
/// use std::sync::atomic::{AtomicBool, Ordering};
///
/// static DOMAIN: Srcu = Srcu::new();
/// static FROZEN: AtomicBool = AtomicBool::new(false);
///
/// // Reader: check the flag inside the read section.
/// let allowed = {
///     let _guard = DOMAIN.read_lock();
///     !FROZEN.load(Ordering::Relaxed)
/// };
/// assert!(allowed);
///
/// // Writer: set the flag, then wait out every reader that may have missed it.
/// FROZEN.store(true, Ordering::Relaxed);
/// DOMAIN.synchronize();
/// // From here no read section that saw FROZEN == false is still running.
/// ```
#[derive(Debug)]
pub struct Srcu {
    /// What readers read on every lock; written only by grace periods.
    hot: CachePadded<Hot>,
    /// The slot used by read sections entered during thread teardown.
    orphan: CachePadded<ReaderSlot>,
    /// Every per-thread slot ever claimed for this domain.
    readers: Mutex<Vec<SharedSlot>>,
    /// Grace-period sequencing; see the module documentation.
    grace: Mutex<GraceState>,
    /// Signalled whenever a grace period completes.
    grace_done: Condvar,
    /// `Some` when the read side was fixed at construction.
    fixed_read_side: Option<ReadSide>,
}

#[derive(Debug)]
struct Hot {
    /// Bit 0 selects the counters new readers bump. Only grace periods store
    /// it, one at a time (the `running` flag serialises them).
    index: AtomicUsize,
    /// 0 until the domain's first use, then `id << 2 | read side code`:
    /// the domain's key in threads' slot caches and its resolved read side
    /// in one word, so that a reader gets both with a single load.
    key: AtomicU64,
}

/// The low bits of `Hot::key`: the resolved read side (never 0, so a
/// resolved key is never 0).
const READ_SIDE_BITS: u64 = 0b11;
const READ_SIDE_MEMBARRIER: u64 = 1;
const READ_SIDE_FENCES: u64 = 2;

#[derive(Debug, Default)]
struct GraceState {
    /// Grace periods completed so far.
    completed: u64,
    /// Whether a grace period is running now (it will be `completed + 1`).
    running: bool,
}

impl Srcu {
    /// A domain whose read side is the process's (membarrier where the kernel
    /// offers it, else fences; see [`ReadSide::of_process`]). `const`, so a
    /// domain can be a `static`.
    #[cfg(not(loom))]
    pub const fn new() -> Srcu {
        Srcu::build(None)
    }

    /// A domain whose readers always use fences, whatever the process mode:
    /// the fallback path, kept selectable so it is tested and benchmarked on
    /// machines that have membarrier.
    #[cfg(not(loom))]
    pub const fn with_fences() -> Srcu {
        Srcu::build(Some(ReadSide::Fences))
    }

    #[cfg(not(loom))]
    const fn build(fixed_read_side: Option<ReadSide>) -> Srcu {
        Srcu {
            hot: CachePadded::new(Hot {
                index: AtomicUsize::new(0),
                key: AtomicU64::new(0),
            }),
            orphan: CachePadded::new(ReaderSlot::new(ORPHAN_OWNER)),
            readers: Mutex::new(Vec::new()),
            grace: Mutex::new(GraceState {
                completed: 0,
                running: false,
            }),
            grace_done: Condvar::new(),
            fixed_read_side,
        }
    }

    /// A domain for a loom model (always the fence read side).
    #[cfg(loom)]
    pub fn new() -> Srcu {
        Srcu {
            hot: CachePadded::new(Hot {
                index: AtomicUsize::new(0),
                key: AtomicU64::new(0),
            }),
            orphan: CachePadded::new(ReaderSlot::new(ORPHAN_OWNER)),
            readers: Mutex::new(Vec::new()),
            grace: Mutex::new(GraceState::default()),
            grace_done: Condvar::new(),
            fixed_read_side: Some(ReadSide::Fences),
        }
    }

    /// The read side this domain uses; fixed for the domain's whole life.
    #[inline(always)]
    pub fn read_side(&self) -> ReadSide {
        read_side_of(self.key())
    }

    /// `Hot::key`, assigning it on the domain's first use.
    #[inline(always)]
    fn key(&self) -> u64 {
        // Relaxed: the key is only compared and decoded, never used to
        // reach memory; see `assign_key`.
        let key = self.hot.key.load(Ordering::Relaxed);
        if key != 0 { key } else { self.assign_key() }
    }

    /// Resolves the read side and draws an id. Relaxed suffices: the read
    /// side is a pure function of `fixed_read_side` and the process mode,
    /// which never changes once resolved, and every thread ends up with the
    /// single key that won the exchange.
    #[cold]
    fn assign_key(&self) -> u64 {
        let read_side = match self.fixed_read_side.unwrap_or_else(ReadSide::of_process) {
            ReadSide::Membarrier => READ_SIDE_MEMBARRIER,
            ReadSide::Fences => READ_SIDE_FENCES,
        };
        let id = NEXT_DOMAIN_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let fresh = id << 2 | read_side;
        match self
            .hot
            .key
            .compare_exchange(0, fresh, Ordering::Relaxed, Ordering::Relaxed)
        {
            Ok(_) => fresh,
            Err(winner) => winner,
        }
    }

    /// Enters a read section; it lasts until the guard drops.
    ///
    /// Sections nest (each guard is independent), the holder may sleep or
    /// block, and the guard may be sent to and dropped on another thread.
    /// Calling [`Srcu::synchronize`] on the same domain from inside a read
    /// section deadlocks, as in the kernel.
    #[inline]
    pub fn read_lock(&self) -> SrcuReadGuard<'_> {
        let key = self.key();
        let read_side = read_side_of(key);
        let (slot, owned) = match reader::cached_slot(key) {
            // SAFETY: the cache holds a slot of this domain's registry
            // (invariant 3 of `reader`): it lives as long as `self`.
            Some(slot) => (unsafe { &*slot }, true),
            None => self.slot_slow(),
        };
        // Relaxed: the barrier after the increment (B) is what orders the
        // section; a stale index only makes this reader count under the
        // other index, which the two-phase grace period drains.
        let index = self.hot.index.load(Ordering::Relaxed) & 1;
        if owned {
            slot.owner_lock(index);
        } else {
            slot.shared_lock(index);
        }
        // B: pairs with A in `readers_done` (see the module documentation).
        read_side.reader_barrier();
        SrcuReadGuard {
            slot,
            index,
            read_side,
            _domain: PhantomData,
        }
    }

    #[cold]
    fn slot_slow(&self) -> (&ReaderSlot, bool) {
        let found = reader::find_or_claim(self.key(), |marker| self.claim_slot(marker));
        match found {
            // SAFETY: `find_or_claim` returns a slot that this domain's
            // registry holds (it came from `claim_slot` now or earlier), so
            // it lives as long as `self`.
            Some(slot) => (unsafe { &*slot }, true),
            None => (&self.orphan, false),
        }
    }

    /// Gives the calling thread (marker `marker`) a slot it owns: a free one
    /// if an exited thread left one, else a new one.
    fn claim_slot(&self, marker: usize) -> SharedSlot {
        let mut readers = sync::lock(&self.readers);
        if let Some(free) = readers.iter().find(|slot| slot.try_claim(marker)) {
            return free.clone();
        }
        let slot = Arc::new(CachePadded::new(ReaderSlot::new(marker)));
        readers.push(slot.clone());
        slot
    }

    /// Waits until every read section that began before this call has ended.
    ///
    /// Read sections that begin after it returns see every store made before
    /// it was called. Concurrent callers share grace periods. May sleep;
    /// must not be called from inside a read section of the same domain.
    pub fn synchronize(&self) {
        let mut grace = sync::lock(&self.grace);
        // The first grace period that starts after we hold the mutex: if one
        // is running it may have passed its first barrier before our stores,
        // so we need the one after it.
        let needed = grace.completed + if grace.running { 2 } else { 1 };
        while grace.completed < needed {
            if grace.running {
                grace = sync::wait(&self.grace_done, grace);
                continue;
            }
            grace.running = true;
            drop(grace);
            let finished = GraceRunning { domain: self };
            self.run_grace_period();
            drop(finished);
            grace = sync::lock(&self.grace);
        }
    }

    /// Runs one grace period (the caller set `running`).
    fn run_grace_period(&self) {
        let read_side = self.read_side();
        // Relaxed: only grace periods store the index, and they are ordered
        // one after another through the `grace` mutex.
        let current = self.hot.index.load(Ordering::Relaxed) & 1;
        self.drain(current ^ 1, read_side);
        // Relaxed, with no barrier E before or D after: see the module
        // documentation. The next check's barrier A publishes the flip.
        self.hot.index.store(current ^ 1, Ordering::Relaxed);
        self.drain(current, read_side);
    }

    /// Waits until no reader is inside a section counted under `index`.
    fn drain(&self, index: usize, read_side: ReadSide) {
        let mut checks = 0u32;
        let mut sleep = FIRST_SLEEP;
        while !self.readers_done(index, read_side) {
            checks += 1;
            if checks <= QUICK_CHECKS {
                sync::spin_loop();
            } else if checks <= QUICK_CHECKS + YIELDING_CHECKS {
                sync::yield_now();
            } else {
                pause(sleep);
                sleep = (sleep * 2).min(LONGEST_SLEEP);
            }
        }
    }

    /// One check of `index`: unlock sum, barrier A, lock sum, compare.
    fn readers_done(&self, index: usize, read_side: ReadSide) -> bool {
        // Holding the registry lock keeps the set of slots fixed across both
        // sums; a thread claiming a slot meanwhile waits (a slow path).
        let readers = sync::lock(&self.readers);
        let unlocks = readers
            .iter()
            .fold(self.orphan.unlocks(index), |sum, slot| {
                sum.wrapping_add(slot.unlocks(index))
            });
        // A: pairs with B and C in the readers.
        read_side.writer_barrier();
        let locks = readers.iter().fold(self.orphan.locks(index), |sum, slot| {
            sum.wrapping_add(slot.locks(index))
        });
        locks == unlocks
    }
}

/// The read side a resolved key carries.
#[inline(always)]
fn read_side_of(key: u64) -> ReadSide {
    if key & READ_SIDE_BITS == READ_SIDE_FENCES {
        ReadSide::Fences
    } else {
        ReadSide::Membarrier
    }
}

impl Default for Srcu {
    fn default() -> Srcu {
        Srcu::new()
    }
}

/// Sleeps between checks of a long grace period. Loom has no time, so a
/// model yields instead (that is what lets the model's readers progress).
fn pause(duration: Duration) {
    #[cfg(loom)]
    {
        let _ = duration;
        sync::yield_now();
    }
    #[cfg(not(loom))]
    std::thread::sleep(duration);
}

/// Marks the running grace period complete when dropped, also if the grace
/// period unwinds, so that waiting `synchronize` callers are never stranded.
struct GraceRunning<'a> {
    domain: &'a Srcu,
}

impl Drop for GraceRunning<'_> {
    fn drop(&mut self) {
        let mut grace = sync::lock(&self.domain.grace);
        grace.running = false;
        grace.completed += 1;
        drop(grace);
        self.domain.grace_done.notify_all();
    }
}

/// A read section of an [`Srcu`] domain; dropping it ends the section.
#[must_use = "the read section ends when the guard is dropped"]
#[derive(Debug)]
pub struct SrcuReadGuard<'a> {
    slot: &'a ReaderSlot,
    index: usize,
    read_side: ReadSide,
    /// The section borrows its domain: the domain cannot drop while it runs.
    _domain: PhantomData<&'a Srcu>,
}

// Guards may move between threads: `ReaderSlot::unlock` takes the shared
// counter whenever the dropping thread does not own the slot. (All fields
// are Send and Sync already; this documents the decision.)
const _: () = {
    const fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<SrcuReadGuard<'static>>();
};

impl SrcuReadGuard<'_> {
    /// The counter index this section was counted under (0 or 1).
    pub fn index(&self) -> usize {
        self.index
    }
}

impl Drop for SrcuReadGuard<'_> {
    #[inline]
    fn drop(&mut self) {
        // C: pairs with A in `readers_done` (see the module documentation).
        self.read_side.reader_barrier();
        self.slot.unlock(self.index);
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering as StdOrdering};
    use std::sync::mpsc;
    use std::time::Duration;

    impl Srcu {
        /// Slots in this domain's registry (test-only view).
        fn slot_count(&self) -> usize {
            sync::lock(&self.readers).len()
        }
        /// Lock increments ever counted on the orphan slot.
        fn orphan_locks(&self) -> u64 {
            self.orphan.locks(0).wrapping_add(self.orphan.locks(1))
        }
    }

    fn both_read_sides() -> [Srcu; 2] {
        [Srcu::new(), Srcu::with_fences()]
    }

    #[test]
    fn synchronize_without_readers_returns() {
        for domain in both_read_sides() {
            domain.synchronize();
            domain.synchronize();
            assert_eq!(sync::lock(&domain.grace).completed, 2);
        }
    }

    #[test]
    fn synchronize_waits_for_a_reader_on_another_thread() {
        for domain in both_read_sides() {
            let returned = AtomicBool::new(false);
            std::thread::scope(|scope| {
                let (entered_tx, entered_rx) = mpsc::channel();
                let (leave_tx, leave_rx) = mpsc::channel::<()>();
                let domain = &domain;
                scope.spawn(move || {
                    let _guard = domain.read_lock();
                    entered_tx.send(()).expect("main thread waits");
                    leave_rx.recv().expect("main thread signals");
                });
                entered_rx.recv().expect("reader entered");
                scope.spawn(|| {
                    domain.synchronize();
                    returned.store(true, StdOrdering::SeqCst);
                });
                // Long enough for a broken synchronize to return.
                std::thread::sleep(Duration::from_millis(100));
                assert!(
                    !returned.load(StdOrdering::SeqCst),
                    "synchronize returned while a reader that began before it was inside"
                );
                leave_tx.send(()).expect("reader waits");
            });
            assert!(returned.load(StdOrdering::SeqCst));
        }
    }

    #[test]
    fn nested_sections_keep_the_outer_one_open() {
        let domain = Srcu::new();
        let outer = domain.read_lock();
        let inner = domain.read_lock();
        drop(inner);
        let returned = AtomicBool::new(false);
        std::thread::scope(|scope| {
            scope.spawn(|| {
                domain.synchronize();
                returned.store(true, StdOrdering::SeqCst);
            });
            std::thread::sleep(Duration::from_millis(50));
            assert!(
                !returned.load(StdOrdering::SeqCst),
                "outer section not waited for"
            );
            drop(outer);
        });
        assert!(returned.load(StdOrdering::SeqCst));
    }

    #[test]
    fn guard_dropped_on_another_thread_ends_the_section() {
        for domain in both_read_sides() {
            let guard = domain.read_lock();
            std::thread::scope(|scope| {
                scope.spawn(move || drop(guard));
            });
            // Hangs forever if the foreign unlock were lost.
            domain.synchronize();
            let readers = sync::lock(&domain.readers);
            let index = 0;
            let unmatched = readers[0]
                .locks(index)
                .wrapping_sub(readers[0].unlocks(index));
            assert_eq!(unmatched, 0);
        }
    }

    #[test]
    fn exited_threads_give_their_slots_back() {
        static DOMAIN: Srcu = Srcu::new();
        for _ in 0..64 {
            // `JoinHandle::join` waits for the thread to exit, thread-local
            // destructors included (a scope's implicit join does not: it
            // returns when the closure is done, before those destructors).
            std::thread::spawn(|| drop(DOMAIN.read_lock()))
                .join()
                .expect("reader thread");
        }
        // One thread at a time: each new thread reuses the freed slot.
        assert_eq!(DOMAIN.slot_count(), 1);
        DOMAIN.synchronize();
    }

    #[test]
    fn section_entered_during_thread_teardown_uses_the_orphan_slot() {
        static DOMAIN: Srcu = Srcu::new();
        struct LocksOnExit;
        impl Drop for LocksOnExit {
            fn drop(&mut self) {
                // Runs after the srcu thread-locals (registered later, so
                // destroyed earlier) are gone.
                drop(DOMAIN.read_lock());
            }
        }
        std::thread_local! {
            static LOCKS_ON_EXIT: LocksOnExit = const { LocksOnExit };
        }
        std::thread::spawn(|| {
            LOCKS_ON_EXIT.with(|_| {});
            drop(DOMAIN.read_lock());
        })
        .join()
        .expect("thread");
        assert_eq!(
            DOMAIN.orphan_locks(),
            1,
            "teardown section did not use the orphan slot"
        );
        DOMAIN.synchronize();
    }

    #[test]
    fn concurrent_synchronize_callers_share_grace_periods() {
        let domain = Srcu::new();
        let guard = domain.read_lock();
        let callers = 4;
        std::thread::scope(|scope| {
            for _ in 0..callers {
                scope.spawn(|| domain.synchronize());
            }
            // Let every caller queue up behind the reader.
            std::thread::sleep(Duration::from_millis(300));
            drop(guard);
        });
        let completed = sync::lock(&domain.grace).completed;
        // The first caller's period waits for the reader; everyone who
        // arrived meanwhile needs at most one more.
        assert!(
            completed <= 2,
            "{callers} callers ran {completed} grace periods"
        );
    }

    #[test]
    fn read_side_is_fixed_per_domain() {
        assert_eq!(Srcu::with_fences().read_side(), ReadSide::Fences);
        assert_eq!(Srcu::new().read_side(), ReadSide::of_process());
    }
}
