//! `peers`: MicroMsg's offline deposits beside what a user would otherwise pick for durable
//! store-and-forward, driven by this same tool with the same payloads and concurrency.
//!
//! - **RabbitMQ** (`rabbitmq-server`): a durable queue (classic by default), persistent messages
//!   (delivery mode 2) and publisher confirms, one publish in flight per publisher. RabbitMQ
//!   confirms a persistent message on a durable queue only once it is fsynced, as MicroMsg
//!   acknowledges a DEPOSIT only after commit.
//! - **NATS JetStream** (`nats-server -js`): publish with ack to a file-storage stream. The
//!   server acknowledges once the message is written to its file, but version 2.9 does not fsync
//!   per write (it syncs on an interval and has no option to sync each write), so it is a
//!   **less durable** point and is marked so.
//! - **MicroMsg**: the `deposits` scenario's own code (Postgres by default), in the same run.
//!
//! Each peer server runs as a child process in its own process group, on loopback, on free
//! ports, with its data in a temporary directory; it is stopped (the whole group) when its
//! phase ends, on an error, and on Ctrl-C. RabbitMQ gets its own `epmd` on a free port, so
//! nothing outlives the run. A missing server binary fails the run before anything starts.

use std::future::Future;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::common::{Progress, StoreKind, Tickets};
use crate::deposits;
use crate::report::{Report, Row, Samples};

/// A peer server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum PeerKind {
    /// RabbitMQ: durable queue, persistent messages, publisher confirms.
    Rabbitmq,
    /// NATS JetStream: publish with ack to a file-storage stream (no per-write fsync in 2.9).
    Nats,
}

/// RabbitMQ queue type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum QueueType {
    /// Classic durable queue (the default queue type of RabbitMQ 3.10).
    Classic,
    /// Quorum queue (Raft log, fsynced before confirm), one node.
    Quorum,
}

/// Options of `peers`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Peers to run (comma-separated).
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [PeerKind::Rabbitmq, PeerKind::Nats])]
    pub(crate) peers: Vec<PeerKind>,
    /// Messages in total, per peer and for MicroMsg.
    #[arg(long, default_value_t = 50_000)]
    pub(crate) count: u64,
    /// Concurrent publishers (MicroMsg: senders), each with one message in flight.
    #[arg(long, default_value_t = 100)]
    pub(crate) publishers: usize,
    /// Queues (RabbitMQ), subjects (NATS) and recipients (MicroMsg); publisher i uses i mod N.
    #[arg(long, default_value_t = 1)]
    pub(crate) queues: usize,
    /// Payload bytes per message (MicroMsg: ciphertext bytes per deposit).
    #[arg(long, default_value_t = 256)]
    pub(crate) body: usize,
    /// MicroMsg's store for its deposits in the same run (Postgres needs DATABASE_URL).
    #[arg(long, value_enum, default_value_t = StoreKind::Postgres)]
    pub(crate) store: StoreKind,
    /// Skip the MicroMsg deposits run (peers only, no ratios).
    #[arg(long)]
    pub(crate) no_micromsg: bool,
    /// RabbitMQ queue type.
    #[arg(long, value_enum, default_value_t = QueueType::Classic)]
    pub(crate) rabbitmq_queue: QueueType,
    /// AMQP connections the RabbitMQ publishers share, each publisher on its own channel
    /// (default: one connection per publisher, as MicroMsg's senders have).
    #[arg(long)]
    pub(crate) rabbitmq_connections: Option<usize>,
    /// The rabbitmq-server script (default: /usr/lib/rabbitmq/bin/rabbitmq-server, which runs
    /// as the current user, else `rabbitmq-server` on PATH).
    #[arg(long)]
    pub(crate) rabbitmq_server: Option<PathBuf>,
    /// The nats-server binary (default: `nats-server` on PATH).
    #[arg(long)]
    pub(crate) nats_server: Option<PathBuf>,
    /// Time limit of each measured phase, in seconds.
    #[arg(long, default_value_t = 60)]
    pub(crate) max_secs: u64,
}

const SCENARIO: &str = "peers";
/// Debian's script that runs the node as the current user (its /usr/sbin wrapper switches to
/// the `rabbitmq` user and to /var/lib/rabbitmq).
const RABBITMQ_DEBIAN_SCRIPT: &str = "/usr/lib/rabbitmq/bin/rabbitmq-server";

