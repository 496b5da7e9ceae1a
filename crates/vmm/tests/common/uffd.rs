//! A minimal userfaultfd fault server for tests: serves missing-page faults
//! on a shmem mapping with zero pages, or parks them while "frozen".
//! Built on rustix's `userfaultfd` and linux-raw-sys's uapi structs and
//! ioctl numbers (not the `userfaultfd` crate, whose -sys build needs
//! libclang). The real fault service lives in crates/fault-service.
#![allow(dead_code)]

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use linux_raw_sys::general::{
    UFFD_EVENT_PAGEFAULT, UFFD_FEATURE_MISSING_SHMEM, UFFDIO_REGISTER_MODE_MISSING, uffd_msg,
    uffdio_api, uffdio_range, uffdio_register, uffdio_zeropage,
};
use linux_raw_sys::ioctl::{UFFDIO_API, UFFDIO_REGISTER, UFFDIO_ZEROPAGE};

/// Serves or parks the faults of one registered range.
pub struct FaultServer {
    file: Arc<OwnedFd>,
    serving: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    parked: Arc<Mutex<Vec<u64>>>,
    served: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

fn ioctl<T>(fd: i32, request: u32, argument: &mut T) -> std::io::Result<()> {
    // SAFETY: `argument` is the uapi struct `request` expects, alive and
    // writable for the call.
    let result = unsafe { libc::ioctl(fd, request as _, argument as *mut T) };
    if result == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn zero_page(fd: i32, address: u64) -> std::io::Result<()> {
    let mut zero = uffdio_zeropage {
        range: uffdio_range {
            start: address & !4095,
            len: 4096,
        },
        mode: 0,
        zeropage: 0,
    };
    match ioctl(fd, UFFDIO_ZEROPAGE, &mut zero) {
        // EEXIST: another fault on the same page already filled it.
        Err(error) if error.raw_os_error() == Some(libc::EEXIST) => Ok(()),
        other => other,
    }
}

impl FaultServer {
    /// Registers `[start, start + length)` (missing faults) and starts
    /// serving.
    pub fn register(start: u64, length: u64) -> std::io::Result<Self> {
        // SAFETY: userfaultfd has no memory-safety preconditions; the fd is
        // owned by the returned OwnedFd.
        let file = unsafe {
            rustix::mm::userfaultfd(
                rustix::mm::UserfaultfdFlags::CLOEXEC | rustix::mm::UserfaultfdFlags::NONBLOCK,
            )
        }?;
        let fd = file.as_raw_fd();
        let mut api = uffdio_api {
            api: 0xaa, // UFFD_API
            features: u64::from(UFFD_FEATURE_MISSING_SHMEM),
            ioctls: 0,
        };
        ioctl(fd, UFFDIO_API, &mut api)?;
        let mut register = uffdio_register {
            range: uffdio_range { start, len: length },
            mode: u64::from(UFFDIO_REGISTER_MODE_MISSING),
            ioctls: 0,
        };
        ioctl(fd, UFFDIO_REGISTER, &mut register)?;
        let file = Arc::new(file);
        let serving = Arc::new(AtomicBool::new(true));
        let stop = Arc::new(AtomicBool::new(false));
        let parked = Arc::new(Mutex::new(Vec::new()));
        let served = Arc::new(AtomicU64::new(0));
        let thread = {
            let (file, serving, stop, parked, served) = (
                file.clone(),
                serving.clone(),
                stop.clone(),
                parked.clone(),
                served.clone(),
            );
            std::thread::spawn(move || {
                let fd = file.as_raw_fd();
                while !stop.load(Ordering::Acquire) {
                    let mut poll = libc::pollfd {
                        fd,
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    // SAFETY: one valid pollfd.
                    unsafe { libc::poll(&mut poll, 1, 10) };
                    // SAFETY: uffd_msg is plain data; zero is a valid value.
                    let mut message: uffd_msg = unsafe { std::mem::zeroed() };
                    let size = std::mem::size_of::<uffd_msg>();
                    // SAFETY: reads at most one message into `message`.
                    let read =
                        unsafe { libc::read(fd, (&mut message as *mut uffd_msg).cast(), size) };
                    if read != size as isize || u32::from(message.event) != UFFD_EVENT_PAGEFAULT {
                        continue;
                    }
                    // SAFETY: the event is a page fault, so `pagefault` is the union member set.
                    let address = unsafe { message.arg.pagefault.address };
                    if serving.load(Ordering::Acquire) {
                        zero_page(fd, address).expect("UFFDIO_ZEROPAGE");
                        served.fetch_add(1, Ordering::Relaxed);
                    } else {
                        parked.lock().unwrap().push(address);
                    }
                }
            })
        };
        Ok(Self {
            file,
            serving,
            stop,
            parked,
            served,
            thread: Some(thread),
        })
    }

    /// Stops serving: new faults park.
    pub fn freeze(&self) {
        self.serving.store(false, Ordering::Release);
    }

    /// Serves again (new faults only; see [`Self::serve_parked`]).
    pub fn unfreeze(&self) {
        self.serving.store(true, Ordering::Release);
    }

    /// Faults parked so far.
    pub fn parked(&self) -> Vec<u64> {
        self.parked.lock().unwrap().clone()
    }

    /// Serves every parked fault; returns how many.
    pub fn serve_parked(&self) -> usize {
        let parked: Vec<u64> = std::mem::take(&mut *self.parked.lock().unwrap());
        for address in &parked {
            zero_page(self.file.as_raw_fd(), *address).expect("UFFDIO_ZEROPAGE");
        }
        parked.len()
    }

    /// Faults served while not frozen.
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }
}

impl Drop for FaultServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
