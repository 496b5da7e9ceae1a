//! What a successor process needs, besides the fd, to rebuild a file.
//!
//! The descriptor is metadata only (size, flags, backend, policy ranges,
//! frozen state); the memory stays in the kernel object, and the list of
//! present folios travels separately (`GuestMemFile::populated`), so
//! preservation copies no guest byte. Serialising it is the live-update
//! layer's business: this is the in-memory form, with public fields.

use std::ops::Range;

use crate::backend::Backend;
use crate::policy::MemPolicy;
use crate::types::{GmemFlags, PageIndex};

/// The metadata of a guest memory file; see the module documentation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GmemDescriptor {
    /// The file size in bytes.
    pub size: u64,
    /// The creation flags.
    pub flags: GmemFlags,
    /// The backend the fd belongs to.
    pub backend: Backend,
    /// The NUMA policy ranges that were set (sorted, non-overlapping; pages
    /// outside them have the default policy).
    pub policies: Vec<(Range<PageIndex>, MemPolicy)>,
    /// Whether the file was frozen when described (a preserved file is, and
    /// comes back frozen until the successor unfreezes it at finish).
    pub frozen: bool,
}
