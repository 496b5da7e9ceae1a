//! The measurement plan of `gmemctl bench` and its execution: which of the
//! crates' own measurements (`srcu::bench`, `gmem::bench`,
//! `fault_service::bench`, `liveupdate::bench`) run, how often, in which
//! order, and how their results become figures.
//!
//! Side by side: every comparison is measured in rounds, and each round
//! measures every contender once (alternating the order between rounds for
//! the allocation rows), so a drift in machine load moves a figure and its
//! baseline together. Medians are over rounds; p99 over individual events.
//!
//! Failure paths: a measurement that fails for a reason of this machine
//! (huge pages that cannot be reserved, memory too small for a size, no
//! userfaultfd privilege) becomes a skipped figure with the reason; any
//! other failure ends the run with its error.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use gmem::Backend;
use gmem::bench::Allocation;
use gmem::hugetlb::HugePageReservation;
use liveupdate::bench::{HandoverBench, Launcher, Transport};

use super::progress::Progress;
use super::report::{HandoverPoint, Measured, ReadRatePoint, Series, Settings, Skipped, Unit};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
/// Memory left to the machine's other users when sizing the handover runs.
const MEMORY_MARGIN: u64 = 2 * GIB;

/// How much of everything to measure.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Whether this is the quick run.
    pub quick: bool,
    /// N of the "N threads" figures.
    pub threads: usize,
    /// Thread counts of the read-side series.
    pub thread_counts: Vec<usize>,
    /// Rounds of the side-by-side comparisons.
    pub rounds: usize,
    /// Length of one read-side run.
    pub read_duration: Duration,
    /// Grace periods timed per `synchronize` figure.
    pub synchronize_samples: usize,
    /// Lookups per present-page and freeze-check run.
    pub lookups: u64,
    /// Allocations per missing-page run.
    pub allocations: u64,
    /// Freezes timed per freeze-latency figure.
    pub freezes: u64,
    /// First touches per first-touch run.
    pub touches: u64,
    /// Files held at once by the memory measurement.
    pub memory_files: usize,
    /// Populated guest sizes of the handover figures.
    pub guest_sizes: Vec<u64>,
    /// Runs per handover configuration and copy baseline.
    pub handover_runs: usize,
    /// Where the copy baseline writes its snapshot.
    pub copy_directory: PathBuf,
}

impl Plan {
    /// The full run (`quick == false`) or the quick one, with the default
    /// guest sizes unless `guest_sizes` is given.
    pub fn new(quick: bool, guest_sizes: Option<Vec<u64>>, copy_directory: PathBuf) -> Plan {
        let cores = std::thread::available_parallelism().map_or(2, usize::from);
        let threads = cores.max(2);
        // Powers of two up to twice the cores (oversubscribed readers show
        // which schemes degrade), and the cores themselves.
        let mut thread_counts: Vec<usize> = std::iter::successors(Some(1usize), |count| {
            Some(count * 2).filter(|next| *next <= 2 * threads)
        })
        .chain([threads])
        .collect();
        thread_counts.sort_unstable();
        thread_counts.dedup();
        let default_sizes = if quick {
            vec![128 * MIB, 256 * MIB]
        } else {
            vec![GIB, 2 * GIB, 4 * GIB, 8 * GIB]
        };
        Plan {
            quick,
            threads,
            thread_counts,
            rounds: if quick { 3 } else { 11 },
            read_duration: Duration::from_millis(if quick { 30 } else { 200 }),
            synchronize_samples: if quick { 200 } else { 2000 },
            lookups: if quick { 200_000 } else { 2_000_000 },
            allocations: if quick { 4096 } else { gmem::bench::PAGES },
            freezes: if quick { 200 } else { 2000 },
            touches: if quick { 4096 } else { 16_384 },
            memory_files: 512,
            guest_sizes: guest_sizes.unwrap_or(default_sizes),
            handover_runs: if quick { 3 } else { 5 },
            copy_directory,
        }
    }

