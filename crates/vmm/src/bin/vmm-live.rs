//! `vmm-live`: one VMM process of a live-update run, started by a
//! controller (`vmm::live::controller`, as `gmemctl demo` uses it) or by a
//! predecessor VMM. See `vmm::live` for what it does.

use clap::Parser;

/// A VMM process of a live-update run.
#[derive(Debug, Parser)]
#[command(name = "vmm-live")]
struct Cli {
    #[command(flatten)]
    args: vmm::live::VmmArgs,
}

fn main() {
    let cli = Cli::parse();
    vmm::live::init_logging();
    let program = std::env::current_exe().unwrap_or_else(|_| "/proc/self/exe".into());
    let launcher = vmm::live::Launcher {
        program,
        leading: Vec::new(),
        control: cli.args.control.clone(),
    };
    std::process::exit(vmm::live::run(&cli.args, &launcher));
}
