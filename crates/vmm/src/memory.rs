//! Guest RAM: one file, mapped once into this process, seen through
//! rust-vmm's `vm-memory`.
//!
//! Model: guest RAM is a file (a memfd today, a gmem guest memory file when
//! that crate is used) so that it can outlive the process that created it: a
//! live update hands the file to the successor, which maps it again. The
//! monitor reaches RAM through one shared mapping of the whole file; that
//! same mapping backs the KVM memslot and the `vm_memory::GuestMemoryMmap`
//! the monitor reads and writes through, so a userfaultfd registered on it
//! sees every first touch, by a vCPU or by the monitor.
//!
//! Invariant: a [`GuestRam`]'s mapping stays valid, shared and writable for
//! as long as the object lives; [`GuestMemory`] keeps the object alive for as
//! long as its `GuestMemoryMmap` (and any memslot built from it) is in use.

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::Arc;

use rustix::fs::{MemfdFlags, SealFlags};
use rustix::mm::{Advice, MapFlags, ProtFlags};
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

use crate::error::{Result, VmmError};
use crate::layout::PAGE_SIZE;

/// Guest RAM backed by a file and mapped into this process.
///
/// # Safety
/// An implementation guarantees that `host_address()` is the start of a
/// `MAP_SHARED`, readable and writable mapping of `file()` from offset 0
/// covering `size()` bytes, valid until the object is dropped, and that
/// neither `host_address()` nor `size()` ever changes.
pub unsafe trait GuestRam: Send + Sync + std::fmt::Debug {
    /// The file holding guest RAM.
    fn file(&self) -> BorrowedFd<'_>;
    /// Bytes of guest RAM (the file's size).
    fn size(&self) -> u64;
    /// Start of this process's mapping of the whole file.
    fn host_address(&self) -> NonNull<u8>;
    /// Bytes of one page (folio) of the file: KVM maps at most this much
    /// per fault.
    fn page_size(&self) -> u64 {
        PAGE_SIZE
    }
}

/// The ranges of `ram`'s file that hold pages (`SEEK_DATA`/`SEEK_HOLE`,
/// which shmem and hugetlbfs answer from their page cache), in order.
///
/// # Errors
/// - [`VmmError::MemoryFile`]: `lseek` failed (ENXIO past the last page is
///   the normal end and not an error).
pub fn populated_ranges(ram: &dyn GuestRam) -> Result<Vec<std::ops::Range<u64>>> {
    use rustix::fs::SeekFrom;
    let mut ranges = Vec::new();
    let mut offset = 0u64;
    let size = ram.size();
    while offset < size {
        let data = match rustix::fs::seek(ram.file(), SeekFrom::Data(offset)) {
            Ok(data) => data,
            Err(rustix::io::Errno::NXIO) => break,
            Err(errno) => return Err(VmmError::memory_file("lseek(SEEK_DATA)", errno)),
        };
        let hole = rustix::fs::seek(ram.file(), SeekFrom::Hole(data))
            .map_err(|errno| VmmError::memory_file("lseek(SEEK_HOLE)", errno))?;
        ranges.push(data..hole.min(size));
        offset = hole;
    }
    Ok(ranges)
}

/// Guest RAM in a plain memfd (shmem), mapped shared.
#[derive(Debug)]
pub struct MemfdRam {
    file: OwnedFd,
    size: u64,
    mapping: NonNull<u8>,
    page_size: u64,
}

// SAFETY: the mapping is shared memory owned by this object; moving the
// owner between threads moves nothing the mapping depends on.
unsafe impl Send for MemfdRam {}
// SAFETY: the object hands out only the address; all access to guest bytes
// goes through vm-memory's volatile accessors or KVM, which tolerate
// concurrent writers (the guest itself is one).
unsafe impl Sync for MemfdRam {}

impl MemfdRam {
    /// Creates a memfd of `size` bytes (close-on-exec; a live update clears
    /// that flag on the fds it hands over) and maps it.
    ///
    /// # Errors
    /// - [`VmmError::InvalidMemorySize`] (EINVAL): `size` is 0 or not a
    ///   multiple of the page size.
    /// - [`VmmError::MemoryFile`]: `memfd_create` (EMFILE, ENOMEM),
    ///   `ftruncate` (EFBIG, ENOSPC) or `mmap` (ENOMEM) failed.
    pub fn create(size: u64) -> Result<Self> {
        Self::create_with_pages(size, PageSize::Small)
    }

