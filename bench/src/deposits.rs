//! `deposits`: offline DEPOSITs from many senders to one recipient, acknowledged after commit,
//! then the drain; beside concurrent single-row durable INSERTs into the same store.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use micromsg_client::link::BrokerLink;
use micromsg_wire::message::request::{DepositArgs, InboxAckArgs, InboxFetchArgs};
use micromsg_wire::{Blob, Hex16, Number, Request, ResponseData};

use crate::child::ChildServer;
use crate::common::{self, PgDatabase, Progress, StoreKind, Tickets};
use crate::report::{Report, Row, Samples};

/// Options of `deposits`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// The broker's store. Postgres needs DATABASE_URL; a fresh database is made and dropped.
    #[arg(long, value_enum, default_value_t = StoreKind::Sqlite)]
    pub(crate) store: StoreKind,
    /// Deposits in total.
    #[arg(long, default_value_t = 50_000)]
    pub(crate) count: u64,
    /// Concurrent senders (each its own user and connection, one deposit in flight).
    #[arg(long, default_value_t = 100)]
    pub(crate) senders: usize,
    /// Recipients the senders deposit to (sender i to recipient i mod N). With 1, one inbox
    /// grows to --count messages.
    #[arg(long, default_value_t = 1)]
    pub recipients: usize,
    /// Ciphertext bytes per deposit.
    #[arg(long, default_value_t = 256)]
    pub(crate) body: usize,
    /// Concurrent clients of the ceiling (single-row durable INSERTs).
    #[arg(long, default_value_t = 90)]
    pub(crate) ceiling_clients: u32,
    /// INSERTs of the ceiling (default: the same as --count).
    #[arg(long)]
    pub(crate) ceiling_count: Option<u64>,
    /// Messages per INBOX-FETCH when draining (1..=1000; the broker may return fewer).
    #[arg(long, default_value_t = 1000)]
    pub(crate) fetch_limit: u32,
    /// The broker's store connection pool size.
    #[arg(long, default_value_t = 16)]
    pub(crate) pool: u32,
    /// Time limit of each measured phase, in seconds.
    #[arg(long, default_value_t = 60)]
    pub(crate) max_secs: u64,
}

const SCENARIO: &str = "deposits";

/// CPU time of the three parties of a run: the broker child, its Postgres backends (zero on
/// SQLite, whose work runs in the broker's threads) and this load generator. CPU per
/// operation holds on a busy machine, where rates do not: it is what two builds are compared
/// by when other work shares the cores.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CpuSplit {
    broker: Duration,
    postgres: Duration,
    generator: Duration,
}

impl CpuSplit {
    /// Now; `None` when a figure cannot be read (not Linux, the child gone).
    pub(crate) async fn read(broker: &ChildServer, db: Option<&PgDatabase>) -> Option<Self> {
        let postgres = match db {
            Some(db) => db.backends_cpu().await.ok()?,
            None => Duration::ZERO,
        };
        Some(Self {
            broker: broker.cpu()?,
            postgres,
            generator: crate::child::cpu_of("self")?,
        })
    }

    /// The CPU spent between `before` and `self`.
    pub(crate) fn since(&self, before: &Self) -> Self {
        Self {
            broker: self.broker.saturating_sub(before.broker),
            postgres: self.postgres.saturating_sub(before.postgres),
            generator: self.generator.saturating_sub(before.generator),
        }
    }

    /// This and `other` together (the CPU of two windows, summed).
    pub(crate) fn plus(&self, other: &Self) -> Self {
        Self {
            broker: self.broker + other.broker,
            postgres: self.postgres + other.postgres,
            generator: self.generator + other.generator,
        }
    }

    /// (broker or other server child, load generator) microseconds per operation.
    pub(crate) fn server_and_generator_per_op(&self, ops: u64) -> (f64, f64) {
        let us = |d: Duration| d.as_secs_f64() * 1e6 / ops.max(1) as f64;
        (us(self.broker), us(self.generator))
    }

