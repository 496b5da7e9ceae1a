//! Saved vCPU and VM state: what crosses a live update besides memory.
//!
//! Model: [`MachineState`] is everything KVM keeps about a stopped guest
//! outside its RAM: per vCPU the general, special, FPU/XSAVE and debug
//! registers, XCRs, the MSRs KVM lists as worth saving, LAPIC, pending
//! events, MP state, CPUID and the TSC; per VM the kvmclock and the in-kernel
//! PIC/IOAPIC. [`MachineState::capture`] reads it from a stopped
//! [`Machine`]; [`MachineState::restore`] writes it into a machine built
//! over the same memory (usually a new VM in a new process);
//! [`wire`] turns it into a versioned, checksummed byte record that lives in
//! a sealed memfd ([`MachineState::to_memfd`], [`MachineState::from_fd`]).
//!
//! Restore order (each step may depend on the ones before; the order of
//! Firecracker's and QEMU's restore paths):
//! 1. CPUID (KVM validates XCR0, EFER and the MSRs below against it);
//! 2. MP state, general registers, special registers (control registers,
//!    segments, EFER), FPU, XSAVE, XCRs, debug registers;
//! 3. LAPIC, then the MSRs (TSC deadline needs the LAPIC), then pending
//!    events;
//! 4. the TSC ([`tsc`]): same offset from the host TSC as before, so the
//!    guest's TSC keeps counting real time across the update;
//! 5. per VM: kvmclock (advanced by the real time that passed) and irqchips.
//!
//! Failure paths: any ioctl failure is returned with the ioctl's name, the
//! vCPU and the errno; the machine is then half restored and must not run
//! (the caller discards it). A record for a different vCPU count or memory
//! size is refused before anything is written.

pub mod tsc;
pub mod wire;

use std::os::fd::{AsFd, OwnedFd};

use kvm_bindings::{
    CpuId, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_MAX_CPUID_ENTRIES, Msrs, kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_fpu,
    kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};

use crate::error::{Result, VmmError};
use crate::machine::Machine;
pub use tsc::TscState;
pub use wire::StateFormatError;

/// MSR_IA32_TSC: saved and restored through [`TscState`], never as a plain
/// MSR (writing a saved TSC value back would move the guest's clock back by
/// the time the update took).
const MSR_IA32_TSC: u32 = 0x10;

/// One vCPU's state.
#[derive(Clone, Debug, PartialEq)]
pub struct VcpuState {
    /// The vCPU's index.
    pub index: u32,
    /// MP state (running, halted, waiting for SIPI...).
    pub mp_state: kvm_mp_state,
    /// General registers.
    pub regs: kvm_regs,
    /// Special registers: segments, descriptor tables, control registers, EFER, APIC base.
    pub sregs: kvm_sregs,
    /// Legacy FPU/SSE state (also inside `xsave` where KVM has XSAVE).
    pub fpu: kvm_fpu,
    /// The XSAVE area (x87, SSE, AVX, AVX-512... as XCR0 enables).
    pub xsave: Option<XsaveArea>,
    /// Extended control registers (XCR0).
    pub xcrs: Option<kvm_xcrs>,
    /// Debug registers.
    pub debug_regs: kvm_debugregs,
    /// Local APIC registers.
    pub lapic: kvm_lapic_state,
    /// Pending exceptions, interrupts, NMI and SMI state.
    pub events: kvm_vcpu_events,
    /// Every MSR KVM lists as saveable (`KVM_GET_MSR_INDEX_LIST`) that reads
    /// back, except the TSC.
    pub msrs: Vec<kvm_msr_entry>,
    /// The vCPU's CPUID.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// The guest TSC.
    pub tsc: TscState,
}

/// The legacy 4 KiB XSAVE area (`struct kvm_xsave` without its trailing
/// flexible array, which KVM uses only beyond 4 KiB, for AMX).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct XsaveArea(pub Box<[u32; 1024]>);

