//! The byte format of a saved [`MachineState`].
//!
//! Layout, little-endian throughout:
//!
//! ```text
//! header (32 bytes)
//!   0  magic        b"GMLUVMST"
//!   8  version      u32 = 1
//!  12  flags        u32 = 0 (no flags defined; any set bit is refused)
//!  16  body length  u64 (at most MAX_BODY_BYTES)
//!  24  body CRC-32  u32 (crc32fast, IEEE)
//!  28  header CRC   u32 (CRC-32 of bytes 0..28)
//! body: sections, each
//!   0  tag          u16
//!   2  reserved     u16 = 0
//!   4  vCPU         u32 (index, or u32::MAX for VM-wide sections)
//!   8  length       u32 (payload bytes)
//!  12  payload, then zero bytes up to the next multiple of 8
//! ```
//!
//! The first section is MACHINE (memory size, vCPU count); every vCPU then
//! has exactly one of each required section. A payload that is a KVM
//! structure is that structure's uapi bytes (`linux/kvm.h`, x86-64): a fixed,
//! little-endian ABI the kernel itself copies in and out, so it is a wire
//! format in its own right. kvm-bindings' zerocopy derives prove at compile
//! time that these types have no padding, so the bytes are fully defined
//! (kvm_fpu, which lacks the derive, is written field by field).
//!
//! Decoding validates everything before building anything: header CRC,
//! version, flags, length bound, exact total length, body CRC, section
//! framing, zero reserved fields and padding, known tags, exact payload
//! lengths, entry-count bounds, vCPU indices in range, no duplicates, no
//! missing sections, and field values with a fixed domain. A bad record is
//! an error naming the problem, never a panic.

use std::os::fd::{BorrowedFd, OwnedFd};

use kvm_bindings::{
    KVM_MAX_CPUID_ENTRIES, kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_fpu, kvm_irqchip,
    kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs,
};
use rustix::fs::{MemfdFlags, SealFlags};
use zerocopy::{FromBytes, IntoBytes};

use super::{MachineState, TscState, VcpuState, VmState, XsaveArea};
use crate::layout::{MAX_VCPUS, PAGE_SIZE};

/// First bytes of every record.
pub const MAGIC: [u8; 8] = *b"GMLUVMST";
/// The format version this code writes and reads.
pub const VERSION: u32 = 1;
/// Header bytes.
pub const HEADER_BYTES: usize = 32;
/// Largest body accepted: 32 vCPUs of about 10 KiB each fit many times
/// over; the bound only stops a corrupt length from allocating gigabytes.
pub const MAX_BODY_BYTES: u64 = 16 << 20;
/// Section header bytes.
const SECTION_HEADER_BYTES: usize = 12;
/// The vCPU field of a VM-wide section.
const MACHINE_WIDE: u32 = u32::MAX;
/// At most this many MSRs per vCPU (KVM lists a few dozen).
const MAX_MSRS: usize = 1024;
/// KVM's largest MP state value (KVM_MP_STATE_SUSPENDED).
const MAX_MP_STATE: u32 = 10;
/// KVM_MAX_XCRS.
const MAX_XCRS: u32 = 16;
/// TSC section flag: the offset field is valid.
const TSC_HAS_OFFSET: u32 = 1;

/// Section tags.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u16)]
enum Tag {
    Machine = 1,
    Clock = 2,
    Irqchip = 3,
    Regs = 10,
    Sregs = 11,
    Fpu = 12,
    Xsave = 13,
    Xcrs = 14,
    DebugRegs = 15,
    Lapic = 16,
    Events = 17,
    MpState = 18,
    Msrs = 19,
    Cpuid = 20,
    Tsc = 21,
}

