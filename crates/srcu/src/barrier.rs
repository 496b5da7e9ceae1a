//! The asymmetric barrier: which side of a domain pays for ordering.
//!
//! A grace period needs a full barrier between a reader's counter increment
//! and its first access inside the critical section (and between its last
//! access and its unlock increment), paired with full barriers in the
//! writer's scans. There are two correct ways to provide them, and a domain
//! commits to one of them for its whole life:
//!
//! * [`ReadSide::Membarrier`]: readers execute only a compiler barrier; every
//!   writer-side barrier that pairs with them is
//!   `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED)`, which makes every running
//!   thread of this process execute a full barrier before it returns (threads
//!   that are not running pass through one at their next context switch). A
//!   reader's compiler barrier thereby acts as a full barrier whenever it
//!   matters. This is liburcu-memb's scheme and Linux SRCU-fast's.
//! * [`ReadSide::Fences`]: readers execute `fence(SeqCst)` and the writer does
//!   too. Always correct; used where membarrier is missing, when forced by
//!   `GMEM_SRCU_FENCES=1`, for domains built with `Srcu::with_fences`, and
//!   under loom (which cannot model membarrier).
//!
//! Invariant: a reader and a writer of the same domain always agree on the
//! read side. Linux once shipped the bug of mixing them (the reader flavour was
//! only recorded in debug builds, fixed by commit 9407f5c3ec10): a fence-free
//! reader paired with a plain writer fence is not ordered at all. Here the
//! process-wide mode moves exactly once, from "unknown" to its final value,
//! before any reader or writer acts on it, and both sides read it through
//! [`ReadSide::of_process`].
//!
//! Membarrier is registered as early as possible, from an `.init_array`
//! constructor that runs before `main` while the process has one thread:
//! registration is cheap then, but waits a whole kernel RCU grace period
//! (milliseconds) once the process has many threads.

use crate::sync::{Ordering, fence};
// Process-wide and decided once, outside any loom model (loom domains fix
// their read side at construction), hence std's atomic even under loom.
use std::sync::atomic::AtomicU8;

/// How readers of a domain are ordered against its writers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReadSide {
    /// Readers use compiler barriers only; writers use `membarrier(2)`.
    Membarrier,
    /// Readers and writers both use `fence(SeqCst)`.
    Fences,
}

/// The process-wide mode, resolved once: `MODE_UNKNOWN` until the first
/// resolution, then `MODE_MEMBARRIER` or `MODE_FENCES` forever.
static MODE: AtomicU8 = AtomicU8::new(MODE_UNKNOWN);
const MODE_UNKNOWN: u8 = 0;
const MODE_MEMBARRIER: u8 = 1;
const MODE_FENCES: u8 = 2;

/// Environment variable that forces the fence read side for every domain of
/// the process, to test the fallback on a machine that has membarrier.
pub const FORCE_FENCES_ENV: &str = "GMEM_SRCU_FENCES";

impl ReadSide {
    /// The read side that `Srcu::new` domains of this process use.
    ///
    /// The first call decides it (registering membarrier if it can); every
    /// later call returns the same answer.
    #[inline]
    pub fn of_process() -> ReadSide {
        // Acquire pairs with the Release of the compare_exchange in
        // `resolve_process_mode`: a thread that reads MODE_MEMBARRIER also
        // sees that the registration happened, so its membarrier calls are
        // accepted by the kernel.
        match MODE.load(std::sync::atomic::Ordering::Acquire) {
            MODE_MEMBARRIER => ReadSide::Membarrier,
            MODE_FENCES => ReadSide::Fences,
            _ => resolve_process_mode(),
        }
    }

    /// The barrier a reader executes after bumping its lock counter and
    /// before bumping its unlock counter.
    #[inline(always)]
    pub(crate) fn reader_barrier(self) {
        match self {
            // Pairs with the writer's membarrier in `writer_barrier`: the
            // compiler barrier keeps the instruction order equal to program
            // order, and membarrier supplies the CPU-level full barrier.
            ReadSide::Membarrier => std::sync::atomic::compiler_fence(Ordering::SeqCst),
            // Pairs with the writer's fence(SeqCst) in `writer_barrier`
            // (store-buffering: the reader's counter store and the writer's
            // counter load cannot both miss the other side's prior store).
            ReadSide::Fences => fence(Ordering::SeqCst),
        }
    }

    /// The barrier a writer executes where the grace-period algorithm needs a
    /// full barrier that pairs with readers' `reader_barrier`.
    pub(crate) fn writer_barrier(self) {
        match self {
            ReadSide::Membarrier => {
                if rustix::thread::membarrier(rustix::thread::MembarrierCommand::PrivateExpedited)
                    .is_err()
                {
                    // The command was registered before MODE said
                    // Membarrier, so the kernel cannot refuse it; if it ever
                    // did, continuing would void every grace period.
                    membarrier_failed()
                }
            }
            // Pairs with the readers' fence(SeqCst) in `reader_barrier`.
            ReadSide::Fences => fence(Ordering::SeqCst),
        }
    }
}

#[cold]
fn membarrier_failed() -> ! {
    // A grace period that cannot order readers is not a grace period: abort
    // rather than free memory a reader may still use.
    eprintln!("srcu: membarrier(PRIVATE_EXPEDITED) failed after registration; aborting");
    std::process::abort()
}

#[cold]
fn resolve_process_mode() -> ReadSide {
    let wanted = if cfg!(loom) || fences_forced_by_env() || !register_membarrier() {
        MODE_FENCES
    } else {
        MODE_MEMBARRIER
    };
    // Release pairs with the Acquire load in `of_process`. If another thread
    // won the race its value stands: registering twice is harmless, and both
    // threads then read back the single winner.
    let decided = match MODE.compare_exchange(
        MODE_UNKNOWN,
        wanted,
        std::sync::atomic::Ordering::AcqRel,
        std::sync::atomic::Ordering::Acquire,
    ) {
        Ok(_) => wanted,
        Err(current) => current,
    };
    if decided == MODE_MEMBARRIER {
        ReadSide::Membarrier
    } else {
        ReadSide::Fences
    }
}

fn fences_forced_by_env() -> bool {
    std::env::var_os(FORCE_FENCES_ENV).is_some_and(|value| !value.is_empty() && value != "0")
}

/// Registers this process for private expedited membarrier; false where the
/// kernel lacks it (then the fence read side is used).
fn register_membarrier() -> bool {
    use rustix::thread::{MembarrierCommand, MembarrierQuery, membarrier, membarrier_query};
    membarrier_query().contains(MembarrierQuery::PRIVATE_EXPEDITED)
        && membarrier(MembarrierCommand::RegisterPrivateExpedited).is_ok()
}

/// Resolves the mode before `main`, while the process is single-threaded and
/// registration is cheap. Not built under loom or for tests of the resolution
/// itself; resolution stays lazy and correct without it.
#[cfg(not(loom))]
#[used]
#[unsafe(link_section = ".init_array")]
static RESOLVE_AT_LOAD: extern "C" fn() = {
    extern "C" fn resolve_at_load() {
        ReadSide::of_process();
    }
    resolve_at_load
};
