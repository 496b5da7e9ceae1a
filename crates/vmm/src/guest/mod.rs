//! The guest program and the host's side of its contract.
//!
//! The program (`program.S`, assembled into `program.bin`; the test
//! `guest_program_matches_source` reassembles and compares) walks its share
//! of guest memory writing self-describing pages, verifies pages it wrote
//! earlier, keeps its counters in a per-vCPU control block and reports
//! through port I/O; `program.S`'s header comment is the full contract.
//!
//! The host side here: [`GuestSetup`] loads the program and fills the
//! control blocks; [`GuestReport`] reads a control block back;
//! [`GuestMonitor`] is the [`ExitHandler`] that turns the program's port and
//! MMIO exits into events; [`check_pages`] verifies the pages from the host
//! while the vCPUs are stopped; the (TSC, iterations) trace rings a
//! recovery measurement is computed from are read by
//! [`crate::measure::TraceCollector`].

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use vm_memory::GuestMemoryMmap;

use crate::error::Result;
use crate::layout::{
    CODE_ADDRESS, GuestLayout, MAX_CODE_BYTES, PAGE_SIZE, TRACE_CAPACITY, read_bytes, read_object,
    write_bytes, write_object,
};
use crate::vcpu::{ExitAction, ExitHandler};

/// The assembled guest program (`program.S`).
pub const PROGRAM: &[u8] = include_bytes!("program.bin");
/// The program's source, kept next to the bytes.
pub const PROGRAM_SOURCE: &str = include_str!("program.S");

/// Control block offsets, as `program.S` defines them (`.set CB_*`).
pub mod offsets {
    /// vCPU index (host-written).
    pub const CPU_INDEX: u64 = 0x08;
    /// First data page (host-written).
    pub const DATA_BASE: u64 = 0x10;
    /// Data pages in the partition (host-written).
    pub const PAGE_COUNT: u64 = 0x18;
    /// Progress is reported when `iterations & mask == 0` (host-written).
    pub const REPORT_MASK: u64 = 0x20;
    /// A trace entry is appended when `iterations & mask == 0` (host-written).
    pub const TRACE_MASK: u64 = 0x28;
    /// The trace ring (host-written).
    pub const TRACE_BASE: u64 = 0x30;
    /// Trace capacity minus one (host-written).
    pub const TRACE_CAPACITY_MASK: u64 = 0x38;
    /// A gap above this many TSC ticks is reported at once (host-written).
    pub const GAP_THRESHOLD: u64 = 0x40;
    /// The MMIO doorbell address (host-written).
    pub const DOORBELL: u64 = 0x48;
    /// Nonzero: use AVX (ymm) for the register check (host-written).
    pub const USE_AVX: u64 = 0x50;
    /// Nonzero: run the final check and stop (host-written, any time).
    pub const COMMAND: u64 = 0x58;
    /// Four doubles of 1.0 the vector counter adds (host-written).
    pub const ONES: u64 = 0x60;
    /// Nonzero: report through port I/O, else through the MMIO doorbell
    /// (host-written).
    pub const REPORT_VIA_PORT: u64 = 0x80;
    /// Nonzero: store the next gap in PROBED_GAP, then clear this
    /// (host-written while the vCPU is stopped; guest-cleared).
    pub const GAP_PROBE: u64 = 0x88;
    /// Loop iterations (guest-written).
    pub const ITERATIONS: u64 = 0x100;
    /// Pages written (guest-written).
    pub const PAGES_WRITTEN: u64 = 0x108;
    /// Pages verified correct (guest-written).
    pub const PAGES_VERIFIED: u64 = 0x110;
    /// Pages that failed verification (guest-written).
    pub const MISMATCHES: u64 = 0x118;
    /// Address of the last page that failed (guest-written).
    pub const MISMATCH_ADDRESS: u64 = 0x120;
    /// The sequence number it should have had (guest-written).
    pub const MISMATCH_EXPECTED: u64 = 0x128;
    /// Longest gap between two iterations, in TSC ticks (guest-written).
    pub const MAX_GAP: u64 = 0x130;
    /// The last gap above the threshold (guest-written).
    pub const BIG_GAP: u64 = 0x138;
    /// The TSC at which that gap ended (guest-written).
    pub const BIG_GAP_END_TSC: u64 = 0x140;
    /// Gaps above the threshold so far (guest-written).
    pub const BIG_GAP_COUNT: u64 = 0x148;
    /// The TSC at the start of the latest iteration (guest-written).
    pub const LAST_TSC: u64 = 0x150;
    /// Next page to write (guest-written).
    pub const WRITE_CURSOR: u64 = 0x158;
    /// Current generation (guest-written).
    pub const GENERATION: u64 = 0x160;
    /// Trace entries appended so far (guest-written).
    pub const TRACE_NEXT: u64 = 0x168;
    /// Vector-register checks that failed (guest-written).
    pub const REGISTER_MISMATCHES: u64 = 0x170;
    /// Pages verified by the final check (guest-written).
    pub const FINAL_VERIFIED: u64 = 0x178;
    /// 1 once the final check is over (guest-written).
    pub const DONE: u64 = 0x180;
    /// The gap the armed probe caught, in TSC ticks (guest-written).
    pub const PROBED_GAP: u64 = 0x188;
}

