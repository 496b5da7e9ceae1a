//! Measures each KVM step of a live update on this machine and the blackout
//! of in-process updates, and prints two tables.
//!
//! ```sh
//! cargo run --release -p vmm --example kvm_steps -- --sizes-mib 256,2048 --updates 5
//! ```
//!
//! Timings are medians (min..max) over the repetitions. Other work on the
//! machine shows up in them: run it on a quiet machine.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use gmem::hugetlb::HugePageReservation;
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::Kvm;
use vmm::guest::{GuestMonitor, GuestOptions, GuestReport, probed_gaps};
use vmm::machine::{Machine, MachineConfig};
use vmm::measure::{TraceCollector, recovery};
use vmm::memory::{GuestMemory, GuestRam, MemfdRam, PageSize};
use vmm::state::MachineState;
use vmm::update::{UpdateOptions, update_in_process};
use vmm::vcpu::ExitHandler;

#[derive(Debug, Parser)]
struct Options {
    /// Guest sizes (MiB) for the memslot step.
    #[arg(long, value_delimiter = ',', default_value = "256,1024,2048,8192")]
    memslot_sizes_mib: Vec<u64>,
    /// Guest sizes (MiB) for the update blackout.
    #[arg(long, value_delimiter = ',', default_value = "256,2048")]
    sizes_mib: Vec<u64>,
    /// vCPUs of the running guest.
    #[arg(long, default_value_t = 2)]
    vcpus: u32,
    /// Repetitions of each step.
    #[arg(long, default_value_t = 20)]
    repetitions: usize,
    /// Updates per configuration.
    #[arg(long, default_value_t = 5)]
    updates: usize,
    /// Also run the updates with guest memory in 2 MiB hugetlb pages
    /// (reserves them in the huge page pool and gives them back).
    #[arg(long)]
    huge: bool,
    /// Skip the KVM step table.
    #[arg(long)]
    skip_steps: bool,
    /// Update variants to run: rebuild, prebuilt, warm, populate, prefault.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "rebuild,prebuilt,warm,populate,prefault"
    )]
    modes: Vec<String>,
}

/// Median, min and max of a sample, formatted.
fn summary(mut samples: Vec<Duration>) -> String {
    samples.sort();
    if samples.is_empty() {
        return "-".into();
    }
    let median = samples[samples.len() / 2];
    format!(
        "{:>9.3} ms ({:.3}..{:.3})",
        median.as_secs_f64() * 1e3,
        samples[0].as_secs_f64() * 1e3,
        samples[samples.len() - 1].as_secs_f64() * 1e3
    )
}

fn time(
    repetitions: usize,
    mut step: impl FnMut() -> anyhow::Result<Duration>,
) -> anyhow::Result<String> {
    let mut samples = Vec::with_capacity(repetitions);
    for _ in 0..repetitions {
        samples.push(step()?);
    }
    Ok(summary(samples))
}

