//! Prefaulting a new VM's shadow page tables before the switch.
//!
//! Why: this machine's KVM (PVM) has no `KVM_PRE_FAULT_MEMORY` and uses
//! shadow paging, so a new VM starts with no guest mappings at all: after a
//! live update every first touch of a guest page is a fault into KVM, and a
//! guest that walks all its memory crawls until it has touched every page
//! again (measured: seconds for 256 MiB in 4 KiB pages).
//!
//! How: before the saved state is restored, the new VM's vCPUs run a tiny
//! program (`guest/prefault.S`) that loads one byte from every page of the
//! populated ranges, with the guest's own page tables and mode (CPL 3, same
//! CR0/CR3/CR4/EFER), so KVM builds exactly the shadow pages the guest will
//! use. Shadow pages are kept per VM, keyed by the guest page-table page and
//! the paging mode, not per vCPU run: the restored vCPUs find them.
//!
//! The program lives in a scratch memslot only the new VM has, placed in
//! the 2 MiB region of the guest's doorbell (mapped by the guest's page
//! tables, backed by no RAM) 1 MiB above the doorbell, so it needs no byte
//! of guest memory and writes none. The memslot is never deleted, because
//! deleting a memslot makes x86 KVM zap all shadow pages.
//!
//! Only populated ranges may be touched: a load from a hole in the memory
//! file would allocate the page (and, with a fault service, would be a
//! fault like any other, which a frozen file refuses).
//!
//! Success path: 1. map the scratch page and add its memslot; 2. per vCPU
//! thread, for each of its ranges, point the registers at the program and
//! run until it reports on the prefault channel; 3. complete the last MMIO
//! exit (a run with `immediate_exit`). Failure paths: any other exit is an
//! error naming it; the machine must then not be used for a restore.

use std::ops::Range;
use std::ptr::NonNull;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_sregs, kvm_userspace_memory_region};
use kvm_ioctls::VcpuExit;

use crate::error::{Result, VmmError};
use crate::layout::{PAGE_SIZE, set_long_mode};
use crate::machine::Machine;
use crate::vcpu::Vcpu;

/// The prefault program (`guest/prefault.S`).
pub const PROGRAM: &[u8] = include_bytes!("guest/prefault.bin");
/// Its source.
pub const PROGRAM_SOURCE: &str = include_str!("guest/prefault.S");

/// The scratch memslot's number (slot 0 is guest RAM).
const SCRATCH_SLOT: u32 = 1;
/// Scratch GPA relative to the doorbell: inside the doorbell's 2 MiB large
/// page, clear of the doorbell's own channels.
const SCRATCH_OFFSET: u64 = 1 << 20;
/// Scratch bytes: one page holds the program.
const SCRATCH_BYTES: usize = PAGE_SIZE as usize;
/// The doorbell channel the program reports on (beyond the guest program's).
const PREFAULT_CHANNEL: u64 = 8;

/// The anonymous page holding the prefault program, mapped into the VM.
#[derive(Debug)]
pub(crate) struct Scratch {
    address: NonNull<libc::c_void>,
}

// SAFETY: plain anonymous memory owned by this object.
unsafe impl Send for Scratch {}
// SAFETY: only written once, before the memslot exists.
unsafe impl Sync for Scratch {}

impl Drop for Scratch {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the page `map_scratch` mapped; the VM (and
        // its memslot over this page) is dropped before this (field order in
        // Machine and Shell).
        unsafe { libc::munmap(self.address.as_ptr(), SCRATCH_BYTES) };
    }
}

/// What a prefault did.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PrefaultReport {
    /// Wall time.
    pub elapsed: Duration,
    /// Pages (strides) touched.
    pub pages: u64,
}