pub(crate) async fn run(args: Args) -> anyhow::Result<Report> {
    tokio::select! {
        result = run_all(args) => result,
        Ok(()) = tokio::signal::ctrl_c() => bail!("interrupted (peer servers stopped)"),
    }
}

async fn run_all(args: Args) -> anyhow::Result<Report> {
    if args.count == 0 || args.publishers == 0 || args.queues == 0 {
        bail!("--count, --publishers and --queues must be at least 1");
    }
    if args.body == 0 || args.body > 48_000 {
        bail!("--body must be 1 to 48000 bytes (the broker's default max_message_bytes)");
    }
    if args.rabbitmq_connections == Some(0) {
        bail!("--rabbitmq-connections must be at least 1");
    }
    if args.peers.is_empty() {
        bail!("--peers names no peer");
    }
    // Find every binary before anything runs, so a missing one fails at once.
    let mut peers = Vec::new();
    for kind in dedup(&args.peers) {
        let bin = match kind {
            PeerKind::Rabbitmq => rabbitmq_binary(args.rabbitmq_server.as_deref())?,
            PeerKind::Nats => nats_binary(args.nats_server.as_deref())?,
        };
        peers.push((kind, bin));
    }
    if peers.iter().any(|(k, _)| *k == PeerKind::Rabbitmq) {
        find_on_path("epmd").context(
            "RabbitMQ needs Erlang's epmd on PATH (Debian: apt-get install -y rabbitmq-server)",
        )?;
    }
    if !args.no_micromsg && args.store == StoreKind::Postgres {
        crate::common::database_url()?;
    }

    let limit = Duration::from_secs(args.max_secs);
    let mut report = Report::default();
    let mut micromsg = None;
    if !args.no_micromsg {
        eprintln!("peers: MicroMsg deposits first (the deposits scenario)");
        let deposits = deposits::run(deposits::Args {
            store: args.store,
            count: args.count,
            senders: args.publishers,
            recipients: args.queues,
            body: args.body,
            ceiling_clients: 90,
            ceiling_count: None,
            fetch_limit: 1000,
            pool: 16,
            max_secs: args.max_secs,
        })
        .await?;
        micromsg = deposits
            .rows
            .iter()
            .find(|r| r.name.starts_with("DEPOSIT"))
            .cloned();
        for row in deposits.rows {
            report.push(row);
        }
        for note in deposits.notes {
            report.note(note);
        }
    }

    let mut peer_rows = Vec::new();
    for (kind, bin) in peers {
        let row = match kind {
            PeerKind::Rabbitmq => run_rabbitmq(&args, &bin, limit, &mut report).await?,
            PeerKind::Nats => run_nats(&args, &bin, limit, &mut report).await?,
        };
        report.push(row.clone());
        peer_rows.push((kind, row));
    }

    if let Some(m) = micromsg {
        for (kind, peer) in &peer_rows {
            let what = match kind {
                PeerKind::Rabbitmq => "RabbitMQ (durable, fsync before confirm)",
                PeerKind::Nats => "NATS JetStream (LESS DURABLE: no per-write fsync in 2.9)",
            };
            let mut row = m.clone();
            row.scenario = SCENARIO.to_owned();
            row.name = format!("MicroMsg DEPOSIT ({}) ÷ {what}", args.store.name());
            row.target = None;
            row.peak_memory_kib = None;
            row.memory_source = None;
            report.push(row.ceiling(peer.rate));
        }
    }
    report.note(format!(
        "peers: {} publishers, one message in flight each, {} byte payloads, {} queue(s)/subject(s); \
         peer data in a temporary directory on the same filesystem as the system temp dir; \
         ratios are MicroMsg deposits/s ÷ the peer's confirmed publishes/s",
        args.publishers, args.body, args.queues
    ));
    Ok(report)
}

fn dedup(kinds: &[PeerKind]) -> Vec<PeerKind> {
    let mut out = Vec::new();
    for k in kinds {
        if !out.contains(k) {
            out.push(*k);
        }
    }
    out
}

/// `name` in a directory of PATH.
fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