    /// The settings as the report records them.
    pub fn settings(&self) -> Settings {
        Settings {
            mode: if self.quick { "quick" } else { "full" }.to_owned(),
            threads: self.threads,
            thread_counts: self.thread_counts.clone(),
            rounds: self.rounds,
            guest_sizes: self.guest_sizes.clone(),
            handover_runs: self.handover_runs,
            copy_directory: self.copy_directory.display().to_string(),
            random_inputs: false,
        }
    }

    /// Faulting threads of the freeze-latency figures: none, one (a CPU
    /// left for the freezer), and N (the freezer an extra thread).
    pub fn freeze_thread_counts(&self) -> Vec<usize> {
        let mut counts = vec![0, 1, self.threads];
        counts.dedup();
        counts
    }

    /// Progress steps of the whole run.
    pub fn steps(&self) -> usize {
        let read = self.rounds * srcu::bench::CONTENDERS.len() * self.thread_counts.len();
        let synchronize = 4;
        let gmem = self.rounds * 2 * 5 + self.freeze_thread_counts().len() + 2;
        let first_touch = self.rounds * 6;
        let memory = 2;
        let handover = 2 * self.guest_sizes.len() * self.handover_runs * (1 + Transport::ALL.len());
        read + synchronize + gmem + first_touch + memory + handover
    }
}

/// Where figures, skips and series accumulate during the run.
pub struct Collector {
    /// Measured figures, in table order.
    pub measured: Vec<Measured>,
    /// Skipped figures.
    pub skipped: Vec<Skipped>,
    /// The plots' data.
    pub series: Series,
    /// The display.
    pub progress: Progress,
}

impl Collector {
    fn figure(
        &mut self,
        id: String,
        name: String,
        unit: Unit,
        samples: Vec<f64>,
        baseline: Option<String>,
    ) {
        self.push(id, name, unit, samples, false, baseline);
    }

    fn latency(
        &mut self,
        id: String,
        name: String,
        unit: Unit,
        samples: Vec<f64>,
        baseline: Option<String>,
    ) {
        self.push(id, name, unit, samples, true, baseline);
    }

    fn push(
        &mut self,
        id: String,
        name: String,
        unit: Unit,
        samples: Vec<f64>,
        latency: bool,
        baseline: Option<String>,
    ) {
        self.measured.push(Measured {
            id,
            name,
            unit,
            samples,
            latency,
            baseline,
        });
    }

    fn skip(&mut self, id: String, reason: String) {
        self.progress.note(&format!("SKIPPED {id}: {reason}"));
        self.skipped.push(Skipped { id, reason });
    }
}

fn per_operation_ns(elapsed: Duration, operations: u64) -> f64 {
    elapsed.as_nanos() as f64 / operations.max(1) as f64
}

fn microseconds(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e6
}

fn milliseconds(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}

/// `128MiB`, `1GiB`.
pub fn size_label(bytes: u64) -> String {
    if bytes >= GIB && bytes.is_multiple_of(GIB) {
        format!("{}GiB", bytes / GIB)
    } else if bytes >= MIB && bytes.is_multiple_of(MIB) {
        format!("{}MiB", bytes / MIB)
    } else if bytes.is_multiple_of(1024) {
        format!("{}KiB", bytes / 1024)
    } else {
        format!("{bytes}B")
    }
}

fn thread_label(threads: usize) -> String {
    if threads == 1 {
        "1 thread".to_owned()
    } else {
        format!("{threads} threads")
    }
}

fn floor_id(threads: usize) -> String {
    format!("srcu.read.{}.{threads}t", srcu::bench::FLOOR.id)
}

