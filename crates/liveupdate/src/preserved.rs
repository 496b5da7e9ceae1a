//! The process-wide set of files under LUO's care (upstream's
//! `luo_preserved_files` xarray): a file is in it from a successful preserve
//! until it is unpreserved or its session is released.
//!
//! Invariant: a file identity is in the set at most once, so the same file
//! can never be preserved twice, in one session or in two (`EBUSY`). The set
//! is one mutex-guarded `BTreeSet`; every test-and-insert happens under the
//! lock, which is the whole concurrency argument (see the stress test in
//! `tests/rules.rs`).

use std::collections::BTreeSet;
use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::names::FileIdentity;

static PRESERVED: Mutex<BTreeSet<FileIdentity>> = Mutex::new(BTreeSet::new());

/// The locked set. A panic in another thread while it held the lock cannot
/// leave the set half-updated (every update is one insert or remove), so a
/// poisoned lock is taken over.
pub(crate) fn lock() -> MutexGuard<'static, BTreeSet<FileIdentity>> {
    PRESERVED.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Adds `identity`; `false` if it was there already.
pub(crate) fn claim(identity: FileIdentity) -> bool {
    lock().insert(identity)
}

/// Removes `identity`.
pub(crate) fn release(identity: FileIdentity) {
    lock().remove(&identity);
}

/// Whether the file is preserved in some session of this process.
pub fn is_preserved(identity: FileIdentity) -> bool {
    lock().contains(&identity)
}
