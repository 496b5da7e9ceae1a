//! `FaultService`: every first touch of a guest memory file's mapping goes
//! through `GuestMemFile::get_folio`, and a freeze parks faults instead of
//! losing them.
//!
//! Model: in the kernel, a vCPU fault on a missing page reaches
//! `kvm_gmem_get_folio()`, which fails with EPERM while frozen and exits to
//! the VMM. In userspace the control point is userfaultfd: the mappings of
//! memfd-backed files are registered in MISSING mode, so every touch of a
//! missing page — by any thread, or by a vCPU through KVM, which faults the
//! host address — blocks the toucher and delivers a message to the handler
//! thread, which allocates the folio with `get_folio` (fallocate in the
//! file: NUMA policy, page-state index and freeze all apply) and wakes the
//! toucher with UFFDIO_WAKE; the toucher retries and maps the page now in
//! the page cache. Nothing is ever allocated behind `get_folio`'s back (no
//! UFFDIO_ZEROPAGE, no UFFDIO_COPY).
//!
//! Success path of a fault:
//! 1. the handler wakes from epoll (no busy polling) on the userfaultfd;
//! 2. reads the messages; for each, finds the file and page index;
//! 3. `get_folio` allocates (or finds) the folio;
//! 4. UFFDIO_WAKE on the folio's range; the toucher retries and proceeds.
//!
//! Failure paths:
//! 1. `get_folio` says EPERM (frozen): the fault is parked — the toucher
//!    stays blocked, nothing is lost — and reported as a `Parked` event
//!    (address, index, time: the analogue of the seed's exit to the VMM).
//!    At `freeze(false)` the file's unfreeze eventfd wakes the handler, which
//!    serves every parked fault of that file (`ServedAfterUnfreeze`).
//! 2. `get_folio` fails otherwise (ENOSPC, ENOMEM...): the fault is parked
//!    too and reported as `Failed`; it is retried at the file's next
//!    unfreeze and whenever new faults arrive, never dropped.
//! 3. Two touchers of one page: two messages; the second `get_folio` finds
//!    the folio present and only wakes. A raced read returns EAGAIN and is
//!    simply empty. UFFDIO_WAKE on a range with no waiter is harmless.
//!    EEXIST cannot arise: it is what UFFDIO_COPY and UFFDIO_ZEROPAGE return
//!    when a page appeared meanwhile, and the service uses neither; a page
//!    that appeared meanwhile is found present by `get_folio`, and the
//!    toucher is only woken. (Verified on Linux 6.18: after fallocate puts
//!    the folio in the shmem page cache, UFFDIO_WAKE makes the toucher retry
//!    and map it; MISSING mode fires only for pages absent from the cache.)
//! 4. A fault racing a punch hole of its page: while another thread's
//!    `get_folio` redoes an allocation the punch overlapped, the index can
//!    show the folio present a system call before the kernel has it again
//!    (see gmem's `state`). This handler's `get_folio` then finds it
//!    present and wakes the toucher, whose retry faults again if the page
//!    is still missing: a second message, served the same way once it is
//!    there. Nothing is allocated behind `get_folio`, nothing lost.
//!
//! Shutdown: the handler is asked to stop; it first serves every fault
//! already queued, then stops only if nothing is parked. Waking a parked
//! fault would let the toucher retry without the userfaultfd, so the kernel
//! would allocate behind the freeze and the page would be missing from the
//! index (and from a preserved folio list). So `shutdown` with parked faults
//! is refused (EBUSY, the service is handed back), and dropping a service
//! with parked faults detaches the handler instead: it keeps running, and
//! serves them at unfreeze, for the rest of the process (reported as a
//! `Detached` event and logged as an error). After a clean stop the ranges
//! are unregistered and the kernel serves faults directly.

use std::collections::VecDeque;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use gmem::{Backend, GmemError, GuestMemFile, PageIndex};
use rustix::event::epoll;
use rustix::io::Errno;

use crate::uffd::{PageFault, Userfaultfd};

/// epoll keys: the stop eventfd, the userfaultfd, then file k's unfreeze
/// eventfd at `FIRST_FILE_KEY + k`.
const STOP_KEY: u64 = 0;
const UFFD_KEY: u64 = 1;
const FIRST_FILE_KEY: u64 = 2;

