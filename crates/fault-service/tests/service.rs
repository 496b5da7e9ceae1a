//! The fault service on real memfds and a real userfaultfd: threads touch
//! pages directly through the mapping (no get_folio of their own), so every
//! first touch must come through the service.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use fault_service::{FaultEvent, FaultService};
use gmem::{Backend, GmemFlags, GuestMemFile, PageIndex};

const PAGE: u64 = 4096;

fn memfd_file(pages: u64) -> Arc<GuestMemFile> {
    GuestMemFile::create(pages * PAGE, GmemFlags::HOST_ACCESSIBLE, Backend::Memfd).expect("create")
}

fn kernel_pages(file: &GuestMemFile) -> u64 {
    rustix::fs::fstat(file.as_fd()).expect("fstat").st_blocks as u64 * 512 / PAGE
}

/// A raw pointer to the mapping, sendable to toucher threads.
#[derive(Clone, Copy)]
struct Base(*mut u8);
// SAFETY: the mapping outlives every toucher (they are joined before the
// file drops) and each thread writes its own 8-byte slot of a page.
unsafe impl Send for Base {}

impl Base {
    fn of(file: &GuestMemFile) -> Base {
        Base(file.mapping().expect("mapping").host_address().as_ptr())
    }

    /// Writes `value` at page `page`, slot `slot`, then reads it back.
    fn touch(self, page: u64, slot: u64, value: u64) -> u64 {
        // SAFETY: page < file pages and slot < 512, so the 8 bytes are in the
        // mapping; aligned to 8; shared memory accessed volatile.
        unsafe {
            let slot = self.0.add((page * PAGE + slot * 8) as usize).cast::<u64>();
            slot.write_volatile(value);
            slot.read_volatile()
        }
    }
}

fn value(thread: u64, page: u64) -> u64 {
    (thread + 1) << 32 | page
}

/// A thread that touches one page (slot 0) and says when the touch returned.
struct Toucher {
    done: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<u64>,
}

impl Toucher {
    fn spawn(base: Base, page: u64, value: u64) -> Toucher {
        let done = Arc::new(AtomicBool::new(false));
        let thread = {
            let done = done.clone();
            std::thread::spawn(move || {
                let value = base.touch(page, 0, value);
                // Pairs with the Acquire load in `is_done`.
                done.store(true, Ordering::Release);
                value
            })
        };
        Toucher { done, thread }
    }

    fn is_done(&self) -> bool {
        self.done.load(Ordering::Acquire)
    }

    /// Waits for the touch; the value it read back.
    fn join(self) -> u64 {
        self.thread.join().expect("toucher")
    }
}

/// Receives the next event and checks that it parks the fault on `page`.
fn expect_parked(events: &std::sync::mpsc::Receiver<FaultEvent>, page: u64) {
    let event = events
        .recv_timeout(Duration::from_secs(5))
        .expect("a Parked event");
    assert!(
        matches!(event, FaultEvent::Parked { index, .. } if index == PageIndex(page)),
        "{event:?}"
    );
}

#[test]
fn every_first_touch_goes_through_get_folio() {
    let pages = 1024;
    let file = memfd_file(pages);
    let (service, _events) = FaultService::start([file.clone()]).expect("start");
    let base = Base::of(&file);
    let touched = Arc::new(Mutex::new(BTreeSet::new()));
    let threads: Vec<_> = (0..4u64)
        .map(|thread| {
            let touched = touched.clone();
            std::thread::spawn(move || {
                let mut state = 0x2545_f491_4f6c_dd1d_u64.wrapping_mul(thread + 1);
                let mut mine = Vec::new();
                for _ in 0..200 {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    let page = state % (pages / 2); // half the file stays untouched
                    assert_eq!(
                        base.touch(page, thread, value(thread, page)),
                        value(thread, page)
                    );
                    mine.push(page);
                }
                touched
                    .lock()
                    .expect("touched")
                    .extend(mine.iter().copied());
                mine
            })
        })
        .collect();
    let per_thread: Vec<Vec<u64>> = threads
        .into_iter()
        .map(|thread| thread.join().expect("toucher"))
        .collect();
    let touched = touched.lock().expect("touched").clone();
    for (thread, pages) in per_thread.iter().enumerate() {
        for &page in pages {
            assert_eq!(
                base.touch(page, thread as u64, value(thread as u64, page)),
                value(thread as u64, page)
            );
        }
    }
    let populated: BTreeSet<u64> = file.populated().map(|(index, _)| index.0).collect();
    assert_eq!(
        populated, touched,
        "populated() must be exactly the touched pages"
    );
    assert_eq!(
        kernel_pages(&file),
        touched.len() as u64,
        "the kernel allocated pages nobody touched"
    );
    let counters = service.counters();
    assert!(counters.served >= touched.len() as u64, "{counters:?}");
    assert_eq!(counters.parked, 0);
    service.shutdown().expect("shutdown");
}

