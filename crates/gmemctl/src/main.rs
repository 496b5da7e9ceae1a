//! `gmemctl`: the gmem-lu command-line tool. One module per subcommand, so
//! each can grow without touching the others.

mod bench;
mod demo;
mod inspect;
mod sessions;

use clap::{Parser, Subcommand};

/// Guest memory that survives a live update of the VMM.
#[derive(Debug, Parser)]
#[command(name = "gmemctl", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// List, show or drop the sessions luod holds.
    Sessions(sessions::Arguments),
    /// Decode a handover record for a human.
    Inspect(inspect::Arguments),
    /// Measure every headline figure on this machine: one table, JSON, plots.
    Bench(bench::Arguments),
    /// Run a guest and live-update its monitor under it, in every mode.
    Demo(demo::Arguments),
    /// One VMM process of a demo run (started by `demo` and its VMMs).
    #[command(hide = true)]
    Vmm(vmm::live::VmmArgs),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Sessions(arguments) => sessions::run(arguments),
        Command::Inspect(arguments) => inspect::run(arguments),
        Command::Bench(arguments) => bench::run(arguments),
        Command::Demo(arguments) => demo::run(arguments),
        Command::Vmm(arguments) => demo::vmm_process(&arguments),
    }
}
