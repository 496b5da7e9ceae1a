//! Criterion benchmark: one first touch through the fault service, a plain
//! first touch of a memfd mapping, fallocate of one page, and the floor of
//! userfaultfd (the toucher serving its own fault), as
//! `fault_service::bench` (feature `bench`) measures them. The table:
//! `cargo run --release -p fault-service --example fault_table`; the same
//! figures also appear in `gmemctl bench`.

use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};

use fault_service::bench::{self as measure, FirstTouch};

fn first_touch(criterion: &mut Criterion) {
    let mut group = criterion.benchmark_group("first_touch");
    group.measurement_time(Duration::from_secs(3));
    for kind in [
        FirstTouch::ThroughService,
        FirstTouch::ThroughServiceOnOneCpu,
        FirstTouch::Plain,
        FirstTouch::Fallocate,
        FirstTouch::InThreadFloor,
        FirstTouch::InThreadZeropage,
    ] {
        group.bench_function(format!("{kind:?}"), |bencher| {
            bencher.iter_custom(|iterations| {
                measure::first_touch(kind, iterations).expect("first touch")
            });
        });
    }
    group.finish();
}

criterion_group!(benches, first_touch);
criterion_main!(benches);
