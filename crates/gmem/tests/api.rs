//! The core API on real kernel objects: create, fallocate, get_folio,
//! freeze, populated, mapping, lookup, descriptor and restore.

mod common;

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use common::backends;
use gmem::{Backend, FallocMode, FolioOrder, FolioRun, GmemFlags, GuestMemFile, PageIndex};

const MIB: u64 = 1 << 20;

fn create(backend: Backend) -> Arc<GuestMemFile> {
    GuestMemFile::create(MIB, GmemFlags::HOST_ACCESSIBLE, backend).expect("create")
}

/// How many folios the kernel says the file holds: st_blocks of the fd,
/// which shmem and hugetlbfs keep per allocated page, independent of the
/// crate's index. guest_memfd keeps no block count (and mincore and
/// SEEK_DATA see fallocated pages as holes), so `None` there.
fn kernel_folios(file: &GuestMemFile) -> Option<u64> {
    if file.backend() == Backend::Kvm {
        return None;
    }
    let stat = rustix::fs::fstat(file.as_fd()).expect("fstat");
    Some(stat.st_blocks as u64 * 512 / file.folio_size())
}

#[test]
fn get_folio_allocates_once_and_records_it() {
    for backend in backends() {
        let file = create(backend);
        assert!(!file.is_present(PageIndex(5)));
        assert!(
            kernel_folios(&file).is_none_or(|folios| folios == 0),
            "{backend}"
        );
        let folio = file.get_folio(PageIndex(5)).expect("fault");
        assert_eq!(
            (folio.index(), folio.order(), folio.size()),
            (PageIndex(5), FolioOrder::BASE, 4096)
        );
        assert!(
            kernel_folios(&file).is_none_or(|folios| folios == 1),
            "{backend}: get_folio did not allocate"
        );
        assert_eq!(
            file.populated().collect::<Vec<_>>(),
            vec![(PageIndex(5), FolioOrder::BASE)]
        );
        let again = file.get_folio(PageIndex(5)).expect("present");
        assert_eq!(
            again.host_address().expect("address"),
            folio.host_address().expect("address")
        );
        let error = file.get_folio(PageIndex(256)).expect_err("past the end");
        assert_eq!(error.errno(), libc::EINVAL);
    }
}

#[test]
fn fallocate_and_punch_change_kernel_and_index_together() {
    for backend in backends() {
        let file = create(backend);
        file.fallocate(FallocMode::ALLOCATE, 8192, 3 * 4096)
            .expect("allocate");
        let pages: Vec<u64> = file.populated().map(|(index, _)| index.0).collect();
        assert_eq!(pages, vec![2, 3, 4]);
        assert!(
            kernel_folios(&file).is_none_or(|folios| folios == 3),
            "{backend}"
        );
        file.fallocate(FallocMode::PUNCH, 3 * 4096, 4096)
            .expect("punch");
        let pages: Vec<u64> = file.populated().map(|(index, _)| index.0).collect();
        assert_eq!(pages, vec![2, 4]);
        assert!(
            kernel_folios(&file).is_none_or(|folios| folios == 2),
            "{backend}"
        );
        // Punching past the end is accepted, as by the kernel.
        file.fallocate(FallocMode::PUNCH, 0, 4 * MIB as i64)
            .expect("punch past the end");
        assert_eq!(file.populated_count(), 0);
    }
}

#[test]
fn freeze_refuses_changes_but_serves_present_folios() {
    for backend in backends() {
        let file = create(backend);
        file.get_folio(PageIndex(1)).expect("fault");
        assert!(!file.freeze(true));
        assert!(file.is_frozen());
        assert!(
            file.get_folio(PageIndex(1)).is_ok(),
            "present folio served while frozen"
        );
        let fault = file
            .get_folio(PageIndex(2))
            .expect_err("missing folio while frozen");
        assert_eq!(fault.errno(), libc::EPERM);
        assert!(fault.is_frozen());
        let allocate = file
            .fallocate(FallocMode::ALLOCATE, 0, 4096)
            .expect_err("allocate while frozen");
        assert_eq!(allocate.errno(), libc::EPERM);
        let punch = file
            .fallocate(FallocMode::PUNCH, 4096, 4096)
            .expect_err("punch while frozen");
        assert_eq!(punch.errno(), libc::EPERM);
        // Validation comes first (the review's remark): a bad call is
        // reported as bad, not as frozen.
        let invalid = file
            .fallocate(FallocMode::ALLOCATE, 1, 4096)
            .expect_err("unaligned");
        assert_eq!(invalid.errno(), libc::EINVAL);
        let unsupported = file
            .fallocate(FallocMode(0), 0, 4096)
            .expect_err("no KEEP_SIZE");
        assert_eq!(unsupported.errno(), libc::EOPNOTSUPP);
        assert!(
            kernel_folios(&file).is_none_or(|folios| folios == 1),
            "{backend}: frozen file changed"
        );
        assert!(file.freeze(false));
        assert!(!file.freeze(false), "second unfreeze reports unfrozen");
        file.get_folio(PageIndex(2)).expect("fault after unfreeze");
        assert_eq!(file.populated_count(), 2);
    }
}

