//! Guest-physical layout and the long-mode environment the host builds.
//!
//! The guest starts directly in 64-bit long mode at CPL 3: the host writes a
//! GDT and identity-mapping page tables (user-accessible) into guest memory
//! and loads the segment and control registers through `KVM_SET_SREGS`, so
//! the guest program has no boot code. User mode because this machine's KVM
//! (PVM, a shadow-paging hypervisor that runs the guest at hardware CPL 3)
//! executes only guest user mode natively: guest supervisor code is
//! emulated instruction by instruction, and its emulator stops at the first
//! SSE instruction. The user segments are Linux's `__USER_DS` (0x2b) and
//! `__USER_CS` (0x33), the pair PVM accepts for 64-bit user mode.
//! Layout (guest-physical):
//!
//! | range | use |
//! | --- | --- |
//! | `0x500` | GDT: null, kernel code and data, TSS (two slots), user data, user code |
//! | `0x1000` | PML4 |
//! | `0x2000` | PDPT |
//! | `0x3000..0x43000` | up to 64 page directories of 2 MiB pages (64 GiB) |
//! | `0x50000..0x70000` | one 4 KiB control block per vCPU (32 at most) |
//! | `0x70000..0x90000` | one 4 KiB stack per vCPU |
//! | `0x100000` | the guest program |
//! | `0x200000..0x600000` | one 128 KiB trace ring per vCPU |
//! | `0x800000..size` | data pages, split evenly between the vCPUs |
//! | `size rounded up to 2 MiB` | the doorbell: mapped by the page tables, backed by no memslot, so a guest access is an MMIO exit |
//!
//! Invariant: every address the host or guest uses below `DATA_BASE` is
//! fixed by this table, so a successor process finds the control blocks and
//! trace rings of a running guest without any other description than the
//! memory size and vCPU count, both recorded in the saved state.

use kvm_bindings::{kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::error::{Result, VmmError};

/// The guest's (and host's) small page size.
pub const PAGE_SIZE: u64 = 4096;
/// Size of one large page in the guest's identity map.
pub const LARGE_PAGE_SIZE: u64 = 2 << 20;
/// One page directory maps this much.
const PAGE_DIRECTORY_SPAN: u64 = 1 << 30;

/// Where the GDT lives.
pub const GDT_ADDRESS: u64 = 0x500;
/// Where the top-level page table lives.
pub const PML4_ADDRESS: u64 = 0x1000;
/// Where the page-directory-pointer table lives.
pub const PDPT_ADDRESS: u64 = 0x2000;
/// Where the first page directory lives; the rest follow contiguously.
pub const PAGE_DIRECTORY_ADDRESS: u64 = 0x3000;
/// Page directories reserved: 64 of them map 64 GiB, the size limit below.
pub const MAX_PAGE_DIRECTORIES: u64 = 64;
/// First control block; vCPU `i`'s is at `CONTROL_BLOCK_BASE + i * PAGE_SIZE`.
pub const CONTROL_BLOCK_BASE: u64 = 0x5_0000;
/// First stack page; vCPU `i`'s stack top is at `STACK_BASE + (i + 1) * PAGE_SIZE`.
pub const STACK_BASE: u64 = 0x7_0000;
/// Where the guest program is loaded and starts.
pub const CODE_ADDRESS: u64 = 0x10_0000;
/// Largest guest program the layout leaves room for (up to the trace rings).
pub const MAX_CODE_BYTES: u64 = TRACE_BASE - CODE_ADDRESS;
/// First trace ring; vCPU `i`'s is at `TRACE_BASE + i * TRACE_RING_BYTES`.
pub const TRACE_BASE: u64 = 0x20_0000;
/// Bytes of one vCPU's trace ring: 8192 entries, at one entry per 256
/// iterations about 1.3 s of a guest at full speed, enough to hold the
/// window before a live update and the recovery after it.
pub const TRACE_RING_BYTES: u64 = 128 << 10;
/// Bytes of one trace entry: (TSC, iterations).
pub const TRACE_ENTRY_BYTES: u64 = 16;
/// Entries in one trace ring (a power of two, the guest masks with it).
pub const TRACE_CAPACITY: u64 = TRACE_RING_BYTES / TRACE_ENTRY_BYTES;
/// First data page.
pub const DATA_BASE: u64 = 0x80_0000;
/// vCPUs the control-block, stack and trace areas have room for.
pub const MAX_VCPUS: u32 = 32;
/// Smallest guest: the fixed areas plus a little data for each vCPU.
pub const MIN_MEMORY_SIZE: u64 = 16 << 20;
/// Largest guest: the page directories map 64 GiB, one large page of which
/// is the doorbell.
pub const MAX_MEMORY_SIZE: u64 = MAX_PAGE_DIRECTORIES * PAGE_DIRECTORY_SPAN - LARGE_PAGE_SIZE;

// The fixed areas must not overlap; checked when the crate compiles.
const _: () = assert!(GDT_ADDRESS + 8 * GDT_ENTRIES as u64 <= PML4_ADDRESS);
const _: () =
    assert!(PAGE_DIRECTORY_ADDRESS + MAX_PAGE_DIRECTORIES * PAGE_SIZE <= CONTROL_BLOCK_BASE);
const _: () = assert!(CONTROL_BLOCK_BASE + MAX_VCPUS as u64 * PAGE_SIZE <= STACK_BASE);
const _: () = assert!(STACK_BASE + MAX_VCPUS as u64 * PAGE_SIZE <= CODE_ADDRESS);
const _: () = assert!(TRACE_BASE + MAX_VCPUS as u64 * TRACE_RING_BYTES <= DATA_BASE);

/// Selector of the user data segment (GDT entry 5, RPL 3): Linux's `__USER_DS`.
const USER_DATA_SELECTOR: u16 = 0x2b;
/// Selector of the 64-bit user code segment (GDT entry 6, RPL 3): Linux's `__USER_CS`.
const USER_CODE_SELECTOR: u16 = 0x33;
/// Selector of the TSS (GDT entries 3 and 4, a 16-byte system descriptor);
/// VM entry needs a usable TR.
const TSS_SELECTOR: u16 = 0x18;
/// Entries in the GDT.
const GDT_ENTRIES: u16 = 7;

/// The layout of one guest, derived from its memory size and vCPU count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestLayout {
    memory_size: u64,
    vcpus: u32,
    pages_per_vcpu: u64,
}

