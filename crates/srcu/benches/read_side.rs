//! Criterion benchmarks of the SRCU hot paths on one thread: read
//! lock+unlock on both read sides next to the alternatives and the floor,
//! and an uncontended `synchronize`. The sections are `srcu::bench`'s
//! contenders, the same code the table example (`examples/compare.rs`, with
//! the multi-thread comparison and latency percentiles) and `gmemctl bench`
//! run.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use srcu::bench::{CONTENDERS, FENCE_DOMAIN, MEMBARRIER_DOMAIN};

fn read_side(c: &mut Criterion) {
    let mut group = c.benchmark_group("read_lock_unlock");
    for contender in CONTENDERS {
        group.bench_function(contender.id, |b| {
            b.iter(|| black_box((contender.section)()))
        });
    }
    group.finish();
}

fn grace_period(c: &mut Criterion) {
    let mut group = c.benchmark_group("synchronize_no_readers");
    group.bench_function("srcu_membarrier", |b| {
        b.iter(|| MEMBARRIER_DOMAIN.synchronize())
    });
    group.bench_function("srcu_fences", |b| b.iter(|| FENCE_DOMAIN.synchronize()));
    group.finish();
}

criterion_group!(benches, read_side, grace_period);
criterion_main!(benches);
