//! On-wire layouts of the handover record, field by field.
//!
//! These structs are the bytes and nothing else: fixed sizes, little-endian
//! integers, raw byte arrays for strings. They are read and written only
//! through [`WireReader`] and [`WireWriter`], which never index out of range
//! (every read is `split_first_chunk`, a short input is an error). Meaning
//! and validation live in the parent module, which converts them into the
//! in-memory types; the two are kept apart so that a change of the in-memory
//! model can never silently change the format.
//!
//! Record layout (version 1), all integers little-endian:
//!
//! ```text
//! Header, 64 bytes, at offset 0
//!   0  [u8; 8] magic          b"GMEMLUR\0"
//!   8  u16     version        1
//!  10  u16     header_len     64
//!  12  u32     flags          bit 0: DELTA (a transfer switch delta); others 0
//!  16  u64     total_len      length of the whole record in bytes
//!  24  u32     checksum       CRC-32 (IEEE 802.3) of all total_len bytes,
//!                             computed with these four bytes as zero
//!  28  u32     session_count  entries in the session table
//!  32  u32     file_count     entries in the file table
//!  36  u32     reserved       0
//!  40  u64     data_len       length of the data area (a multiple of 8)
//!  48  [u8;16] reserved       0
//! Session table, session_count entries of 80 bytes, at offset 64
//!   0  [u8;64] name           1..=63 bytes of UTF-8, NUL-padded, no NUL inside
//!  64  u32     file_count     this session's files: the next file_count
//!                             entries of the file table, in preservation order
//!  68  u32     reserved       0
//!  72  u64     reserved       0
//! File table, file_count entries of 96 bytes, after the session table
//!   0  [u8;48] compatible     handler string, 1..=47 bytes 0x21..=0x7e, NUL-padded
//!  48  u32     version        version of the handler's data
//!  52  u32     reserved       0
//!  56  u64     token          the caller's token (unique in its session)
//!  64  u64     device         st_dev of the file
//!  72  u64     inode          st_ino of the file
//!  80  u64     data_offset    offset of the handler data in the data area
//!  88  u64     data_len       its length
//! Data area, data_len bytes, after the file table
//!   the handler data of each file in file-table order, each starting at the
//!   previous end rounded up to 8; padding bytes are 0.
//! ```
//!
//! File `i` of the record is fd `i` of the fd list that travels with it.

/// The record's magic bytes.
pub const MAGIC: [u8; 8] = *b"GMEMLUR\0";
/// The only version this code reads and writes.
pub const VERSION: u16 = 1;
/// Bytes of the header.
pub const HEADER_LEN: usize = 64;
/// Bytes of one session-table entry.
pub const SESSION_ENTRY_LEN: usize = 80;
/// Bytes of one file-table entry.
pub const FILE_ENTRY_LEN: usize = 96;
/// Offset of the checksum field in the header.
pub const CHECKSUM_OFFSET: usize = 24;
/// Header flag: the record is a delta sent at a transfer switch.
pub const FLAG_DELTA: u32 = 1;
/// Every handler data item starts at a multiple of this.
pub const DATA_ALIGN: u64 = 8;

/// A read ran past the end of the input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Truncated {
    /// Offset where the read started.
    pub offset: usize,
    /// Bytes it needed.
    pub needed: usize,
}

/// Sequential little-endian reader over a byte slice that never panics.
pub struct WireReader<'a> {
    rest: &'a [u8],
    position: usize,
}

impl<'a> WireReader<'a> {
    /// Starts reading `bytes` at its first byte, which has offset `base`
    /// in the enclosing record (for error messages).
    pub fn new(bytes: &'a [u8], base: usize) -> WireReader<'a> {
        WireReader {
            rest: bytes,
            position: base,
        }
    }

    /// The offset of the next byte to read.
    pub fn position(&self) -> usize {
        self.position
    }

    /// Bytes left.
    pub fn remaining(&self) -> usize {
        self.rest.len()
    }

    /// Reads a fixed-size array.
    pub fn array<const N: usize>(&mut self) -> Result<[u8; N], Truncated> {
        let (head, tail) = self.rest.split_first_chunk::<N>().ok_or(Truncated {
            offset: self.position,
            needed: N,
        })?;
        self.rest = tail;
        self.position += N;
        Ok(*head)
    }

    /// Reads `length` bytes.
    pub fn take(&mut self, length: usize) -> Result<&'a [u8], Truncated> {
        if length > self.rest.len() {
            return Err(Truncated {
                offset: self.position,
                needed: length,
            });
        }
        let (head, tail) = self.rest.split_at(length);
        self.rest = tail;
        self.position += length;
        Ok(head)
    }

