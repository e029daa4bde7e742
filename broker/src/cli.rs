//! The `micromsg-broker` command line: parse arguments, start logging, call the library.
//!
//! It lives in the library rather than in `src/main.rs` so that another package can build the
//! same command as a binary of its own: the integration tests of `micromsg-tests` run it as
//! `micromsg-test-broker`, which cargo builds for their test run and names in
//! `CARGO_BIN_EXE_micromsg-test-broker` (cargo gives a test only its own package's binaries).

use std::path::PathBuf;
use std::process::ExitCode;

use crate::config::{Config, LogFormat};
use anyhow::Context;
use clap::{Parser, Subcommand};

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
    /// Broker networks: make the CA, certificates and network file of a new network.
    #[command(subcommand)]
    Network(NetworkCommand),
    /// Print a running broker's status from its admin service.
    Status(StatusArgs),
}

#[derive(Debug, Subcommand)]
enum NetworkCommand {
    /// Create a network in DIR: the network CA (ca.pem, ca.key), each broker's certificate and
    /// key (ID.pem, ID.key: the id is the certificate's CN and a DNS name) and network.toml.
    ///
    /// Give each broker's config `[federation] network_file = "DIR/network.toml"` and
    /// `[server] broker_id = "ID"`; the certificate, key and CA are found beside the network
    /// file. Copy ca.key somewhere safe (it issues certificates) and give each broker only its
    /// own key.
    ///
    /// Example: micromsg-broker network init --out net --broker x=555 --broker y=556
    Init(NetworkInitArgs),
}

#[derive(Debug, clap::Args)]
struct NetworkInitArgs {
    /// Directory to create the network in (must not hold a network.toml yet).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// A broker and its number prefixes, ID=PREFIX[,PREFIX…]; repeat for each broker. IDs are
    /// lowercase letters, digits and '-'.
    #[arg(long = "broker", value_name = "ID=PREFIXES", required = true)]
    brokers: Vec<String>,
    /// Where a broker's federation listener is reached, ID=HOST:PORT. Default localhost:7401
    /// for the first broker, localhost:7411 for the second, and so on.
    #[arg(long = "endpoint", value_name = "ID=HOST:PORT")]
    endpoints: Vec<String>,
    /// The network's name, shown to clients in BROKER-INFO. Default "micromsg-net".
    #[arg(long, default_value = "micromsg-net")]
    name: String,
}

#[derive(Debug, clap::Args)]
struct StatusArgs {
    /// The broker's admin listener.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7402")]
    admin: String,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
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
    /// Network file of the broker network this broker belongs to (federation.network_file).
    #[arg(long, value_name = "FILE", alias = "network-file")]
    network: Option<PathBuf>,
    /// This broker's id (server.broker_id); in a network, its id in the network file.
    #[arg(long, value_name = "ID")]
    broker_id: Option<String>,
    /// Federation (gRPC, mutual TLS) listener address. Default: 0.0.0.0 and the port of this
    /// broker's endpoint in the network file.
    #[arg(long, value_name = "ADDR")]
    federation_listen: Option<std::net::SocketAddr>,
    /// Admin (gRPC status, health, reflection) listener address. Default 127.0.0.1:7402.
    #[arg(long, value_name = "ADDR")]
    admin_listen: Option<std::net::SocketAddr>,
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
        if let Some(network) = &self.network {
            config.federation.network_file = Some(network.clone());
        }
        if let Some(id) = &self.broker_id {
            config.server.broker_id.clone_from(id);
        }
        if let Some(listen) = self.federation_listen {
            config.federation.listen = Some(listen);
        }
        if let Some(listen) = self.admin_listen {
            config.admin.listen = listen;
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

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn network_init(args: &NetworkInitArgs) -> anyhow::Result<()> {
    use crate::federation::network::{InitBroker, init};
    let mut brokers = args
        .brokers
        .iter()
        .enumerate()
        .map(|(i, spec)| InitBroker::parse(spec, i))
        .collect::<Result<Vec<_>, _>>()?;
    for spec in &args.endpoints {
        let (id, endpoint) = spec
            .split_once('=')
            .with_context(|| format!("--endpoint {spec:?}: expected ID=HOST:PORT"))?;
        let broker = brokers
            .iter_mut()
            .find(|b| b.id == id)
            .with_context(|| format!("--endpoint {spec:?}: no --broker {id}=…"))?;
        endpoint.clone_into(&mut broker.endpoint);
    }
    let report = init(&args.out, &args.name, &brokers).context("creating the network")?;
    println!("network {:?} created in {}", args.name, args.out.display());
    println!("  network file   {}", report.network_file.display());
    println!(
        "  network CA     {} (its key ca.key: keep it safe)",
        report.ca.display()
    );
    for (id, cert, key) in &report.brokers {
        println!("  broker {id:<8} {} {}", cert.display(), key.display());
    }
    println!();
    println!("Start each broker with its id and the network file, for example:");
    if let Some(first) = brokers.first() {
        println!(
            "  micromsg-broker serve --broker-id {} --network {} --data-dir data-{}",
            first.id,
            report.network_file.display(),
            first.id
        );
    }
    Ok(())
}

/// Runs the command line of `std::env::args`, as the `micromsg-broker` binary does.
///
/// `--help`, `--version` and usage errors are handled by clap, which prints and exits (0, or 2
/// for a usage error). Otherwise a failure prints `Error: ` and the error with its causes to
/// stderr and returns exit code 1: what `fn main() -> anyhow::Result<()>` printed and returned
/// before this moved here.
pub fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {e:?}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => {
            let config = args.load()?;
            let runtime = runtime()?;
            runtime.block_on(async {
                // Inside the runtime: the OTLP exporter (gRPC) needs it.
                let telemetry = crate::telemetry::init(config.server.log_format)?;
                let result = crate::run::serve(config).await;
                telemetry.shutdown();
                result.map_err(anyhow::Error::from)
            })
        }
        Command::Config(args) => {
            let config = args.load()?;
            print!("{}", toml::to_string_pretty(&config)?);
            Ok(())
        }
        Command::Network(NetworkCommand::Init(args)) => network_init(&args),
        Command::Status(args) => {
            let runtime = runtime()?;
            let status = runtime.block_on(crate::admin::fetch_status(&args.admin))?;
            if args.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&crate::admin::render_json(&status))?
                );
            } else {
                print!("{}", crate::admin::render_text(&status));
            }
            Ok(())
        }
    }
}
