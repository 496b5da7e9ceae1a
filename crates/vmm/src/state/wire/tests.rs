//! One test per kind of corruption, a round trip, and properties over
//! arbitrary input.

use kvm_bindings::kvm_xcrs;
use proptest::prelude::*;

use super::*;

/// A state with a distinct, non-zero value in every part.
fn sample_state(vcpus: u32) -> MachineState {
    let vcpu = |index: u32| {
        let regs = kvm_regs {
            rip: 0x10_0000 + u64::from(index),
            rax: 0xdead_beef,
            ..Default::default()
        };
        let mut sregs = kvm_sregs {
            cr0: 0x8005_0033,
            ..Default::default()
        };
        sregs.cs.selector = 0x33;
        let mut fpu = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            last_ip: 0x1234,
            ..Default::default()
        };
        fpu.xmm[3][5] = 9;
        let mut area = Box::new([0u32; 1024]);
        area[7] = 0xabcd;
        let mut xcrs = kvm_xcrs {
            nr_xcrs: 1,
            ..Default::default()
        };
        xcrs.xcrs[0].value = 7;
        let mut lapic = kvm_lapic_state::default();
        lapic.regs[0x20] = 1;
        let events = kvm_vcpu_events {
            sipi_vector: 3,
            ..Default::default()
        };
        VcpuState {
            index,
            mp_state: kvm_mp_state { mp_state: 0 },
            regs,
            sregs,
            fpu,
            xsave: Some(XsaveArea(area)),
            xcrs: Some(xcrs),
            debug_regs: kvm_debugregs {
                dr7: 0x400,
                ..Default::default()
            },
            lapic,
            events,
            msrs: vec![
                kvm_msr_entry {
                    index: 0xc000_0080,
                    data: 0xd01,
                    ..Default::default()
                },
                kvm_msr_entry {
                    index: 0x6e0,
                    data: 42,
                    ..Default::default()
                },
            ],
            cpuid: vec![kvm_cpuid_entry2 {
                function: 1,
                eax: 0xa0671,
                ..Default::default()
            }],
            tsc: TscState {
                khz: 2_600_000,
                offset: Some(0),
                guest_tsc: 5,
                host_tsc: 6,
            },
        }
    };
    let irqchips = (0..3)
        .map(|chip_id| kvm_irqchip {
            chip_id,
            ..Default::default()
        })
        .collect();
    MachineState {
        memory_size: 64 << 20,
        vcpus: (0..vcpus).map(vcpu).collect(),
        vm: VmState {
            clock: kvm_clock_data {
                clock: 77,
                flags: 14,
                ..Default::default()
            },
            irqchips,
        },
    }
}

/// Wraps a body in a valid header.
fn record_from_body(body: &[u8]) -> Vec<u8> {
    let mut record = Vec::new();
    record.extend_from_slice(&MAGIC);
    record.extend_from_slice(&VERSION.to_le_bytes());
    record.extend_from_slice(&0u32.to_le_bytes());
    record.extend_from_slice(&(body.len() as u64).to_le_bytes());
    record.extend_from_slice(&crc32fast::hash(body).to_le_bytes());
    let crc = crc32fast::hash(&record);
    record.extend_from_slice(&crc.to_le_bytes());
    record.extend_from_slice(body);
    record
}

/// Recomputes both CRCs after the header or body was edited.
fn reseal(record: &mut [u8]) {
    let body_crc = crc32fast::hash(&record[HEADER_BYTES..]);
    record[24..28].copy_from_slice(&body_crc.to_le_bytes());
    let header_crc = crc32fast::hash(&record[..28]);
    record[28..32].copy_from_slice(&header_crc.to_le_bytes());
}

/// The body of a valid two-vCPU record, split into its sections' bytes.
fn sample_sections() -> Vec<Vec<u8>> {
    let record = encode(&sample_state(2));
    let body = &record[HEADER_BYTES..];
    let mut sections = Vec::new();
    let mut offset = 0;
    while offset < body.len() {
        let length = u32::from_le_bytes(body[offset + 8..offset + 12].try_into().unwrap()) as usize;
        let end = (offset + SECTION_HEADER_BYTES + length).next_multiple_of(8);
        sections.push(body[offset..end].to_vec());
        offset = end;
    }
    sections
}

