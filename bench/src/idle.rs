//! `idle`: many logged-in connections held open with keep-alive PINGs; the broker's memory per
//! connection at each count, beside a bare TLS server holding the same number of connections.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use micromsg_crypto::nonce::{self, Direction, NonceContext};
use micromsg_wire::io::{FrameReader, write_frame};
use micromsg_wire::message::request::LoginArgs;
use micromsg_wire::{DeviceId, Hex32, Limits, Message, Number, Request, ResponseData};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpSocket;
use tokio::sync::watch;

use crate::child::{CeilingMode, ChildServer};
use crate::common::{self, User};
use crate::report::{Report, Row};

/// Options of `idle`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Connection counts to measure at, ascending, comma-separated. Each count's figure is
    /// the memory each connection added since the previous count (half the first count is
    /// measured first for that). Each connection is a file descriptor in this process and in
    /// the broker: stay below the open-file limit.
    #[arg(long, value_delimiter = ',', default_value = "1000,5000,19000")]
    pub(crate) counts: Vec<u64>,
    /// Registered users the connections log in as (round robin; one device each).
    #[arg(long, default_value_t = 64)]
    pub(crate) users: usize,
    /// Client source addresses 127.0.0.1 .. 127.0.0.N the connections are spread over.
    #[arg(long, default_value_t = 8)]
    pub(crate) source_addrs: u8,
    /// Connections being opened at once.
    #[arg(long, default_value_t = 64)]
    pub(crate) concurrency: usize,
    /// Seconds between keep-alive PINGs of one connection (spread at random).
    #[arg(long, default_value_t = 30)]
    pub(crate) ping_secs: u64,
    /// Seconds to hold each count before reading memory.
    #[arg(long, default_value_t = 5)]
    pub(crate) settle_secs: u64,
    /// Skip the bare TLS ceiling.
    #[arg(long)]
    pub(crate) no_ceiling: bool,
    /// Time limit for opening the connections of one count, in seconds.
    #[arg(long, default_value_t = 120)]
    pub(crate) max_secs: u64,
}

const SCENARIO: &str = "idle";

/// The soft open-file limit of this process.
fn open_file_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

pub(crate) async fn run(args: Args) -> anyhow::Result<Report> {
    if args.counts.is_empty() || args.counts.contains(&0) {
        bail!("--counts must list connection counts of at least 1");
    }
    if args.counts.windows(2).any(|w| w[0] >= w[1]) {
        bail!("--counts must be ascending");
    }
    if args.users == 0 || args.concurrency == 0 || args.source_addrs == 0 || args.ping_secs == 0 {
        bail!("--users, --concurrency, --source-addrs and --ping-secs must be at least 1");
    }
    let max = args.counts.iter().copied().max().unwrap_or(0);
    if let Some(limit) = open_file_limit()
        && max + 200 > limit
    {
        bail!(
            "--counts goes up to {max} connections, but this process may open only {limit} \
             files (200 are kept for everything else); lower the counts"
        );
    }
    let dir = tempfile::tempdir().context("temporary directory")?;
    let config = common::load_config(dir.path())?;
    eprintln!("idle: starting the broker (SQLite, separate process)");
    let broker = ChildServer::broker(&config, dir.path(), "broker")?;
    let ca = common::ca_of(&config);
    let addr = format!("127.0.0.1:{}", broker.addr.port());
    eprintln!("idle: registering {} users", args.users);
    let users = Arc::new(
        common::register_users(&addr, &ca, &dir.path().join("profiles"), "u", args.users).await?,
    );
    let tls = micromsg_client::tls::client_config(&ca)?;
    let mut report = Report::default();

    let login = LoginTarget {
        addr: broker.addr,
        users: Some(Arc::clone(&users)),
    };
    let rows = hold_counts(
        &args,
        &login,
        &tls,
        || broker.memory(),
        "logged-in connections",
    )
    .await?;
    let peak = broker.stop();
    let mut broker_rows = rows;
    if let Some(last) = broker_rows.last_mut() {
        *last = last.clone().memory(
            peak.map(|m| m.peak_kib),
            "broker child process VmHWM (whole run)",
        );
    }

    let mut ceiling_rows = Vec::new();
    if !args.no_ceiling {
        let tls_dir = config.server.data_dir.join("tls");
        let bare = ChildServer::tls_ceiling(
            &tls_dir.join("server.pem"),
            &tls_dir.join("server.key"),
            CeilingMode::Hold,
            dir.path(),
        )?;
        let target = LoginTarget {
            addr: bare.addr,
            users: None,
        };
        ceiling_rows = hold_counts(
            &args,
            &target,
            &tls,
            || bare.memory(),
            "bare TLS 1.3 connections",
        )
        .await?;
        let _ = bare.stop();
    }
    for (i, mut row) in broker_rows.into_iter().enumerate() {
        if let Some(c) = ceiling_rows.get(i) {
            // Lower is better for memory: the ratio shown is broker / bare TLS.
            row = row.ceiling(c.rate);
        }
        let met = row.rate <= 12.0;
        row = row.target("≤ 12 KiB/conn", met);
        report.push(row);
    }
    for row in ceiling_rows {
        report.push(row);
    }
    report.note(
        "idle: the broker's per-connection event queue (micromsg_broker::event_queue) allocates \
         slots only while events wait, so an idle connection's queue is one small Arc",
    );
    report.note(format!(
        "idle: KiB/conn = growth of the server's VmRSS since the previous count ÷ the \
         connections added (the first count's previous point is half of it); the average \
         since before any connection is under each row's memory note; {} users, \
         source addresses 127.0.0.1-{}, PING every ~{} s; the ratio column is broker ÷ bare \
         TLS server (memory: lower is better)",
        args.users, args.source_addrs, args.ping_secs
    ));
    Ok(report)
}

