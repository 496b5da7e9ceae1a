//! The guest program's workload on host threads, for a machine without
//! KVM: the same loop as `guest/program.S`, over the same guest memory
//! layout and control blocks, so that everything else (the fault service,
//! live updates, the host's page check, gap and recovery measurement) works
//! unchanged and is labelled "host threads" wherever it is reported.
//!
//! Model: thread `i` plays vCPU `i`. Its loop state, which the guest
//! program keeps in registers, lives in the control block (the guest
//! program's fields plus [`VERIFY_CURSOR`], which the guest keeps in a
//! register that KVM saves); the thread stores it after every iteration and
//! checks its stop flag before the next, so a stopped thread's whole state
//! is in guest memory and a successor resumes it from there. Guest memory
//! is touched through the file's registered mapping, so every first touch
//! is a fault served by the fault service, and a touch of a missing page
//! while the file is frozen blocks the thread in that fault (a signal does
//! not release it: the kernel retries the fault after the handler), which
//! is the stuck case of [`crate::parked`].
//!
//! Concurrency: the host reads control blocks while the threads write
//! them; both sides use plain loads and stores of aligned 8-byte words
//! (atomics here, volatile copies in vm-memory), as with a real guest.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::{Result, VmmError};
use crate::guest::offsets;
use crate::layout::{GuestLayout, PAGE_SIZE, TRACE_CAPACITY};
use crate::memory::GuestMemory;

/// Control block offset where a host thread keeps its verify cursor (the
/// guest program keeps it in rbp).
pub const VERIFY_CURSOR: u64 = 0x190;

/// Golden-ratio multiplier of the page fill (as `program.S`'s `write_page`).
const FILL_MULTIPLIER: u64 = 0x9e37_79b9_7f4a_7c15;
/// The qword holding a page's checksum.
const CHECKSUM_QWORD: u64 = 511;

