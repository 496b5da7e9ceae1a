//! Record codec tests: a proptest round trip, one test per kind of
//! corruption, and "any mutation is an error or a valid record, never a
//! panic".

use proptest::prelude::*;

use super::*;

fn file(token: u64, data: &[u8]) -> FileRecord {
    FileRecord {
        compatible: Compatible::new("memfd", 1).unwrap(),
        token: Token(token),
        identity: FileIdentity {
            device: 0x11,
            inode: token.wrapping_add(1000),
        },
        data: data.to_vec(),
    }
}

fn sample() -> Record {
    Record::full(vec![
        SessionRecord {
            name: SessionName::new("vm0").unwrap(),
            files: vec![file(0, b"first"), file(7, &[0xaa; 32])],
        },
        SessionRecord {
            name: SessionName::new("empty").unwrap(),
            files: vec![],
        },
        SessionRecord {
            name: SessionName::new("vm1").unwrap(),
            files: vec![file(u64::MAX, b"")],
        },
    ])
}

/// Re-seals `bytes` with a correct checksum after a test patched them, so
/// the check under test is the one that fires.
fn reseal(bytes: &mut [u8]) {
    let sum = checksum(bytes);
    bytes[wire::CHECKSUM_OFFSET..wire::CHECKSUM_OFFSET + 4].copy_from_slice(&sum.to_le_bytes());
}

fn patched(offset: usize, value: &[u8]) -> Result<Record, RecordError> {
    let mut bytes = sample().encode().unwrap();
    bytes[offset..offset + value.len()].copy_from_slice(value);
    reseal(&mut bytes);
    Record::decode(&bytes)
}

const SESSIONS: usize = wire::HEADER_LEN;
const FILES: usize = SESSIONS + 3 * wire::SESSION_ENTRY_LEN;
const DATA: usize = FILES + 3 * wire::FILE_ENTRY_LEN;

#[test]
fn round_trip_is_exact_and_canonical() {
    let record = sample();
    let bytes = record.encode().unwrap();
    assert_eq!(&bytes[..8], b"GMEMLUR\0");
    assert_eq!(bytes.len(), DATA + 8 + 32);
    let decoded = Record::decode(&bytes).unwrap();
    assert_eq!(decoded, record);
    assert_eq!(decoded.encode().unwrap(), bytes);
}

#[test]
fn every_single_bit_flip_is_refused() {
    // The checksum covers every byte, so each flip must fail somewhere.
    let bytes = sample().encode().unwrap();
    for index in 0..bytes.len() {
        for bit in 0..8 {
            let mut copy = bytes.clone();
            copy[index] ^= 1 << bit;
            assert!(
                Record::decode(&copy).is_err(),
                "flip of bit {bit} at {index} accepted"
            );
        }
    }
}

#[test]
fn truncation_at_every_length_is_refused() {
    let bytes = sample().encode().unwrap();
    for length in 0..bytes.len() {
        assert!(Record::decode(&bytes[..length]).is_err(), "length {length}");
    }
}