/// SRCU read side against the alternatives at every thread count (figures
/// at 1 and N threads, the series at all), then grace-period latencies.
pub fn srcu_figures(plan: &Plan, collector: &mut Collector) {
    let contenders = srcu::bench::CONTENDERS;
    // samples[contender][thread count] = (ns per section, Mops/s) per round
    let mut samples = vec![vec![Vec::new(); plan.thread_counts.len()]; contenders.len()];
    for round in 0..plan.rounds {
        for (number, contender) in contenders.iter().enumerate() {
            for (column, &threads) in plan.thread_counts.iter().enumerate() {
                collector.progress.step(&format!(
                    "srcu read side: {}, {}, round {}/{}",
                    contender.name,
                    thread_label(threads),
                    round + 1,
                    plan.rounds
                ));
                let rate = srcu::bench::read_rate(contender.section, threads, plan.read_duration);
                samples[number][column].push((
                    rate.nanoseconds_per_section,
                    rate.aggregate_million_per_second,
                ));
            }
        }
    }
    for (number, contender) in contenders.iter().enumerate() {
        for (column, &threads) in plan.thread_counts.iter().enumerate() {
            let rounds = &samples[number][column];
            let rates: Vec<f64> = rounds.iter().map(|(_, rate)| *rate).collect();
            collector.series.read_rates.push(ReadRatePoint {
                contender: contender.name.to_owned(),
                threads,
                million_per_second: super::report::median(&rates),
            });
            if threads != 1 && threads != plan.threads {
                continue;
            }
            let id = format!("srcu.read.{}.{threads}t", contender.id);
            let baseline = (contender.id != srcu::bench::FLOOR.id).then(|| floor_id(threads));
            collector.figure(
                id,
                format!(
                    "read lock+unlock: {}, {}, per thread",
                    contender.name,
                    thread_label(threads)
                ),
                Unit::Ns,
                rounds.iter().map(|(nanoseconds, _)| *nanoseconds).collect(),
                baseline,
            );
        }
    }
    for (label, domain) in [
        ("membarrier", &srcu::bench::MEMBARRIER_DOMAIN),
        ("fences", &srcu::bench::FENCE_DOMAIN),
    ] {
        let idle_id = format!("srcu.sync.{label}.0r");
        for readers in [0, plan.threads] {
            collector.progress.step(&format!(
                "srcu synchronize ({label}) with {readers} readers, {} grace periods",
                plan.synchronize_samples
            ));
            let latencies =
                srcu::bench::synchronize_latencies(domain, readers, plan.synchronize_samples);
            let id = format!("srcu.sync.{label}.{readers}r");
            let baseline = (readers != 0).then(|| idle_id.clone());
            collector.latency(
                id,
                format!("synchronize latency: srcu ({label}), {readers} threads reading"),
                Unit::Us,
                latencies.into_iter().map(microseconds).collect(),
                baseline,
            );
        }
    }
}

