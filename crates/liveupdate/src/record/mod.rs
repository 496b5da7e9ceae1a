//! The handover record: what the old VMM process tells its successor about
//! the preserved files.
//!
//! Model: a record lists sessions in creation order; each lists its files in
//! preservation order with the handler's compatible string and version, the
//! caller's token, the file's identity (device, inode) and the handler's
//! opaque data. The files' contents never enter the record (zero copy): the
//! fds travel beside it, file `i` of the record being fd `i` of the list.
//!
//! The byte layout is documented field by field in [`wire`]. Properties:
//! magic, version, length bound ([`MAX_RECORD_LEN`]), CRC-32 checksum,
//! little-endian, one canonical encoding (so `encode(decode(bytes)) ==
//! bytes` for every valid input).
//!
//! Invariant of [`Record::decode`]: it accepts exactly the canonical
//! encodings of valid records and returns a [`RecordError`] for anything
//! else, without panicking or reading out of range, whatever the input.
//! Checks, in order: length bounds, header fields (magic, version, header
//! length, flags, reserved bytes), total length, checksum, table counts, the
//! layout adding up, each session (name, reserved bytes), the files adding up
//! to the header's count, each file (compatible string, reserved bytes, data
//! range canonical), padding, then uniqueness of session names and of tokens
//! within a session.

pub mod blob;
pub mod wire;

use std::collections::HashSet;

use crate::names::{Compatible, FileIdentity, SessionName, Token};
use wire::{FileWire, HeaderWire, SessionWire, Truncated, WireReader, WireWriter, align_data};

/// Largest record accepted, in bytes. Sized for the gmem handler's folio
/// runs of a 64 GiB guest whose every other 4 KiB page is populated (8 Mi
/// runs of 16 bytes = 128 MiB), with room to spare, and small enough that a
/// hostile sender cannot make a reader allocate without bound.
pub const MAX_RECORD_LEN: usize = 256 << 20;

/// Most sessions in one record. Upstream LUO fits 744 in its 16-page block;
/// a round 1024 keeps the session table under 100 KiB.
pub const MAX_SESSIONS: usize = 1024;

/// Most files in one record: one `SCM_RIGHTS` message carries at most 253
/// fds (the kernel's `SCM_MAX_FD`) and one of them is the record's memfd.
pub const MAX_FILES: usize = 252;

/// Whether a record is a full handover or a transfer-switch delta.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordKind {
    /// Every session and file of a handover.
    Full,
    /// Only the files whose handler data changed since a transfer offer.
    Delta,
}

/// A decoded (or to-be-encoded) handover record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// Full or delta.
    pub kind: RecordKind,
    /// Sessions in creation order.
    pub sessions: Vec<SessionRecord>,
}

/// One session in a record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionRecord {
    /// Its name.
    pub name: SessionName,
    /// Its files in preservation order.
    pub files: Vec<FileRecord>,
}

/// One preserved file in a record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileRecord {
    /// The handler that preserved it.
    pub compatible: Compatible,
    /// The caller's token.
    pub token: Token,
    /// Which file it is.
    pub identity: FileIdentity,
    /// The handler's data (format owned by the handler).
    pub data: Vec<u8>,
}

