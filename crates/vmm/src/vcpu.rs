//! vCPU threads: the run loop, exit dispatch, and the kick that stops them.
//!
//! Model: each vCPU runs `KVM_RUN` in a loop on its own thread and hands
//! every exit to an [`ExitHandler`]. The host stops a vCPU by *kicking* it:
//! it sets the vCPU's stop flag, sets `immediate_exit` in the vCPU's
//! `kvm_run` page and sends the thread [`kick_signal`].
//!
//! Why no wake-up is lost, whatever the thread is doing when kicked:
//! 1. in the guest: the pending signal makes `KVM_RUN` return EINTR;
//! 2. in user space between two runs: the loop reads the stop flag before
//!    every `KVM_RUN` and sees it (the kick stores it first);
//! 3. between reading the flag and entering `KVM_RUN`: `immediate_exit` is
//!    already 1 when the signal is sent, so `KVM_RUN` returns EINTR at once;
//! 4. blocked in a userfaultfd fault inside `KVM_RUN`: on this machine's KVM
//!    an ordinary signal does not wake it (DESIGN "Handover modes"); it
//!    returns EINTR as soon as the fault is served, with the faulting
//!    instruction completed. [`RunningVcpus::wait_stopped`] reports such
//!    vCPUs instead of hanging.
//!
//! State consistency: an I/O or MMIO exit is completed by the *next*
//! `KVM_RUN` (KVM advances RIP past an `out` only then). So a vCPU stopped
//! right after such an exit runs once more with `immediate_exit` set, which
//! completes the instruction and returns EINTR without entering the guest;
//! only then is its state fit to save (KVM API documentation, `immediate_exit`).
//!
//! Failure paths: an exit the handler cannot serve ends the loop with a
//! [`VcpuEnd`] saying why (the other vCPUs keep running until kicked); a
//! thread that panics is reported as [`VmmError::ThreadPanicked`] by
//! [`RunningVcpus::join`].

use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Once, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::error::{Result, VmmError};
use crate::state::{CaptureSpec, VcpuState, capture_vcpu, restore_vcpu};

/// What the run loop does after an exit the handler saw.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitAction {
    /// Enter the guest again.
    Continue,
    /// End this vCPU's run ([`VcpuEnd::HandlerStopped`]).
    Stop,
}

/// Serves the exits a guest causes. Called on the vCPU's own thread.
pub trait ExitHandler: Send + Sync {
    /// The guest wrote `data` to I/O port `port`.
    fn port_out(&self, vcpu: u32, port: u16, data: &[u8]) -> ExitAction {
        let _ = (vcpu, port, data);
        ExitAction::Continue
    }

    /// The guest reads I/O port `port`; fill `data`. Unclaimed ports read
    /// all ones, as on a PC bus.
    fn port_in(&self, vcpu: u32, port: u16, data: &mut [u8]) -> ExitAction {
        let _ = (vcpu, port);
        data.fill(0xff);
        ExitAction::Continue
    }

    /// The guest wrote `data` to unbacked guest-physical `address`.
    fn mmio_write(&self, vcpu: u32, address: u64, data: &[u8]) -> ExitAction {
        let _ = (vcpu, address, data);
        ExitAction::Continue
    }

    /// The guest reads unbacked guest-physical `address`; fill `data`.
    fn mmio_read(&self, vcpu: u32, address: u64, data: &mut [u8]) -> ExitAction {
        let _ = (vcpu, address);
        data.fill(0);
        ExitAction::Continue
    }

    /// KVM could not resolve a guest access to `[gpa, gpa + size)`
    /// (`KVM_EXIT_MEMORY_FAULT`). `Continue` retries the access (the handler
    /// made the memory available); `Stop` ends the run with
    /// [`VcpuEnd::MemoryFault`].
    fn memory_fault(&self, vcpu: u32, gpa: u64, size: u64, flags: u64) -> ExitAction {
        let _ = (vcpu, gpa, size, flags);
        ExitAction::Stop
    }
}