impl Tag {
    fn from_raw(raw: u16) -> Option<Self> {
        Some(match raw {
            1 => Self::Machine,
            2 => Self::Clock,
            3 => Self::Irqchip,
            10 => Self::Regs,
            11 => Self::Sregs,
            12 => Self::Fpu,
            13 => Self::Xsave,
            14 => Self::Xcrs,
            15 => Self::DebugRegs,
            16 => Self::Lapic,
            17 => Self::Events,
            18 => Self::MpState,
            19 => Self::Msrs,
            20 => Self::Cpuid,
            21 => Self::Tsc,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Self::Machine => "MACHINE",
            Self::Clock => "CLOCK",
            Self::Irqchip => "IRQCHIP",
            Self::Regs => "REGS",
            Self::Sregs => "SREGS",
            Self::Fpu => "FPU",
            Self::Xsave => "XSAVE",
            Self::Xcrs => "XCRS",
            Self::DebugRegs => "DEBUGREGS",
            Self::Lapic => "LAPIC",
            Self::Events => "EVENTS",
            Self::MpState => "MP_STATE",
            Self::Msrs => "MSRS",
            Self::Cpuid => "CPUID",
            Self::Tsc => "TSC",
        }
    }
}

/// Why a saved-state record was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateFormatError {
    /// Shorter than a header.
    #[error("saved state is {length} bytes, shorter than its {HEADER_BYTES}-byte header")]
    TooShort {
        /// Bytes present.
        length: usize,
    },
    /// Not a saved-state record.
    #[error("saved state has the wrong magic: not a gmem-lu machine state record")]
    BadMagic,
    /// Written by another version of the format.
    #[error("saved state is format version {version}; this build reads version {VERSION}")]
    UnsupportedVersion {
        /// The record's version.
        version: u32,
    },
    /// A reserved field or flag is not zero.
    #[error("saved state has reserved field {field} set to {value:#x}")]
    Reserved {
        /// Which field.
        field: &'static str,
        /// Its value.
        value: u64,
    },
    /// The header checksum does not match.
    #[error("saved state header is corrupt (CRC {actual:#010x}, expected {expected:#010x})")]
    HeaderChecksum {
        /// Stored CRC.
        expected: u32,
        /// Computed CRC.
        actual: u32,
    },
    /// The body is longer than any real record.
    #[error("saved state body of {length} bytes exceeds the {MAX_BODY_BYTES}-byte bound")]
    BodyTooLong {
        /// Declared length.
        length: u64,
    },
    /// The declared length differs from the bytes present.
    #[error("saved state declares {declared} body bytes but {actual} follow the header")]
    LengthMismatch {
        /// Declared body length.
        declared: u64,
        /// Bytes after the header.
        actual: u64,
    },
    /// The body checksum does not match.
    #[error("saved state body is corrupt (CRC {actual:#010x}, expected {expected:#010x})")]
    BodyChecksum {
        /// Stored CRC.
        expected: u32,
        /// Computed CRC.
        actual: u32,
    },
    /// A section runs past the end of the body.
    #[error("section at body offset {offset} runs past the end of the saved state")]
    Truncated {
        /// Body offset of the section header.
        offset: usize,
    },
    /// A section tag this version does not know.
    #[error("unknown section tag {tag} at body offset {offset}")]
    UnknownSection {
        /// The tag.
        tag: u16,
        /// Body offset of the section header.
        offset: usize,
    },
    /// The first section is not MACHINE.
    #[error("saved state does not start with its MACHINE section")]
    MachineNotFirst,
    /// A payload has the wrong length.
    #[error("section {section} has {length} bytes; expected {expected}")]
    SectionLength {
        /// The section.
        section: &'static str,
        /// Its length.
        length: usize,
        /// What it should be (for lists: the entry size it must be a multiple of).
        expected: usize,
    },
    /// A section names a vCPU out of range (or a VM-wide section a vCPU).
    #[error("section {section} is for vCPU {vcpu}, but the machine has {vcpus}")]
    VcpuOutOfRange {
        /// The section.
        section: &'static str,
        /// Its vCPU field.
        vcpu: u32,
        /// vCPUs in the machine.
        vcpus: u32,
    },
    /// A section appears twice.
    #[error("section {section} appears twice for vCPU {vcpu}")]
    Duplicate {
        /// The section.
        section: &'static str,
        /// Its vCPU (u32::MAX: VM-wide).
        vcpu: u32,
    },
    /// A required section is missing.
    #[error("section {section} is missing for vCPU {vcpu}")]
    Missing {
        /// The section.
        section: &'static str,
        /// Its vCPU (u32::MAX: VM-wide).
        vcpu: u32,
    },
    /// A list has more entries than allowed.
    #[error("section {section} has {count} entries; at most {maximum} are allowed")]
    TooManyEntries {
        /// The section.
        section: &'static str,
        /// Entries present.
        count: usize,
        /// The bound.
        maximum: usize,
    },
    /// A field has a value outside its domain.
    #[error("saved state field {field} has the invalid value {value:#x}")]
    InvalidValue {
        /// Which field.
        field: &'static str,
        /// Its value.
        value: u64,
    },
    /// The record's file could not be read or written.
    #[error("{operation} on the saved-state file failed: {}", crate::error::errno_text(*.errno))]
    Io {
        /// The system call.
        operation: &'static str,
        /// Its errno.
        errno: i32,
    },
}

