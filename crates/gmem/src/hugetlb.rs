//! Huge pages for the hugetlb backend: reserving 2 MiB pages in the
//! kernel's pool and giving them back.
//!
//! Model: the kernel keeps one pool of 2 MiB huge pages per machine
//! ([`POOL_DIRECTORY`]; `/proc/sys/vm/nr_hugepages` is the same pool where
//! 2 MiB is the default huge page size, as on x86-64 unless the command
//! line says otherwise, and this module uses the per-size files because the
//! backend asks for 2 MiB pages by name, `MFD_HUGE_2MB`). A hugetlb file
//! allocates from the pool and fails with ENOSPC when it is empty, and it
//! stays empty until root raises `nr_hugepages`. A [`HugePageReservation`]
//! makes sure a number of pages are available to its holder and, on drop,
//! gives back exactly the pages it added.
//!
//! Invariant: a live reservation has added `added` pages to the pool and
//! claims `pages` of it. Within this process the pages claimed by live
//! reservations are not counted as available for a new one, so two
//! reservations of N and M pages held at once find N + M pages, not
//! max(N, M). Every read-modify-write of the pool size by this module runs
//! under one process-wide lock, so reservations of concurrent threads do
//! not lose each other's updates. (Other processes write the pool without
//! that lock; a change they make between our read and our write of the
//! pool size is lost, as with any writer of that file.)
//!
//! Success path of [`HugePageReservation::ensure_available`]:
//! 1. Lock; read the pool size and the available pages (free pages not
//!    promised to a mapping); subtract what live reservations of this
//!    process claim.
//! 2. If fewer than the pages asked for are left, raise `nr_hugepages` by
//!    the shortfall (root only) and read back what the kernel made.
//! 3. Check that the kernel made all of it and that the pages are
//!    available; claim them.
//!
//! Failure paths (the pool is as before each of them):
//! 1. No 2 MiB pool (a kernel without hugetlb): [`HugePageError::Read`],
//!    ENOENT.
//! 2. Not permitted to write `nr_hugepages` (not root):
//!    [`HugePageError::NotPermitted`], EACCES or EPERM; nothing changed.
//! 3. The kernel made fewer pages (memory too small or too fragmented), or
//!    someone took them meanwhile: [`HugePageError::KernelShort`], ENOMEM;
//!    what it did add is given back first.
//!
//! Drop: lock, release the claim, set the pool to its current size less
//! what this reservation added, not to the size it had before: another
//! process may have resized the pool meanwhile, and its pages stay.
//!
//! A process ended by a signal drops nothing. [`give_back_on_termination`]
//! is for a handler of SIGINT or SIGTERM that ends the process: it gives
//! back what every live reservation added, with no lock and no allocation;
//! [`give_back_when_ended_by_signal`] installs such a handler.

use std::ffi::CStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use rustix::io::Errno;

use crate::types::FolioOrder;

/// Bytes of one huge page of the pool: the hugetlb backend's folio.
pub const HUGE_PAGE_SIZE: u64 = FolioOrder::HUGE_2M.bytes();

/// The kernel's directory of the 2 MiB huge page pool.
pub const POOL_DIRECTORY: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB";

const POOL_SIZE_FILE: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages";
const FREE_FILE: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages";
const RESERVED_FILE: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB/resv_hugepages";
/// [`POOL_SIZE_FILE`] for raw system calls (no allocation to make it).
const POOL_SIZE_PATH: &CStr = c"/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages";

/// The live reservations of this process.
static LEDGER: Ledger = Ledger::new();

/// What the live reservations of a process hold.
struct Ledger {
    /// Pages they claim; its lock is the one every pool update of this
    /// module runs under.
    claimed: Mutex<u64>,
    /// Pages they added to the pool, updated under that lock and read
    /// without it by [`give_back_on_termination`].
    added: AtomicU64,
}

impl Ledger {
    const fn new() -> Ledger {
        Ledger {
            claimed: Mutex::new(0),
            added: AtomicU64::new(0),
        }
    }
}