/// Why a vCPU's run loop ended.
#[derive(Debug)]
pub enum VcpuEnd {
    /// The host kicked it; its state is complete and may be saved.
    Kicked,
    /// The exit handler returned [`ExitAction::Stop`].
    HandlerStopped,
    /// The guest halted with no in-kernel irqchip to wake it.
    Halted,
    /// `KVM_EXIT_MEMORY_FAULT` the handler did not resolve.
    MemoryFault {
        /// Guest-physical address.
        gpa: u64,
        /// Bytes.
        size: u64,
        /// KVM's flags (bit 3: the access was to private memory).
        flags: u64,
    },
    /// The guest or KVM failed.
    Failed(VmmError),
    /// An armed vCPU was released without ever running (an aborted switch).
    Aborted,
}

/// Exit counters of one vCPU, readable while it runs.
#[derive(Debug, Default)]
pub struct VcpuCounters {
    /// `KVM_RUN` calls.
    pub runs: AtomicU64,
    /// Port I/O exits.
    pub io_exits: AtomicU64,
    /// MMIO exits.
    pub mmio_exits: AtomicU64,
    /// `KVM_RUN` returns with EINTR (kicks and stray signals).
    pub interrupted: AtomicU64,
    /// HLT exits.
    pub halts: AtomicU64,
    /// Memory-fault exits.
    pub memory_faults: AtomicU64,
}

/// A snapshot of [`VcpuCounters`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ExitCounts {
    /// `KVM_RUN` calls.
    pub runs: u64,
    /// Port I/O exits.
    pub io_exits: u64,
    /// MMIO exits.
    pub mmio_exits: u64,
    /// EINTR returns.
    pub interrupted: u64,
    /// HLT exits.
    pub halts: u64,
    /// Memory-fault exits.
    pub memory_faults: u64,
}

impl VcpuCounters {
    /// Reads every counter (each exactly; together a near snapshot).
    pub fn snapshot(&self) -> ExitCounts {
        ExitCounts {
            runs: self.runs.load(Ordering::Relaxed),
            io_exits: self.io_exits.load(Ordering::Relaxed),
            mmio_exits: self.mmio_exits.load(Ordering::Relaxed),
            interrupted: self.interrupted.load(Ordering::Relaxed),
            halts: self.halts.load(Ordering::Relaxed),
            memory_faults: self.memory_faults.load(Ordering::Relaxed),
        }
    }
}

/// The signal that kicks a vCPU thread out of `KVM_RUN`: a real-time signal
/// (queued, never coalesced with another sender's), `SIGRTMIN + 7` to stay
/// clear of the low real-time signals libraries commonly take. Its handler
/// does nothing: the signal only has to be pending.
pub fn kick_signal() -> i32 {
    libc::SIGRTMIN() + 7
}

extern "C" fn ignore_kick(_: libc::c_int) {}

/// Installs the no-op handler for [`kick_signal`], once per process.
fn install_kick_handler() -> Result<()> {
    static INSTALL: Once = Once::new();
    static RESULT: OnceLock<i32> = OnceLock::new();
    INSTALL.call_once(|| {
        // SAFETY: a zeroed sigaction is a valid "no flags, empty mask"
        // value; sa_sigaction holds a plain handler (no SA_SIGINFO). No
        // SA_RESTART: KVM_RUN must return EINTR, not be restarted.
        let errno = unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = ignore_kick as *const () as usize;
            libc::sigemptyset(&mut action.sa_mask);
            if libc::sigaction(kick_signal(), &action, std::ptr::null_mut()) == 0 {
                0
            } else {
                std::io::Error::last_os_error()
                    .raw_os_error()
                    .unwrap_or(libc::EINVAL)
            }
        };
        let _ = RESULT.set(errno);
    });
    match RESULT.get() {
        Some(0) => Ok(()),
        Some(errno) => Err(VmmError::Kvm {
            operation: "sigaction(kick signal)",
            errno: *errno,
        }),
        None => Err(VmmError::Kvm {
            operation: "sigaction(kick signal)",
            errno: libc::EINVAL,
        }),
    }
}

