//! `micromsg-bench`: how fast MicroMsg is, measured side by side with a ceiling in the same run.
//!
//! Each subcommand is one scenario of issue 9. It starts what it needs (brokers in child
//! processes of this same binary, Postgres databases on `DATABASE_URL`), drives many clients from
//! this process over loopback, prints progress to stderr while it runs, and ends with one table
//! on stdout (or JSON with `--json`): count, errors, throughput, latency p50/p99/p99.9, the
//! broker's peak memory, and the ceiling measured in the same run with the ratio to it.
//! Every run is bounded in count and in time (`--max-secs` per measured phase).
//!
//! Layout:
//! - `report`: samples, percentiles, rows, the table and the JSON.
//! - `child`: servers in child processes (a real broker; a bare tokio-rustls server) and their
//!   memory from `/proc`.
//! - `common`: load-friendly broker config, users and contact pairs, work tickets, progress,
//!   Postgres databases.
//! - `logins`, `deposits`, `p2p`, `relay`, `federation`, `idle`, `soak`: the scenarios.
//! - `peers` (feature `peers`): deposits beside RabbitMQ and NATS JetStream servers started as
//!   child processes.
//!
//! `docs/performance.md` has the results and the exact commands.

mod chat;
mod child;
mod common;
mod deposits;
mod federation;
mod idle;
mod logins;
mod p2p;
#[cfg(feature = "peers")]
mod peers;
mod relay;
mod report;
mod soak;

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

