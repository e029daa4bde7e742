//! `federation`: two brokers of one network (child processes, gRPC over mutual TLS between
//! them). Networked INITIATE latency beside local INITIATE, and deposits across brokers.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use micromsg_broker::federation::network::{InitBroker, init};
use micromsg_client::link::BrokerLink;
use micromsg_wire::message::request::{
    Answer, ContactAnswerArgs, DepositArgs, InboxAckArgs, InboxFetchArgs, InitiateNetworkedArgs,
    TargetArgs,
};
use micromsg_wire::{Address, Blob, ErrorCode, Event, Hex16, Hex32, Number, Request, ResponseData};

use crate::child::ChildServer;
use crate::common::{self, PgDatabase, Progress, StoreKind, Tickets};
use crate::report::{Report, Row, Samples};

/// Options of `federation`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Both brokers' store. Postgres needs DATABASE_URL; fresh databases are made and dropped.
    #[arg(long, value_enum, default_value_t = StoreKind::Sqlite)]
    pub(crate) store: StoreKind,
    /// INITIATEs of each kind (local, networked), alternating.
    #[arg(long, default_value_t = 2000)]
    pub(crate) initiates: u64,
    /// Deposits from senders on broker x to one recipient on broker y.
    #[arg(long, default_value_t = 20_000)]
    pub(crate) deposits: u64,
    /// Concurrent senders on broker x.
    #[arg(long, default_value_t = 50)]
    pub(crate) senders: usize,
    /// Ciphertext bytes per deposit.
    #[arg(long, default_value_t = 256)]
    pub(crate) body: usize,
    /// Time limit of each measured phase, in seconds.
    #[arg(long, default_value_t = 60)]
    pub(crate) max_secs: u64,
}

const SCENARIO: &str = "federation";
/// What an accepted networked answer carries: random bytes of a sealed `127.0.0.1:9`
/// (24-byte nonce, 11 bytes, 16-byte tag); brokers cannot open it, so they cannot tell.
const SEALED_LEN: usize = 24 + 11 + 16;