/// gmem's fault path: present lookups, missing-page allocation with and
/// without the freeze check against a bare fallocate, the freeze check
/// alone, and `freeze(true)` latency idle and while N threads fault.
pub fn gmem_figures(plan: &Plan, collector: &mut Collector) -> anyhow::Result<()> {
    let file = gmem::bench::populated_file().context("a populated guest memory file")?;
    for threads in [1, plan.threads] {
        let (mut present, mut check) = (Vec::new(), Vec::new());
        let mut allocations: [Vec<f64>; 3] = Default::default();
        for round in 0..plan.rounds {
            let of = format!(
                "{}, round {}/{}",
                thread_label(threads),
                round + 1,
                plan.rounds
            );
            collector
                .progress
                .step(&format!("gmem get_folio, present page: {of}"));
            let elapsed = gmem::bench::get_folio_present(&file, threads, plan.lookups)?;
            present.push(per_operation_ns(elapsed, plan.lookups));
            collector
                .progress
                .step(&format!("gmem freeze check alone: {of}"));
            let elapsed = gmem::bench::freeze_check_only(&file, threads, plan.lookups);
            check.push(per_operation_ns(elapsed, plan.lookups));
            let mut kinds = [
                (0, Allocation::GetFolio),
                (1, Allocation::GetFolioWithoutFreezeCheck),
                (2, Allocation::BareFallocate),
            ];
            // Alternate the order so a drift in load favours no row.
            if round % 2 == 1 {
                kinds.reverse();
            }
            for (slot, kind) in kinds {
                collector
                    .progress
                    .step(&format!("gmem missing page, {kind:?}: {of}"));
                let elapsed = gmem::bench::allocate_missing(kind, threads, plan.allocations)?;
                allocations[slot].push(per_operation_ns(elapsed, plan.allocations));
            }
        }
        let suffix = format!("{threads}t");
        let label = thread_label(threads);
        collector.figure(
            format!("gmem.present.{suffix}"),
            format!("get_folio of a present page, {label}"),
            Unit::Ns,
            present,
            Some(floor_id(threads)),
        );
        let [checked, unchecked, fallocate] = allocations;
        collector.figure(
            format!("gmem.fault.checked.{suffix}"),
            format!("fault path (get_folio of a missing page), with the freeze check, {label}"),
            Unit::Ns,
            checked,
            Some(format!("gmem.fault.unchecked.{suffix}")),
        );
        collector.figure(
            format!("gmem.fault.unchecked.{suffix}"),
            format!("fault path built without the freeze check, {label}"),
            Unit::Ns,
            unchecked,
            Some(format!("gmem.fault.fallocate.{suffix}")),
        );
        collector.figure(
            format!("gmem.fault.fallocate.{suffix}"),
            format!("bare fallocate(KEEP_SIZE) of one page of a memfd, {label}"),
            Unit::Ns,
            fallocate,
            None,
        );
        collector.figure(
            format!("gmem.freeze_check.{suffix}"),
            format!("the freeze check alone (read section + flag load), {label}"),
            Unit::Ns,
            check,
            Some(format!("gmem.fault.unchecked.{suffix}")),
        );
    }
    for faulting in plan.freeze_thread_counts() {
        let step = format!(
            "gmem freeze(true) latency with {} faulting, {} freezes",
            thread_label(faulting),
            plan.freezes
        );
        let latencies = timed_events(
            collector,
            &step,
            gmem::bench::freeze_while_faulting,
            faulting,
            plan.freezes,
        )?;
        if faulting == 0 {
            collector.series.freeze_idle_us = latencies.clone();
            collector.latency(
                "gmem.freeze.idle".to_owned(),
                "freeze(true) latency, idle file".to_owned(),
                Unit::Us,
                latencies,
                None,
            );
        } else {
            if faulting == plan.threads {
                collector.series.freeze_faulting_us = latencies.clone();
            }
            collector.latency(
                format!("gmem.freeze.faulting_{faulting}t"),
                format!(
                    "freeze(true) latency with {} faulting",
                    thread_label(faulting)
                ),
                Unit::Us,
                latencies,
                Some("gmem.freeze.idle".to_owned()),
            );
        }
    }
    for allocating in [0, plan.threads] {
        let step = format!(
            "gmem punch hole of a mapped page with {} allocating, {} punches",
            thread_label(allocating),
            plan.freezes
        );
        let latencies = timed_events(
            collector,
            &step,
            gmem::bench::punch_while_faulting,
            allocating,
            plan.freezes,
        )?;
        let (id, name, baseline) = if allocating == 0 {
            (
                "gmem.punch.idle".to_owned(),
                "punch hole of one mapped page, idle file".to_owned(),
                None,
            )
        } else {
            (
                format!("gmem.punch.allocating_{allocating}t"),
                format!(
                    "punch hole of one mapped page with {} allocating in the file",
                    thread_label(allocating)
                ),
                Some("gmem.punch.idle".to_owned()),
            )
        };
        collector.latency(id, name, Unit::Us, latencies, baseline);
    }
    Ok(())
}

/// One progress step: `events` events of `measurement` timed with `busy`
/// threads working meanwhile; their latencies in microseconds.
fn timed_events(
    collector: &mut Collector,
    step: &str,
    measurement: gmem::bench::LatencyMeasurement,
    busy: usize,
    events: u64,
) -> anyhow::Result<Vec<f64>> {
    collector.progress.step(step);
    Ok(measurement(busy, events)?
        .into_iter()
        .map(microseconds)
        .collect())
}

