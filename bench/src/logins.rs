//! `logins`: new connection, full TLS 1.3 handshake and mutual LOGIN, beside a bare TLS server.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use crate::child::ChildServer;
use crate::common::{self, Progress, Tickets};
use crate::deposits::CpuSplit;
use crate::report::{Report, Row, Samples};

/// Options of `logins`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Connections (each handshake + LOGIN) per measured run.
    #[arg(long, default_value_t = 5000)]
    pub(crate) count: u64,
    /// Connections in flight at once.
    #[arg(long, default_value_t = 32)]
    pub(crate) concurrency: usize,
    /// Registered users the logins are spread over.
    #[arg(long, default_value_t = 32)]
    pub(crate) users: usize,
    /// Also measure with TLS session resumption (target: ≥ 3× the full-handshake rate).
    #[arg(long)]
    pub(crate) resumption: bool,
    /// Rounds the count is split into. Each round runs its share of bare handshakes and its
    /// share of logins (which goes first alternates), so both see the machine in the same state: on a shared machine its
    /// speed drifts over seconds, and one long run of each would put that drift in the ratio.
    #[arg(long, default_value_t = 10)]
    pub(crate) rounds: u64,
    /// Time limit of each side (the bare server's handshakes, the broker's logins) over all
    /// its rounds, in seconds.
    #[arg(long, default_value_t = 60)]
    pub(crate) max_secs: u64,
}

/// What the rounds of one side (the bare server or the broker) add up to.
#[derive(Default)]
struct Side {
    count: u64,
    errors: u64,
    time: Duration,
    latency: Samples,
    /// The server child's and the load generator's CPU over this side's windows; `None` once
    /// a reading failed.
    cpu: Option<CpuSplit>,
    cpu_readable: bool,
}

impl Side {
    fn new() -> Self {
        Self {
            cpu_readable: true,
            ..Self::default()
        }
    }

    fn add(&mut self, (count, errors, time, latency): (u64, u64, Duration, Samples)) {
        self.count += count;
        self.errors += errors;
        self.time += time;
        self.latency.merge(latency);
    }

    fn add_cpu(&mut self, before: Option<CpuSplit>, after: Option<CpuSplit>) {
        match (before, after) {
            (Some(before), Some(after)) if self.cpu_readable => {
                let window = after.since(&before);
                self.cpu = Some(match &self.cpu {
                    Some(sum) => sum.plus(&window),
                    None => window,
                });
            }
            _ => {
                self.cpu_readable = false;
                self.cpu = None;
            }
        }
    }

    /// (server, load generator) CPU microseconds per operation.
    fn cpu_per_op(&self) -> Option<(f64, f64)> {
        Some(self.cpu.as_ref()?.server_and_generator_per_op(self.count))
    }

    /// The report's row for this side's rounds together.
    fn into_row(mut self, name: &str, unit: &str) -> Row {
        Row::new(SCENARIO, name, self.count, self.errors, self.time)
            .unit(unit)
            .latency(&mut self.latency)
    }
}

const SCENARIO: &str = "logins";

