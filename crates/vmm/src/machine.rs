//! A KVM virtual machine over guest RAM: VM, memslot, vCPUs.
//!
//! Model: [`Machine`] owns the KVM VM fd, the guest memory and the stopped
//! vCPUs. [`Machine::start`] moves the vCPUs onto their threads and turns it
//! into a [`RunningMachine`]; [`RunningMachine::stop`] kicks them and gives
//! the [`Machine`] back. vCPU state can therefore only be saved or restored
//! while no thread runs it: the types enforce what KVM requires.
//!
//! Building a machine (each step timed in [`BuildTimings`], the costs that
//! dominate an `exec` handover):
//! 1. `KVM_CREATE_VM`;
//! 2. one memslot over the whole of guest RAM, and the prefault program's
//!    one-page scratch memslot ([`crate::prefault`]);
//! 3. `KVM_CREATE_IRQCHIP` (in-kernel LAPIC, so there is LAPIC state to
//!    save; a halted vCPU then waits in the kernel), after the memslot,
//!    which then costs a twentieth. No `KVM_SET_TSS_ADDR`:
//!    Intel KVM needs those pages only to emulate real mode, and the guest
//!    starts in long mode; they would also collide with RAM above 4 GiB,
//!    which the layout maps contiguously;
//! 4. `KVM_CREATE_VCPU` for each vCPU, its `kvm_run` page mapped a second
//!    time for kicking, and its CPUID set (the APIC id patched per vCPU).
//!
//! A successor builds the same machine over the memory it was handed and
//! restores the saved state instead of booting: a KVM VM fd is bound to the
//! process image (mm) that created it, so it cannot cross an exec.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES, kvm_userspace_memory_region};
use kvm_ioctls::{Cap, Kvm, VmFd};

use crate::error::{Result, VmmError};
use crate::guest::{GuestOptions, GuestSetup};
use crate::layout::{CODE_ADDRESS, GuestLayout, set_long_mode};
use crate::memory::GuestMemory;
use crate::state::{CaptureSpec, MachineState, capture_vm, restore_vm};
use crate::vcpu::{
    ArmedVcpus, ExitHandler, RunPage, RunningVcpus, ThreadOptions, Vcpu, VcpuCounters, VcpuEnd,
    VcpuOutcome,
};

/// XCR0 for a guest using AVX: x87, SSE and AVX state enabled.
const XCR0_X87_SSE_AVX: u64 = 0b111;

/// How to build a machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MachineConfig {
    /// Number of vCPUs.
    pub vcpus: u32,
}

/// Time taken by each step of building a machine.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BuildTimings {
    /// `KVM_CREATE_VM` (with opening /dev/kvm).
    pub create_vm: Duration,
    /// The in-kernel irqchip.
    pub irqchip: Duration,
    /// The memslot over guest RAM.
    pub memslot: Duration,
    /// All vCPUs: create, map, CPUID.
    pub vcpus: Duration,
}

impl BuildTimings {
    /// The sum of the steps.
    pub fn total(&self) -> Duration {
        self.create_vm + self.irqchip + self.memslot + self.vcpus
    }
}

/// A VM with its memory and stopped vCPUs.
#[derive(Debug)]
pub struct Machine {
    pub(crate) kvm: Kvm,
    pub(crate) vm: VmFd,
    pub(crate) memory: Arc<GuestMemory>,
    pub(crate) layout: GuestLayout,
    pub(crate) vcpus: Vec<Vcpu>,
    pub(crate) timings: BuildTimings,
    /// The prefault program's memory, once [`Machine::prefault`] added it.
    /// Its memslot is never removed: deleting a memslot makes x86 KVM zap
    /// every shadow page, which would undo the prefault.
    pub(crate) scratch: Option<crate::prefault::Scratch>,
}

