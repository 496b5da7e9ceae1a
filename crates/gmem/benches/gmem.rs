//! Criterion benchmarks of the gmem hot paths; `gmem::bench` (feature
//! `bench`) says what each one times. The same measurements print as one
//! side-by-side table with `cargo run --release -p gmem --example
//! bench_table`, and in `gmemctl bench`.

use std::sync::Arc;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};

use gmem::GuestMemFile;
use gmem::bench as measure;
use measure::Allocation;

/// The N of "N threads": the machine's CPUs (2 here), at least 2.
fn many_threads() -> usize {
    std::thread::available_parallelism().map_or(2, |count| count.get().max(2))
}

/// A group timing `timed(file, threads, iterations)` on one populated
/// file, at 1 and N threads.
fn on_populated_file(
    criterion: &mut Criterion,
    name: &str,
    timed: impl Fn(&Arc<GuestMemFile>, usize, u64) -> Duration,
) {
    let file = measure::populated_file().expect("populated file");
    let mut group = criterion.benchmark_group(name);
    for threads in [1, many_threads()] {
        group.bench_with_input(
            BenchmarkId::from_parameter(threads),
            &threads,
            |bencher, &threads| {
                bencher.iter_custom(|iterations| timed(&file, threads, iterations));
            },
        );
    }
    group.finish();
}

fn get_folio_present(criterion: &mut Criterion) {
    on_populated_file(
        criterion,
        "get_folio_present",
        |file, threads, iterations| {
            measure::get_folio_present(file, threads, iterations).expect("present")
        },
    );
}

fn freeze_check(criterion: &mut Criterion) {
    on_populated_file(criterion, "freeze_check_only", measure::freeze_check_only);
}

fn allocate_missing(criterion: &mut Criterion) {
    let mut group = criterion.benchmark_group("allocate_missing_page");
    group.measurement_time(Duration::from_secs(3));
    for threads in [1, many_threads()] {
        for kind in [
            Allocation::GetFolio,
            Allocation::GetFolioWithoutFreezeCheck,
            Allocation::BareFallocate,
        ] {
            group.bench_with_input(
                BenchmarkId::new(format!("{kind:?}"), threads),
                &threads,
                |bencher, &threads| {
                    bencher.iter_custom(|iterations| {
                        measure::allocate_missing(kind, threads, iterations).expect("allocate")
                    });
                },
            );
        }
    }
    group.finish();
}

/// A latency measurement timed idle, then with N threads working meanwhile.
fn latency_group(criterion: &mut Criterion, name: &str, measurement: measure::LatencyMeasurement) {
    let mut group = criterion.benchmark_group(name);
    group.sample_size(20);
    for threads in [0, many_threads()] {
        group.bench_with_input(
            BenchmarkId::from_parameter(threads),
            &threads,
            |bencher, &threads| {
                bencher.iter_custom(|iterations| {
                    measurement(threads, iterations)
                        .expect(name)
                        .into_iter()
                        .sum::<Duration>()
                });
            },
        );
    }
    group.finish();
}

fn freeze_latency(criterion: &mut Criterion) {
    latency_group(
        criterion,
        "freeze_while_faulting",
        measure::freeze_while_faulting,
    );
}

fn punch_latency(criterion: &mut Criterion) {
    latency_group(
        criterion,
        "punch_mapped_page_while_allocating",
        measure::punch_while_faulting,
    );
}

criterion_group!(
    benches,
    get_folio_present,
    freeze_check,
    allocate_missing,
    freeze_latency,
    punch_latency
);
criterion_main!(benches);
