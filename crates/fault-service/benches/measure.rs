//! Measurements shared by the criterion benchmark (`benches/first_touch.rs`)
//! and the table (`examples/fault_table.rs`): the cost of one first touch of
//! a page with the fault service, without it, and of fallocate of the page.

#![allow(dead_code)]

use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use fault_service::FaultService;
use gmem::{Backend, FallocMode, GmemFlags, GuestMemFile};

/// Pages per file: 64 MiB; when a run has touched them all, the file is
/// punched empty again outside the timing.
pub const PAGES: u64 = 16_384;
const PAGE: u64 = 4096;

/// How a page gets its first touch.
#[derive(Clone, Copy, Debug)]
pub enum FirstTouch {
    /// A store to a page of a gmem file whose mapping the service handles.
    ThroughService,
    /// A store to a page of a plain memfd mapping (the kernel's shmem fault).
    Plain,
    /// `fallocate(KEEP_SIZE)` of the page on a plain memfd, no touch.
    Fallocate,
}

fn plain_memfd() -> (OwnedFd, *mut u8) {
    let fd = rustix::fs::memfd_create("plain", rustix::fs::MemfdFlags::CLOEXEC).expect("memfd");
    rustix::fs::ftruncate(&fd, PAGES * PAGE).expect("size");
    // SAFETY: a fresh shared mapping of the whole memfd, unmapped at the end
    // of `first_touch`.
    let address = unsafe {
        rustix::mm::mmap(
            std::ptr::null_mut(),
            (PAGES * PAGE) as usize,
            rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
            rustix::mm::MapFlags::SHARED,
            &fd,
            0,
        )
    }
    .expect("mmap");
    (fd, address.cast())
}

/// Times `iterations` first touches of `kind`; returns the total.
pub fn first_touch(kind: FirstTouch, iterations: u64) -> Duration {
    let file = GuestMemFile::create(PAGES * PAGE, GmemFlags::HOST_ACCESSIBLE, Backend::Memfd)
        .expect("create");
    let service = matches!(kind, FirstTouch::ThroughService)
        .then(|| FaultService::start([file.clone()]).expect("start"));
    let (plain_fd, plain_base) = plain_memfd();
    let base = match kind {
        FirstTouch::ThroughService => file.mapping().expect("mapping").host_address().as_ptr(),
        FirstTouch::Plain | FirstTouch::Fallocate => plain_base,
    };
    let mut elapsed = Duration::ZERO;
    let mut done = 0;
    while done < iterations {
        let batch = PAGES.min(iterations - done);
        let start = Instant::now();
        for page in 0..batch {
            match kind {
                FirstTouch::ThroughService | FirstTouch::Plain => {
                    // SAFETY: page < PAGES, inside the mapping; a plain store.
                    unsafe { base.add((page * PAGE) as usize).write_volatile(1) };
                }
                FirstTouch::Fallocate => {
                    rustix::fs::fallocate(
                        &plain_fd,
                        rustix::fs::FallocateFlags::KEEP_SIZE,
                        page * PAGE,
                        PAGE,
                    )
                    .expect("fallocate");
                }
            }
        }
        elapsed += start.elapsed();
        done += batch;
        // Untimed: empty both files (a punch also unmaps the pages, so the
        // next touch is a first touch again).
        file.fallocate(FallocMode::PUNCH, 0, (PAGES * PAGE) as i64)
            .expect("punch");
        rustix::fs::fallocate(
            &plain_fd,
            rustix::fs::FallocateFlags::KEEP_SIZE | rustix::fs::FallocateFlags::PUNCH_HOLE,
            0,
            PAGES * PAGE,
        )
        .expect("punch");
    }
    if let Some((service, _events)) = service {
        service.shutdown().expect("shutdown");
    }
    // SAFETY: unmaps the mapping made by `plain_memfd`, no longer used.
    unsafe { rustix::mm::munmap(plain_base.cast(), (PAGES * PAGE) as usize) }.expect("munmap");
    elapsed
}
