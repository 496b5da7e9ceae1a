//! Writes valid handover records into a directory, as a seed corpus for the
//! fuzz targets (so the fuzzer starts from records with memfd and gmem data
//! instead of having to discover the layout):
//!
//! ```text
//! cargo run -p liveupdate --example fuzz_seeds -- crates/liveupdate/fuzz/corpus/record_decode_resealed
//! ```

use liveupdate::handlers::gmem_data::{BackendCode, GmemData, PolicyRange};
use liveupdate::handlers::memfd::MemfdData;
use liveupdate::record::{FileRecord, Record, RecordKind, SessionRecord};
use liveupdate::{Compatible, FileIdentity, SessionName, Token};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let directory = std::env::args()
        .nth(1)
        .ok_or("usage: fuzz_seeds DIRECTORY")?;
    std::fs::create_dir_all(&directory)?;
    let identity = FileIdentity {
        device: 0x12,
        inode: 4242,
    };
    let gmem =
        |backend, size, folios: Vec<(u64, u8)>| -> Result<Vec<u8>, Box<dyn std::error::Error>> {
            let policies = vec![PolicyRange {
                first_page: 0,
                end_page: 512,
                mode: 3,
                nodemask: 1,
            }];
            Ok(GmemData::from_folios(size, 3, backend, policies, folios)?.encode())
        };
    let memfd = MemfdData {
        size: 65536,
        position: 12345,
        seals: (libc::F_SEAL_GROW | libc::F_SEAL_SHRINK) as u32,
    }
    .encode();
    let small = gmem(
        BackendCode::Memfd,
        32 << 20,
        (0..64).chain(100..110).map(|page| (page, 0)).collect(),
    )?;
    let huge = gmem(
        BackendCode::Hugetlb,
        32 << 20,
        vec![(0, 9), (512, 9), (2048, 9)],
    )?;
    let file = |compatible: &str,
                token: u64,
                data: &[u8]|
     -> Result<FileRecord, Box<dyn std::error::Error>> {
        Ok(FileRecord {
            compatible: Compatible::new(compatible, 1)?,
            token: Token(token),
            identity: FileIdentity {
                inode: identity.inode + token,
                ..identity
            },
            data: data.to_vec(),
        })
    };
    let full = Record::full(vec![
        SessionRecord {
            name: SessionName::new("vm0")?,
            files: vec![
                file("gmem", 0, &small)?,
                file("gmem", 1, &huge)?,
                file("memfd", 2, &memfd)?,
            ],
        },
        SessionRecord {
            name: SessionName::new("empty")?,
            files: vec![],
        },
    ]);
    let delta = Record {
        kind: RecordKind::Delta,
        sessions: vec![SessionRecord {
            name: SessionName::new("vm0")?,
            files: vec![file("memfd", 2, &memfd)?],
        }],
    };
    for (name, record) in [
        ("full", full),
        ("delta", delta),
        ("empty", Record::full(vec![])),
    ] {
        std::fs::write(format!("{directory}/seed-{name}"), record.encode()?)?;
    }
    println!("wrote 3 seed records to {directory}");
    Ok(())
}