    /// One line: CPU microseconds per operation, by party.
    pub(crate) fn per_op(&self, what: &str, ops: u64) -> String {
        let us = |d: Duration| d.as_secs_f64() * 1e6 / ops.max(1) as f64;
        format!(
            "CPU per {what}: broker {:.1} µs, Postgres backends {:.1} µs, load generator {:.1} µs \
             (total {:.1} µs; from /proc, over the {what} phase)",
            us(self.broker),
            us(self.postgres),
            us(self.generator),
            us(self.broker + self.postgres + self.generator),
        )
    }
}

pub(crate) async fn run(args: Args) -> anyhow::Result<Report> {
    if args.count == 0
        || args.senders == 0
        || args.recipients == 0
        || args.ceiling_clients == 0
        || args.pool == 0
    {
        bail!("--count, --senders, --recipients, --ceiling-clients and --pool must be at least 1");
    }
    if !(1..=1000).contains(&args.fetch_limit) {
        bail!("--fetch-limit must be 1 to 1000");
    }
    if args.body == 0 || args.body > 48_000 {
        bail!("--body must be 1 to 48000 bytes (the broker's default max_message_bytes)");
    }
    let db = match args.store {
        StoreKind::Postgres => Some(PgDatabase::create().await?),
        StoreKind::Sqlite => None,
    };
    let result = run_with(&args, db.as_ref()).await;
    if let Some(db) = db
        && let Err(e) = db.drop_now().await
    {
        eprintln!("warning: could not drop the benchmark database: {e:#}");
    }
    result
}

