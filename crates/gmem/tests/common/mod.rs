//! Helpers shared by gmem's integration tests.

use gmem::Backend;

/// The backends to run on: memfd always, kvm where /dev/kvm offers
/// guest_memfd with host mmap (printing a skip line otherwise).
pub fn backends() -> Vec<Backend> {
    let (auto, reason) = Backend::auto_with_reason();
    if auto == Backend::Kvm {
        vec![Backend::Memfd, Backend::Kvm]
    } else {
        test_support::skipped(format_args!("kvm backend not tested: {reason}"));
        vec![Backend::Memfd]
    }
}
