//! gmem-lu's minimal KVM monitor.
//!
//! It runs a small self-checking guest program ([`guest`]) on 1..N vCPUs
//! ([`vcpu`]) in a KVM VM ([`machine`]) whose RAM is a file ([`memory`]),
//! reached from the host through rust-vmm's `vm-memory`. Its full vCPU and
//! VM state can be saved into a versioned, checksummed byte format that
//! lives in a memfd ([`state`]), so that a successor process maps the same
//! RAM into a new VM, restores the state and resumes the guest: the core of
//! a live update of the monitor.
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

pub mod backing;
pub mod error;
pub mod guest;
pub mod host_cpus;
pub mod layout;
pub mod live;
pub mod machine;
pub mod measure;
pub mod memory;
pub mod parked;
pub mod prefault;
pub mod state;
pub mod time;
pub mod update;
pub mod vcpu;

pub use error::{Result, VmmError};
pub use machine::{Machine, MachineConfig, RunningMachine};
pub use memory::{GmemRam, GuestMemory, GuestRam, MemfdRam};