/// Encodes `state` as a record.
pub fn encode(state: &MachineState) -> Vec<u8> {
    let mut body = Vec::with_capacity(16 << 10);
    let mut machine = Vec::with_capacity(16);
    machine.extend_from_slice(&state.memory_size.to_le_bytes());
    machine.extend_from_slice(&(state.vcpus.len() as u32).to_le_bytes());
    machine.extend_from_slice(&0u32.to_le_bytes());
    push_section(&mut body, Tag::Machine, MACHINE_WIDE, &machine);
    push_section(
        &mut body,
        Tag::Clock,
        MACHINE_WIDE,
        state.vm.clock.as_bytes(),
    );
    for chip in &state.vm.irqchips {
        push_section(&mut body, Tag::Irqchip, MACHINE_WIDE, chip.as_bytes());
    }
    for vcpu in &state.vcpus {
        let index = vcpu.index;
        push_section(&mut body, Tag::MpState, index, vcpu.mp_state.as_bytes());
        push_section(&mut body, Tag::Regs, index, vcpu.regs.as_bytes());
        push_section(&mut body, Tag::Sregs, index, vcpu.sregs.as_bytes());
        push_section(&mut body, Tag::Fpu, index, &encode_fpu(&vcpu.fpu));
        if let Some(xsave) = &vcpu.xsave {
            push_section(&mut body, Tag::Xsave, index, xsave.0.as_bytes());
        }
        if let Some(xcrs) = &vcpu.xcrs {
            push_section(&mut body, Tag::Xcrs, index, xcrs.as_bytes());
        }
        push_section(&mut body, Tag::DebugRegs, index, vcpu.debug_regs.as_bytes());
        push_section(&mut body, Tag::Lapic, index, vcpu.lapic.as_bytes());
        push_section(&mut body, Tag::Events, index, vcpu.events.as_bytes());
        push_section(&mut body, Tag::Msrs, index, vcpu.msrs.as_slice().as_bytes());
        push_section(
            &mut body,
            Tag::Cpuid,
            index,
            vcpu.cpuid.as_slice().as_bytes(),
        );
        push_section(&mut body, Tag::Tsc, index, &encode_tsc(&vcpu.tsc));
    }
    let mut record = Vec::with_capacity(HEADER_BYTES + body.len());
    record.extend_from_slice(&MAGIC);
    record.extend_from_slice(&VERSION.to_le_bytes());
    record.extend_from_slice(&0u32.to_le_bytes());
    record.extend_from_slice(&(body.len() as u64).to_le_bytes());
    record.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    let header_crc = crc32fast::hash(&record);
    record.extend_from_slice(&header_crc.to_le_bytes());
    record.extend_from_slice(&body);
    record
}

fn push_section(body: &mut Vec<u8>, tag: Tag, vcpu: u32, payload: &[u8]) {
    body.extend_from_slice(&(tag as u16).to_le_bytes());
    body.extend_from_slice(&0u16.to_le_bytes());
    body.extend_from_slice(&vcpu.to_le_bytes());
    body.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    body.extend_from_slice(payload);
    body.resize(body.len().next_multiple_of(8), 0);
}

/// kvm_fpu has no zerocopy derive; its uapi layout, field by field.
fn encode_fpu(fpu: &kvm_fpu) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(FPU_BYTES);
    for register in &fpu.fpr {
        bytes.extend_from_slice(register);
    }
    bytes.extend_from_slice(&fpu.fcw.to_le_bytes());
    bytes.extend_from_slice(&fpu.fsw.to_le_bytes());
    bytes.push(fpu.ftwx);
    bytes.push(fpu.pad1);
    bytes.extend_from_slice(&fpu.last_opcode.to_le_bytes());
    bytes.extend_from_slice(&fpu.last_ip.to_le_bytes());
    bytes.extend_from_slice(&fpu.last_dp.to_le_bytes());
    for register in &fpu.xmm {
        bytes.extend_from_slice(register);
    }
    bytes.extend_from_slice(&fpu.mxcsr.to_le_bytes());
    bytes.extend_from_slice(&fpu.pad2.to_le_bytes());
    bytes
}

/// sizeof(struct kvm_fpu).
const FPU_BYTES: usize = 416;
const _: () = assert!(size_of::<kvm_fpu>() == FPU_BYTES);
/// The TSC section's payload bytes.
const TSC_BYTES: usize = 32;
/// The MACHINE section's payload bytes.
const MACHINE_BYTES: usize = 16;

