//! The file handlers this crate ships.
//!
//! - [`memfd`]: memfds, with contents, size, position and seals.
//! - [`gmem_data`]: the data layout of the guest-memory-file handler (size,
//!   flags, backend, NUMA policy ranges, populated folios).

pub mod gmem_data;
pub mod memfd;