fn rabbitmq_binary(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(p) = explicit {
        if p.is_file() {
            return Ok(p.to_owned());
        }
        bail!("--rabbitmq-server {}: no such file", p.display());
    }
    let debian = Path::new(RABBITMQ_DEBIAN_SCRIPT);
    if debian.is_file() {
        return Ok(debian.to_owned());
    }
    find_on_path("rabbitmq-server").context(
        "rabbitmq-server not found (neither /usr/lib/rabbitmq/bin/rabbitmq-server nor on PATH); \
         install it with `apt-get install -y rabbitmq-server` or pass --rabbitmq-server PATH, or \
         leave it out with --peers nats",
    )
}

fn nats_binary(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(p) = explicit {
        if p.is_file() {
            return Ok(p.to_owned());
        }
        bail!("--nats-server {}: no such file", p.display());
    }
    find_on_path("nats-server").context(
        "nats-server not found on PATH; install it with `apt-get install -y nats-server` or pass \
         --nats-server PATH, or leave it out with --peers rabbitmq",
    )
}

/// A free TCP port on 127.0.0.1 (free when asked; the server binds it right after).
fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(listener.local_addr()?.port())
}

/// The last lines of a log file, for error messages.
fn log_tail(log: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let tail: Vec<&str> = text.lines().rev().take(lines).collect();
    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
}

/// A peer server in its own process group; the group is stopped on [`PeerProcess::stop`] or
/// on drop.
#[derive(Debug)]
struct PeerProcess {
    name: &'static str,
    child: Child,
    log: PathBuf,
    stopped: bool,
}

impl PeerProcess {
    fn spawn(name: &'static str, mut cmd: Command, log: &Path) -> anyhow::Result<Self> {
        use std::os::unix::process::CommandExt;
        let out = std::fs::File::create(log)
            .with_context(|| format!("creating the log {}", log.display()))?;
        let err = out.try_clone()?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .process_group(0);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {name} ({:?})", cmd.get_program()))?;
        Ok(Self {
            name,
            child,
            log: log.to_owned(),
            stopped: false,
        })
    }

    /// Fails with the log's tail if the server has exited.
    fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            self.stopped = true;
            bail!(
                "{} exited ({status}) while starting (log {}):\n{}",
                self.name,
                self.log.display(),
                log_tail(&self.log, 20)
            );
        }
        Ok(())
    }

    /// Peak resident memory (VmHWM) of the largest process of the group, in KiB.
    fn peak_kib(&self) -> Option<u64> {
        let pgid = self.child.id().to_string();
        let mut best: Option<u64> = None;
        for entry in std::fs::read_dir("/proc").ok()?.flatten() {
            let name = entry.file_name();
            let Some(pid) = name
                .to_str()
                .filter(|s| s.bytes().all(|b| b.is_ascii_digit()))
            else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            // Fields after the command name (which is in parentheses): state ppid pgrp ...
            let Some((_, rest)) = stat.rsplit_once(')') else {
                continue;
            };
            if rest.split_whitespace().nth(2) != Some(pgid.as_str()) {
                continue;
            }
            if let Some(m) = crate::child::memory_of(pid) {
                best = Some(best.map_or(m.peak_kib, |b| b.max(m.peak_kib)));
            }
        }
        best
    }

    /// SIGTERM to the group, up to 20 s for it to go, then SIGKILL.
    fn stop(&mut self) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        let group = format!("-{}", self.child.id());
        let signal = |sig: &str| {
            Command::new("kill")
                .args([sig, "--", &group])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        signal("-TERM");
        let deadline = Instant::now() + Duration::from_secs(20);
        // `kill -0` succeeds while any process of the group is left.
        while Instant::now() < deadline && signal("-0") {
            let _ = self.child.try_wait();
            std::thread::sleep(Duration::from_millis(100));
        }
        if signal("-0") {
            eprintln!(
                "  {}: still running 20 s after SIGTERM, killing it",
                self.name
            );
            signal("-KILL");
        }
        let _ = self.child.wait();
    }
}

impl Drop for PeerProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One publisher of a peer: publishes message `i` and returns once the server confirmed it.
trait Publisher: Send + 'static {
    fn publish(&mut self, i: u64) -> impl Future<Output = anyhow::Result<()>> + Send;
}

