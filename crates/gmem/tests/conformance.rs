//! Conformance with the real kernel: the same create and fallocate inputs
//! run against the crate's memfd backend and against a bare kernel
//! guest_memfd made here with KVM_CREATE_VM + KVM_CREATE_GUEST_MEMFD. The
//! kernel is the reference: every errno must match.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use gmem::{Backend, FallocMode, GmemFlags, GuestMemFile};
use kvm_bindings::kvm_create_guest_memfd;
use kvm_ioctls::{Kvm, VmFd};

const FILE_SIZE: i64 = 1 << 20;
/// `KVM_CAP_GUEST_MEMFD_FLAGS` (include/uapi/linux/kvm.h, Linux 6.18).
const KVM_CAP_GUEST_MEMFD_FLAGS: u64 = 244;

/// A VM on which the kernel offers guest_memfd with MMAP | INIT_SHARED, or
/// `None` after printing why the comparison is skipped.
fn kernel_vm() -> Option<VmFd> {
    let kvm = match Kvm::new() {
        Ok(kvm) => kvm,
        Err(error) => {
            test_support::skipped(format_args!(
                "no kernel guest_memfd to compare with: /dev/kvm: {error}"
            ));
            return None;
        }
    };
    let vm = match kvm.create_vm() {
        Ok(vm) => vm,
        Err(error) => {
            test_support::skipped(format_args!(
                "no kernel guest_memfd to compare with: KVM_CREATE_VM: {error}"
            ));
            return None;
        }
    };
    let offered = vm.check_extension_raw(KVM_CAP_GUEST_MEMFD_FLAGS);
    if offered & 3 != 3 {
        test_support::skipped(format_args!(
            "kernel guest_memfd offers flags {offered:#x}, not MMAP | INIT_SHARED"
        ));
        return None;
    }
    Some(vm)
}

/// The kernel's answer to KVM_CREATE_GUEST_MEMFD: Ok(fd) or the errno.
fn kernel_create(vm: &VmFd, size: u64, flags: u64) -> Result<OwnedFd, i32> {
    let request = kvm_create_guest_memfd {
        size,
        flags,
        reserved: [0; 6],
    };
    match vm.create_guest_memfd(request) {
        // SAFETY: a fresh fd from KVM_CREATE_GUEST_MEMFD, owned by nobody else.
        Ok(raw) => Ok(unsafe { OwnedFd::from_raw_fd(raw) }),
        Err(error) => Err(error.errno()),
    }
}

/// The kernel's fallocate: 0 or the errno.
fn kernel_fallocate(fd: &OwnedFd, mode: i32, offset: i64, len: i64) -> i32 {
    // SAFETY: fallocate on an fd we own; no memory is passed.
    let result = unsafe { libc::fallocate(fd.as_raw_fd(), mode, offset, len) };
    if result == 0 {
        0
    } else {
        std::io::Error::last_os_error().raw_os_error().unwrap_or(-1)
    }
}

fn errno_of<T>(result: Result<T, gmem::GmemError>) -> i32 {
    result.map_or_else(|error| error.errno(), |_| 0)
}

#[test]
fn create_matches_the_kernel() {
    let Some(vm) = kernel_vm() else { return };
    let sizes: [u64; 10] = [
        0,
        1,
        100,
        4096,
        4097,
        FILE_SIZE as u64,
        1 << 40,
        1 << 62,
        (i64::MAX as u64) & !4095,
        1 << 63,
    ];
    let mut mismatches = Vec::new();
    let mut cases = 0;
    for size in sizes {
        for flags in [0u64, 1, 2, 3, 4, 8, 1 << 63] {
            cases += 1;
            let kernel = kernel_create(&vm, size, flags).map_or_else(|errno| errno, |_| 0);
            let ours = errno_of(GuestMemFile::create(size, GmemFlags(flags), Backend::Memfd));
            if kernel != ours {
                mismatches.push(format!(
                    "create(size {size:#x}, flags {flags:#x}): kernel {kernel}, ours {ours}"
                ));
            }
        }
    }
    eprintln!("create: {cases} cases compared with the kernel");
    assert!(
        mismatches.is_empty(),
        "{} mismatches:\n{}",
        mismatches.len(),
        mismatches.join("\n")
    );
}

