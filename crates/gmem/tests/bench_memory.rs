//! `gmem::bench::memory_per_file`, the heap count behind `gmemctl bench`'s
//! memory figure, checked against what is known independently: a file costs
//! at least its page-state index and under 1 KiB more (the exact-allocator
//! proof is `memory_per_file.rs`), and a per-file SRCU domain read by two
//! threads costs at least their two cache-padded reader slots. Alone in its
//! test binary, so no other test allocates while it counts.

use gmem::bench::memory_per_file;

#[test]
fn memory_per_file_counts_the_index_and_the_per_file_domains() {
    let memory = memory_per_file(256, 64 * 1024, 2).expect("measure");
    eprintln!("{memory:?}");
    let index = memory.index_bytes as f64;
    assert!(
        memory.bytes_per_file >= index && memory.bytes_per_file < 1024.0 + index,
        "{memory:?}"
    );
    // A reader slot is cache-padded: at least one 64-byte line each.
    assert!(memory.per_file_domain_bytes >= 2.0 * 64.0, "{memory:?}");
}