/// What went wrong starting or stopping the service.
#[derive(Debug, thiserror::Error)]
pub enum FaultServiceError {
    /// A file's backend cannot be served: the kvm backend's guest_memfd
    /// mapping takes no userfaultfd (EOPNOTSUPP), and the kernel allocates on
    /// vCPU faults there by itself.
    #[error(
        "file {file} is on the {backend} backend, which the fault service cannot serve (memfd and hugetlb only)"
    )]
    UnsupportedBackend {
        /// Position of the file in the list given.
        file: usize,
        /// Its backend.
        backend: Backend,
    },
    /// A file could not be mapped or its unfreeze eventfd made.
    #[error("file {file}: {source}")]
    File {
        /// Position of the file in the list given.
        file: usize,
        /// The gmem error.
        source: GmemError,
    },
    /// A userfaultfd, epoll or eventfd call failed.
    #[error("{operation} failed: {errno}")]
    System {
        /// The call and its purpose.
        operation: &'static str,
        /// The kernel's error.
        errno: Errno,
    },
    /// `shutdown` refused: faults are parked and would be woken into the
    /// kernel's own allocation.
    #[error(
        "{parked} faults are parked; unfreeze their files (or drop the service to abandon them)"
    )]
    FaultsParked {
        /// How many.
        parked: usize,
    },
}

impl FaultServiceError {
    /// The errno: EOPNOTSUPP, EBUSY for `FaultsParked`, or the kernel's.
    pub fn errno(&self) -> i32 {
        match self {
            FaultServiceError::UnsupportedBackend { .. } => libc::EOPNOTSUPP,
            FaultServiceError::File { source, .. } => source.errno(),
            FaultServiceError::System { errno, .. } => errno.raw_os_error(),
            FaultServiceError::FaultsParked { .. } => libc::EBUSY,
        }
    }
}

/// What the service reports to its VMM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FaultEvent {
    /// A fault met a frozen file and is parked; the toucher is blocked.
    Parked {
        /// Position of the file in the list given to `start`.
        file: usize,
        /// The faulting host address.
        address: u64,
        /// The page of the file.
        index: PageIndex,
        /// The faulting thread, when the kernel reports it.
        thread: Option<u32>,
        /// When the fault was parked.
        at: Instant,
    },
    /// A parked fault was served after its file was unfrozen.
    ServedAfterUnfreeze {
        /// Position of the file.
        file: usize,
        /// The faulting host address.
        address: u64,
        /// The page of the file.
        index: PageIndex,
        /// How long it was parked.
        parked_for: Duration,
    },
    /// `get_folio` failed for a reason other than the freeze; the fault
    /// stays parked and is retried.
    Failed {
        /// Position of the file.
        file: usize,
        /// The faulting host address.
        address: u64,
        /// The page of the file.
        index: PageIndex,
        /// The errno.
        errno: i32,
        /// The message.
        message: String,
    },
    /// The service was dropped while faults were parked: its handler was
    /// detached and keeps serving them (at unfreeze) for the rest of the
    /// process, rather than waking them into the kernel's own allocation.
    Detached {
        /// Faults parked at the time.
        parked: usize,
    },
}

/// The service's counters, as one snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FaultCounters {
    /// Faults served at once (allocated or found present, then woken).
    pub served: u64,
    /// Faults parked (frozen file or failed allocation).
    pub parked: u64,
    /// Parked faults served later.
    pub served_after_unfreeze: u64,
    /// Allocation failures other than the freeze (each attempt counts).
    pub failed: u64,
    /// Total time faults spent parked, in nanoseconds (served ones).
    pub parked_nanoseconds: u64,
    /// Faults parked right now.
    pub parked_now: u64,
}

#[derive(Default)]
struct Counters {
    served: AtomicU64,
    parked: AtomicU64,
    served_after_unfreeze: AtomicU64,
    failed: AtomicU64,
    parked_nanoseconds: AtomicU64,
    parked_now: AtomicU64,
}

/// A registered file: its object and its mapping's host range.
struct Region {
    file: Arc<GuestMemFile>,
    start: u64,
    len: u64,
}

/// A fault that could not be served yet.
struct ParkedFault {
    file: usize,
    /// Parked for a failure other than the freeze (retried on new faults).
    failed: bool,
    fault: PageFault,
    index: PageIndex,
    since: Instant,
}

/// The handler's answer to a stop request.
enum StopReply {
    /// Stopped: nothing was parked.
    Stopped,
    /// Still running: this many faults are parked.
    Busy(usize),
}

struct Shared {
    uffd: Userfaultfd,
    /// The stop request eventfd (written by `FaultService`, read here).
    stop: OwnedFd,
    stop_replies: Sender<StopReply>,
    regions: Vec<Region>,
    counters: Counters,
    parked: Mutex<VecDeque<ParkedFault>>,
    events: Sender<FaultEvent>,
}