async fn run_with(args: &Args, db: Option<&PgDatabase>) -> anyhow::Result<Report> {
    let dir = tempfile::tempdir().context("temporary directory")?;
    let mut config = common::load_config(dir.path())?;
    config.database.url = db.map(|d| d.url.clone());
    config.database.max_connections = args.pool;
    let store = args.store.name();
    eprintln!("deposits: starting the broker ({store})");
    let broker = ChildServer::broker(&config, dir.path(), "broker")?;
    let ca = common::ca_of(&config);
    let addr = format!("127.0.0.1:{}", broker.addr.port());
    let profiles = dir.path().join("profiles");
    eprintln!(
        "deposits: registering {} senders and a recipient, pairing them",
        args.senders
    );
    let recipients = common::register_users(&addr, &ca, &profiles, "r", args.recipients).await?;
    let senders = common::register_users(&addr, &ca, &profiles, "s", args.senders).await?;
    let tls = micromsg_client::tls::client_config(&ca)?;
    let mut targets = Vec::with_capacity(recipients.len());
    let mut r_links = Vec::with_capacity(recipients.len());
    for r in &recipients {
        targets.push(r.number()?);
        r_links.push(r.login(Arc::clone(&tls)).await?);
    }
    let mut links = Vec::with_capacity(senders.len());
    for (i, s) in senders.iter().enumerate() {
        let mut link = s.login(Arc::clone(&tls)).await?;
        let k = i % recipients.len();
        common::pair_local(&mut link, &mut r_links[k], &targets[k]).await?;
        links.push((link, targets[k].clone()));
    }
    // Recipients are offline while deposits arrive (an online one would get an INBOX event
    // per deposit).
    drop(r_links);

    let limit = Duration::from_secs(args.max_secs);
    let mut report = Report::default();
    eprintln!(
        "deposits: {} deposits of {} bytes from {} senders",
        args.count, args.body, args.senders
    );
    let cpu_before = CpuSplit::read(&broker, db).await;
    let (count, errors, elapsed, mut lat) = deposit_load(args, limit, links).await?;
    if let (Some(before), Some(after)) = (cpu_before, CpuSplit::read(&broker, db).await) {
        report.note(after.since(&before).per_op("deposit", count));
    }
    let mut row = Row::new(
        SCENARIO,
        &format!(
            "DEPOSIT ack after commit ({store}, {} senders → {} recipients)",
            args.senders, args.recipients
        ),
        count,
        errors,
        elapsed,
    )
    .unit("deposits/s")
    .latency(&mut lat);

    eprintln!("deposits: draining the recipient's inbox");
    let drain_tickets = Tickets::new(count, limit);
    let progress = Progress::start("drain", count, Arc::clone(&drain_tickets));
    let start = Instant::now();
    let mut drains = tokio::task::JoinSet::new();
    for r in recipients {
        let (tickets, fetch_limit) = (Arc::clone(&drain_tickets), args.fetch_limit);
        drains.spawn(async move {
            let session = r.connect().await?;
            drain(session.link, tickets, fetch_limit, limit).await
        });
    }
    let (mut drained, mut d_err, mut d_lat) = (0, 0, Samples::default());
    while let Some(done) = drains.join_next().await {
        let (n, e, lat) = done.context("a drain task failed")??;
        drained += n;
        d_err += e;
        d_lat.merge(lat);
    }
    let d_time = start.elapsed();
    drop(progress);
    let drain_row = Row::new(
        SCENARIO,
        &format!(
            "drain: INBOX-FETCH + INBOX-ACK ({store}, {} recipients)",
            args.recipients
        ),
        drained,
        d_err,
        d_time,
    )
    .unit("messages/s")
    .latency(&mut d_lat);
    let drain_met = drain_row.rate >= 30_000.0;
    let drain_row = drain_row.target("≥ 30,000/s", drain_met);
    if drained != count {
        report.note(format!(
            "deposits: drained {drained} of {count} acknowledged deposits (must be equal)"
        ));
    }
    let memory = broker.stop();
    row = row.memory(
        memory.map(|m| m.peak_kib),
        "broker child process VmHWM (deposits and drain)",
    );

    let ceiling_count = args.ceiling_count.unwrap_or(args.count);
    eprintln!(
        "deposits: ceiling, {ceiling_count} single-row durable INSERTs from {} clients ({store})",
        args.ceiling_clients
    );
    let (c_count, c_err, c_time, mut c_lat) = match db {
        Some(db) => pg_ceiling(&db.url, args, ceiling_count, limit).await?,
        None => sqlite_ceiling(&dir.path().join("ceiling.db"), args, ceiling_count, limit).await?,
    };
    let ceiling = Row::new(
        SCENARIO,
        &format!(
            "ceiling: single-row durable INSERT ({store}, {} clients)",
            args.ceiling_clients
        ),
        c_count,
        c_err,
        c_time,
    )
    .unit("inserts/s")
    .latency(&mut c_lat);
    row = row.ceiling(ceiling.rate);
    if args.store == StoreKind::Postgres {
        let p99 = row.latency.map_or(f64::MAX, |l| l.p99_ms);
        let met = row.rate >= 10_000.0 && p99 <= 20.0 && row.ratio.is_some_and(|r| r >= 0.5);
        row = row.target("≥ 10,000/s, p99 ≤ 20 ms, ≥ 50% of ceiling", met);
    } else {
        let met = row.ratio.is_some_and(|r| r >= 0.5);
        row = row.target("≥ 50% of ceiling (issue's numbers are for Postgres)", met);
    }
    report.push(ceiling);
    report.push(row);
    report.push(drain_row);
    report.note(format!(
        "deposits: {} byte bodies, entity inbox mode, {} recipients of one device each; the \
         ceiling runs after the broker stopped, on the same {store} store",
        args.body, args.recipients
    ));
    Ok(report)
}