    /// Reads a `u8`.
    pub fn u8(&mut self) -> Result<u8, Truncated> {
        Ok(u8::from_le_bytes(self.array()?))
    }

    /// Reads a little-endian `u16`.
    pub fn u16(&mut self) -> Result<u16, Truncated> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    /// Reads a little-endian `u32`.
    pub fn u32(&mut self) -> Result<u32, Truncated> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    /// Reads a little-endian `u64`.
    pub fn u64(&mut self) -> Result<u64, Truncated> {
        Ok(u64::from_le_bytes(self.array()?))
    }
}

/// Appends little-endian fields to a byte vector.
pub struct WireWriter<'a> {
    out: &'a mut Vec<u8>,
}

impl<'a> WireWriter<'a> {
    /// Appends to `out`.
    pub fn new(out: &'a mut Vec<u8>) -> WireWriter<'a> {
        WireWriter { out }
    }

    /// Appends raw bytes.
    pub fn bytes(&mut self, bytes: &[u8]) {
        self.out.extend_from_slice(bytes);
    }

    /// Appends a `u8`.
    pub fn u8(&mut self, value: u8) {
        self.out.push(value);
    }

    /// Appends a little-endian `u16`.
    pub fn u16(&mut self, value: u16) {
        self.bytes(&value.to_le_bytes());
    }

    /// Appends a little-endian `u32`.
    pub fn u32(&mut self, value: u32) {
        self.bytes(&value.to_le_bytes());
    }

    /// Appends a little-endian `u64`.
    pub fn u64(&mut self, value: u64) {
        self.bytes(&value.to_le_bytes());
    }

    /// Appends zero bytes.
    pub fn zeros(&mut self, count: usize) {
        self.out.resize(self.out.len() + count, 0);
    }
}

/// The record header as it lies on the wire.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeaderWire {
    /// Offset 0.
    pub magic: [u8; 8],
    /// Offset 8.
    pub version: u16,
    /// Offset 10.
    pub header_len: u16,
    /// Offset 12.
    pub flags: u32,
    /// Offset 16.
    pub total_len: u64,
    /// Offset 24.
    pub checksum: u32,
    /// Offset 28.
    pub session_count: u32,
    /// Offset 32.
    pub file_count: u32,
    /// Offset 36.
    pub reserved0: u32,
    /// Offset 40.
    pub data_len: u64,
    /// Offset 48.
    pub reserved1: [u8; 16],
}

impl HeaderWire {
    /// Reads the 64 header bytes.
    pub fn read(reader: &mut WireReader<'_>) -> Result<HeaderWire, Truncated> {
        Ok(HeaderWire {
            magic: reader.array()?,
            version: reader.u16()?,
            header_len: reader.u16()?,
            flags: reader.u32()?,
            total_len: reader.u64()?,
            checksum: reader.u32()?,
            session_count: reader.u32()?,
            file_count: reader.u32()?,
            reserved0: reader.u32()?,
            data_len: reader.u64()?,
            reserved1: reader.array()?,
        })
    }

    /// Writes the 64 header bytes.
    pub fn write(&self, writer: &mut WireWriter<'_>) {
        writer.bytes(&self.magic);
        writer.u16(self.version);
        writer.u16(self.header_len);
        writer.u32(self.flags);
        writer.u64(self.total_len);
        writer.u32(self.checksum);
        writer.u32(self.session_count);
        writer.u32(self.file_count);
        writer.u32(self.reserved0);
        writer.u64(self.data_len);
        writer.bytes(&self.reserved1);
    }
}

/// One session-table entry as it lies on the wire.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionWire {
    /// Offset 0: NUL-padded name.
    pub name: [u8; 64],
    /// Offset 64.
    pub file_count: u32,
    /// Offset 68.
    pub reserved0: u32,
    /// Offset 72.
    pub reserved1: u64,
}

impl SessionWire {
    /// Reads 80 bytes.
    pub fn read(reader: &mut WireReader<'_>) -> Result<SessionWire, Truncated> {
        Ok(SessionWire {
            name: reader.array()?,
            file_count: reader.u32()?,
            reserved0: reader.u32()?,
            reserved1: reader.u64()?,
        })
    }

    /// Writes 80 bytes.
    pub fn write(&self, writer: &mut WireWriter<'_>) {
        writer.bytes(&self.name);
        writer.u32(self.file_count);
        writer.u32(self.reserved0);
        writer.u64(self.reserved1);
    }
}