/// Why a record was refused. All are `EINVAL` except where noted.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// The input ended early.
    #[error("truncated: {needed} bytes needed at offset {offset}")]
    Truncated {
        /// Offset of the read.
        offset: usize,
        /// Bytes it needed.
        needed: usize,
    },
    /// Longer than [`MAX_RECORD_LEN`] (`EFBIG`).
    #[error("{length} bytes is longer than the {max} bytes a record may have (EFBIG)")]
    TooLong {
        /// Its length.
        length: u64,
        /// The bound.
        max: usize,
    },
    /// The magic bytes are wrong: not a record.
    #[error("bad magic {found:02x?}, expected \"GMEMLUR\\0\"")]
    BadMagic {
        /// The bytes found.
        found: [u8; 8],
    },
    /// A version this code does not read (`EOPNOTSUPP`).
    #[error("version {found} is not supported, only version 1 is (EOPNOTSUPP)")]
    UnsupportedVersion {
        /// The version found.
        found: u16,
    },
    /// The header length field is not 64.
    #[error("header length {found}, expected 64")]
    BadHeaderLength {
        /// The value found.
        found: u16,
    },
    /// Unknown header flag bits.
    #[error("unknown header flags {flags:#x}")]
    UnknownFlags {
        /// The flags found.
        flags: u32,
    },
    /// The header's total length is not the input's length.
    #[error("the header says {declared} bytes, the record has {actual}")]
    LengthMismatch {
        /// Length in the header.
        declared: u64,
        /// Length of the input.
        actual: usize,
    },
    /// The checksum does not match the contents.
    #[error("checksum {stored:#010x} does not match the contents ({computed:#010x})")]
    ChecksumMismatch {
        /// Checksum in the header.
        stored: u32,
        /// Checksum of the bytes.
        computed: u32,
    },
    /// A reserved field or padding byte is not zero.
    #[error("reserved bytes of {field} at offset {offset} are not zero")]
    ReservedNotZero {
        /// Which field.
        field: &'static str,
        /// Offset of the field.
        offset: usize,
    },
    /// More sessions than [`MAX_SESSIONS`].
    #[error("{count} sessions, at most {max} allowed")]
    TooManySessions {
        /// Sessions found.
        count: u64,
        /// The bound.
        max: usize,
    },
    /// More files than [`MAX_FILES`] (`ENOSPC`).
    #[error("{count} files, at most {max} allowed (ENOSPC)")]
    TooManyFiles {
        /// Files found.
        count: u64,
        /// The bound.
        max: usize,
    },
    /// The tables and data area do not add up to the total length.
    #[error("layout does not add up: {detail}")]
    Layout {
        /// What does not add up.
        detail: String,
    },
    /// A session name is not 1..=63 bytes of UTF-8 without NUL, NUL-padded.
    #[error("session {index}: bad name: {reason}")]
    BadSessionName {
        /// Index of the session.
        index: usize,
        /// What is wrong.
        reason: &'static str,
    },
    /// Two sessions have the same name (`EEXIST`).
    #[error("two sessions are named {name} (EEXIST)")]
    DuplicateSession {
        /// The name.
        name: SessionName,
    },
    /// A compatible string is not 1..=47 printable ASCII bytes, NUL-padded.
    #[error("file {index}: bad compatible string")]
    BadCompatible {
        /// Index of the file.
        index: usize,
    },
    /// Two files of a session have the same token (`EEXIST`).
    #[error("session {session} has token {token} twice (EEXIST)")]
    DuplicateToken {
        /// The session.
        session: SessionName,
        /// The token.
        token: Token,
    },
    /// A file's data range is not where the canonical layout puts it.
    #[error(
        "file {index}: data at {offset} (+{length}) where the layout expects offset {expected}"
    )]
    BadDataRange {
        /// Index of the file.
        index: usize,
        /// Offset found.
        offset: u64,
        /// Length found.
        length: u64,
        /// Offset expected.
        expected: u64,
    },
    /// A delta does not fit the record it is applied to.
    #[error("the delta does not match the offer: {detail}")]
    DeltaMismatch {
        /// What does not match.
        detail: String,
    },
    /// A full record was expected and a delta came, or the other way round.
    #[error("expected a {expected} record")]
    WrongKind {
        /// "full" or "delta".
        expected: &'static str,
    },
}

impl RecordError {
    /// The errno for this failure.
    pub fn errno(&self) -> i32 {
        match self {
            RecordError::TooLong { .. } => libc::EFBIG,
            RecordError::UnsupportedVersion { .. } => libc::EOPNOTSUPP,
            RecordError::TooManyFiles { .. } => libc::ENOSPC,
            RecordError::DuplicateSession { .. } | RecordError::DuplicateToken { .. } => {
                libc::EEXIST
            }
            _ => libc::EINVAL,
        }
    }
}

impl From<Truncated> for RecordError {
    fn from(truncated: Truncated) -> RecordError {
        RecordError::Truncated {
            offset: truncated.offset,
            needed: truncated.needed,
        }
    }
}