fn encode_tsc(tsc: &TscState) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(TSC_BYTES);
    bytes.extend_from_slice(&tsc.khz.to_le_bytes());
    let flags = if tsc.offset.is_some() {
        TSC_HAS_OFFSET
    } else {
        0
    };
    bytes.extend_from_slice(&flags.to_le_bytes());
    bytes.extend_from_slice(&tsc.offset.unwrap_or(0).to_le_bytes());
    bytes.extend_from_slice(&tsc.guest_tsc.to_le_bytes());
    bytes.extend_from_slice(&tsc.host_tsc.to_le_bytes());
    bytes
}

/// Little-endian field reader over a payload whose length was checked.
struct Fields<'a>(&'a [u8]);

impl Fields<'_> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let (head, rest) = self.0.split_at(N.min(self.0.len()));
        out[..head.len()].copy_from_slice(head);
        self.0 = rest;
        out
    }
    fn u8(&mut self) -> u8 {
        self.take::<1>()[0]
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.take())
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take())
    }
}

fn decode_fpu(payload: &[u8]) -> Result<kvm_fpu, StateFormatError> {
    check_length(Tag::Fpu, payload, FPU_BYTES)?;
    let mut fields = Fields(payload);
    let mut fpu = kvm_fpu::default();
    for register in fpu.fpr.iter_mut() {
        *register = fields.take();
    }
    fpu.fcw = fields.u16();
    fpu.fsw = fields.u16();
    fpu.ftwx = fields.u8();
    fpu.pad1 = fields.u8();
    fpu.last_opcode = fields.u16();
    fpu.last_ip = fields.u64();
    fpu.last_dp = fields.u64();
    for register in fpu.xmm.iter_mut() {
        *register = fields.take();
    }
    fpu.mxcsr = fields.u32();
    fpu.pad2 = fields.u32();
    Ok(fpu)
}

fn decode_tsc(payload: &[u8]) -> Result<TscState, StateFormatError> {
    check_length(Tag::Tsc, payload, TSC_BYTES)?;
    let mut fields = Fields(payload);
    let khz = fields.u32();
    let flags = fields.u32();
    if flags & !TSC_HAS_OFFSET != 0 {
        return Err(StateFormatError::Reserved {
            field: "TSC flags",
            value: u64::from(flags),
        });
    }
    let offset = fields.u64();
    Ok(TscState {
        khz,
        offset: (flags & TSC_HAS_OFFSET != 0).then_some(offset),
        guest_tsc: fields.u64(),
        host_tsc: fields.u64(),
    })
}

fn check_length(tag: Tag, payload: &[u8], expected: usize) -> Result<(), StateFormatError> {
    if payload.len() == expected {
        Ok(())
    } else {
        Err(StateFormatError::SectionLength {
            section: tag.name(),
            length: payload.len(),
            expected,
        })
    }
}

/// One fixed-size KVM structure from its uapi bytes.
fn structure<T: FromBytes>(tag: Tag, payload: &[u8]) -> Result<T, StateFormatError> {
    check_length(tag, payload, size_of::<T>())?;
    T::read_from_bytes(payload).map_err(|_| StateFormatError::SectionLength {
        section: tag.name(),
        length: payload.len(),
        expected: size_of::<T>(),
    })
}

/// A list of fixed-size KVM structures.
fn list<T: FromBytes>(
    tag: Tag,
    payload: &[u8],
    maximum: usize,
) -> Result<Vec<T>, StateFormatError> {
    let size = size_of::<T>();
    if !payload.len().is_multiple_of(size) {
        return Err(StateFormatError::SectionLength {
            section: tag.name(),
            length: payload.len(),
            expected: size,
        });
    }
    let count = payload.len() / size;
    if count > maximum {
        return Err(StateFormatError::TooManyEntries {
            section: tag.name(),
            count,
            maximum,
        });
    }
    payload
        .chunks_exact(size)
        .map(|chunk| structure::<T>(tag, chunk))
        .collect()
}