impl Machine {
    /// Builds a VM over `memory` with `config.vcpus` vCPUs.
    ///
    /// # Errors
    /// - [`VmmError::KvmUnavailable`]: /dev/kvm cannot be opened (ENOENT, EACCES).
    /// - [`VmmError::InvalidMemorySize`], [`VmmError::InvalidVcpuCount`]
    ///   (EINVAL): the memory or count does not fit the guest layout.
    /// - [`VmmError::MissingCapability`] (EOPNOTSUPP): KVM lacks the
    ///   in-kernel irqchip or immediate_exit.
    /// - [`VmmError::Kvm`] / [`VmmError::VcpuIoctl`]: a KVM ioctl failed
    ///   (ENOMEM, EEXIST for an overlapping memslot, EINVAL).
    pub fn create(memory: Arc<GuestMemory>, config: MachineConfig) -> Result<Self> {
        let layout = GuestLayout::new(memory.size(), config.vcpus)?;
        let mut timings = BuildTimings::default();
        let started = Instant::now();
        let kvm = Kvm::new().map_err(|error| VmmError::KvmUnavailable {
            errno: error.errno(),
        })?;
        for (capability, name) in [
            (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
            (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
            (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
        ] {
            if !kvm.check_extension(capability) {
                return Err(VmmError::MissingCapability {
                    capability: name,
                    needed_for: "the monitor",
                });
            }
        }
        let vm = kvm
            .create_vm()
            .map_err(|error| VmmError::kvm("KVM_CREATE_VM", error))?;
        timings.create_vm = started.elapsed();

        let started = Instant::now();
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: memory.size(),
            userspace_addr: memory.ram().host_address().as_ptr() as u64,
        };
        // SAFETY: the region is the GuestRam's mapping, which stays valid
        // for as long as `memory` lives; the Machine holds `memory` and
        // drops the VM fd (removing the memslot) before it (field order).
        unsafe { vm.set_user_memory_region(region) }
            .map_err(|error| VmmError::kvm("KVM_SET_USER_MEMORY_REGION", error))?;
        // The prefault program's scratch memslot too, while adding one is
        // cheap (see below); it is never removed (see `scratch`).
        let scratch = crate::prefault::add_scratch(&vm, &layout)?;
        timings.memslot = started.elapsed();

        // The irqchip after the memslots: on this machine's KVM a memslot
        // added once the in-kernel irqchip exists costs 20 to 30 times more
        // (7 ms instead of 0.3 ms at 512 MiB, measured side by side).
        let started = Instant::now();
        vm.create_irq_chip()
            .map_err(|error| VmmError::kvm("KVM_CREATE_IRQCHIP", error))?;
        timings.irqchip = started.elapsed();

        let started = Instant::now();
        let run_size = vm.run_size();
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|error| VmmError::kvm("KVM_GET_SUPPORTED_CPUID", error))?;
        let mut vcpus = Vec::with_capacity(config.vcpus as usize);
        for index in 0..config.vcpus {
            let fd = vm
                .create_vcpu(u64::from(index))
                .map_err(|error| VmmError::vcpu("KVM_CREATE_VCPU", index, error))?;
            let mut own_cpuid = cpuid.clone();
            patch_apic_id(&mut own_cpuid, index);
            fd.set_cpuid2(&own_cpuid)
                .map_err(|error| VmmError::vcpu("KVM_SET_CPUID2", index, error))?;
            let run_page = Arc::new(RunPage::map(&fd, index, run_size)?);
            vcpus.push(Vcpu {
                index,
                fd,
                run_page,
                counters: Arc::new(VcpuCounters::default()),
            });
        }
        timings.vcpus = started.elapsed();
        Ok(Self {
            kvm,
            vm,
            memory,
            layout,
            vcpus,
            timings,
            scratch: Some(scratch),
        })
    }

    /// Loads the guest program and puts every vCPU at its entry point, for
    /// a first boot. Returns the options actually used (AVX is turned off
    /// where the vCPU model lacks XSAVE or AVX).
    ///
    /// # Errors
    /// - [`VmmError::GuestMemory`] (EFAULT): guest memory is smaller than the layout.
    /// - [`VmmError::VcpuIoctl`]: a register ioctl failed.
    pub fn boot(&mut self, options: GuestOptions) -> Result<GuestOptions> {
        let options = GuestOptions {
            use_avx: options.use_avx && self.has_xsave_and_avx()?,
            report_via_port: options.report_via_port && !self.is_pvm(),
            ..options
        };
        GuestSetup {
            layout: self.layout,
            options,
        }
        .write(self.memory.view())?;
        for vcpu in &self.vcpus {
            let index = vcpu.index;
            let mut sregs = vcpu
                .fd
                .get_sregs()
                .map_err(|error| VmmError::vcpu("KVM_GET_SREGS", index, error))?;
            set_long_mode(&mut sregs, options.use_avx);
            vcpu.fd
                .set_sregs(&sregs)
                .map_err(|error| VmmError::vcpu("KVM_SET_SREGS", index, error))?;
            let fpu = kvm_bindings::kvm_fpu {
                fcw: 0x37f,    // x87 reset value: all exceptions masked
                mxcsr: 0x1f80, // SSE reset value: all exceptions masked
                ..Default::default()
            };
            vcpu.fd
                .set_fpu(&fpu)
                .map_err(|error| VmmError::vcpu("KVM_SET_FPU", index, error))?;
            if options.use_avx {
                // The guest cannot load XCR0 itself: xsetbv in the guest is an
                // emulation failure on this machine's KVM (PVM).
                let mut xcrs = kvm_bindings::kvm_xcrs {
                    nr_xcrs: 1,
                    ..Default::default()
                };
                xcrs.xcrs[0].xcr = 0;
                xcrs.xcrs[0].value = XCR0_X87_SSE_AVX;
                vcpu.fd
                    .set_xcrs(&xcrs)
                    .map_err(|error| VmmError::vcpu("KVM_SET_XCRS", index, error))?;
            }
            let regs = kvm_bindings::kvm_regs {
                rip: CODE_ADDRESS,
                rsp: self.layout.stack_top(index),
                rdi: self.layout.control_block(index),
                // Bit 1 is reserved and always set; IOPL 3 lets the user-mode
                // guest do port I/O (where KVM honours it); interrupts off.
                rflags: 0x3002,
                ..Default::default()
            };
            vcpu.fd
                .set_regs(&regs)
                .map_err(|error| VmmError::vcpu("KVM_SET_REGS", index, error))?;
            // With the in-kernel LAPIC every vCPU but 0 starts waiting for a
            // startup IPI; the guest has no boot protocol, so all start running.
            let runnable = kvm_bindings::kvm_mp_state {
                mp_state: kvm_bindings::KVM_MP_STATE_RUNNABLE,
            };
            vcpu.fd
                .set_mp_state(runnable)
                .map_err(|error| VmmError::vcpu("KVM_SET_MP_STATE", index, error))?;
        }
        Ok(options)
    }

    /// Whether this is the PVM hypervisor: it answers its signature MSR
    /// (`0x4b564d11` reads "PVM", 0x4d5650), which no other KVM implements.
    pub fn is_pvm(&self) -> bool {
        const PVM_SIGNATURE_MSR: u32 = 0x4b56_4d11;
        const PVM_SIGNATURE: u64 = 0x4d_5650;
        let Some(vcpu) = self.vcpus.first() else {
            return false;
        };
        let Ok(mut msrs) = kvm_bindings::Msrs::from_entries(&[kvm_bindings::kvm_msr_entry {
            index: PVM_SIGNATURE_MSR,
            ..Default::default()
        }]) else {
            return false;
        };
        matches!(vcpu.fd.get_msrs(&mut msrs), Ok(1)) && msrs.as_slice()[0].data == PVM_SIGNATURE
    }

    fn has_xsave_and_avx(&self) -> Result<bool> {
        let Some(vcpu) = self.vcpus.first() else {
            return Ok(false);
        };
        let cpuid = vcpu
            .fd
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(|error| VmmError::vcpu("KVM_GET_CPUID2", vcpu.index, error))?;
        const XSAVE: u32 = 1 << 26;
        const AVX: u32 = 1 << 28;
        Ok(cpuid
            .as_slice()
            .iter()
            .any(|entry| entry.function == 1 && entry.ecx & (XSAVE | AVX) == XSAVE | AVX))
    }

    /// Starts every vCPU on its own thread.
    ///
    /// # Errors
    /// As [`RunningVcpus::start`]; the machine is lost with the error.
    pub fn start(self, handler: Arc<dyn ExitHandler>) -> Result<RunningMachine> {
        let spec = Arc::new(CaptureSpec::of(&self.kvm)?);
        let (shell, vcpus) = self.into_shell();
        let (running, _) = RunningVcpus::spawn(
            vcpus,
            handler,
            ThreadOptions {
                armed: false,
                capture: Some(spec),
            },
        )?;
        Ok(RunningMachine { shell, running })
    }

    /// Spawns the vCPU threads now, waiting, so that a later
    /// [`ArmedMachine::go`] only restores state (in parallel, one thread per
    /// vCPU) and enters the guest: what a transfer-mode successor does ahead
    /// of the switch. The threads also capture their vCPU's state in
    /// parallel when stopped with [`RunningMachine::stop_capturing`].
    ///
    /// # Errors
    /// As [`Machine::start`]; also [`VmmError::Kvm`] when KVM's MSR list
    /// cannot be read.
    pub fn arm(self, handler: Arc<dyn ExitHandler>) -> Result<ArmedMachine> {
        let spec = Arc::new(CaptureSpec::of(&self.kvm)?);
        let (shell, vcpus) = self.into_shell();
        let armed = ArmedVcpus::spawn(vcpus, handler, Some(spec))?;
        Ok(ArmedMachine { armed, shell })
    }

    /// Splits the machine into what stays with the host and the vCPUs,
    /// which go to their threads.
    fn into_shell(self) -> (Shell, Vec<Vcpu>) {
        let Self {
            kvm,
            vm,
            memory,
            layout,
            vcpus,
            timings,
            scratch,
        } = self;
        let shell = Shell {
            kvm,
            vm,
            memory,
            layout,
            timings,
            scratch,
        };
        (shell, vcpus)
    }

    /// The guest memory.
    pub fn memory(&self) -> &Arc<GuestMemory> {
        &self.memory
    }

    /// The guest layout.
    pub fn layout(&self) -> &GuestLayout {
        &self.layout
    }

    /// The guest TSC frequency in kHz (`KVM_GET_TSC_KHZ` of vCPU 0; 0 where
    /// KVM does not say).
    pub fn tsc_khz(&self) -> u32 {
        self.vcpus
            .first()
            .and_then(|vcpu| vcpu.fd.get_tsc_khz().ok())
            .unwrap_or(0)
    }

    /// The stopped vCPUs.
    pub fn vcpus(&self) -> &[Vcpu] {
        &self.vcpus
    }

    /// The KVM VM fd.
    pub fn vm(&self) -> &VmFd {
        &self.vm
    }

    /// The /dev/kvm handle.
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// How long each build step took.
    pub fn build_timings(&self) -> BuildTimings {
        self.timings
    }
}

/// A machine whose vCPU threads wait to be given state and run.
#[derive(Debug)]
pub struct ArmedMachine {
    // Field order: the threads go before the VM.
    armed: ArmedVcpus,
    shell: Shell,
}

impl ArmedMachine {
    /// Restores `state` (VM-wide here, each vCPU on its own thread, all in
    /// parallel) and lets the vCPUs run. With `state` None they run with the
    /// state they have (a first boot).
    ///
    /// # Errors
    /// - [`VmmError::StateMismatch`] (EINVAL): the state does not fit this
    ///   machine; nothing ran.
    /// - a restore error; nothing ran and the machine is lost.
    pub fn go(self, state: Option<&MachineState>) -> Result<RunningMachine> {
        let Self { armed, shell } = self;
        let states = match state {
            Some(state) => {
                state.check_fits_counts(armed.vcpu_count(), shell.memory.size())?;
                restore_vm(&shell.vm, &state.vm)?;
                Some(state.vcpus.clone())
            }
            None => None,
        };
        let running = armed.restore_and_run(states)?;
        Ok(RunningMachine { running, shell })
    }

