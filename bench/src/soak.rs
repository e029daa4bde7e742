//! `soak`: a mixed load for a set time against one broker (a child process), with errors
//! (must be 0) and the broker's memory over time (must stay flat).
//!
//! Setup: `--users` users for logins, and per worker a sender and a recipient that are
//! contacts. Then `--workers` workers each run rounds of the whole mix until the time is up
//! (a round in progress is finished, so every kind runs at least once per worker):
//!
//! - `deposit` ×`--deposits`: DEPOSIT from the worker's sender (one long-lived connection) to
//!   its recipient, which is offline;
//! - `drain`: the recipient logs in on a new connection and runs INBOX-FETCH + INBOX-ACK until
//!   its inbox is empty; it must remove exactly the deposits acknowledged since the last drain;
//! - `login` ×`--logins`: a new connection, TLS 1.3 handshake and mutual LOGIN, closed again;
//! - `contact`: two new users (`register` ×2), INITIATE-NEW and an accepting CONTACT-ANSWER;
//! - `session`: two new users (`register` ×2), each with a client agent
//!   (`micromsg_client::agent`, what `micromsg listen` runs); A adds B as a contact, which sets
//!   up the end-to-end session through the broker, then sends `--messages` messages over it
//!   that B must receive (`message`, each timed from send to receipt; the agent also deposits
//!   a copy for the contact's other devices, and B shows whichever arrives first); both agents
//!   stop.
//!
//! Each worker starts its round at a different step, so all kinds run at the same time. The
//! broker's resident memory (VmRSS) is read every second. Memory verdict: the first
//! `--warmup-secs` (at most a quarter of the run) are warm-up; of the samples after it, the mean
//! of the last 20% may exceed the mean of the first 20% by at most `--memory-tolerance` percent
//! (default 10). Runs with less than 20 s after warm-up are too short to judge memory (said so,
//! not a failure). Errors or memory growth beyond the tolerance make the process exit non-zero
//! after the report.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use micromsg_client::account;
use micromsg_client::agent::{self, AcceptPolicy, AgentConfig, Command, Delivered, Detail, Notice};
use micromsg_client::link::BrokerLink;
use micromsg_client::profile::Profile;
use micromsg_wire::message::request::{DepositArgs, InboxAckArgs, InboxFetchArgs};
use micromsg_wire::{Blob, Hex16, Number, Request, ResponseData};
use serde::Serialize;

use crate::child::{self, ChildServer};
use crate::common::{self, PgDatabase, StoreKind, User};
use crate::report::{Report, Row, Samples};

/// Options of `soak`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// How long the load runs, in seconds (1 to 86400). Rounds in progress at the end are
    /// finished.
    #[arg(long, default_value_t = 60)]
    pub(crate) secs: u64,
    /// Concurrent workers, each running the whole mix in rounds (1 to 256).
    #[arg(long, default_value_t = 8)]
    pub(crate) workers: usize,
    /// DEPOSITs per round of a worker (its recipient's inbox is drained once per round).
    #[arg(long, default_value_t = 20)]
    pub(crate) deposits: u32,
    /// New-connection logins per round of a worker.
    #[arg(long, default_value_t = 5)]
    pub(crate) logins: u32,
    /// Messages per end-to-end session.
    #[arg(long, default_value_t = 5)]
    pub(crate) messages: u32,
    /// Registered users the logins are spread over.
    #[arg(long, default_value_t = 16)]
    pub(crate) users: usize,
    /// Ciphertext bytes per deposit.
    #[arg(long, default_value_t = 256)]
    pub(crate) body: usize,
    /// The broker's store. Postgres needs DATABASE_URL; a fresh database is made and dropped.
    #[arg(long, value_enum, default_value_t = StoreKind::Sqlite)]
    pub(crate) store: StoreKind,
    /// Seconds at the start left out of the memory verdict (at most a quarter of --secs).
    #[arg(long, default_value_t = 10)]
    pub(crate) warmup_secs: u64,
    /// Allowed growth of the broker's RSS after warm-up, in percent (mean of the last 20% of
    /// the samples against the mean of the first 20%).
    #[arg(long, default_value_t = 10.0)]
    pub(crate) memory_tolerance: f64,
}

