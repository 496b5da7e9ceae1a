//! `gmemctl sessions list|show|drop`: the sessions luod holds for the
//! caller's uid (luod serves each uid only its own).

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use clap::Subcommand;
use liveupdate::luod::{DEFAULT_SOCKET, LuodClient};

/// Arguments of `gmemctl sessions`.
#[derive(Debug, clap::Args)]
pub struct Arguments {
    /// luod's socket.
    #[arg(long, default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    #[command(subcommand)]
    action: Action,
}

#[derive(Debug, Subcommand)]
enum Action {
    /// One line per session.
    List,
    /// A session's record: its files and their handler data.
    Show {
        /// The session's name.
        name: String,
        /// Print every folio run and policy range.
        #[arg(long)]
        all: bool,
    },
    /// Release a session nobody retrieved (its memory is lost).
    Drop {
        /// The session's name.
        name: String,
    },
}

/// Runs `gmemctl sessions`.
pub fn run(arguments: Arguments) -> anyhow::Result<()> {
    let client = LuodClient::connect(&arguments.socket)
        .with_context(|| format!("connecting to luod at {}", arguments.socket.display()))?;
    match arguments.action {
        Action::List => list(&client),
        Action::Show { name, all } => {
            let record = client
                .show(&name)
                .with_context(|| format!("showing {name}"))?;
            print!("{}", crate::inspect::render(&record, all));
            Ok(())
        }
        Action::Drop { name } => {
            client
                .drop_session(&name)
                .with_context(|| format!("dropping {name}"))?;
            println!("dropped session {name}: luod released its files");
            Ok(())
        }
    }
}

fn list(client: &LuodClient) -> anyhow::Result<()> {
    let sessions = client.list().context("listing sessions")?;
    if sessions.is_empty() {
        println!("no sessions");
        return Ok(());
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs())
        .unwrap_or(0);
    println!(
        "{:<24} {:>5} {:<9} {:>6} {:>8} {:>8}",
        "NAME", "FILES", "STATE", "UID", "PID", "AGE"
    );
    for session in sessions {
        let state = if session.retrieved {
            "retrieved"
        } else {
            "held"
        };
        println!(
            "{:<24} {:>5} {:<9} {:>6} {:>8} {:>7}s",
            session.name.as_str(),
            session.files,
            state,
            session.owner_uid,
            session.owner_pid,
            now.saturating_sub(session.deposited_at)
        );
    }
    Ok(())
}
