//! The freeze invariant under real load, on a real memfd: worker threads
//! fault random pages and allocate and punch random ranges while a freezer
//! freezes and unfreezes in a loop. While frozen, neither the crate's index
//! nor the kernel's own block count of the file (fstat st_blocks, which
//! shmem keeps per allocated page and which no user-space counter can
//! fake) may change, and at every freeze the index must count exactly the
//! kernel's pages. Bounded in time; millions of operations.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use gmem::{Backend, FallocMode, GmemFlags, GuestMemFile, PageIndex};

const PAGES: u64 = 4096;
const WORKERS: usize = 4;
const RUN_FOR: Duration = Duration::from_secs(3);

fn kernel_pages(file: &GuestMemFile) -> u64 {
    rustix::fs::fstat(file.as_fd()).expect("fstat").st_blocks as u64 * 512 / 4096
}

fn index_pages(file: &GuestMemFile) -> BTreeSet<u64> {
    file.populated().map(|(index, _)| index.0).collect()
}

#[derive(Default)]
struct Counts {
    operations: AtomicU64,
    refused_frozen: AtomicU64,
    punches: AtomicU64,
}

fn worker(file: &GuestMemFile, seed: u64, stop: &AtomicBool, counts: &Counts) {
    let mut state = seed | 1;
    let mut operations = 0u64;
    let mut refused = 0u64;
    let mut punches = 0u64;
    while !stop.load(Ordering::Relaxed) {
        for _ in 0..256 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let page = state % PAGES;
            let result = match (state >> 32) % 100 {
                0..=1 => {
                    punches += 1;
                    file.fallocate(FallocMode::PUNCH, (page * 4096) as i64, 4 * 4096)
                        .map(|_| ())
                }
                2..=3 => {
                    let pages = (PAGES - page).min(8);
                    file.fallocate(
                        FallocMode::ALLOCATE,
                        (page * 4096) as i64,
                        (pages * 4096) as i64,
                    )
                }
                _ => file.get_folio(PageIndex(page)).map(|_| ()),
            };
            match result {
                Ok(()) => {}
                Err(error) if error.is_frozen() => refused += 1,
                Err(error) => panic!("unexpected error: {error}"),
            }
            operations += 1;
        }
    }
    counts.operations.fetch_add(operations, Ordering::Relaxed);
    counts.refused_frozen.fetch_add(refused, Ordering::Relaxed);
    counts.punches.fetch_add(punches, Ordering::Relaxed);
}

#[test]
fn nothing_is_allocated_or_punched_while_frozen() {
    let file = GuestMemFile::create(PAGES * 4096, GmemFlags::HOST_ACCESSIBLE, Backend::Memfd)
        .expect("create");
    let stop = Arc::new(AtomicBool::new(false));
    let counts = Arc::new(Counts::default());
    let start = Arc::new(Barrier::new(WORKERS + 1));
    let workers: Vec<_> = (0..WORKERS)
        .map(|number| {
            let (file, stop, counts, start) =
                (file.clone(), stop.clone(), counts.clone(), start.clone());
            std::thread::spawn(move || {
                start.wait();
                worker(
                    &file,
                    0x9e37_79b9_7f4a_7c15u64.wrapping_mul(number as u64 + 1),
                    &stop,
                    &counts,
                );
            })
        })
        .collect();
    start.wait();
    let deadline = Instant::now() + RUN_FOR;
    let mut freezes = 0u64;
    let mut violations = Vec::new();
    while Instant::now() < deadline {
        file.freeze(true);
        freezes += 1;
        let (index_at_freeze, kernel_at_freeze) = (index_pages(&file), kernel_pages(&file));
        // Frozen, nothing is in flight: the index must equal the kernel's
        // set now, not only at the end (a fault and a punch that interleaved
        // their kernel call and index update would show here).
        if index_at_freeze.len() as u64 != kernel_at_freeze {
            violations.push(format!(
                "freeze {freezes}: index {} pages, kernel {kernel_at_freeze} pages",
                index_at_freeze.len()
            ));
        }
        std::thread::sleep(Duration::from_micros(500));
        let (index_later, kernel_later) = (index_pages(&file), kernel_pages(&file));
        if index_later != index_at_freeze || kernel_later != kernel_at_freeze {
            violations.push(format!(
                "freeze {freezes}: index {} -> {} pages, kernel {kernel_at_freeze} -> {kernel_later} pages",
                index_at_freeze.len(),
                index_later.len()
            ));
        }
        file.freeze(false);
        std::thread::sleep(Duration::from_micros(500));
    }
    stop.store(true, Ordering::Relaxed);
    workers
        .into_iter()
        .for_each(|worker| worker.join().expect("worker"));

    let operations = counts.operations.load(Ordering::Relaxed);
    let refused = counts.refused_frozen.load(Ordering::Relaxed);
    eprintln!(
        "{operations} operations ({} punches), {refused} refused while frozen, {freezes} freeze cycles",
        counts.punches.load(Ordering::Relaxed)
    );
    assert!(
        violations.is_empty(),
        "changes while frozen:\n{}",
        violations.join("\n")
    );
    assert!(freezes >= 20, "only {freezes} freeze cycles");
    assert!(
        refused > 0,
        "no operation ever met the freeze: the test proved nothing"
    );
    assert!(operations >= 1_000_000, "only {operations} operations");
    // Quiescent: the index and the kernel agree exactly.
    assert_eq!(index_pages(&file).len() as u64, kernel_pages(&file));
}
