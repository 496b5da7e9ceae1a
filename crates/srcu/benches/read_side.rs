//! Criterion benchmarks of the SRCU hot paths on one thread: read
//! lock+unlock on both read sides next to the alternatives and the floor,
//! and an uncontended `synchronize`. The multi-thread comparison and the
//! latency percentiles are in `examples/compare.rs`, which prints one table.

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, Ordering};

use criterion::{Criterion, criterion_group, criterion_main};
use srcu::Srcu;

static MEMBARRIER_DOMAIN: Srcu = Srcu::new();
static FENCE_DOMAIN: Srcu = Srcu::with_fences();

fn read_side(c: &mut Criterion) {
    let mut group = c.benchmark_group("read_lock_unlock");
    group.bench_function("srcu_membarrier", |b| {
        b.iter(|| drop(black_box(MEMBARRIER_DOMAIN.read_lock())))
    });
    group.bench_function("srcu_fences", |b| {
        b.iter(|| drop(black_box(FENCE_DOMAIN.read_lock())))
    });
    let std_lock = std::sync::RwLock::new(0u64);
    group.bench_function("std_rwlock_read", |b| {
        b.iter(|| drop(black_box(std_lock.read())))
    });
    let parking_lock = parking_lot::RwLock::new(0u64);
    group.bench_function("parking_lot_rwlock_read", |b| {
        b.iter(|| drop(black_box(parking_lock.read())))
    });
    group.bench_function("crossbeam_epoch_pin", |b| {
        b.iter(|| drop(black_box(crossbeam_epoch::pin())))
    });
    let flag = AtomicBool::new(false);
    group.bench_function("atomic_bool_load_floor", |b| {
        b.iter(|| black_box(black_box(&flag).load(Ordering::Relaxed)))
    });
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