impl XsaveArea {
    fn from_kvm(xsave: &kvm_xsave) -> Self {
        Self(Box::new(xsave.region))
    }

    fn to_kvm(&self) -> kvm_xsave {
        kvm_xsave {
            region: *self.0,
            ..Default::default()
        }
    }
}

/// VM-wide state.
#[derive(Clone, Debug)]
pub struct VmState {
    /// kvmclock, with the real time at which it was read.
    pub clock: kvm_clock_data,
    /// PIC master, PIC slave and IOAPIC, in that order.
    pub irqchips: Vec<kvm_irqchip>,
}

impl PartialEq for VmState {
    /// kvm_irqchip holds a union (no derived equality): compare its bytes.
    fn eq(&self, other: &Self) -> bool {
        use zerocopy::IntoBytes;
        self.clock == other.clock
            && self.irqchips.len() == other.irqchips.len()
            && self
                .irqchips
                .iter()
                .zip(&other.irqchips)
                .all(|(left, right)| left.as_bytes() == right.as_bytes())
    }
}

/// The state of a stopped machine, minus its memory.
#[derive(Clone, Debug, PartialEq)]
pub struct MachineState {
    /// Guest memory size the state belongs to.
    pub memory_size: u64,
    /// Per vCPU, in index order.
    pub vcpus: Vec<VcpuState>,
    /// VM-wide state.
    pub vm: VmState,
}

/// Time spent in each part of a capture or restore.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StateTimings {
    /// All vCPUs.
    pub vcpus: std::time::Duration,
    /// VM-wide state.
    pub vm: std::time::Duration,
}

impl MachineState {
    /// Reads the state of every vCPU and of the VM.
    ///
    /// The vCPUs must have been stopped through a kick (or have ended their
    /// run loop themselves), so that no I/O exit is half complete.
    ///
    /// # Errors
    /// - [`VmmError::VcpuIoctl`] / [`VmmError::Kvm`]: a `KVM_GET_*` ioctl
    ///   failed (EINVAL, EFAULT; E2BIG if CPUID has more entries than KVM allows).
    pub fn capture(machine: &Machine) -> Result<(Self, StateTimings)> {
        let started = std::time::Instant::now();
        let spec = CaptureSpec::of(machine.kvm())?;
        let mut vcpus = Vec::with_capacity(machine.vcpus().len());
        for vcpu in machine.vcpus() {
            vcpus.push(capture_vcpu(vcpu.fd(), vcpu.index(), &spec)?);
        }
        let vcpu_time = started.elapsed();
        let started = std::time::Instant::now();
        let vm = capture_vm(machine.vm())?;
        Ok((
            Self {
                memory_size: machine.memory().size(),
                vcpus,
                vm,
            },
            StateTimings {
                vcpus: vcpu_time,
                vm: started.elapsed(),
            },
        ))
    }

    /// Writes this state into `machine`, which must be freshly built over
    /// the same memory with the same vCPU count and never run.
    ///
    /// # Errors
    /// - [`VmmError::StateMismatch`] (EINVAL): the vCPU count or memory size differs.
    /// - [`VmmError::VcpuIoctl`] / [`VmmError::Kvm`]: a `KVM_SET_*` ioctl
    ///   failed (EINVAL for a value this KVM refuses, for example an MSR).
    pub fn restore(&self, machine: &Machine) -> Result<StateTimings> {
        self.check_fits(machine)?;
        let started = std::time::Instant::now();
        for (vcpu, state) in machine.vcpus().iter().zip(&self.vcpus) {
            restore_vcpu(vcpu.fd(), state)?;
        }
        let vcpu_time = started.elapsed();
        let started = std::time::Instant::now();
        restore_vm(machine.vm(), &self.vm)?;
        Ok(StateTimings {
            vcpus: vcpu_time,
            vm: started.elapsed(),
        })
    }