    /// The guest memory.
    pub fn memory(&self) -> &Arc<GuestMemory> {
        &self.shell.memory
    }

    /// The guest layout.
    pub fn layout(&self) -> &GuestLayout {
        &self.shell.layout
    }

    /// How long each build step took.
    pub fn build_timings(&self) -> BuildTimings {
        self.shell.timings
    }
}

/// Sets the initial APIC id of a vCPU in its CPUID (leaf 1 EBX[31:24],
/// leaves 0xB and 0x1F EDX), so each vCPU reports its own index.
fn patch_apic_id(cpuid: &mut CpuId, index: u32) {
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            1 => entry.ebx = (entry.ebx & 0x00ff_ffff) | (index << 24),
            0xb | 0x1f => entry.edx = index,
            _ => {}
        }
    }
}

/// The parts of a machine that stay with the host while the vCPUs run.
#[derive(Debug)]
struct Shell {
    kvm: Kvm,
    vm: VmFd,
    memory: Arc<GuestMemory>,
    layout: GuestLayout,
    timings: BuildTimings,
    scratch: Option<crate::prefault::Scratch>,
}

impl Shell {
    /// The inverse of [`Machine::into_shell`]: the stopped vCPUs back in
    /// their machine.
    fn into_machine(self, vcpus: Vec<Vcpu>) -> Machine {
        let Shell {
            kvm,
            vm,
            memory,
            layout,
            timings,
            scratch,
        } = self;
        Machine {
            kvm,
            vm,
            memory,
            layout,
            vcpus,
            timings,
            scratch,
        }
    }
}