/// The sections of one vCPU as they are found.
#[derive(Default)]
struct PartialVcpu {
    mp_state: Option<kvm_mp_state>,
    regs: Option<kvm_regs>,
    sregs: Option<kvm_sregs>,
    fpu: Option<kvm_fpu>,
    xsave: Option<XsaveArea>,
    xcrs: Option<kvm_xcrs>,
    debug_regs: Option<kvm_debugregs>,
    lapic: Option<kvm_lapic_state>,
    events: Option<kvm_vcpu_events>,
    msrs: Option<Vec<kvm_msr_entry>>,
    cpuid: Option<Vec<kvm_cpuid_entry2>>,
    tsc: Option<TscState>,
}

/// Stores `value` in `slot`, refusing a second one.
fn once<T>(slot: &mut Option<T>, value: T, tag: Tag, vcpu: u32) -> Result<(), StateFormatError> {
    if slot.is_some() {
        return Err(StateFormatError::Duplicate {
            section: tag.name(),
            vcpu,
        });
    }
    *slot = Some(value);
    Ok(())
}

fn required<T>(slot: Option<T>, tag: Tag, vcpu: u32) -> Result<T, StateFormatError> {
    slot.ok_or(StateFormatError::Missing {
        section: tag.name(),
        vcpu,
    })
}

/// One section as framed in the body.
struct Section<'a> {
    tag: Tag,
    vcpu: u32,
    payload: &'a [u8],
}

/// Splits the body into sections, checking the framing.
fn sections(body: &[u8]) -> Result<Vec<Section<'_>>, StateFormatError> {
    let mut found = Vec::new();
    let mut offset = 0;
    while offset < body.len() {
        let header = body
            .get(offset..offset + SECTION_HEADER_BYTES)
            .ok_or(StateFormatError::Truncated { offset })?;
        let mut fields = Fields(header);
        let raw_tag = fields.u16();
        let reserved = fields.u16();
        let vcpu = fields.u32();
        let length = fields.u32() as usize;
        let tag = Tag::from_raw(raw_tag).ok_or(StateFormatError::UnknownSection {
            tag: raw_tag,
            offset,
        })?;
        if reserved != 0 {
            return Err(StateFormatError::Reserved {
                field: "section reserved",
                value: u64::from(reserved),
            });
        }
        let start = offset + SECTION_HEADER_BYTES;
        let end = start
            .checked_add(length)
            .filter(|end| *end <= body.len())
            .ok_or(StateFormatError::Truncated { offset })?;
        let padded_end = end.next_multiple_of(8);
        let padding = body
            .get(end..padded_end)
            .ok_or(StateFormatError::Truncated { offset })?;
        if let Some(byte) = padding.iter().find(|byte| **byte != 0) {
            return Err(StateFormatError::Reserved {
                field: "section padding",
                value: u64::from(*byte),
            });
        }
        found.push(Section {
            tag,
            vcpu,
            payload: &body[start..end],
        });
        offset = padded_end;
    }
    Ok(found)
}

/// Checks the header and returns the body.
fn checked_body(record: &[u8]) -> Result<&[u8], StateFormatError> {
    if record.len() < HEADER_BYTES {
        return Err(StateFormatError::TooShort {
            length: record.len(),
        });
    }
    let (header, body) = record.split_at(HEADER_BYTES);
    let mut fields = Fields(header);
    if fields.take::<8>() != MAGIC {
        return Err(StateFormatError::BadMagic);
    }
    let version = fields.u32();
    let flags = fields.u32();
    let body_length = fields.u64();
    let body_crc = fields.u32();
    let header_crc = fields.u32();
    let actual = crc32fast::hash(&header[..HEADER_BYTES - 4]);
    if actual != header_crc {
        return Err(StateFormatError::HeaderChecksum {
            expected: header_crc,
            actual,
        });
    }
    if version != VERSION {
        return Err(StateFormatError::UnsupportedVersion { version });
    }
    if flags != 0 {
        return Err(StateFormatError::Reserved {
            field: "header flags",
            value: u64::from(flags),
        });
    }
    if body_length > MAX_BODY_BYTES {
        return Err(StateFormatError::BodyTooLong {
            length: body_length,
        });
    }
    if body_length != body.len() as u64 {
        return Err(StateFormatError::LengthMismatch {
            declared: body_length,
            actual: body.len() as u64,
        });
    }
    let actual = crc32fast::hash(body);
    if actual != body_crc {
        return Err(StateFormatError::BodyChecksum {
            expected: body_crc,
            actual,
        });
    }
    Ok(body)
}