pub(crate) async fn run(args: Args) -> anyhow::Result<Report> {
    if args.initiates == 0 || args.deposits == 0 || args.senders == 0 {
        bail!("--initiates, --deposits and --senders must be at least 1");
    }
    if args.body == 0 || args.body > 48_000 {
        bail!("--body must be 1 to 48000 bytes");
    }
    let mut dbs = Vec::new();
    if args.store == StoreKind::Postgres {
        for _ in 0..2 {
            dbs.push(PgDatabase::create().await?);
        }
    }
    let result = run_with(&args, &dbs).await;
    for db in dbs {
        if let Err(e) = db.drop_now().await {
            eprintln!("warning: could not drop a benchmark database: {e:#}");
        }
    }
    result
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Brokers x (prefix 555) and y (556) of one network, in child processes with their data under
/// `dir` (Postgres when `dbs` names a database for each); their CA files.
pub(crate) fn start_network(
    dir: &std::path::Path,
    dbs: &[PgDatabase],
) -> anyhow::Result<(Vec<ChildServer>, Vec<std::path::PathBuf>)> {
    let ids = ["x", "y"];
    let prefixes = ["555", "556"];
    let endpoints = [
        format!("127.0.0.1:{}", free_port()?),
        format!("127.0.0.1:{}", free_port()?),
    ];
    let specs: Vec<InitBroker> = (0..2)
        .map(|i| InitBroker {
            id: ids[i].to_owned(),
            prefixes: vec![prefixes[i].to_owned()],
            endpoint: endpoints[i].clone(),
        })
        .collect();
    let net = init(&dir.join("network"), "bench-net", &specs)
        .context("making the network's CA and certificates")?;
    let mut brokers = Vec::new();
    let mut cas = Vec::new();
    for i in 0..2 {
        let mut config = common::load_config(&dir.join(ids[i]))?;
        config.server.broker_id = ids[i].to_owned();
        config.federation.network_file = Some(net.network_file.clone());
        config.federation.listen = Some(endpoints[i].parse()?);
        config.federation.probe_interval_secs = 1;
        config.federation.retry_initial_secs = 1;
        config.federation.retry_max_secs = 2;
        config.relay.bytes_per_sec = 0;
        config.relay.max_per_device = u32::MAX;
        config.database.url = dbs.get(i).map(|d| d.url.clone());
        brokers.push(ChildServer::broker(&config, dir, ids[i])?);
        cas.push(common::ca_of(&config));
    }
    Ok((brokers, cas))
}

async fn run_with(args: &Args, dbs: &[PgDatabase]) -> anyhow::Result<Report> {
    let dir = tempfile::tempdir().context("temporary directory")?;
    eprintln!(
        "federation: starting brokers x and y ({})",
        args.store.name()
    );
    let (brokers, cas) = start_network(dir.path(), dbs)?;
    let addr = |i: usize| format!("127.0.0.1:{}", brokers[i].addr.port());
    let profiles = dir.path().join("profiles");
    let on_x = common::register_users(&addr(0), &cas[0], &profiles, "x", 2).await?;
    let on_y = common::register_users(&addr(1), &cas[1], &profiles, "y", 2).await?;
    let tls_x = micromsg_client::tls::client_config(&cas[0])?;
    let tls_y = micromsg_client::tls::client_config(&cas[1])?;
    let (a_user, c_user) = (&on_x[0], &on_x[1]);
    let (b_user, r_user) = (&on_y[0], &on_y[1]);
    let mut a = a_user.login(Arc::clone(&tls_x)).await?;
    let mut c = c_user.login(Arc::clone(&tls_x)).await?;
    let mut b = b_user.login(Arc::clone(&tls_y)).await?;
    let c_num = c_user.number()?;
    let b_num = b_user.number()?;
    eprintln!("federation: pairing (local and networked)");
    common::pair_local(&mut a, &mut c, &c_num).await?;
    pair_networked(&mut a, &a_user.number()?, &mut b, &b_num).await?;

    let limit = Duration::from_secs(args.max_secs);
    let mut report = Report::default();
    eprintln!(
        "federation: {} local and {} networked INITIATE-EXISTING, alternating",
        args.initiates, args.initiates
    );
    let (mut local, mut networked, time) = initiate_latency(
        &mut a,
        &mut c,
        &c_num,
        &mut b,
        &b_num,
        args.initiates,
        limit,
    )
    .await?;
    let local_row = Row::new(
        SCENARIO,
        "local INITIATE-EXISTING → CONTACT-REQUEST",
        local.len() as u64,
        0,
        time,
    )
    .unit("rounds/s")
    .latency(&mut local);
    let mut net_row = Row::new(
        SCENARIO,
        "networked INITIATE-EXISTING-NETWORKED → CONTACT-REQUEST",
        networked.len() as u64,
        0,
        time,
    )
    .unit("rounds/s")
    .latency(&mut networked);
    if let (Some(l), Some(n)) = (local_row.latency, net_row.latency) {
        let added = n.p99_ms - l.p99_ms;
        net_row = net_row.target(
            &format!("≤ 1 ms added at p99 ({added:.2} ms)"),
            added <= 1.0,
        );
    }
    report.push(local_row);
    report.push(net_row);
    drop((a, b, c));

    eprintln!(
        "federation: registering {} senders on x, pairing them with a recipient on y",
        args.senders
    );
    let senders = common::register_users(&addr(0), &cas[0], &profiles, "s", args.senders).await?;
    let r_num = r_user.number()?;
    let mut r = r_user.login(Arc::clone(&tls_y)).await?;
    let mut links = Vec::new();
    for s in &senders {
        let mut link = s.login(Arc::clone(&tls_x)).await?;
        pair_networked(&mut link, &s.number()?, &mut r, &r_num).await?;
        links.push(link);
    }
    drop(r);
    eprintln!(
        "federation: {} deposits x → y from {} senders, drained at y as they arrive",
        args.deposits, args.senders
    );
    let drain_link = r_user.login(Arc::clone(&tls_y)).await?;
    let cpu_before = FederationCpu::read(&brokers, dbs).await;
    let start = Instant::now();
    let drain_limit = limit + Duration::from_secs(30);
    let drainer = tokio::spawn(drain_until(drain_link, args.deposits, drain_limit));
    let (acked, errors, ack_time, mut lat) = deposit_load(args, limit, links, &r_num).await?;
    let (received, delivered_at) = drainer.await.context("drain task")??;
    let delivered_time = delivered_at.map_or_else(|| start.elapsed(), |t| t - start);
    if let (Some(before), Some(after)) = (cpu_before, FederationCpu::read(&brokers, dbs).await) {
        report.note(after.since(&before).per_message(received));
    }
    report.push(
        Row::new(
            SCENARIO,
            "cross-broker DEPOSIT ack (outbox commit at x)",
            acked,
            errors,
            ack_time,
        )
        .unit("deposits/s")
        .latency(&mut lat),
    );
    let mut delivered = Row::new(
        SCENARIO,
        "cross-broker deposits delivered (in y's inbox, fetched)",
        received,
        acked.saturating_sub(received),
        delivered_time,
    )
    .unit("deposits/s");
    let met = delivered.rate >= 10_000.0 && received == acked;
    delivered = delivered.target("≥ 10,000/s", met);
    let mems: Vec<_> = brokers.into_iter().map(ChildServer::stop).collect();
    let peak = mems.iter().flatten().map(|m| m.peak_kib).max();
    delivered = delivered.memory(peak, "larger VmHWM of the two broker child processes");
    report.push(delivered);
    if received != acked {
        report.note(format!(
            "federation: {received} of {acked} acknowledged deposits reached y in time"
        ));
    }
    report.note(format!(
        "federation: {} store, outbox defaults (batch, batches in flight) of the broker config",
        args.store.name()
    ));
    Ok(report)
}

/// CPU time of the parties of the cross-broker phase: brokers x and y (child processes), the
/// Postgres backends of their two databases (zero on SQLite, whose work runs in the brokers'
/// threads) and this load generator, which also drains y. Compared per delivered message, it
/// separates two builds on a busy machine where the rates do not.
#[derive(Debug, Clone, Copy)]
struct FederationCpu {
    x: Duration,
    y: Duration,
    postgres: Duration,
    generator: Duration,
}

impl FederationCpu {
    /// Now; `None` when a figure cannot be read (not Linux, a child gone).
    async fn read(brokers: &[ChildServer], dbs: &[PgDatabase]) -> Option<Self> {
        let mut postgres = Duration::ZERO;
        for db in dbs {
            postgres += db.backends_cpu().await.ok()?;
        }
        Some(Self {
            x: brokers.first()?.cpu()?,
            y: brokers.get(1)?.cpu()?,
            postgres,
            generator: crate::child::cpu_of("self")?,
        })
    }

    fn since(&self, before: &Self) -> Self {
        Self {
            x: self.x.saturating_sub(before.x),
            y: self.y.saturating_sub(before.y),
            postgres: self.postgres.saturating_sub(before.postgres),
            generator: self.generator.saturating_sub(before.generator),
        }
    }

    /// One line: CPU microseconds per delivered message, by party.
    fn per_message(&self, delivered: u64) -> String {
        let us = |d: Duration| d.as_secs_f64() * 1e6 / delivered.max(1) as f64;
        format!(
            "federation: CPU per delivered message: broker x {:.1} µs, broker y {:.1} µs, \
             Postgres backends {:.1} µs, load generator and drain {:.1} µs (total {:.1} µs; \
             from /proc, over the cross-broker phase)",
            us(self.x),
            us(self.y),
            us(self.postgres),
            us(self.generator),
            us(self.x + self.y + self.postgres + self.generator),
        )
    }
}

/// `caller` (one broker) and `target` (the other) become a contact pair through the networked
/// flow; retried while the peer broker is not reachable yet. Returns the caller's
/// CONTACT-ACCEPTED.
pub(crate) async fn pair_networked(
    caller: &mut BrokerLink,
    caller_number: &Number,
    target: &mut BrokerLink,
    target_number: &Number,
) -> anyhow::Result<micromsg_wire::message::event::ContactAccepted> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let request = loop {
        let pubkey = Hex32::from_bytes(common::random_bytes());
        let sent = caller
            .call(Request::InitiateNewNetworked(InitiateNetworkedArgs {
                target: target_number.clone(),
                pubkey,
            }))
            .await;
        match sent {
            Ok(_) => {}
            Err(e) if e.code() == Some(ErrorCode::PeerUnavailable) => {}
            Err(e) => return Err(e).context("INITIATE-NEW-NETWORKED"),
        }
        // Other events (CONTACT-CONNECTING of an earlier pairing) are skipped; only a request
        // from this caller counts, and a new one is sent only after 2 s of silence.
        let wait_until = tokio::time::Instant::now() + Duration::from_secs(2);
        let found = loop {
            match tokio::time::timeout_at(wait_until, target.next_event()).await {
                Ok(Ok(Event::ContactRequest(r))) if r.from == *caller_number => break Some(r),
                Ok(Ok(_)) => {}
                Err(_) => break None,
                Ok(Err(e)) => return Err(e).context("waiting for CONTACT-REQUEST"),
            }
        };
        if let Some(r) = found {
            break r;
        }
        if Instant::now() >= deadline {
            bail!("the brokers did not relay a networked contact request within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let sealed: [u8; SEALED_LEN] = common::random_bytes();
    target
        .call(Request::ContactAnswer(ContactAnswerArgs {
            request: request.request,
            answer: Answer::AcceptNetworked {
                pubkey: Hex32::from_bytes(common::random_bytes()),
                sealed_address: Blob::new(sealed.to_vec()),
            },
        }))
        .await
        .context("CONTACT-ANSWER (networked)")?;
    let accepted = loop {
        if let Event::ContactAccepted(a) =
            common::next_event(caller, Duration::from_secs(10)).await?
        {
            break a;
        }
    };
    let _ = target.take_queued_events();
    Ok(accepted)
}

/// Time from sending INITIATE-EXISTING to the target's CONTACT-REQUEST; the target then
/// accepts (not measured).
async fn initiate_once(
    caller: &mut BrokerLink,
    target: &mut BrokerLink,
    target_number: &Number,
    networked: bool,
) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let request = if networked {
        Request::InitiateExistingNetworked(InitiateNetworkedArgs {
            target: target_number.clone(),
            pubkey: Hex32::from_bytes(common::random_bytes()),
        })
    } else {
        Request::InitiateExisting(TargetArgs {
            target: target_number.clone(),
        })
    };
    caller.call(request).await.context("INITIATE-EXISTING")?;
    let r = loop {
        if let Event::ContactRequest(r) =
            common::next_event(target, Duration::from_secs(10)).await?
        {
            break r;
        }
    };
    let elapsed = start.elapsed();
    // Accept (a rejection would put the caller on the target's block list), and wait for the
    // caller's CONTACT-ACCEPTED so that rounds do not overlap.
    let answer = if networked {
        let sealed: [u8; SEALED_LEN] = common::random_bytes();
        ContactAnswerArgs {
            request: r.request,
            answer: Answer::AcceptNetworked {
                pubkey: Hex32::from_bytes(common::random_bytes()),
                sealed_address: Blob::new(sealed.to_vec()),
            },
        }
    } else {
        ContactAnswerArgs {
            request: r.request,
            answer: Answer::Accept {
                address: Address::new("127.0.0.1:9").context("address")?,
            },
        }
    };
    target
        .call(Request::ContactAnswer(answer))
        .await
        .context("CONTACT-ANSWER")?;
    loop {
        if let Event::ContactAccepted(_) =
            common::next_event(caller, Duration::from_secs(10)).await?
        {
            break;
        }
    }
    let _ = target.take_queued_events();
    Ok(elapsed)
}

async fn initiate_latency(
    a: &mut BrokerLink,
    c: &mut BrokerLink,
    c_num: &Number,
    b: &mut BrokerLink,
    b_num: &Number,
    count: u64,
    limit: Duration,
) -> anyhow::Result<(Samples, Samples, Duration)> {
    let tickets = Tickets::new(count, limit);
    let _progress = Progress::start("initiate pairs", count, Arc::clone(&tickets));
    let mut local = Samples::with_capacity(count as usize);
    let mut networked = Samples::with_capacity(count as usize);
    let start = Instant::now();
    while tickets.take().is_some() {
        local.push(initiate_once(a, c, c_num, false).await?);
        networked.push(initiate_once(a, b, b_num, true).await?);
        tickets.finish();
    }
    Ok((local, networked, start.elapsed()))
}

async fn deposit_load(
    args: &Args,
    limit: Duration,
    links: Vec<BrokerLink>,
    target: &Number,
) -> anyhow::Result<(u64, u64, Duration, Samples)> {
    let tickets = Tickets::new(args.deposits, limit);
    let _progress = Progress::start("deposits acked", args.deposits, Arc::clone(&tickets));
    let run_id: [u8; 8] = common::random_bytes();
    let body: Arc<Vec<u8>> = Arc::new((0..args.body).map(|i| (i * 3) as u8).collect());
    let start = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for mut link in links {
        let (tickets, body, target) = (Arc::clone(&tickets), Arc::clone(&body), target.clone());
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
                    Ok(_) => errors += 1,
                    Err(e) => {
                        errors += 1;
                        if errors == 1 {
                            eprintln!("  cross-broker deposit failed: {e}");
                        }
                    }
                }
                tickets.finish();
            }
            (lat, errors)
        });
    }
    let mut all = Samples::with_capacity(args.deposits as usize);
    let mut errors = 0;
    while let Some(done) = workers.join_next().await {
        let (lat, e) = done.context("a sender task failed")?;
        all.merge(lat);
        errors += e;
    }
    Ok((all.len() as u64, errors, start.elapsed(), all))
}

/// Fetches and acknowledges at y until `want` distinct messages arrived or time is up; returns
/// how many and when the last one was seen.
async fn drain_until(
    mut link: BrokerLink,
    want: u64,
    limit: Duration,
) -> anyhow::Result<(u64, Option<Instant>)> {
    let deadline = Instant::now() + limit;
    let mut seen: HashSet<Hex16> = HashSet::new();
    let mut last = None;
    while (seen.len() as u64) < want && Instant::now() < deadline {
        let page = match link
            .call(Request::InboxFetch(InboxFetchArgs {
                limit: Some(1000),
                after: None,
            }))
            .await?
        {
            ResponseData::InboxFetch(page) => page,
            other => bail!("INBOX-FETCH answered with {}", other.kind().as_str()),
        };
        let _ = link.take_queued_events();
        if page.messages.is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
            continue;
        }
        let ids: Vec<Hex16> = page.messages.iter().map(|m| m.id).collect();
        for id in &ids {
            seen.insert(*id);
        }
        last = Some(Instant::now());
        link.call(Request::InboxAck(InboxAckArgs { ids }))
            .await
            .context("INBOX-ACK")?;
    }
    Ok((seen.len() as u64, last))
}