/// The TSC now.
pub fn tsc() -> u64 {
    // SAFETY: RDTSC has no memory effects and exists on every x86-64 CPU.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// The TSC frequency in kHz, measured against CLOCK_MONOTONIC over 20 ms.
pub fn tsc_khz() -> u32 {
    let (start_tsc, start) = (tsc(), Instant::now());
    std::thread::sleep(Duration::from_millis(20));
    let ticks = tsc() - start_tsc;
    let micros = start.elapsed().as_micros().max(1) as u64;
    u32::try_from(ticks * 1000 / micros).unwrap_or(u32::MAX)
}

/// One thread's view of guest memory: guest-physical address to atomic
/// word.
#[derive(Clone, Copy)]
struct Words {
    base: *mut u8,
    size: u64,
}

// SAFETY: the pointer names the guest memory mapping, which the
// `Arc<GuestMemory>` each thread holds keeps mapped; every access is an
// atomic word access.
unsafe impl Send for Words {}

impl Words {
    fn word(&self, address: u64) -> &AtomicU64 {
        debug_assert!(address + 8 <= self.size && address.is_multiple_of(8));
        // SAFETY: callers pass 8-aligned guest-physical addresses inside
        // guest memory (control blocks, trace rings and data pages of the
        // layout, all below `size`); the mapping is shared memory that
        // lives as long as the thread's Arc<GuestMemory>.
        unsafe { AtomicU64::from_ptr(self.base.add(address as usize).cast::<u64>()) }
    }

    fn load(&self, address: u64) -> u64 {
        self.word(address).load(Ordering::Relaxed)
    }

    fn store(&self, address: u64, value: u64) {
        self.word(address).store(value, Ordering::Relaxed);
    }
}

/// The loop state the guest program keeps in registers.
struct Registers {
    block: u64,
    data_base: u64,
    count: u64,
    write_cursor: u64,
    generation: u64,
    verify_cursor: u64,
    previous_tsc: u64,
    iterations: u64,
}

/// Host threads running the workload.
pub struct HostCpus {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for HostCpus {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("HostCpus")
            .field("threads", &self.threads.len())
            .finish()
    }
}

impl HostCpus {
    /// Starts one thread per vCPU of `layout`, each resuming from its
    /// control block (a first boot has zeros there, which is where the
    /// loop starts; [`crate::guest::GuestSetup::write`] fills the rest).
    ///
    /// # Errors
    /// - [`VmmError::ThreadSpawn`]: a thread could not be created (the
    ///   started ones are stopped again).
    pub fn start(memory: &Arc<GuestMemory>, layout: GuestLayout) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut cpus = Self {
            stop: Arc::clone(&stop),
            threads: Vec::new(),
        };
        for vcpu in 0..layout.vcpus() {
            let memory = Arc::clone(memory);
            let stop = Arc::clone(&stop);
            let spawned = std::thread::Builder::new()
                .name(format!("host-cpu-{vcpu}"))
                .spawn(move || run(&memory, layout, vcpu, &stop));
            match spawned {
                Ok(handle) => cpus.threads.push(handle),
                Err(error) => {
                    cpus.stop_all(Duration::from_secs(5));
                    return Err(VmmError::ThreadSpawn {
                        vcpu,
                        errno: error.raw_os_error().unwrap_or(libc::EAGAIN),
                    });
                }
            }
        }
        Ok(cpus)
    }

    /// Asks every thread to stop after its current iteration and waits up
    /// to `timeout`, or until `give_up(threads still running)` says the rest
    /// cannot stop (they are blocked in parked faults). `Err` gives the
    /// threads back when some did not stop, with their indices.
    pub fn stop_unless(
        mut self,
        timeout: Duration,
        give_up: impl Fn(usize) -> bool,
    ) -> std::result::Result<(), (Self, Vec<u32>)> {
        let stuck = self.stop_all_unless(timeout, give_up);
        if stuck.is_empty() {
            Ok(())
        } else {
            Err((self, stuck))
        }
    }

    /// As [`Self::stop_unless`], waiting the whole `timeout`.
    ///
    /// # Errors
    /// As [`Self::stop_unless`].
    pub fn stop(self, timeout: Duration) -> std::result::Result<(), (Self, Vec<u32>)> {
        self.stop_unless(timeout, |_| false)
    }

    fn stop_all(&mut self, timeout: Duration) -> Vec<u32> {
        self.stop_all_unless(timeout, |_| false)
    }

    fn stop_all_unless(&mut self, timeout: Duration, give_up: impl Fn(usize) -> bool) -> Vec<u32> {
        // Relaxed: the threads poll the flag; their state reaches the host
        // through the join below, which synchronizes.
        self.stop.store(true, Ordering::Relaxed);
        let deadline = Instant::now() + timeout;
        loop {
            let running = self
                .threads
                .iter()
                .filter(|thread| !thread.is_finished())
                .count();
            if running == 0 || Instant::now() >= deadline || give_up(running) {
                break;
            }
            std::thread::sleep(Duration::from_micros(50));
        }
        let mut stuck = Vec::new();
        for (index, thread) in std::mem::take(&mut self.threads).into_iter().enumerate() {
            if thread.is_finished() {
                let _ = thread.join();
            } else {
                stuck.push(index as u32);
                self.threads.push(thread);
            }
        }
        stuck
    }

    /// Waits up to `timeout` for every thread to end by itself (the final
    /// check done); true when all did.
    pub fn wait_finished(mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline && self.threads.iter().any(|thread| !thread.is_finished()) {
            std::thread::sleep(Duration::from_millis(1));
        }
        let all = self.threads.iter().all(JoinHandle::is_finished);
        if all {
            for thread in self.threads.drain(..) {
                let _ = thread.join();
            }
        }
        all
    }
}

impl Drop for HostCpus {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            let stuck = self.stop_all(Duration::from_secs(1));
            if !stuck.is_empty() {
                tracing::error!(?stuck, "host CPU threads left blocked in a fault");
            }
        }
    }
}

/// One thread: the guest program's loop.
fn run(memory: &Arc<GuestMemory>, layout: GuestLayout, vcpu: u32, stop: &AtomicBool) {
    let words = Words {
        base: memory.ram().host_address().as_ptr(),
        size: memory.size(),
    };
    let block = layout.control_block(vcpu);
    let mut registers = Registers {
        block,
        data_base: words.load(block + offsets::DATA_BASE),
        count: words.load(block + offsets::PAGE_COUNT),
        write_cursor: words.load(block + offsets::WRITE_CURSOR),
        generation: words.load(block + offsets::GENERATION),
        verify_cursor: words.load(block + VERIFY_CURSOR),
        previous_tsc: words.load(block + offsets::LAST_TSC),
        iterations: words.load(block + offsets::ITERATIONS),
    };
    if registers.previous_tsc == 0 {
        registers.previous_tsc = tsc();
    }
    loop {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        iteration(&words, &mut registers);
        if words.load(block + offsets::COMMAND) != 0 {
            final_check(&words, &mut registers);
            return;
        }
    }
}