const SCENARIO: &str = "soak";
/// Any single operation (a session with its agents included) taking longer is an error.
const OP_TIMEOUT: Duration = Duration::from_secs(60);
/// Seconds between progress lines.
const PROGRESS_SECS: u64 = 5;
/// Seconds of samples after warm-up needed to judge memory.
const MIN_JUDGED_SECS: f64 = 20.0;
/// Error lines printed to stderr at most (all are counted).
const MAX_ERROR_LINES: u64 = 20;

/// The kinds of operation, in table order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Login,
    Register,
    Contact,
    Session,
    Message,
    Deposit,
    Drain,
}

const KINDS: [Kind; 7] = [
    Kind::Login,
    Kind::Register,
    Kind::Contact,
    Kind::Session,
    Kind::Message,
    Kind::Deposit,
    Kind::Drain,
];

impl Kind {
    fn index(self) -> usize {
        self as usize
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Login => "login",
            Kind::Register => "register",
            Kind::Contact => "contact",
            Kind::Session => "session",
            Kind::Message => "message",
            Kind::Deposit => "deposit",
            Kind::Drain => "drain",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Kind::Login => "login: new connection, TLS 1.3 + mutual LOGIN",
            Kind::Register => "register: new user (REGISTER on a new connection)",
            Kind::Contact => "contact: INITIATE-NEW → CONTACT-ANSWER → CONTACT-ACCEPTED",
            Kind::Session => "session: two agents, contact add, messages, stop",
            Kind::Message => "message: agent send (live) → received by B",
            Kind::Deposit => "deposit: DEPOSIT ack after commit (recipient offline)",
            Kind::Drain => "drain: login + INBOX-FETCH/ACK until empty",
        }
    }
}

/// Counts shared by the workers (for progress lines and the totals).
#[derive(Debug, Default)]
struct Counters {
    ok: [AtomicU64; 7],
    errors: [AtomicU64; 7],
    acked_deposits: AtomicU64,
    drained_messages: AtomicU64,
    messages_via_copy: AtomicU64,
    error_lines: AtomicU64,
}

impl Counters {
    fn ok(&self, kind: Kind) -> u64 {
        self.ok[kind.index()].load(Ordering::Relaxed)
    }

    fn errors(&self, kind: Kind) -> u64 {
        self.errors[kind.index()].load(Ordering::Relaxed)
    }

    fn total_errors(&self) -> u64 {
        KINDS.iter().map(|k| self.errors(*k)).sum()
    }
}

/// What every worker needs.
#[derive(Debug)]
struct Ctx {
    broker: String,
    ca: PathBuf,
    profiles: PathBuf,
    tls: Arc<rustls::ClientConfig>,
    login_users: Vec<User>,
    run_id: [u8; 8],
    body: Vec<u8>,
    deposits: u32,
    logins: u32,
    messages: u32,
    deadline: Instant,
    counters: Counters,
}