async fn deposit_load(
    args: &Args,
    limit: Duration,
    links: Vec<(BrokerLink, Number)>,
) -> anyhow::Result<(u64, u64, Duration, Samples)> {
    let tickets = Tickets::new(args.count, limit);
    let _progress = Progress::start("deposits", args.count, Arc::clone(&tickets));
    let run_id: [u8; 8] = common::random_bytes();
    let body: Arc<Vec<u8>> = Arc::new((0..args.body).map(|i| (i * 7) as u8).collect());
    let start = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for (mut link, target) in links {
        let (tickets, body) = (Arc::clone(&tickets), Arc::clone(&body));
        workers.spawn(async move {
            let mut lat = Samples::with_capacity(1024);
            let mut errors = 0u64;
            while let Some(i) = tickets.take() {
                let t = Instant::now();
                let request = Request::Deposit(DepositArgs {
                    target: target.clone(),
                    id: Hex16::from_bytes(common::message_id(&run_id, i)),
                    body: Blob::new(body.to_vec()),
                });
                match link.call(request).await {
                    Ok(ResponseData::Deposit(_)) => lat.push(t.elapsed()),
                    Ok(other) => {
                        errors += 1;
                        eprintln!("  deposit answered with {}", other.kind().as_str());
                    }
                    Err(e) => {
                        errors += 1;
                        if errors == 1 {
                            eprintln!("  deposit failed: {e}");
                        }
                    }
                }
                tickets.finish();
            }
            (lat, errors)
        });
    }
    let mut all = Samples::with_capacity(args.count as usize);
    let mut errors = 0;
    while let Some(done) = workers.join_next().await {
        let (lat, e) = done.context("a sender task failed")?;
        all.merge(lat);
        errors += e;
    }
    let elapsed = start.elapsed();
    if tickets.timed_out() {
        eprintln!("  deposits: stopped at the time limit");
    }
    Ok((all.len() as u64, errors, elapsed, all))
}

/// Fetches and acknowledges until the inbox is empty or time is up. Latency samples are per
/// page: the time between two INBOX-ACK answers.
async fn drain(
    mut link: BrokerLink,
    tickets: Arc<Tickets>,
    fetch_limit: u32,
    limit: Duration,
) -> anyhow::Result<(u64, u64, Samples)> {
    let deadline = Instant::now() + limit;
    let mut removed = 0u64;
    let mut errors = 0u64;
    let mut lat = Samples::default();
    // As the client's inbox fetch does: the FETCH of page n+1 goes out before the ACK of page
    // n, and the ACK's answer is read after the next page's. The broker answers a connection's
    // requests in order, so it commits ACK n while this end decodes page n+1.
    let fetch = |after: Option<Hex16>| {
        Request::InboxFetch(InboxFetchArgs {
            limit: Some(fetch_limit),
            after,
        })
    };
    let mut next = Some(link.send(&fetch(None)).await?);
    let mut unanswered_ack: Option<(u32, usize)> = None;
    let mut t = Instant::now();
    while let Some(fetch_id) = next.take() {
        let page = match link.answer(fetch_id).await? {
            ResponseData::InboxFetch(page) => page,
            other => bail!("INBOX-FETCH answered with {}", other.kind().as_str()),
        };
        let ids: Vec<Hex16> = page.messages.iter().map(|m| m.id).collect();
        let more = page.more && !ids.is_empty() && Instant::now() < deadline;
        if more {
            next = Some(link.send(&fetch(ids.last().copied())).await?);
        }
        let ack = if ids.is_empty() {
            None
        } else {
            let sent = ids.len();
            Some((
                link.send(&Request::InboxAck(InboxAckArgs { ids })).await?,
                sent,
            ))
        };
        if let Some((id, sent)) = unanswered_ack.take() {
            let (n, e) = ack_answer(&mut link, id, sent, &tickets).await?;
            removed += n;
            errors += e;
            // Per page: from one ACK's answer to the next.
            lat.push(t.elapsed());
            t = Instant::now();
        }
        unanswered_ack = ack;
    }
    if let Some((id, sent)) = unanswered_ack {
        let (n, e) = ack_answer(&mut link, id, sent, &tickets).await?;
        removed += n;
        errors += e;
        lat.push(t.elapsed());
    }
    Ok((removed, errors, lat))
}

/// Reads the answer to the INBOX-ACK `id` of `sent` ids; returns (removed, not removed).
async fn ack_answer(
    link: &mut BrokerLink,
    id: u32,
    sent: usize,
    tickets: &Tickets,
) -> anyhow::Result<(u64, u64)> {
    match link.answer(id).await? {
        ResponseData::InboxAck(d) => {
            for _ in 0..d.removed {
                tickets.finish();
            }
            let removed = u64::from(d.removed);
            Ok((removed, (sent as u64).saturating_sub(removed)))
        }
        other => bail!("INBOX-ACK answered with {}", other.kind().as_str()),
    }
}