/// The fault service; see the module documentation.
pub struct FaultService {
    shared: Arc<Shared>,
    stop_reply: Receiver<StopReply>,
    handler: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for FaultService {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("FaultService")
            .field("files", &self.shared.regions.len())
            .field("counters", &self.counters())
            .finish_non_exhaustive()
    }
}

fn system(operation: &'static str) -> impl FnOnce(Errno) -> FaultServiceError {
    move |errno| FaultServiceError::System { operation, errno }
}

impl FaultService {
    /// Registers the mappings of `files` (memfd or hugetlb backend, created
    /// with GUEST_MEMFD_FLAG_MMAP) and starts the handler thread. Returns
    /// the service and the receiver of its events.
    ///
    /// Errors: EOPNOTSUPP (`UnsupportedBackend`) for a kvm-backend file;
    /// ENODEV (`File`) for a file without MMAP; EPERM/ENOSYS from
    /// userfaultfd(2); EBUSY when a range is registered elsewhere; EMFILE.
    pub fn start(
        files: impl IntoIterator<Item = Arc<GuestMemFile>>,
    ) -> Result<(FaultService, Receiver<FaultEvent>), FaultServiceError> {
        let uffd = Userfaultfd::open().map_err(system("open a userfaultfd"))?;
        let mut regions = Vec::new();
        for (number, file) in files.into_iter().enumerate() {
            if file.backend() == Backend::Kvm {
                return Err(FaultServiceError::UnsupportedBackend {
                    file: number,
                    backend: file.backend(),
                });
            }
            let file_error = |source| FaultServiceError::File {
                file: number,
                source,
            };
            let mapping = file.mapping().map_err(file_error)?;
            let (start, len) = (mapping.host_address().as_ptr() as u64, mapping.len());
            file.unfreeze_eventfd().map_err(file_error)?;
            uffd.register(start, len)
                .map_err(system("register a mapping with the userfaultfd"))?;
            regions.push(Region { file, start, len });
        }
        let stop = rustix::event::eventfd(
            0,
            rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK,
        )
        .map_err(system("create the stop eventfd"))?;
        let (events, receiver) = mpsc::channel();
        let (stop_replies, stop_reply) = mpsc::channel();
        let shared = Arc::new(Shared {
            uffd,
            stop,
            stop_replies,
            regions,
            counters: Counters::default(),
            parked: Mutex::new(VecDeque::new()),
            events,
        });
        let poller = Self::poller(&shared)?;
        let handler = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("gmem-faults".to_owned())
                .spawn(move || shared.run(&poller))
                .map_err(|error| FaultServiceError::System {
                    operation: "spawn the handler thread",
                    errno: Errno::from_io_error(&error).unwrap_or(Errno::AGAIN),
                })?
        };
        Ok((
            FaultService {
                shared,
                stop_reply,
                handler: Some(handler),
            },
            receiver,
        ))
    }

    fn poller(shared: &Shared) -> Result<OwnedFd, FaultServiceError> {
        let poller = epoll::create(epoll::CreateFlags::CLOEXEC).map_err(system("epoll_create"))?;
        let add = |fd, key| {
            epoll::add(
                &poller,
                fd,
                epoll::EventData::new_u64(key),
                epoll::EventFlags::IN,
            )
            .map_err(system("add an fd to the epoll set"))
        };
        add(shared.stop.as_fd(), STOP_KEY)?;
        add(shared.uffd.as_fd(), UFFD_KEY)?;
        for (number, region) in shared.regions.iter().enumerate() {
            let event =
                region
                    .file
                    .unfreeze_eventfd()
                    .map_err(|source| FaultServiceError::File {
                        file: number,
                        source,
                    })?;
            add(event, FIRST_FILE_KEY + number as u64)?;
        }
        Ok(poller)
    }

    /// The counters now.
    pub fn counters(&self) -> FaultCounters {
        let counters = &self.shared.counters;
        // Relaxed: each counter is a statistic read on its own.
        FaultCounters {
            served: counters.served.load(Ordering::Relaxed),
            parked: counters.parked.load(Ordering::Relaxed),
            served_after_unfreeze: counters.served_after_unfreeze.load(Ordering::Relaxed),
            failed: counters.failed.load(Ordering::Relaxed),
            parked_nanoseconds: counters.parked_nanoseconds.load(Ordering::Relaxed),
            parked_now: counters.parked_now.load(Ordering::Relaxed),
        }
    }

    /// Faults parked right now.
    pub fn parked_now(&self) -> usize {
        self.shared.lock_parked().len()
    }

    /// Stops the handler and unregisters the mappings; afterwards the kernel
    /// serves faults directly. Returns the final counters.
    ///
    /// Stop only when no thread touches the memory: a fault that arrives
    /// between the handler's last read and the unregistration is woken by
    /// the kernel and served by it.
    ///
    /// Errors: EBUSY (`FaultsParked`, the service is handed back running)
    /// while faults are parked.
    pub fn shutdown(mut self) -> Result<FaultCounters, (FaultService, FaultServiceError)> {
        match self.request_stop() {
            StopReply::Busy(parked) => Err((self, FaultServiceError::FaultsParked { parked })),
            StopReply::Stopped => {
                self.join_and_unregister();
                Ok(self.counters())
            }
        }
    }

    /// Asks the handler to stop and waits for its answer.
    fn request_stop(&mut self) -> StopReply {
        if self.handler.is_none() {
            return StopReply::Stopped;
        }
        if let Err(errno) = rustix::io::write(&self.shared.stop, &1u64.to_ne_bytes()) {
            tracing::error!(%errno, "cannot signal the fault handler to stop");
        }
        // A handler that died has dropped its sender: treat it as stopped.
        self.stop_reply.recv().unwrap_or(StopReply::Stopped)
    }

    fn join_and_unregister(&mut self) {
        if let Some(handler) = self.handler.take()
            && handler.join().is_err()
        {
            tracing::error!("the fault handler thread panicked");
        }
        for region in &self.shared.regions {
            if let Err(errno) = self.shared.uffd.unregister(region.start, region.len) {
                tracing::error!(%errno, "cannot unregister a guest memory mapping");
            }
        }
    }
}