fn section_tag(section: &[u8]) -> u16 {
    u16::from_le_bytes([section[0], section[1]])
}

fn find_section(sections: &mut [Vec<u8>], tag: Tag) -> &mut Vec<u8> {
    sections
        .iter_mut()
        .find(|section| section_tag(section) == tag as u16)
        .unwrap()
}

fn without(tag: Tag) -> Vec<Vec<u8>> {
    sample_sections()
        .into_iter()
        .filter(|section| section_tag(section) != tag as u16)
        .collect()
}

fn decode_sections(sections: &[Vec<u8>]) -> Result<MachineState, StateFormatError> {
    decode(&record_from_body(&sections.concat()))
}

#[test]
fn round_trip_keeps_every_field() {
    for vcpus in [1, 2, 5] {
        let state = sample_state(vcpus);
        assert_eq!(decode(&encode(&state)).unwrap(), state);
    }
    let mut without_xsave = sample_state(1);
    without_xsave.vcpus[0].xsave = None;
    without_xsave.vcpus[0].xcrs = None;
    without_xsave.vcpus[0].tsc.offset = None;
    without_xsave.vm.irqchips.clear();
    assert_eq!(decode(&encode(&without_xsave)).unwrap(), without_xsave);
}

#[test]
fn too_short() {
    assert_eq!(
        decode(&[0; 31]),
        Err(StateFormatError::TooShort { length: 31 })
    );
}

#[test]
fn bad_magic() {
    let mut record = encode(&sample_state(1));
    record[0] = b'X';
    assert_eq!(decode(&record), Err(StateFormatError::BadMagic));
}

#[test]
fn header_bit_flip_fails_the_header_checksum() {
    let mut record = encode(&sample_state(1));
    record[17] ^= 1;
    assert!(matches!(
        decode(&record),
        Err(StateFormatError::HeaderChecksum { .. })
    ));
}

#[test]
fn unsupported_version() {
    let mut record = encode(&sample_state(1));
    record[8..12].copy_from_slice(&2u32.to_le_bytes());
    reseal(&mut record);
    assert_eq!(
        decode(&record),
        Err(StateFormatError::UnsupportedVersion { version: 2 })
    );
}

#[test]
fn header_flags_set() {
    let mut record = encode(&sample_state(1));
    record[12] = 1;
    reseal(&mut record);
    assert!(matches!(
        decode(&record),
        Err(StateFormatError::Reserved {
            field: "header flags",
            ..
        })
    ));
}

#[test]
fn body_longer_than_the_bound() {
    let mut record = encode(&sample_state(1));
    record[16..24].copy_from_slice(&(MAX_BODY_BYTES + 1).to_le_bytes());
    reseal(&mut record);
    assert!(matches!(
        decode(&record),
        Err(StateFormatError::BodyTooLong { .. })
    ));
}

#[test]
fn truncated_record_fails_the_length_check() {
    let mut record = encode(&sample_state(1));
    record.truncate(record.len() - 8);
    assert!(matches!(
        decode(&record),
        Err(StateFormatError::LengthMismatch { .. })
    ));
}

#[test]
fn body_bit_flip_fails_the_body_checksum() {
    let mut record = encode(&sample_state(1));
    let last = record.len() - 9;
    record[last] ^= 0x80;
    assert!(matches!(
        decode(&record),
        Err(StateFormatError::BodyChecksum { .. })
    ));
}

#[test]
fn section_running_past_the_end() {
    let mut sections = sample_sections();
    let last = sections.last_mut().unwrap();
    last[8..12].copy_from_slice(&10_000u32.to_le_bytes());
    assert!(matches!(
        decode_sections(&sections),
        Err(StateFormatError::Truncated { .. })
    ));
}

#[test]
fn unknown_section_tag() {
    let mut sections = sample_sections();
    sections[1][0] = 99;
    assert!(matches!(
        decode_sections(&sections),
        Err(StateFormatError::UnknownSection { tag: 99, .. })
    ));
}

