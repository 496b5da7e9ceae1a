//! The `exec` transport: the VMM process execs its new binary in place.
//!
//! Model: the process keeps its pid and its fds across `execve` unless they
//! are close-on-exec. Every fd this crate holds is close-on-exec; at the
//! handover exactly the preserved fds and one sealed memfd holding the record
//! lose the flag, so they, and only they of ours, survive into the new image.
//! Three environment variables tell the new image where they are:
//!
//! - `GMEM_LU_RECORD_FD`: the record memfd's fd number;
//! - `GMEM_LU_FDS`: the preserved fds' numbers, comma-separated, in record
//!   order (empty when no file is preserved);
//! - `GMEM_LU_PID`: the pid that exec'd. A child the new image spawns later
//!   inherits the variables but not the fds (close-on-exec again by then);
//!   its other pid makes it ignore them.
//!
//! Success path:
//! 1. [`exec_in_place`]: freeze, write and seal the record memfd, clear
//!    close-on-exec on it and on the preserved fds, `execve`.
//! 2. The new image calls [`incoming_from_environment`] once: it checks the
//!    variables, takes ownership of the fds (close-on-exec again), reads the
//!    sealed record, closes its memfd and returns the [`Incoming`] sessions.
//!
//! Failure path: `execve` fails (missing binary, `E2BIG`...): close-on-exec
//! is restored, the record memfd closed, the handover aborted (files
//! unfrozen, still preserved) and the error returned; the process carries on.

use std::ffi::CString;
use std::ffi::OsStr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::io::Errno;

use crate::error::LuError;
use crate::fdio;
use crate::handler::HandlerRegistry;
use crate::incoming::Incoming;
use crate::outgoing::LiveUpdate;
use crate::record::MAX_FILES;

/// Names the record memfd's fd number.
pub const RECORD_FD_VARIABLE: &str = "GMEM_LU_RECORD_FD";
/// Names the preserved fds' numbers, in record order.
pub const FDS_VARIABLE: &str = "GMEM_LU_FDS";
/// Names the pid that exec'd.
pub const PID_VARIABLE: &str = "GMEM_LU_PID";

/// Whether [`incoming_from_environment`] has taken the fds already.
static TAKEN: AtomicBool = AtomicBool::new(false);

/// Hands the sessions to a new program image: freezes, then execs `program`
/// (a path; no `PATH` search) with `arguments` in this process, passing this
/// process's environment plus the three variables. Returns only on failure.
///
/// # Errors
/// - those of [`LiveUpdate::freeze`] (nothing was frozen then);
/// - `Io` for the record memfd or `fcntl`, and `Io` with the errno of
///   `execve` (`ENOENT`, `EACCES`, `E2BIG`...): the handover was aborted,
///   the files are unfrozen and still preserved.
pub fn exec_in_place(live_update: &LiveUpdate, program: &Path, arguments: &[&OsStr]) -> LuError {
    let handover = match live_update.freeze() {
        Ok(handover) => handover,
        Err(error) => return error,
    };
    let record = match fdio::sealed_memfd("gmem-lu-record", handover.bytes()) {
        Ok(record) => record,
        Err(error) => {
            handover.abort();
            return error;
        }
    };
    let mut inherited: Vec<BorrowedFd<'_>> = vec![record.as_fd()];
    inherited.extend(handover.fds());
    let error = exec_with_inherited(&inherited, program, arguments);
    // Only a failed exec gets here.
    for fd in &inherited {
        let _ = fdio::set_close_on_exec(*fd, true);
    }
    drop(inherited);
    drop(record);
    tracing::warn!(program = %program.display(), %error, "exec failed; handover aborted");
    handover.abort();
    error
}