/// Benchmarks and load for MicroMsg, each scenario beside its ceiling in the same run.
///
/// Every scenario starts its own brokers (child processes of this binary, so their memory is
/// measured alone), drives clients over loopback (127.0.0.0/8), shows progress on stderr and
/// prints one results table on stdout (JSON with --json). Counts and time are bounded by flags.
/// Postgres runs need DATABASE_URL (a server where databases may be created and dropped).
#[derive(Debug, Parser)]
#[command(name = "micromsg-bench", version, about, long_about)]
struct Cli {
    /// Print the results as JSON on stdout instead of the table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// New connections, each a full TLS 1.3 handshake plus the mutual LOGIN, C at a time.
    ///
    /// Ceiling: a bare tokio-rustls server (child process) with the broker's own certificate
    /// (ECDSA P-256) and TLS configuration that only handshakes and sends one byte, driven the
    /// same way. Client session resumption is off for both (full handshakes); --resumption adds
    /// the same two runs with resumption on. Target: ≥ 90% of the ceiling (issue 23).
    Logins(logins::Args),
    /// Offline DEPOSITs acknowledged after commit from many concurrent senders, then the
    /// recipient drains its inbox (INBOX-FETCH + INBOX-ACK).
    ///
    /// Ceiling: concurrent single-row durable INSERTs of the same payload into the same store
    /// (for Postgres, the same server, after the broker stopped). Targets on Postgres:
    /// ≥ 10,000 deposits/s, p99 ≤ 20 ms, ≥ 50% of the ceiling; drain ≥ 30,000/s.
    Deposits(deposits::Args),
    /// One end-to-end session between two clients on loopback (the client's p2p module):
    /// messages/s at 256 bytes, MB/s at 64 KiB, and round-trip latency.
    ///
    /// Ceiling: sealing and opening the same frames in a loop on one core (the crypto crate,
    /// no I/O). Targets: ≥ 200,000 msg/s, ≥ 1.2 GB/s. Runs in this process (memory is the
    /// process's).
    P2p(p2p::Args),
    /// One end-to-end session through the broker's relay (protocol.md 6.26), beside the same
    /// session directly on loopback in the same run: msg/s at 256 bytes, MB/s at 64 KiB,
    /// round-trip latency; then the broker's memory per idle relay beside its memory per idle
    /// logged-in connection.
    ///
    /// Targets: relayed ≥ 50% of direct at 64 KiB, ≥ 50,000 msg/s at 256 B, ≤ 1 ms added at p99,
    /// ≤ 2 × a logged-in connection's memory per idle relay.
    Relay(relay::Args),
    /// `micromsg chat` opening a long conversation: from nothing to the first frame (the newest
    /// page of history read from the end of its file, the screen built and drawn at 80×24),
    /// beside reading the whole history. Target: ≤ 200 ms at 100,000 messages.
    Chat(chat::Args),
    /// Two brokers in a network (child processes, mutual-TLS gRPC between them): networked
    /// INITIATE latency beside local INITIATE, and deposits across brokers.
    ///
    /// Latency is from sending INITIATE-EXISTING(-NETWORKED) to the target's CONTACT-REQUEST.
    /// Targets (issue 23): ≤ 1 ms added at p99; ≥ 10,000 cross-broker deposits/s.
    Federation(federation::Args),
    /// Many logged-in connections held open with keep-alive PINGs; broker memory per
    /// connection at each count.
    ///
    /// The broker is a separate process; client source addresses are spread over several
    /// 127.0.0.x. Ceiling: the same number of bare TLS 1.3 connections held by the bare
    /// tokio-rustls server. Target: ≤ 12 KiB (issue 23) of broker memory per connection.
    Idle(idle::Args),
    /// A mixed load for a set time (logins, registrations, contacts, end-to-end sessions through
    /// client agents, offline deposits and drains) against one broker: errors must be 0 and
    /// the broker's memory must stay flat.
    ///
    /// Broker RSS is read every second; after warm-up, the mean of the last 20% of the samples
    /// may exceed the mean of the first 20% by at most --memory-tolerance percent (10).
    /// Exits non-zero after the report when either check fails.
    Soak(soak::Args),
    /// MicroMsg's deposits beside peers a user would pick for durable store-and-forward:
    /// RabbitMQ (durable queue, persistent messages, publisher confirms) and NATS JetStream 2.9
    /// (file stream, publish with ack; less durable: no per-write fsync).
    ///
    /// Same payloads and concurrency as `deposits` (100 publishers, 256 bytes, one in flight
    /// each); the peer servers are started here as child processes on loopback with temporary
    /// data directories (`apt-get install -y rabbitmq-server nats-server`). MicroMsg's deposits
    /// (Postgres: DATABASE_URL) run in the same invocation; the ratio is MicroMsg ÷ peer.
    /// Built with `--features peers`.
    #[cfg(feature = "peers")]
    Peers(peers::Args),
    /// (internal) Run a broker from a JSON config; used by the scenarios.
    #[command(name = "__broker", hide = true)]
    ChildBroker {
        /// The configuration (JSON of the broker's Config).
        config: PathBuf,
    },
    /// (internal) Run the bare TLS ceiling server; used by the scenarios.
    #[command(name = "__tls-ceiling", hide = true)]
    ChildTlsCeiling {
        /// Certificate chain (PEM).
        cert: PathBuf,
        /// Private key (PEM).
        key: PathBuf,
        /// What to do after each handshake: `greet`, `hold` or `exchange:REQUEST:ANSWER`.
        mode: String,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let scenario = match cli.command {
        Command::ChildBroker { config } => return child::run_broker(&config),
        Command::ChildTlsCeiling { cert, key, mode } => {
            return child::run_tls_ceiling(&cert, &key, child::CeilingMode::parse(&mode)?);
        }
        other => other,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let report = runtime.block_on(async {
        match scenario {
            Command::Logins(args) => logins::run(args).await,
            Command::Deposits(args) => deposits::run(args).await,
            Command::P2p(args) => p2p::run(args).await,
            Command::Relay(args) => relay::run(args).await,
            Command::Chat(args) => chat::run(args).await,
            Command::Federation(args) => federation::run(args).await,
            Command::Idle(args) => idle::run(args).await,
            Command::Soak(args) => soak::run(args).await,
            #[cfg(feature = "peers")]
            Command::Peers(args) => peers::run(args).await,
            Command::ChildBroker { .. } | Command::ChildTlsCeiling { .. } => {
                unreachable!("handled above")
            }
        }
    })?;
    // Let stragglers (closing connections) go without waiting for them.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    if cli.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.table());
    }
    if !report.failures.is_empty() {
        anyhow::bail!("{}", report.failures.join("; "));
    }
    Ok(())
}
