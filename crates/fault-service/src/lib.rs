//! The fault service: every first touch of guest memory goes through
//! `gmem::GuestMemFile::get_folio`, and a freeze parks faults instead of
//! losing them. See [`FaultService`] (module `service`) for the protocol and
//! [`uffd`] for the userfaultfd wrapper and what it supports.
//!
//! ```no_run
//! use fault_service::FaultService;
//! use gmem::{Backend, GmemFlags, GuestMemFile};
//!
//! let file = GuestMemFile::create(1 << 20, GmemFlags::HOST_ACCESSIBLE, Backend::Memfd)?;
//! let (service, events) = FaultService::start([file.clone()])?;
//! let base = file.mapping()?.host_address().as_ptr();
//! // SAFETY: inside the file's mapping; the first touch faults into the
//! // service, which allocates the page through get_folio.
//! unsafe { base.add(4096).write(7) };
//! assert_eq!(service.counters().served, 1);
//! # drop(events);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

#[cfg(feature = "bench")]
pub mod bench;
mod service;
pub mod uffd;

pub use service::{FaultCounters, FaultEvent, FaultService, FaultServiceError};
