//! `micromsg-broker`: runs a MicroMsg broker.

use clap::{Parser, Subcommand};

/// A MicroMsg broker: registers entities and devices, logs them in with mutually verified
/// rotating nonces, sets up contacts and holds encrypted offline messages.
#[derive(Debug, Parser)]
#[command(name = "micromsg-broker", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the broker.
    Serve,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve => anyhow::bail!("the broker is not implemented yet"),
    }
}