impl Machine {
    /// Runs the prefault program over `ranges` (guest-physical, populated
    /// only), one touch per `stride` bytes, split across the vCPUs. Call it
    /// on a new machine before [`crate::state::MachineState::restore`].
    /// `paging` supplies CR0/CR3/CR4/EFER (the saved state's special
    /// registers, or None for this crate's guest layout).
    ///
    /// # Errors
    /// - [`VmmError::InvalidMemorySize`] (EINVAL): a range is outside guest
    ///   memory or `stride` is 0.
    /// - [`VmmError::Kvm`] / [`VmmError::VcpuIoctl`]: mapping the scratch
    ///   page, adding its memslot, or a vCPU ioctl failed.
    /// - [`VmmError::GuestFailed`]: the program exited any other way than
    ///   through its report.
    pub fn prefault(
        &mut self,
        ranges: &[Range<u64>],
        stride: u64,
        paging: Option<&kvm_sregs>,
    ) -> Result<PrefaultReport> {
        let started = Instant::now();
        let size = self.memory.size();
        if stride == 0
            || ranges
                .iter()
                .any(|range| range.start > range.end || range.end > size)
        {
            return Err(VmmError::InvalidMemorySize {
                size,
                reason: "prefault range outside guest memory, or zero stride",
            });
        }
        self.map_scratch()?;
        let mut sregs = match paging {
            Some(sregs) => *sregs,
            None => {
                let mut sregs = self.vcpus[0]
                    .fd
                    .get_sregs()
                    .map_err(|error| VmmError::vcpu("KVM_GET_SREGS", 0, error))?;
                set_long_mode(&mut sregs, true);
                sregs
            }
        };
        // Nothing may be pending from an earlier use of the vCPU.
        sregs.interrupt_bitmap = [0; 4];
        let shares = split(ranges, stride, self.vcpus.len());
        let doorbell = self.layout.doorbell();
        let program = doorbell + SCRATCH_OFFSET;
        let report_at = doorbell + PREFAULT_CHANNEL * 8;
        let results: Vec<Result<()>> = std::thread::scope(|scope| {
            let handles: Vec<_> = self
                .vcpus
                .iter_mut()
                .zip(shares.iter())
                .map(|(vcpu, share)| {
                    scope.spawn(move || run_share(vcpu, &sregs, share, stride, program, report_at))
                })
                .collect();
            handles
                .into_iter()
                .map(|handle| {
                    handle
                        .join()
                        .unwrap_or(Err(VmmError::ThreadPanicked { vcpu: 0 }))
                })
                .collect()
        });
        results.into_iter().collect::<Result<Vec<()>>>()?;
        let pages = ranges
            .iter()
            .map(|range| (range.end - range.start).div_ceil(stride))
            .sum();
        Ok(PrefaultReport {
            elapsed: started.elapsed(),
            pages,
        })
    }

    fn map_scratch(&mut self) -> Result<()> {
        if self.scratch.is_none() {
            self.scratch = Some(add_scratch(&self.vm, &self.layout)?);
        }
        Ok(())
    }
}

/// Maps the scratch page, writes the program into it and adds its memslot
/// to `vm`. [`Machine::create`] calls this before it creates the irqchip,
/// when adding a memslot is cheap on this machine's KVM.
///
/// # Errors
/// - [`VmmError::MemoryFile`]: the page cannot be mapped (ENOMEM).
/// - [`VmmError::Kvm`]: KVM refused the memslot.
pub(crate) fn add_scratch(
    vm: &kvm_ioctls::VmFd,
    layout: &crate::layout::GuestLayout,
) -> Result<Scratch> {
    // SAFETY: a fresh anonymous shared mapping at an address the kernel
    // picks; Scratch::drop unmaps it.
    let address = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            SCRATCH_BYTES,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if address == libc::MAP_FAILED {
        return Err(VmmError::MemoryFile {
            operation: "mmap(prefault scratch)",
            errno: std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::ENOMEM),
        });
    }
    let address = NonNull::new(address).ok_or(VmmError::MemoryFile {
        operation: "mmap(prefault scratch)",
        errno: libc::ENOMEM,
    })?;
    let scratch = Scratch { address };
    // SAFETY: the program fits in the page just mapped, which nothing
    // else refers to yet.
    unsafe {
        std::ptr::copy_nonoverlapping(
            PROGRAM.as_ptr(),
            scratch.address.as_ptr().cast::<u8>(),
            PROGRAM.len(),
        );
    }
    let region = kvm_userspace_memory_region {
        slot: SCRATCH_SLOT,
        flags: 0,
        guest_phys_addr: layout.doorbell() + SCRATCH_OFFSET,
        memory_size: SCRATCH_BYTES as u64,
        userspace_addr: scratch.address.as_ptr() as u64,
    };
    // SAFETY: the region is the scratch page; the caller keeps the
    // returned Scratch in the Machine, which closes the VM fd first
    // (field order).
    unsafe { vm.set_user_memory_region(region) }
        .map_err(|error| VmmError::kvm("KVM_SET_USER_MEMORY_REGION(prefault)", error))?;
    const { assert!(PROGRAM.len() <= SCRATCH_BYTES) };
    Ok(scratch)
}