impl GuestLayout {
    /// Computes the layout.
    ///
    /// # Errors
    /// - [`VmmError::InvalidMemorySize`] (EINVAL): `memory_size` is not a
    ///   multiple of 2 MiB, below [`MIN_MEMORY_SIZE`] or above
    ///   [`MAX_MEMORY_SIZE`].
    /// - [`VmmError::InvalidVcpuCount`] (EINVAL): `vcpus` is 0 or above
    ///   [`MAX_VCPUS`].
    pub fn new(memory_size: u64, vcpus: u32) -> Result<Self> {
        let invalid = |reason| VmmError::InvalidMemorySize {
            size: memory_size,
            reason,
        };
        if !memory_size.is_multiple_of(LARGE_PAGE_SIZE) {
            return Err(invalid("not a multiple of 2 MiB"));
        }
        if memory_size < MIN_MEMORY_SIZE {
            return Err(invalid("below the 16 MiB minimum"));
        }
        if memory_size > MAX_MEMORY_SIZE {
            return Err(invalid("above the 64 GiB the guest page tables map"));
        }
        if vcpus == 0 || vcpus > MAX_VCPUS {
            return Err(VmmError::InvalidVcpuCount {
                requested: vcpus,
                maximum: MAX_VCPUS,
            });
        }
        let pages_per_vcpu = (memory_size - DATA_BASE) / PAGE_SIZE / u64::from(vcpus);
        Ok(Self {
            memory_size,
            vcpus,
            pages_per_vcpu,
        })
    }

    /// Guest memory size in bytes.
    pub fn memory_size(&self) -> u64 {
        self.memory_size
    }

    /// Number of vCPUs.
    pub fn vcpus(&self) -> u32 {
        self.vcpus
    }

    /// Data pages each vCPU walks.
    pub fn pages_per_vcpu(&self) -> u64 {
        self.pages_per_vcpu
    }

    /// First data page of vCPU `vcpu`'s partition.
    pub fn data_base(&self, vcpu: u32) -> u64 {
        DATA_BASE + u64::from(vcpu) * self.pages_per_vcpu * PAGE_SIZE
    }

    /// vCPU `vcpu`'s control block.
    pub fn control_block(&self, vcpu: u32) -> u64 {
        CONTROL_BLOCK_BASE + u64::from(vcpu) * PAGE_SIZE
    }

    /// vCPU `vcpu`'s initial stack pointer.
    pub fn stack_top(&self, vcpu: u32) -> u64 {
        STACK_BASE + (u64::from(vcpu) + 1) * PAGE_SIZE
    }