/// Runs `clients` tasks sharing `count` tickets; each calls `insert(i)`.
async fn ceiling_load<F, Fut>(
    clients: u32,
    count: u64,
    limit: Duration,
    insert: F,
) -> anyhow::Result<(u64, u64, Duration, Samples)>
where
    F: Fn(u64) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Result<(), sqlx::Error>> + Send,
{
    let tickets = Tickets::new(count, limit);
    let _progress = Progress::start("ceiling", count, Arc::clone(&tickets));
    let start = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..clients {
        let (tickets, insert) = (Arc::clone(&tickets), insert.clone());
        workers.spawn(async move {
            let mut lat = Samples::with_capacity(1024);
            let mut errors = 0u64;
            while let Some(i) = tickets.take() {
                let t = Instant::now();
                match insert(i).await {
                    Ok(()) => lat.push(t.elapsed()),
                    Err(e) => {
                        errors += 1;
                        if errors == 1 {
                            eprintln!("  ceiling insert failed: {e}");
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
        let (lat, e) = done.context("a ceiling task failed")?;
        all.merge(lat);
        errors += e;
    }
    let elapsed = start.elapsed();
    Ok((all.len() as u64, errors, elapsed, all))
}

const CEILING_TABLE: &str = "CREATE TABLE bench_ceiling (id BYTEA PRIMARY KEY, recipient TEXT \
     NOT NULL, body BYTEA NOT NULL, created_at BIGINT NOT NULL)";

async fn pg_ceiling(
    url: &str,
    args: &Args,
    count: u64,
    limit: Duration,
) -> anyhow::Result<(u64, u64, Duration, Samples)> {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(args.ceiling_clients)
        .min_connections(args.ceiling_clients)
        .connect(url)
        .await
        .context("connecting the ceiling's pool")?;
    sqlx::query(CEILING_TABLE).execute(&pool).await?;
    let run_id: [u8; 8] = common::random_bytes();
    let body: Arc<Vec<u8>> = Arc::new((0..args.body).map(|i| (i * 7) as u8).collect());
    ceiling_load(args.ceiling_clients, count, limit, move |i| {
        let (pool, body) = (pool.clone(), Arc::clone(&body));
        async move {
            // Autocommit: one durable commit per row (synchronous_commit as the server has it).
            sqlx::query(
                "INSERT INTO bench_ceiling (id, recipient, body, created_at) VALUES ($1, $2, $3, $4)",
            )
            .bind(common::message_id(&run_id, i).to_vec())
            .bind("5550000000")
            .bind(body.as_slice())
            .bind(i as i64)
            .execute(&pool)
            .await
            .map(|_| ())
        }
    })
    .await
}

async fn sqlite_ceiling(
    path: &std::path::Path,
    args: &Args,
    count: u64,
    limit: Duration,
) -> anyhow::Result<(u64, u64, Duration, Samples)> {
    use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};
    let options = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .busy_timeout(Duration::from_secs(30));
    let pool = sqlx::sqlite::SqlitePoolOptions::new()
        .max_connections(args.ceiling_clients.min(16))
        .connect_with(options)
        .await
        .context("opening the ceiling's SQLite file")?;
    sqlx::query(CEILING_TABLE).execute(&pool).await?;
    let run_id: [u8; 8] = common::random_bytes();
    let body: Arc<Vec<u8>> = Arc::new((0..args.body).map(|i| (i * 7) as u8).collect());
    ceiling_load(args.ceiling_clients, count, limit, move |i| {
        let (pool, body) = (pool.clone(), Arc::clone(&body));
        async move {
            sqlx::query(
                "INSERT INTO bench_ceiling (id, recipient, body, created_at) VALUES ($1, $2, $3, $4)",
            )
            .bind(common::message_id(&run_id, i).to_vec())
            .bind("5550000000")
            .bind(body.as_slice())
            .bind(i as i64)
            .execute(&pool)
            .await
            .map(|_| ())
        }
    })
    .await
}