/// This process's own mapping of a vCPU's `kvm_run` page, through which
/// another thread sets `immediate_exit`. A separate mapping (rather than a
/// pointer into the `VcpuFd`'s) stays valid however the `VcpuFd` moves or
/// ends: the mapping holds its own reference to the vCPU file.
#[derive(Debug)]
pub(crate) struct RunPage {
    address: NonNull<libc::c_void>,
    length: usize,
}

// SAFETY: the page is shared memory owned by this object; it is only
// accessed through the atomic byte below.
unsafe impl Send for RunPage {}
// SAFETY: as above; concurrent `immediate_exit` stores are atomic.
unsafe impl Sync for RunPage {}

impl RunPage {
    /// Maps the `kvm_run` page of `vcpu`.
    pub(crate) fn map(vcpu: &VcpuFd, index: u32, run_size: usize) -> Result<Self> {
        // SAFETY: a fresh shared mapping of the vCPU fd at offset 0 (the
        // kvm_run structure), at an address the kernel chooses; Drop unmaps it.
        let address = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                run_size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                vcpu.as_raw_fd(),
                0,
            )
        };
        if address == libc::MAP_FAILED {
            return Err(VmmError::VcpuIoctl {
                operation: "mmap(kvm_run)",
                vcpu: index,
                errno: std::io::Error::last_os_error()
                    .raw_os_error()
                    .unwrap_or(libc::ENOMEM),
            });
        }
        let address = NonNull::new(address).ok_or(VmmError::VcpuIoctl {
            operation: "mmap(kvm_run)",
            vcpu: index,
            errno: libc::ENOMEM,
        })?;
        Ok(Self {
            address,
            length: run_size,
        })
    }

    fn immediate_exit(&self) -> &AtomicU8 {
        let offset = std::mem::offset_of!(kvm_bindings::kvm_run, immediate_exit);
        // SAFETY: the mapping covers the whole kvm_run structure (run_size
        // is at least its size) and lives as long as `self`; the byte is
        // only written through atomics by user space, and KVM only reads it.
        unsafe { AtomicU8::from_ptr(self.address.as_ptr().cast::<u8>().add(offset)) }
    }

    /// Sets or clears `immediate_exit`. SeqCst: the stop flag and this byte
    /// are ordered together (see `Kick::kick` and the loop start).
    pub(crate) fn set_immediate_exit(&self, value: bool) {
        self.immediate_exit()
            .store(u8::from(value), Ordering::SeqCst);
    }
}

impl Drop for RunPage {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping `map` created, once.
        unsafe { libc::munmap(self.address.as_ptr(), self.length) };
    }
}

/// One vCPU: its fd, its index, its counters and its kick path.
#[derive(Debug)]
pub struct Vcpu {
    pub(crate) index: u32,
    pub(crate) fd: VcpuFd,
    pub(crate) run_page: Arc<RunPage>,
    pub(crate) counters: Arc<VcpuCounters>,
}

impl Vcpu {
    /// The vCPU's index (its KVM vCPU id and APIC id).
    pub fn index(&self) -> u32 {
        self.index
    }

    /// The KVM vCPU fd, for ioctls this crate does not wrap.
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// Its exit counters.
    pub fn counters(&self) -> &Arc<VcpuCounters> {
        &self.counters
    }
}

/// Shared between a running vCPU's thread and the host.
#[derive(Debug)]
struct Kick {
    stop: AtomicBool,
    /// Set before a kick: capture the vCPU's state on the way out. Written
    /// before `stop` (SeqCst), read after the loop saw `stop`.
    capture: AtomicBool,
    run_page: Arc<RunPage>,
    first_entry: OnceLock<Instant>,
}

impl Kick {
    /// Order matters (see the module note): flag, then `immediate_exit`,
    /// then the signal. SeqCst on the flag pairs with the SeqCst load at the
    /// top of the run loop, and with the loop's clearing of
    /// `immediate_exit` at thread start, so a clear can never land after
    /// this set unless the loop then sees the flag.
    fn kick(&self, thread: libc::pthread_t) {
        self.stop.store(true, Ordering::SeqCst);
        self.run_page.set_immediate_exit(true);
        // SAFETY: `thread` belongs to a JoinHandle that has not been joined
        // (RunningVcpus joins only after its last kick), so the pthread_t is
        // still valid even if the thread has already returned.
        unsafe { libc::pthread_kill(thread, kick_signal()) };
    }
}

