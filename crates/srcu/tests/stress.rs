//! Stress test of the grace-period guarantee with real data.
//!
//! Readers dereference a published payload inside read sections (some nest a
//! second section, some sleep inside, some hand their guard to another
//! thread to end the section there) and check it is alive. A writer
//! publishes a new payload, synchronizes, and only then retires the old one
//! by marking it dead. A reader that ever finds a dead payload inside the
//! section in which it loaded it has caught a grace period that ended too
//! early. Both read sides run; each phase is bounded in time.

use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use srcu::{ReadSide, Srcu};

const ALIVE: u64 = 0xA11E_A11E_A11E_A11E;
const DEAD: u64 = 0xDEAD_DEAD_DEAD_DEAD;
const READERS: usize = 4;
const PHASE: Duration = Duration::from_millis(1500);

struct Payload {
    state: AtomicU64,
    generation: u64,
}

struct Shared {
    domain: Srcu,
    current: AtomicPtr<Payload>,
    stop: AtomicBool,
    sections: AtomicU64,
    violations: AtomicU64,
}

impl Shared {
    /// Loads the published payload and checks it; call inside a section.
    fn check_current(&self) -> &Payload {
        // Acquire pairs with the Release swap in `writer`: the payload's
        // initialisation is visible.
        let pointer = self.current.load(Ordering::Acquire);
        // SAFETY: payloads are never freed before the test ends (retired ones
        // are only marked dead), so the pointer is valid; the test checks the
        // mark, which is the real guarantee under test.
        let payload = unsafe { &*pointer };
        self.check(payload);
        payload
    }

    fn check(&self, payload: &Payload) {
        if payload.state.load(Ordering::Relaxed) != ALIVE {
            self.violations.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn reader<'a>(
    shared: &'a Shared,
    seed: u64,
    handoff: mpsc::Sender<(srcu::SrcuReadGuard<'a>, u64)>,
) {
    let mut random = seed | 1;
    while !shared.stop.load(Ordering::Relaxed) {
        // xorshift: cheap, deterministic per reader.
        random ^= random << 13;
        random ^= random >> 7;
        random ^= random << 17;
        let guard = shared.domain.read_lock();
        let payload = shared.check_current();
        match random % 4096 {
            0 => {
                // Sleep inside the section: the writer must wait.
                std::thread::sleep(Duration::from_micros(200));
                shared.check(payload);
            }
            1..=32 => {
                let inner = shared.domain.read_lock();
                let _ = shared.check_current();
                drop(inner);
                // The outer section still protects the first payload.
                shared.check(payload);
            }
            33 => {
                // End the section on another thread; the payload must stay
                // alive until that thread drops the guard.
                let generation = payload.generation;
                if handoff.send((guard, generation)).is_err() {
                    return;
                }
                shared.sections.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            _ => {}
        }
        shared.check(payload);
        drop(guard);
        shared.sections.fetch_add(1, Ordering::Relaxed);
    }
}

fn run_phase(domain: Srcu) -> (u64, u64) {
    let first = Box::into_raw(Box::new(Payload {
        state: AtomicU64::new(ALIVE),
        generation: 0,
    }));
    let shared = Shared {
        domain,
        current: AtomicPtr::new(first),
        stop: AtomicBool::new(false),
        sections: AtomicU64::new(0),
        violations: AtomicU64::new(0),
    };
    let mut grace_periods = 0;
    let mut retired_by_writer = Vec::new();
    std::thread::scope(|scope| {
        let (handoff_tx, handoff_rx) = mpsc::channel::<(srcu::SrcuReadGuard<'_>, u64)>();
        for seed in 0..READERS as u64 {
            let handoff_tx = handoff_tx.clone();
            let shared = &shared;
            scope.spawn(move || reader(shared, 0x9E37_79B9_7F4A_7C15 ^ seed, handoff_tx));
        }
        drop(handoff_tx);
        // The thread that ends handed-off sections.
        scope.spawn(|| {
            for (guard, _generation) in handoff_rx {
                drop(guard);
            }
        });
        // The writer runs here. Retired payloads are only marked dead, and
        // freed after the scope has joined every reader.
        let deadline = Instant::now() + PHASE;
        let mut generation = 0;
        while Instant::now() < deadline {
            generation += 1;
            let fresh = Box::into_raw(Box::new(Payload {
                state: AtomicU64::new(ALIVE),
                generation,
            }));
            // Release pairs with the readers' Acquire load.
            let old = shared.current.swap(fresh, Ordering::Release);
            shared.domain.synchronize();
            // SAFETY: `old` came from Box::into_raw and is freed only after
            // every reader thread has been joined.
            unsafe { &*old }.state.store(DEAD, Ordering::Relaxed);
            retired_by_writer.push(old);
        }
        grace_periods = generation;
        shared.stop.store(true, Ordering::Relaxed);
    });
    for old in retired_by_writer {
        // SAFETY: from Box::into_raw; all readers were joined by the scope.
        drop(unsafe { Box::from_raw(old) });
    }
    // SAFETY: the last published payload, from Box::into_raw, no readers left.
    drop(unsafe { Box::from_raw(shared.current.load(Ordering::Relaxed)) });
    let violations = shared.violations.load(Ordering::Relaxed);
    let sections = shared.sections.load(Ordering::Relaxed);
    eprintln!(
        "read side {:?}: {sections} read sections, {grace_periods} grace periods, {violations} violations",
        shared.domain.read_side()
    );
    assert!(
        sections > 10_000,
        "readers made too little progress: {sections}"
    );
    assert!(
        grace_periods > 100,
        "writer made too little progress: {grace_periods}"
    );
    (sections, violations)
}

#[test]
fn grace_periods_never_end_under_a_reader() {
    // Both read sides, one after the other (in parallel they would share the
    // two cores and measure the scheduler instead).
    let domain = Srcu::new();
    if domain.read_side() != ReadSide::Membarrier {
        test_support::skipped(format_args!(
            "membarrier phase: this kernel or environment gives the fence read side"
        ));
    } else {
        let (_, violations) = run_phase(domain);
        assert_eq!(
            violations, 0,
            "membarrier read side: a reader saw a retired payload"
        );
    }
    let (_, violations) = run_phase(Srcu::with_fences());
    assert_eq!(
        violations, 0,
        "fence read side: a reader saw a retired payload"
    );
}