pub(crate) async fn run(args: Args) -> anyhow::Result<Report> {
    if args.count == 0 || args.concurrency == 0 || args.users == 0 || args.rounds == 0 {
        bail!("--count, --concurrency, --users and --rounds must be at least 1");
    }
    if args.rounds > args.count {
        bail!("--rounds must not exceed --count (each round runs at least one of each)");
    }
    let dir = tempfile::tempdir().context("temporary directory")?;
    let config = common::load_config(dir.path())?;
    eprintln!("logins: starting the broker (SQLite) and the bare TLS server");
    let broker = ChildServer::broker(&config, dir.path(), "broker")?;
    let tls_dir = config.server.data_dir.join("tls");
    let ceiling = ChildServer::tls_ceiling(
        &tls_dir.join("server.pem"),
        &tls_dir.join("server.key"),
        false,
        dir.path(),
    )?;
    let ca = common::ca_of(&config);
    let addr = format!("127.0.0.1:{}", broker.addr.port());
    eprintln!("logins: registering {} users", args.users);
    let users = Arc::new(
        common::register_users(&addr, &ca, &dir.path().join("profiles"), "u", args.users).await?,
    );
    let resumable = micromsg_client::tls::client_config(&ca)?;
    let mut full = (*resumable).clone();
    full.resumption = rustls::client::Resumption::disabled();
    let full = Arc::new(full);

    let mut report = Report::default();
    let limit = Duration::from_secs(args.max_secs);
    let mut runs = vec![("full", Arc::clone(&full))];
    if args.resumption {
        runs.push(("resumed", Arc::clone(&resumable)));
    }
    let mut full_micromsg_rate = 0.0;
    for (kind, tls) in runs {
        let (mut ceiling_side, mut micromsg_side) = (Side::new(), Side::new());
        let mut started = 0u64;
        for round in 0..args.rounds {
            // Each side has `--max-secs` in all, over its rounds.
            let (c_left, m_left) = (
                limit.saturating_sub(ceiling_side.time),
                limit.saturating_sub(micromsg_side.time),
            );
            if c_left.is_zero() || m_left.is_zero() {
                eprintln!("logins: stopped at the time limit after {round} rounds");
                break;
            }
            // The count spread over the rounds, the remainder in the first ones.
            let share = args.count / args.rounds + u64::from(round < args.count % args.rounds);
            let label =
                |what: &str| format!("{what} ({kind}, round {}/{})", round + 1, args.rounds);
            let bare = async {
                let before = CpuSplit::read(&ceiling, None).await;
                ceiling_side.add(
                    measure(share, &args, c_left, &label("ceiling: bare TLS 1.3"), {
                        let tls = Arc::clone(&tls);
                        let addr = ceiling.addr;
                        move |_| {
                            let tls = Arc::clone(&tls);
                            async move { bare_handshake(addr, tls).await }
                        }
                    })
                    .await,
                );
                ceiling_side.add_cpu(before, CpuSplit::read(&ceiling, None).await);
            };
            // The users are taken in turn across the rounds, not from the first each round.
            let first_user = started;
            let logins = async {
                let before = CpuSplit::read(&broker, None).await;
                micromsg_side.add(
                    measure(share, &args, m_left, &label("micromsg: TLS 1.3 + LOGIN"), {
                        let tls = Arc::clone(&tls);
                        let users = Arc::clone(&users);
                        move |i| {
                            let tls = Arc::clone(&tls);
                            let users = Arc::clone(&users);
                            async move {
                                let n = (first_user + i) as usize % users.len();
                                let link = users[n].login(tls).await?;
                                drop(link);
                                Ok(())
                            }
                        }
                    })
                    .await,
                );
                micromsg_side.add_cpu(before, CpuSplit::read(&broker, None).await);
            };
            // Each side goes first in every other round, so what one server does after its
            // phase (closing connections, the broker's last_seen commit) falls as often into
            // the other side's phase as the other's into its own.
            if round % 2 == 0 {
                bare.await;
                logins.await;
            } else {
                logins.await;
                bare.await;
            }
            started += share;
        }
        let (c_cpu, m_cpu) = (ceiling_side.cpu_per_op(), micromsg_side.cpu_per_op());
        if let (Some((c_server, c_gen)), Some((m_server, m_gen))) = (c_cpu, m_cpu) {
            // The rates' ratio moves with whatever else runs; the CPU each operation costs
            // does much less, and its ratio is the rate ratio on an otherwise idle machine.
            report.note(format!(
                "logins ({kind}): CPU per bare handshake: server {c_server:.0} µs, load generator \
                 {c_gen:.0} µs; per login: broker {m_server:.0} µs, load generator {m_gen:.0} µs; \
                 by CPU the logins run at {:.0}% of the handshakes (from /proc)",
                100.0 * (c_server + c_gen) / (m_server + m_gen)
            ));
        }
        let ceiling_row = ceiling_side.into_row(
            &format!("ceiling: bare TLS 1.3 handshake ({kind})"),
            "handshakes/s",
        );
        let mut row = micromsg_side
            .into_row(&format!("TLS 1.3 + mutual LOGIN ({kind})"), "logins/s")
            .ceiling(ceiling_row.rate);
        if kind == "full" {
            full_micromsg_rate = row.rate;
            let met = row.ratio.is_some_and(|r| r >= 0.9);
            row = row.target("≥ 90% of ceiling", met);
        } else if full_micromsg_rate > 0.0 {
            let times = row.rate / full_micromsg_rate;
            row = row.target(&format!("≥ 3× full ({times:.1}×)"), times >= 3.0);
        }
        report.push(ceiling_row);
        report.push(row);
    }
    let broker_mem = broker.stop();
    let ceiling_mem = ceiling.stop();
    for row in &mut report.rows {
        let (mem, source) = if row.name.starts_with("ceiling") {
            (ceiling_mem, "bare TLS child process VmHWM (whole run)")
        } else {
            (broker_mem, "broker child process VmHWM (whole run)")
        };
        *row = row.clone().memory(mem.map(|m| m.peak_kib), source);
    }
    report.note(format!(
        "logins: {} connections per run, {} at a time, over {} users, in {} rounds of bare \
         handshakes and logins, each side first in every other round (rates are counts over the \
         summed time of each side's rounds); \
         broker on SQLite (LOGIN writes last_seen); client and servers share the machine's cores",
        args.count, args.concurrency, args.users, args.rounds
    ));
    Ok(report)
}

/// Runs `op(i)` for `count` items with `args.concurrency` workers; returns (ok, errors,
/// elapsed, latencies).
async fn measure<F, Fut>(
    count: u64,
    args: &Args,
    limit: Duration,
    label: &str,
    op: F,
) -> (u64, u64, Duration, Samples)
where
    F: Fn(u64) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    let tickets = Tickets::new(count, limit);
    let _progress = Progress::start(label, count, Arc::clone(&tickets));
    let start = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..args.concurrency {
        let tickets = Arc::clone(&tickets);
        let op = op.clone();
        workers.spawn(async move {
            let mut lat = Samples::with_capacity(1024);
            let mut errors = 0u64;
            let mut first_error = None;
            while let Some(i) = tickets.take() {
                let t = Instant::now();
                match op(i).await {
                    Ok(()) => lat.push(t.elapsed()),
                    Err(e) => {
                        errors += 1;
                        first_error.get_or_insert(e);
                    }
                }
                tickets.finish();
            }
            (lat, errors, first_error)
        });
    }
    let mut all = Samples::with_capacity(count as usize);
    let mut errors = 0;
    while let Some(done) = workers.join_next().await {
        if let Ok((lat, e, first)) = done {
            all.merge(lat);
            errors += e;
            if let Some(first) = first {
                eprintln!("  {label}: error: {first:#}");
            }
        }
    }
    let elapsed = start.elapsed();
    (all.len() as u64, errors, elapsed, all)
}

async fn bare_handshake(
    addr: std::net::SocketAddr,
    tls: Arc<rustls::ClientConfig>,
) -> anyhow::Result<()> {
    let tcp = TcpStream::connect(addr).await?;
    let _ = tcp.set_nodelay(true);
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1")?;
    let mut stream = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await?;
    let mut byte = [0u8; 1];
    stream.read_exact(&mut byte).await?;
    Ok(())
}