/// Splits `ranges` into `parts` shares of about equal size, at `stride`
/// boundaries relative to each range's start.
fn split(ranges: &[Range<u64>], stride: u64, parts: usize) -> Vec<Vec<Range<u64>>> {
    let total: u64 = ranges.iter().map(|range| range.end - range.start).sum();
    let share = total
        .div_ceil(parts.max(1) as u64)
        .next_multiple_of(stride)
        .max(stride);
    let mut shares = vec![Vec::new(); parts.max(1)];
    let mut current = 0;
    let mut filled = 0;
    for range in ranges {
        let mut start = range.start;
        while start < range.end {
            let take = (share - filled).min(range.end - start);
            let end = (start + take).next_multiple_of(stride).min(range.end);
            shares[current].push(start..end);
            filled += end - start;
            start = end;
            if filled >= share && current + 1 < shares.len() {
                current += 1;
                filled = 0;
            }
        }
    }
    shares
}

/// Runs the program over one vCPU's share.
fn run_share(
    vcpu: &mut Vcpu,
    sregs: &kvm_sregs,
    share: &[Range<u64>],
    stride: u64,
    program: u64,
    report_at: u64,
) -> Result<()> {
    let index = vcpu.index;
    let failed = |operation| move |error| VmmError::vcpu(operation, index, error);
    vcpu.fd.set_sregs(sregs).map_err(failed("KVM_SET_SREGS"))?;
    let runnable = kvm_bindings::kvm_mp_state {
        mp_state: kvm_bindings::KVM_MP_STATE_RUNNABLE,
    };
    vcpu.fd
        .set_mp_state(runnable)
        .map_err(failed("KVM_SET_MP_STATE"))?;
    for range in share {
        let regs = kvm_bindings::kvm_regs {
            rip: program,
            rdi: range.start,
            rsi: range.end,
            rcx: stride,
            rdx: report_at,
            rflags: 0x3002,
            ..Default::default()
        };
        vcpu.fd.set_regs(&regs).map_err(failed("KVM_SET_REGS"))?;
        loop {
            match vcpu.fd.run() {
                Ok(VcpuExit::MmioWrite(address, _)) if address == report_at => break,
                // A stray signal: run again.
                Err(error) if matches!(error.errno(), libc::EINTR | libc::EAGAIN) => {}
                Err(error) => return Err(VmmError::vcpu("KVM_RUN(prefault)", index, error)),
                Ok(other) => {
                    let exit = format!("prefault: {other:?}");
                    let rip = vcpu.fd.get_regs().map(|regs| regs.rip).unwrap_or(0);
                    return Err(VmmError::GuestFailed {
                        vcpu: index,
                        exit,
                        rip,
                    });
                }
            }
        }
    }
    // Complete the last MMIO exit so no half-done instruction is left.
    vcpu.run_page.set_immediate_exit(true);
    let _ = vcpu.fd.run();
    vcpu.run_page.set_immediate_exit(false);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_cover_every_range_once_at_stride_boundaries() {
        let ranges = [
            0..10 * PAGE_SIZE,
            20 * PAGE_SIZE..21 * PAGE_SIZE,
            30 * PAGE_SIZE..37 * PAGE_SIZE,
        ];
        for parts in 1..5 {
            let shares = split(&ranges, PAGE_SIZE, parts);
            assert_eq!(shares.len(), parts);
            let mut covered: Vec<Range<u64>> = shares.concat();
            covered.sort_by_key(|range| range.start);
            let bytes: u64 = covered.iter().map(|range| range.end - range.start).sum();
            assert_eq!(bytes, 18 * PAGE_SIZE);
            for range in &covered {
                assert!(
                    ranges
                        .iter()
                        .any(|outer| outer.start <= range.start && range.end <= outer.end)
                );
                assert_eq!(range.start % PAGE_SIZE, 0);
            }
        }
    }
}