/// A machine whose vCPUs are running.
#[derive(Debug)]
pub struct RunningMachine {
    // Field order: the vCPU threads are stopped (Drop) before the VM goes.
    running: RunningVcpus,
    shell: Shell,
}

/// What [`RunningMachine::stop`] reports.
#[derive(Debug)]
pub struct StopReport {
    /// Per vCPU, why its loop ended.
    pub ends: Vec<VcpuEnd>,
    /// When the kick was sent.
    pub kicked_at: Instant,
    /// When the last vCPU stopped.
    pub last_stopped_at: Instant,
    /// When each vCPU first entered the guest in this run.
    pub first_entries: Vec<Option<Instant>>,
}

impl RunningMachine {
    /// The guest memory (readable while the guest runs).
    pub fn memory(&self) -> &Arc<GuestMemory> {
        &self.shell.memory
    }

    /// The guest layout.
    pub fn layout(&self) -> &GuestLayout {
        &self.shell.layout
    }

    /// The KVM VM fd.
    pub fn vm(&self) -> &VmFd {
        &self.shell.vm
    }

    /// When each vCPU first entered `KVM_RUN` in this run (None: not yet).
    pub fn first_entries(&self) -> Vec<Option<Instant>> {
        self.running.first_entries()
    }

    /// The running vCPUs, to kick or wait for.
    pub fn vcpus(&mut self) -> &mut RunningVcpus {
        &mut self.running
    }

