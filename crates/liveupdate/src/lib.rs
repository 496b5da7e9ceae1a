//! Linux's Live Update Orchestrator (LUO) in userspace: sessions of
//! preserved files handed from a running VMM process to its successor with
//! zero copy.
//!
//! The VMM process plays the kernel being replaced. It creates named
//! [`Session`]s and preserves files in them under `u64` [`Token`]s; at the
//! handover moment [`LiveUpdate::freeze`] freezes them and builds a
//! [`record::Record`] (checksummed, versioned, little-endian, documented
//! field by field in [`record::wire`]). A transport carries the record and
//! the fds to the successor, which rebuilds [`Incoming`] sessions, retrieves
//! its files and finishes:
//!
//! - [`transport::exec`]: exec in place; the preserved fds survive exec, the
//!   record travels in a sealed memfd named in the environment;
//! - [`transport::transfer`]: a successor started ahead connects to a Unix
//!   socket and receives everything while the old process runs; only what
//!   changed crosses at the switch;
//! - [`luod`]: the `luod` daemon holds sessions for a VMM that exits or dies
//!   until a successor retrieves them.
//!
//! The rules are upstream LUO's, errno for errno (see `DESIGN.md`, "liveupdate:
//! the orchestrator"): every fallible function documents its errnos and
//! every error has [`LuError::errno`].
//!
//! Concurrency: each orchestrator keeps its state behind one mutex and the
//! process-wide set of preserved files behind another; there is no lock-free
//! code in this crate, hence no loom model.
//!
//! ```
//! use liveupdate::{HandlerRegistry, Incoming, LiveUpdate, Token};
//! use liveupdate::handlers::memfd::MemfdFile;
//! use std::os::fd::OwnedFd;
//!
//! // The running VMM preserves a memfd holding its state...
//! let memfd = rustix::fs::memfd_create("vmm-state", rustix::fs::MemfdFlags::CLOEXEC)?;
//! rustix::io::write(&memfd, b"vcpu registers")?;
//! let live_update = LiveUpdate::new(HandlerRegistry::with_builtin_handlers());
//! let session = live_update.create_session("vm0")?;
//! session.preserve(Token(0), &memfd)?;
//!
//! // ...freezes at the handover moment (a transport would carry this)...
//! let handover = live_update.freeze()?;
//! let fds: Vec<OwnedFd> = handover
//!     .fds()
//!     .iter()
//!     .map(|fd| fd.try_clone_to_owned())
//!     .collect::<Result<_, _>>()?;
//! let record = handover.bytes().to_vec();
//! handover.complete();
//!
//! // ...and the successor gets it back.
//! let mut incoming = Incoming::decode(&HandlerRegistry::with_builtin_handlers(), &record, fds)?;
//! let mut vm0 = incoming.retrieve_session("vm0")?;
//! let state = vm0.retrieve(Token(0))?.downcast::<MemfdFile>().unwrap();
//! assert_eq!(state.size(), 14);
//! assert_eq!(state.position(), 14);
//! vm0.finish()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

#[cfg(feature = "bench")]
pub mod bench;
pub mod error;
pub mod fdio;
pub mod handler;
pub mod handlers;
pub mod incoming;
pub mod luod;
pub mod names;
pub mod outgoing;
pub mod preserved;
pub mod record;
pub mod transport;

pub use error::LuError;
pub use handler::{FileHandler, HandlerError, HandlerRegistry, RetrievedFile, RetrievedObject};
pub use incoming::{Incoming, IncomingSession};
pub use names::{Compatible, FileIdentity, SessionName, Token};
pub use outgoing::{Handover, LiveUpdate, Session};
pub use record::{Record, RecordError};
