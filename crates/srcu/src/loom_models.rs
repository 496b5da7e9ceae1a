//! Loom models of the SRCU protocol: every interleaving (up to the
//! preemption bound in `LOOM_MAX_PREEMPTIONS`) of small programs, checked for
//! the guarantee and, through `loom::cell::UnsafeCell`, for causality: a
//! writer's access after `synchronize` that is not ordered after a reader's
//! access inside its section is reported as a data race.
//!
//! Loom cannot model membarrier, so these check the fence read side (which
//! is what `--cfg loom` builds use); the membarrier side rests on the
//! equivalence argued in `barrier`, and on the stress tests.
//!
//! Run: `LOOM_MAX_PREEMPTIONS=4 RUSTFLAGS="--cfg loom" cargo test -p srcu --release --lib loom_`
//! (bound 4: about 10 s here; bound 5: about 35 s; unbounded does not finish).
//!
//! Each model was checked to fail when the protocol is broken: with
//! `synchronize` a no-op, without reader barrier B or C, without writer
//! barrier A, without the first drain (two-phase grace period: caught by
//! `loom_two_concurrent_synchronizers`) and without the second drain.

use crate::Srcu;
use loom::cell::UnsafeCell;
use loom::sync::Arc;
use loom::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use loom::thread;

/// A value that a writer "retires" after a grace period: writing it while a
/// reader may still read it is a data race that loom reports.
struct Retirable {
    published: AtomicBool,
    value: UnsafeCell<u64>,
}

impl Retirable {
    fn new() -> Retirable {
        Retirable {
            published: AtomicBool::new(true),
            value: UnsafeCell::new(7),
        }
    }

    /// Reader side: inside a section, read the value if still published.
    fn read_if_published(&self) -> Option<u64> {
        if self.published.load(Ordering::Relaxed) {
            // SAFETY: readers only read; the writer writes only after
            // unpublishing and a grace period, which is what the model checks.
            Some(self.value.with(|value| unsafe { *value }))
        } else {
            None
        }
    }

    /// Writer side: unpublish, wait for readers, then reuse the memory.
    fn retire(&self, domain: &Srcu) {
        self.published.store(false, Ordering::Relaxed);
        domain.synchronize();
        // SAFETY: loom checks this write against every reader's read.
        self.value.with_mut(|value| unsafe { *value = 0 });
    }
}

#[test]
fn loom_reader_races_synchronize() {
    // A reader either is waited for, or sees the writer's prior store.
    loom::model(|| {
        let domain = Arc::new(Srcu::new());
        let shared = Arc::new(Retirable::new());
        let reader = {
            let (domain, shared) = (domain.clone(), shared.clone());
            thread::spawn(move || {
                let _guard = domain.read_lock();
                if let Some(value) = shared.read_if_published() {
                    assert_eq!(value, 7, "a published value was already reused");
                }
            })
        };
        shared.retire(&domain);
        reader.join().expect("reader thread");
    });
}

#[test]
fn loom_nested_readers() {
    // An inner section ending does not end the outer one.
    loom::model(|| {
        let domain = Arc::new(Srcu::new());
        let shared = Arc::new(Retirable::new());
        let reader = {
            let (domain, shared) = (domain.clone(), shared.clone());
            thread::spawn(move || {
                let outer = domain.read_lock();
                let seen = {
                    let _inner = domain.read_lock();
                    shared.read_if_published()
                };
                // Still inside `outer`: a value seen inside it is intact.
                if seen.is_some() {
                    assert_eq!(shared.read_if_published().unwrap_or(7), 7);
                    // SAFETY: read only; the writer must still be waiting.
                    let again = shared.value.with(|value| unsafe { *value });
                    assert_eq!(again, 7, "outer section lost its protection");
                }
                drop(outer);
            })
        };
        shared.retire(&domain);
        reader.join().expect("reader thread");
    });
}

#[test]
fn loom_two_concurrent_synchronizers() {
    // Two writers share or chain grace periods; each one's guarantee holds.
    loom::model(|| {
        let domain = Arc::new(Srcu::new());
        let first = Arc::new(Retirable::new());
        let second = Arc::new(Retirable::new());
        let other_writer = {
            let (domain, second) = (domain.clone(), second.clone());
            thread::spawn(move || second.retire(&domain))
        };
        let reader = {
            let (domain, first, second) = (domain.clone(), first.clone(), second.clone());
            thread::spawn(move || {
                let _guard = domain.read_lock();
                let _ = first.read_if_published();
                let _ = second.read_if_published();
            })
        };
        first.retire(&domain);
        other_writer.join().expect("writer thread");
        reader.join().expect("reader thread");
    });
}

#[test]
fn loom_freeze_pattern() {
    // The seed's freeze: the fault path checks FROZEN inside a section and
    // allocates only if clear; freeze sets FROZEN and synchronizes. After
    // freeze returns, no allocation may be in flight or start.
    loom::model(|| {
        let domain = Arc::new(Srcu::new());
        let frozen = Arc::new(AtomicBool::new(false));
        let in_flight = Arc::new(AtomicUsize::new(0));
        let page = Arc::new(UnsafeCell::new(0u64));
        let faulter = {
            let (domain, frozen, in_flight, page) = (
                domain.clone(),
                frozen.clone(),
                in_flight.clone(),
                page.clone(),
            );
            thread::spawn(move || {
                let _guard = domain.read_lock();
                if frozen.load(Ordering::Relaxed) {
                    return false; // EPERM: the caller exits to its VMM.
                }
                in_flight.fetch_add(1, Ordering::Relaxed);
                // SAFETY: the "allocation"; loom checks it against the
                // freezer's read of the page after freeze returned.
                page.with_mut(|page| unsafe { *page = 1 });
                in_flight.fetch_sub(1, Ordering::Relaxed);
                true
            })
        };
        frozen.store(true, Ordering::Relaxed);
        domain.synchronize();
        // The preservation reads the now-stable state.
        assert_eq!(
            in_flight.load(Ordering::Relaxed),
            0,
            "allocation in flight after freeze"
        );
        // SAFETY: loom reports a race if the allocation is not ordered before.
        let snapshot = page.with(|page| unsafe { *page });
        let allocated = faulter.join().expect("faulter thread");
        // An allocation that happened must be in the frozen snapshot.
        assert_eq!(
            snapshot,
            u64::from(allocated),
            "allocation after freeze returned"
        );
    });
}
