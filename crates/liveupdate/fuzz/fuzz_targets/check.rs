// Shared by both targets: decode, and whatever decodes must re-encode to
// the same bytes; the data of known handlers must decode without panicking.

use liveupdate::handlers::gmem_data::{self, GmemData};
use liveupdate::handlers::memfd::{self, MemfdData};
use liveupdate::record::Record;

pub fn check(bytes: &[u8]) {
    let Ok(record) = Record::decode(bytes) else {
        return;
    };
    let encoded = record.encode().expect("a decoded record encodes");
    assert_eq!(encoded, bytes, "decode accepted a non-canonical record");
    for (_, file) in record.files() {
        match file.compatible.name() {
            memfd::MEMFD_COMPATIBLE => {
                if let Ok(data) = MemfdData::decode(&file.data) {
                    assert_eq!(data.encode(), file.data);
                }
            }
            gmem_data::GMEM_COMPATIBLE => {
                if let Ok(data) = GmemData::decode(&file.data) {
                    assert_eq!(data.encode(), file.data);
                    assert_eq!(data.folios().count() as u64, data.folio_count());
                }
            }
            _ => {}
        }
    }
}