impl Drop for FaultService {
    fn drop(&mut self) {
        match self.request_stop() {
            StopReply::Stopped => self.join_and_unregister(),
            StopReply::Busy(parked) => {
                tracing::error!(
                    parked,
                    "fault service dropped with parked faults: its handler stays running to serve them at unfreeze"
                );
                let _ = self.shared.events.send(FaultEvent::Detached { parked });
                // Dropping the JoinHandle detaches the thread; it owns an Arc
                // of everything it needs.
                self.handler.take();
            }
        }
    }
}

impl Shared {
    fn lock_parked(&self) -> std::sync::MutexGuard<'_, VecDeque<ParkedFault>> {
        // Poisoning ignored: the queue is consistent after every operation.
        self.parked.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The handler thread: wait, dispatch, repeat until the stop eventfd.
    fn run(&self, poller: &OwnedFd) {
        let mut ready: Vec<epoll::Event> = Vec::with_capacity(8);
        let mut faults = Vec::with_capacity(64);
        loop {
            ready.clear();
            match epoll::wait(poller, rustix::buffer::spare_capacity(&mut ready), None) {
                Ok(_) => {}
                Err(Errno::INTR) => continue,
                Err(errno) => {
                    tracing::error!(%errno, "epoll_wait failed; the fault handler stops");
                    return;
                }
            }
            for event in &ready {
                match event.data.u64() {
                    STOP_KEY => {
                        if self.stop_requested(&mut faults) {
                            return;
                        }
                    }
                    UFFD_KEY => self.serve_pending(&mut faults),
                    key => self.serve_unfrozen((key - FIRST_FILE_KEY) as usize),
                }
            }
        }
    }

    /// A stop request: serve what is queued, then stop unless faults are
    /// parked. Returns whether to stop.
    fn stop_requested(&self, faults: &mut Vec<PageFault>) -> bool {
        // Drain the request (EAGAIN only means it was drained already).
        let mut counter = [0u8; 8];
        let _ = rustix::io::read(&self.stop, &mut counter);
        self.serve_pending(faults);
        let parked = self.lock_parked().len();
        let reply = if parked == 0 {
            StopReply::Stopped
        } else {
            StopReply::Busy(parked)
        };
        let _ = self.stop_replies.send(reply);
        parked == 0
    }

    /// Reads and serves every pending fault, then retries failed ones.
    fn serve_pending(&self, faults: &mut Vec<PageFault>) {
        loop {
            if let Err(errno) = self.uffd.read_faults(faults) {
                tracing::error!(%errno, "reading the userfaultfd failed");
                return;
            }
            for fault in faults.iter() {
                self.serve(*fault);
            }
            // A short batch drained the queue; anything newer makes the
            // (level-triggered) epoll report the fd again. This saves a read
            // that would only say EAGAIN on every single fault.
            if faults.len() < crate::uffd::READ_BATCH {
                break;
            }
        }
        self.retry_parked(|parked| parked.failed);
    }

