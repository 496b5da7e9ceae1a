//! The file handlers this crate ships.
//!
//! - [`gmem`]: guest memory files ([`::gmem::GuestMemFile`]): frozen at
//!   preserve, their page index walked into the record at freeze, rebuilt
//!   with `GuestMemFile::restore`, unfrozen at finish; data layout in
//!   [`gmem_data`] (size, flags, backend, NUMA policy ranges, populated
//!   folios).
//! - [`memfd`]: memfds, with contents, size, position and seals.

pub mod gmem;
pub mod gmem_data;
pub mod memfd;
