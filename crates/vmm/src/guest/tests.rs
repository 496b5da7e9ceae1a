//! The program's bytes agree with its source, and its constants with the
//! host's.

use super::*;

/// Every `.set NAME, VALUE` line of the source.
fn source_constants() -> Vec<(String, u64)> {
    PROGRAM_SOURCE
        .lines()
        .filter_map(|line| line.trim().strip_prefix(".set "))
        .map(|rest| {
            let (name, value) = rest.split_once(',').expect("`.set NAME, VALUE`");
            let value = value.trim();
            let value = match value.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => value.parse(),
            }
            .expect("numeric .set value");
            (name.trim().to_string(), value)
        })
        .collect()
}

fn constant(name: &str) -> u64 {
    source_constants()
        .into_iter()
        .find(|(found, _)| found == name)
        .unwrap_or_else(|| panic!("{name} is not defined in program.S"))
        .1
}

#[test]
fn control_block_offsets_match_the_source() {
    let host = [
        ("CB_CPU_INDEX", offsets::CPU_INDEX),
        ("CB_DATA_BASE", offsets::DATA_BASE),
        ("CB_PAGE_COUNT", offsets::PAGE_COUNT),
        ("CB_REPORT_MASK", offsets::REPORT_MASK),
        ("CB_TRACE_MASK", offsets::TRACE_MASK),
        ("CB_TRACE_BASE", offsets::TRACE_BASE),
        ("CB_TRACE_CAPACITY_MASK", offsets::TRACE_CAPACITY_MASK),
        ("CB_GAP_THRESHOLD", offsets::GAP_THRESHOLD),
        ("CB_DOORBELL", offsets::DOORBELL),
        ("CB_USE_AVX", offsets::USE_AVX),
        ("CB_COMMAND", offsets::COMMAND),
        ("CB_ONES", offsets::ONES),
        ("CB_REPORT_VIA_PORT", offsets::REPORT_VIA_PORT),
        ("CB_GAP_PROBE", offsets::GAP_PROBE),
        ("CB_PROBED_GAP", offsets::PROBED_GAP),
        ("CB_ITERATIONS", offsets::ITERATIONS),
        ("CB_PAGES_WRITTEN", offsets::PAGES_WRITTEN),
        ("CB_PAGES_VERIFIED", offsets::PAGES_VERIFIED),
        ("CB_MISMATCHES", offsets::MISMATCHES),
        ("CB_MISMATCH_ADDRESS", offsets::MISMATCH_ADDRESS),
        ("CB_MISMATCH_EXPECTED", offsets::MISMATCH_EXPECTED),
        ("CB_MAX_GAP", offsets::MAX_GAP),
        ("CB_BIG_GAP", offsets::BIG_GAP),
        ("CB_BIG_GAP_END_TSC", offsets::BIG_GAP_END_TSC),
        ("CB_BIG_GAP_COUNT", offsets::BIG_GAP_COUNT),
        ("CB_LAST_TSC", offsets::LAST_TSC),
        ("CB_WRITE_CURSOR", offsets::WRITE_CURSOR),
        ("CB_GENERATION", offsets::GENERATION),
        ("CB_TRACE_NEXT", offsets::TRACE_NEXT),
        ("CB_REGISTER_MISMATCHES", offsets::REGISTER_MISMATCHES),
        ("CB_FINAL_VERIFIED", offsets::FINAL_VERIFIED),
        ("CB_DONE", offsets::DONE),
        ("PORT_BASE", u64::from(channels::PORT_BASE)),
        ("CH_PROGRESS", channels::PROGRESS),
        ("CH_GAP", channels::GAP),
        ("CH_MISMATCH", channels::MISMATCH),
        ("CH_REGISTER_MISMATCH", channels::REGISTER_MISMATCH),
        ("CH_DONE", channels::DONE),
        ("CH_HELLO", channels::HELLO),
        ("CHECKSUM_QWORD", CHECKSUM_QWORD as u64),
    ];
    let defined = source_constants();
    for (name, value) in host {
        assert_eq!(
            constant(name),
            value,
            "{name} differs between program.S and the host"
        );
    }
    // Every CB_/CH_ constant of the source is known to the host.
    for (name, _) in defined {
        if name.starts_with("CB_") || name.starts_with("CH_") {
            assert!(
                host.iter().any(|(known, _)| *known == name),
                "{name} is defined in program.S but not checked against the host"
            );
        }
    }
}