#[test]
fn nonzero_section_reserved_field_and_padding() {
    let mut sections = sample_sections();
    sections[1][2] = 1;
    assert!(matches!(
        decode_sections(&sections),
        Err(StateFormatError::Reserved {
            field: "section reserved",
            ..
        })
    ));
    // MACHINE: 12 header bytes and a 16-byte payload, then 4 padding bytes.
    let mut sections = sample_sections();
    *find_section(&mut sections, Tag::Machine)
        .last_mut()
        .unwrap() = 7;
    assert!(matches!(
        decode_sections(&sections),
        Err(StateFormatError::Reserved {
            field: "section padding",
            ..
        })
    ));
}

#[test]
fn machine_section_not_first() {
    let mut sections = sample_sections();
    sections.swap(0, 1);
    assert_eq!(
        decode_sections(&sections),
        Err(StateFormatError::MachineNotFirst)
    );
}

#[test]
fn wrong_payload_length() {
    let mut sections = sample_sections();
    let regs = find_section(&mut sections, Tag::Regs);
    // Declare 8 bytes fewer and drop them (the next section stays 8-aligned).
    let length = u32::from_le_bytes(regs[8..12].try_into().unwrap()) - 8;
    regs[8..12].copy_from_slice(&length.to_le_bytes());
    regs.truncate((SECTION_HEADER_BYTES + length as usize).next_multiple_of(8));
    assert!(matches!(
        decode_sections(&sections),
        Err(StateFormatError::SectionLength {
            section: "REGS",
            ..
        })
    ));
}

#[test]
fn vcpu_out_of_range_and_vm_section_with_a_vcpu() {
    let mut sections = sample_sections();
    find_section(&mut sections, Tag::Regs)[4..8].copy_from_slice(&5u32.to_le_bytes());
    assert!(matches!(
        decode_sections(&sections),
        Err(StateFormatError::VcpuOutOfRange { vcpu: 5, .. })
    ));
    let mut sections = sample_sections();
    find_section(&mut sections, Tag::Clock)[4..8].copy_from_slice(&0u32.to_le_bytes());
    assert!(matches!(
        decode_sections(&sections),
        Err(StateFormatError::VcpuOutOfRange {
            section: "CLOCK",
            ..
        })
    ));
}

#[test]
fn duplicate_section() {
    let mut sections = sample_sections();
    let regs = find_section(&mut sections, Tag::Regs).clone();
    sections.push(regs);
    assert_eq!(
        decode_sections(&sections),
        Err(StateFormatError::Duplicate {
            section: "REGS",
            vcpu: 0
        })
    );
}

#[test]
fn missing_sections() {
    assert_eq!(
        decode_sections(&without(Tag::Lapic)),
        Err(StateFormatError::Missing {
            section: "LAPIC",
            vcpu: 0
        })
    );
    assert_eq!(
        decode_sections(&without(Tag::Xcrs)),
        Err(StateFormatError::Missing {
            section: "XCRS",
            vcpu: 0
        })
    );
    assert!(matches!(
        decode_sections(&without(Tag::Clock)),
        Err(StateFormatError::Missing {
            section: "CLOCK",
            ..
        })
    ));
    let mut sections = sample_sections();
    let first_irqchip = sections
        .iter()
        .position(|section| section_tag(section) == Tag::Irqchip as u16)
        .unwrap();
    sections.remove(first_irqchip + 2);
    assert!(matches!(
        decode_sections(&sections),
        Err(StateFormatError::Missing {
            section: "IRQCHIP",
            ..
        })
    ));
}

#[test]
fn invalid_field_values() {
    let mut state = sample_state(1);
    state.vcpus[0].mp_state.mp_state = 11;
    assert!(matches!(
        decode(&encode(&state)),
        Err(StateFormatError::InvalidValue {
            field: "MP state",
            ..
        })
    ));
    let mut state = sample_state(1);
    let first = state.vcpus[0].msrs[0];
    state.vcpus[0].msrs.push(first);
    assert!(matches!(
        decode(&encode(&state)),
        Err(StateFormatError::InvalidValue {
            field: "MSR index (listed twice)",
            ..
        })
    ));
    let mut state = sample_state(1);
    if let Some(xcrs) = state.vcpus[0].xcrs.as_mut() {
        xcrs.nr_xcrs = 17;
    }
    assert!(matches!(
        decode(&encode(&state)),
        Err(StateFormatError::InvalidValue {
            field: "XCR count",
            ..
        })
    ));
    let mut state = sample_state(1);
    state.vm.irqchips.swap(0, 2);
    assert!(matches!(
        decode(&encode(&state)),
        Err(StateFormatError::InvalidValue { .. })
    ));
    let mut state = sample_state(1);
    state.memory_size = 4097;
    assert!(matches!(
        decode(&encode(&state)),
        Err(StateFormatError::InvalidValue {
            field: "memory size",
            ..
        })
    ));
    let mut state = sample_state(1);
    state.vcpus[0].cpuid.clear();
    assert!(matches!(
        decode(&encode(&state)),
        Err(StateFormatError::SectionLength {
            section: "CPUID",
            ..
        })
    ));
    let mut sections = sample_sections();
    let tsc = find_section(&mut sections, Tag::Tsc);
    tsc[SECTION_HEADER_BYTES + 4] = 2;
    assert!(matches!(
        decode_sections(&sections),
        Err(StateFormatError::Reserved {
            field: "TSC flags",
            ..
        })
    ));
}