/// The program's report channels, as `program.S` defines them (`.set CH_*`).
/// Channel `k` is port [`channels::PORT_BASE`]` + k`, or the MMIO doorbell
/// plus `8 k`.
pub mod channels {
    /// First port of the port I/O channels.
    pub const PORT_BASE: u16 = 0x3f0;
    /// Progress report: the control block has new counters.
    pub const PROGRESS: u64 = 0;
    /// A gap above the threshold ended (BIG_GAP, BIG_GAP_END_TSC).
    pub const GAP: u64 = 1;
    /// A page failed verification (MISMATCH_ADDRESS, MISMATCH_EXPECTED).
    pub const MISMATCH: u64 = 2;
    /// The vector counter disagreed with the iteration count.
    pub const REGISTER_MISMATCH: u64 = 3;
    /// The final check is over; the vCPU spins.
    pub const DONE: u64 = 4;
    /// The vCPU reached the program.
    pub const HELLO: u64 = 5;
    /// Number of channels.
    pub const COUNT: u64 = 6;
}

/// Golden-ratio multiplier of the page fill (`program.S`, `write_page`).
const FILL_MULTIPLIER: u64 = 0x9e37_79b9_7f4a_7c15;
/// The qword holding a page's checksum.
const CHECKSUM_QWORD: usize = 511;

/// How the host configures the program.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestOptions {
    /// Report progress every `2^report_shift` iterations.
    pub report_shift: u32,
    /// Append a trace entry every `2^trace_shift` iterations.
    pub trace_shift: u32,
    /// Report a gap longer than this many TSC ticks at once.
    pub gap_threshold_ticks: u64,
    /// Use AVX for the vector-register check (needs XSAVE and AVX).
    pub use_avx: bool,
    /// Report through port I/O rather than the MMIO doorbell. Port I/O from
    /// the guest's user mode needs a KVM that honours IOPL, which this
    /// machine's (PVM) does not; [`crate::machine::Machine::boot`] turns it
    /// off there.
    pub report_via_port: bool,
}

impl Default for GuestOptions {
    fn default() -> Self {
        Self {
            report_shift: 16,
            trace_shift: 8,
            // 1 ms at 2.6 GHz: long enough that ordinary host scheduling
            // noise stays below it most of the time, short enough that a
            // live-update blackout is always above it.
            gap_threshold_ticks: 2_600_000,
            use_avx: true,
            report_via_port: true,
        }
    }
}

/// Loads the program and fills every vCPU's control block for a first boot.
#[derive(Clone, Copy, Debug)]
pub struct GuestSetup {
    /// The layout the program runs in.
    pub layout: GuestLayout,
    /// Its options.
    pub options: GuestOptions,
}

impl GuestSetup {
    /// Writes the page tables, the program and the control blocks.
    ///
    /// # Errors
    /// - [`VmmError::GuestMemory`] (EFAULT): the memory is smaller than the
    ///   layout.
    pub fn write(&self, memory: &GuestMemoryMmap) -> Result<()> {
        const { assert!(PROGRAM.len() as u64 <= MAX_CODE_BYTES) };
        self.layout.write_boot_tables(memory)?;
        write_bytes(memory, CODE_ADDRESS, PROGRAM)?;
        for vcpu in 0..self.layout.vcpus() {
            self.write_control_block(memory, vcpu)?;
        }
        Ok(())
    }