#[test]
fn fill_multiplier_matches_the_source() {
    assert!(
        PROGRAM_SOURCE.contains(&format!("{FILL_MULTIPLIER:#x}")),
        "program.S does not use the host's fill multiplier {FILL_MULTIPLIER:#x}"
    );
}

/// Reassembles both programs with GNU as and objcopy and compares the bytes.
#[test]
fn guest_program_matches_source() {
    assemble_and_compare("program.S", PROGRAM_SOURCE, PROGRAM);
    assemble_and_compare(
        "prefault.S",
        crate::prefault::PROGRAM_SOURCE,
        crate::prefault::PROGRAM,
    );
}

fn assemble_and_compare(name: &str, source_text: &str, bytes: &[u8]) {
    let have = |tool: &str| {
        std::process::Command::new(tool)
            .arg("--version")
            .output()
            .is_ok_and(|output| output.status.success())
    };
    if !have("as") || !have("objcopy") {
        test_support::skipped(format_args!(
            "guest_program_matches_source: GNU as and objcopy (binutils) are needed \
             to reassemble program.S"
        ));
        return;
    }
    let directory = std::env::temp_dir().join(format!("vmm-guest-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&directory).unwrap();
    let source = directory.join(name);
    let object = directory.join("program.o");
    let binary = directory.join("program.bin");
    std::fs::write(&source, source_text).unwrap();
    let status = std::process::Command::new("as")
        .arg("--64")
        .arg("-o")
        .arg(&object)
        .arg(&source)
        .status()
        .unwrap();
    assert!(status.success(), "as failed on {name}");
    let status = std::process::Command::new("objcopy")
        .args(["-O", "binary", "-j", ".text"])
        .arg(&object)
        .arg(&binary)
        .status()
        .unwrap();
    assert!(status.success(), "objcopy failed");
    let assembled = std::fs::read(&binary).unwrap();
    std::fs::remove_dir_all(&directory).unwrap();
    if let Some(offset) = assembled
        .iter()
        .zip(bytes)
        .position(|(new, old)| new != old)
    {
        panic!(
            "the embedded bytes differ from {name} at byte {offset:#x}: \
             run crates/vmm/guest-build.sh"
        );
    }
    assert_eq!(
        assembled.len(),
        bytes.len(),
        "the embedded bytes have a different length from {name}: run crates/vmm/guest-build.sh"
    );
}

#[test]
fn host_page_check_accepts_what_the_program_writes_and_nothing_else() {
    let address = 0x40_0000u64;
    let expected = 77u64;
    let mut page = [0u64; 512];
    page[0] = address;
    page[1] = expected;
    let fill = expected.wrapping_mul(FILL_MULTIPLIER);
    for (k, value) in page.iter_mut().enumerate().take(CHECKSUM_QWORD).skip(2) {
        *value = fill.wrapping_add(k as u64);
    }
    page[CHECKSUM_QWORD] = page[..CHECKSUM_QWORD]
        .iter()
        .fold(0u64, |sum, value| sum.wrapping_add(*value));
    assert!(page_is_valid(&page, address, expected));
    assert!(
        !page_is_valid(&page, address, expected + 1),
        "stale sequence accepted"
    );
    assert!(
        !page_is_valid(&page, address + PAGE_SIZE, expected),
        "wrong page accepted"
    );
    let mut corrupt = page;
    corrupt[100] ^= 1;
    assert!(
        !page_is_valid(&corrupt, address, expected),
        "bit flip accepted"
    );
    assert!(
        !page_is_valid(&[0; 512], address, expected),
        "zero page accepted"
    );
}