/// One iteration of `main_loop` in `program.S`, state stored at the end.
fn iteration(words: &Words, registers: &mut Registers) {
    let block = registers.block;
    let now = tsc();
    let gap = now.wrapping_sub(registers.previous_tsc);
    registers.previous_tsc = now;
    words.store(block + offsets::LAST_TSC, now);
    if gap > words.load(block + offsets::MAX_GAP) {
        words.store(block + offsets::MAX_GAP, gap);
    }
    if words.load(block + offsets::GAP_PROBE) != 0 {
        words.store(block + offsets::PROBED_GAP, gap);
        words.store(block + offsets::GAP_PROBE, 0);
    }
    if gap > words.load(block + offsets::GAP_THRESHOLD) {
        words.store(block + offsets::BIG_GAP, gap);
        words.store(block + offsets::BIG_GAP_END_TSC, now);
        words.store(
            block + offsets::BIG_GAP_COUNT,
            words.load(block + offsets::BIG_GAP_COUNT) + 1,
        );
    }
    write_page(words, registers);
    registers.write_cursor += 1;
    if registers.write_cursor >= registers.count {
        registers.write_cursor = 0;
        registers.generation += 1;
    }
    words.store(block + offsets::WRITE_CURSOR, registers.write_cursor);
    words.store(block + offsets::GENERATION, registers.generation);
    verify_page(words, registers);
    registers.iterations += 1;
    words.store(block + offsets::ITERATIONS, registers.iterations);
    words.store(block + VERIFY_CURSOR, registers.verify_cursor);
    if registers.iterations & words.load(block + offsets::TRACE_MASK) == 0 {
        let next = words.load(block + offsets::TRACE_NEXT);
        let slot = next & (TRACE_CAPACITY - 1);
        let entry = words.load(block + offsets::TRACE_BASE) + slot * 16;
        words.store(entry, registers.previous_tsc);
        words.store(entry + 8, registers.iterations);
        words.store(block + offsets::TRACE_NEXT, next + 1);
    }
}

fn write_page(words: &Words, registers: &Registers) {
    let sequence = registers.generation * registers.count + registers.write_cursor + 1;
    let page = registers.data_base + registers.write_cursor * PAGE_SIZE;
    words.store(page, page);
    words.store(page + 8, sequence);
    let mut sum = page.wrapping_add(sequence);
    let fill = FILL_MULTIPLIER.wrapping_mul(sequence);
    for qword in 2..CHECKSUM_QWORD {
        let value = fill.wrapping_add(qword);
        words.store(page + qword * 8, value);
        sum = sum.wrapping_add(value);
    }
    words.store(page + CHECKSUM_QWORD * 8, sum);
    let block = registers.block;
    words.store(
        block + offsets::PAGES_WRITTEN,
        words.load(block + offsets::PAGES_WRITTEN) + 1,
    );
}

fn verify_page(words: &Words, registers: &mut Registers) {
    let written = if registers.generation == 0 {
        registers.write_cursor
    } else {
        registers.count
    };
    if written == 0 {
        return;
    }
    if registers.verify_cursor >= written {
        registers.verify_cursor = 0;
    }
    let index = registers.verify_cursor;
    let generation = if index < registers.write_cursor {
        registers.generation
    } else {
        registers.generation.wrapping_sub(1)
    };
    let expected = generation
        .wrapping_mul(registers.count)
        .wrapping_add(index + 1);
    let page = registers.data_base + index * PAGE_SIZE;
    registers.verify_cursor += 1;
    let mut sum = 0u64;
    for qword in 0..CHECKSUM_QWORD {
        sum = sum.wrapping_add(words.load(page + qword * 8));
    }
    let block = registers.block;
    if words.load(page) == page
        && words.load(page + 8) == expected
        && sum == words.load(page + CHECKSUM_QWORD * 8)
    {
        words.store(
            block + offsets::PAGES_VERIFIED,
            words.load(block + offsets::PAGES_VERIFIED) + 1,
        );
    } else {
        words.store(
            block + offsets::MISMATCHES,
            words.load(block + offsets::MISMATCHES) + 1,
        );
        words.store(block + offsets::MISMATCH_ADDRESS, page);
        words.store(block + offsets::MISMATCH_EXPECTED, expected);
        tracing::error!(page, expected, "host-thread workload: page mismatch");
    }
}