fn kvm_steps(options: &Options) -> anyhow::Result<()> {
    println!(
        "KVM steps (median over {} runs, min..max)",
        options.repetitions
    );
    println!("{:<44} time", "step");
    let row = |name: &str, value: String| println!("{name:<44} {value}");
    row(
        "open /dev/kvm + KVM_CREATE_VM",
        time(options.repetitions, || {
            let started = Instant::now();
            let kvm = Kvm::new()?;
            let _vm = kvm.create_vm()?;
            Ok(started.elapsed())
        })?,
    );
    row(
        "KVM_CREATE_IRQCHIP",
        time(options.repetitions, || {
            let vm = Kvm::new()?.create_vm()?;
            let started = Instant::now();
            vm.create_irq_chip()?;
            Ok(started.elapsed())
        })?,
    );
    for &size_mib in &options.memslot_sizes_mib {
        let ram = MemfdRam::create(size_mib << 20)?;
        row(
            &format!("memslot, {size_mib} MiB (unpopulated)"),
            time(options.repetitions.min(10), || {
                let vm = Kvm::new()?.create_vm()?;
                let region = kvm_userspace_memory_region {
                    slot: 0,
                    flags: 0,
                    guest_phys_addr: 0,
                    memory_size: ram.size(),
                    userspace_addr: ram.host_address().as_ptr() as u64,
                };
                let started = Instant::now();
                // SAFETY: the region is `ram`'s mapping, which outlives `vm`
                // (dropped at the end of this closure).
                unsafe { vm.set_user_memory_region(region)? };
                Ok(started.elapsed())
            })?,
        );
    }
    for vcpus in [1, options.vcpus] {
        let memory = Arc::new(GuestMemory::new(Arc::new(MemfdRam::create(64 << 20)?))?);
        row(
            &format!("{vcpus} vCPU(s): create + kvm_run map + CPUID"),
            time(options.repetitions, || {
                let machine = Machine::create(Arc::clone(&memory), MachineConfig { vcpus })?;
                Ok(machine.build_timings().vcpus)
            })?,
        );
    }
    let memory = Arc::new(GuestMemory::new(Arc::new(MemfdRam::create(64 << 20)?))?);
    let mut machine = Machine::create(
        Arc::clone(&memory),
        MachineConfig {
            vcpus: options.vcpus,
        },
    )?;
    machine.boot(GuestOptions::default())?;
    let monitor: Arc<dyn ExitHandler> =
        Arc::new(GuestMonitor::new(*machine.layout(), Arc::clone(&memory)));
    let running = machine.start(monitor)?;
    std::thread::sleep(Duration::from_millis(100));
    let (machine, _) = running
        .stop(Duration::from_secs(5))
        .map_err(|error| anyhow::anyhow!("{}", error.error()))?;
    let (state, _) = MachineState::capture(&machine)?;
    let mut capture = Vec::new();
    let mut restore = Vec::new();
    let mut record = Vec::new();
    for _ in 0..options.repetitions {
        let (_, timings) = MachineState::capture(&machine)?;
        capture.push(timings.vcpus + timings.vm);
        let started = Instant::now();
        let file = state.to_memfd()?;
        let _ = MachineState::from_fd(&file)?;
        record.push(started.elapsed());
        let fresh = Machine::create(
            Arc::clone(&memory),
            MachineConfig {
                vcpus: options.vcpus,
            },
        )?;
        let timings = state.restore(&fresh)?;
        restore.push(timings.vcpus + timings.vm);
    }
    row(
        &format!("capture state, {} vCPUs + VM", options.vcpus),
        summary(capture),
    );
    row("encode + sealed memfd + read + decode", summary(record));
    row(
        &format!("restore state, {} vCPUs + VM", options.vcpus),
        summary(restore),
    );
    Ok(())
}