/// Runs the publishers over `count` tickets (one publish in flight each).
async fn publish_load<P: Publisher>(
    label: &str,
    publishers: Vec<P>,
    count: u64,
    limit: Duration,
) -> anyhow::Result<(u64, u64, Duration, Samples)> {
    let tickets = Tickets::new(count, limit);
    let _progress = Progress::start(label, count, Arc::clone(&tickets));
    let start = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for mut p in publishers {
        let tickets = Arc::clone(&tickets);
        let label = label.to_owned();
        workers.spawn(async move {
            let mut lat = Samples::with_capacity(1024);
            let mut errors = 0u64;
            while let Some(i) = tickets.take() {
                let t = Instant::now();
                match p.publish(i).await {
                    Ok(()) => lat.push(t.elapsed()),
                    Err(e) => {
                        errors += 1;
                        if errors == 1 {
                            eprintln!("  {label}: publish failed: {e:#}");
                        }
                    }
                }
                tickets.finish();
            }
            (lat, errors)
        });
    }
    let mut all = Samples::with_capacity(count as usize);
    let mut errors = 0;
    while let Some(done) = workers.join_next().await {
        let (lat, e) = done.context("a publisher task failed")?;
        all.merge(lat);
        errors += e;
    }
    let elapsed = start.elapsed();
    if tickets.timed_out() {
        eprintln!("  {label}: stopped at the time limit");
    }
    Ok((all.len() as u64, errors, elapsed, all))
}

fn payload(body: usize) -> Arc<Vec<u8>> {
    Arc::new((0..body).map(|i| (i * 7) as u8).collect())
}

// ---------------------------------------------------------------------------------------------
// RabbitMQ

struct RabbitPublisher {
    channel: lapin::Channel,
    queue: lapin::types::ShortString,
    body: Arc<Vec<u8>>,
}

impl Publisher for RabbitPublisher {
    async fn publish(&mut self, _i: u64) -> anyhow::Result<()> {
        let confirm = self
            .channel
            .basic_publish(
                "".into(),
                self.queue.clone(),
                lapin::options::BasicPublishOptions::default(),
                &self.body,
                // Delivery mode 2: persistent.
                lapin::BasicProperties::default().with_delivery_mode(2),
            )
            .await?
            .await?;
        if !confirm.is_ack() {
            bail!("the broker nacked a publish");
        }
        Ok(())
    }
}