/// Decodes and validates a record.
///
/// # Errors
/// Every [`StateFormatError`] but `Io`, naming the first problem found.
pub fn decode(record: &[u8]) -> Result<MachineState, StateFormatError> {
    let body = checked_body(record)?;
    let sections = sections(body)?;
    let (machine, rest) = sections
        .split_first()
        .filter(|(first, _)| first.tag == Tag::Machine && first.vcpu == MACHINE_WIDE)
        .ok_or(StateFormatError::MachineNotFirst)?;
    check_length(Tag::Machine, machine.payload, MACHINE_BYTES)?;
    let mut fields = Fields(machine.payload);
    let memory_size = fields.u64();
    let vcpu_count = fields.u32();
    let reserved = fields.u32();
    if memory_size == 0 || !memory_size.is_multiple_of(PAGE_SIZE) {
        return Err(StateFormatError::InvalidValue {
            field: "memory size",
            value: memory_size,
        });
    }
    if vcpu_count == 0 || vcpu_count > MAX_VCPUS {
        return Err(StateFormatError::InvalidValue {
            field: "vCPU count",
            value: u64::from(vcpu_count),
        });
    }
    if reserved != 0 {
        return Err(StateFormatError::Reserved {
            field: "MACHINE reserved",
            value: u64::from(reserved),
        });
    }
    let mut clock = None;
    let mut irqchips: Vec<kvm_irqchip> = Vec::new();
    let mut vcpus: Vec<PartialVcpu> = (0..vcpu_count).map(|_| PartialVcpu::default()).collect();
    for section in rest {
        let tag = section.tag;
        let payload = section.payload;
        let vm_wide = matches!(tag, Tag::Machine | Tag::Clock | Tag::Irqchip);
        if vm_wide != (section.vcpu == MACHINE_WIDE) {
            return Err(StateFormatError::VcpuOutOfRange {
                section: tag.name(),
                vcpu: section.vcpu,
                vcpus: vcpu_count,
            });
        }
        if vm_wide {
            match tag {
                Tag::Clock => once(
                    &mut clock,
                    structure::<kvm_clock_data>(tag, payload)?,
                    tag,
                    MACHINE_WIDE,
                )?,
                Tag::Irqchip => {
                    let chip = structure::<kvm_irqchip>(tag, payload)?;
                    if chip.chip_id as usize != irqchips.len() {
                        return Err(StateFormatError::InvalidValue {
                            field: "irqchip id (PIC master, slave, IOAPIC in order)",
                            value: u64::from(chip.chip_id),
                        });
                    }
                    irqchips.push(chip);
                }
                _ => {
                    return Err(StateFormatError::Duplicate {
                        section: tag.name(),
                        vcpu: MACHINE_WIDE,
                    });
                }
            }
            continue;
        }
        let vcpu = section.vcpu;
        let partial = vcpus
            .get_mut(vcpu as usize)
            .ok_or(StateFormatError::VcpuOutOfRange {
                section: tag.name(),
                vcpu,
                vcpus: vcpu_count,
            })?;
        store_vcpu_section(partial, tag, vcpu, payload)?;
    }
    let clock = required(clock, Tag::Clock, MACHINE_WIDE)?;
    if !irqchips.is_empty() && irqchips.len() != 3 {
        return Err(StateFormatError::Missing {
            section: Tag::Irqchip.name(),
            vcpu: MACHINE_WIDE,
        });
    }
    let vcpus = vcpus
        .into_iter()
        .zip(0..)
        .map(|(partial, index)| finish_vcpu(partial, index))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(MachineState {
        memory_size,
        vcpus,
        vm: VmState { clock, irqchips },
    })
}

