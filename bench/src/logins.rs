//! `logins`: new connection, full TLS 1.3 handshake and mutual LOGIN, beside a bare TLS server.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use crate::child::ChildServer;
use crate::common::{self, Progress, Tickets, User};
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
    /// Time limit of each measured run, in seconds.
    #[arg(long, default_value_t = 60)]
    pub(crate) max_secs: u64,
}

const SCENARIO: &str = "logins";

pub(crate) async fn run(args: Args) -> anyhow::Result<Report> {
    if args.count == 0 || args.concurrency == 0 || args.users == 0 {
        bail!("--count, --concurrency and --users must be at least 1");
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
        eprintln!("logins: ceiling, bare TLS 1.3 handshakes ({kind})");
        let c_cpu = CpuSplit::read(&ceiling, None).await;
        let (c_count, c_err, c_time, mut c_lat) = measure(&args, limit, "ceiling", {
            let tls = Arc::clone(&tls);
            let addr = ceiling.addr;
            move |_| {
                let tls = Arc::clone(&tls);
                async move { bare_handshake(addr, tls).await }
            }
        })
        .await;
        let c_cpu = cpu_per_op(c_cpu, &ceiling, c_count).await;
        eprintln!("logins: micromsg, TLS 1.3 + LOGIN ({kind})");
        let m_cpu = CpuSplit::read(&broker, None).await;
        let (m_count, m_err, m_time, mut m_lat) = measure(&args, limit, "micromsg", {
            let tls = Arc::clone(&tls);
            let users = Arc::clone(&users);
            move |i| {
                let tls = Arc::clone(&tls);
                let users = Arc::clone(&users);
                async move {
                    let user: &User = &users[(i as usize) % users.len()];
                    let link = user.login(tls).await?;
                    drop(link);
                    Ok(())
                }
            }
        })
        .await;
        let m_cpu = cpu_per_op(m_cpu, &broker, m_count).await;
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
        let ceiling_row = Row::new(
            SCENARIO,
            &format!("ceiling: bare TLS 1.3 handshake ({kind})"),
            c_count,
            c_err,
            c_time,
        )
        .unit("handshakes/s")
        .latency(&mut c_lat);
        let mut row = Row::new(
            SCENARIO,
            &format!("TLS 1.3 + mutual LOGIN ({kind})"),
            m_count,
            m_err,
            m_time,
        )
        .unit("logins/s")
        .latency(&mut m_lat)
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
        "logins: {} connections per run, {} at a time, over {} users; broker on SQLite (LOGIN \
         writes last_seen); client and servers share the machine's cores",
        args.count, args.concurrency, args.users
    ));
    Ok(report)
}

/// (server child, load generator) CPU microseconds per operation since `before`.
async fn cpu_per_op(
    before: Option<CpuSplit>,
    server: &ChildServer,
    ops: u64,
) -> Option<(f64, f64)> {
    let after = CpuSplit::read(server, None).await?;
    Some(after.since(&before?).server_and_generator_per_op(ops))
}

/// Runs `op(i)` for `args.count` items with `args.concurrency` workers; returns (ok, errors,
/// elapsed, latencies).
async fn measure<F, Fut>(
    args: &Args,
    limit: Duration,
    label: &str,
    op: F,
) -> (u64, u64, Duration, Samples)
where
    F: Fn(u64) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    let tickets = Tickets::new(args.count, limit);
    let _progress = Progress::start(label, args.count, Arc::clone(&tickets));
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
    let mut all = Samples::with_capacity(args.count as usize);
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
