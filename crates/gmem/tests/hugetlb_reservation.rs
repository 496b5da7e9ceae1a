//! `HugePageReservation` against the kernel's 2 MiB pool: the pages it
//! promises can be allocated by a hugetlb file, reservations held at once
//! add up, a drop gives back only what it added (also after another writer
//! raised the pool), and a caller without root is told why.
//!
//! The pool is machine-wide: another process resizing it while this runs
//! can make the exact counts below differ; the assertions say so.

use std::os::unix::process::CommandExt;
use std::process::Command;

use gmem::hugetlb::{
    HUGE_PAGE_SIZE, HugePageError, HugePageReservation, POOL_DIRECTORY, available_pages, pool_size,
};
use gmem::{Backend, FallocMode, GmemFlags, GuestMemFile};

/// Above this many available pages (1 GiB) the test does not grow the pool
/// further: allocating all of them would cost too much memory.
const LARGEST_POOL_TESTED: u64 = 512;
/// The environment variable that makes the unprivileged child run its check.
const CHILD: &str = "GMEM_HUGETLB_UNPRIVILEGED_CHILD";
/// The uid of `nobody`, which the child runs as.
const NOBODY: u32 = 65534;

fn write_pool(pages: u64) {
    std::fs::write(format!("{POOL_DIRECTORY}/nr_hugepages"), pages.to_string())
        .expect("write nr_hugepages");
}

#[test]
fn reservations_make_their_pages_allocatable_and_give_back_what_they_added() {
    if !rustix::process::geteuid().is_root() {
        test_support::skipped("huge page reservation on the kernel: not root");
        return;
    }
    let (pool_before, available_before) = match (pool_size(), available_pages()) {
        (Ok(pool), Ok(available)) => (pool, available),
        (Err(error), _) | (_, Err(error)) => {
            test_support::skipped(format_args!("huge page reservation on the kernel: {error}"));
            return;
        }
    };
    if available_before > LARGEST_POOL_TESTED {
        test_support::skipped(format_args!(
            "huge page reservation on the kernel: {available_before} pages are available already \
             (someone else's pool); growing it further would cost too much memory"
        ));
        return;
    }
    // More than are available, so that the pool must grow by 2.
    let pages = available_before + 2;
    let first = match HugePageReservation::ensure_available(pages) {
        Ok(reservation) => reservation,
        Err(error @ HugePageError::KernelShort { .. }) => {
            test_support::skipped(format_args!("huge page reservation on the kernel: {error}"));
            return;
        }
        Err(error) => panic!("reserving {pages} huge pages as root: {error}"),
    };
    assert_eq!(
        first.added_pages(),
        2,
        "{available_before} were available (unless another process changed the pool)"
    );
    // The first reservation's pages are claimed: a second one must add its
    // own even though they are still free.
    let second = HugePageReservation::ensure_available(1).expect("second reservation");
    assert_eq!(second.added_pages(), 1);
    assert!(pool_size().expect("pool") >= pool_before + 3);

    let file = GuestMemFile::create(
        (pages + 1) * HUGE_PAGE_SIZE,
        GmemFlags::HOST_ACCESSIBLE,
        Backend::Hugetlb,
    )
    .expect("create");
    file.fallocate(
        FallocMode::ALLOCATE,
        0,
        ((pages + 1) * HUGE_PAGE_SIZE) as i64,
    )
    .expect("every reserved page can be allocated");
    drop(file);

    // Another writer raises the pool by one page: the drops must keep it.
    write_pool(pool_size().expect("pool") + 1);
    drop(second);
    drop(first);
    let after = pool_size().expect("pool");
    write_pool(pool_before);
    assert_eq!(
        after,
        pool_before + 1,
        "the drops give back the 3 pages they added and keep the other writer's page"
    );
}

#[test]
fn without_root_a_growing_pool_is_refused_with_the_reason() {
    if std::env::var_os(CHILD).is_none() && rustix::process::geteuid().is_root() {
        // Run this same test again as `nobody`, which may not write the pool.
        let output = Command::new(std::env::current_exe().expect("test executable"))
            .args([
                "without_root_a_growing_pool_is_refused_with_the_reason",
                "--exact",
                "--test-threads=1",
            ])
            .env(CHILD, "1")
            .uid(NOBODY)
            .gid(NOBODY)
            .output()
            .expect("run the test as nobody");
        assert!(
            output.status.success(),
            "the unprivileged run failed ({}): {}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        return;
    }
    let available = match available_pages() {
        Ok(available) => available,
        Err(error) => {
            test_support::skipped(format_args!("huge page reservation without root: {error}"));
            return;
        }
    };
    let error = HugePageReservation::ensure_available(available + 1)
        .expect_err("growing the pool without root");
    assert!(
        matches!(error, HugePageError::NotPermitted { .. }),
        "{error:?}"
    );
    assert!(
        [libc::EACCES, libc::EPERM].contains(&error.errno()),
        "{error:?}"
    );
    assert!(error.to_string().contains("needs root"), "{error}");
}
