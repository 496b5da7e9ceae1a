//! `gmemctl inspect RECORD`: decodes a handover record (a file, a live
//! record memfd as `/proc/PID/fd/N`, or `-` for stdin) and prints it for a
//! human, including the data of the handlers it knows (memfd, gmem).
//!
//! A record that does not validate is reported with the decoder's reason
//! and a non-zero exit status.

use std::fmt::Write as _;
use std::io::Read;
use std::path::PathBuf;

use anyhow::{Context, bail};
use liveupdate::handlers::gmem_data::{self, BackendCode, GmemData};
use liveupdate::handlers::memfd::{self, MemfdData};
use liveupdate::record::{FileRecord, MAX_RECORD_LEN, Record, RecordKind, checksum};

/// Arguments of `gmemctl inspect`.
#[derive(Debug, clap::Args)]
pub struct Arguments {
    /// The record: a path, or `-` for stdin.
    record: PathBuf,
    /// Print every folio run and policy range (default: the first 16).
    #[arg(long)]
    all: bool,
}

/// Runs `gmemctl inspect`.
pub fn run(arguments: Arguments) -> anyhow::Result<()> {
    let bytes = read_bounded(&arguments.record)?;
    let record = match Record::decode(&bytes) {
        Ok(record) => record,
        Err(error) => bail!(
            "{} is not a valid handover record: {error}",
            arguments.record.display()
        ),
    };
    print!("{}", describe_header(&record, &bytes));
    print!("{}", render(&record, arguments.all));
    Ok(())
}

fn read_bounded(path: &PathBuf) -> anyhow::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    let limit = MAX_RECORD_LEN as u64 + 1;
    if path.as_os_str() == "-" {
        std::io::stdin().take(limit).read_to_end(&mut bytes)?;
    } else {
        std::fs::File::open(path)
            .with_context(|| format!("opening {}", path.display()))?
            .take(limit)
            .read_to_end(&mut bytes)
            .with_context(|| format!("reading {}", path.display()))?;
    }
    Ok(bytes)
}

fn describe_header(record: &Record, bytes: &[u8]) -> String {
    let kind = match record.kind {
        RecordKind::Full => "full",
        RecordKind::Delta => "delta",
    };
    format!(
        "record: version 1, {kind}, {} sessions, {} files, {} bytes, checksum {:#010x} (valid)\n",
        record.sessions.len(),
        record.file_count(),
        bytes.len(),
        checksum(bytes)
    )
}

/// The sessions and files of `record`, one block per session.
pub fn render(record: &Record, all: bool) -> String {
    let mut out = String::new();
    for session in &record.sessions {
        let _ = writeln!(
            out,
            "session {:?} ({} files)",
            session.name.as_str(),
            session.files.len()
        );
        for file in &session.files {
            let _ = writeln!(
                out,
                "  token {}  {}  {}  {} bytes of handler data",
                file.token,
                file.compatible,
                file.identity,
                file.data.len()
            );
            out.push_str(&render_data(file, all));
        }
    }
    out
}

fn render_data(file: &FileRecord, all: bool) -> String {
    match file.compatible.name() {
        memfd::MEMFD_COMPATIBLE if file.compatible.version() == memfd::MEMFD_DATA_VERSION => {
            match MemfdData::decode(&file.data) {
                Ok(data) => format!(
                    "    memfd: size {}, position {}, seals {}\n",
                    size(data.size),
                    data.position,
                    seals(data.seals)
                ),
                Err(error) => format!("    memfd: INVALID: {error}\n"),
            }
        }
        gmem_data::GMEM_COMPATIBLE if file.compatible.version() == gmem_data::GMEM_DATA_VERSION => {
            match GmemData::decode(&file.data) {
                Ok(data) => render_gmem(&data, all),
                Err(error) => format!("    gmem: INVALID: {error}\n"),
            }
        }
        _ => "    (handler data not known to gmemctl)\n".to_owned(),
    }
}

fn render_gmem(data: &GmemData, all: bool) -> String {
    const SHOWN: usize = 16;
    let backend = match data.backend {
        BackendCode::Kvm => "kvm guest_memfd",
        BackendCode::Memfd => "memfd",
        BackendCode::Hugetlb => "hugetlb",
    };
    let mut flags = Vec::new();
    if data.flags & 1 != 0 {
        flags.push("MMAP");
    }
    if data.flags & 2 != 0 {
        flags.push("INIT_SHARED");
    }
    let mut out = format!(
        "    gmem: size {}, flags {}, backend {backend}, {} policy ranges, {} runs, {} folios ({} populated)\n",
        size(data.size),
        if flags.is_empty() {
            "none".to_owned()
        } else {
            flags.join("|")
        },
        data.policies.len(),
        data.runs.len(),
        data.folio_count(),
        size(data.populated_bytes())
    );
    let limit = if all { usize::MAX } else { SHOWN };
    for policy in data.policies.iter().take(limit) {
        let _ = writeln!(
            out,
            "      policy pages [{}, {}) {} nodes {:#x}",
            policy.first_page,
            policy.end_page,
            policy_mode(policy.mode),
            policy.nodemask
        );
    }
    for run in data.runs.iter().take(limit) {
        let folio = if run.order == 0 { "4 KiB" } else { "2 MiB" };
        let _ = writeln!(
            out,
            "      run from page {}: {} x {folio}",
            run.first_page, run.folio_count
        );
    }
    let hidden = data.policies.len().saturating_sub(limit) + data.runs.len().saturating_sub(limit);
    if hidden > 0 {
        let _ = writeln!(out, "      ... {hidden} more lines (use --all)");
    }
    out
}

fn policy_mode(mode: u32) -> &'static str {
    match mode {
        0 => "DEFAULT",
        1 => "PREFERRED",
        2 => "BIND",
        3 => "INTERLEAVE",
        4 => "LOCAL",
        5 => "PREFERRED_MANY",
        6 => "WEIGHTED_INTERLEAVE",
        _ => "unknown",
    }
}

fn size(bytes: u64) -> String {
    const UNITS: [(u64, &str); 3] = [(1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")];
    for (unit, name) in UNITS {
        if bytes >= unit && bytes.is_multiple_of(unit) {
            return format!("{} {name}", bytes / unit);
        }
    }
    format!("{bytes} bytes")
}

fn seals(bits: u32) -> String {
    let names = [
        (libc::F_SEAL_SEAL, "SEAL"),
        (libc::F_SEAL_SHRINK, "SHRINK"),
        (libc::F_SEAL_GROW, "GROW"),
        (libc::F_SEAL_WRITE, "WRITE"),
        (libc::F_SEAL_FUTURE_WRITE, "FUTURE_WRITE"),
        (libc::F_SEAL_EXEC, "EXEC"),
    ];
    let set: Vec<&str> = names
        .iter()
        .filter(|(bit, _)| bits & *bit as u32 != 0)
        .map(|(_, name)| *name)
        .collect();
    if set.is_empty() {
        "none".to_owned()
    } else {
        set.join("|")
    }
}