#[test]
fn one_test_per_corruption() {
    let expect = |result: Result<Record, RecordError>, check: fn(&RecordError) -> bool| {
        let error = result.unwrap_err();
        assert!(check(&error), "unexpected error {error:?}");
        error.errno()
    };
    assert_eq!(
        expect(patched(0, b"X"), |e| matches!(
            e,
            RecordError::BadMagic { .. }
        )),
        libc::EINVAL
    );
    assert_eq!(
        expect(patched(8, &[2, 0]), |e| matches!(
            e,
            RecordError::UnsupportedVersion { found: 2 }
        )),
        libc::EOPNOTSUPP
    );
    expect(patched(10, &[65, 0]), |e| {
        matches!(e, RecordError::BadHeaderLength { found: 65 })
    });
    expect(patched(12, &[2]), |e| {
        matches!(e, RecordError::UnknownFlags { flags: 2 })
    });
    expect(patched(16, &[1]), |e| {
        matches!(e, RecordError::LengthMismatch { .. })
    });
    expect(patched(36, &[1]), |e| {
        matches!(e, RecordError::ReservedNotZero { .. })
    });
    expect(patched(63, &[1]), |e| {
        matches!(e, RecordError::ReservedNotZero { .. })
    });
    // More sessions than exist: the layout no longer adds up.
    expect(patched(28, &[4]), |e| {
        matches!(e, RecordError::Layout { .. })
    });
    expect(patched(40, &[0x30]), |e| {
        matches!(e, RecordError::Layout { .. })
    });
    expect(patched(40, &[0x29]), |e| {
        matches!(e, RecordError::Layout { .. })
    });
    assert_eq!(
        expect(patched(28, &[0xff, 0xff, 0, 0]), |e| matches!(
            e,
            RecordError::TooManySessions { .. }
        )),
        libc::EINVAL
    );
    assert_eq!(
        expect(patched(32, &[0xff, 0, 0, 0]), |e| matches!(
            e,
            RecordError::TooManyFiles { .. }
        )),
        libc::ENOSPC
    );
    // Session names: empty, NUL inside, not UTF-8, garbage after the NUL.
    expect(patched(SESSIONS, &[0]), |e| {
        matches!(e, RecordError::BadSessionName { index: 0, .. })
    });
    expect(patched(SESSIONS + 1, &[0, b'x']), |e| {
        matches!(e, RecordError::BadSessionName { .. })
    });
    expect(patched(SESSIONS, &[0xff]), |e| {
        matches!(e, RecordError::BadSessionName { .. })
    });
    expect(patched(SESSIONS + 63, b"x"), |e| {
        matches!(e, RecordError::BadSessionName { .. })
    });
    expect(patched(SESSIONS + 68, &[1]), |e| {
        matches!(e, RecordError::ReservedNotZero { .. })
    });
    // Sessions claim other file counts than the header.
    expect(patched(SESSIONS + 64, &[3]), |e| {
        matches!(e, RecordError::Layout { .. })
    });
    // Two sessions with one name; two files with one token.
    assert_eq!(
        expect(patched(SESSIONS + 2 * 80, b"vm0\0"), |e| matches!(
            e,
            RecordError::DuplicateSession { .. }
        )),
        libc::EEXIST
    );
    assert_eq!(
        expect(patched(FILES + 96 + 56, &[0]), |e| matches!(
            e,
            RecordError::DuplicateToken { .. }
        )),
        libc::EEXIST
    );
    // Compatible strings: empty, a space, garbage after the NUL.
    expect(patched(FILES, &[0]), |e| {
        matches!(e, RecordError::BadCompatible { index: 0 })
    });
    expect(patched(FILES, b" "), |e| {
        matches!(e, RecordError::BadCompatible { .. })
    });
    expect(patched(FILES + 47, b"x"), |e| {
        matches!(e, RecordError::BadCompatible { .. })
    });
    expect(patched(FILES + 52, &[1]), |e| {
        matches!(e, RecordError::ReservedNotZero { .. })
    });
    // Data ranges: moved, too long, out of the area.
    expect(patched(FILES + 80, &[8]), |e| {
        matches!(e, RecordError::BadDataRange { index: 0, .. })
    });
    // Longer into the next file's data: its bytes sit where padding must be.
    expect(patched(FILES + 88, &[9]), |e| {
        matches!(e, RecordError::ReservedNotZero { .. })
    });
    expect(
        patched(
            FILES + 96 + 88,
            &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
        ),
        |e| matches!(e, RecordError::BadDataRange { index: 1, .. }),
    );
    // The last file's data shorter than the area: the area does not add up.
    let mut bytes = sample().encode().unwrap();
    bytes[FILES + 96 + 88] = 24;
    bytes[FILES + 2 * 96 + 80] = 32;
    reseal(&mut bytes);
    expect(Record::decode(&bytes), |e| {
        matches!(e, RecordError::Layout { .. })
    });
    expect(patched(FILES + 88, &[4]), |e| {
        matches!(e, RecordError::ReservedNotZero { .. })
    });
    // Padding after "first" (5 bytes, padded to 8).
    expect(patched(DATA + 6, &[1]), |e| {
        matches!(e, RecordError::ReservedNotZero { .. })
    });
    // A checksum that does not match.
    let mut bytes = sample().encode().unwrap();
    bytes[DATA] ^= 1;
    expect(Record::decode(&bytes), |e| {
        matches!(e, RecordError::ChecksumMismatch { .. })
    });
}