#[test]
fn unfreeze_signals_the_eventfd() {
    let file = create(Backend::Memfd);
    let event = file.unfreeze_eventfd().expect("eventfd");
    let mut counter = [0u8; 8];
    assert_eq!(
        rustix::io::read(event, &mut counter),
        Err(rustix::io::Errno::AGAIN)
    );
    file.freeze(true);
    assert_eq!(
        rustix::io::read(event, &mut counter),
        Err(rustix::io::Errno::AGAIN),
        "freeze does not signal"
    );
    file.freeze(false);
    assert_eq!(rustix::io::read(event, &mut counter), Ok(8));
    assert_eq!(u64::from_ne_bytes(counter), 1);
}

#[test]
fn mapping_reads_and_writes_through_get_folio() {
    for backend in backends() {
        let file = create(backend);
        let mapping = file.mapping().expect("mapping");
        assert_eq!(mapping.len(), MIB);
        let mut buffer = [0xffu8; 16];
        mapping.read(4096 * 7, &mut buffer).expect("read");
        assert_eq!(buffer, [0; 16]);
        assert!(!file.is_present(PageIndex(7)), "a read does not allocate");
        mapping.write(4096 * 8 - 3, b"across pages").expect("write");
        assert!(file.is_present(PageIndex(7)) && file.is_present(PageIndex(8)));
        let mut back = [0u8; 12];
        mapping.read(4096 * 8 - 3, &mut back).expect("read back");
        assert_eq!(&back, b"across pages");
        file.freeze(true);
        mapping
            .write(4096 * 8, b"present")
            .expect("write to a present page while frozen");
        let error = mapping
            .write(4096 * 9, b"missing")
            .expect_err("write to a missing page while frozen");
        assert_eq!(error.errno(), libc::EPERM);
        file.freeze(false);
        assert_eq!(
            mapping
                .write(MIB - 2, b"abc")
                .expect_err("past the end")
                .errno(),
            libc::EFAULT
        );
    }
}

#[test]
fn mapping_needs_mmap_flag_as_the_kernel_does() {
    for backend in backends() {
        let file = GuestMemFile::create(MIB, GmemFlags::NONE, backend).expect("create");
        assert_eq!(file.mapping().expect_err("no MMAP").errno(), libc::ENODEV);
        // Allocation does not need a mapping.
        file.get_folio(PageIndex(0)).expect("fault without mapping");
        assert_eq!(file.populated_count(), 1);
    }
}

#[test]
fn create_rejects_what_the_kernel_rejects() {
    for backend in backends() {
        for size in [0, 100, 4097] {
            let error = GuestMemFile::create(size, GmemFlags::HOST_ACCESSIBLE, backend)
                .expect_err("bad size");
            assert_eq!(error.errno(), libc::EINVAL, "{backend} size {size}");
        }
        let error = GuestMemFile::create(MIB, GmemFlags(4), backend).expect_err("unknown flag");
        assert_eq!(error.errno(), libc::EINVAL);
    }
}

#[test]
fn lookup_finds_the_object_behind_any_fd_of_the_file() {
    for backend in backends() {
        let first = create(backend);
        let second = create(backend);
        let duplicate: OwnedFd = first.as_fd().try_clone_to_owned().expect("dup");
        let found = gmem::lookup(duplicate.as_fd()).expect("registered");
        assert!(Arc::ptr_eq(&found, &first));
        drop(found);
        let found = gmem::lookup(second.as_fd()).expect("registered");
        assert!(
            Arc::ptr_eq(&found, &second),
            "{backend}: distinct files have distinct inodes"
        );
        let unrelated =
            rustix::fs::memfd_create("other", rustix::fs::MemfdFlags::CLOEXEC).expect("memfd");
        assert!(gmem::lookup(unrelated.as_fd()).is_none());
        drop(found);
        drop(first);
        assert!(
            gmem::lookup(duplicate.as_fd()).is_none(),
            "a dropped file leaves the registry"
        );
    }
}

