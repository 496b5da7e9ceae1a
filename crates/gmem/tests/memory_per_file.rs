//! Memory per file: 100,000 small memfd-backed files must each cost under
//! 1 KiB of this process's memory plus their page-state index — nothing
//! per CPU or per thread per file (the seed's reason for one global SRCU
//! domain). Heap bytes are counted by a global allocator that sees every
//! allocation, and the test fails if no mapping was made at creation either
//! (vm.max_map_count is 65530, so 100,000 eager mappings could not exist).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

use gmem::{Backend, GmemFlags, GuestMemFile};

/// Counts live heap bytes of the whole test process.
struct CountingAllocator;

static LIVE_BYTES: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator; the
// counter only observes sizes.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE_BYTES.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: the caller's contract for `alloc` is passed on as is.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, pointer: *mut u8, layout: Layout) {
        LIVE_BYTES.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.dealloc(pointer, layout) }
    }

    unsafe fn realloc(&self, pointer: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE_BYTES.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        // SAFETY: as above.
        unsafe { System.realloc(pointer, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

const FILES: usize = 100_000;
/// 16 pages: a small file, whose index is one 64-bit word.
const FILE_SIZE: u64 = 64 * 1024;
/// Set in a child process: how many files it holds at once.
const CHILD_ENV: &str = "GMEM_MEMORY_PER_FILE_CHILD";
const TEST_NAME: &str = "one_hundred_thousand_files_cost_under_a_kibibyte_each";

fn mappings() -> usize {
    std::fs::read_to_string("/proc/self/maps").map_or(0, |maps| maps.lines().count())
}

/// Raises the soft fd limit to the hard one; returns how many files one
/// process can hold (fds left after a margin for the test harness).
fn files_per_process() -> usize {
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    let hard = limit.maximum.unwrap_or(1 << 20);
    let raised = rustix::process::Rlimit {
        current: Some(hard),
        maximum: Some(hard),
    };
    let soft = match rustix::process::setrlimit(rustix::process::Resource::Nofile, raised) {
        Ok(()) => hard,
        Err(_) => limit.current.unwrap_or(1024),
    };
    (soft as usize).saturating_sub(512).min(FILES)
}

/// One process's share: create `count` files at once, report the heap bytes
/// per file, the index bytes, and the mappings made.
fn hold_files(count: usize) -> (f64, usize, usize) {
    // Warm lazily built process-wide state (registry map, domain) first.
    drop(
        GuestMemFile::create(FILE_SIZE, GmemFlags::HOST_ACCESSIBLE, Backend::Memfd)
            .expect("warm up"),
    );
    let mut files = Vec::with_capacity(count);
    let maps_before = mappings();
    let before = LIVE_BYTES.load(Ordering::Relaxed);
    for _ in 0..count {
        files.push(
            GuestMemFile::create(FILE_SIZE, GmemFlags::HOST_ACCESSIBLE, Backend::Memfd)
                .expect("create"),
        );
    }
    let after = LIVE_BYTES.load(Ordering::Relaxed);
    let maps_made = mappings().saturating_sub(maps_before);
    // The Vec of handles is the test's, not the files'.
    let handles = (count * std::mem::size_of::<usize>()) as isize;
    let per_file = (after - before - handles) as f64 / count as f64;
    let index = files[0].index_heap_bytes();
    assert_eq!(gmem::registered_files(), count);
    // Files still work after all that.
    files[count / 2]
        .get_folio(gmem::PageIndex(3))
        .expect("fault");
    drop(files);
    assert_eq!(
        gmem::registered_files(),
        0,
        "dropped files left the registry"
    );
    (per_file, index, maps_made)
}

#[test]
fn one_hundred_thousand_files_cost_under_a_kibibyte_each() {
    if let Ok(count) = std::env::var(CHILD_ENV) {
        let count: usize = count.parse().expect("child count");
        let (per_file, index, maps_made) = hold_files(count);
        println!("RESULT {count} {per_file} {index} {maps_made}");
        return;
    }
    // Without CAP_SYS_RESOURCE the hard fd limit may be below 100,000 (it
    // is 20,000 on the project machines), so the files are spread over as
    // few processes as the limit allows, each holding its share at once.
    let per_process = files_per_process();
    assert!(per_process >= 1000, "fd limit too low to measure");
    let mut created = 0;
    let mut worst_per_file = 0f64;
    let mut index_bytes = 0;
    let mut processes = 0;
    while created < FILES {
        let count = per_process.min(FILES - created);
        let output = std::process::Command::new(std::env::current_exe().expect("test binary"))
            .args(["--exact", TEST_NAME, "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, count.to_string())
            .output()
            .expect("spawn child");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "child failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let line = stdout
            .lines()
            .find_map(|line| line.split_once("RESULT ").map(|(_, rest)| rest.trim()))
            .expect("child result line");
        let fields: Vec<f64> = line
            .split(' ')
            .map(|field| field.parse().expect("number"))
            .collect();
        let [_, per_file, index, maps_made] = fields[..] else {
            panic!("bad result line {line}")
        };
        assert!(
            maps_made < 100.0,
            "files were mapped at creation ({maps_made} new mappings)"
        );
        worst_per_file = worst_per_file.max(per_file);
        index_bytes = index as usize;
        created += count;
        processes += 1;
    }
    eprintln!(
        "{created} files in {processes} process(es) of up to {per_process} files held at once: \
         at most {worst_per_file:.0} heap bytes per file, of which the page-state index is {index_bytes}"
    );
    assert!(
        worst_per_file < (1024 + index_bytes) as f64,
        "{worst_per_file:.0} bytes per file exceeds 1 KiB plus the {index_bytes}-byte index"
    );
}
