//! The hugetlb backend: 2 MiB folios allocated and punched on 2 MiB
//! boundaries, 4 KiB- and 2 MiB-unaligned requests rejected with EINVAL (the
//! kernel guest_memfd's error for a misaligned request). The test reserves
//! the huge pages it needs with `HugePageReservation` (as root), which gives
//! them back; it says so when it cannot.

use gmem::hugetlb::{HUGE_PAGE_SIZE, HugePageReservation};
use gmem::{
    Backend, FallocMode, FolioOrder, GmemFlags, GuestMemFile, MemPolicy, NodeMask, PageIndex,
};

const HUGE: u64 = HUGE_PAGE_SIZE;
/// Huge pages this test needs at most at once (4 in the file, plus slack).
const NEEDED: u64 = 6;

fn kernel_huge_folios(file: &GuestMemFile) -> u64 {
    rustix::fs::fstat(file.as_fd()).expect("fstat").st_blocks as u64 * 512 / HUGE
}

#[test]
fn huge_folios_are_allocated_and_punched_on_2m_boundaries() {
    let _reservation = match HugePageReservation::ensure_available(NEEDED) {
        Ok(reservation) => reservation,
        Err(reason) => {
            test_support::skipped(format_args!("hugetlb backend not tested: {reason}"));
            return;
        }
    };
    let file = GuestMemFile::create(4 * HUGE, GmemFlags::HOST_ACCESSIBLE, Backend::Hugetlb)
        .expect("create");
    assert_eq!(
        (file.folio_size(), file.folio_order()),
        (HUGE, FolioOrder::HUGE_2M)
    );

    file.fallocate(FallocMode::ALLOCATE, 0, HUGE as i64)
        .expect("allocate one huge folio");
    let folio = file
        .get_folio(PageIndex(3 * 512 + 7))
        .expect("fault in the last folio");
    assert_eq!(
        (folio.index(), folio.order()),
        (PageIndex(3 * 512), FolioOrder::HUGE_2M)
    );
    assert_eq!(
        file.populated().collect::<Vec<_>>(),
        vec![
            (PageIndex(0), FolioOrder::HUGE_2M),
            (PageIndex(1536), FolioOrder::HUGE_2M)
        ]
    );
    assert_eq!(kernel_huge_folios(&file), 2);

    for (offset, len) in [(4096, HUGE), (0, 4096), (1, HUGE), (HUGE, HUGE + 4096)] {
        for mode in [FallocMode::ALLOCATE, FallocMode::PUNCH] {
            let error = file
                .fallocate(mode, offset as i64, len as i64)
                .expect_err("unaligned");
            assert_eq!(
                error.errno(),
                libc::EINVAL,
                "mode {mode} offset {offset} len {len}"
            );
        }
    }
    assert!(
        GuestMemFile::create(HUGE + 4096, GmemFlags::HOST_ACCESSIBLE, Backend::Hugetlb).is_err()
    );

    let mapping = file.mapping().expect("mapping");
    mapping
        .write(HUGE - 4, b"straddles")
        .expect("write across two huge folios");
    let mut back = [0u8; 9];
    mapping.read(HUGE - 4, &mut back).expect("read");
    assert_eq!(&back, b"straddles");
    assert_eq!(kernel_huge_folios(&file), 3);

    file.set_policy(
        PageIndex(0)..PageIndex(512),
        MemPolicy::Bind(NodeMask::single(0)),
    )
    .expect("policy");
    assert_eq!(
        file.policy_at(PageIndex(100)).expect("policy"),
        MemPolicy::Bind(NodeMask::single(0))
    );
    let error = file
        .set_policy(PageIndex(0)..PageIndex(8), MemPolicy::Preferred(0))
        .expect_err("unaligned");
    assert_eq!(error.errno(), libc::EINVAL);

    file.freeze(true);
    let error = file
        .fallocate(FallocMode::PUNCH, HUGE as i64, HUGE as i64)
        .expect_err("frozen");
    assert_eq!(error.errno(), libc::EPERM);
    file.freeze(false);
    file.fallocate(FallocMode::PUNCH, HUGE as i64, HUGE as i64)
        .expect("punch one huge folio");
    assert_eq!(kernel_huge_folios(&file), 2);
    assert!(!file.is_present(PageIndex(512)) && file.is_present(PageIndex(0)));
    // Allocate with policy set (thread policy around fallocate on hugetlb).
    file.fallocate(FallocMode::PUNCH, 0, HUGE as i64)
        .expect("punch");
    file.get_folio(PageIndex(0))
        .expect("fault under the policy");
    assert_eq!(kernel_huge_folios(&file), 2);
}