fn store_vcpu_section(
    partial: &mut PartialVcpu,
    tag: Tag,
    vcpu: u32,
    payload: &[u8],
) -> Result<(), StateFormatError> {
    match tag {
        Tag::MpState => {
            let state = structure::<kvm_mp_state>(tag, payload)?;
            if state.mp_state > MAX_MP_STATE {
                return Err(StateFormatError::InvalidValue {
                    field: "MP state",
                    value: u64::from(state.mp_state),
                });
            }
            once(&mut partial.mp_state, state, tag, vcpu)
        }
        Tag::Regs => once(&mut partial.regs, structure(tag, payload)?, tag, vcpu),
        Tag::Sregs => once(&mut partial.sregs, structure(tag, payload)?, tag, vcpu),
        Tag::Fpu => once(&mut partial.fpu, decode_fpu(payload)?, tag, vcpu),
        Tag::Xsave => {
            let xsave = XsaveArea(Box::new(structure::<[u32; 1024]>(tag, payload)?));
            once(&mut partial.xsave, xsave, tag, vcpu)
        }
        Tag::Xcrs => {
            let xcrs = structure::<kvm_xcrs>(tag, payload)?;
            if xcrs.nr_xcrs > MAX_XCRS {
                return Err(StateFormatError::InvalidValue {
                    field: "XCR count",
                    value: u64::from(xcrs.nr_xcrs),
                });
            }
            once(&mut partial.xcrs, xcrs, tag, vcpu)
        }
        Tag::DebugRegs => once(&mut partial.debug_regs, structure(tag, payload)?, tag, vcpu),
        Tag::Lapic => once(&mut partial.lapic, structure(tag, payload)?, tag, vcpu),
        Tag::Events => once(&mut partial.events, structure(tag, payload)?, tag, vcpu),
        Tag::Msrs => {
            let msrs = list::<kvm_msr_entry>(tag, payload, MAX_MSRS)?;
            let mut indices: Vec<u32> = msrs.iter().map(|entry| entry.index).collect();
            indices.sort_unstable();
            if let Some(pair) = indices.windows(2).find(|pair| pair[0] == pair[1]) {
                return Err(StateFormatError::InvalidValue {
                    field: "MSR index (listed twice)",
                    value: u64::from(pair[0]),
                });
            }
            once(&mut partial.msrs, msrs, tag, vcpu)
        }
        Tag::Cpuid => {
            let cpuid = list::<kvm_cpuid_entry2>(tag, payload, KVM_MAX_CPUID_ENTRIES)?;
            if cpuid.is_empty() {
                return Err(StateFormatError::SectionLength {
                    section: tag.name(),
                    length: 0,
                    expected: size_of::<kvm_cpuid_entry2>(),
                });
            }
            once(&mut partial.cpuid, cpuid, tag, vcpu)
        }
        Tag::Tsc => once(&mut partial.tsc, decode_tsc(payload)?, tag, vcpu),
        Tag::Machine | Tag::Clock | Tag::Irqchip => Err(StateFormatError::VcpuOutOfRange {
            section: tag.name(),
            vcpu,
            vcpus: 0,
        }),
    }
}

fn finish_vcpu(partial: PartialVcpu, index: u32) -> Result<VcpuState, StateFormatError> {
    if partial.xsave.is_some() != partial.xcrs.is_some() {
        let tag = if partial.xsave.is_some() {
            Tag::Xcrs
        } else {
            Tag::Xsave
        };
        return Err(StateFormatError::Missing {
            section: tag.name(),
            vcpu: index,
        });
    }
    Ok(VcpuState {
        index,
        mp_state: required(partial.mp_state, Tag::MpState, index)?,
        regs: required(partial.regs, Tag::Regs, index)?,
        sregs: required(partial.sregs, Tag::Sregs, index)?,
        fpu: required(partial.fpu, Tag::Fpu, index)?,
        xsave: partial.xsave,
        xcrs: partial.xcrs,
        debug_regs: required(partial.debug_regs, Tag::DebugRegs, index)?,
        lapic: required(partial.lapic, Tag::Lapic, index)?,
        events: required(partial.events, Tag::Events, index)?,
        msrs: required(partial.msrs, Tag::Msrs, index)?,
        cpuid: required(partial.cpuid, Tag::Cpuid, index)?,
        tsc: required(partial.tsc, Tag::Tsc, index)?,
    })
}

/// Writes `record` into a new memfd and seals it against any change.
pub(crate) fn write_memfd(record: &[u8]) -> crate::Result<OwnedFd> {
    use crate::error::VmmError;
    let failed =
        |operation| move |errno: rustix::io::Errno| VmmError::memory_file(operation, errno);
    let file = rustix::fs::memfd_create(
        "gmem-lu-machine-state",
        MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
    )
    .map_err(failed("memfd_create"))?;
    let mut written = 0;
    while written < record.len() {
        written += rustix::io::pwrite(&file, &record[written..], written as u64)
            .map_err(failed("pwrite"))?;
    }
    rustix::fs::fcntl_add_seals(
        &file,
        SealFlags::WRITE | SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL,
    )
    .map_err(failed("F_ADD_SEALS"))?;
    Ok(file)
}

/// Bytes a state slot for `vcpus` vCPUs holds: a header, the VM-wide
/// sections and 64 KiB per vCPU, several times what a vCPU's sections take
/// (about 10 KiB with XSAVE, the MSR list and CPUID).
pub(crate) fn slot_capacity(vcpus: u32) -> u64 {
    (64 << 10) + u64::from(vcpus) * (64 << 10)
}

