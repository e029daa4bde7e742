//! `logins`: new connection, full TLS 1.3 handshake and mutual LOGIN, beside two bare TLS
//! servers: one that only completes the handshake (the target's ceiling), one that also answers
//! one request of LOGIN's sizes (what the LOGIN exchange costs as transport alone).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::child::{CeilingMode, ChildServer};
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
    /// Rounds the count is split into. Each round runs its share of each side (bare
    /// handshakes, handshakes with one exchange, logins), so all see the machine in the same
    /// state: on a shared machine its speed drifts over seconds, and one long run of each
    /// would put that drift in the ratios. The order changes from round to round and evens
    /// out over each six; a multiple of 6 balances it exactly.
    #[arg(long, default_value_t = 12)]
    pub(crate) rounds: u64,
    /// Time limit of each side over all its rounds, in seconds (the run takes up to three
    /// times this); once one side has used it, no further round starts.
    #[arg(long, default_value_t = 60)]
    pub(crate) max_secs: u64,
}

/// What the rounds of one side (one of the bare servers, or the broker) add up to.
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

/// The three things each round measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// A bare TLS 1.3 handshake (the target's ceiling).
    Bare,
    /// The handshake plus one request and answer of a LOGIN's sizes, on a server that does
    /// nothing else: what the LOGIN exchange costs as transport alone.
    Exchange,
    /// The handshake plus the mutual LOGIN, on the broker.
    Login,
}

/// The order of the phases in each of six rounds, then again. Each round starts with the
/// phase the one before ended with, and over the six each phase comes right after each other
/// one exactly twice and goes first twice: so what one server does after its phase (closing
/// connections, the broker's `last_seen` commits) falls as often into each other's phase.
const ORDERS: [[Phase; 3]; 6] = {
    use Phase::{Bare as B, Exchange as E, Login as L};
    [
        [B, E, L],
        [L, B, E],
        [E, B, L],
        [L, E, B],
        [B, L, E],
        [E, L, B],
    ]
};

/// The bytes of the exchange's request and answer: a LOGIN request frame and its answer
/// (protocol.md 4.1 and 4.2, with the length prefix) are about this long.
const EXCHANGE_REQUEST_BYTES: usize = 140;
const EXCHANGE_ANSWER_BYTES: usize = 200;