/// CRC-32 of a record with its checksum field taken as zero.
pub fn checksum(bytes: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    let (before, rest) = bytes.split_at(wire::CHECKSUM_OFFSET.min(bytes.len()));
    hasher.update(before);
    hasher.update(&[0; 4][..rest.len().min(4)]);
    hasher.update(rest.get(4..).unwrap_or(&[]));
    hasher.finalize()
}

impl Record {
    /// A full record of `sessions`.
    pub fn full(sessions: Vec<SessionRecord>) -> Record {
        Record {
            kind: RecordKind::Full,
            sessions,
        }
    }

    /// Number of files in all sessions.
    pub fn file_count(&self) -> usize {
        self.sessions
            .iter()
            .map(|session| session.files.len())
            .sum()
    }

    /// Every file with its session, in record (= fd list) order.
    pub fn files(&self) -> impl Iterator<Item = (&SessionRecord, &FileRecord)> {
        self.sessions
            .iter()
            .flat_map(|session| session.files.iter().map(move |file| (session, file)))
    }

    /// Checks the rules [`Record::decode`] enforces that the types do not:
    /// bounds, unique names and tokens.
    ///
    /// # Errors
    /// [`RecordError::TooManySessions`], [`RecordError::TooManyFiles`]
    /// (`ENOSPC`), [`RecordError::DuplicateSession`] and
    /// [`RecordError::DuplicateToken`] (`EEXIST`).
    pub fn validate(&self) -> Result<(), RecordError> {
        if self.sessions.len() > MAX_SESSIONS {
            return Err(RecordError::TooManySessions {
                count: self.sessions.len() as u64,
                max: MAX_SESSIONS,
            });
        }
        let files = self.file_count();
        if files > MAX_FILES {
            return Err(RecordError::TooManyFiles {
                count: files as u64,
                max: MAX_FILES,
            });
        }
        let mut names = HashSet::new();
        for session in &self.sessions {
            if !names.insert(&session.name) {
                return Err(RecordError::DuplicateSession {
                    name: session.name.clone(),
                });
            }
            let mut tokens = HashSet::new();
            for file in &session.files {
                if !tokens.insert(file.token) {
                    return Err(RecordError::DuplicateToken {
                        session: session.name.clone(),
                        token: file.token,
                    });
                }
            }
        }
        Ok(())
    }

    /// Encodes the record in its one canonical form.
    ///
    /// # Errors
    /// Those of [`Record::validate`], and [`RecordError::TooLong`] (`EFBIG`)
    /// when the result would exceed [`MAX_RECORD_LEN`].
    pub fn encode(&self) -> Result<Vec<u8>, RecordError> {
        self.validate()?;
        let files = self.file_count();
        let mut data_len: u64 = 0;
        for (_, file) in self.files() {
            data_len =
                align_data(data_len + file.data.len() as u64).ok_or(RecordError::TooLong {
                    length: u64::MAX,
                    max: MAX_RECORD_LEN,
                })?;
        }
        let total = (wire::HEADER_LEN
            + wire::SESSION_ENTRY_LEN * self.sessions.len()
            + wire::FILE_ENTRY_LEN * files) as u64
            + data_len;
        if total > MAX_RECORD_LEN as u64 {
            return Err(RecordError::TooLong {
                length: total,
                max: MAX_RECORD_LEN,
            });
        }
        let mut out = Vec::with_capacity(total as usize);
        let mut writer = WireWriter::new(&mut out);
        HeaderWire {
            magic: wire::MAGIC,
            version: wire::VERSION,
            header_len: wire::HEADER_LEN as u16,
            flags: match self.kind {
                RecordKind::Full => 0,
                RecordKind::Delta => wire::FLAG_DELTA,
            },
            total_len: total,
            checksum: 0,
            session_count: self.sessions.len() as u32,
            file_count: files as u32,
            reserved0: 0,
            data_len,
            reserved1: [0; 16],
        }
        .write(&mut writer);
        for session in &self.sessions {
            let mut name = [0u8; 64];
            copy_into(&mut name, session.name.as_str().as_bytes());
            SessionWire {
                name,
                file_count: session.files.len() as u32,
                reserved0: 0,
                reserved1: 0,
            }
            .write(&mut writer);
        }
        let mut offset = 0u64;
        for (_, file) in self.files() {
            let mut compatible = [0u8; 48];
            copy_into(&mut compatible, file.compatible.name().as_bytes());
            FileWire {
                compatible,
                version: file.compatible.version(),
                reserved0: 0,
                token: file.token.0,
                device: file.identity.device,
                inode: file.identity.inode,
                data_offset: offset,
                data_len: file.data.len() as u64,
            }
            .write(&mut writer);
            offset = align_data(offset + file.data.len() as u64).unwrap_or(offset);
        }
        for (_, file) in self.files() {
            writer.bytes(&file.data);
            let padded = align_data(file.data.len() as u64).unwrap_or(0) as usize;
            writer.zeros(padded.saturating_sub(file.data.len()));
        }
        let sum = checksum(&out);
        if let Some(field) = out.get_mut(wire::CHECKSUM_OFFSET..wire::CHECKSUM_OFFSET + 4) {
            field.copy_from_slice(&sum.to_le_bytes());
        }
        Ok(out)
    }