async fn run_rabbitmq(
    args: &Args,
    bin: &Path,
    limit: Duration,
    report: &mut Report,
) -> anyhow::Result<Row> {
    let dir = tempfile::tempdir().context("temporary directory")?;
    let base = dir.path();
    let (amqp_port, dist_port, epmd_port) = (free_port()?, free_port()?, free_port()?);
    // Our own epmd, in the foreground as our child, on its own port (the node would otherwise
    // start a daemon one on 4369 that outlives the run).
    let epmd_bin = find_on_path("epmd").context("epmd not on PATH")?;
    let mut epmd_cmd = Command::new(epmd_bin);
    epmd_cmd.args(["-port", &epmd_port.to_string(), "-address", "127.0.0.1"]);
    let mut epmd = PeerProcess::spawn("epmd", epmd_cmd, &base.join("epmd.log"))?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    epmd.check_alive()?;

    let plugins = base.join("enabled_plugins");
    std::fs::write(&plugins, "[].\n")?;
    let env_file = base.join("rabbitmq-env.conf");
    std::fs::write(&env_file, "")?;
    let config = base.join("rabbitmq.conf");
    std::fs::write(&config, "# micromsg-bench peers: defaults\n")?;
    let mut cmd = Command::new(bin);
    cmd.current_dir(base)
        .env("HOME", base)
        .env("ERL_EPMD_PORT", epmd_port.to_string())
        .env("RABBITMQ_CONF_ENV_FILE", &env_file)
        .env("RABBITMQ_CONFIG_FILE", &config)
        .env("RABBITMQ_ENABLED_PLUGINS_FILE", &plugins)
        .env("RABBITMQ_MNESIA_BASE", base.join("mnesia"))
        .env("RABBITMQ_LOG_BASE", base.join("log"))
        .env("RABBITMQ_LOGS", "-")
        .env("RABBITMQ_PID_FILE", base.join("rabbitmq.pid"))
        .env(
            "RABBITMQ_NODENAME",
            format!("micromsgbench{amqp_port}@localhost"),
        )
        .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
        .env("RABBITMQ_NODE_PORT", amqp_port.to_string())
        .env("RABBITMQ_DIST_PORT", dist_port.to_string());
    let log = base.join("rabbitmq.log");
    eprintln!(
        "peers: starting RabbitMQ ({}) on 127.0.0.1:{amqp_port}",
        bin.display()
    );
    let mut server = PeerProcess::spawn("rabbitmq-server", cmd, &log)?;
    let uri = format!("amqp://guest:guest@127.0.0.1:{amqp_port}/%2f");
    let setup = connect_rabbitmq(&uri, &mut server).await?;
    let version = std::fs::read_to_string(&log)
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.split_once("Starting RabbitMQ ")
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "version unknown".to_owned());

    let queue_type = match args.rabbitmq_queue {
        QueueType::Classic => "classic",
        QueueType::Quorum => "quorum",
    };
    let channel = setup.create_channel().await?;
    let mut queue_args = lapin::types::FieldTable::default();
    queue_args.insert(
        "x-queue-type".into(),
        lapin::types::AMQPValue::LongString(queue_type.into()),
    );
    let names: Vec<String> = (0..args.queues).map(|k| format!("bench-{k}")).collect();
    for name in &names {
        channel
            .queue_declare(
                name.as_str().into(),
                lapin::options::QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                queue_args.clone(),
            )
            .await
            .with_context(|| format!("declaring the durable queue {name}"))?;
    }

    let n_conn = args
        .rabbitmq_connections
        .unwrap_or(args.publishers)
        .min(args.publishers);
    eprintln!(
        "peers: RabbitMQ: {} publishers on {n_conn} connections, confirm mode",
        args.publishers
    );
    let mut connections = Vec::with_capacity(n_conn);
    for _ in 0..n_conn {
        connections.push(
            lapin::Connection::connect(&uri, lapin::ConnectionProperties::default())
                .await
                .context("connecting a publisher to RabbitMQ")?,
        );
    }
    let body = payload(args.body);
    let mut publishers = Vec::with_capacity(args.publishers);
    for i in 0..args.publishers {
        let channel = connections[i % n_conn].create_channel().await?;
        channel
            .confirm_select(lapin::options::ConfirmSelectOptions::default())
            .await
            .context("enabling publisher confirms")?;
        publishers.push(RabbitPublisher {
            channel,
            queue: names[i % names.len()].as_str().into(),
            body: Arc::clone(&body),
        });
    }
    eprintln!(
        "peers: RabbitMQ: {} persistent publishes of {} bytes",
        args.count, args.body
    );
    let (count, errors, elapsed, mut lat) =
        publish_load("rabbitmq", publishers, args.count, limit).await?;

    // What the queues hold must be what was confirmed.
    let mut stored = 0u64;
    for name in &names {
        let q = channel
            .queue_declare(
                name.as_str().into(),
                lapin::options::QueueDeclareOptions {
                    passive: true,
                    durable: true,
                    ..Default::default()
                },
                lapin::types::FieldTable::default(),
            )
            .await?;
        stored += u64::from(q.message_count());
    }
    if stored != count {
        report.note(format!(
            "peers: RabbitMQ queues hold {stored} messages but {count} were confirmed"
        ));
    }
    let peak = server.peak_kib();
    for c in connections {
        let _ = c.close(200, "done".into()).await;
    }
    let _ = setup.close(200, "done".into()).await;
    server.stop();
    epmd.stop();
    report.note(format!(
        "peers: RabbitMQ {version}: durable {queue_type} queue(s), persistent messages \
         (delivery mode 2), publisher confirms (sent once the message is fsynced), \
         {n_conn} AMQP connection(s), a channel per publisher; its queues held {stored} \
         messages at the end"
    ));
    Ok(Row::new(
        SCENARIO,
        &format!(
            "RabbitMQ {}: confirmed persistent publish, durable {queue_type} queue ({} publishers)",
            version.split_whitespace().next().unwrap_or("?"),
            args.publishers
        ),
        count,
        errors,
        elapsed,
    )
    .unit("publishes/s")
    .latency(&mut lat)
    .memory(peak, "RabbitMQ server process (beam.smp) VmHWM"))
}