fn exec_with_inherited(
    inherited: &[BorrowedFd<'_>],
    program: &Path,
    arguments: &[&OsStr],
) -> LuError {
    let Some((record, files)) = inherited.split_first() else {
        return LuError::io("exec without a record", Errno::INVAL);
    };
    for fd in inherited {
        if let Err(errno) = fdio::set_close_on_exec(*fd, false) {
            return LuError::io("clearing close-on-exec", errno);
        }
    }
    let numbers: Vec<String> = files.iter().map(|fd| fd.as_raw_fd().to_string()).collect();
    let ours = [
        (RECORD_FD_VARIABLE, record.as_raw_fd().to_string()),
        (FDS_VARIABLE, numbers.join(",")),
        (PID_VARIABLE, std::process::id().to_string()),
    ];
    tracing::info!(program = %program.display(), files = files.len(), "exec in place");
    let errno = execve(program, arguments, &ours);
    LuError::io("execve", errno)
}

fn c_string(bytes: &[u8]) -> Result<CString, Errno> {
    CString::new(bytes).map_err(|_| Errno::INVAL)
}

/// `execve` with an environment built here rather than through the global
/// `environ`: `std::process::Command::exec` swaps `environ` for the call and
/// back when it fails, which races with other threads spawning processes.
fn execve(program: &Path, arguments: &[&OsStr], ours: &[(&str, String)]) -> Errno {
    let build = || -> Result<(CString, Vec<CString>, Vec<CString>), Errno> {
        let path = c_string(program.as_os_str().as_bytes())?;
        let mut argv = vec![path.clone()];
        for argument in arguments {
            argv.push(c_string(argument.as_bytes())?);
        }
        let mut envp = Vec::new();
        for (key, value) in std::env::vars_os() {
            if ours.iter().any(|(name, _)| key == OsStr::new(name)) {
                continue;
            }
            let mut entry = key.into_vec();
            entry.push(b'=');
            entry.extend(value.into_vec());
            envp.push(c_string(&entry)?);
        }
        for (name, value) in ours {
            envp.push(c_string(format!("{name}={value}").as_bytes())?);
        }
        Ok((path, argv, envp))
    };
    let (path, argv, envp) = match build() {
        Ok(built) => built,
        Err(errno) => return errno,
    };
    let mut argv_pointers: Vec<*const libc::c_char> = argv.iter().map(|arg| arg.as_ptr()).collect();
    argv_pointers.push(std::ptr::null());
    let mut envp_pointers: Vec<*const libc::c_char> = envp.iter().map(|var| var.as_ptr()).collect();
    envp_pointers.push(std::ptr::null());
    // SAFETY: `path`, every argv and envp string are NUL-terminated CStrings
    // that outlive the call, and both pointer arrays end with a null
    // pointer, as execve requires. On success execve does not return.
    unsafe {
        libc::execve(
            path.as_ptr(),
            argv_pointers.as_ptr(),
            envp_pointers.as_ptr(),
        )
    };
    Errno::from_io_error(&std::io::Error::last_os_error()).unwrap_or(Errno::NOEXEC)
}

fn environment_error(variable: &'static str, detail: impl Into<String>) -> LuError {
    LuError::Environment {
        variable,
        detail: detail.into(),
    }
}

fn parse_fd(variable: &'static str, text: &str) -> Result<RawFd, LuError> {
    match text.parse::<RawFd>() {
        Ok(fd) if fd >= 0 => Ok(fd),
        _ => Err(environment_error(
            variable,
            format!("{text:?} is not an fd number"),
        )),
    }
}

/// What the environment names: the record fd and the file fds.
struct Named {
    record: RawFd,
    files: Vec<RawFd>,
}

fn read_environment() -> Result<Option<Named>, LuError> {
    let Some(record) = std::env::var_os(RECORD_FD_VARIABLE) else {
        return Ok(None);
    };
    let pid = std::env::var(PID_VARIABLE).unwrap_or_default();
    if pid != std::process::id().to_string() {
        tracing::debug!(
            pid,
            "live-update variables belong to another process; ignored"
        );
        return Ok(None);
    }
    let record = parse_fd(RECORD_FD_VARIABLE, &record.to_string_lossy())?;
    let list = std::env::var(FDS_VARIABLE)
        .map_err(|_| environment_error(FDS_VARIABLE, "missing or not UTF-8"))?;
    let mut files = Vec::new();
    for item in list.split(',').filter(|item| !item.is_empty()) {
        if files.len() == MAX_FILES {
            return Err(environment_error(
                FDS_VARIABLE,
                "names more fds than a record can have",
            ));
        }
        files.push(parse_fd(FDS_VARIABLE, item)?);
    }
    let mut all: Vec<RawFd> = files.clone();
    all.push(record);
    all.sort_unstable();
    if all.windows(2).any(|pair| pair.first() == pair.get(1)) {
        return Err(environment_error(FDS_VARIABLE, "names an fd twice"));
    }
    for fd in &all {
        // SAFETY: F_GETFD reads only the descriptor table entry; on a number
        // that is not open it fails with EBADF and changes nothing.
        if unsafe { libc::fcntl(*fd, libc::F_GETFD) } < 0 {
            return Err(environment_error(
                FDS_VARIABLE,
                format!("fd {fd} is not open"),
            ));
        }
    }
    Ok(Some(Named { record, files }))
}

fn adopt(fd: RawFd) -> Result<OwnedFd, LuError> {
    // SAFETY: `read_environment` checked that `fd` is open and named once.
    // The exec protocol hands these numbers to this function alone, and
    // TAKEN makes sure it adopts them at most once per process, so nothing
    // else owns them.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    fdio::set_close_on_exec(owned.as_fd(), true)
        .map_err(|errno| LuError::io("setting close-on-exec", errno))?;
    Ok(owned)
}

/// In the new image after [`exec_in_place`]: takes the preserved fds and
/// the record named in the environment and rebuilds the incoming sessions.
/// `Ok(None)` when this process was not started by an exec handover (no
/// variables, or they belong to another pid), or the fds were taken already.
///
/// # Errors
/// - `EINVAL` ([`LuError::Environment`]): malformed variables, an fd named
///   twice or not open;
/// - `EPROTO`: the record fd is not a sealed memfd; record errors; those of
///   [`Incoming::from_parts`].
pub fn incoming_from_environment(registry: &HandlerRegistry) -> Result<Option<Incoming>, LuError> {
    let Some(named) = read_environment()? else {
        return Ok(None);
    };
    // Relaxed: the read-modify-write alone decides which caller adopts the
    // fds; no other memory is published through the flag.
    if TAKEN.swap(true, Ordering::Relaxed) {
        return Ok(None);
    }
    let record = adopt(named.record)?;
    let files: Vec<OwnedFd> = named
        .files
        .iter()
        .map(|fd| adopt(*fd))
        .collect::<Result<_, _>>()?;
    let bytes = fdio::read_sealed_memfd(&record)?;
    drop(record);
    let incoming = Incoming::decode(registry, &bytes, files)?;
    tracing::info!(
        sessions = incoming.session_names().len(),
        "took sessions from the exec handover"
    );
    Ok(Some(incoming))
}