/// Why huge pages could not be reserved.
#[derive(Debug, thiserror::Error)]
pub enum HugePageError {
    /// A file of the pool could not be read: ENOENT where the kernel has no
    /// 2 MiB pool (built without hugetlb).
    #[error("cannot read {path} (is there a 2 MiB huge page pool?): {errno}")]
    Read {
        /// The file.
        path: &'static str,
        /// The kernel's error.
        errno: Errno,
    },
    /// A file of the pool did not hold a number (EINVAL).
    #[error("{path} does not hold a page count: {text:?}")]
    Malformed {
        /// The file.
        path: &'static str,
        /// What it held.
        text: String,
    },
    /// Raising the pool needs root (CAP_SYS_ADMIN): EACCES or EPERM.
    #[error(
        "raising the huge page pool to {pool} pages needs root: writing {POOL_SIZE_FILE}: {errno}"
    )]
    NotPermitted {
        /// The pool size asked for.
        pool: u64,
        /// The kernel's error.
        errno: Errno,
    },
    /// Writing the pool size failed otherwise.
    #[error("cannot set the huge page pool to {pool} pages: writing {POOL_SIZE_FILE}: {errno}")]
    Write {
        /// The pool size asked for.
        pool: u64,
        /// The kernel's error.
        errno: Errno,
    },
    /// The kernel made fewer pages than asked for, or they were taken
    /// meanwhile (ENOMEM).
    #[error(
        "the kernel could not make {pages} huge pages of 2 MiB available: asked for a pool of \
         {asked_pool}, it made {got_pool}, {available} available (too little or too fragmented \
         memory, or another user of the pool)"
    )]
    KernelShort {
        /// Pages asked for.
        pages: u64,
        /// The pool size asked of the kernel.
        asked_pool: u64,
        /// The pool size the kernel made.
        got_pool: u64,
        /// Pages available after the attempt.
        available: u64,
    },
}

impl HugePageError {
    /// The errno that stands for this error.
    pub fn errno(&self) -> i32 {
        self.error_code().raw_os_error()
    }

    /// The errno as rustix's type.
    pub fn error_code(&self) -> Errno {
        match self {
            HugePageError::Read { errno, .. }
            | HugePageError::NotPermitted { errno, .. }
            | HugePageError::Write { errno, .. } => *errno,
            HugePageError::Malformed { .. } => Errno::INVAL,
            HugePageError::KernelShort { .. } => Errno::NOMEM,
        }
    }
}

/// Huge pages to hold `bytes` (rounded up to whole pages).
pub const fn pages_for(bytes: u64) -> u64 {
    bytes.div_ceil(HUGE_PAGE_SIZE)
}

/// The size of the 2 MiB pool in pages (its `nr_hugepages`).
///
/// # Errors
/// `Read` (ENOENT without a 2 MiB pool), `Malformed` (EINVAL).
pub fn pool_size() -> Result<u64, HugePageError> {
    KernelPool.size()
}

/// Pages of the 2 MiB pool a new hugetlb allocation can take now: the free
/// ones less those promised to mappings (`free_hugepages - resv_hugepages`).
///
/// # Errors
/// `Read` (ENOENT without a 2 MiB pool), `Malformed` (EINVAL).
pub fn available_pages() -> Result<u64, HugePageError> {
    KernelPool.available()
}

/// 2 MiB huge pages kept available for the holder; on drop the pool loses
/// the pages this reservation added (see the module documentation).
#[derive(Debug)]
#[must_use = "the pages are given back when the reservation drops"]
pub struct HugePageReservation {
    grant: Grant,
}

impl HugePageReservation {
    /// Makes sure `pages` huge pages of 2 MiB are available to the caller,
    /// beyond those claimed by other live reservations of this process,
    /// raising the pool by the shortfall. Needs root only when the pool
    /// must grow.
    ///
    /// # Errors
    /// - `Read` (ENOENT: no 2 MiB pool), `Malformed` (EINVAL): the pool's
    ///   files.
    /// - `NotPermitted` (EACCES, EPERM): the pool must grow and the caller
    ///   is not root.
    /// - `Write`: the kernel refused the new pool size otherwise.
    /// - `KernelShort` (ENOMEM): the kernel could not make the pages.
    pub fn ensure_available(pages: u64) -> Result<HugePageReservation, HugePageError> {
        reserve(&KernelPool, &LEDGER, pages).map(|grant| HugePageReservation { grant })
    }