/// How one vCPU's run ended, with when.
#[derive(Debug)]
pub struct VcpuOutcome {
    /// The vCPU, back from its thread.
    pub vcpu: Vcpu,
    /// Why its loop ended.
    pub end: VcpuEnd,
    /// When its loop ended (after the completing run, for a kick).
    pub stopped_at: Instant,
    /// When it first entered `KVM_RUN` in this run.
    pub first_entry: Option<Instant>,
    /// Its state, captured by its own thread right after the stop, when the
    /// stop asked for it ([`RunningVcpus::stop_capturing`]).
    pub state: Option<Result<VcpuState>>,
}

/// An armed thread's answer to a restore: its vCPU index and the result.
type RestoreAck = (u32, Result<()>);

/// What an armed vCPU thread is told to do.
enum Command {
    /// Write this state into the vCPU, then acknowledge.
    Restore(Box<VcpuState>),
    /// Enter the run loop.
    Run,
}

struct VcpuThread {
    index: u32,
    kick: Arc<Kick>,
    handle: JoinHandle<VcpuOutcome>,
    finished: bool,
    /// Present while the thread is armed and waiting for commands.
    commands: Option<Sender<Command>>,
}

/// How the threads start.
#[derive(Clone, Debug)]
pub(crate) struct ThreadOptions {
    /// Wait for commands ([`ArmedVcpus`]) instead of running at once.
    pub(crate) armed: bool,
    /// What a capture on stop reads.
    pub(crate) capture: Option<Arc<CaptureSpec>>,
}

/// vCPUs running on their threads.
pub struct RunningVcpus {
    threads: Vec<VcpuThread>,
    finished: Receiver<u32>,
    joined: bool,
}

impl std::fmt::Debug for RunningVcpus {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("RunningVcpus")
            .field("vcpus", &self.threads.len())
            .finish()
    }
}

impl RunningVcpus {
    /// Starts one thread per vCPU running `handler`'s loop.
    ///
    /// # Errors
    /// - [`VmmError::ThreadSpawn`] (EAGAIN): a thread could not be created;
    ///   the vCPUs already started are kicked and joined first, and all
    ///   vCPUs are lost with this error.
    /// - [`VmmError::Kvm`]: the kick signal's handler could not be installed.
    pub fn start(vcpus: Vec<Vcpu>, handler: Arc<dyn ExitHandler>) -> Result<Self> {
        Self::spawn(
            vcpus,
            handler,
            ThreadOptions {
                armed: false,
                capture: None,
            },
        )
        .map(|(running, _)| running)
    }