    /// As [`Self::create`], backed by `pages`. With [`PageSize::Huge2M`] the
    /// memfd is hugetlbfs (`MFD_HUGETLB | MFD_HUGE_2MB`): every 2 MiB of
    /// guest memory is one folio, so KVM maps it with one fault instead of
    /// 512. The pages come from the hugetlb pool (`/proc/sys/vm/nr_hugepages`).
    ///
    /// # Errors
    /// As [`Self::create`]; also EINVAL for a size that is not a multiple
    /// of the page size, and ENOMEM from `mmap` or on first touch when the
    /// pool is too small.
    pub fn create_with_pages(size: u64, pages: PageSize) -> Result<Self> {
        check_size(size)?;
        let mut flags = MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING;
        if pages == PageSize::Huge2M {
            if !size.is_multiple_of(HUGE_PAGE_SIZE) {
                return Err(VmmError::InvalidMemorySize {
                    size,
                    reason: "not a multiple of the 2 MiB huge page size",
                });
            }
            flags |= MemfdFlags::HUGETLB | MemfdFlags::HUGE_2MB;
        }
        let file = rustix::fs::memfd_create("gmem-lu-guest-ram", flags)
            .map_err(|errno| VmmError::memory_file("memfd_create", errno))?;
        rustix::fs::ftruncate(&file, size)
            .map_err(|errno| VmmError::memory_file("ftruncate", errno))?;
        // The size is the guest's contract; sealing it stops anyone holding
        // the fd from shrinking RAM under a running guest.
        rustix::fs::fcntl_add_seals(&file, SealFlags::SHRINK | SealFlags::GROW)
            .map_err(|errno| VmmError::memory_file("F_ADD_SEALS", errno))?;
        Self::map(file, size)
    }

    /// Maps an existing memory file, as a successor does with the fd it was
    /// handed. The size is the file's.
    ///
    /// # Errors
    /// - [`VmmError::MemoryFile`]: `fstat` (EBADF) or `mmap` (ENODEV for a
    ///   file that cannot be mapped, ENOMEM) failed.
    /// - [`VmmError::InvalidMemorySize`] (EINVAL): the file is empty or not
    ///   page-sized.
    pub fn from_file(file: OwnedFd) -> Result<Self> {
        let stat =
            rustix::fs::fstat(&file).map_err(|errno| VmmError::memory_file("fstat", errno))?;
        let size = u64::try_from(stat.st_size).map_err(|_| VmmError::InvalidMemorySize {
            size: 0,
            reason: "the file reports a negative size",
        })?;
        check_size(size)?;
        Self::map(file, size)
    }

    fn map(file: OwnedFd, size: u64) -> Result<Self> {
        let length = usize::try_from(size).map_err(|_| VmmError::InvalidMemorySize {
            size,
            reason: "larger than the address space",
        })?;
        // SAFETY: a fresh mapping chosen by the kernel (no MAP_FIXED), so no
        // existing memory is replaced; the file outlives the mapping because
        // Drop unmaps before the OwnedFd closes.
        let address = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                length,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED,
                &file,
                0,
            )
        }
        .map_err(|errno| VmmError::memory_file("mmap", errno))?;
        let mapping = NonNull::new(address.cast::<u8>()).ok_or(VmmError::MemoryFile {
            operation: "mmap",
            errno: libc::ENOMEM,
        })?;
        // hugetlbfs reports its page size as the file's block size.
        let page_size = rustix::fs::fstat(&file)
            .map(|stat| stat.st_blksize as u64)
            .unwrap_or(PAGE_SIZE)
            .max(PAGE_SIZE);
        Ok(Self {
            file,
            size,
            mapping,
            page_size,
        })
    }

    /// Populates this process's page tables for `[offset, offset + length)`
    /// of the mapping without changing the contents (`MADV_POPULATE_WRITE`):
    /// pages already in the file are mapped, missing ones are allocated.
    /// A successor uses it on memory the guest has touched, so that KVM's
    /// first access to each page after the switch does not also take a host
    /// page fault.
    ///
    /// # Errors
    /// - [`VmmError::InvalidMemorySize`] (EINVAL): the range is not
    ///   page-aligned or leaves the file.
    /// - [`VmmError::MemoryFile`]: `madvise` failed (EINVAL before Linux 5.14,
    ///   ENOMEM, EFAULT).
    pub fn populate(&self, offset: u64, length: u64) -> Result<()> {
        populate_mapping(self, offset, length)
    }
}

/// Bytes of a 2 MiB huge page.
pub const HUGE_PAGE_SIZE: u64 = 2 << 20;

/// The page size backing guest memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PageSize {
    /// 4 KiB shmem pages.
    #[default]
    Small,
    /// 2 MiB hugetlb pages.
    Huge2M,
}

fn check_size(size: u64) -> Result<()> {
    if size == 0 || !size.is_multiple_of(PAGE_SIZE) {
        return Err(VmmError::InvalidMemorySize {
            size,
            reason: "zero or not a multiple of the 4 KiB page size",
        });
    }
    Ok(())
}