    fn write_control_block(&self, memory: &GuestMemoryMmap, vcpu: u32) -> Result<()> {
        let block = self.layout.control_block(vcpu);
        let options = &self.options;
        let fields = [
            (offsets::CPU_INDEX, u64::from(vcpu)),
            (offsets::DATA_BASE, self.layout.data_base(vcpu)),
            (offsets::PAGE_COUNT, self.layout.pages_per_vcpu()),
            (offsets::REPORT_MASK, (1u64 << options.report_shift) - 1),
            (offsets::TRACE_MASK, (1u64 << options.trace_shift) - 1),
            (offsets::TRACE_BASE, self.layout.trace_ring(vcpu)),
            (offsets::TRACE_CAPACITY_MASK, TRACE_CAPACITY - 1),
            (offsets::GAP_THRESHOLD, options.gap_threshold_ticks),
            (offsets::DOORBELL, self.layout.doorbell()),
            (offsets::USE_AVX, u64::from(options.use_avx)),
            (offsets::REPORT_VIA_PORT, u64::from(options.report_via_port)),
            (offsets::COMMAND, 0),
        ];
        for (offset, value) in fields {
            write_object(memory, block + offset, value)?;
        }
        write_object(memory, block + offsets::ONES, [1.0f64.to_bits(); 4])
    }
}

/// Asks every vCPU's program to run its final check and stop.
///
/// # Errors
/// - [`VmmError::GuestMemory`] (EFAULT): the memory is smaller than the layout.
pub fn request_final_check(memory: &GuestMemoryMmap, layout: &GuestLayout) -> Result<()> {
    for vcpu in 0..layout.vcpus() {
        write_object(memory, layout.control_block(vcpu) + offsets::COMMAND, 1u64)?;
    }
    Ok(())
}

/// Arms every vCPU's gap probe: the next gap each vCPU sees (the one
/// spanning the stop, when called while the vCPUs are stopped) is stored
/// for [`probed_gaps`]. Call it only while the vCPUs are stopped.
///
/// # Errors
/// - [`crate::VmmError::GuestMemory`] (EFAULT): the memory is smaller than the layout.
pub fn arm_gap_probe(memory: &GuestMemoryMmap, layout: &GuestLayout) -> Result<()> {
    for vcpu in 0..layout.vcpus() {
        let block = layout.control_block(vcpu);
        write_object(memory, block + offsets::PROBED_GAP, 0u64)?;
        write_object(memory, block + offsets::GAP_PROBE, 1u64)?;
    }
    Ok(())
}

/// Per vCPU, the gap the armed probe caught, in TSC ticks (None: the vCPU
/// has not run an iteration since the probe was armed).
///
/// # Errors
/// - [`crate::VmmError::GuestMemory`] (EFAULT): the memory is smaller than the layout.
pub fn probed_gaps(memory: &GuestMemoryMmap, layout: &GuestLayout) -> Result<Vec<Option<u64>>> {
    (0..layout.vcpus())
        .map(|vcpu| {
            let block = layout.control_block(vcpu);
            let armed: u64 = read_object(memory, block + offsets::GAP_PROBE)?;
            let gap: u64 = read_object(memory, block + offsets::PROBED_GAP)?;
            Ok((armed == 0 && gap != 0).then_some(gap))
        })
        .collect()
}

/// One vCPU's counters, as its control block holds them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GuestReport {
    /// Loop iterations.
    pub iterations: u64,
    /// Pages written.
    pub pages_written: u64,
    /// Pages verified correct.
    pub pages_verified: u64,
    /// Pages that failed verification.
    pub mismatches: u64,
    /// Address of the last page that failed.
    pub mismatch_address: u64,
    /// Longest gap between two iterations, TSC ticks.
    pub max_gap_ticks: u64,
    /// The last gap above the threshold, TSC ticks.
    pub big_gap_ticks: u64,
    /// TSC at which that gap ended.
    pub big_gap_end_tsc: u64,
    /// Gaps above the threshold.
    pub big_gaps: u64,
    /// TSC at the start of the latest iteration.
    pub last_tsc: u64,
    /// Next page to write.
    pub write_cursor: u64,
    /// Current generation.
    pub generation: u64,
    /// Trace entries appended.
    pub trace_next: u64,
    /// Vector-register checks that failed.
    pub register_mismatches: u64,
    /// Pages verified by the final check.
    pub final_verified: u64,
    /// Whether the final check is over.
    pub done: bool,
}