pub(crate) async fn run(args: Args) -> anyhow::Result<Report> {
    if !(1..=86_400).contains(&args.secs) {
        bail!("--secs must be 1 to 86400");
    }
    if !(1..=256).contains(&args.workers) {
        bail!("--workers must be 1 to 256");
    }
    if args.deposits == 0 || args.logins == 0 || args.messages == 0 || args.users == 0 {
        bail!("--deposits, --logins, --messages and --users must be at least 1");
    }
    if args.body == 0 || args.body > 48_000 {
        bail!("--body must be 1 to 48000 bytes (the broker's default max_message_bytes)");
    }
    if !(args.memory_tolerance.is_finite() && args.memory_tolerance >= 0.0) {
        bail!("--memory-tolerance must be a percentage of at least 0");
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
    let store = args.store.name();
    eprintln!("soak: starting the broker ({store})");
    let broker = ChildServer::broker(&config, dir.path(), "broker")?;
    let ca = common::ca_of(&config);
    let addr = format!("127.0.0.1:{}", broker.addr.port());
    let profiles = dir.path().join("profiles");
    eprintln!(
        "soak: registering {} login users and {} sender/recipient pairs",
        args.users, args.workers
    );
    let login_users = common::register_users(&addr, &ca, &profiles, "u", args.users).await?;
    let senders = common::register_users(&addr, &ca, &profiles, "s", args.workers).await?;
    let recipients = common::register_users(&addr, &ca, &profiles, "r", args.workers).await?;
    let tls = micromsg_client::tls::client_config(&ca)?;
    let mut mailboxes = Vec::with_capacity(args.workers);
    for (s, r) in senders.into_iter().zip(recipients) {
        let mut s_link = s.login(Arc::clone(&tls)).await?;
        let mut r_link = r.login(Arc::clone(&tls)).await?;
        let r_num = r.number()?;
        common::pair_local(&mut s_link, &mut r_link, &r_num).await?;
        drop(r_link);
        mailboxes.push((s, s_link, r, r_num));
    }

    let secs = args.secs;
    let start = Instant::now();
    let ctx = Arc::new(Ctx {
        broker: addr,
        ca,
        profiles,
        tls,
        login_users,
        run_id: common::random_bytes(),
        body: (0..args.body).map(|i| (i * 11) as u8).collect(),
        deposits: args.deposits,
        logins: args.logins,
        messages: args.messages,
        deadline: start + Duration::from_secs(secs),
        counters: Counters::default(),
    });
    eprintln!(
        "soak: {secs} s of mixed load from {} workers (per round: {} deposits, 1 drain, {} \
         logins, 1 contact, 1 session of {} messages)",
        args.workers, args.deposits, args.logins, args.messages
    );
    let mut workers = tokio::task::JoinSet::new();
    for (id, (sender, link, recipient, recipient_number)) in mailboxes.into_iter().enumerate() {
        let worker = Worker {
            id,
            ctx: Arc::clone(&ctx),
            sender,
            sender_link: Some(link),
            recipient,
            recipient_number,
            pending: 0,
            seq: 0,
            samples: std::array::from_fn(|_| Samples::default()),
        };
        workers.spawn(worker.run());
    }

    // Memory every second, progress every few seconds, until the time is up.
    let mut memory = Vec::with_capacity(secs as usize + 1);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let t = start.elapsed().as_secs_f64();
        if let Some(m) = broker.memory() {
            memory.push(MemorySample {
                t: (t * 10.0).round() / 10.0,
                broker_rss_kib: m.rss_kib,
                generator_rss_kib: child::memory_of("self").map_or(0, |m| m.rss_kib),
            });
        }
        let whole = t.round() as u64;
        if whole > 0 && (whole.is_multiple_of(PROGRESS_SECS) || whole >= secs) {
            progress(&ctx.counters, t, memory.last());
        }
        if whole >= secs || workers.is_empty() {
            break;
        }
    }
    eprintln!("soak: time is up; finishing the rounds in progress and the final drains");
    let mut samples: [Samples; 7] = std::array::from_fn(|_| Samples::default());
    while let Some(done) = workers.join_next().await {
        let worker_samples = done.context("a soak worker failed")?;
        for (all, one) in samples.iter_mut().zip(worker_samples) {
            all.merge(one);
        }
    }
    let elapsed = start.elapsed();
    let peak = broker.stop();
    progress(&ctx.counters, elapsed.as_secs_f64(), memory.last());

    let counters = &ctx.counters;
    let mut report = Report::default();
    let mut total_count = 0;
    let mut total_errors = 0;
    for kind in KINDS {
        let (count, errors) = (counters.ok(kind), counters.errors(kind));
        total_count += count;
        total_errors += errors;
        report.push(
            Row::new(SCENARIO, kind.describe(), count, errors, elapsed)
                .unit(&format!("{}s/s", kind.name()))
                .latency(&mut samples[kind.index()]),
        );
    }
    let warmup = (args.warmup_secs as f64).min(secs as f64 / 4.0);
    let verdict = judge_memory(&memory, warmup, args.memory_tolerance);
    let mut failures = Vec::new();
    if total_errors > 0 {
        failures.push(format!(
            "{total_errors} operations failed ({}); the soak requires 0",
            KINDS
                .iter()
                .filter(|k| counters.errors(**k) > 0)
                .map(|k| format!("{} {}", k.name(), counters.errors(*k)))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    if verdict.judged && !verdict.flat {
        failures.push(format!(
            "broker memory is not flat: RSS grew {:+.1}% after warm-up ({:.1} → {:.1} MiB), \
             more than the {:.0}% allowed",
            verdict.growth_percent,
            mib(verdict.baseline_kib),
            mib(verdict.end_kib),
            args.memory_tolerance
        ));
    }
    let passed = failures.is_empty();
    let target = format!("errors = 0, RSS growth ≤ {:.0}%", args.memory_tolerance);
    report.push(
        Row::new(
            SCENARIO,
            "all operations",
            total_count,
            total_errors,
            elapsed,
        )
        .unit("ops/s")
        .memory(
            peak.map(|m| m.peak_kib),
            "broker child process VmHWM (whole soak, setup included)",
        )
        .target(&target, passed),
    );
    report.note(format!(
        "soak: {store} store, {} workers, {secs} s of load ({:.1} s until the last round \
         ended); per round {} deposits, 1 drain, {} logins, 1 contact, 1 session of {} \
         messages; {} acknowledged deposits, {} drained",
        args.workers,
        elapsed.as_secs_f64(),
        args.deposits,
        args.logins,
        args.messages,
        counters.acked_deposits.load(Ordering::Relaxed),
        counters.drained_messages.load(Ordering::Relaxed),
    ));
    report.note(format!(
        "soak: {} of {} session messages reached B first as the broker's inbox copy (the agent \
         deposits one for the contact's other devices) rather than the live frame; counted as \
         received",
        counters.messages_via_copy.load(Ordering::Relaxed),
        counters.ok(Kind::Message)
    ));
    report.note(memory_note(&memory, &verdict));
    report.note(format!(
        "soak: verdict {}",
        if passed {
            "PASS (no errors; memory flat or run too short to judge)"
        } else {
            "FAIL"
        }
    ));
    let details = SoakDetails {
        secs,
        workers: args.workers,
        store,
        elapsed_secs: elapsed.as_secs_f64(),
        acked_deposits: counters.acked_deposits.load(Ordering::Relaxed),
        drained_messages: counters.drained_messages.load(Ordering::Relaxed),
        messages_via_copy: counters.messages_via_copy.load(Ordering::Relaxed),
        errors: total_errors,
        memory: verdict,
        memory_samples: memory,
        passed,
    };
    report.details = Some(serde_json::to_value(&details)?);
    report.failures = failures;
    Ok(report)
}

fn mib(kib: f64) -> f64 {
    kib / 1024.0
}

fn progress(counters: &Counters, t: f64, memory: Option<&MemorySample>) {
    let ops: Vec<String> = KINDS
        .iter()
        .map(|k| format!("{} {}", k.name(), counters.ok(*k)))
        .collect();
    let rss = memory.map_or_else(
        || "?".to_owned(),
        |m| format!("{:.1} MiB", m.broker_rss_kib as f64 / 1024.0),
    );
    eprintln!(
        "  soak: {t:.0} s: {}; errors {}; broker RSS {rss}",
        ops.join(", "),
        counters.total_errors()
    );
}

/// The broker's (and this process's) resident memory at one moment.
#[derive(Debug, Clone, Copy, Serialize)]
struct MemorySample {
    /// Seconds since the load started.
    t: f64,
    /// The broker child's VmRSS.
    broker_rss_kib: u64,
    /// This process's VmRSS (the load generator, agents included).
    generator_rss_kib: u64,
}

/// The memory verdict.
#[derive(Debug, Clone, Serialize)]
struct MemoryVerdict {
    /// Samples taken (one a second).
    samples: usize,
    /// First, last and largest broker RSS sample.
    first_kib: u64,
    last_kib: u64,
    max_kib: u64,
    /// Seconds left out at the start.
    warmup_secs: f64,
    /// Mean RSS of the first 20% of the samples after warm-up.
    baseline_kib: f64,
    /// Mean RSS of the last 20% of the samples.
    end_kib: f64,
    /// `(end - baseline) / baseline`, in percent.
    growth_percent: f64,
    /// Allowed growth in percent.
    tolerance_percent: f64,
    /// False when the run after warm-up is too short to judge.
    judged: bool,
    /// Growth within the tolerance (true when not judged).
    flat: bool,
}

/// Judges the broker's RSS samples: after `warmup` seconds, the mean of the last 20% of the
/// samples against the mean of the first 20%.
fn judge_memory(samples: &[MemorySample], warmup: f64, tolerance: f64) -> MemoryVerdict {
    let rss: Vec<u64> = samples.iter().map(|s| s.broker_rss_kib).collect();
    let measured: Vec<&MemorySample> = samples.iter().filter(|s| s.t >= warmup).collect();
    let span = match (measured.first(), measured.last()) {
        (Some(a), Some(b)) => b.t - a.t,
        _ => 0.0,
    };
    let fifth = (measured.len() / 5).max(1);
    let mean = |part: &[&MemorySample]| {
        if part.is_empty() {
            0.0
        } else {
            part.iter().map(|s| s.broker_rss_kib as f64).sum::<f64>() / part.len() as f64
        }
    };
    let baseline = mean(&measured[..fifth.min(measured.len())]);
    let end = mean(&measured[measured.len().saturating_sub(fifth)..]);
    let growth = if baseline > 0.0 {
        (end - baseline) / baseline * 100.0
    } else {
        0.0
    };
    let judged = span >= MIN_JUDGED_SECS && measured.len() >= 5;
    MemoryVerdict {
        samples: samples.len(),
        first_kib: rss.first().copied().unwrap_or(0),
        last_kib: rss.last().copied().unwrap_or(0),
        max_kib: rss.iter().copied().max().unwrap_or(0),
        warmup_secs: warmup,
        baseline_kib: baseline,
        end_kib: end,
        growth_percent: growth,
        tolerance_percent: tolerance,
        judged,
        flat: !judged || growth <= tolerance,
    }
}

fn memory_note(samples: &[MemorySample], v: &MemoryVerdict) -> String {
    // About ten points of the series, for the table.
    let step = (samples.len() / 10).max(1);
    let series: Vec<String> = samples
        .iter()
        .step_by(step)
        .map(|s| format!("{:.0}s {:.1}", s.t, s.broker_rss_kib as f64 / 1024.0))
        .collect();
    let judgement = if !v.judged {
        format!(
            "not judged (needs {MIN_JUDGED_SECS:.0} s of samples after the {:.1} s warm-up)",
            v.warmup_secs
        )
    } else if v.flat {
        format!("flat (≤ {:.0}%)", v.tolerance_percent)
    } else {
        format!("NOT flat (> {:.0}%)", v.tolerance_percent)
    };
    format!(
        "soak: broker RSS MiB first {:.1}, last {:.1}, max {:.1}; after {:.1} s warm-up, first \
         20% mean {:.1} → last 20% mean {:.1}: {:+.1}%, {judgement}; RSS over time (MiB): {}",
        v.first_kib as f64 / 1024.0,
        v.last_kib as f64 / 1024.0,
        v.max_kib as f64 / 1024.0,
        v.warmup_secs,
        mib(v.baseline_kib),
        mib(v.end_kib),
        v.growth_percent,
        series.join(", ")
    )
}

/// The soak's part of the JSON report (`details`).
#[derive(Debug, Serialize)]
struct SoakDetails {
    secs: u64,
    workers: usize,
    store: &'static str,
    /// Until the last round ended.
    elapsed_secs: f64,
    acked_deposits: u64,
    drained_messages: u64,
    /// Session messages that reached B first as the broker's copy (inbox), not the live frame.
    messages_via_copy: u64,
    errors: u64,
    memory: MemoryVerdict,
    memory_samples: Vec<MemorySample>,
    passed: bool,
}

/// The steps of a round.
#[derive(Debug, Clone, Copy)]
enum Step {
    Deposits,
    Drain,
    Logins,
    Contact,
    Session,
}

const STEPS: [Step; 5] = [
    Step::Deposits,
    Step::Drain,
    Step::Logins,
    Step::Contact,
    Step::Session,
];

/// One worker: its mailbox (a sender with a long-lived link and an offline recipient, contacts
/// of each other) and its latency samples.
#[derive(Debug)]
struct Worker {
    id: usize,
    ctx: Arc<Ctx>,
    sender: User,
    sender_link: Option<BrokerLink>,
    recipient: User,
    recipient_number: Number,
    /// Deposits acknowledged since the last drain.
    pending: u64,
    /// Counter for message ids and profile names.
    seq: u64,
    samples: [Samples; 7],
}

impl Worker {
    async fn run(mut self) -> [Samples; 7] {
        let mut round = 0usize;
        while Instant::now() < self.ctx.deadline {
            for k in 0..STEPS.len() {
                match STEPS[(self.id + round + k) % STEPS.len()] {
                    Step::Deposits => {
                        for _ in 0..self.ctx.deposits {
                            self.deposit().await;
                        }
                    }
                    Step::Drain => self.drain().await,
                    Step::Logins => {
                        for _ in 0..self.ctx.logins {
                            self.login().await;
                        }
                    }
                    Step::Contact => self.contact().await,
                    Step::Session => self.session().await,
                }
            }
            round += 1;
        }
        if self.pending > 0 {
            self.drain().await;
        }
        self.samples
    }

    /// Counts the outcome of one operation started at `start`.
    fn record<T>(
        &mut self,
        kind: Kind,
        start: Instant,
        outcome: Result<anyhow::Result<T>, tokio::time::error::Elapsed>,
    ) -> Option<T> {
        let counters = &self.ctx.counters;
        let error = match outcome {
            Ok(Ok(value)) => {
                self.samples[kind.index()].push(start.elapsed());
                counters.ok[kind.index()].fetch_add(1, Ordering::Relaxed);
                return Some(value);
            }
            Ok(Err(e)) => format!("{e:#}"),
            Err(_) => format!("no answer within {OP_TIMEOUT:?}"),
        };
        counters.errors[kind.index()].fetch_add(1, Ordering::Relaxed);
        let line = counters.error_lines.fetch_add(1, Ordering::Relaxed);
        if line < MAX_ERROR_LINES {
            eprintln!("  soak: worker {} {}: error: {error}", self.id, kind.name());
        } else if line == MAX_ERROR_LINES {
            eprintln!("  soak: more errors; only counting them from now on");
        }
        None
    }

    fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    async fn deposit(&mut self) {
        let i = ((self.id as u64) << 40) | self.next_seq();
        let request = Request::Deposit(DepositArgs {
            target: self.recipient_number.clone(),
            id: Hex16::from_bytes(common::message_id(&self.ctx.run_id, i)),
            body: Blob::new(self.ctx.body.clone()),
        });
        let start = Instant::now();
        let outcome = tokio::time::timeout(OP_TIMEOUT, async {
            if self.sender_link.is_none() {
                // Reconnect after a failed deposit.
                self.sender_link = Some(self.sender.login(Arc::clone(&self.ctx.tls)).await?);
            }
            let link = self.sender_link.as_mut().context("sender link")?;
            match link.call(request).await.context("DEPOSIT")? {
                ResponseData::Deposit(_) => anyhow::Ok(()),
                other => bail!("DEPOSIT answered with {}", other.kind().as_str()),
            }
        })
        .await;
        if self.record(Kind::Deposit, start, outcome).is_some() {
            self.pending += 1;
            self.ctx
                .counters
                .acked_deposits
                .fetch_add(1, Ordering::Relaxed);
        } else {
            self.sender_link = None;
        }
    }

    async fn drain(&mut self) {
        let expected = self.pending;
        let start = Instant::now();
        let outcome = tokio::time::timeout(OP_TIMEOUT, async {
            let mut link = self.recipient.login(Arc::clone(&self.ctx.tls)).await?;
            let mut removed = 0u64;
            loop {
                let page = match link
                    .call(Request::InboxFetch(InboxFetchArgs {
                        limit: Some(1000),
                        after: None,
                    }))
                    .await
                    .context("INBOX-FETCH")?
                {
                    ResponseData::InboxFetch(page) => page,
                    other => bail!("INBOX-FETCH answered with {}", other.kind().as_str()),
                };
                if page.messages.is_empty() {
                    break;
                }
                let ids: Vec<Hex16> = page.messages.iter().map(|m| m.id).collect();
                match link
                    .call(Request::InboxAck(InboxAckArgs { ids }))
                    .await
                    .context("INBOX-ACK")?
                {
                    ResponseData::InboxAck(d) => removed += u64::from(d.removed),
                    other => bail!("INBOX-ACK answered with {}", other.kind().as_str()),
                }
                if !page.more {
                    break;
                }
            }
            anyhow::Ok(removed)
        })
        .await;
        let removed = match outcome {
            Ok(Ok(removed)) => removed,
            _ => {
                let _ = self.record(Kind::Drain, start, outcome);
                return;
            }
        };
        self.ctx
            .counters
            .drained_messages
            .fetch_add(removed, Ordering::Relaxed);
        self.pending = 0;
        let checked = if removed == expected {
            Ok(())
        } else {
            Err(anyhow::anyhow!(
                "drained {removed} messages, {expected} deposits were acknowledged since the \
                 last drain"
            ))
        };
        let _ = self.record(Kind::Drain, start, Ok(checked));
    }

    async fn login(&mut self) {
        let seq = self.next_seq() as usize;
        let ctx = Arc::clone(&self.ctx);
        let user = &ctx.login_users[(seq + self.id) % ctx.login_users.len()];
        let tls = Arc::clone(&ctx.tls);
        let start = Instant::now();
        let outcome = tokio::time::timeout(OP_TIMEOUT, async {
            let link = user.login(tls).await?;
            drop(link);
            anyhow::Ok(())
        })
        .await;
        let _ = self.record(Kind::Login, start, outcome);
    }

    /// Registers a new user; `None` (an error counted) when it fails.
    async fn register(&mut self, what: &str) -> Option<(Profile, account::Session)> {
        let seq = self.next_seq();
        let name = format!("w{}-{what}{seq}", self.id);
        let profile = Profile::new(self.ctx.profiles.join(name));
        let start = Instant::now();
        let outcome = tokio::time::timeout(OP_TIMEOUT, async {
            let session = account::register(&profile, &self.ctx.broker, &self.ctx.ca, None)
                .await
                .context("registering")?;
            anyhow::Ok(session)
        })
        .await;
        let session = self.record(Kind::Register, start, outcome)?;
        Some((profile, session))
    }

    async fn contact(&mut self) {
        let Some((a_profile, mut a)) = self.register("ca").await else {
            return;
        };
        let Some((b_profile, mut b)) = self.register("cb").await else {
            return;
        };
        let start = Instant::now();
        let outcome = tokio::time::timeout(OP_TIMEOUT, async {
            let b_number = Number::new(b.info.number.clone()).context("B's number")?;
            common::pair_local(&mut a.link, &mut b.link, &b_number).await
        })
        .await;
        if self.record(Kind::Contact, start, outcome).is_some() {
            forget(&[a_profile.dir(), b_profile.dir()]).await;
        }
    }

    async fn session(&mut self) {
        let Some((a, a_session)) = self.register("sa").await else {
            return;
        };
        let a_number = a_session.info.number.clone();
        drop(a_session);
        let a_dir = a.dir().to_owned();
        let Some((b, b_session)) = self.register("sb").await else {
            return;
        };
        let b_number = b_session.info.number.clone();
        drop(b_session);
        let b_dir = b.dir().to_owned();
        let messages = self.ctx.messages;
        let tag = self.next_seq();
        let start = Instant::now();
        let mut message_latencies = Vec::with_capacity(messages as usize);
        let mut via_copy = 0u64;
        let outcome = tokio::time::timeout(OP_TIMEOUT, async {
            let config = AgentConfig {
                accept: AcceptPolicy::Any,
                peer_listen: "127.0.0.1:0".parse()?,
                control: false,
                answer_timeout: Duration::from_secs(10),
                offline_after: Duration::from_secs(5),
                ..AgentConfig::default()
            };
            let (b_tx, mut b_rx) = tokio::sync::mpsc::channel(1024);
            let b_agent = agent::start(b, config.clone(), b_tx)
                .await
                .context("starting B's agent")?;
            // A's notices are not needed; with the receiver gone the agent drops them.
            let (a_tx, _) = tokio::sync::mpsc::channel(1);
            let a_agent = agent::start(a, config, a_tx)
                .await
                .context("starting A's agent")?;
            if let Err(e) = a_agent
                .command(Command::ContactAdd {
                    number: b_number.clone(),
                    wait_secs: None,
                })
                .await
            {
                bail!("contact add: {e}");
            }
            for m in 0..messages {
                let text = format!("soak {tag} message {m}");
                let sent = Instant::now();
                let output = a_agent
                    .command(Command::Send {
                        number: b_number.clone(),
                        text: text.clone(),
                    })
                    .await
                    .map_err(|e| anyhow::anyhow!("send: {e}"))?;
                let how = output.detail;
                if how != Some(Detail::Sent(Delivered::Live)) {
                    bail!("message {m} was delivered {how:?}, not over the live session");
                }
                loop {
                    match b_rx.recv().await {
                        Some(Notice::Message {
                            from,
                            text: got,
                            offline,
                            ..
                        }) if from == a_number => {
                            if got != text {
                                bail!("B received {got:?}, expected {text:?}");
                            }
                            // The agent also deposits a copy of each live message for the
                            // contact's other devices; the broker hands it to this device too,
                            // which shows whichever comes first and drops the other as a
                            // repeat. Either way the message arrived once.
                            if offline {
                                via_copy += 1;
                            }
                            break;
                        }
                        Some(_) => {}
                        None => bail!("B's agent stopped"),
                    }
                }
                message_latencies.push(sent.elapsed());
            }
            a_agent.stop().await.context("stopping A's agent")?;
            b_agent.stop().await.context("stopping B's agent")?;
            anyhow::Ok(())
        })
        .await;
        let ok = self.record(Kind::Session, start, outcome).is_some();
        if ok {
            forget(&[&a_dir, &b_dir]).await;
            let counters = &self.ctx.counters;
            counters
                .messages_via_copy
                .fetch_add(via_copy, Ordering::Relaxed);
            for d in message_latencies {
                self.samples[Kind::Message.index()].push(d);
                counters.ok[Kind::Message.index()].fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Removes the profiles of users whose round succeeded (a failed round's stay for inspection
/// until the run ends). A long soak registers tens of thousands of users; removing them all
/// at the end took minutes, one directory at a time in a directory of that many.
async fn forget(dirs: &[&Path]) {
    for dir in dirs {
        let _ = tokio::fs::remove_dir_all(dir).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(rss: &[u64]) -> Vec<MemorySample> {
        rss.iter()
            .enumerate()
            .map(|(i, r)| MemorySample {
                t: i as f64,
                broker_rss_kib: *r,
                generator_rss_kib: 0,
            })
            .collect()
    }

    #[test]
    fn flat_memory_after_warm_up_passes() {
        // Ramps for 10 s, then flat with noise.
        let mut rss: Vec<u64> = (0..10).map(|i| 10_000 + i * 3_000).collect();
        rss.extend((0..50).map(|i| 40_000 + (i % 3) * 500));
        let v = judge_memory(&series(&rss), 10.0, 10.0);
        assert!(v.judged && v.flat, "{v:?}");
        assert!(v.growth_percent.abs() < 2.0, "{v:?}");
        assert_eq!((v.first_kib, v.max_kib), (10_000, 41_000));
    }

    #[test]
    fn growing_memory_fails() {
        let rss: Vec<u64> = (0..60).map(|i| 40_000 + i * 400).collect();
        let v = judge_memory(&series(&rss), 10.0, 10.0);
        assert!(v.judged && !v.flat, "{v:?}");
        assert!(v.growth_percent > 10.0, "{v:?}");
    }

    #[test]
    fn short_runs_are_not_judged() {
        let rss: Vec<u64> = (0..5).map(|i| 10_000 + i * 10_000).collect();
        let v = judge_memory(&series(&rss), 1.0, 10.0);
        assert!(!v.judged && v.flat, "{v:?}");
        let v = judge_memory(&[], 1.0, 10.0);
        assert!(!v.judged && v.flat && v.samples == 0, "{v:?}");
    }
}