/// `final_check` in `program.S`: verify every page written, then DONE.
fn final_check(words: &Words, registers: &mut Registers) {
    let written = if registers.generation == 0 {
        registers.write_cursor
    } else {
        registers.count
    };
    registers.verify_cursor = 0;
    let block = registers.block;
    for _ in 0..written {
        verify_page(words, registers);
        words.store(
            block + offsets::FINAL_VERIFIED,
            words.load(block + offsets::FINAL_VERIFIED) + 1,
        );
    }
    words.store(block + offsets::DONE, 1);
}

/// What the state slot holds for host threads (their loop state is in the
/// control blocks): a checked little record so that a successor knows it
/// resumes threads, how many, and the TSC rate their gaps are measured in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ThreadsRecord {
    /// Threads (vCPUs).
    pub vcpus: u32,
    /// The TSC frequency in kHz.
    pub tsc_khz: u32,
    /// Guest memory size in bytes.
    pub memory_size: u64,
}

const THREADS_MAGIC: [u8; 8] = *b"GMLUTHRD";
const THREADS_RECORD_BYTES: usize = 28;

impl ThreadsRecord {
    /// Writes the record at offset 0 of `slot`.
    ///
    /// # Errors
    /// - [`VmmError::MemoryFile`]: `pwrite` failed.
    pub fn write(&self, slot: std::os::fd::BorrowedFd<'_>) -> Result<()> {
        let mut bytes = Vec::with_capacity(THREADS_RECORD_BYTES);
        bytes.extend_from_slice(&THREADS_MAGIC);
        bytes.extend_from_slice(&self.vcpus.to_le_bytes());
        bytes.extend_from_slice(&self.tsc_khz.to_le_bytes());
        bytes.extend_from_slice(&self.memory_size.to_le_bytes());
        bytes.extend_from_slice(&crc32fast::hash(&bytes).to_le_bytes());
        rustix::io::pwrite(slot, &bytes, 0)
            .map_err(|errno| VmmError::memory_file("pwrite", errno))?;
        Ok(())
    }

    /// Reads and checks the record at offset 0 of `slot`.
    ///
    /// # Errors
    /// - [`VmmError::StateMismatch`] (EINVAL): no valid record there.
    /// - [`VmmError::MemoryFile`]: `pread` failed.
    pub fn read(slot: std::os::fd::BorrowedFd<'_>) -> Result<Self> {
        let mut bytes = [0u8; THREADS_RECORD_BYTES];
        let count = rustix::io::pread(slot, &mut bytes, 0)
            .map_err(|errno| VmmError::memory_file("pread", errno))?;
        let invalid = |reason: &str| VmmError::StateMismatch {
            reason: format!("host-thread state record: {reason}"),
        };
        if count != THREADS_RECORD_BYTES || bytes[..8] != THREADS_MAGIC {
            return Err(invalid("missing"));
        }
        let field = |range: std::ops::Range<usize>| {
            let mut value = [0u8; 8];
            value[..range.len()].copy_from_slice(&bytes[range]);
            u64::from_le_bytes(value)
        };
        if field(24..28) != u64::from(crc32fast::hash(&bytes[..24])) {
            return Err(invalid("checksum mismatch"));
        }
        Ok(Self {
            vcpus: field(8..12) as u32,
            tsc_khz: field(12..16) as u32,
            memory_size: field(16..24),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_record_round_trips_and_refuses_corruption() {
        let slot = rustix::fs::memfd_create("slot", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        use std::os::fd::AsFd;
        assert!(ThreadsRecord::read(slot.as_fd()).is_err());
        let record = ThreadsRecord {
            vcpus: 3,
            tsc_khz: 2_600_000,
            memory_size: 64 << 20,
        };
        record.write(slot.as_fd()).unwrap();
        assert_eq!(ThreadsRecord::read(slot.as_fd()).unwrap(), record);
        rustix::io::pwrite(&slot, &[9], 9).unwrap();
        assert!(ThreadsRecord::read(slot.as_fd()).is_err());
    }
}