/// The fault service's first touch (handler placed by the scheduler, and
/// pinned with the toucher to one CPU) against a plain first touch and
/// against fallocate of the page.
pub fn first_touch_figures(plan: &Plan, collector: &mut Collector) -> anyhow::Result<()> {
    use fault_service::bench::{BenchError, FirstTouch};
    let kinds = [
        (FirstTouch::ThroughService, "service"),
        (FirstTouch::ThroughServiceOnOneCpu, "service_one_cpu"),
        (FirstTouch::Plain, "plain"),
        (FirstTouch::Fallocate, "fallocate"),
        (FirstTouch::InThreadFloor, "in_thread_floor"),
        (FirstTouch::InThreadZeropage, "in_thread_zeropage"),
    ];
    let mut samples: [Vec<f64>; 6] = Default::default();
    let mut in_thread_skipped = None;
    for round in 0..plan.rounds {
        for (slot, (kind, _)) in kinds.iter().enumerate() {
            collector.progress.step(&format!(
                "first touch, {kind:?}: {} pages, round {}/{}",
                plan.touches,
                round + 1,
                plan.rounds
            ));
            match fault_service::bench::first_touch(*kind, plan.touches) {
                Ok(elapsed) => {
                    samples[slot].push(per_operation_ns(elapsed, plan.touches) / 1e3);
                }
                Err(BenchError::Service(error)) => {
                    // The comparison needs the service's rows: skip all.
                    collector.skip(
                        "fault.first_touch.*".to_owned(),
                        format!("the fault service cannot start here: {error}"),
                    );
                    return Ok(());
                }
                Err(error @ BenchError::InThread { .. }) => {
                    in_thread_skipped = Some(error.to_string());
                }
                Err(error) => return Err(error).context("first touch"),
            }
        }
    }
    let [
        service,
        service_one_cpu,
        plain,
        fallocate,
        in_thread_floor,
        in_thread_zeropage,
    ] = samples;
    collector.figure(
        "fault.first_touch.service".to_owned(),
        "first touch of a 4 KiB page through the fault service (userfaultfd -> get_folio -> wake)"
            .to_owned(),
        Unit::Us,
        service,
        Some("fault.first_touch.plain".to_owned()),
    );
    collector.figure(
        "fault.first_touch.service_one_cpu".to_owned(),
        "the same, toucher and handler thread pinned to one CPU (no cross-CPU wake-up)".to_owned(),
        Unit::Us,
        service_one_cpu,
        Some("fault.first_touch.plain".to_owned()),
    );
    collector.figure(
        "fault.first_touch.plain".to_owned(),
        "plain first touch of a 4 KiB page of a memfd mapping".to_owned(),
        Unit::Us,
        plain,
        None,
    );
    collector.figure(
        "fault.first_touch.fallocate".to_owned(),
        "fallocate(KEEP_SIZE) of a 4 KiB page, no touch".to_owned(),
        Unit::Us,
        fallocate,
        Some("fault.first_touch.plain".to_owned()),
    );
    match in_thread_skipped {
        Some(reason) => {
            for id in ["in_thread_floor", "in_thread_zeropage"] {
                collector.skip(format!("fault.first_touch.{id}"), reason.clone());
            }
        }
        None => {
            collector.figure(
                "fault.first_touch.in_thread_floor".to_owned(),
                "floor of userfaultfd: the toucher serves its own fault (SIGBUS mode, get_folio + MADV_POPULATE_WRITE in its handler), not a service mode"
                    .to_owned(),
                Unit::Us,
                in_thread_floor,
                Some("fault.first_touch.plain".to_owned()),
            );
            collector.figure(
                "fault.first_touch.in_thread_zeropage".to_owned(),
                "the kernel's lower bound: the same with one UFFDIO_ZEROPAGE instead of get_folio (bypasses gmem, never a service)"
                    .to_owned(),
                Unit::Us,
                in_thread_zeropage,
                Some("fault.first_touch.plain".to_owned()),
            );
        }
    }
    Ok(())
}

/// Heap bytes per guest memory file, small and large, next to the same file
/// with its own SRCU domain read by N threads (the per-inode design).
pub fn memory_figures(plan: &Plan, collector: &mut Collector) -> anyhow::Result<()> {
    for file_size in [64 * 1024, GIB] {
        let label = size_label(file_size);
        collector.progress.step(&format!(
            "memory per file: {} files of {label}, {} rounds",
            plan.memory_files, plan.rounds
        ));
        let (mut ours, mut per_inode) = (Vec::new(), Vec::new());
        for _ in 0..plan.rounds {
            let memory = gmem::bench::memory_per_file(plan.memory_files, file_size, plan.threads)
                .context("memory per file")?;
            ours.push(memory.bytes_per_file);
            per_inode.push(memory.bytes_per_file + memory.per_file_domain_bytes);
        }
        let id = format!("memory.file_{label}");
        let baseline = format!("memory.file_{label}_with_own_domain");
        collector.figure(
            id,
            format!("heap per guest memory file of {label} (page-state index included)"),
            Unit::Bytes,
            ours,
            Some(baseline.clone()),
        );
        collector.figure(
            baseline,
            format!(
                "the same file with its own SRCU domain read by {} threads (per-inode design)",
                plan.threads
            ),
            Unit::Bytes,
            per_inode,
            None,
        );
    }
    Ok(())
}

