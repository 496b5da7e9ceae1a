//! Prints what describing and restoring a file's page-state index costs,
//! folio by folio against run by run, side by side in one run:
//! `cargo run --release -p gmem --example index_runs`.
//!
//! These are the two walks a live update does inside its blackout (the
//! preservation layer describes the frozen file; the successor rebuilds the
//! object). The files are sparse memfds whose index says every folio is
//! present (a restore records what a description says without touching the
//! memory), so the sizes cost no RAM. Each cell is the median of 7 rounds
//! with the (min–max); do not trust it while other work loads the machine.

use std::sync::Arc;
use std::time::{Duration, Instant};

use gmem::{Backend, FolioOrder, FolioRun, GmemFlags, GuestMemFile, PageIndex};

const ROUNDS: usize = 7;
const GIB: u64 = 1 << 30;

/// "median (min–max)" in milliseconds.
fn spread(mut samples: Vec<Duration>) -> String {
    samples.sort();
    let ms = |duration: Duration| duration.as_secs_f64() * 1e3;
    format!(
        "{:.3} ({:.3}–{:.3})",
        ms(samples[samples.len() / 2]),
        ms(samples[0]),
        ms(samples[samples.len() - 1])
    )
}

fn timed<T>(work: impl FnOnce() -> T) -> (Duration, T) {
    let start = Instant::now();
    let result = work();
    (start.elapsed(), result)
}

/// A fully populated (by its index) memfd file of `size` bytes, frozen.
fn populated(size: u64) -> Arc<GuestMemFile> {
    let file = GuestMemFile::create(size, GmemFlags::HOST_ACCESSIBLE, Backend::Memfd)
        .expect("create the file");
    file.freeze(true);
    let descriptor = file.descriptor();
    let fd = file.as_fd().try_clone_to_owned().expect("dup");
    drop(file);
    let everything = FolioRun {
        start: PageIndex(0),
        count: size / 4096,
        order: FolioOrder::BASE,
    };
    GuestMemFile::restore_runs(fd, &descriptor, [everything]).expect("restore")
}

fn main() {
    println!(
        "| 4 KiB folios, all present | walk by folio ms | walk by run ms | restore by folio ms | restore by run ms |"
    );
    println!("| --- | --- | --- | --- | --- |");
    for size in [2 * GIB, 8 * GIB] {
        let mut samples: [Vec<Duration>; 4] = Default::default();
        for _ in 0..ROUNDS {
            let file = populated(size);
            let (by_folio, folios) = timed(|| file.populated().count() as u64);
            let (by_run, runs) = timed(|| file.populated_runs().map(|run| run.count).sum::<u64>());
            assert_eq!(folios, runs);
            samples[0].push(by_folio);
            samples[1].push(by_run);
            let descriptor = file.descriptor();
            let fd = file.as_fd().try_clone_to_owned().expect("dup");
            let runs: Vec<FolioRun> = file.populated_runs().collect();
            let folios: Vec<(PageIndex, FolioOrder)> = file.populated().collect();
            drop(file);
            let (by_folio, restored) =
                timed(|| GuestMemFile::restore(fd.try_clone().expect("dup"), &descriptor, folios));
            drop(restored.expect("restore by folio"));
            let (by_run, restored) = timed(|| GuestMemFile::restore_runs(fd, &descriptor, runs));
            assert_eq!(
                restored.expect("restore by run").populated_count(),
                size / 4096
            );
            samples[2].push(by_folio);
            samples[3].push(by_run);
        }
        let [walk_folio, walk_run, restore_folio, restore_run] = samples;
        println!(
            "| {} GiB ({} folios) | {} | {} | {} | {} |",
            size / GIB,
            size / 4096,
            spread(walk_folio),
            spread(walk_run),
            spread(restore_folio),
            spread(restore_run)
        );
    }
}