    /// Kicks every vCPU, waits up to `timeout` for all to stop, and gives
    /// back the stopped machine.
    ///
    /// # Errors
    /// - [`VmmError::StopTimeout`] (ETIMEDOUT): some vCPUs did not stop
    ///   (blocked in a fault nobody serves); `self` comes back with the error.
    /// - [`VmmError::ThreadPanicked`]: a vCPU thread panicked; the machine is lost.
    pub fn stop(self, timeout: Duration) -> std::result::Result<(Machine, StopReport), StopError> {
        let kicked_at = Instant::now();
        let Self { running, shell } = self;
        let first_entries = running.first_entries();
        match running.stop(timeout) {
            Ok(outcomes) => Ok(Self::reassemble(shell, outcomes, kicked_at, first_entries)),
            Err(failed) => Err(Self::failed_stop(shell, failed)),
        }
    }

    /// As [`Self::stop`], with each vCPU's state captured by its own thread
    /// (in parallel, right after it stops) and the VM-wide state read after
    /// all stopped.
    ///
    /// # Errors
    /// As [`Self::stop`]; a capture error gives back the stopped machine in
    /// [`StopError::Captured`].
    pub fn stop_capturing(
        self,
        timeout: Duration,
    ) -> std::result::Result<(Machine, StopReport, MachineState), StopError> {
        let kicked_at = Instant::now();
        let Self { running, shell } = self;
        let first_entries = running.first_entries();
        let mut outcomes = match running.stop_capturing(timeout) {
            Ok(outcomes) => outcomes,
            Err(failed) => return Err(Self::failed_stop(shell, failed)),
        };
        let mut vcpus = Vec::with_capacity(outcomes.len());
        let mut failure = None;
        for outcome in &mut outcomes {
            match outcome.state.take() {
                Some(Ok(state)) => vcpus.push(state),
                Some(Err(error)) => {
                    failure.get_or_insert(error);
                }
                None => {
                    failure.get_or_insert(VmmError::StateMismatch {
                        reason: format!(
                            "vCPU {} ended ({:?}) before it could be captured",
                            outcome.vcpu.index, outcome.end
                        ),
                    });
                }
            }
        }
        let vm = capture_vm(&shell.vm);
        let memory_size = shell.memory.size();
        let (machine, report) = Self::reassemble(shell, outcomes, kicked_at, first_entries);
        let vm = match (failure, vm) {
            (None, Ok(vm)) => vm,
            (Some(error), _) | (None, Err(error)) => {
                return Err(StopError::Captured(Box::new(machine), error));
            }
        };
        Ok((
            machine,
            report,
            MachineState {
                memory_size,
                vcpus,
                vm,
            },
        ))
    }