#[test]
fn freeze_parks_faults_and_unfreeze_serves_them() {
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut rounds = 0;
    let mut parked_total = 0;
    while Instant::now() < deadline || rounds < 3 {
        rounds += 1;
        let pages = 256u64;
        let file = memfd_file(pages);
        let (service, events) = FaultService::start([file.clone()]).expect("start");
        let base = Base::of(&file);
        let progress = Arc::new(AtomicU64::new(0));
        let workers = 3u64;
        // Phase 1 (a quarter of each worker's pages) runs unfrozen; the file
        // is frozen between the two barriers; phase 2 meets the freeze.
        let phase_one_done = Arc::new(Barrier::new(workers as usize + 1));
        let frozen = Arc::new(Barrier::new(workers as usize + 1));
        let threads: Vec<_> = (0..workers)
            .map(|thread| {
                let (progress, phase_one_done, frozen) =
                    (progress.clone(), phase_one_done.clone(), frozen.clone());
                std::thread::spawn(move || {
                    let mine: Vec<u64> = (thread..pages).step_by(workers as usize).collect();
                    for (number, &page) in mine.iter().enumerate() {
                        if number == mine.len() / 4 {
                            phase_one_done.wait();
                            frozen.wait();
                        }
                        assert_eq!(
                            base.touch(page, thread, value(thread, page)),
                            value(thread, page)
                        );
                        progress.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        phase_one_done.wait();
        file.freeze(true);
        let (index_at_freeze, kernel_at_freeze) = (file.populated_count(), kernel_pages(&file));
        frozen.wait();
        // Every toucher runs into a missing page and blocks: wait for all.
        let wait_until = Instant::now() + Duration::from_secs(5);
        while service.parked_now() < workers as usize && Instant::now() < wait_until {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(
            service.parked_now(),
            workers as usize,
            "round {rounds}: touchers not all parked"
        );
        let progress_while_frozen = progress.load(Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(
            progress.load(Ordering::Relaxed),
            progress_while_frozen,
            "a parked toucher moved"
        );
        assert_eq!(
            file.populated_count(),
            index_at_freeze,
            "allocated while frozen"
        );
        assert_eq!(
            kernel_pages(&file),
            kernel_at_freeze,
            "the kernel allocated while frozen"
        );
        file.freeze(false);
        threads
            .into_iter()
            .for_each(|thread| thread.join().expect("toucher"));
        assert_eq!(file.populated_count(), pages);
        for page in 0..pages {
            let thread = page % workers;
            assert_eq!(
                base.touch(page, thread, value(thread, page)),
                value(thread, page),
                "data lost"
            );
        }
        let counters = service.counters();
        assert_eq!(counters.served_after_unfreeze, workers, "{counters:?}");
        assert_eq!(counters.parked_now, 0);
        parked_total += counters.parked;
        let parked_events = events
            .try_iter()
            .filter(|event| matches!(event, FaultEvent::Parked { .. }))
            .count();
        assert_eq!(
            parked_events as u64, counters.parked,
            "every parked fault is reported"
        );
        service.shutdown().expect("shutdown");
    }
    eprintln!("{rounds} freeze rounds, {parked_total} faults parked and served after unfreeze");
}

#[test]
fn shutdown_refuses_while_faults_are_parked() {
    let file = memfd_file(16);
    let (service, events) = FaultService::start([file.clone()]).expect("start");
    let base = Base::of(&file);
    file.freeze(true);
    let toucher = Toucher::spawn(base, 3, 42);
    expect_parked(&events, 3);
    let (service, error) = service.shutdown().expect_err("faults are parked");
    assert_eq!(error.errno(), libc::EBUSY);
    assert!(!toucher.is_done(), "the toucher must still be blocked");
    file.freeze(false);
    assert_eq!(toucher.join(), 42);
    let counters = service.shutdown().expect("nothing parked now");
    assert_eq!((counters.parked, counters.served_after_unfreeze), (1, 1));
}

#[test]
fn kvm_backend_is_refused() {
    let (backend, reason) = Backend::auto_with_reason();
    if backend != Backend::Kvm {
        test_support::skipped(format_args!("no kvm backend here: {reason}"));
        return;
    }
    let file =
        GuestMemFile::create(1 << 20, GmemFlags::HOST_ACCESSIBLE, Backend::Kvm).expect("create");
    let error = FaultService::start([file]).expect_err("kvm backend");
    assert_eq!(error.errno(), libc::EOPNOTSUPP);
}

/// Huge pages available for a new allocation; 0 when the pool cannot be
/// read (the reservation before it has said why already).
fn free_huge_pages() -> u64 {
    gmem::hugetlb::available_pages().unwrap_or(0)
}

#[test]
fn a_fault_that_cannot_be_served_is_reported_and_retried() {
    // Exhaust the huge page pool with a "hog" file, so the service's
    // get_folio fails with ENOSPC: the fault must be reported as Failed and
    // stay parked (the toucher blocked), then be served once a page is free.
    let huge = gmem::hugetlb::HUGE_PAGE_SIZE;
    let _reservation = match gmem::hugetlb::HugePageReservation::ensure_available(1) {
        Ok(reservation) => reservation,
        Err(reason) => {
            test_support::skipped(format_args!("hugetlb failure path not tested: {reason}"));
            return;
        }
    };
    let file = GuestMemFile::create(2 * huge, GmemFlags::HOST_ACCESSIBLE, Backend::Hugetlb)
        .expect("create");
    // Other users of the machine may hold a large pool, or change it while
    // this runs; then the pool cannot be exhausted reliably: skip, saying so.
    let free = free_huge_pages();
    if free > 64 {
        test_support::skipped(format_args!(
            "hugetlb failure path: {free} free huge pages (someone else's pool) are too many to exhaust"
        ));
        return;
    }
    let hog =
        GuestMemFile::create(free.max(1) * huge, GmemFlags::NONE, Backend::Hugetlb).expect("hog");
    if let Err(error) = hog.fallocate(gmem::FallocMode::ALLOCATE, 0, (free.max(1) * huge) as i64) {
        test_support::skipped(format_args!(
            "hugetlb failure path: the pool changed under the test: {error}"
        ));
        return;
    }
    if free_huge_pages() != 0 {
        test_support::skipped(format_args!(
            "hugetlb failure path: the pool grew under the test"
        ));
        return;
    }
    let (service, events) = FaultService::start([file.clone()]).expect("start");
    let base = Base::of(&file);
    let toucher = Toucher::spawn(base, 512 + 1, 7);
    let event = events
        .recv_timeout(Duration::from_secs(5))
        .expect("a Failed event");
    match &event {
        FaultEvent::Failed { index, errno, .. } => {
            assert_eq!(
                index.0 / 512,
                1,
                "the fault is in the second huge folio: {event:?}"
            );
            assert_eq!(*errno, libc::ENOSPC, "{event:?}");
        }
        other => panic!("expected Failed, got {other:?}"),
    }
    std::thread::sleep(Duration::from_millis(20));
    assert!(
        !toucher.is_done(),
        "the toucher must stay blocked, not be dropped"
    );
    assert_eq!(service.parked_now(), 1);
    // Free one huge page, then nudge the handler: an unfreeze signal (the
    // file was never frozen) makes it retry that file's parked faults.
    hog.fallocate(gmem::FallocMode::PUNCH, 0, huge as i64)
        .expect("free one huge page");
    file.freeze(false);
    assert_eq!(toucher.join(), 7);
    let counters = service.counters();
    assert!(
        counters.failed >= 1 && counters.served_after_unfreeze == 1,
        "{counters:?}"
    );
    assert_eq!(
        file.populated().collect::<Vec<_>>(),
        vec![(PageIndex(512), gmem::FolioOrder::HUGE_2M)]
    );
    service.shutdown().expect("shutdown");
}

#[test]
fn dropping_the_service_with_parked_faults_detaches_its_handler() {
    let file = memfd_file(16);
    let (service, events) = FaultService::start([file.clone()]).expect("start");
    let base = Base::of(&file);
    file.freeze(true);
    let toucher = Toucher::spawn(base, 5, 9);
    expect_parked(&events, 5);
    drop(service);
    let detached = events
        .recv_timeout(Duration::from_secs(5))
        .expect("a Detached event");
    assert_eq!(detached, FaultEvent::Detached { parked: 1 });
    // Nothing was woken behind the freeze: the toucher still waits...
    std::thread::sleep(Duration::from_millis(20));
    assert!(
        !toucher.is_done(),
        "the parked toucher was woken by the drop"
    );
    assert!(!file.is_present(PageIndex(5)));
    // ...and the detached handler serves it through get_folio at unfreeze.
    file.freeze(false);
    assert_eq!(toucher.join(), 9);
    assert!(
        file.is_present(PageIndex(5)),
        "served through get_folio, so recorded"
    );
}
