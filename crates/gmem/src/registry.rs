//! The process-wide registry: from an fd to the file object behind it.
//!
//! The kernel goes file → inode → `GMEM_I(inode)`; a userspace file handler
//! (the live-update layer) holds only an fd, so `lookup` does the same with
//! fstat: (device, inode) → the live `GuestMemFile`. Entries hold `Weak`
//! references, so the registry never keeps a file alive; a file removes its
//! own entry when dropped (matched by a per-object id, so a newer object for
//! a reused inode number is never removed by an older one's drop).

use std::collections::HashMap;
use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard, PoisonError, Weak};

use rustix::io::Errno;

use crate::file::GuestMemFile;

/// (st_dev, st_ino): what identifies an inode.
pub(crate) type InodeKey = (u64, u64);

struct Entry {
    id: u64,
    file: Weak<GuestMemFile>,
}

static REGISTRY: LazyLock<Mutex<HashMap<InodeKey, Entry>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

fn registry() -> MutexGuard<'static, HashMap<InodeKey, Entry>> {
    // Poisoning is ignored: every critical section below is one map call,
    // which leaves the map consistent.
    REGISTRY.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The inode key of `fd`.
pub(crate) fn inode_key(fd: BorrowedFd<'_>) -> Result<InodeKey, Errno> {
    let stat = rustix::fs::fstat(fd)?;
    Ok((stat.st_dev, stat.st_ino))
}

/// A fresh object id (never reused in this process).
pub(crate) fn next_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    // Relaxed: only uniqueness matters.
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Registers `file` under `key`. Fails with EBUSY when a live object already
/// stands for the inode (two objects would keep two freeze flags).
pub(crate) fn register(key: InodeKey, id: u64, file: &Arc<GuestMemFile>) -> Result<(), Errno> {
    let mut map = registry();
    if let Some(entry) = map.get(&key)
        && entry.file.strong_count() > 0
    {
        return Err(Errno::BUSY);
    }
    map.insert(
        key,
        Entry {
            id,
            file: Arc::downgrade(file),
        },
    );
    Ok(())
}

/// Removes the entry of object `id`, if it is still the registered one.
pub(crate) fn unregister(key: InodeKey, id: u64) {
    let mut map = registry();
    if map.get(&key).is_some_and(|entry| entry.id == id) {
        map.remove(&key);
    }
}

/// Whether a live object stands for `key`.
pub(crate) fn is_registered(key: InodeKey) -> bool {
    registry()
        .get(&key)
        .is_some_and(|entry| entry.file.strong_count() > 0)
}

/// The guest memory file whose kernel object `fd` refers to, if this process
/// has one open (created here or restored here). Works for any fd of the same
/// file: a dup, one received over a socket, or one inherited across exec and
/// restored.
pub fn lookup(fd: BorrowedFd<'_>) -> Option<Arc<GuestMemFile>> {
    let key = inode_key(fd).ok()?;
    registry().get(&key).and_then(|entry| entry.file.upgrade())
}

/// How many files are registered (for the memory-per-file report).
pub fn registered_files() -> usize {
    registry().len()
}