    /// [`ensure_available`](Self::ensure_available) for enough pages to
    /// hold `bytes`.
    ///
    /// # Errors
    /// As `ensure_available`.
    pub fn for_bytes(bytes: u64) -> Result<HugePageReservation, HugePageError> {
        Self::ensure_available(pages_for(bytes))
    }

    /// Pages this reservation keeps available.
    pub fn pages(&self) -> u64 {
        self.grant.pages
    }

    /// Pages this reservation added to the pool (fewer than `pages` when
    /// some were available already), given back on drop.
    pub fn added_pages(&self) -> u64 {
        self.grant.added
    }
}

impl Drop for HugePageReservation {
    fn drop(&mut self) {
        release(&KernelPool, &LEDGER, &self.grant);
    }
}

/// What one reservation claims and added.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Grant {
    pages: u64,
    added: u64,
}

/// The pool as this module sees it; the kernel's, or a model in the unit
/// tests.
trait Pool {
    /// `nr_hugepages`.
    fn size(&self) -> Result<u64, HugePageError>;
    /// Free pages not promised to mappings.
    fn available(&self) -> Result<u64, HugePageError>;
    /// Writes `nr_hugepages`; the kernel makes what it can.
    fn resize(&self, pages: u64) -> Result<(), HugePageError>;
}

/// The kernel's 2 MiB pool.
struct KernelPool;

impl KernelPool {
    fn read(path: &'static str) -> Result<u64, HugePageError> {
        let text = std::fs::read_to_string(path).map_err(|error| HugePageError::Read {
            path,
            errno: Errno::from_io_error(&error).unwrap_or(Errno::IO),
        })?;
        text.trim()
            .parse()
            .map_err(|_| HugePageError::Malformed { path, text })
    }
}

impl Pool for KernelPool {
    fn size(&self) -> Result<u64, HugePageError> {
        Self::read(POOL_SIZE_FILE)
    }

    fn available(&self) -> Result<u64, HugePageError> {
        Ok(Self::read(FREE_FILE)?.saturating_sub(Self::read(RESERVED_FILE)?))
    }

    fn resize(&self, pages: u64) -> Result<(), HugePageError> {
        std::fs::write(POOL_SIZE_FILE, pages.to_string()).map_err(|error| {
            match Errno::from_io_error(&error).unwrap_or(Errno::IO) {
                errno @ (Errno::ACCESS | Errno::PERM) => {
                    HugePageError::NotPermitted { pool: pages, errno }
                }
                errno => HugePageError::Write { pool: pages, errno },
            }
        })
    }
}

fn lock(claimed: &Mutex<u64>) -> MutexGuard<'_, u64> {
    // The count is updated in single statements; a panic elsewhere while
    // holding the lock cannot leave it half-written.
    claimed.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Steps 1-3 of the module's success path and its failure paths.
fn reserve(pool: &impl Pool, ledger: &Ledger, pages: u64) -> Result<Grant, HugePageError> {
    let mut claimed = lock(&ledger.claimed);
    let previous_pool = pool.size()?;
    let unclaimed = pool.available()?.saturating_sub(*claimed);
    let shortfall = pages.saturating_sub(unclaimed);
    let mut grant = Grant { pages, added: 0 };
    if shortfall > 0 {
        let asked_pool = previous_pool.saturating_add(shortfall);
        pool.resize(asked_pool)?;
        // Read back what the kernel made; if even that fails, assume it made
        // everything, so that giving back cannot leave pages behind.
        let outcome = pool
            .size()
            .and_then(|got_pool| Ok((got_pool, pool.available()?)));
        let (added, result) = match outcome {
            Ok((got_pool, available)) => {
                let added = got_pool.saturating_sub(previous_pool).min(shortfall);
                let short = HugePageError::KernelShort {
                    pages,
                    asked_pool,
                    got_pool,
                    available,
                };
                let enough = added == shortfall && available >= pages;
                (added, if enough { Ok(()) } else { Err(short) })
            }
            Err(error) => (shortfall, Err(error)),
        };
        grant.added = added;
        if let Err(error) = result {
            give_back(pool, added);
            return Err(error);
        }
    }
    *claimed += pages;
    // Relaxed: a counter on its own; a terminating handler reads its latest
    // value with a read-modify-write.
    ledger.added.fetch_add(grant.added, Ordering::Relaxed);
    Ok(grant)
}