#[test]
fn fallocate_matches_the_kernel() {
    let Some(vm) = kernel_vm() else { return };
    let kernel_file = kernel_create(&vm, FILE_SIZE as u64, 3).expect("kernel guest_memfd");
    let ours = GuestMemFile::create(FILE_SIZE as u64, GmemFlags::HOST_ACCESSIBLE, Backend::Memfd)
        .expect("create");
    // Every mode bit alone and combined (the 8 defined bits), plus bits the
    // kernel does not define and a negative mode.
    let mut modes: Vec<i32> = (0..=0xff).collect();
    modes.extend([0x100, 0x101, 0x4000_0001, i32::MIN, -1]);
    let offsets = [
        0,
        4096,
        1,
        2048,
        -4096,
        -1,
        FILE_SIZE - 4096,
        FILE_SIZE,
        FILE_SIZE + 4096,
        4 * FILE_SIZE,
        i64::MAX - 4095,
        i64::MAX,
    ];
    let lens = [
        0,
        -4096,
        4096,
        1,
        3 * 4096,
        FILE_SIZE,
        FILE_SIZE + 4096,
        4 * FILE_SIZE,
        i64::MAX - 4095,
        i64::MAX,
    ];
    let mut mismatches = Vec::new();
    let mut cases = 0;
    let mut accepted = 0;
    for &mode in &modes {
        for &offset in &offsets {
            for &len in &lens {
                cases += 1;
                let kernel = kernel_fallocate(&kernel_file, mode, offset, len);
                let mine = errno_of(ours.fallocate(FallocMode(mode), offset, len));
                accepted += usize::from(kernel == 0);
                if kernel != mine {
                    mismatches.push(format!(
                        "fallocate(mode {mode:#x}, offset {offset}, len {len}): kernel {kernel}, ours {mine}"
                    ));
                }
            }
        }
    }
    eprintln!("fallocate: {cases} cases compared with the kernel, {accepted} accepted by it");
    assert!(accepted > 0, "the table never reached a successful call");
    assert!(
        mismatches.is_empty(),
        "{} mismatches:\n{}",
        mismatches.len(),
        mismatches.join("\n")
    );
}

#[test]
fn ftruncate_is_refused_like_the_kernel() {
    // The size is fixed at creation: the kernel's guest_memfd refuses any
    // ftruncate with EINVAL. Our files expose the kernel fd, so on the kvm
    // backend that is the kernel itself; the memfd backends refuse it with
    // their seals' EPERM instead (tests/api.rs), a documented difference.
    let Some(vm) = kernel_vm() else { return };
    let kernel_file = kernel_create(&vm, FILE_SIZE as u64, 3).expect("kernel guest_memfd");
    let kernel = rustix::fs::ftruncate(&kernel_file, 2 * FILE_SIZE as u64);
    assert_eq!(kernel, Err(rustix::io::Errno::INVAL));
    let ours = GuestMemFile::create(FILE_SIZE as u64, GmemFlags::HOST_ACCESSIBLE, Backend::Kvm)
        .expect("create");
    assert_eq!(
        rustix::fs::ftruncate(ours.as_fd(), 2 * FILE_SIZE as u64),
        Err(rustix::io::Errno::INVAL)
    );
}

/// Offsets and lengths near the boundaries that matter: page alignment, the
/// file size, the largest file size and the sign bit.
fn interesting_value() -> impl proptest::strategy::Strategy<Value = i64> {
    use proptest::prelude::*;
    prop_oneof![
        (-2i64..=2).prop_map(|pages| pages * 4096),
        (0i64..=512).prop_map(|pages| pages * 4096),
        (-8192i64..=8192),
        (0i64..=4).prop_map(|files| files * FILE_SIZE),
        (0i64..=4096).prop_map(|delta| i64::MAX - delta),
        (0i64..=4096).prop_map(|delta| i64::MIN + delta),
        any::<i64>(),
    ]
}

#[test]
fn random_fallocate_calls_match_the_kernel() {
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};
    let Some(vm) = kernel_vm() else { return };
    let kernel_file = kernel_create(&vm, FILE_SIZE as u64, 3).expect("kernel guest_memfd");
    let ours = GuestMemFile::create(FILE_SIZE as u64, GmemFlags::HOST_ACCESSIBLE, Backend::Memfd)
        .expect("create");
    let mode = prop_oneof![0i32..=0xff, any::<i32>(), Just(1), Just(3)];
    let mut runner = TestRunner::new(Config {
        cases: 4000,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(
            &(mode, interesting_value(), interesting_value()),
            |(mode, offset, len)| {
                let kernel = kernel_fallocate(&kernel_file, mode, offset, len);
                let mine = errno_of(ours.fallocate(FallocMode(mode), offset, len));
                prop_assert_eq!(
                    kernel,
                    mine,
                    "fallocate(mode {:#x}, offset {}, len {})",
                    mode,
                    offset,
                    len
                );
                Ok(())
            },
        )
        .expect("our errno differs from the kernel's");
}