    fn region_of(&self, address: u64) -> Option<(usize, &Region)> {
        self.regions
            .iter()
            .enumerate()
            .find(|(_, region)| (region.start..region.start + region.len).contains(&address))
    }

    fn serve(&self, fault: PageFault) {
        let Some((file, region)) = self.region_of(fault.address) else {
            tracing::warn!(
                address = fault.address,
                "fault outside every registered mapping"
            );
            return;
        };
        let index = PageIndex((fault.address - region.start) / gmem::PAGE_SIZE);
        match self.allocate(region, index) {
            Ok(range) => {
                self.counters.served.fetch_add(1, Ordering::Relaxed);
                self.wake(range);
            }
            Err(error) => self.park(file, fault, index, &error),
        }
    }

    /// `get_folio`; returns the folio's host range, to be woken.
    fn allocate(&self, region: &Region, index: PageIndex) -> Result<(u64, u64), GmemError> {
        let folio = region.file.get_folio(index)?;
        Ok((region.start + folio.index().byte_offset(), folio.size()))
    }

    /// UFFDIO_WAKE over a folio's range. Counters and events are updated
    /// before this, so whoever sees the toucher proceed sees them too.
    fn wake(&self, (start, len): (u64, u64)) {
        if let Err(errno) = self.uffd.wake(start, len) {
            // Only a bad range fails here; the folio exists, so the toucher
            // finds it on its own next retry.
            tracing::error!(%errno, start, "UFFDIO_WAKE failed");
        }
    }

    fn park(&self, file: usize, fault: PageFault, index: PageIndex, error: &GmemError) {
        let since = Instant::now();
        let event = if error.is_frozen() {
            FaultEvent::Parked {
                file,
                address: fault.address,
                index,
                thread: fault.thread,
                at: since,
            }
        } else {
            self.counters.failed.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%error, address = fault.address, "cannot serve a fault; parked for retry");
            FaultEvent::Failed {
                file,
                address: fault.address,
                index,
                errno: error.errno(),
                message: error.to_string(),
            }
        };
        self.lock_parked().push_back(ParkedFault {
            file,
            failed: !error.is_frozen(),
            fault,
            index,
            since,
        });
        self.counters.parked.fetch_add(1, Ordering::Relaxed);
        self.counters.parked_now.fetch_add(1, Ordering::Relaxed);
        let _ = self.events.send(event);
    }

    /// File `file` was unfrozen: drain its eventfd, serve its parked faults.
    fn serve_unfrozen(&self, file: usize) {
        let Some(region) = self.regions.get(file) else {
            return;
        };
        if let Ok(event) = region.file.unfreeze_eventfd() {
            let mut counter = [0u8; 8];
            // EAGAIN only means it was drained already.
            let _ = rustix::io::read(event, &mut counter);
        }
        self.retry_parked(|parked| parked.file == file);
    }

    /// Serves the parked faults that `select` picks; keeps those that still
    /// cannot be served.
    fn retry_parked(&self, select: impl Fn(&ParkedFault) -> bool) {
        // Relaxed: a hint only; the queue itself is read under its lock.
        if self.counters.parked_now.load(Ordering::Relaxed) == 0 {
            return;
        }
        let candidates: Vec<ParkedFault> = {
            let mut parked = self.lock_parked();
            let (chosen, kept): (VecDeque<_>, VecDeque<_>) = parked.drain(..).partition(&select);
            *parked = kept;
            chosen.into()
        };
        for parked in candidates {
            match self.allocate(&self.regions[parked.file], parked.index) {
                Ok(range) => {
                    let parked_for = parked.since.elapsed();
                    self.counters
                        .served_after_unfreeze
                        .fetch_add(1, Ordering::Relaxed);
                    self.counters.parked_now.fetch_sub(1, Ordering::Relaxed);
                    self.counters
                        .parked_nanoseconds
                        .fetch_add(parked_for.as_nanos() as u64, Ordering::Relaxed);
                    let _ = self.events.send(FaultEvent::ServedAfterUnfreeze {
                        file: parked.file,
                        address: parked.fault.address,
                        index: parked.index,
                        parked_for,
                    });
                    self.wake(range);
                }
                Err(error) => {
                    if !error.is_frozen() {
                        self.counters.failed.fetch_add(1, Ordering::Relaxed);
                    }
                    self.lock_parked().push_back(ParkedFault {
                        failed: !error.is_frozen(),
                        ..parked
                    });
                }
            }
        }
    }
}