    /// Refuses a state for a different vCPU count or memory size.
    pub(crate) fn check_fits_counts(&self, vcpus: usize, memory_size: u64) -> Result<()> {
        if vcpus != self.vcpus.len() {
            return Err(VmmError::StateMismatch {
                reason: format!("{} vCPUs saved, the machine has {vcpus}", self.vcpus.len()),
            });
        }
        if memory_size != self.memory_size {
            return Err(VmmError::StateMismatch {
                reason: format!(
                    "{} bytes of memory saved, the machine has {memory_size}",
                    self.memory_size
                ),
            });
        }
        Ok(())
    }

    fn check_fits(&self, machine: &Machine) -> Result<()> {
        self.check_fits_counts(machine.vcpus().len(), machine.memory().size())
    }

    /// Encodes the state into a new memfd, sealed against any change, ready
    /// to be handed to a successor.
    ///
    /// # Errors
    /// - [`VmmError::MemoryFile`]: `memfd_create`, `write` or `F_ADD_SEALS`
    ///   failed (EMFILE, ENOMEM, ENOSPC).
    pub fn to_memfd(&self) -> Result<OwnedFd> {
        wire::write_memfd(&wire::encode(self))
    }

    /// Reads and validates a state record from a file (a memfd handed over
    /// by a predecessor), from offset 0 whatever the file position.
    ///
    /// # Errors
    /// - [`VmmError::State`] (EINVAL): the record is malformed (see
    ///   [`StateFormatError`]) or could not be read.
    pub fn from_fd(file: impl AsFd) -> Result<Self> {
        let bytes = wire::read_file(file.as_fd())?;
        Ok(wire::decode(&bytes)?)
    }
}

/// A state slot: a fixed-size memfd that a live update preserves before the
/// vCPUs stop and writes the state into once they have.
impl MachineState {
    /// Makes an empty slot for a machine of `vcpus` vCPUs (close-on-exec,
    /// sealed against size changes, writable).
    ///
    /// # Errors
    /// - [`VmmError::MemoryFile`]: `memfd_create`, `ftruncate` or
    ///   `F_ADD_SEALS` failed (EMFILE, ENOMEM).
    pub fn new_slot(vcpus: u32) -> Result<OwnedFd> {
        wire::slot_memfd(vcpus)
    }

    /// Encodes the state into `slot` at offset 0; returns the record's size.
    ///
    /// # Errors
    /// - [`VmmError::MemoryFile`]: EFBIG when the slot is too small, or
    ///   `pwrite` failed.
    pub fn write_to_slot(&self, slot: impl AsFd) -> Result<usize> {
        let record = wire::encode(self);
        wire::write_slot(slot.as_fd(), &record)?;
        Ok(record.len())
    }

    /// Reads and validates the record at the start of `slot`.
    ///
    /// # Errors
    /// - [`VmmError::State`] (EINVAL): no valid record there (see
    ///   [`StateFormatError`]), or it could not be read.
    pub fn from_slot(slot: impl AsFd) -> Result<Self> {
        let bytes = wire::read_slot(slot.as_fd())?;
        Ok(wire::decode(&bytes)?)
    }
}

/// What a vCPU capture reads, decided once per machine: which optional
/// parts KVM has, and which MSRs to save.
#[derive(Clone, Debug)]
pub(crate) struct CaptureSpec {
    xsave: bool,
    xcrs: bool,
    /// KVM's saveable MSR list, minus the TSC (see [`tsc`]).
    msrs: Vec<u32>,
}

impl CaptureSpec {
    /// Asks KVM.
    pub(crate) fn of(kvm: &Kvm) -> Result<Self> {
        let list = kvm
            .get_msr_index_list()
            .map_err(|error| VmmError::kvm("KVM_GET_MSR_INDEX_LIST", error))?;
        Ok(Self {
            xsave: kvm.check_extension(Cap::Xsave),
            xcrs: kvm.check_extension(Cap::Xcrs),
            msrs: list
                .as_slice()
                .iter()
                .copied()
                .filter(|&index| index != MSR_IA32_TSC)
                .collect(),
        })
    }
}

