//! `micromsg`: the MicroMsg command-line client.

use clap::Parser;

/// The MicroMsg client: register with a broker, add contacts and talk end to end.
#[derive(Debug, Parser)]
#[command(name = "micromsg", version, about, long_about = None)]
struct Cli {
    /// Profile directory of this device (keys, secrets, local store).
    #[arg(long, global = true, default_value = "./micromsg-profile")]
    profile: std::path::PathBuf,
}

fn main() -> anyhow::Result<()> {
    let _cli = Cli::parse();
    anyhow::bail!("the client is not implemented yet")
}