impl GuestReport {
    /// Reads vCPU `vcpu`'s control block.
    ///
    /// # Errors
    /// - [`VmmError::GuestMemory`] (EFAULT): the memory is smaller than the layout.
    pub fn read(memory: &GuestMemoryMmap, layout: &GuestLayout, vcpu: u32) -> Result<Self> {
        let block = layout.control_block(vcpu);
        let field = |offset: u64| read_object::<u64>(memory, block + offset);
        Ok(Self {
            iterations: field(offsets::ITERATIONS)?,
            pages_written: field(offsets::PAGES_WRITTEN)?,
            pages_verified: field(offsets::PAGES_VERIFIED)?,
            mismatches: field(offsets::MISMATCHES)?,
            mismatch_address: field(offsets::MISMATCH_ADDRESS)?,
            max_gap_ticks: field(offsets::MAX_GAP)?,
            big_gap_ticks: field(offsets::BIG_GAP)?,
            big_gap_end_tsc: field(offsets::BIG_GAP_END_TSC)?,
            big_gaps: field(offsets::BIG_GAP_COUNT)?,
            last_tsc: field(offsets::LAST_TSC)?,
            write_cursor: field(offsets::WRITE_CURSOR)?,
            generation: field(offsets::GENERATION)?,
            trace_next: field(offsets::TRACE_NEXT)?,
            register_mismatches: field(offsets::REGISTER_MISMATCHES)?,
            final_verified: field(offsets::FINAL_VERIFIED)?,
            done: field(offsets::DONE)? != 0,
        })
    }
}

/// One event the program reported through a port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestEvent {
    /// A gap above the threshold ended at `end_tsc`.
    Gap {
        /// The vCPU.
        vcpu: u32,
        /// Its length in TSC ticks.
        ticks: u64,
        /// The guest TSC at which it ended.
        end_tsc: u64,
    },
    /// A page failed verification.
    Mismatch {
        /// The vCPU.
        vcpu: u32,
        /// The page's guest-physical address.
        address: u64,
        /// The sequence number it should have had.
        expected: u64,
    },
    /// The vector counter disagreed with the iteration count.
    RegisterMismatch {
        /// The vCPU.
        vcpu: u32,
    },
}

/// The [`ExitHandler`] for the guest program: counts its reports, keeps its
/// events, ends a vCPU's run when it reports DONE.
#[derive(Debug)]
pub struct GuestMonitor {
    layout: GuestLayout,
    memory: std::sync::Arc<crate::memory::GuestMemory>,
    hellos: AtomicU64,
    progress_reports: AtomicU64,
    done: AtomicU64,
    events: Mutex<Vec<GuestEvent>>,
}

impl GuestMonitor {
    /// A monitor for a guest with this layout in this memory.
    pub fn new(layout: GuestLayout, memory: std::sync::Arc<crate::memory::GuestMemory>) -> Self {
        Self {
            layout,
            memory,
            hellos: AtomicU64::new(0),
            progress_reports: AtomicU64::new(0),
            done: AtomicU64::new(0),
            events: Mutex::new(Vec::new()),
        }
    }

    /// MMIO hellos seen (one per vCPU that entered the program).
    pub fn hellos(&self) -> u64 {
        self.hellos.load(Ordering::Relaxed)
    }

    /// Progress reports seen.
    pub fn progress_reports(&self) -> u64 {
        self.progress_reports.load(Ordering::Relaxed)
    }

    /// vCPUs that reported DONE.
    pub fn done(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }

    /// The events reported so far.
    pub fn events(&self) -> Vec<GuestEvent> {
        self.events
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn push(&self, event: GuestEvent) {
        self.events
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(event);
    }

    fn report(&self, vcpu: u32) -> GuestReport {
        GuestReport::read(self.memory.view(), &self.layout, vcpu).unwrap_or_default()
    }
}

impl GuestMonitor {
    /// Handles a report on `channel` from `vcpu`.
    fn on_report(&self, vcpu: u32, channel: u64) -> ExitAction {
        match channel {
            channels::PROGRESS => {
                self.progress_reports.fetch_add(1, Ordering::Relaxed);
            }
            channels::GAP => {
                let report = self.report(vcpu);
                self.push(GuestEvent::Gap {
                    vcpu,
                    ticks: report.big_gap_ticks,
                    end_tsc: report.big_gap_end_tsc,
                });
            }
            channels::MISMATCH => {
                let block = self.layout.control_block(vcpu);
                let view = self.memory.view();
                let address = read_object(view, block + offsets::MISMATCH_ADDRESS).unwrap_or(0);
                let expected = read_object(view, block + offsets::MISMATCH_EXPECTED).unwrap_or(0);
                tracing::error!(vcpu, address, expected, "guest page mismatch");
                self.push(GuestEvent::Mismatch {
                    vcpu,
                    address,
                    expected,
                });
            }
            channels::REGISTER_MISMATCH => {
                tracing::error!(vcpu, "guest vector register mismatch");
                self.push(GuestEvent::RegisterMismatch { vcpu });
            }
            channels::DONE => {
                self.done.fetch_add(1, Ordering::Relaxed);
                return ExitAction::Stop;
            }
            channels::HELLO => {
                self.hellos.fetch_add(1, Ordering::Relaxed);
            }
            _ => tracing::warn!(vcpu, channel, "guest reported on an unknown channel"),
        }
        ExitAction::Continue
    }
}

impl ExitHandler for GuestMonitor {
    fn port_out(&self, vcpu: u32, port: u16, _data: &[u8]) -> ExitAction {
        match port.checked_sub(channels::PORT_BASE) {
            Some(channel) if u64::from(channel) < channels::COUNT => {
                self.on_report(vcpu, u64::from(channel))
            }
            _ => {
                tracing::warn!(vcpu, port, "guest wrote to an unknown port");
                ExitAction::Continue
            }
        }
    }