/// Reads one stopped vCPU's state.
pub(crate) fn capture_vcpu(fd: &VcpuFd, index: u32, spec: &CaptureSpec) -> Result<VcpuState> {
    let failed = |operation| move |error| VmmError::vcpu(operation, index, error);
    // MP state first: reading it makes KVM settle pending INIT/SIPI events,
    // which the later reads then see (Firecracker's order).
    let mp_state = fd.get_mp_state().map_err(failed("KVM_GET_MP_STATE"))?;
    let regs = fd.get_regs().map_err(failed("KVM_GET_REGS"))?;
    let sregs = fd.get_sregs().map_err(failed("KVM_GET_SREGS"))?;
    let fpu = fd.get_fpu().map_err(failed("KVM_GET_FPU"))?;
    let xsave = if spec.xsave {
        let xsave = fd.get_xsave().map_err(failed("KVM_GET_XSAVE"))?;
        Some(XsaveArea::from_kvm(&xsave))
    } else {
        None
    };
    let xcrs = if spec.xcrs {
        Some(fd.get_xcrs().map_err(failed("KVM_GET_XCRS"))?)
    } else {
        None
    };
    let debug_regs = fd.get_debug_regs().map_err(failed("KVM_GET_DEBUGREGS"))?;
    let lapic = fd.get_lapic().map_err(failed("KVM_GET_LAPIC"))?;
    let events = fd
        .get_vcpu_events()
        .map_err(failed("KVM_GET_VCPU_EVENTS"))?;
    let msrs = read_msrs(fd, index, &spec.msrs)?;
    let cpuid = fd
        .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
        .map_err(failed("KVM_GET_CPUID2"))?
        .as_slice()
        .to_vec();
    let tsc = TscState::capture(fd, index)?;
    Ok(VcpuState {
        index,
        mp_state,
        regs,
        sregs,
        fpu,
        xsave,
        xcrs,
        debug_regs,
        lapic,
        events,
        msrs,
        cpuid,
        tsc,
    })
}

/// Reads every MSR of `indices` that this vCPU can read. KVM_GET_MSRS stops
/// at the first MSR it cannot read and returns how many it read, so the
/// list is read in runs, skipping each unreadable MSR.
fn read_msrs(fd: &VcpuFd, vcpu: u32, indices: &[u32]) -> Result<Vec<kvm_msr_entry>> {
    let mut saved = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let entries: Vec<kvm_msr_entry> = rest
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| VmmError::VcpuIoctl {
            operation: "KVM_GET_MSRS",
            vcpu,
            errno: libc::E2BIG,
        })?;
        let read = fd
            .get_msrs(&mut msrs)
            .map_err(|error| VmmError::vcpu("KVM_GET_MSRS", vcpu, error))?;
        saved.extend_from_slice(&msrs.as_slice()[..read]);
        // Skip the one that could not be read (if any) and go on.
        rest = rest.get(read + 1..).unwrap_or(&[]);
    }
    Ok(saved)
}

/// Reads the VM-wide state.
pub(crate) fn capture_vm(vm: &VmFd) -> Result<VmState> {
    let clock = vm
        .get_clock()
        .map_err(|error| VmmError::kvm("KVM_GET_CLOCK", error))?;
    let mut irqchips = Vec::with_capacity(3);
    for chip_id in [
        KVM_IRQCHIP_PIC_MASTER,
        KVM_IRQCHIP_PIC_SLAVE,
        KVM_IRQCHIP_IOAPIC,
    ] {
        let mut chip = kvm_irqchip {
            chip_id,
            ..Default::default()
        };
        vm.get_irqchip(&mut chip)
            .map_err(|error| VmmError::kvm("KVM_GET_IRQCHIP", error))?;
        irqchips.push(chip);
    }
    Ok(VmState { clock, irqchips })
}