/// Makes a state slot: a memfd of fixed size (sealed against growing and
/// shrinking, still writable) into which a record is written later, at
/// offset 0. A live update preserves the slot before the vCPUs stop (in
/// transfer mode before the successor is offered the session), then writes
/// the state into it while the vCPUs are stopped.
pub(crate) fn slot_memfd(vcpus: u32) -> crate::Result<OwnedFd> {
    use crate::error::VmmError;
    let failed =
        |operation| move |errno: rustix::io::Errno| VmmError::memory_file(operation, errno);
    let file = rustix::fs::memfd_create(
        "gmem-lu-vcpu-state",
        MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
    )
    .map_err(failed("memfd_create"))?;
    rustix::fs::ftruncate(&file, slot_capacity(vcpus)).map_err(failed("ftruncate"))?;
    rustix::fs::fcntl_add_seals(&file, SealFlags::SHRINK | SealFlags::GROW)
        .map_err(failed("F_ADD_SEALS"))?;
    Ok(file)
}

/// Writes `record` at offset 0 of a slot.
///
/// # Errors
/// - [`crate::VmmError::MemoryFile`]: EFBIG when the record is larger than
///   the slot; `fstat` or `pwrite` failed.
pub(crate) fn write_slot(slot: BorrowedFd<'_>, record: &[u8]) -> crate::Result<()> {
    use crate::error::VmmError;
    let failed =
        |operation| move |errno: rustix::io::Errno| VmmError::memory_file(operation, errno);
    let size = rustix::fs::fstat(slot).map_err(failed("fstat"))?.st_size;
    if record.len() as u64 > u64::try_from(size).unwrap_or(0) {
        return Err(VmmError::memory_file(
            "write the state record into its slot",
            rustix::io::Errno::FBIG,
        ));
    }
    let mut written = 0;
    while written < record.len() {
        written += rustix::io::pwrite(slot, &record[written..], written as u64)
            .map_err(failed("pwrite"))?;
    }
    Ok(())
}

/// Reads the record at the start of a slot: the header, then as many body
/// bytes as it declares (bounded by [`MAX_BODY_BYTES`] and the file size);
/// [`decode`] validates the rest.
pub(crate) fn read_slot(slot: BorrowedFd<'_>) -> Result<Vec<u8>, StateFormatError> {
    let io = |operation| {
        move |errno: rustix::io::Errno| StateFormatError::Io {
            operation,
            errno: errno.raw_os_error(),
        }
    };
    let mut header = [0u8; HEADER_BYTES];
    let count = rustix::io::pread(slot, &mut header, 0).map_err(io("pread"))?;
    if count < HEADER_BYTES {
        return Err(StateFormatError::TooShort { length: count });
    }
    let mut length = [0u8; 8];
    length.copy_from_slice(&header[16..24]);
    let body_length = u64::from_le_bytes(length);
    if body_length > MAX_BODY_BYTES {
        return Err(StateFormatError::BodyTooLong {
            length: body_length,
        });
    }
    let total = HEADER_BYTES + body_length as usize;
    let mut bytes = vec![0u8; total];
    let mut read = 0;
    while read < total {
        let count =
            rustix::io::pread(slot, &mut bytes[read..], read as u64).map_err(io("pread"))?;
        if count == 0 {
            bytes.truncate(read);
            break;
        }
        read += count;
    }
    Ok(bytes)
}

/// Reads a whole record file, refusing one larger than any valid record.
pub(crate) fn read_file(file: BorrowedFd<'_>) -> Result<Vec<u8>, StateFormatError> {
    let io = |operation| {
        move |errno: rustix::io::Errno| StateFormatError::Io {
            operation,
            errno: errno.raw_os_error(),
        }
    };
    let size = rustix::fs::fstat(file).map_err(io("fstat"))?.st_size;
    let size = u64::try_from(size).unwrap_or(0);
    if size > HEADER_BYTES as u64 + MAX_BODY_BYTES {
        return Err(StateFormatError::BodyTooLong {
            length: size - HEADER_BYTES as u64,
        });
    }
    let mut bytes = vec![0u8; size as usize];
    let mut read = 0;
    while read < bytes.len() {
        let count =
            rustix::io::pread(file, &mut bytes[read..], read as u64).map_err(io("pread"))?;
        if count == 0 {
            bytes.truncate(read);
            break;
        }
        read += count;
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests;