    /// vCPU `vcpu`'s trace ring.
    pub fn trace_ring(&self, vcpu: u32) -> u64 {
        TRACE_BASE + u64::from(vcpu) * TRACE_RING_BYTES
    }

    /// The MMIO doorbell: the first 2 MiB boundary at or past the end of RAM.
    pub fn doorbell(&self) -> u64 {
        self.memory_size
    }

    /// Page directories needed to map RAM and the doorbell.
    fn page_directories(&self) -> u64 {
        (self.memory_size + LARGE_PAGE_SIZE).div_ceil(PAGE_DIRECTORY_SPAN)
    }

    /// Writes the GDT and the identity-map page tables into guest memory.
    ///
    /// # Errors
    /// - [`VmmError::GuestMemory`] (EFAULT): a write fell outside `memory`
    ///   (the memory is smaller than this layout).
    pub fn write_boot_tables(&self, memory: &GuestMemoryMmap) -> Result<()> {
        let gdt: [u64; GDT_ENTRIES as usize] = [
            0,
            0x00af_9b00_0000_ffff, // kernel code: present, ring 0, execute/read, long mode
            0x00cf_9300_0000_ffff, // kernel data: present, ring 0, read/write
            0x0000_8b00_0000_0067, // TSS low half: present, busy 64-bit TSS at 0 (never used)
            0,                     // TSS high half: base bits 63:32
            0x00cf_f300_0000_ffff, // user data: present, ring 3, read/write
            0x00af_fb00_0000_ffff, // user code: present, ring 3, execute/read, long mode
        ];
        write_object(memory, GDT_ADDRESS, gdt)?;
        // Present, writable, user: the guest runs at CPL 3.
        const PRESENT_WRITABLE: u64 = 0b111;
        const LARGE: u64 = 1 << 7;
        write_object(memory, PML4_ADDRESS, PDPT_ADDRESS | PRESENT_WRITABLE)?;
        let mut large_page = 0u64;
        for directory in 0..self.page_directories() {
            let directory_address = PAGE_DIRECTORY_ADDRESS + directory * PAGE_SIZE;
            write_object(
                memory,
                PDPT_ADDRESS + directory * 8,
                directory_address | PRESENT_WRITABLE,
            )?;
            let mut entries = Vec::with_capacity(PAGE_SIZE as usize);
            for _ in 0..512 {
                entries.extend_from_slice(&(large_page | PRESENT_WRITABLE | LARGE).to_le_bytes());
                large_page += LARGE_PAGE_SIZE;
            }
            write_bytes(memory, directory_address, &entries)?;
        }
        Ok(())
    }
}

/// Writes one plain value into guest memory.
pub(crate) fn write_object<T: vm_memory::ByteValued>(
    memory: &GuestMemoryMmap,
    address: u64,
    value: T,
) -> Result<()> {
    memory
        .write_obj(value, GuestAddress(address))
        .map_err(|error| VmmError::GuestMemory {
            address,
            reason: error.to_string(),
        })
}

/// Writes bytes into guest memory.
pub(crate) fn write_bytes(memory: &GuestMemoryMmap, address: u64, bytes: &[u8]) -> Result<()> {
    memory
        .write_slice(bytes, GuestAddress(address))
        .map_err(|error| VmmError::GuestMemory {
            address,
            reason: error.to_string(),
        })
}

/// Reads bytes from guest memory.
pub(crate) fn read_bytes(memory: &GuestMemoryMmap, address: u64, bytes: &mut [u8]) -> Result<()> {
    memory
        .read_slice(bytes, GuestAddress(address))
        .map_err(|error| VmmError::GuestMemory {
            address,
            reason: error.to_string(),
        })
}

/// Reads one plain value from guest memory.
pub(crate) fn read_object<T: vm_memory::ByteValued>(
    memory: &GuestMemoryMmap,
    address: u64,
) -> Result<T> {
    memory
        .read_obj(GuestAddress(address))
        .map_err(|error| VmmError::GuestMemory {
            address,
            reason: error.to_string(),
        })
}

/// Control register bits the guest runs with.
mod control {
    pub const CR0_PE: u64 = 1 << 0;
    pub const CR0_MP: u64 = 1 << 1;
    pub const CR0_ET: u64 = 1 << 4;
    pub const CR0_NE: u64 = 1 << 5;
    pub const CR0_WP: u64 = 1 << 16;
    pub const CR0_PG: u64 = 1 << 31;
    pub const CR4_PAE: u64 = 1 << 5;
    pub const CR4_OSFXSR: u64 = 1 << 9;
    pub const CR4_OSXMMEXCPT: u64 = 1 << 10;
    pub const CR4_OSXSAVE: u64 = 1 << 18;
    pub const EFER_LME: u64 = 1 << 8;
    pub const EFER_LMA: u64 = 1 << 10;
}