/// The drop of a reservation: release its claim and the pages it added.
fn release(pool: &impl Pool, ledger: &Ledger, grant: &Grant) {
    let mut claimed = lock(&ledger.claimed);
    *claimed = claimed.saturating_sub(grant.pages);
    // Relaxed: as in `reserve`.
    ledger.added.fetch_sub(grant.added, Ordering::Relaxed);
    give_back(pool, grant.added);
}

/// Shrinks the pool by `added`, from its current size: pages that others
/// added meanwhile stay. Runs under the ledger's lock.
fn give_back(pool: &impl Pool, added: u64) {
    if added == 0 {
        return;
    }
    let result = pool
        .size()
        .and_then(|current| pool.resize(current.saturating_sub(added)));
    if let Err(error) = result {
        tracing::warn!(%error, added, "could not give huge pages back to the pool");
    }
}

/// Gives back every page the live reservations of this process added to
/// the pool, for a handler of a signal that ends the process (SIGINT,
/// SIGTERM): a process killed by a signal drops no reservation, and the
/// pool would stay raised. Returns how many pages it gave back.
///
/// Async-signal-safe: no lock (the handler may have interrupted the lock's
/// holder), no allocation (the pool file is read and written with plain
/// system calls, the number formatted on the stack). Without the lock it
/// can miss a reservation that another thread is making or dropping at that
/// very moment. Afterwards the reservations must not drop (each would give
/// its pages back a second time): the caller ends the process.
pub fn give_back_on_termination() -> u64 {
    // Relaxed: see `reserve`; the swap makes a second call give back nothing.
    let added = LEDGER.added.swap(0, Ordering::Relaxed);
    if added == 0 {
        return 0;
    }
    match read_pool_size_raw() {
        Some(current) if write_pool_size_raw(current.saturating_sub(added)) => added,
        _ => 0,
    }
}

/// The signals that end a process by default and that
/// [`give_back_when_ended_by_signal`] handles: Ctrl-C, `kill`, a closed
/// terminal.
const ENDING_SIGNALS: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