/// Connects once the node accepts AMQP connections (at most 120 s).
async fn connect_rabbitmq(
    uri: &str,
    server: &mut PeerProcess,
) -> anyhow::Result<lapin::Connection> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        server.check_alive()?;
        match lapin::Connection::connect(uri, lapin::ConnectionProperties::default()).await {
            Ok(c) => return Ok(c),
            Err(e) if Instant::now() >= deadline => {
                bail!(
                    "RabbitMQ did not accept connections within 120 s ({e}); log {}:\n{}",
                    server.log.display(),
                    log_tail(&server.log, 20)
                );
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// NATS JetStream

const NATS_STREAM: &str = "MICROMSG_BENCH";

struct NatsPublisher {
    js: async_nats::jetstream::Context,
    subject: String,
    body: Arc<Vec<u8>>,
}

impl Publisher for NatsPublisher {
    async fn publish(&mut self, _i: u64) -> anyhow::Result<()> {
        let ack = self
            .js
            .publish(self.subject.clone(), self.body.to_vec().into())
            .await?
            .await?;
        if ack.stream != NATS_STREAM {
            bail!("published into stream {:?}", ack.stream);
        }
        Ok(())
    }
}

async fn run_nats(
    args: &Args,
    bin: &Path,
    limit: Duration,
    report: &mut Report,
) -> anyhow::Result<Row> {
    let dir = tempfile::tempdir().context("temporary directory")?;
    let base = dir.path();
    let port = free_port()?;
    let mut cmd = Command::new(bin);
    cmd.current_dir(base)
        .arg("-js")
        .arg("-sd")
        .arg(base.join("jetstream"))
        .args(["-a", "127.0.0.1", "-p", &port.to_string()]);
    let log = base.join("nats.log");
    eprintln!(
        "peers: starting NATS ({}) on 127.0.0.1:{port}",
        bin.display()
    );
    let mut server = PeerProcess::spawn("nats-server", cmd, &log)?;
    let url = format!("nats://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(60);
    let setup = loop {
        server.check_alive()?;
        match async_nats::connect(&url).await {
            Ok(c) => break c,
            Err(e) if Instant::now() >= deadline => {
                bail!(
                    "nats-server did not accept connections within 60 s ({e}); log {}:\n{}",
                    log.display(),
                    log_tail(&log, 20)
                );
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };
    let version = setup.server_info().version;
    let js = async_nats::jetstream::new(setup.clone());
    js.create_stream(async_nats::jetstream::stream::Config {
        name: NATS_STREAM.to_owned(),
        subjects: vec!["bench.>".to_owned()],
        storage: async_nats::jetstream::stream::StorageType::File,
        num_replicas: 1,
        ..Default::default()
    })
    .await
    .context("creating the file-storage stream")?;

    eprintln!(
        "peers: NATS {version}: {} publishers, a connection each",
        args.publishers
    );
    let body = payload(args.body);
    let mut publishers = Vec::with_capacity(args.publishers);
    for i in 0..args.publishers {
        let client = async_nats::connect(&url)
            .await
            .context("connecting a publisher to NATS")?;
        publishers.push(NatsPublisher {
            js: async_nats::jetstream::new(client),
            subject: format!("bench.{}", i % args.queues),
            body: Arc::clone(&body),
        });
    }
    eprintln!(
        "peers: NATS JetStream: {} publishes with ack of {} bytes",
        args.count, args.body
    );
    let (count, errors, elapsed, mut lat) =
        publish_load("nats", publishers, args.count, limit).await?;

    let stored = js
        .get_stream(NATS_STREAM)
        .await?
        .info()
        .await
        .context("stream info")?
        .state
        .messages;
    if stored != count {
        report.note(format!(
            "peers: the NATS stream holds {stored} messages but {count} were acknowledged"
        ));
    }
    let peak = server.peak_kib();
    drop(js);
    drop(setup);
    server.stop();
    report.note(format!(
        "peers: NATS JetStream {version}: file-storage stream, 1 replica, publish with ack, a \
         connection per publisher; the stream held {stored} messages at the end. LESS DURABLE \
         than the others: nats-server 2.9 acknowledges after writing to its file but fsyncs only \
         on an interval (no per-write sync option), so an acknowledged message can be lost in a \
         power failure"
    ));
    Ok(Row::new(
        SCENARIO,
        &format!(
            "NATS JetStream {version}: publish+ack, file stream, LESS DURABLE (no per-write \
             fsync) ({} publishers)",
            args.publishers
        ),
        count,
        errors,
        elapsed,
    )
    .unit("publishes/s")
    .latency(&mut lat)
    .memory(peak, "nats-server process VmHWM"))
}
