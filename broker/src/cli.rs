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
    /// Write entities with everything the broker holds for them to a file, for `import` at
    /// another broker of the same operator.
    ///
    /// Moves each entity with its devices (WITH THEIR LOGIN SECRETS), contacts, blocks,
    /// settings, key backup and offline inbox (items still waiting and their
    /// acknowledgements). The file is JSON lines, written with mode 0600 and renamed into
    /// place only when complete: keep it like a password file and delete it after the import.
    /// Safe while the broker serves (each batch of entities is read consistently); for a move,
    /// stop the broker or the entities' devices first so nothing arrives after the export.
    ///
    /// Example: micromsg-broker export --data-dir micromsg-data --all --out broker.export
    Export(ExportArgs),
    /// Store the entities of an export file in this broker's store.
    ///
    /// The whole file is checked first (a damaged file, or one of a newer format version, is
    /// refused before anything is written). Safe to run again on the same file: rows already
    /// here are skipped. An entity that exists here with other data (other devices or
    /// secrets) is reported and left as it is; the exit status is then 3. Into the embedded
    /// SQLite store it refuses while this broker serves (stop it first); into Postgres it
    /// runs beside the broker.
    ///
    /// Example: micromsg-broker import --data-dir new-data broker.export
    Import(ImportArgs),
    /// Copy this broker's embedded SQLite store into a Postgres database.
    ///
    /// Every table, in batches; progress on stderr; row counts of every table compared at the
    /// end. Resumable: after an interruption run the same command again and it continues
    /// without duplicating anything. Refuses while this broker serves (stop it first). Then
    /// start the broker with --database-url and the same --data-dir.
    ///
    /// Example: micromsg-broker migrate-store --data-dir micromsg-data --to
    /// postgres://micromsg@db/micromsg
    MigrateStore(MigrateArgs),
}

/// Where the store is: as `serve` finds it.
#[derive(Debug, clap::Args)]
struct StoreArgs {
    /// TOML configuration file (the broker's).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Data directory (its SQLite store). Default ./micromsg-data.
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Postgres URL of the broker's store. Default: embedded SQLite in the data directory.
    #[arg(long, value_name = "URL")]
    database_url: Option<String>,
}

impl StoreArgs {
    fn load(&self) -> anyhow::Result<Config> {
        let mut config = Config::load(self.config.as_deref(), std::env::vars())
            .context("loading the configuration")?;
        if let Some(dir) = &self.data_dir {
            config.server.data_dir.clone_from(dir);
        }
        if let Some(url) = &self.database_url {
            config.database.url = Some(url.clone());
        }
        config.validate()?;
        Ok(config)
    }
}

#[derive(Debug, clap::Args)]
struct ExportArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// An entity to export, by number; repeat for more.
    #[arg(
        long = "entity",
        value_name = "NUMBER",
        required_unless_present = "all",
        conflicts_with = "all"
    )]
    entities: Vec<String>,
    /// Export every entity of the broker.
    #[arg(long)]
    all: bool,
    /// The file to write (mode 0600; replaced atomically when complete). It holds the
    /// devices' login secrets.
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// Entities read per batch.
    #[arg(long, value_name = "N", default_value_t = crate::admin_tools::DEFAULT_EXPORT_BATCH_ENTITIES)]
    batch_entities: usize,
}

#[derive(Debug, clap::Args)]
struct ImportArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// The export file.
    #[arg(value_name = "FILE")]
    file: PathBuf,
    /// Rows stored per transaction (whole entities).
    #[arg(long, value_name = "N", default_value_t = crate::admin_tools::DEFAULT_IMPORT_BATCH_ROWS)]
    batch_rows: usize,
}

#[derive(Debug, clap::Args)]
struct MigrateArgs {
    /// TOML configuration file (the broker's).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Data directory of the broker whose SQLite store is copied. Default ./micromsg-data.
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// The Postgres database to copy into (postgres://user:password@host/db). Use an empty
    /// database, or the one an interrupted run was copying into. Never printed.
    #[arg(long, value_name = "URL")]
    to: String,
    /// Rows per batch (one read and one transaction at the target).
    #[arg(long, value_name = "N", default_value_t = micromsg_store::migrate::DEFAULT_MIGRATE_BATCH_ROWS)]
    batch_rows: usize,
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

/// An import that left entities out because they exist here with other data, or their numbers
/// were retired here: exit status 3.
#[derive(Debug, thiserror::Error)]
#[error(
    "NOT imported: {} entities exist here with other data or under a number deleted here (left \
     as they are): {}",
    .0.len(),
    .0.join(", ")
)]
struct NotImported(Vec<String>);

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
        Err(e) if e.is::<NotImported>() => {
            eprintln!("{e}");
            ExitCode::from(3)
        }
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
        Command::Export(args) => {
            let config = args.store.load()?;
            let selection = if args.all {
                crate::admin_tools::Selection::All
            } else {
                crate::admin_tools::Selection::Numbers(args.entities.clone())
            };
            let summary = runtime()?.block_on(crate::admin_tools::export(
                &config,
                selection,
                &args.out,
                args.batch_entities,
                crate::clock::unix_now() as i64,
            ))?;
            println!(
                "exported {} entities ({} rows) to {} (mode 0600: it holds login secrets)",
                summary.entities,
                summary.rows,
                args.out.display()
            );
            Ok(())
        }
        Command::Import(args) => {
            let config = args.store.load()?;
            let report = runtime()?.block_on(crate::admin_tools::import(
                &config,
                &args.file,
                args.batch_rows,
            ))?;
            println!(
                "imported {} new entities; {} were already here (their missing rows added); \
                 {} rows stored, {} rows already here",
                report.entities_new,
                report.entities_present,
                report.rows_inserted,
                report.rows_skipped
            );
            if report.conflicts.is_empty() {
                Ok(())
            } else {
                Err(NotImported(report.conflicts).into())
            }
        }
        Command::MigrateStore(args) => {
            let store = StoreArgs {
                config: args.config.clone(),
                data_dir: args.data_dir.clone(),
                database_url: None,
            };
            let config = store.load()?;
            runtime()?.block_on(crate::admin_tools::migrate_store(
                &config,
                &args.to,
                args.batch_rows,
            ))
        }
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