#[test]
fn too_long_is_refused_without_reading() {
    let huge = vec![0u8; MAX_RECORD_LEN + 1];
    assert_eq!(Record::decode(&huge).unwrap_err().errno(), libc::EFBIG);
}

#[test]
fn encode_refuses_what_decode_would() {
    let mut record = sample();
    record.sessions[2].name = SessionName::new("vm0").unwrap();
    assert_eq!(record.encode().unwrap_err().errno(), libc::EEXIST);
    let mut record = sample();
    record.sessions[0].files[1].token = Token(0);
    assert_eq!(record.encode().unwrap_err().errno(), libc::EEXIST);
    let many = Record::full(vec![SessionRecord {
        name: SessionName::new("many").unwrap(),
        files: (0..=MAX_FILES as u64)
            .map(|token| file(token, b""))
            .collect(),
    }]);
    assert_eq!(many.encode().unwrap_err().errno(), libc::ENOSPC);
}

#[test]
fn delta_round_trip() {
    let offer = sample();
    let mut now = sample();
    now.sessions[0].files[1].data = b"changed".to_vec();
    let delta = now.delta_from(&offer).unwrap();
    assert_eq!(delta.kind, RecordKind::Delta);
    assert_eq!(delta.file_count(), 1);
    let bytes = delta.encode().unwrap();
    let decoded = Record::decode(&bytes).unwrap();
    let mut rebuilt = offer.clone();
    rebuilt.apply_delta(&decoded).unwrap();
    assert_eq!(rebuilt, now);
    // A structural change cannot be a delta.
    let mut moved = sample();
    moved.sessions[0].files[0].identity.inode += 1;
    assert!(moved.delta_from(&offer).is_none());
    // A delta naming another file is refused and changes nothing.
    let mut wrong = decoded.clone();
    wrong.sessions[0].files[0].identity.inode = 1;
    let mut target = offer.clone();
    assert!(matches!(
        target.apply_delta(&wrong),
        Err(RecordError::DeltaMismatch { .. })
    ));
    assert_eq!(target, offer);
    assert!(matches!(
        target.apply_delta(&offer),
        Err(RecordError::WrongKind { .. })
    ));
}

fn arbitrary_record() -> impl Strategy<Value = Record> {
    let name = "[a-zA-Z0-9._-]{1,63}";
    let compatible = "[!-~]{1,47}";
    let file = (
        compatible,
        any::<u32>(),
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
        proptest::collection::vec(any::<u8>(), 0..40),
    );
    let session = (name, proptest::collection::vec(file, 0..5));
    (any::<bool>(), proptest::collection::vec(session, 0..6)).prop_map(|(delta, sessions)| {
        let mut seen = std::collections::HashSet::new();
        let sessions = sessions
            .into_iter()
            .filter(|(name, _)| seen.insert(name.clone()))
            .map(|(name, files)| {
                let mut tokens = std::collections::HashSet::new();
                SessionRecord {
                    name: SessionName::new(&name).unwrap(),
                    files: files
                        .into_iter()
                        .filter(|file| tokens.insert(file.2))
                        .map(
                            |(compatible, version, token, device, inode, data)| FileRecord {
                                compatible: Compatible::new(&compatible, version).unwrap(),
                                token: Token(token),
                                identity: FileIdentity { device, inode },
                                data,
                            },
                        )
                        .collect(),
                }
            })
            .collect();
        Record {
            kind: if delta {
                RecordKind::Delta
            } else {
                RecordKind::Full
            },
            sessions,
        }
    })
}

proptest! {
    #[test]
    fn proptest_round_trip(record in arbitrary_record()) {
        let bytes = record.encode().unwrap();
        let decoded = Record::decode(&bytes).unwrap();
        prop_assert_eq!(&decoded, &record);
        prop_assert_eq!(decoded.encode().unwrap(), bytes);
    }

    #[test]
    fn proptest_mutations_never_panic(
        record in arbitrary_record(),
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
        fix_checksum in any::<bool>(),
    ) {
        let mut bytes = record.encode().unwrap();
        for (position, value) in edits {
            let index = position % bytes.len();
            bytes[index] = value;
        }
        if fix_checksum {
            reseal(&mut bytes);
        }
        if let Ok(decoded) = Record::decode(&bytes) {
            // Whatever is accepted is canonical.
            prop_assert_eq!(decoded.encode().unwrap(), bytes);
        }
    }
}