/// Samples of one (backend, size) configuration.
#[derive(Default)]
struct HandoverSamples {
    copy: Vec<f64>,
    blackout: [Vec<f64>; 3],
    total: [Vec<f64>; 3],
}

fn backend_label(backend: Backend) -> &'static str {
    match backend {
        Backend::Hugetlb => "hugetlb",
        _ => "memfd",
    }
}

/// Live-update blackout and total time per backend, size and transport,
/// next to the copy-out/copy-in baseline; sizes the machine cannot hold
/// (memory, huge pages) are skipped with the reason.
pub fn handover_figures(
    plan: &Plan,
    launcher: Launcher,
    collector: &mut Collector,
) -> anyhow::Result<()> {
    let bench = HandoverBench::start(launcher).context("starting the handover bench")?;
    std::fs::create_dir_all(&plan.copy_directory)
        .with_context(|| format!("creating {}", plan.copy_directory.display()))?;
    for backend in [Backend::Memfd, Backend::Hugetlb] {
        for &size in &plan.guest_sizes {
            let prefix = format!("lu.{}.{}", backend_label(backend), size_label(size));
            let steps = plan.handover_runs * (1 + Transport::ALL.len());
            let prepared = match prepare(plan, backend, size) {
                Ok(prepared) => prepared,
                Err(reason) => {
                    collector.skip(format!("{prefix}.*"), reason);
                    (0..steps).for_each(|_| collector.progress.step(&format!("{prefix}: skipped")));
                    continue;
                }
            };
            let samples = handover_configuration(
                plan,
                &bench,
                backend,
                size,
                &prepared.copy_fits,
                collector,
            )?;
            record_handover(plan, backend, size, samples, prepared.copy_fits, collector);
        }
    }
    Ok(())
}

/// Whether a size can run here: reserves the huge pages of a hugetlb size,
/// and decides whether the copy baseline fits; `Err` with the reason when
/// the size cannot run at all.
fn prepare(plan: &Plan, backend: Backend, size: u64) -> Result<Prepared, String> {
    let available = |what: &str| {
        liveupdate::bench::available_memory()
            .map_err(|error| format!("cannot tell the memory available for {what}: {error}"))
    };
    let label = size_label(size);
    let needed = size + MEMORY_MARGIN;
    let free = available("the guest")?;
    if free < needed {
        return Err(format!(
            "{label} of guest memory needs {} available (a {} margin left to others), the machine has {}",
            size_label(needed),
            size_label(MEMORY_MARGIN),
            size_label(free / MIB * MIB)
        ));
    }
    let reservation = if backend == Backend::Hugetlb {
        Some(HugePageReservation::for_bytes(size).map_err(|error| error.to_string())?)
    } else {
        None
    };
    // The copy baseline holds the guest (in the huge page pool already for
    // hugetlb) and its snapshot at once.
    let free = available("the copy")?;
    let copy_needs = match backend {
        Backend::Hugetlb => size + MEMORY_MARGIN,
        _ => 2 * size + MEMORY_MARGIN,
    };
    let space =
        liveupdate::bench::free_space(&plan.copy_directory).map_err(|error| error.to_string())?;
    let copy_fits = if free < copy_needs {
        Err(format!(
            "the copy baseline of {label} needs {} available (the memory twice and a {} margin), the machine has {}",
            size_label(copy_needs),
            size_label(MEMORY_MARGIN),
            size_label(free / MIB * MIB)
        ))
    } else if space < size {
        Err(format!(
            "the copy baseline of {label} needs {label} free in {}, which has {}",
            plan.copy_directory.display(),
            size_label(space / MIB * MIB)
        ))
    } else {
        Ok(())
    };
    Ok(Prepared {
        _reservation: reservation,
        copy_fits,
    })
}