/// Puts `sregs` into flat 64-bit long mode at CPL 3 with the layout's page
/// tables. `xsave` sets CR4.OSXSAVE so that AVX instructions work once the
/// host has loaded XCR0.
pub fn set_long_mode(sregs: &mut kvm_sregs, xsave: bool) {
    use control::*;
    let code = kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: USER_CODE_SELECTOR,
        type_: 0xb, // execute/read, accessed
        present: 1,
        dpl: 3,
        db: 0,
        s: 1,
        l: 1,
        g: 1,
        ..Default::default()
    };
    let data = kvm_segment {
        selector: USER_DATA_SELECTOR,
        type_: 0x3, // read/write, accessed
        db: 1,
        l: 0,
        ..code
    };
    let tss = kvm_segment {
        base: 0,
        limit: 0x67,
        selector: TSS_SELECTOR,
        type_: 0xb, // busy 64-bit TSS
        present: 1,
        s: 0,
        g: 0,
        ..Default::default()
    };
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.gdt.base = GDT_ADDRESS;
    sregs.gdt.limit = GDT_ENTRIES * 8 - 1;
    // No LDT (PVM supports none).
    sregs.ldt = kvm_segment {
        unusable: 1,
        ..Default::default()
    };
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cr3 = PML4_ADDRESS;
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT | if xsave { CR4_OSXSAVE } else { 0 };
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
    sregs.efer = EFER_LME | EFER_LMA;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_refuses_bad_sizes_and_counts() {
        assert!(matches!(
            GuestLayout::new(MIN_MEMORY_SIZE + PAGE_SIZE, 1),
            Err(VmmError::InvalidMemorySize { .. })
        ));
        assert!(matches!(
            GuestLayout::new(MIN_MEMORY_SIZE - LARGE_PAGE_SIZE, 1),
            Err(VmmError::InvalidMemorySize { .. })
        ));
        assert!(matches!(
            GuestLayout::new(MAX_MEMORY_SIZE + LARGE_PAGE_SIZE, 1),
            Err(VmmError::InvalidMemorySize { .. })
        ));
        assert!(matches!(
            GuestLayout::new(MIN_MEMORY_SIZE, 0),
            Err(VmmError::InvalidVcpuCount { .. })
        ));
        assert!(matches!(
            GuestLayout::new(MIN_MEMORY_SIZE, MAX_VCPUS + 1),
            Err(VmmError::InvalidVcpuCount { .. })
        ));
        assert!(GuestLayout::new(MAX_MEMORY_SIZE, MAX_VCPUS).is_ok());
    }

    #[test]
    fn partitions_stay_inside_memory_and_do_not_overlap() {
        for (size, vcpus) in [(MIN_MEMORY_SIZE, 1), (64 << 20, 3), (1 << 30, 32)] {
            let layout = GuestLayout::new(size, vcpus).unwrap();
            assert!(layout.pages_per_vcpu() > 0);
            for vcpu in 1..vcpus {
                assert_eq!(
                    layout.data_base(vcpu),
                    layout.data_base(vcpu - 1) + layout.pages_per_vcpu() * PAGE_SIZE
                );
            }
            let end = layout.data_base(vcpus - 1) + layout.pages_per_vcpu() * PAGE_SIZE;
            assert!(end <= size, "{size} {vcpus}: partitions end at {end:#x}");
            assert!(layout.trace_ring(vcpus - 1) + TRACE_RING_BYTES <= DATA_BASE);
            assert!(layout.stack_top(MAX_VCPUS - 1) <= CODE_ADDRESS);
            assert!(layout.control_block(MAX_VCPUS - 1) < STACK_BASE);
        }
    }

    #[test]
    fn page_tables_cover_the_doorbell() {
        let layout = GuestLayout::new(MAX_MEMORY_SIZE, 1).unwrap();
        assert_eq!(layout.page_directories(), MAX_PAGE_DIRECTORIES);
        let layout = GuestLayout::new(1 << 30, 1).unwrap();
        // 1 GiB of RAM plus the doorbell's large page needs a second directory.
        assert_eq!(layout.page_directories(), 2);
    }
}