/// Boots a guest and runs it until every vCPU has written its whole partition.
fn populated_guest(
    size_mib: u64,
    vcpus: u32,
    pages: PageSize,
) -> anyhow::Result<vmm::RunningMachine> {
    let memory = Arc::new(GuestMemory::new(Arc::new(MemfdRam::create_with_pages(
        size_mib << 20,
        pages,
    )?))?);
    let mut machine = Machine::create(Arc::clone(&memory), MachineConfig { vcpus })?;
    machine.boot(GuestOptions::default())?;
    let layout = *machine.layout();
    let monitor: Arc<dyn ExitHandler> = Arc::new(GuestMonitor::new(layout, Arc::clone(&memory)));
    let running = machine.start(monitor)?;
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let generations: Vec<u64> = (0..vcpus)
            .map(|vcpu| {
                GuestReport::read(memory.view(), &layout, vcpu).map(|report| report.generation)
            })
            .collect::<Result<_, _>>()?;
        if generations.iter().all(|generation| *generation >= 1) {
            return Ok(running);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "guest did not populate its memory"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

struct UpdateSample {
    blackout: Duration,
    guest_gap: Duration,
    recovery: Option<Duration>,
    stop: Duration,
    capture: Duration,
    build: Duration,
    restore: Duration,
}

fn one_update(
    running: vmm::RunningMachine,
    update: UpdateOptions,
) -> anyhow::Result<(vmm::RunningMachine, UpdateSample)> {
    let layout = *running.layout();
    let mut collector = TraceCollector::new(layout.vcpus());
    let make = |memory: Arc<GuestMemory>, layout| -> Arc<dyn ExitHandler> {
        Arc::new(GuestMonitor::new(layout, memory))
    };
    // Let the trace hold the pre-update window.
    std::thread::sleep(Duration::from_millis(150));
    collector.poll(running.memory().view(), &layout)?;
    let (running, report) = update_in_process(running, make, update)
        .map_err(|failure| anyhow::anyhow!("update failed: {}", failure.error))?;
    let memory = Arc::clone(running.memory());
    let deadline = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        collector.poll(memory.view(), &layout)?;
    }
    let gaps = probed_gaps(memory.view(), &layout)?;
    let khz = report.tsc_khz.max(1);
    let mut guest_gap = Duration::ZERO;
    let mut slowest: Option<Duration> = Some(Duration::ZERO);
    for (vcpu, gap) in gaps.iter().enumerate() {
        let gap = gap.context("guest gap probe missing")?;
        guest_gap = guest_gap.max(Duration::from_micros(gap * 1000 / u64::from(khz)));
        let stop_tsc = report.stop_tsc[vcpu];
        if std::env::var_os("KVM_STEPS_DEBUG").is_some() {
            eprintln!(
                "vcpu {vcpu}: last loop {} us before kick, gap {} us, blackout {:?}",
                (report.kick_host_tsc as i64 - stop_tsc as i64) * 1000 / i64::from(khz),
                gap * 1000 / u64::from(khz),
                report.host_blackout
            );
        }
        let result = recovery(
            &collector.entries()[vcpu],
            stop_tsc,
            stop_tsc + gap,
            khz,
            Duration::from_millis(100),
            Duration::from_millis(5),
        );
        slowest = match (slowest, result.recovery) {
            (Some(a), Some(b)) => Some(a.max(b)),
            _ => None,
        };
    }
    let phases = report.phases;
    if std::env::var_os("KVM_STEPS_DEBUG").is_some() {
        eprintln!("{phases:?} blackout {:?}", report.host_blackout);
    }
    Ok((
        running,
        UpdateSample {
            blackout: report.host_blackout,
            guest_gap,
            recovery: slowest,
            stop: phases.stop,
            capture: phases.capture + phases.record,
            build: phases.map
                + phases.build.total()
                + phases.populate
                + phases.prefault
                + phases.arm,
            restore: phases.restore + phases.start,
        },
    ))
}

fn updates(options: &Options) -> anyhow::Result<()> {
    println!();
    println!(
        "In-process live updates, {} vCPUs, guest memory fully written first (median of {}, min..max)",
        options.vcpus, options.updates
    );
    println!(
        "{:<10} {:<22} {:<32} {:<32} {:<32} {:<32} {:<32} {:<32} recovery to 90%",
        "size",
        "mode",
        "host blackout",
        "guest gap",
        "stop",
        "capture+record",
        "build + populate + prefault",
        "restore + start",
    );
    let page_sizes: &[PageSize] = if options.huge {
        &[PageSize::Small, PageSize::Huge2M]
    } else {
        &[PageSize::Small]
    };
    for &size_mib in &options.sizes_mib {
        for &pages in page_sizes {
            for (name, label, update) in [
                (
                    "rebuild",
                    "rebuild (exec-like)",
                    UpdateOptions {
                        prebuild: false,
                        populate: false,
                        warm_up: false,
                        ..Default::default()
                    },
                ),
                (
                    "prebuilt",
                    "prebuilt (transfer)",
                    UpdateOptions {
                        prebuild: true,
                        populate: false,
                        warm_up: false,
                        ..Default::default()
                    },
                ),
                (
                    "warm",
                    "prebuilt + warm-up",
                    UpdateOptions {
                        prebuild: true,
                        ..Default::default()
                    },
                ),
                (
                    "populate",
                    "prebuilt + populate",
                    UpdateOptions {
                        prebuild: true,
                        populate: true,
                        ..Default::default()
                    },
                ),
                (
                    "prefault",
                    "prebuilt + prefault",
                    UpdateOptions {
                        prebuild: true,
                        populate: true,
                        prefault: true,
                        ..Default::default()
                    },
                ),
            ] {
                if !options.modes.iter().any(|mode| mode == name) {
                    continue;
                }
                let mut running = populated_guest(size_mib, options.vcpus, pages)?;
                let mut samples = Vec::new();
                for _ in 0..options.updates {
                    let (next, sample) = one_update(running, update)?;
                    running = next;
                    samples.push(sample);
                }
                let _ = running.stop(Duration::from_secs(5));
                let pick = |field: fn(&UpdateSample) -> Duration| {
                    summary(samples.iter().map(field).collect())
                };
                let recoveries: Vec<Duration> = samples
                    .iter()
                    .filter_map(|sample| sample.recovery)
                    .collect();
                let unrecovered = samples.len() - recoveries.len();
                println!(
                    "{:<10} {:<22} {:<32} {:<32} {:<32} {:<32} {:<32} {:<32} {}{}",
                    format!(
                        "{size_mib} MiB{}",
                        if pages == PageSize::Huge2M { " 2M" } else { "" }
                    ),
                    label,
                    pick(|sample| sample.blackout),
                    pick(|sample| sample.guest_gap),
                    pick(|sample| sample.stop),
                    pick(|sample| sample.capture),
                    pick(|sample| sample.build),
                    pick(|sample| sample.restore),
                    summary(recoveries),
                    if unrecovered > 0 {
                        format!(" ({unrecovered} not within 1.5 s)")
                    } else {
                        String::new()
                    },
                );
            }
        }
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let options = Options::parse();
    if !options.skip_steps {
        kvm_steps(&options)?;
    }
    // The huge pages go back to the pool when `_pool` drops, also after a
    // failed update.
    let _pool = if options.huge {
        let largest = options.sizes_mib.iter().max().copied().unwrap_or(0) << 20;
        Some(HugePageReservation::for_bytes(largest).context("reserving huge pages")?)
    } else {
        None
    };
    updates(&options)
}