#[test]
fn restore_rebuilds_the_file_from_fd_descriptor_and_folios() {
    for backend in backends() {
        let file = create(backend);
        file.mapping()
            .expect("mapping")
            .write(4096 * 3, b"survives")
            .expect("write");
        file.get_folio(PageIndex(200)).expect("fault");
        file.freeze(true);
        let descriptor = file.descriptor();
        assert!(descriptor.frozen);
        let folios: Vec<_> = file.populated().collect();
        let fd = file.as_fd().try_clone_to_owned().expect("dup");
        let busy = GuestMemFile::restore(fd.try_clone().expect("dup"), &descriptor, folios.clone())
            .expect_err("the original is alive");
        assert_eq!(busy.errno(), libc::EBUSY);
        drop(file);

        let mut wrong_size = descriptor.clone();
        wrong_size.size = 2 * MIB;
        let error =
            GuestMemFile::restore(fd.try_clone().expect("dup"), &wrong_size, folios.clone())
                .expect_err("size");
        assert_eq!(error.errno(), libc::EINVAL);
        let error = GuestMemFile::restore(
            fd.try_clone().expect("dup"),
            &descriptor,
            [(PageIndex(256), FolioOrder::BASE)],
        )
        .expect_err("folio past the end");
        assert_eq!(error.errno(), libc::EINVAL);

        let restored = GuestMemFile::restore(fd, &descriptor, folios.clone()).expect("restore");
        assert!(restored.is_frozen(), "restored frozen, as preserved");
        assert_eq!(restored.populated().collect::<Vec<_>>(), folios);
        let mut back = [0u8; 8];
        restored
            .mapping()
            .expect("mapping")
            .read(4096 * 3, &mut back)
            .expect("read");
        assert_eq!(&back, b"survives");
        assert_eq!(
            restored
                .get_folio(PageIndex(4))
                .expect_err("frozen")
                .errno(),
            libc::EPERM
        );
        restored.freeze(false);
        restored
            .get_folio(PageIndex(4))
            .expect("fault after finish");
    }
}

fn run(start: u64, count: u64) -> FolioRun {
    FolioRun {
        start: PageIndex(start),
        count,
        order: FolioOrder::BASE,
    }
}

/// The folios of `runs`, one by one.
fn folios_of(runs: &[FolioRun]) -> Vec<(PageIndex, FolioOrder)> {
    runs.iter()
        .flat_map(|run| {
            (0..run.count).map(move |folio| (PageIndex(run.start.0 + folio), run.order))
        })
        .collect()
}

#[test]
fn populated_runs_describe_the_folios_and_restore_runs_rebuilds_them() {
    for backend in backends() {
        let file = create(backend);
        let generation = file.index_generation();
        file.fallocate(FallocMode::ALLOCATE, 0, 40 * 4096)
            .expect("allocate");
        assert_ne!(
            file.index_generation(),
            generation,
            "an allocation changes it"
        );
        let generation = file.index_generation();
        file.get_folio(PageIndex(0)).expect("present");
        assert_eq!(
            file.index_generation(),
            generation,
            "a present folio does not"
        );
        file.get_folio(PageIndex(100)).expect("fault");
        file.fallocate(FallocMode::ALLOCATE, 200 * 4096, 56 * 4096)
            .expect("allocate to the end");
        file.fallocate(FallocMode::PUNCH, 10 * 4096, 4096)
            .expect("punch");
        let expected = vec![run(0, 10), run(11, 29), run(100, 1), run(200, 56)];
        assert_eq!(file.populated_runs().collect::<Vec<_>>(), expected);
        assert_eq!(file.populated().collect::<Vec<_>>(), folios_of(&expected));
        let generation = file.index_generation();
        file.freeze(true);
        assert_eq!(file.index_generation(), generation, "freezing is no change");
        let descriptor = file.descriptor();
        let fd = file.as_fd().try_clone_to_owned().expect("dup");
        drop(file);

        let refused = |runs: Vec<FolioRun>| {
            GuestMemFile::restore_runs(fd.try_clone().expect("dup"), &descriptor, runs)
                .expect_err("bad runs")
                .errno()
        };
        assert_eq!(refused(vec![run(3, 0)]), libc::EINVAL, "an empty run");
        assert_eq!(refused(vec![run(250, 7)]), libc::EINVAL, "past the end");
        assert_eq!(
            refused(vec![run(u64::MAX - 1, 2)]),
            libc::EINVAL,
            "wrapping"
        );
        let huge = FolioRun {
            order: FolioOrder::HUGE_2M,
            ..run(0, 1)
        };
        assert_eq!(refused(vec![huge]), libc::EINVAL, "the wrong order");

        let restored =
            GuestMemFile::restore_runs(fd, &descriptor, expected.clone()).expect("restore");
        assert!(restored.is_frozen());
        assert_eq!(restored.populated_runs().collect::<Vec<_>>(), expected);
        assert_eq!(restored.populated_count(), 96);
        restored.freeze(false);
    }
}