/// `MADV_POPULATE_WRITE` over part of any [`GuestRam`]'s mapping.
///
/// # Errors
/// As [`MemfdRam::populate`].
pub fn populate_mapping(ram: &dyn GuestRam, offset: u64, length: u64) -> Result<()> {
    let in_range = offset
        .checked_add(length)
        .is_some_and(|end| end <= ram.size());
    if !in_range || !offset.is_multiple_of(PAGE_SIZE) || !length.is_multiple_of(PAGE_SIZE) {
        return Err(VmmError::InvalidMemorySize {
            size: length,
            reason: "populate range not page-aligned or outside guest memory",
        });
    }
    if length == 0 {
        return Ok(());
    }
    // The range lies inside the mapping (checked above), so both conversions
    // are lossless: the mapping's size fits in usize.
    let start = ram.host_address().as_ptr().wrapping_add(offset as usize);
    // SAFETY: [start, start + length) lies inside the shared mapping the
    // GuestRam contract keeps valid; MADV_POPULATE_WRITE only faults pages in
    // and never changes their contents.
    unsafe { rustix::mm::madvise(start.cast(), length as usize, Advice::LinuxPopulateWrite) }
        .map_err(|errno| VmmError::memory_file("madvise(MADV_POPULATE_WRITE)", errno))
}

// SAFETY: `map` established a MAP_SHARED read/write mapping of `file` from
// offset 0 covering `size` bytes; neither field changes after construction
// and Drop is the only place that unmaps.
unsafe impl GuestRam for MemfdRam {
    fn file(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn host_address(&self) -> NonNull<u8> {
        self.mapping
    }

    fn page_size(&self) -> u64 {
        self.page_size
    }
}

impl Drop for MemfdRam {
    fn drop(&mut self) {
        // SAFETY: the mapping was created by `map` with this length and is
        // unmapped only here; the GuestMemory holding this object (and thus
        // any memslot or vm-memory view of it) is gone by now.
        let result =
            unsafe { rustix::mm::munmap(self.mapping.as_ptr().cast(), self.size as usize) };
        if let Err(errno) = result {
            tracing::error!(%errno, "munmap of guest RAM failed");
        }
    }
}

/// Guest RAM in a gmem [`gmem::GuestMemFile`]: the file and its own host
/// mapping (which the fault service registers with userfaultfd).
///
/// Without a fault service, guest touches allocate pages in the file behind
/// the file's back (its index does not see them); populate the file first
/// (`fallocate`) or run the fault service.
#[derive(Debug)]
pub struct GmemRam {
    file: std::sync::Arc<gmem::GuestMemFile>,
    address: NonNull<u8>,
    size: u64,
}

// SAFETY: as MemfdRam: the file object is shared (Arc, Send + Sync) and the
// address only names its mapping.
unsafe impl Send for GmemRam {}
// SAFETY: as above.
unsafe impl Sync for GmemRam {}

impl GmemRam {
    /// Wraps `file`, mapping it (once, for the file's lifetime).
    ///
    /// # Errors
    /// - [`VmmError::MemoryFile`]: the file cannot be mapped (ENODEV without
    ///   GUEST_MEMFD_FLAG_MMAP, or a private kvm guest_memfd; ENOMEM).
    pub fn new(file: std::sync::Arc<gmem::GuestMemFile>) -> Result<Self> {
        let mapping = file.mapping().map_err(|error| VmmError::MemoryFile {
            operation: "map the guest memory file",
            errno: error.errno(),
        })?;
        let address = mapping.host_address();
        let size = file.size();
        Ok(Self {
            file,
            address,
            size,
        })
    }