    /// Decodes and validates a record.
    ///
    /// # Errors
    /// A [`RecordError`] naming the first check that failed (see the module
    /// documentation for their order); never panics.
    pub fn decode(bytes: &[u8]) -> Result<Record, RecordError> {
        if bytes.len() > MAX_RECORD_LEN {
            return Err(RecordError::TooLong {
                length: bytes.len() as u64,
                max: MAX_RECORD_LEN,
            });
        }
        let mut reader = WireReader::new(bytes, 0);
        let header = HeaderWire::read(&mut reader)?;
        let kind = check_header(&header, bytes)?;
        let sessions_wire = read_sessions(&mut reader, &header)?;
        let files_wire = read_files(&mut reader, &header)?;
        let data = reader.take(reader.remaining())?;
        let data_base = bytes.len() - data.len();
        let mut files = decode_files(&files_wire, data, data_base)?.into_iter();
        let mut sessions = Vec::with_capacity(sessions_wire.len());
        for (index, entry) in sessions_wire.iter().enumerate() {
            let name = decode_session_name(index, &entry.name)?;
            let session_files = files.by_ref().take(entry.file_count as usize).collect();
            sessions.push(SessionRecord {
                name,
                files: session_files,
            });
        }
        let record = Record { kind, sessions };
        record.validate()?;
        Ok(record)
    }

    /// Replaces the data of every file named in `delta` (a delta record):
    /// how a transfer successor turns the offer it holds into the final
    /// record.
    ///
    /// # Errors
    /// [`RecordError::WrongKind`] if `self` is not full or `delta` is not a
    /// delta; [`RecordError::DeltaMismatch`] if the delta names a session or
    /// token the record lacks, or a file with another handler or identity.
    /// On error `self` is unchanged.
    pub fn apply_delta(&mut self, delta: &Record) -> Result<(), RecordError> {
        if self.kind != RecordKind::Full {
            return Err(RecordError::WrongKind { expected: "full" });
        }
        if delta.kind != RecordKind::Delta {
            return Err(RecordError::WrongKind { expected: "delta" });
        }
        let mut updated = self.clone();
        for changed_session in &delta.sessions {
            let session = updated
                .sessions
                .iter_mut()
                .find(|session| session.name == changed_session.name)
                .ok_or_else(|| RecordError::DeltaMismatch {
                    detail: format!("unknown session {}", changed_session.name),
                })?;
            for changed in &changed_session.files {
                let file = session
                    .files
                    .iter_mut()
                    .find(|file| file.token == changed.token)
                    .ok_or_else(|| RecordError::DeltaMismatch {
                        detail: format!("session {} has no token {}", session.name, changed.token),
                    })?;
                if file.compatible != changed.compatible || file.identity != changed.identity {
                    return Err(RecordError::DeltaMismatch {
                        detail: format!(
                            "token {} of session {} is another file",
                            changed.token, session.name
                        ),
                    });
                }
                file.data.clone_from(&changed.data);
            }
        }
        *self = updated;
        Ok(())
    }