    /// Spawns the threads; armed ones wait for commands and also get a
    /// channel to acknowledge restores on.
    pub(crate) fn spawn(
        vcpus: Vec<Vcpu>,
        handler: Arc<dyn ExitHandler>,
        options: ThreadOptions,
    ) -> Result<(Self, Receiver<RestoreAck>)> {
        install_kick_handler()?;
        let (sender, receiver) = std::sync::mpsc::channel();
        let (ack_sender, acks) = std::sync::mpsc::channel();
        let mut running = Self {
            threads: Vec::with_capacity(vcpus.len()),
            finished: receiver,
            joined: false,
        };
        for vcpu in vcpus {
            let index = vcpu.index;
            let kick = Arc::new(Kick {
                stop: AtomicBool::new(false),
                capture: AtomicBool::new(false),
                run_page: Arc::clone(&vcpu.run_page),
                first_entry: OnceLock::new(),
            });
            let thread_kick = Arc::clone(&kick);
            let thread_handler = Arc::clone(&handler);
            let thread_sender: Sender<u32> = sender.clone();
            let capture = options.capture.clone();
            let (commands, orders) = if options.armed {
                let (commands, orders) = std::sync::mpsc::channel();
                (Some(commands), Some(orders))
            } else {
                (None, None)
            };
            let thread_acks = ack_sender.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("vcpu-{index}"))
                .spawn(move || {
                    let outcome = match orders {
                        Some(orders) => await_orders(vcpu, &orders, &thread_acks, &thread_kick),
                        None => Ok(vcpu),
                    };
                    let outcome = match outcome {
                        Ok(vcpu) => run_loop(
                            vcpu,
                            &thread_kick,
                            thread_handler.as_ref(),
                            capture.as_deref(),
                        ),
                        Err(outcome) => outcome,
                    };
                    let _ = thread_sender.send(index);
                    *outcome
                });
            match spawned {
                Ok(handle) => running.threads.push(VcpuThread {
                    index,
                    kick,
                    handle,
                    finished: false,
                    commands,
                }),
                Err(error) => {
                    running.kick();
                    let _ = running.join_all();
                    return Err(VmmError::ThreadSpawn {
                        vcpu: index,
                        errno: error.raw_os_error().unwrap_or(libc::EAGAIN),
                    });
                }
            }
        }
        Ok((running, acks))
    }

    /// Kicks every vCPU that is still running.
    pub fn kick(&mut self) {
        use std::os::unix::thread::JoinHandleExt;
        for thread in &mut self.threads {
            // An armed thread waiting for orders ends when its channel closes.
            thread.commands = None;
            if !thread.finished {
                thread.kick.kick(thread.handle.as_pthread_t());
            }
        }
    }

    /// Kicks every vCPU with a request to capture its state on the way out
    /// (each thread reads its own vCPU, in parallel); the states come back
    /// in the outcomes of [`Self::stop`] or [`Self::join`].
    pub(crate) fn kick_capturing(&mut self) {
        for thread in &self.threads {
            // SeqCst: ordered before the stop flag the kick stores, which
            // the thread reads (SeqCst) before it reads this.
            thread.kick.capture.store(true, Ordering::SeqCst);
        }
        self.kick();
    }

    /// Waits up to `timeout` for every vCPU's loop to end, kicking again
    /// every millisecond (a kick is idempotent). Returns the indices of the
    /// vCPUs still running: on this machine's KVM, those blocked in a
    /// userfaultfd fault that nobody serves.
    pub fn wait_stopped(&mut self, timeout: Duration) -> Vec<u32> {
        self.wait(timeout, true)
    }

    /// Waits up to `timeout` for every vCPU's loop to end by itself (the
    /// guest reported DONE, or failed), without kicking. Returns the vCPUs
    /// still running.
    pub fn wait_finished(&mut self, timeout: Duration) -> Vec<u32> {
        self.wait(timeout, false)
    }

    fn wait(&mut self, timeout: Duration, kick: bool) -> Vec<u32> {
        let deadline = Instant::now() + timeout;
        const REKICK: Duration = Duration::from_millis(1);
        while self.threads.iter().any(|thread| !thread.finished) {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            match self.finished.recv_timeout(REKICK.min(deadline - now)) {
                Ok(index) => self.mark_finished(index),
                Err(RecvTimeoutError::Timeout) => {
                    if kick {
                        self.kick();
                    }
                }
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        while let Ok(index) = self.finished.try_recv() {
            self.mark_finished(index);
        }
        self.threads
            .iter()
            .filter(|thread| !thread.finished)
            .map(|thread| thread.index)
            .collect()
    }

    fn mark_finished(&mut self, index: u32) {
        if let Some(thread) = self.threads.iter_mut().find(|thread| thread.index == index) {
            thread.finished = true;
        }
    }

    /// When each vCPU first entered `KVM_RUN`, by index (None: not yet).
    pub fn first_entries(&self) -> Vec<Option<Instant>> {
        self.threads
            .iter()
            .map(|thread| thread.kick.first_entry.get().copied())
            .collect()
    }

    /// Kicks every vCPU, waits up to `timeout`, and joins them.
    ///
    /// # Errors
    /// - [`VmmError::StopTimeout`] (ETIMEDOUT): some vCPUs did not stop;
    ///   they are still running and `self` is given back so the caller can
    ///   unblock them (serve their faults) and try again.
    pub fn stop(
        mut self,
        timeout: Duration,
    ) -> std::result::Result<Vec<VcpuOutcome>, (Self, VmmError)> {
        self.kick();
        self.finish_stop(timeout)
    }

    /// As [`Self::stop`], with every vCPU's state captured by its own thread.
    ///
    /// # Errors
    /// As [`Self::stop`].
    pub(crate) fn stop_capturing(
        mut self,
        timeout: Duration,
    ) -> std::result::Result<Vec<VcpuOutcome>, (Self, VmmError)> {
        self.kick_capturing();
        self.finish_stop(timeout)
    }

    fn finish_stop(
        mut self,
        timeout: Duration,
    ) -> std::result::Result<Vec<VcpuOutcome>, (Self, VmmError)> {
        let still_running = self.wait_stopped(timeout);
        if !still_running.is_empty() {
            let error = VmmError::StopTimeout {
                vcpus: still_running,
                waited_ms: timeout.as_millis() as u64,
            };
            return Err((self, error));
        }
        self.join_all().map_err(|error| (Self::empty(), error))
    }

    /// Joins every vCPU thread, blocking until each loop has ended (call
    /// [`Self::kick`] or wait for the guest to finish first).
    ///
    /// # Errors
    /// - [`VmmError::ThreadPanicked`]: a vCPU thread panicked; its vCPU is lost.
    pub fn join(mut self) -> Result<Vec<VcpuOutcome>> {
        self.join_all()
    }

    fn join_all(&mut self) -> Result<Vec<VcpuOutcome>> {
        self.joined = true;
        let mut outcomes = Vec::with_capacity(self.threads.len());
        let mut panicked = None;
        for thread in self.threads.drain(..) {
            match thread.handle.join() {
                Ok(outcome) => outcomes.push(outcome),
                Err(_) => panicked = panicked.or(Some(thread.index)),
            }
        }
        match panicked {
            Some(vcpu) => Err(VmmError::ThreadPanicked { vcpu }),
            None => Ok(outcomes),
        }
    }

    /// Releases armed threads without running them and joins them all.
    fn abort(&mut self) {
        for thread in &mut self.threads {
            thread.commands = None;
        }
        let _ = self.join_all();
    }

    fn empty() -> Self {
        let (_, receiver) = std::sync::mpsc::channel();
        Self {
            threads: Vec::new(),
            finished: receiver,
            joined: true,
        }
    }
}

/// vCPU threads spawned ahead and waiting: a successor builds them while
/// the guest still runs elsewhere, then [`ArmedVcpus::restore_and_run`]
/// restores every vCPU in parallel on its own thread and lets them run.
#[derive(Debug)]
pub struct ArmedVcpus {
    running: RunningVcpus,
    acks: Receiver<RestoreAck>,
}

impl ArmedVcpus {
    /// Number of vCPUs.
    pub fn vcpu_count(&self) -> usize {
        self.running.threads.len()
    }

    /// Spawns one waiting thread per vCPU.
    ///
    /// # Errors
    /// As [`RunningVcpus::start`].
    pub(crate) fn spawn(
        vcpus: Vec<Vcpu>,
        handler: Arc<dyn ExitHandler>,
        capture: Option<Arc<CaptureSpec>>,
    ) -> Result<Self> {
        let (running, acks) = RunningVcpus::spawn(
            vcpus,
            handler,
            ThreadOptions {
                armed: true,
                capture,
            },
        )?;
        Ok(Self { running, acks })
    }

    /// Hands every thread its vCPU's state (`states[i]` for the i-th vCPU),
    /// waits until all have restored it, then releases them into the guest.
    /// With `states` None, the vCPUs run with the state they have.
    ///
    /// # Errors
    /// - [`VmmError::StateMismatch`] (EINVAL): the state count differs from the vCPU count.
    /// - the first restore error of any vCPU; then no vCPU has run, the
    ///   threads are released and joined, and the vCPUs are lost with the
    ///   error (the successor is abandoned and the predecessor resumes).
    pub fn restore_and_run(mut self, states: Option<Vec<VcpuState>>) -> Result<RunningVcpus> {
        if let Some(states) = states {
            if states.len() != self.running.threads.len() {
                return Err(VmmError::StateMismatch {
                    reason: format!(
                        "{} vCPU states for {} vCPUs",
                        states.len(),
                        self.running.threads.len()
                    ),
                });
            }
            for (thread, state) in self.running.threads.iter().zip(states) {
                if let Some(commands) = &thread.commands {
                    let _ = commands.send(Command::Restore(Box::new(state)));
                }
            }
            let mut first_error = None;
            for _ in 0..self.running.threads.len() {
                match self.acks.recv() {
                    Ok((_, Ok(()))) => {}
                    Ok((_, Err(error))) => {
                        first_error.get_or_insert(error);
                    }
                    Err(_) => {
                        first_error.get_or_insert(VmmError::ThreadPanicked { vcpu: 0 });
                    }
                }
            }
            if let Some(error) = first_error {
                self.running.abort();
                return Err(error);
            }
        }
        for thread in &mut self.running.threads {
            if let Some(commands) = thread.commands.take() {
                let _ = commands.send(Command::Run);
            }
        }
        Ok(std::mem::replace(&mut self.running, RunningVcpus::empty()))
    }
}

impl Drop for ArmedVcpus {
    /// Dropped without running (a successor that gives up its prebuilt
    /// machine): release the waiting threads and join them, so that
    /// nothing they hold (the exit handler, the vCPU fds) outlives this.
    fn drop(&mut self) {
        if !self.running.joined && !self.running.threads.is_empty() {
            self.running.abort();
        }
    }
}

impl Drop for RunningVcpus {
    /// Dropped without being joined: kick, give the vCPUs a moment, join the
    /// ones that stopped and leave any that are blocked (joining them could
    /// hang forever on an unserved fault); say so.
    fn drop(&mut self) {
        if self.joined || self.threads.is_empty() {
            return;
        }
        self.kick();
        let stuck = self.wait_stopped(Duration::from_secs(1));
        if stuck.is_empty() {
            let _ = self.join_all();
        } else {
            tracing::error!(?stuck, "vCPU threads left running: blocked in KVM_RUN");
        }
    }
}

/// An armed thread: waits for its orders (restore, then run). Returns the
/// vCPU to run, or the outcome to end with when the host closed the channel
/// (aborted, or kicked before the run).
fn await_orders(
    vcpu: Vcpu,
    orders: &Receiver<Command>,
    acks: &Sender<RestoreAck>,
    kick: &Kick,
) -> std::result::Result<Vcpu, Box<VcpuOutcome>> {
    let index = vcpu.index;
    let end = |vcpu, end| {
        Box::new(VcpuOutcome {
            vcpu,
            end,
            stopped_at: Instant::now(),
            first_entry: None,
            state: None,
        })
    };
    loop {
        match orders.recv() {
            Ok(Command::Restore(state)) => {
                let _ = acks.send((index, restore_vcpu(&vcpu.fd, &state)));
            }
            Ok(Command::Run) => return Ok(vcpu),
            Err(_) => {
                let reason = if kick.stop.load(Ordering::SeqCst) {
                    VcpuEnd::Kicked
                } else {
                    VcpuEnd::Aborted
                };
                return Err(end(vcpu, reason));
            }
        }
    }
}

/// The run loop of one vCPU thread.
fn run_loop(
    mut vcpu: Vcpu,
    kick: &Kick,
    handler: &dyn ExitHandler,
    capture: Option<&CaptureSpec>,
) -> Box<VcpuOutcome> {
    // A kick that raced with thread start: clearing first, then reading the
    // flag (both SeqCst, pairing with `Kick::kick`) cannot lose it.
    vcpu.run_page.set_immediate_exit(false);
    let mut needs_completion = false;
    let end = loop {
        if kick.stop.load(Ordering::SeqCst) {
            if needs_completion {
                complete_pending_exit(&mut vcpu);
            }
            break VcpuEnd::Kicked;
        }
        let _ = kick.first_entry.set(Instant::now());
        vcpu.counters.runs.fetch_add(1, Ordering::Relaxed);
        let index = vcpu.index;
        let counters = Arc::clone(&vcpu.counters);
        let exit = vcpu.fd.run();
        needs_completion = matches!(
            exit,
            Ok(VcpuExit::IoIn(..)
                | VcpuExit::IoOut(..)
                | VcpuExit::MmioRead(..)
                | VcpuExit::MmioWrite(..))
        );
        let action = match exit {
            Ok(VcpuExit::IoOut(port, data)) => {
                counters.io_exits.fetch_add(1, Ordering::Relaxed);
                handler.port_out(index, port, data)
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                counters.io_exits.fetch_add(1, Ordering::Relaxed);
                handler.port_in(index, port, data)
            }
            Ok(VcpuExit::MmioWrite(address, data)) => {
                counters.mmio_exits.fetch_add(1, Ordering::Relaxed);
                handler.mmio_write(index, address, data)
            }
            Ok(VcpuExit::MmioRead(address, data)) => {
                counters.mmio_exits.fetch_add(1, Ordering::Relaxed);
                handler.mmio_read(index, address, data)
            }
            Ok(VcpuExit::Hlt) => {
                counters.halts.fetch_add(1, Ordering::Relaxed);
                break VcpuEnd::Halted;
            }
            Ok(VcpuExit::MemoryFault { flags, gpa, size }) => {
                counters.memory_faults.fetch_add(1, Ordering::Relaxed);
                match handler.memory_fault(index, gpa, size, flags) {
                    ExitAction::Continue => ExitAction::Continue,
                    ExitAction::Stop => break VcpuEnd::MemoryFault { gpa, size, flags },
                }
            }
            Ok(VcpuExit::Intr) => {
                counters.interrupted.fetch_add(1, Ordering::Relaxed);
                ExitAction::Continue
            }
            Ok(other) => {
                let mut exit = format!("{other:?}");
                if exit == "InternalError" {
                    // SAFETY: exit_reason is KVM_EXIT_INTERNAL_ERROR, so the
                    // `internal` member of the union is the one KVM filled.
                    let internal = unsafe { vcpu.fd.get_kvm_run().__bindgen_anon_1.internal };
                    let count = (internal.ndata as usize).min(internal.data.len());
                    exit = format!(
                        "InternalError (suberror {}, data {:x?})",
                        internal.suberror,
                        &internal.data[..count]
                    );
                }
                let rip = vcpu.fd.get_regs().map(|regs| regs.rip).unwrap_or(0);
                break VcpuEnd::Failed(VmmError::GuestFailed {
                    vcpu: index,
                    exit,
                    rip,
                });
            }
            Err(error) if error.errno() == libc::EINTR => {
                counters.interrupted.fetch_add(1, Ordering::Relaxed);
                ExitAction::Continue
            }
            Err(error) if error.errno() == libc::EAGAIN => ExitAction::Continue,
            Err(error) => break VcpuEnd::Failed(VmmError::vcpu("KVM_RUN", index, error)),
        };
        if action == ExitAction::Stop {
            if needs_completion {
                vcpu.run_page.set_immediate_exit(true);
                complete_pending_exit(&mut vcpu);
                vcpu.run_page.set_immediate_exit(false);
            }
            break VcpuEnd::HandlerStopped;
        }
    };
    let stopped_at = Instant::now();
    // Capture on the way out when asked: SeqCst pairs with the store in
    // `kick_capturing`, made before the stop flag this loop saw.
    let state = match (&end, capture) {
        (VcpuEnd::Kicked, Some(spec)) if kick.capture.load(Ordering::SeqCst) => {
            Some(capture_vcpu(&vcpu.fd, vcpu.index, spec))
        }
        _ => None,
    };
    Box::new(VcpuOutcome {
        vcpu,
        end,
        stopped_at,
        first_entry: kick.first_entry.get().copied(),
        state,
    })
}

/// Runs once with `immediate_exit` set (the caller set it): KVM completes
/// the pending I/O or MMIO instruction and returns EINTR without entering
/// the guest.
fn complete_pending_exit(vcpu: &mut Vcpu) {
    match vcpu.fd.run() {
        Err(error) if error.errno() == libc::EINTR => {}
        other => tracing::warn!(
            vcpu = vcpu.index,
            result = ?other.map(|exit| format!("{exit:?}")),
            "completing run with immediate_exit did not return EINTR"
        ),
    }
}
