//! Guest RAM as a gmem guest memory file, with every first touch served by
//! the fault service.
//!
//! Model: [`Backing`] owns one [`GuestMemFile`] (memfd or hugetlb backend),
//! the [`FaultService`] that registers the file's own mapping with
//! userfaultfd, and the monitor's [`GuestMemory`] view over that same
//! mapping. The KVM memslot is built from the view's host address, so a
//! vCPU's first touch of a page faults the registered mapping and reaches
//! `GuestMemFile::get_folio` (fallocate in the file, recorded in its page
//! index). While the file is frozen (preserved for a live update) such a
//! fault is parked, the vCPU blocked in it, until the file is unfrozen.
//!
//! Invariant: nothing maps or touches the file's pages except through the
//! registered mapping, so the file's page index is exactly the set of pages
//! that exist, which is what a live update hands over.
//!
//! The kvm backend (a KVM guest_memfd) cannot be served (its mapping takes
//! no userfaultfd, and KVM allocates on vCPU faults itself), so a file on it
//! is allocated in full at creation: its index is then complete, and the
//! freeze binds nothing the guest does (gmem's documented limit).
//!
//! Success path of [`Backing::create`]: 1. create the file (MMAP flag, so it
//! can be mapped); 2. start the fault service over it (maps it, registers
//! the mapping, starts the handler thread); 3. wrap the mapping in the
//! vm-memory view. A successor uses [`Backing::adopt`] on the file it
//! retrieved (frozen): steps 2 and 3 only; faults park until its finish.
//! Failure paths: any step's error is returned and what was built is
//! dropped in reverse order.

use std::sync::Arc;
use std::sync::mpsc::Receiver;

use fault_service::{FaultCounters, FaultEvent, FaultService};
use gmem::{Backend, FallocMode, GmemFlags, GuestMemFile};

use crate::error::{Result, VmmError};
use crate::memory::{GmemRam, GuestMemory};

/// Guest RAM on a gmem file; see the module documentation.
pub struct Backing {
    // Field order: the view goes first, then the service (which unregisters
    // the mapping), then the file (which unmaps it).
    memory: Arc<GuestMemory>,
    service: Option<FaultService>,
    events: Option<Receiver<FaultEvent>>,
    file: Arc<GuestMemFile>,
}

impl std::fmt::Debug for Backing {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Backing")
            .field("file", &self.file)
            .field("served", &self.service.is_some())
            .finish_non_exhaustive()
    }
}

fn gmem_error(operation: &'static str) -> impl FnOnce(gmem::GmemError) -> VmmError {
    move |error| VmmError::MemoryFile {
        operation,
        errno: error.errno(),
    }
}

fn service_error(error: fault_service::FaultServiceError) -> VmmError {
    VmmError::MemoryFile {
        operation: "start the fault service",
        errno: error.errno(),
    }
}

impl Backing {
    /// Creates a file of `size` bytes on `backend` and serves it (memfd,
    /// hugetlb), or allocates it in full (kvm).
    ///
    /// # Errors
    /// - [`VmmError::MemoryFile`] with gmem's errno: EINVAL for a size the
    ///   backend refuses (2 MiB multiples on hugetlb), ENOMEM/ENOSPC when
    ///   the hugetlb pool or memory is short, ENOENT/EACCES for the kvm
    ///   backend without /dev/kvm; with the fault service's: EPERM/ENOSYS
    ///   when userfaultfd is unavailable, EMFILE.
    pub fn create(size: u64, backend: Backend) -> Result<Self> {
        let file = GuestMemFile::create(size, GmemFlags::HOST_ACCESSIBLE, backend)
            .map_err(gmem_error("create the guest memory file"))?;
        if backend == Backend::Kvm {
            file.fallocate(FallocMode::ALLOCATE, 0, size as i64)
                .map_err(gmem_error("allocate the kvm guest memory file in full"))?;
        }
        Self::adopt(file)
    }

    /// Serves an existing file: what a successor does with the file it
    /// retrieved (frozen until its finish).
    ///
    /// # Errors
    /// As [`Backing::create`] for mapping the file and starting the service.
    pub fn adopt(file: Arc<GuestMemFile>) -> Result<Self> {
        let (service, events) = if file.backend() == Backend::Kvm {
            (None, None)
        } else {
            let (service, events) =
                FaultService::start([Arc::clone(&file)]).map_err(service_error)?;
            (Some(service), Some(events))
        };
        let ram = GmemRam::new(Arc::clone(&file))?;
        let memory = Arc::new(GuestMemory::new(Arc::new(ram))?);
        Ok(Self {
            memory,
            service,
            events,
            file,
        })
    }

    /// The monitor's view of guest RAM (its host address backs the memslot).
    pub fn memory(&self) -> &Arc<GuestMemory> {
        &self.memory
    }

    /// The guest memory file.
    pub fn file(&self) -> &Arc<GuestMemFile> {
        &self.file
    }

    /// Whether first touches go through the fault service.
    pub fn is_served(&self) -> bool {
        self.service.is_some()
    }

    /// The fault service's counters (all zero without a service).
    pub fn fault_counters(&self) -> FaultCounters {
        self.service
            .as_ref()
            .map(FaultService::counters)
            .unwrap_or_default()
    }

    /// The events the fault service reported since the last call.
    pub fn drain_fault_events(&self) -> Vec<FaultEvent> {
        self.events
            .as_ref()
            .map(|events| events.try_iter().collect())
            .unwrap_or_default()
    }

    /// The guest-physical ranges holding pages (the file's page index, in
    /// order, adjacent folios merged): what a prefault may touch.
    pub fn populated_ranges(&self) -> Vec<std::ops::Range<u64>> {
        populated_ranges(&self.file)
    }
}

/// The byte ranges of `file` that hold folios, from its page index, in
/// order, adjacent folios merged.
pub fn populated_ranges(file: &GuestMemFile) -> Vec<std::ops::Range<u64>> {
    let mut ranges: Vec<std::ops::Range<u64>> = Vec::new();
    for run in file.populated_runs() {
        let start = run.start.byte_offset();
        let end = start + run.count * run.order.bytes();
        match ranges.last_mut() {
            Some(last) if last.end == start => last.end = end,
            _ => ranges.push(start..end),
        }
    }
    ranges
}

/// The number of 4 KiB pages in `ranges`.
pub fn pages_in(ranges: &[std::ops::Range<u64>]) -> u64 {
    ranges
        .iter()
        .map(|range| (range.end - range.start) / gmem::PAGE_SIZE)
        .sum()
}

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestAddress};

    use gmem::PageIndex;

    use super::*;

    #[test]
    fn first_touches_go_through_the_service_and_the_index() {
        let backing = match Backing::create(4 << 20, Backend::Memfd) {
            Ok(backing) => backing,
            Err(error) => {
                test_support::skipped(format_args!("fault service unavailable here: {error}"));
                return;
            }
        };
        assert!(backing.is_served());
        // A store through vm-memory's view is a plain touch of the mapping:
        // the fault service, not the kernel, allocates the page.
        for page in [1u64, 2, 7] {
            backing
                .memory()
                .view()
                .write_obj(0xabu8, GuestAddress(page * 4096 + 5))
                .unwrap();
        }
        assert_eq!(backing.fault_counters().served, 3);
        assert_eq!(
            backing.populated_ranges(),
            vec![4096..3 * 4096, 7 * 4096..8 * 4096]
        );
        assert_eq!(pages_in(&backing.populated_ranges()), 3);
        assert!(backing.file().is_present(PageIndex(7)));
        assert!(!backing.file().is_present(PageIndex(8)));
    }
}