    /// The gmem file.
    pub fn file_object(&self) -> &std::sync::Arc<gmem::GuestMemFile> {
        &self.file
    }
}

// SAFETY: gmem maps the whole file once, MAP_SHARED and read/write, and
// unmaps it only when the GuestMemFile drops, which `self.file` prevents
// while this object lives; the size is fixed at creation.
unsafe impl GuestRam for GmemRam {
    fn file(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn host_address(&self) -> NonNull<u8> {
        self.address
    }

    fn page_size(&self) -> u64 {
        self.file.folio_size()
    }
}

/// The monitor's view of guest RAM: the RAM object plus a
/// `vm_memory::GuestMemoryMmap` over the same mapping, guest-physical
/// address 0 at file offset 0.
#[derive(Debug)]
pub struct GuestMemory {
    // Field order matters: `view` refers into `ram`'s mapping and is dropped first.
    view: GuestMemoryMmap,
    ram: Arc<dyn GuestRam>,
}

impl GuestMemory {
    /// Wraps `ram` in a vm-memory view.
    ///
    /// # Errors
    /// - [`VmmError::MemoryFile`]: duplicating the file descriptor for the
    ///   region's `FileOffset` failed (EMFILE).
    /// - [`VmmError::GuestMemory`]: vm-memory refused the region.
    pub fn new(ram: Arc<dyn GuestRam>) -> Result<Self> {
        let size = usize::try_from(ram.size()).map_err(|_| VmmError::InvalidMemorySize {
            size: ram.size(),
            reason: "larger than the address space",
        })?;
        let file =
            File::from(
                ram.file()
                    .try_clone_to_owned()
                    .map_err(|error| VmmError::MemoryFile {
                        operation: "dup",
                        errno: error.raw_os_error().unwrap_or(libc::EMFILE),
                    })?,
            );
        let refused = |reason: String| VmmError::GuestMemory { address: 0, reason };
        // SAFETY: the GuestRam contract makes host_address a valid shared
        // mapping of `size` bytes for as long as `ram` lives, and `self.ram`
        // outlives `self.view` (field order), so the region never dangles.
        let builder = unsafe {
            vm_memory::mmap::MmapRegionBuilder::new(size)
                .with_raw_mmap_pointer(ram.host_address().as_ptr())
        };
        let region: MmapRegion = builder
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_SHARED)
            .with_file_offset(FileOffset::new(file, 0))
            .build()
            .map_err(|error| refused(error.to_string()))?;
        let region = GuestRegionMmap::new(region, GuestAddress(0))
            .ok_or_else(|| refused("region wraps the address space".into()))?;
        let view = GuestMemoryMmap::from_regions(vec![region])
            .map_err(|error| refused(error.to_string()))?;
        Ok(Self { view, ram })
    }

    /// The vm-memory view, for `Bytes` reads and writes at guest addresses.
    pub fn view(&self) -> &GuestMemoryMmap {
        &self.view
    }

    /// The RAM object (its fd is what a live update hands over).
    pub fn ram(&self) -> &Arc<dyn GuestRam> {
        &self.ram
    }

    /// Bytes of guest RAM.
    pub fn size(&self) -> u64 {
        self.ram.size()
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::Bytes;

    use super::*;

    #[test]
    fn memfd_ram_is_shared_between_two_mappings_of_the_file() {
        let ram = MemfdRam::create(1 << 20).unwrap();
        let again = MemfdRam::from_file(ram.file().try_clone_to_owned().unwrap()).unwrap();
        assert_eq!(again.size(), 1 << 20);
        let first = GuestMemory::new(Arc::new(ram)).unwrap();
        let second = GuestMemory::new(Arc::new(again)).unwrap();
        first
            .view()
            .write_obj(0x1234_5678_u64, GuestAddress(0x8_0000))
            .unwrap();
        let seen: u64 = second.view().read_obj(GuestAddress(0x8_0000)).unwrap();
        assert_eq!(seen, 0x1234_5678);
    }

    #[test]
    fn memfd_ram_refuses_bad_sizes_and_stays_sealed() {
        assert!(matches!(
            MemfdRam::create(0),
            Err(VmmError::InvalidMemorySize { .. })
        ));
        assert!(matches!(
            MemfdRam::create(PAGE_SIZE + 1),
            Err(VmmError::InvalidMemorySize { .. })
        ));
        let ram = MemfdRam::create(PAGE_SIZE * 4).unwrap();
        let error = rustix::fs::ftruncate(ram.file(), PAGE_SIZE).unwrap_err();
        assert_eq!(error, rustix::io::Errno::PERM, "size seal missing");
    }

    #[test]
    fn populated_ranges_follow_the_pages_written() {
        let ram = MemfdRam::create(PAGE_SIZE * 64).unwrap();
        assert_eq!(ram.page_size(), PAGE_SIZE);
        assert!(populated_ranges(&ram).unwrap().is_empty());
        let memory = GuestMemory::new(Arc::new(ram)).unwrap();
        for page in [3u64, 4, 5, 40] {
            memory
                .view()
                .write_obj(1u8, GuestAddress(page * PAGE_SIZE + 7))
                .unwrap();
        }
        assert_eq!(
            populated_ranges(memory.ram().as_ref()).unwrap(),
            vec![3 * PAGE_SIZE..6 * PAGE_SIZE, 40 * PAGE_SIZE..41 * PAGE_SIZE]
        );
    }

    #[test]
    fn populate_checks_its_range() {
        let ram = MemfdRam::create(PAGE_SIZE * 4).unwrap();
        ram.populate(0, PAGE_SIZE * 4).unwrap();
        assert!(ram.populate(PAGE_SIZE, PAGE_SIZE * 4).is_err());
        assert!(ram.populate(1, PAGE_SIZE).is_err());
    }

    #[test]
    fn vm_memory_view_refuses_access_past_the_end() {
        let memory = GuestMemory::new(Arc::new(MemfdRam::create(PAGE_SIZE).unwrap())).unwrap();
        assert!(
            memory
                .view()
                .write_obj(1u64, GuestAddress(PAGE_SIZE - 4))
                .is_err()
        );
    }
}