pub(crate) async fn run(args: Args) -> anyhow::Result<Report> {
    if args.count == 0 || args.concurrency == 0 || args.users == 0 || args.rounds == 0 {
        bail!("--count, --concurrency, --users and --rounds must be at least 1");
    }
    if args.rounds > args.count {
        bail!("--rounds must not exceed --count (each round runs at least one of each)");
    }
    let dir = tempfile::tempdir().context("temporary directory")?;
    let config = common::load_config(dir.path())?;
    eprintln!("logins: starting the broker (SQLite) and the bare TLS servers");
    let broker = ChildServer::broker(&config, dir.path(), "broker")?;
    let tls_dir = config.server.data_dir.join("tls");
    let (cert, key) = (tls_dir.join("server.pem"), tls_dir.join("server.key"));
    let ceiling = ChildServer::tls_ceiling(&cert, &key, CeilingMode::Greet, dir.path())?;
    let exchange = ChildServer::tls_ceiling(
        &cert,
        &key,
        CeilingMode::Exchange {
            request: EXCHANGE_REQUEST_BYTES,
            answer: EXCHANGE_ANSWER_BYTES,
        },
        dir.path(),
    )?;
    let ca = common::ca_of(&config);
    let addr = format!("127.0.0.1:{}", broker.addr.port());
    eprintln!("logins: registering {} users", args.users);
    let users = Arc::new(
        common::register_users(&addr, &ca, &dir.path().join("profiles"), "u", args.users).await?,
    );
    let mut full = (*micromsg_client::tls::client_config(&ca)?).clone();
    full.resumption = rustls::client::Resumption::disabled();
    let full = Arc::new(full);

    let mut report = Report::default();
    let limit = Duration::from_secs(args.max_secs);
    let mut runs = vec![("full", [(); 3].map(|()| Arc::clone(&full)))];
    if args.resumption {
        // A session cache for each server: a ticket one server issued is no use at another,
        // and would only turn a resumption there into a full handshake.
        let resumable = [
            micromsg_client::tls::client_config(&ca)?,
            micromsg_client::tls::client_config(&ca)?,
            micromsg_client::tls::client_config(&ca)?,
        ];
        runs.push(("resumed", resumable));
    }
    let mut full_micromsg_rate = 0.0;
    for (kind, configs) in runs {
        let mut sides = [Side::new(), Side::new(), Side::new()];
        let mut started = 0u64;
        for round in 0..args.rounds {
            // Each side has `--max-secs` in all, over its rounds; every side runs every round
            // that starts, so all cover the same rounds.
            if sides.iter().any(|side| side.time >= limit) {
                eprintln!("logins: stopped at the time limit after {round} rounds");
                break;
            }
            // The count spread over the rounds, the remainder in the first ones.
            let share = args.count / args.rounds + u64::from(round < args.count % args.rounds);
            for phase in ORDERS[round as usize % ORDERS.len()] {
                let side = &mut sides[phase as usize];
                let tls = &configs[phase as usize];
                let left = limit.saturating_sub(side.time);
                let label =
                    |what: &str| format!("{what} ({kind}, round {}/{})", round + 1, args.rounds);
                match phase {
                    phase @ (Phase::Bare | Phase::Exchange) => {
                        let (server, what, exchanges) = match phase {
                            Phase::Bare => (&ceiling, "ceiling: bare TLS 1.3", false),
                            _ => (&exchange, "TLS 1.3 + one exchange", true),
                        };
                        let addr = server.addr;
                        let before = CpuSplit::read(server, None).await;
                        side.add(
                            measure(share, &args, left, &label(what), {
                                let tls = Arc::clone(tls);
                                move |_| bare_handshake(addr, Arc::clone(&tls), exchanges)
                            })
                            .await,
                        );
                        side.add_cpu(before, CpuSplit::read(server, None).await);
                    }
                    Phase::Login => {
                        // The users are taken in turn across the rounds, not from the first
                        // each round.
                        let first_user = started;
                        let before = CpuSplit::read(&broker, None).await;
                        side.add(
                            measure(share, &args, left, &label("micromsg: TLS 1.3 + LOGIN"), {
                                let tls = Arc::clone(tls);
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
                        side.add_cpu(before, CpuSplit::read(&broker, None).await);
                    }
                }
            }
            started += share;
        }
        let [bare_side, exchange_side, login_side] = sides;
        let cpu = (
            bare_side.cpu_per_op(),
            exchange_side.cpu_per_op(),
            login_side.cpu_per_op(),
        );
        if let (Some((b_server, b_gen)), Some((e_server, e_gen)), Some((l_server, l_gen))) = cpu {
            // The rates' ratio moves with whatever else runs; the CPU each operation costs
            // does much less, and its ratio is the rate ratio on an otherwise idle machine.
            let bare = b_server + b_gen;
            report.note(format!(
                "logins ({kind}): CPU per bare handshake: server {b_server:.0} µs, load generator \
                 {b_gen:.0} µs; per login: broker {l_server:.0} µs, load generator {l_gen:.0} µs; \
                 by CPU the logins run at {:.0}% of the handshakes (from /proc)",
                100.0 * bare / (l_server + l_gen)
            ));
            report.note(format!(
                "logins ({kind}): CPU per handshake + one exchange of a LOGIN's sizes \
                 ({EXCHANGE_REQUEST_BYTES} bytes, answered with {EXCHANGE_ANSWER_BYTES}): server \
                 {e_server:.0} µs, load generator {e_gen:.0} µs; by CPU the exchange alone runs \
                 at {:.0}% of the bare handshakes, and the logins at {:.0}% of the exchanges",
                100.0 * bare / (e_server + e_gen),
                100.0 * (e_server + e_gen) / (l_server + l_gen)
            ));
        }
        let ceiling_row = bare_side.into_row(
            &format!("ceiling: bare TLS 1.3 handshake ({kind})"),
            "handshakes/s",
        );
        let exchange_row = exchange_side
            .into_row(
                &format!("ceiling: TLS 1.3 + one exchange of LOGIN's sizes ({kind})"),
                "exchanges/s",
            )
            .ceiling(ceiling_row.rate);
        let mut row = login_side
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
        if exchange_row.rate > 0.0 {
            report.note(format!(
                "logins ({kind}): by rate the logins run at {:.0}% of the exchanges",
                100.0 * row.rate / exchange_row.rate
            ));
        }
        report.push(ceiling_row);
        report.push(exchange_row);
        report.push(row);
    }
    let broker_mem = broker.stop();
    let ceiling_mem = ceiling.stop();
    let exchange_mem = exchange.stop();
    for row in &mut report.rows {
        let (mem, source) = if row.name.starts_with("ceiling: bare") {
            (ceiling_mem, "bare TLS child process VmHWM (whole run)")
        } else if row.name.starts_with("ceiling") {
            (exchange_mem, "exchange TLS child process VmHWM (whole run)")
        } else {
            (broker_mem, "broker child process VmHWM (whole run)")
        };
        *row = row.clone().memory(mem.map(|m| m.peak_kib), source);
    }
    report.note(format!(
        "logins: {} connections per run, {} at a time, over {} users, in {} rounds of bare \
         handshakes, handshakes with one exchange and logins, in an order that evens out over \
         every six rounds (rates are counts over the summed time of each side's rounds); \
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

/// A bare TLS handshake, seen through by the server's first byte; with `exchange`, then a
/// request of [`EXCHANGE_REQUEST_BYTES`] and its answer, as a LOGIN's client sends and reads.
/// The connection is then dropped.
async fn bare_handshake(
    addr: std::net::SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    exchange: bool,
) -> anyhow::Result<()> {
    let mut stream = connect(addr, tls).await?;
    if exchange {
        stream.write_all(&[b'r'; EXCHANGE_REQUEST_BYTES]).await?;
        stream.flush().await?;
        let mut answer = [0u8; EXCHANGE_ANSWER_BYTES];
        stream.read_exact(&mut answer).await?;
    } else {
        let mut byte = [0u8; 1];
        stream.read_exact(&mut byte).await?;
    }
    Ok(())
}

async fn connect(
    addr: std::net::SocketAddr,
    tls: Arc<rustls::ClientConfig>,
) -> anyhow::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let _ = tcp.set_nodelay(true);
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1")?;
    Ok(tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await?)
}

#[cfg(test)]
mod tests {
    use super::{ORDERS, Phase};

    #[test]
    fn over_six_rounds_each_phase_goes_first_twice_and_follows_each_other_twice() {
        let all = [Phase::Bare, Phase::Exchange, Phase::Login];
        let sequence: Vec<Phase> = ORDERS.iter().flatten().copied().collect();
        for first in all {
            let times = ORDERS.iter().filter(|order| order[0] == first).count();
            assert_eq!(times, 2, "{first:?} goes first");
            for then in all.into_iter().filter(|then| *then != first) {
                let follows = sequence
                    .windows(2)
                    .filter(|pair| pair[0] == first && pair[1] == then)
                    .count();
                assert_eq!(follows, 2, "{then:?} right after {first:?}");
            }
        }
        // Each round starts with the phase the one before ended with, the first after the
        // last included, so no pair is added across rounds.
        for (round, next) in ORDERS.iter().zip(ORDERS.iter().cycle().skip(1)) {
            assert_eq!(round[2], next[0]);
        }
    }
}
