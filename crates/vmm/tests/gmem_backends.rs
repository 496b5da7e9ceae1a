//! The guest runs on gmem guest memory files of every backend, and resumes
//! in a new VM over the same file.

mod common;

use std::sync::Arc;
use std::time::Duration;

use gmem::hugetlb::{HugePageReservation, pages_for};
use gmem::{Backend, FallocMode, GmemFlags, GuestMemFile};
use vmm::guest::GuestOptions;
use vmm::memory::{GmemRam, GuestMemory};
use vmm::state::MachineState;

const SIZE: u64 = 32 << 20;

fn run_on(backend: Backend) {
    let file = match GuestMemFile::create(SIZE, GmemFlags::HOST_ACCESSIBLE, backend) {
        Ok(file) => file,
        Err(error) => {
            test_support::skipped(format_args!("guest on the {backend} backend: {error}"));
            return;
        }
    };
    // No fault service here: allocate everything through the file first so
    // its index knows every page the guest will touch.
    file.fallocate(FallocMode::ALLOCATE, 0, SIZE as i64)
        .unwrap();
    let memory =
        Arc::new(GuestMemory::new(Arc::new(GmemRam::new(Arc::clone(&file)).unwrap())).unwrap());
    let (running, _monitor) = common::boot_on(Arc::clone(&memory), 2, GuestOptions::default());
    let layout = *running.layout();
    common::wait_for_iterations(&memory, &layout, 20_000, Duration::from_secs(20));
    let (old, _, state) = running
        .stop_capturing(Duration::from_secs(5))
        .map_err(|error| error.error().to_string())
        .unwrap();
    let state = MachineState::from_fd(state.to_memfd().unwrap()).unwrap();
    let running = common::resume_in_new_vm(&memory, &layout, &state);
    drop(old);
    common::wait_for_gaps(&memory, &layout, Duration::from_secs(20));
    let _ = running.stop(Duration::from_secs(5));
    for report in common::assert_verified(&memory, &layout) {
        assert!(report.iterations > 20_000, "{backend}: {report:?}");
    }
    assert_eq!(file.populated_count() * file.folio_size(), SIZE);
}

#[test]
fn guest_runs_and_resumes_on_a_gmem_memfd_file() {
    if common::kvm_available("guest_runs_and_resumes_on_a_gmem_memfd_file") {
        run_on(Backend::Memfd);
    }
}

#[test]
fn guest_runs_and_resumes_on_a_gmem_kvm_file() {
    if common::kvm_available("guest_runs_and_resumes_on_a_gmem_kvm_file") {
        run_on(Backend::Kvm);
    }
}

#[test]
fn guest_runs_and_resumes_on_a_gmem_hugetlb_file() {
    if !common::kvm_available("guest_runs_and_resumes_on_a_gmem_hugetlb_file") {
        return;
    }
    let _pages = match HugePageReservation::ensure_available(pages_for(SIZE) + 2) {
        Ok(pages) => pages,
        Err(reason) => {
            test_support::skipped(format_args!(
                "guest_runs_and_resumes_on_a_gmem_hugetlb_file: {reason}"
            ));
            return;
        }
    };
    run_on(Backend::Hugetlb);
}