/// For a program that holds reservations (a benchmark raising the pool for
/// minutes): installs, for the rest of the process, a handler of SIGINT,
/// SIGTERM and SIGHUP that gives back what the live reservations added
/// ([`give_back_on_termination`]) and then ends the process by the same
/// signal with its default action, so the exit status still says what
/// ended it. It replaces any handler the program had for those signals.
///
/// # Errors
/// sigaction's (EINVAL), which these signals do not meet.
pub fn give_back_when_ended_by_signal() -> std::io::Result<()> {
    for signal in ENDING_SIGNALS {
        // SAFETY: an all-zero sigaction is a valid value (SIG_DFL, empty
        // mask, no flags), completed below.
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = end_by_signal as *const () as libc::sighandler_t;
        // SAFETY: `action` is a live sigaction; the handler is an `extern
        // "C"` function taking the signal number; no former action wanted.
        if unsafe { libc::sigaction(signal, &action, std::ptr::null_mut()) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Gives the pool back, then ends the process by `signal` itself.
extern "C" fn end_by_signal(signal: libc::c_int) {
    give_back_on_termination();
    // SAFETY: signal(2) and raise(3) are async-signal-safe. The signal is
    // blocked while this handler runs, so the raised one is delivered, with
    // the default action (the process ends), when the handler returns.
    unsafe {
        libc::signal(signal, libc::SIG_DFL);
        libc::raise(signal);
    }
}

/// The pool size read with plain system calls (see
/// [`give_back_on_termination`]).
fn read_pool_size_raw() -> Option<u64> {
    use rustix::fs::{Mode, OFlags};
    let fd = rustix::fs::open(
        POOL_SIZE_PATH,
        OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .ok()?;
    let mut text = [0u8; 32];
    let length = rustix::io::read(&fd, &mut text).ok()?;
    parse_page_count(text.get(..length)?)
}

/// Writes the pool size with plain system calls and a stack buffer.
fn write_pool_size_raw(pages: u64) -> bool {
    use rustix::fs::{Mode, OFlags};
    let mut digits = [0u8; 20];
    let text = format_page_count(pages, &mut digits);
    let Ok(fd) = rustix::fs::open(
        POOL_SIZE_PATH,
        OFlags::WRONLY | OFlags::CLOEXEC,
        Mode::empty(),
    ) else {
        return false;
    };
    rustix::io::write(&fd, text).is_ok_and(|written| written == text.len())
}

/// A page count as the pool files hold it: decimal digits and a newline.
fn parse_page_count(text: &[u8]) -> Option<u64> {
    let digits = text.trim_ascii_end();
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |count, &digit| {
        if !digit.is_ascii_digit() {
            return None;
        }
        count.checked_mul(10)?.checked_add(u64::from(digit - b'0'))
    })
}

/// `pages` in decimal, written at the end of `digits` (20 digits hold any
/// u64); returns the written part.
fn format_page_count(pages: u64, digits: &mut [u8; 20]) -> &[u8] {
    let mut start = digits.len();
    let mut rest = pages;
    loop {
        start -= 1;
        digits[start] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    &digits[start..]
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use super::*;

    /// A model of the kernel's pool: it can make at most `capacity` pages;
    /// `used` pages are allocated by files.
    struct ModelPool {
        state: RefCell<ModelState>,
    }

    #[derive(Debug, Clone, Copy)]
    struct ModelState {
        size: u64,
        used: u64,
        capacity: u64,
        root: bool,
        writes: u32,
    }

    impl ModelPool {
        fn new(size: u64, capacity: u64, root: bool) -> ModelPool {
            ModelPool {
                state: RefCell::new(ModelState {
                    size,
                    used: 0,
                    capacity,
                    root,
                    writes: 0,
                }),
            }
        }

        fn state(&self) -> ModelState {
            *self.state.borrow()
        }

        fn set(&self, change: impl FnOnce(&mut ModelState)) {
            change(&mut self.state.borrow_mut());
        }
    }

    impl Pool for ModelPool {
        fn size(&self) -> Result<u64, HugePageError> {
            Ok(self.state.borrow().size)
        }

        fn available(&self) -> Result<u64, HugePageError> {
            let state = self.state.borrow();
            Ok(state.size.saturating_sub(state.used))
        }

        fn resize(&self, pages: u64) -> Result<(), HugePageError> {
            let mut state = self.state.borrow_mut();
            if !state.root {
                return Err(HugePageError::NotPermitted {
                    pool: pages,
                    errno: Errno::ACCESS,
                });
            }
            state.writes += 1;
            state.size = pages.min(state.capacity);
            Ok(())
        }
    }

    #[test]
    fn only_the_shortfall_is_added_and_given_back() {
        let pool = ModelPool::new(2, 100, true);
        let ledger = Ledger::new();
        let grant = reserve(&pool, &ledger, 5).unwrap();
        assert_eq!(grant, Grant { pages: 5, added: 3 });
        assert_eq!(pool.state().size, 5);
        assert_eq!(*ledger.claimed.lock().unwrap(), 5);
        assert_eq!(ledger.added.load(Ordering::Relaxed), 3);
        release(&pool, &ledger, &grant);
        assert_eq!(pool.state().size, 2);
        assert_eq!(*ledger.claimed.lock().unwrap(), 0);
        assert_eq!(ledger.added.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn page_counts_parse_and_format_without_allocating() {
        assert_eq!(parse_page_count(b"512\n"), Some(512));
        assert_eq!(parse_page_count(b"0"), Some(0));
        for bad in [
            &b""[..],
            b"\n",
            b"12a\n",
            b"-1",
            b" 7",
            b"99999999999999999999999",
        ] {
            assert_eq!(parse_page_count(bad), None, "{bad:?}");
        }
        let mut digits = [0u8; 20];
        for pages in [0, 7, 10, 4096, u64::MAX] {
            let text = format_page_count(pages, &mut digits);
            assert_eq!(text, pages.to_string().as_bytes());
            assert_eq!(parse_page_count(text), Some(pages));
        }
        assert_eq!(POOL_SIZE_PATH.to_str(), Ok(POOL_SIZE_FILE));
    }

    #[test]
    fn enough_available_pages_need_no_write_and_no_root() {
        let pool = ModelPool::new(4, 100, false);
        let ledger = Ledger::new();
        let grant = reserve(&pool, &ledger, 4).unwrap();
        assert_eq!(grant.added, 0);
        release(&pool, &ledger, &grant);
        assert_eq!((pool.state().size, pool.state().writes), (4, 0));
    }

    #[test]
    fn reservations_held_at_once_add_up() {
        let pool = ModelPool::new(0, 100, true);
        let ledger = Ledger::new();
        let first = reserve(&pool, &ledger, 3).unwrap();
        let second = reserve(&pool, &ledger, 3).unwrap();
        assert_eq!((first.added, second.added), (3, 3));
        assert_eq!(pool.state().size, 6);
        release(&pool, &ledger, &first);
        release(&pool, &ledger, &second);
        assert_eq!(pool.state().size, 0);
    }

    #[test]
    fn pages_a_holder_has_used_do_not_fail_the_next_reservation() {
        let pool = ModelPool::new(0, 100, true);
        let ledger = Ledger::new();
        let first = reserve(&pool, &ledger, 3).unwrap();
        pool.set(|state| state.used = 3);
        let second = reserve(&pool, &ledger, 2).unwrap();
        assert_eq!(second.added, 2);
        assert_eq!(pool.state().size, 5);
        release(&pool, &ledger, &second);
        release(&pool, &ledger, &first);
        assert_eq!(pool.state().size, 0);
    }

    #[test]
    fn drop_subtracts_only_what_it_added_when_the_pool_changed_meanwhile() {
        let pool = ModelPool::new(1, 100, true);
        let ledger = Ledger::new();
        let grant = reserve(&pool, &ledger, 4).unwrap();
        assert_eq!(grant.added, 3);
        // Another process raises the pool for itself.
        pool.set(|state| state.size = 10);
        release(&pool, &ledger, &grant);
        assert_eq!(pool.state().size, 7);
    }

    #[test]
    fn without_root_a_growing_pool_is_refused_and_nothing_changes() {
        let pool = ModelPool::new(1, 100, false);
        let ledger = Ledger::new();
        let error = reserve(&pool, &ledger, 2).unwrap_err();
        assert!(
            matches!(error, HugePageError::NotPermitted { pool: 2, .. }),
            "{error:?}"
        );
        assert_eq!(error.errno(), libc::EACCES);
        assert!(error.to_string().contains("needs root"), "{error}");
        assert_eq!(pool.state().size, 1);
        assert_eq!(*ledger.claimed.lock().unwrap(), 0);
    }

    #[test]
    fn a_kernel_short_of_pages_is_reported_and_what_it_made_given_back() {
        let pool = ModelPool::new(1, 3, true);
        let ledger = Ledger::new();
        let error = reserve(&pool, &ledger, 5).unwrap_err();
        assert!(
            matches!(
                error,
                HugePageError::KernelShort {
                    pages: 5,
                    asked_pool: 5,
                    got_pool: 3,
                    available: 3
                }
            ),
            "{error:?}"
        );
        assert_eq!(error.errno(), libc::ENOMEM);
        assert_eq!(pool.state().size, 1);
        assert_eq!(*ledger.claimed.lock().unwrap(), 0);
    }

    #[test]
    fn pages_for_rounds_up_to_whole_huge_pages() {
        assert_eq!(pages_for(0), 0);
        assert_eq!(pages_for(1), 1);
        assert_eq!(pages_for(HUGE_PAGE_SIZE), 1);
        assert_eq!(pages_for(HUGE_PAGE_SIZE + 1), 2);
        assert_eq!(HUGE_PAGE_SIZE, 2 << 20);
    }
}
