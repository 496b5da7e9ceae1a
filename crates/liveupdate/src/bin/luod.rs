//! `luod`: holds live-update sessions between a VMM and its successor.
//!
//! A VMM deposits its frozen sessions (record and fds) and may then exit or
//! die; a successor retrieves them by name. Every client is identified with
//! `SO_PEERCRED` and served only its own uid's sessions. SIGTERM or SIGINT
//! stops it between requests; the sessions it still holds are released and
//! logged. Logs go to stderr (`RUST_LOG` filters them, default `info`).
//!
//! ```text
//! luod [--socket /run/gmem-lu/luod.sock] [--mode 666] [--max-connections 64]
//!      [--max-sessions 1024] [--max-sessions-per-uid 256]
//! ```

use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use liveupdate::luod::DEFAULT_SOCKET;
use liveupdate::luod::server::{Daemon, DaemonConfig};

/// Holds live-update sessions between a VMM and its successor.
#[derive(Debug, Parser)]
#[command(version)]
struct Arguments {
    /// Where to listen.
    #[arg(long, default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Socket file mode, in octal. Any uid may connect by default; each is
    /// served only its own sessions.
    #[arg(long, default_value = "666", value_parser = parse_octal)]
    mode: u32,
    /// Most connections at once.
    #[arg(long, default_value_t = 64)]
    max_connections: usize,
    /// Most sessions held in total.
    #[arg(long, default_value_t = 1024)]
    max_sessions: usize,
    /// Most sessions held for one uid.
    #[arg(long, default_value_t = 256)]
    max_sessions_per_uid: usize,
}

fn parse_octal(text: &str) -> Result<u32, String> {
    u32::from_str_radix(text, 8)
        .ok()
        .filter(|mode| *mode <= 0o777)
        .ok_or_else(|| format!("{text:?} is not an octal file mode"))
}

/// Blocks SIGTERM and SIGINT and returns a signalfd that becomes readable
/// when one arrives. luod has one thread, so blocking them here covers the
/// whole process.
fn shutdown_signals() -> anyhow::Result<OwnedFd> {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it before any
    // other use, and sigaddset/sigprocmask/signalfd only read or write the
    // set we pass and the process's signal mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        if libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error()).context("blocking SIGTERM and SIGINT");
        }
        let fd = libc::signalfd(-1, &set, libc::SFD_CLOEXEC);
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("signalfd");
        }
        // SAFETY: signalfd just created `fd`; nothing else owns it.
        Ok(OwnedFd::from_raw_fd(fd))
    }
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit: luod holds every
/// preserved fd it is given.
fn raise_file_limit() {
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    let raised = rustix::process::Rlimit {
        current: limit.maximum,
        maximum: limit.maximum,
    };
    if let Err(errno) = rustix::process::setrlimit(rustix::process::Resource::Nofile, raised) {
        tracing::warn!(%errno, "cannot raise RLIMIT_NOFILE");
    }
}

fn main() -> anyhow::Result<()> {
    let arguments = Arguments::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let signals = shutdown_signals()?;
    raise_file_limit();
    if let Some(directory) = arguments.socket.parent() {
        std::fs::create_dir_all(directory)
            .with_context(|| format!("creating {}", directory.display()))?;
    }
    let mut config = DaemonConfig::new(&arguments.socket);
    config.socket_mode = arguments.mode;
    config.max_connections = arguments.max_connections;
    config.max_sessions = arguments.max_sessions;
    config.max_sessions_per_uid = arguments.max_sessions_per_uid;
    let mut daemon = Daemon::bind(config).context("binding the luod socket")?;
    daemon.run(signals.as_fd()).context("serving")?;
    let held = daemon.session_count();
    drop(daemon);
    tracing::info!(released = held, "luod stopped");
    Ok(())
}
