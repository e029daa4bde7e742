//! `micromsg-broker`: runs a MicroMsg broker. Thin: parse arguments, start logging, call the
//! library.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use micromsg_broker::config::{Config, LogFormat};

/// A MicroMsg broker: registers entities and devices, logs them in with mutually verified
/// rotating nonces, sets up contacts and holds encrypted offline messages.
///
/// Configuration comes from a TOML file (--config), then MICROMSG_<SECTION>_<KEY> environment
/// variables (for example MICROMSG_SERVER_LISTEN=0.0.0.0:7400), then the flags below.
/// docs/operations.md lists every setting with its default.
#[derive(Debug, Parser)]
#[command(name = "micromsg-broker", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the broker.
    ///
    /// With no setup it stores everything in an embedded SQLite database under the data
    /// directory and, on first start, makes a private CA and server certificate in
    /// DATA_DIR/tls/. Clients trust DATA_DIR/tls/ca.pem.
    Serve(ServeArgs),
    /// Print the effective configuration (file + environment + flags) as TOML and exit.
    Config(ServeArgs),
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// TOML configuration file.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Data directory (SQLite store, TLS files, identity key). Default ./micromsg-data.
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Client listener address. Default 0.0.0.0:7400.
    #[arg(long, value_name = "ADDR")]
    listen: Option<std::net::SocketAddr>,
    /// Postgres URL (postgres://user@host/db). Default: embedded SQLite in the data directory.
    #[arg(long, value_name = "URL")]
    database_url: Option<String>,
    /// Log format: text or json (overrides server.log_format).
    #[arg(long, value_name = "FORMAT")]
    log_format: Option<String>,
}

impl ServeArgs {
    fn load(&self) -> anyhow::Result<Config> {
        let mut config = Config::load(self.config.as_deref(), std::env::vars())
            .context("loading the configuration")?;
        if let Some(dir) = &self.data_dir {
            config.server.data_dir.clone_from(dir);
        }
        if let Some(listen) = self.listen {
            config.server.listen = listen;
        }
        if let Some(url) = &self.database_url {
            config.database.url = Some(url.clone());
        }
        if let Some(format) = &self.log_format {
            config.server.log_format = match format.as_str() {
                "text" => LogFormat::Text,
                "json" => LogFormat::Json,
                other => anyhow::bail!("--log-format must be text or json, not {other:?}"),
            };
        }
        config.validate()?;
        Ok(config)
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("MICROMSG_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => {
            let config = args.load()?;
            init_logging(config.server.log_format);
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            runtime.block_on(micromsg_broker::run::serve(config))?;
            Ok(())
        }
        Command::Config(args) => {
            let config = args.load()?;
            print!("{}", toml::to_string_pretty(&config)?);
            Ok(())
        }
    }
}
