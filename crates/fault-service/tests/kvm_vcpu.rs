//! A real KVM vCPU faults through the service: a tiny real-mode guest stores
//! a byte to a missing page of a memfd-backed memslot; KVM faults the host
//! address, which reaches the userfaultfd and `get_folio`. With the file
//! frozen, the vCPU must stay blocked inside KVM_RUN until the unfreeze.
//!
//! Bounded so it can never hang: a vCPU blocked in a userfaultfd fault is
//! not woken by ordinary signals on this KVM (DESIGN.md), so a watchdog
//! thread unfreezes the file after a deadline whatever happens (which serves
//! the fault and lets KVM_RUN return), and the test then fails if the
//! watchdog was needed. Joins use timeouts.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use fault_service::FaultService;
use gmem::{Backend, GmemFlags, GuestMemFile, PageIndex};
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VcpuExit};

const MEMORY: u64 = 64 * 1024;
/// Where the guest stores (page 2 of the slot).
const TARGET: u64 = 0x2000;
/// `mov al, 0x42; mov [0x2000], al; hlt` in 16-bit real mode.
const GUEST_CODE: [u8; 6] = [0xb0, 0x42, 0xa2, 0x00, 0x20, 0xf4];
const DEADLINE: Duration = Duration::from_secs(20);

#[derive(Debug, PartialEq)]
enum Outcome {
    Halted,
    Other(String),
}

#[test]
fn frozen_file_blocks_the_vcpu_until_unfreeze() {
    let kvm = match Kvm::new() {
        Ok(kvm) => kvm,
        Err(error) => {
            test_support::skipped(format_args!("no /dev/kvm: {error}"));
            return;
        }
    };
    let vm = kvm.create_vm().expect("KVM_CREATE_VM");
    let file =
        GuestMemFile::create(MEMORY, GmemFlags::HOST_ACCESSIBLE, Backend::Memfd).expect("create");
    let mapping = file.mapping().expect("mapping");
    mapping
        .write(0, &GUEST_CODE)
        .expect("load the guest code (page 0)");
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: MEMORY,
        userspace_addr: mapping.host_address().as_ptr() as u64,
    };
    // SAFETY: the region is the file's mapping, which lives as long as
    // `file`; the VM is dropped explicitly at the end, before `file`, and no
    // vCPU runs after its thread is joined.
    unsafe { vm.set_user_memory_region(region) }.expect("memslot");
    let mut vcpu = vm.create_vcpu(0).expect("vCPU");
    let mut sregs = vcpu.get_sregs().expect("sregs");
    for segment in [&mut sregs.cs, &mut sregs.ds, &mut sregs.es, &mut sregs.ss] {
        segment.base = 0;
        segment.selector = 0;
    }
    vcpu.set_sregs(&sregs).expect("sregs");
    let mut regs = vcpu.get_regs().expect("regs");
    regs.rip = 0;
    regs.rflags = 2;
    vcpu.set_regs(&regs).expect("regs");

    let (service, events) = FaultService::start([file.clone()]).expect("start the service");
    assert!(!file.is_present(PageIndex::containing(TARGET)));
    file.freeze(true);

    // The watchdog: unfreezes after the deadline so KVM_RUN can return.
    let watchdog_fired = Arc::new(AtomicBool::new(false));
    let test_done = Arc::new(AtomicBool::new(false));
    let watchdog = {
        let (file, fired, done) = (file.clone(), watchdog_fired.clone(), test_done.clone());
        std::thread::spawn(move || {
            let start = Instant::now();
            while start.elapsed() < DEADLINE && !done.load(Ordering::Acquire) {
                std::thread::sleep(Duration::from_millis(10));
            }
            if !done.load(Ordering::Acquire) && file.is_frozen() {
                fired.store(true, Ordering::Release);
                file.freeze(false);
            }
        })
    };

    let returned = Arc::new(AtomicBool::new(false));
    let (outcome_sender, outcome) = mpsc::channel();
    let vcpu_thread = {
        let returned = returned.clone();
        std::thread::spawn(move || {
            let result = match vcpu.run() {
                Ok(VcpuExit::Hlt) => Outcome::Halted,
                Ok(other) => Outcome::Other(format!("{other:?}")),
                Err(error) => Outcome::Other(format!("KVM_RUN failed: {error}")),
            };
            returned.store(true, Ordering::Release);
            let _ = outcome_sender.send(result);
            vcpu
        })
    };

    // The store must park in the service...
    let parked_by = Instant::now() + Duration::from_secs(10);
    while service.parked_now() == 0
        && Instant::now() < parked_by
        && !returned.load(Ordering::Acquire)
    {
        std::thread::sleep(Duration::from_millis(1));
    }
    let parked = service.parked_now();
    // ...and the vCPU stay blocked inside KVM_RUN while frozen.
    std::thread::sleep(Duration::from_millis(200));
    let blocked_while_frozen = !returned.load(Ordering::Acquire);
    let populated_while_frozen = file.is_present(PageIndex::containing(TARGET));
    file.freeze(false);
    let result = outcome.recv_timeout(DEADLINE);
    test_done.store(true, Ordering::Release);
    watchdog.join().expect("watchdog");

    assert_eq!(
        parked,
        1,
        "the vCPU's store did not park in the service (events: {:?})",
        events.try_iter().collect::<Vec<_>>()
    );
    assert!(
        blocked_while_frozen,
        "KVM_RUN returned while the file was frozen"
    );
    assert!(
        !populated_while_frozen,
        "the page was allocated while frozen"
    );
    assert!(
        !watchdog_fired.load(Ordering::Acquire),
        "the watchdog had to unfreeze"
    );
    assert_eq!(
        result.expect("KVM_RUN did not return after unfreeze"),
        Outcome::Halted
    );
    vcpu_thread.join().expect("vCPU thread");
    let mut byte = [0u8];
    mapping.read(TARGET, &mut byte).expect("read");
    assert_eq!(byte[0], 0x42, "the guest's store was lost");
    let counters = service.counters();
    assert_eq!(
        (counters.parked, counters.served_after_unfreeze),
        (1, 1),
        "{counters:?}"
    );
    assert_eq!(
        file.populated()
            .map(|(index, _)| index.0)
            .collect::<Vec<_>>(),
        vec![0, TARGET / 4096],
        "only the code page and the stored-to page exist"
    );
    service.shutdown().expect("shutdown");
    drop(vm);
}
