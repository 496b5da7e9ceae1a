//! Userspace sleepable RCU (SRCU).
//!
//! An [`Srcu`] domain lets many threads run read sections cheaply and lets a
//! writer wait, with [`Srcu::synchronize`], until every read section that
//! began before it has ended. It is the mechanism behind the guest_memfd
//! freeze of the seed patch: the fault path checks a FROZEN flag inside a
//! read section and pays almost nothing; the rare freezer sets the flag and
//! synchronizes, after which no allocation that missed the flag is in flight.
//!
//! Contract:
//! * [`Srcu::read_lock`] returns a guard; sections nest; the holder may sleep
//!   or block; the guard may be sent to another thread and dropped there.
//! * [`Srcu::synchronize`] returns only after every read section that began
//!   before the call has ended; a section that begins after it returns sees
//!   every store made before the call.
//! * The read side writes only the calling thread's own cache-padded
//!   counters, with a plain load and store, and executes no fence: the writer
//!   pays with `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED)` (module
//!   `barrier`). Where membarrier is missing, or when forced
//!   ([`Srcu::with_fences`], `GMEM_SRCU_FENCES=1`), both sides use
//!   `fence(SeqCst)` instead.
//!
//! The memory-ordering argument lives next to the code it justifies: the
//! grace period in `domain`, the counters in `reader`, the barrier pairing in
//! `barrier`. Loom models of the protocol are in `loom_models` (run with
//! `RUSTFLAGS="--cfg loom" cargo test -p srcu --release --lib loom_`).

#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

mod barrier;
#[cfg(all(feature = "bench", not(loom)))]
pub mod bench;
mod domain;
mod reader;
mod sync;

#[cfg(all(test, loom))]
mod loom_models;

pub use barrier::{FORCE_FENCES_ENV, ReadSide};
pub use domain::{Srcu, SrcuReadGuard};