    /// Waits (without kicking) up to `timeout` for every vCPU's loop to end
    /// by itself, then gives back the stopped machine.
    ///
    /// # Errors
    /// As [`Self::stop`].
    pub fn wait_for_guest(
        mut self,
        timeout: Duration,
    ) -> std::result::Result<(Machine, StopReport), StopError> {
        let still_running = self.running.wait_finished(timeout);
        if !still_running.is_empty() {
            let error = VmmError::StopTimeout {
                vcpus: still_running,
                waited_ms: timeout.as_millis() as u64,
            };
            return Err(StopError::Running(Box::new(self), error));
        }
        let kicked_at = Instant::now();
        let Self { running, shell } = self;
        let first_entries = running.first_entries();
        match running.join() {
            Ok(outcomes) => Ok(Self::reassemble(shell, outcomes, kicked_at, first_entries)),
            Err(error) => Err(StopError::Lost(error)),
        }
    }

    /// A stop that failed: vCPUs that did not stop in time give the machine
    /// back; any other error loses it.
    fn failed_stop(shell: Shell, (running, error): (RunningVcpus, VmmError)) -> StopError {
        if matches!(error, VmmError::StopTimeout { .. }) {
            StopError::Running(Box::new(Self { running, shell }), error)
        } else {
            StopError::Lost(error)
        }
    }

    fn reassemble(
        shell: Shell,
        outcomes: Vec<VcpuOutcome>,
        kicked_at: Instant,
        first_entries: Vec<Option<Instant>>,
    ) -> (Machine, StopReport) {
        let last_stopped_at = outcomes
            .iter()
            .map(|outcome| outcome.stopped_at)
            .max()
            .unwrap_or(kicked_at);
        let mut vcpus = Vec::with_capacity(outcomes.len());
        let mut ends = Vec::with_capacity(outcomes.len());
        for outcome in outcomes {
            vcpus.push(outcome.vcpu);
            ends.push(outcome.end);
        }
        (
            shell.into_machine(vcpus),
            StopReport {
                ends,
                kicked_at,
                last_stopped_at,
                first_entries,
            },
        )
    }
}

/// Why [`RunningMachine::stop`] did not give the machine back.
#[derive(Debug)]
pub enum StopError {
    /// Some vCPUs are still running; the machine comes back to try again.
    Running(Box<RunningMachine>, VmmError),
    /// A vCPU thread panicked; the machine is gone.
    Lost(VmmError),
    /// The vCPUs stopped but their state could not be captured; the
    /// stopped machine comes back.
    Captured(Box<Machine>, VmmError),
}

impl StopError {
    /// The underlying error.
    pub fn error(&self) -> &VmmError {
        match self {
            Self::Running(_, error) | Self::Lost(error) | Self::Captured(_, error) => error,
        }
    }
}