#[test]
fn update_restored_adds_what_the_predecessor_allocated_and_refuses_what_it_freed() {
    let file = create(Backend::Memfd);
    file.fallocate(FallocMode::ALLOCATE, 0, 16 * 4096)
        .expect("allocate");
    file.freeze(true);
    // The offer: a description taken while the predecessor still runs.
    let offered: Vec<FolioRun> = file.populated_runs().collect();
    let descriptor = file.descriptor();
    let fd = file.as_fd().try_clone_to_owned().expect("dup");
    drop(file);
    // The successor restores ahead from the offer; then the predecessor
    // allocates two more ranges in the kernel object (its explicit step).
    let ahead =
        GuestMemFile::restore_runs(fd.try_clone().expect("dup"), &descriptor, offered.clone())
            .expect("restore ahead");
    for (offset, len) in [(16 * 4096, 4 * 4096), (100 * 4096, 4096)] {
        rustix::fs::fallocate(&fd, rustix::fs::FallocateFlags::KEEP_SIZE, offset, len)
            .expect("the predecessor allocates");
    }
    let later = vec![run(0, 20), run(100, 1)];
    let generation = ahead.index_generation();

    // Out of order, or lacking a folio the object has: refused, nothing
    // recorded.
    let error = ahead
        .update_restored(vec![run(100, 1), run(0, 20)])
        .expect_err("unsorted");
    assert_eq!(error.errno(), libc::EINVAL);
    let error = ahead
        .update_restored(vec![run(0, 8), run(9, 11), run(100, 1)])
        .expect_err("folio 8 was freed");
    assert_eq!(error.errno(), libc::EINVAL);
    assert_eq!(ahead.index_generation(), generation);
    assert_eq!(ahead.populated_runs().collect::<Vec<_>>(), offered);
    // Not frozen: refused.
    ahead.freeze(false);
    let error = ahead.update_restored(later.clone()).expect_err("unfrozen");
    assert_eq!(error.errno(), libc::EBUSY);
    ahead.freeze(true);

    // Adjacent runs of the description count as one range.
    let split = vec![run(0, 16), run(16, 4), run(100, 1)];
    assert_eq!(ahead.update_restored(split).expect("update"), 5);
    assert_ne!(ahead.index_generation(), generation);
    assert_eq!(ahead.populated_runs().collect::<Vec<_>>(), later);
    let generation = ahead.index_generation();
    assert_eq!(ahead.update_restored(later).expect("again"), 0);
    assert_eq!(
        ahead.index_generation(),
        generation,
        "nothing new, no change"
    );
    ahead.freeze(false);
}

#[test]
fn restore_refuses_an_fd_of_another_kind() {
    let file = create(Backend::Memfd);
    let mut descriptor = file.descriptor();
    descriptor.backend = Backend::Hugetlb;
    descriptor.size = 2 * MIB;
    let memfd = rustix::fs::memfd_create("plain", rustix::fs::MemfdFlags::CLOEXEC).expect("memfd");
    rustix::fs::ftruncate(&memfd, 2 * MIB).expect("size");
    let error = GuestMemFile::restore(memfd, &descriptor, []).expect_err("not hugetlb");
    assert_eq!(error.errno(), libc::EINVAL);
}

#[test]
fn the_size_is_fixed_at_creation() {
    for backend in backends() {
        let file = create(backend);
        let grown = rustix::fs::ftruncate(file.as_fd(), 2 * MIB);
        let shrunk = rustix::fs::ftruncate(file.as_fd(), 4096);
        // guest_memfd refuses with EINVAL; the memfd's seals with EPERM.
        let expected = if backend == Backend::Kvm {
            rustix::io::Errno::INVAL
        } else {
            rustix::io::Errno::PERM
        };
        assert_eq!((grown, shrunk), (Err(expected), Err(expected)), "{backend}");
        assert_eq!(
            rustix::fs::fstat(file.as_fd()).expect("fstat").st_size as u64,
            MIB
        );
        // Allocation and punch hole still work under the seals.
        file.fallocate(FallocMode::ALLOCATE, 0, 8192)
            .expect("allocate");
        file.fallocate(FallocMode::PUNCH, 0, 4096).expect("punch");
        assert_eq!(file.populated_count(), 1);
    }
}