#[test]
fn too_many_entries() {
    let mut state = sample_state(1);
    state.vcpus[0].msrs = (0..MAX_MSRS as u32 + 1)
        .map(|index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    assert!(matches!(
        decode(&encode(&state)),
        Err(StateFormatError::TooManyEntries {
            section: "MSRS",
            ..
        })
    ));
}

#[test]
fn memfd_round_trip_is_sealed() {
    let state = sample_state(2);
    let file = MachineState::to_memfd(&state).unwrap();
    let seals = rustix::fs::fcntl_get_seals(&file).unwrap();
    assert!(seals.contains(SealFlags::WRITE | SealFlags::SHRINK | SealFlags::GROW));
    assert!(
        rustix::io::pwrite(&file, b"x", 0).is_err(),
        "sealed record writable"
    );
    assert_eq!(MachineState::from_fd(&file).unwrap(), state);
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let _ = decode(&bytes);
    }

    #[test]
    fn any_single_byte_change_is_refused(index in 0usize..100_000, xor in 1u8..=255) {
        let mut record = encode(&sample_state(1));
        let index = index % record.len();
        record[index] ^= xor;
        prop_assert!(decode(&record).is_err());
    }

    #[test]
    fn resealed_body_mutations_never_panic(index in 0usize..100_000, value in any::<u8>()) {
        let mut record = encode(&sample_state(2));
        let index = HEADER_BYTES + index % (record.len() - HEADER_BYTES);
        record[index] = value;
        reseal(&mut record);
        let _ = decode(&record);
    }
}

#[test]
fn a_slot_holds_a_record_and_refuses_what_it_cannot_hold() {
    let state = sample_state(3);
    let slot = slot_memfd(3).unwrap();
    // Size fixed by seals, as the memfd handler preserves it.
    assert_eq!(
        rustix::fs::ftruncate(&slot, 1).unwrap_err(),
        rustix::io::Errno::PERM
    );
    // An empty slot holds no record.
    assert!(matches!(
        read_slot(std::os::fd::AsFd::as_fd(&slot)).and_then(|bytes| decode(&bytes)),
        Err(StateFormatError::BadMagic)
    ));
    let written = state.write_to_slot(&slot).unwrap();
    assert_eq!(written, encode(&state).len());
    assert_eq!(MachineState::from_slot(&slot).unwrap(), state);
    // A second, smaller state overwrites the first; the stale tail is ignored.
    let smaller = sample_state(1);
    smaller.write_to_slot(&slot).unwrap();
    assert_eq!(MachineState::from_slot(&slot).unwrap(), smaller);
    // A record larger than the slot is refused with EFBIG.
    let tiny = rustix::fs::memfd_create("tiny", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
    rustix::fs::ftruncate(&tiny, 64).unwrap();
    let error = state.write_to_slot(&tiny).unwrap_err();
    assert_eq!(error.errno(), libc::EFBIG);
    // A corrupt declared length is bounded before anything is allocated.
    let mut record = encode(&state);
    record[16..24].copy_from_slice(&(MAX_BODY_BYTES + 1).to_le_bytes());
    rustix::io::pwrite(&slot, &record, 0).unwrap();
    assert!(matches!(
        MachineState::from_slot(&slot),
        Err(crate::VmmError::State(StateFormatError::BodyTooLong { .. }))
    ));
}