    /// The delta that turns `offer` into `self`: every file whose data
    /// differs, grouped by session. `None` when the two do not have the same
    /// sessions and files (names, tokens, handlers, identities, order), in
    /// which case no delta can express the change.
    pub fn delta_from(&self, offer: &Record) -> Option<Record> {
        if self.sessions.len() != offer.sessions.len() {
            return None;
        }
        let mut sessions = Vec::new();
        for (now, before) in self.sessions.iter().zip(&offer.sessions) {
            if now.name != before.name || now.files.len() != before.files.len() {
                return None;
            }
            let mut changed = Vec::new();
            for (file, old) in now.files.iter().zip(&before.files) {
                if file.token != old.token
                    || file.compatible != old.compatible
                    || file.identity != old.identity
                {
                    return None;
                }
                if file.data != old.data {
                    changed.push(file.clone());
                }
            }
            if !changed.is_empty() {
                sessions.push(SessionRecord {
                    name: now.name.clone(),
                    files: changed,
                });
            }
        }
        Some(Record {
            kind: RecordKind::Delta,
            sessions,
        })
    }
}

fn copy_into(field: &mut [u8], value: &[u8]) {
    for (slot, byte) in field.iter_mut().zip(value) {
        *slot = *byte;
    }
}

fn check_header(header: &HeaderWire, bytes: &[u8]) -> Result<RecordKind, RecordError> {
    if header.magic != wire::MAGIC {
        return Err(RecordError::BadMagic {
            found: header.magic,
        });
    }
    if header.version != wire::VERSION {
        return Err(RecordError::UnsupportedVersion {
            found: header.version,
        });
    }
    if usize::from(header.header_len) != wire::HEADER_LEN {
        return Err(RecordError::BadHeaderLength {
            found: header.header_len,
        });
    }
    if header.flags & !wire::FLAG_DELTA != 0 {
        return Err(RecordError::UnknownFlags {
            flags: header.flags,
        });
    }
    if header.reserved0 != 0 {
        return Err(RecordError::ReservedNotZero {
            field: "header reserved word",
            offset: 36,
        });
    }
    if header.reserved1 != [0; 16] {
        return Err(RecordError::ReservedNotZero {
            field: "header reserved tail",
            offset: 48,
        });
    }
    if header.total_len != bytes.len() as u64 {
        return Err(RecordError::LengthMismatch {
            declared: header.total_len,
            actual: bytes.len(),
        });
    }
    let computed = checksum(bytes);
    if computed != header.checksum {
        return Err(RecordError::ChecksumMismatch {
            stored: header.checksum,
            computed,
        });
    }
    check_layout(header)?;
    Ok(if header.flags & wire::FLAG_DELTA != 0 {
        RecordKind::Delta
    } else {
        RecordKind::Full
    })
}

fn check_layout(header: &HeaderWire) -> Result<(), RecordError> {
    if header.session_count as usize > MAX_SESSIONS {
        return Err(RecordError::TooManySessions {
            count: header.session_count.into(),
            max: MAX_SESSIONS,
        });
    }
    if header.file_count as usize > MAX_FILES {
        return Err(RecordError::TooManyFiles {
            count: header.file_count.into(),
            max: MAX_FILES,
        });
    }
    if !header.data_len.is_multiple_of(wire::DATA_ALIGN) {
        return Err(RecordError::Layout {
            detail: format!("data length {} is not a multiple of 8", header.data_len),
        });
    }
    // Both counts are bounded above, so the table sizes cannot overflow.
    let tables = (wire::HEADER_LEN
        + wire::SESSION_ENTRY_LEN * header.session_count as usize
        + wire::FILE_ENTRY_LEN * header.file_count as usize) as u64;
    if tables.checked_add(header.data_len) != Some(header.total_len) {
        return Err(RecordError::Layout {
            detail: format!(
                "{} bytes of tables plus {} bytes of data is not the total of {}",
                tables, header.data_len, header.total_len
            ),
        });
    }
    Ok(())
}