/// A size ready to run: its huge pages (given back on drop) and whether
/// the copy baseline fits.
struct Prepared {
    _reservation: Option<HugePageReservation>,
    copy_fits: Result<(), String>,
}

fn handover_configuration(
    plan: &Plan,
    bench: &HandoverBench,
    backend: Backend,
    size: u64,
    copy_fits: &Result<(), String>,
    collector: &mut Collector,
) -> anyhow::Result<HandoverSamples> {
    let what = format!("{} {}", backend_label(backend), size_label(size));
    let mut samples = HandoverSamples::default();
    for run in 0..plan.handover_runs {
        let of = format!("run {}/{}", run + 1, plan.handover_runs);
        collector
            .progress
            .step(&format!("handover {what}: copy out + in baseline, {of}"));
        if copy_fits.is_ok() {
            let elapsed = liveupdate::bench::copy_baseline(backend, size, &plan.copy_directory)
                .with_context(|| format!("copy baseline of {what}"))?;
            samples.copy.push(milliseconds(elapsed));
        }
        for (slot, transport) in Transport::ALL.into_iter().enumerate() {
            collector
                .progress
                .step(&format!("handover {what}: {}, {of}", transport.name()));
            let times = bench
                .run(transport, backend, size)
                .with_context(|| format!("{} handover of {what}", transport.name()))?;
            samples.blackout[slot].push(milliseconds(times.blackout));
            samples.total[slot].push(milliseconds(times.total()));
        }
    }
    Ok(samples)
}

fn record_handover(
    plan: &Plan,
    backend: Backend,
    size: u64,
    samples: HandoverSamples,
    copy_fits: Result<(), String>,
    collector: &mut Collector,
) {
    let backend_name = backend_label(backend);
    let label = size_label(size);
    let prefix = format!("lu.{backend_name}.{label}");
    let copy_id = format!("{prefix}.copy");
    let point = |transport: &str, values: &[f64]| HandoverPoint {
        backend: backend_name.to_owned(),
        transport: transport.to_owned(),
        size,
        blackout_ms: super::report::median(values),
    };
    match copy_fits {
        Ok(()) => {
            collector.series.handover.push(point("copy", &samples.copy));
            collector.latency(
                copy_id.clone(),
                format!(
                    "{backend_name} {label}: copy out + in snapshot baseline ({})",
                    plan.copy_directory.display()
                ),
                Unit::Ms,
                samples.copy,
                None,
            );
        }
        Err(reason) => collector.skip(copy_id.clone(), reason),
    }
    let HandoverSamples {
        blackout, total, ..
    } = samples;
    for ((transport, blackout), total) in Transport::ALL.into_iter().zip(blackout).zip(total) {
        let name = transport.name();
        collector.series.handover.push(point(name, &blackout));
        collector.latency(
            format!("{prefix}.{name}.blackout"),
            format!("{backend_name} {label}: live-update blackout, {name}"),
            Unit::Ms,
            blackout,
            Some(copy_id.clone()),
        );
        collector.latency(
            format!("{prefix}.{name}.total"),
            format!("{backend_name} {label}: live-update total (preserve to retrieved), {name}"),
            Unit::Ms,
            total,
            Some(copy_id.clone()),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_labelled_in_the_largest_whole_unit() {
        assert_eq!(size_label(GIB), "1GiB");
        assert_eq!(size_label(128 * MIB), "128MiB");
        assert_eq!(size_label(64 * 1024), "64KiB");
        assert_eq!(size_label(1536 * MIB), "1536MiB");
    }

    #[test]
    fn thread_counts_include_one_the_cores_and_oversubscription() {
        let plan = Plan::new(true, None, PathBuf::from("/dev/shm"));
        assert_eq!(plan.thread_counts.first(), Some(&1));
        assert!(plan.thread_counts.contains(&plan.threads));
        assert_eq!(plan.thread_counts.last(), Some(&(2 * plan.threads)));
    }
}