/// Where connections go: a broker (log in as `users`) or the bare TLS server (`None`).
struct LoginTarget {
    addr: SocketAddr,
    users: Option<Arc<Vec<User>>>,
}

/// Opens connections up to each count, holds them, and reads the server's memory at each.
async fn hold_counts<M>(
    args: &Args,
    target: &LoginTarget,
    tls: &Arc<rustls::ClientConfig>,
    memory: M,
    what: &str,
) -> anyhow::Result<Vec<Row>>
where
    M: Fn() -> Option<crate::child::Memory>,
{
    let (stop_tx, stop_rx) = watch::channel(false);
    let alive = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let base = memory().context("reading the server's memory")?;
    let mut rows = Vec::new();
    let mut opened = 0u64;
    let mut holders = tokio::task::JoinSet::new();
    // Each count's figure is the memory each connection adds: the growth since the previous
    // count over the connections opened since. The first count's previous point is half of it,
    // measured first and not reported. The average over the memory before any connection is
    // printed too; it also holds what the server grows once, on its first burst of logins
    // (the store's pool opening connections, each with a thread and a malloc arena).
    let reference = (args.counts[0] / 2).max(1);
    let points = std::iter::once(reference)
        .filter(|&r| r < args.counts[0])
        .chain(args.counts.iter().copied());
    let mut previous: Option<(u64, crate::child::Memory)> = None;
    for count in points {
        eprintln!("idle: opening {what} up to {count}");
        let start = Instant::now();
        let deadline = start + Duration::from_secs(args.max_secs);
        let mut last_print = Instant::now();
        let mut opening = tokio::task::JoinSet::new();
        while opened < count && Instant::now() < deadline {
            while opening.len() < args.concurrency && opened < count {
                let i = opened;
                opened += 1;
                let src = source_addr(i, args.source_addrs);
                let user = target
                    .users
                    .as_ref()
                    .map(|u| u[(i as usize) % u.len()].clone());
                let (tls, addr) = (Arc::clone(tls), target.addr);
                opening.spawn(async move { open(addr, src, tls, user.as_ref()).await });
            }
            if let Some(done) = opening.join_next().await {
                match done {
                    Ok(Ok(conn)) => {
                        alive.fetch_add(1, Ordering::Relaxed);
                        let (stop, alive, failed) =
                            (stop_rx.clone(), Arc::clone(&alive), Arc::clone(&failed));
                        let ping = Duration::from_secs(args.ping_secs);
                        holders.spawn(hold(conn, ping, stop, alive, failed));
                    }
                    Ok(Err(e)) => {
                        if failed.fetch_add(1, Ordering::Relaxed) == 0 {
                            eprintln!("  connection failed: {e:#}");
                        }
                    }
                    Err(_) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            if last_print.elapsed() >= Duration::from_secs(1) {
                eprintln!(
                    "  {what}: {} open, {} failed",
                    alive.load(Ordering::Relaxed),
                    failed.load(Ordering::Relaxed)
                );
                last_print = Instant::now();
            }
        }
        while let Some(done) = opening.join_next().await {
            if let Ok(Ok(conn)) = done {
                alive.fetch_add(1, Ordering::Relaxed);
                let (stop, alive, failed) =
                    (stop_rx.clone(), Arc::clone(&alive), Arc::clone(&failed));
                holders.spawn(hold(
                    conn,
                    Duration::from_secs(args.ping_secs),
                    stop,
                    alive,
                    failed,
                ));
            } else {
                failed.fetch_add(1, Ordering::Relaxed);
            }
        }
        let open_time = start.elapsed();
        tokio::time::sleep(Duration::from_secs(args.settle_secs)).await;
        let now = memory().context("reading the server's memory")?;
        let held = alive.load(Ordering::Relaxed);
        let average = now.rss_kib.saturating_sub(base.rss_kib) as f64 / held.max(1) as f64;
        let Some((before_held, before)) = previous.replace((held, now)) else {
            eprintln!(
                "  {what}: {held} held (reference point), server RSS {} KiB (before any: {} KiB)",
                now.rss_kib, base.rss_kib
            );
            continue;
        };
        let added = held.saturating_sub(before_held);
        let per_conn = now.rss_kib.saturating_sub(before.rss_kib) as f64 / added.max(1) as f64;
        eprintln!(
            "  {what}: {held} held, server RSS {} KiB: {per_conn:.2} KiB per connection added \
             since {before_held} ({} KiB then); average since before any ({} KiB): \
             {average:.2} KiB/conn; anonymous {} KiB, file-backed {} KiB",
            now.rss_kib, before.rss_kib, base.rss_kib, now.anon_kib, now.file_kib
        );
        let mut row = Row::new(
            SCENARIO,
            &format!("{what} at {count}: server memory per connection"),
            held,
            failed.load(Ordering::Relaxed),
            open_time,
        )
        .unit("KiB/conn")
        .rate(per_conn);
        row.peak_memory_kib = Some(now.rss_kib);
        row.memory_source = Some(format!(
            "server VmRSS with {held} connections: {per_conn:.2} KiB per connection added since \
             {before_held} ({} KiB then); {average:.2} KiB/conn averaged over all {held} since \
             before any ({} KiB)",
            before.rss_kib, base.rss_kib
        ));
        rows.push(row);
    }
    let _ = stop_tx.send(true);
    let close_by = Instant::now() + Duration::from_secs(30);
    while Instant::now() < close_by {
        match tokio::time::timeout(Duration::from_secs(1), holders.join_next()).await {
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(_) => {}
        }
    }
    holders.abort_all();
    Ok(rows)
}

/// The client source address of the `i`th connection: 127.0.0.1 .. 127.0.0.`spread`.
fn source_addr(i: u64, spread: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(
        127,
        0,
        0,
        1 + (i % u64::from(spread.max(1))) as u8,
    ))
}

type Tls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// A held connection.
struct Conn {
    reader: FrameReader<tokio::io::ReadHalf<Tls>>,
    writer: tokio::io::WriteHalf<Tls>,
    /// Whether it is a logged-in broker connection (PINGs) or bare TLS (nothing sent).
    broker: bool,
}

/// Connects from `src`, does the TLS handshake and, for a broker, the LOGIN.
async fn open(
    addr: SocketAddr,
    src: IpAddr,
    tls: Arc<rustls::ClientConfig>,
    user: Option<&User>,
) -> anyhow::Result<Conn> {
    let socket = TcpSocket::new_v4()?;
    socket
        .bind(SocketAddr::new(src, 0))
        .with_context(|| format!("binding a client socket to {src}"))?;
    let tcp = socket.connect(addr).await.context("connect")?;
    let _ = tcp.set_nodelay(true);
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1")?;
    let stream = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .context("TLS handshake")?;
    let Some(user) = user else {
        let (read, writer) = tokio::io::split(stream);
        return Ok(Conn {
            reader: FrameReader::new(read, 65_536),
            writer,
            broker: false,
        });
    };
    let mut binding = [0u8; 32];
    stream
        .get_ref()
        .1
        .export_keying_material(&mut binding, nonce::TLS_EXPORTER_LABEL, None)
        .map_err(|e| anyhow::anyhow!("TLS exporter: {e}"))?;
    let ctx = NonceContext {
        entity: &user.info.number,
        device: user.info.device,
        binding: &binding,
    };
    let (_step, client_nonce) = nonce::compute_now(
        &user.secrets.client_secret,
        Direction::ClientToBroker,
        &ctx,
        micromsg_client::account::unix_now(),
        u64::from(user.info.nonce_step.max(1)),
    )
    .map_err(|e| anyhow::anyhow!("login nonce: {e}"))?;
    let login = Request::Login(LoginArgs {
        entity: Number::new(user.info.number.clone())?,
        device: DeviceId::new(user.info.device)?,
        secret: Hex32::from_bytes(client_nonce),
    });
    let limits = Limits::default();
    let (read, mut writer) = tokio::io::split(stream);
    let mut reader = FrameReader::new(read, limits.max_frame_len);
    write_frame(&mut writer, &login.encode(1)).await?;
    match answer(&mut reader).await? {
        ResponseData::Login(_) => Ok(Conn {
            reader,
            writer,
            broker: true,
        }),
        other => bail!("LOGIN answered with {}", other.kind().as_str()),
    }
}

/// The next response (events before it are skipped).
async fn answer<R: AsyncRead + Unpin>(reader: &mut FrameReader<R>) -> anyhow::Result<ResponseData> {
    let limits = Limits::default();
    loop {
        let body = tokio::time::timeout(Duration::from_secs(30), reader.next_frame())
            .await
            .context("no answer within 30 s")??
            .context("the server closed the connection")?;
        match Message::decode(&body, &limits)? {
            Message::Response(r) => {
                return r.result.map_err(|e| {
                    anyhow::anyhow!("refused: {}: {}", e.error.code, e.error.message)
                });
            }
            Message::Event(_) => {}
            Message::Request { .. } => bail!("the server sent a request"),
        }
    }
}

/// Holds `conn` until `stop`, sending a PING every `every` (first one at a random offset).
async fn hold(
    mut conn: Conn,
    every: Duration,
    mut stop: watch::Receiver<bool>,
    alive: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
) {
    let offset = u64::from(common::random_bytes::<2>()[0]) * every.as_millis() as u64 / 256;
    let mut next = tokio::time::Instant::now() + Duration::from_millis(offset);
    let mut id = 2u32;
    loop {
        tokio::select! {
            () = tokio::time::sleep_until(next) => {
                next += every;
                if !conn.broker {
                    continue;
                }
                let ok = async {
                    write_frame(&mut conn.writer, &Request::Ping.encode(id)).await?;
                    id = id.wrapping_add(1).max(2);
                    answer(&mut conn.reader).await
                }
                .await;
                if ok.is_err() {
                    alive.fetch_sub(1, Ordering::Relaxed);
                    failed.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
            _ = stop.changed() => break,
        }
    }
    let _ = flush_close(&mut conn.writer).await;
    alive.fetch_sub(1, Ordering::Relaxed);
}

async fn flush_close<W: AsyncWrite + Unpin>(w: &mut W) -> std::io::Result<()> {
    w.shutdown().await
}