fn read_sessions(
    reader: &mut WireReader<'_>,
    header: &HeaderWire,
) -> Result<Vec<SessionWire>, RecordError> {
    let mut sessions = Vec::with_capacity(header.session_count as usize);
    let mut files: u64 = 0;
    for _ in 0..header.session_count {
        let offset = reader.position();
        let entry = SessionWire::read(reader)?;
        if entry.reserved0 != 0 || entry.reserved1 != 0 {
            return Err(RecordError::ReservedNotZero {
                field: "session entry",
                offset: offset + 64,
            });
        }
        files += u64::from(entry.file_count);
        sessions.push(entry);
    }
    if files != u64::from(header.file_count) {
        return Err(RecordError::Layout {
            detail: format!(
                "the sessions hold {files} files, the header says {}",
                header.file_count
            ),
        });
    }
    Ok(sessions)
}

fn read_files(
    reader: &mut WireReader<'_>,
    header: &HeaderWire,
) -> Result<Vec<FileWire>, RecordError> {
    let mut files = Vec::with_capacity(header.file_count as usize);
    for _ in 0..header.file_count {
        let offset = reader.position();
        let entry = FileWire::read(reader)?;
        if entry.reserved0 != 0 {
            return Err(RecordError::ReservedNotZero {
                field: "file entry",
                offset: offset + 52,
            });
        }
        files.push(entry);
    }
    Ok(files)
}

fn decode_files(
    entries: &[FileWire],
    data: &[u8],
    data_base: usize,
) -> Result<Vec<FileRecord>, RecordError> {
    let mut files = Vec::with_capacity(entries.len());
    let mut expected: u64 = 0;
    for (index, entry) in entries.iter().enumerate() {
        let name = decode_padded(&entry.compatible).ok_or(RecordError::BadCompatible { index })?;
        let compatible = Compatible::new(name, entry.version)
            .map_err(|_| RecordError::BadCompatible { index })?;
        let end = entry.data_offset.checked_add(entry.data_len);
        let in_range = end.is_some_and(|end| end <= data.len() as u64);
        if entry.data_offset != expected || !in_range {
            return Err(RecordError::BadDataRange {
                index,
                offset: entry.data_offset,
                length: entry.data_len,
                expected,
            });
        }
        let start = entry.data_offset as usize;
        let stop = start + entry.data_len as usize;
        let padded = align_data(stop as u64).unwrap_or(u64::MAX) as usize;
        let (Some(bytes), Some(padding)) = (data.get(start..stop), data.get(stop..padded)) else {
            return Err(RecordError::BadDataRange {
                index,
                offset: entry.data_offset,
                length: entry.data_len,
                expected,
            });
        };
        if padding.iter().any(|byte| *byte != 0) {
            return Err(RecordError::ReservedNotZero {
                field: "data padding",
                offset: data_base + stop,
            });
        }
        expected = padded as u64;
        files.push(FileRecord {
            compatible,
            token: Token(entry.token),
            identity: FileIdentity {
                device: entry.device,
                inode: entry.inode,
            },
            data: bytes.to_vec(),
        });
    }
    if expected != data.len() as u64 {
        return Err(RecordError::Layout {
            detail: format!(
                "the files' data ends at {expected}, the data area has {} bytes",
                data.len()
            ),
        });
    }
    Ok(files)
}

/// The text before the first NUL of a NUL-padded field, if every byte after
/// it is NUL too and the text is non-empty UTF-8.
fn decode_padded(field: &[u8]) -> Option<&str> {
    let length = field.iter().position(|byte| *byte == 0)?;
    let (text, padding) = field.split_at(length);
    if text.is_empty() || padding.iter().any(|byte| *byte != 0) {
        return None;
    }
    std::str::from_utf8(text).ok()
}

fn decode_session_name(index: usize, field: &[u8; 64]) -> Result<SessionName, RecordError> {
    let text = decode_padded(field).ok_or(RecordError::BadSessionName {
        index,
        reason: "not 1..=63 bytes of UTF-8 followed by NUL padding",
    })?;
    SessionName::new(text).map_err(|_| RecordError::BadSessionName {
        index,
        reason: "not a valid session name",
    })
}

#[cfg(test)]
mod tests;