/// One file-table entry as it lies on the wire.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileWire {
    /// Offset 0: NUL-padded compatible string.
    pub compatible: [u8; 48],
    /// Offset 48.
    pub version: u32,
    /// Offset 52.
    pub reserved0: u32,
    /// Offset 56.
    pub token: u64,
    /// Offset 64.
    pub device: u64,
    /// Offset 72.
    pub inode: u64,
    /// Offset 80.
    pub data_offset: u64,
    /// Offset 88.
    pub data_len: u64,
}

impl FileWire {
    /// Reads 96 bytes.
    pub fn read(reader: &mut WireReader<'_>) -> Result<FileWire, Truncated> {
        Ok(FileWire {
            compatible: reader.array()?,
            version: reader.u32()?,
            reserved0: reader.u32()?,
            token: reader.u64()?,
            device: reader.u64()?,
            inode: reader.u64()?,
            data_offset: reader.u64()?,
            data_len: reader.u64()?,
        })
    }

    /// Writes 96 bytes.
    pub fn write(&self, writer: &mut WireWriter<'_>) {
        writer.bytes(&self.compatible);
        writer.u32(self.version);
        writer.u32(self.reserved0);
        writer.u64(self.token);
        writer.u64(self.device);
        writer.u64(self.inode);
        writer.u64(self.data_offset);
        writer.u64(self.data_len);
    }
}

/// Rounds `value` up to a multiple of [`DATA_ALIGN`]; `None` on overflow.
pub fn align_data(value: u64) -> Option<u64> {
    value
        .checked_add(DATA_ALIGN - 1)
        .map(|sum| sum & !(DATA_ALIGN - 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn written_len(write: impl FnOnce(&mut WireWriter<'_>)) -> usize {
        let mut out = Vec::new();
        write(&mut WireWriter::new(&mut out));
        out.len()
    }

    #[test]
    fn struct_sizes_match_the_documented_layout() {
        let header = HeaderWire {
            magic: MAGIC,
            version: 1,
            header_len: 64,
            flags: 0,
            total_len: 0,
            checksum: 0,
            session_count: 0,
            file_count: 0,
            reserved0: 0,
            data_len: 0,
            reserved1: [0; 16],
        };
        assert_eq!(written_len(|w| header.write(w)), HEADER_LEN);
        let session = SessionWire {
            name: [0; 64],
            file_count: 0,
            reserved0: 0,
            reserved1: 0,
        };
        assert_eq!(written_len(|w| session.write(w)), SESSION_ENTRY_LEN);
        let file = FileWire {
            compatible: [0; 48],
            version: 0,
            reserved0: 0,
            token: 0,
            device: 0,
            inode: 0,
            data_offset: 0,
            data_len: 0,
        };
        assert_eq!(written_len(|w| file.write(w)), FILE_ENTRY_LEN);
    }

    #[test]
    fn header_fields_sit_at_their_documented_offsets() {
        let header = HeaderWire {
            magic: MAGIC,
            version: 0x0102,
            header_len: 0x0304,
            flags: 0x0506_0708,
            total_len: 0x1112_1314_1516_1718,
            checksum: 0x2122_2324,
            session_count: 0x3132_3334,
            file_count: 0x4142_4344,
            reserved0: 0,
            data_len: 0x5152_5354_5556_5758,
            reserved1: [0; 16],
        };
        let mut out = Vec::new();
        header.write(&mut WireWriter::new(&mut out));
        assert_eq!(&out[8..10], &[0x02, 0x01]);
        assert_eq!(&out[16..24], &0x1112_1314_1516_1718u64.to_le_bytes());
        assert_eq!(
            &out[CHECKSUM_OFFSET..CHECKSUM_OFFSET + 4],
            &0x2122_2324u32.to_le_bytes()
        );
        assert_eq!(&out[40..48], &0x5152_5354_5556_5758u64.to_le_bytes());
        let read = HeaderWire::read(&mut WireReader::new(&out, 0)).unwrap();
        assert_eq!(read, header);
    }

    #[test]
    fn short_reads_are_errors() {
        let mut reader = WireReader::new(&[1, 2, 3], 10);
        assert_eq!(
            reader.u32(),
            Err(Truncated {
                offset: 10,
                needed: 4
            })
        );
        assert_eq!(reader.u16(), Ok(0x0201));
        assert!(reader.take(2).is_err());
        assert_eq!(reader.take(1), Ok(&[3u8][..]));
    }
}