/// Writes one vCPU's state (the vCPU must never have run, or have run only
/// the prefault program).
pub(crate) fn restore_vcpu(fd: &VcpuFd, state: &VcpuState) -> Result<()> {
    let index = state.index;
    let failed = |operation| move |error| VmmError::vcpu(operation, index, error);
    let cpuid = CpuId::from_entries(&state.cpuid).map_err(|_| VmmError::VcpuIoctl {
        operation: "KVM_SET_CPUID2",
        vcpu: index,
        errno: libc::E2BIG,
    })?;
    fd.set_cpuid2(&cpuid).map_err(failed("KVM_SET_CPUID2"))?;
    fd.set_mp_state(state.mp_state)
        .map_err(failed("KVM_SET_MP_STATE"))?;
    fd.set_regs(&state.regs).map_err(failed("KVM_SET_REGS"))?;
    fd.set_sregs(&state.sregs)
        .map_err(failed("KVM_SET_SREGS"))?;
    fd.set_fpu(&state.fpu).map_err(failed("KVM_SET_FPU"))?;
    if let Some(xsave) = &state.xsave {
        let xsave = xsave.to_kvm();
        // SAFETY: `xsave` is a whole legacy 4 KiB kvm_xsave; KVM_SET_XSAVE
        // reads exactly that much (the larger KVM_SET_XSAVE2 layout, for
        // AMX, is never used here), so no byte past the struct is read.
        unsafe { fd.set_xsave(&xsave) }.map_err(failed("KVM_SET_XSAVE"))?;
    }
    if let Some(xcrs) = &state.xcrs {
        fd.set_xcrs(xcrs).map_err(failed("KVM_SET_XCRS"))?;
    }
    fd.set_debug_regs(&state.debug_regs)
        .map_err(failed("KVM_SET_DEBUGREGS"))?;
    fd.set_lapic(&state.lapic)
        .map_err(failed("KVM_SET_LAPIC"))?;
    write_msrs(fd, index, &state.msrs)?;
    fd.set_vcpu_events(&state.events)
        .map_err(failed("KVM_SET_VCPU_EVENTS"))?;
    state.tsc.restore(fd, index)
}

/// Writes the MSRs; KVM_SET_MSRS returns how many it wrote, stopping at the
/// first it refuses, which is reported by index.
fn write_msrs(fd: &VcpuFd, vcpu: u32, entries: &[kvm_msr_entry]) -> Result<()> {
    if entries.is_empty() {
        return Ok(());
    }
    let msrs = Msrs::from_entries(entries).map_err(|_| VmmError::VcpuIoctl {
        operation: "KVM_SET_MSRS",
        vcpu,
        errno: libc::E2BIG,
    })?;
    let written = fd
        .set_msrs(&msrs)
        .map_err(|error| VmmError::vcpu("KVM_SET_MSRS", vcpu, error))?;
    if written != entries.len() {
        return Err(VmmError::StateMismatch {
            reason: format!(
                "vCPU {vcpu}: KVM refused MSR {:#x} (wrote {written} of {})",
                entries[written].index,
                entries.len()
            ),
        });
    }
    Ok(())
}

/// Writes the VM-wide state.
pub(crate) fn restore_vm(vm: &VmFd, state: &VmState) -> Result<()> {
    // With KVM_CLOCK_REALTIME in the flags (as KVM_GET_CLOCK returned them),
    // KVM advances kvmclock by the real time elapsed since the capture.
    vm.set_clock(&state.clock)
        .map_err(|error| VmmError::kvm("KVM_SET_CLOCK", error))?;
    for chip in &state.irqchips {
        vm.set_irqchip(chip)
            .map_err(|error| VmmError::kvm("KVM_SET_IRQCHIP", error))?;
    }
    Ok(())
}