    fn mmio_write(&self, vcpu: u32, address: u64, _data: &[u8]) -> ExitAction {
        let offset = address.wrapping_sub(self.layout.doorbell());
        if offset.is_multiple_of(8) && offset / 8 < channels::COUNT {
            self.on_report(vcpu, offset / 8)
        } else {
            tracing::warn!(vcpu, address, "guest wrote to an unknown MMIO address");
            ExitAction::Continue
        }
    }
}

/// The outcome of checking guest pages from the host.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PageCheck {
    /// Pages that held what the program wrote.
    pub pages_checked: u64,
    /// Pages that did not.
    pub mismatches: u64,
    /// Address of the first page that did not.
    pub first_mismatch: Option<u64>,
}

/// Verifies, from the host, every page the program has completely written,
/// with the same rules the program itself applies. Call it only while the
/// vCPUs are stopped: a running guest rewrites pages under the check.
///
/// The page at the write cursor is skipped: a vCPU stopped inside
/// `write_page` has written it only in part. Pages never written are not
/// read (reading them would allocate them).
///
/// # Errors
/// - [`VmmError::GuestMemory`] (EFAULT): the memory is smaller than the layout.
pub fn check_pages(memory: &GuestMemoryMmap, layout: &GuestLayout) -> Result<PageCheck> {
    let mut check = PageCheck::default();
    let mut bytes = vec![0u8; PAGE_SIZE as usize];
    let mut page = [0u64; 512];
    for vcpu in 0..layout.vcpus() {
        let block = layout.control_block(vcpu);
        let cursor: u64 = read_object(memory, block + offsets::WRITE_CURSOR)?;
        let generation: u64 = read_object(memory, block + offsets::GENERATION)?;
        let count = layout.pages_per_vcpu();
        let written = if generation == 0 { cursor } else { count };
        for index in 0..written {
            // After a wrap the page at the cursor is the one being rewritten.
            if generation > 0 && index == cursor {
                continue;
            }
            let page_generation = if index < cursor {
                generation
            } else {
                generation - 1
            };
            let address = layout.data_base(vcpu) + index * PAGE_SIZE;
            read_bytes(memory, address, &mut bytes)?;
            for (value, chunk) in page.iter_mut().zip(bytes.chunks_exact(8)) {
                let mut qword = [0u8; 8];
                qword.copy_from_slice(chunk);
                *value = u64::from_le_bytes(qword);
            }
            let expected = page_generation * count + index + 1;
            if page_is_valid(&page, address, expected) {
                check.pages_checked += 1;
            } else {
                check.mismatches += 1;
                check.first_mismatch.get_or_insert(address);
            }
        }
    }
    Ok(check)
}

/// Whether `page` is what `write_page` stores at `address` for sequence
/// number `expected`.
fn page_is_valid(page: &[u64; 512], address: u64, expected: u64) -> bool {
    let sum = page[..CHECKSUM_QWORD]
        .iter()
        .fold(0u64, |sum, value| sum.wrapping_add(*value));
    let fill = expected.wrapping_mul(FILL_MULTIPLIER);
    page[0] == address
        && page[1] == expected
        && sum == page[CHECKSUM_QWORD]
        && page[2..CHECKSUM_QWORD]
            .iter()
            .enumerate()
            .all(|(k, value)| *value == fill.wrapping_add(k as u64 + 2))
}

/// One entry of a vCPU's trace ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceEntry {
    /// Guest TSC at the start of the iteration.
    pub tsc: u64,
    /// Iterations completed at that point.
    pub iterations: u64,
}

#[cfg(test)]
mod tests;
