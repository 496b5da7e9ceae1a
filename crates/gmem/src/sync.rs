//! The one switch between loom's model types and std's.
//!
//! The freeze protocol (`state`) and the page-state index (`index`) take every
//! atomic and lock from here, so a `--cfg loom` build checks the code that
//! ships (tokio's `crate::loom` shim is the model).

#[cfg(loom)]
pub(crate) use loom::sync::{
    RwLock, RwLockReadGuard, RwLockWriteGuard,
    atomic::{AtomicPtr, AtomicU32, AtomicU64, Ordering},
};

#[cfg(not(loom))]
pub(crate) use std::sync::{
    RwLock, RwLockReadGuard, RwLockWriteGuard,
    atomic::{AtomicPtr, AtomicU32, AtomicU64, Ordering},
};

/// Takes `lock` shared, ignoring poisoning: no critical section in this crate
/// leaves the protected state half-updated when it panics (the lock guards no
/// data, only the order of kernel calls).
pub(crate) fn read<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    match lock.read() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    }
}

/// Takes `lock` exclusive, ignoring poisoning for the reason given at [`read`].
pub(crate) fn write<T>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    match lock.write() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    }
}
