//! What the scenarios share: broker configurations for load, users and contact pairs set up
//! through the real protocol, bounded work queues, progress lines, Postgres databases.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use micromsg_broker::config::Config;
use micromsg_client::account::{self, Session};
use micromsg_client::link::BrokerLink;
use micromsg_client::profile::{Profile, ProfileInfo, Secrets};
use micromsg_wire::message::request::{Answer, ContactAnswerArgs, InitiateNewArgs};
use micromsg_wire::{Address, Event, Number, Request, ResponseData};

use crate::report::Report;

/// Which store the broker uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum StoreKind {
    /// Embedded SQLite in the broker's data directory (WAL, synchronous=FULL).
    Sqlite,
    /// A fresh database on the server named by `DATABASE_URL`.
    Postgres,
}

impl StoreKind {
    /// Lowercase name.
    pub(crate) fn name(self) -> &'static str {
        match self {
            StoreKind::Sqlite => "sqlite",
            StoreKind::Postgres => "postgres",
        }
    }
}

/// A broker configuration for load from one machine: no per-IP or per-connection rate limits
/// in the way, large inbox quotas, ephemeral ports, data in `dir`. Other settings come from
/// `MICROMSG_<SECTION>_<KEY>` in the environment as for `micromsg-broker` (say
/// `MICROMSG_DATABASE_DEPOSIT_BATCHES_IN_FLIGHT=1` to compare a setting's two values), else
/// their defaults.
pub(crate) fn load_config(dir: &Path) -> anyhow::Result<Config> {
    let mut config = Config::load(None, std::env::vars())?;
    config.server.listen = "127.0.0.1:0".parse()?;
    config.server.data_dir = dir.join("data");
    config.server.shutdown_grace_secs = 2;
    config.registration.per_ip_per_hour = 1_000_000;
    config.contacts.initiates_per_minute = 1_000_000;
    config.limits.requests_per_sec = 1_000_000;
    config.limits.requests_burst = 1_000_000;
    config.limits.max_connections_per_ip = 20_000;
    // Every simulated client connects from loopback, thousands at once.
    config.limits.max_handshakes = 20_000;
    config.limits.max_handshakes_per_source = 20_000;
    config.inbox.quota_per_device = 10_000_000;
    config.admin.enabled = false;
    Ok(config)
}

/// The CA file a broker made in its data directory.
pub(crate) fn ca_of(config: &Config) -> PathBuf {
    config.server.data_dir.join("tls").join("ca.pem")
}

/// A registered device, kept in memory so that logging in reads no files.
#[derive(Debug, Clone)]
pub(crate) struct User {
    /// Its profile (written by registration).
    pub(crate) profile: Profile,
    /// Public part.
    pub(crate) info: ProfileInfo,
    /// Secrets.
    pub(crate) secrets: Secrets,
}

impl User {
    /// The number.
    pub(crate) fn number(&self) -> anyhow::Result<Number> {
        Number::new(self.info.number.clone()).context("the broker handed out a bad number")
    }

    /// Opens a link with `tls` and logs in (the client library's mutual LOGIN).
    pub(crate) async fn login(&self, tls: Arc<rustls::ClientConfig>) -> anyhow::Result<BrokerLink> {
        let mut link = BrokerLink::connect(&self.info.broker, &self.info.tls_name, tls).await?;
        link.login(
            &self.info.number,
            self.info.device,
            &self.secrets.client_secret,
            &self.secrets.server_secret,
            self.info.nonce_step,
            account::unix_now(),
        )
        .await?;
        Ok(link)
    }

    /// Connects with the profile (the client library's `account::connect`).
    pub(crate) async fn connect(&self) -> anyhow::Result<Session> {
        Ok(account::connect(&self.profile).await?)
    }
}

/// Registers `n` users at `broker` (`HOST:PORT`), a few at a time; profiles under `dir`.
pub(crate) async fn register_users(
    broker: &str,
    ca: &Path,
    dir: &Path,
    prefix: &str,
    n: usize,
) -> anyhow::Result<Vec<User>> {
    let mut users = Vec::with_capacity(n);
    let mut next = 0;
    while next < n {
        let mut batch = tokio::task::JoinSet::new();
        for i in next..(next + 16).min(n) {
            let profile = Profile::new(dir.join(format!("{prefix}{i}")));
            let (broker, ca) = (broker.to_owned(), ca.to_owned());
            batch.spawn(async move {
                let session = account::register(&profile, &broker, &ca, None)
                    .await
                    .context("registering a user")?;
                drop(session);
                let user = User {
                    info: profile.info()?,
                    secrets: profile.secrets()?,
                    profile,
                };
                anyhow::Ok((i, user))
            });
        }
        let mut got = Vec::new();
        while let Some(done) = batch.join_next().await {
            got.push(done??);
        }
        got.sort_by_key(|(i, _)| *i);
        users.extend(got.into_iter().map(|(_, u)| u));
        next = (next + 16).min(n);
    }
    Ok(users)
}

/// Waits for the next event of `link`, at most `wait`.
pub(crate) async fn next_event(link: &mut BrokerLink, wait: Duration) -> anyhow::Result<Event> {
    match tokio::time::timeout(wait, link.next_event()).await {
        Ok(event) => Ok(event?),
        Err(_) => bail!("no event from the broker within {wait:?}"),
    }
}

/// Makes `caller` and `target` a contact pair on one broker (INITIATE-NEW, accepting answer).
pub(crate) async fn pair_local(
    caller: &mut BrokerLink,
    target: &mut BrokerLink,
    target_number: &Number,
) -> anyhow::Result<()> {
    caller
        .call(Request::InitiateNew(InitiateNewArgs {
            target: target_number.clone(),
            address: None,
        }))
        .await
        .context("INITIATE-NEW")?;
    let request = loop {
        if let Event::ContactRequest(r) = next_event(target, Duration::from_secs(10)).await? {
            break r;
        }
    };
    let answer = target
        .call(Request::ContactAnswer(ContactAnswerArgs {
            request: request.request,
            answer: Answer::Accept {
                address: Address::new("127.0.0.1:9").context("address")?,
            },
        }))
        .await
        .context("CONTACT-ANSWER")?;
    if !matches!(answer, ResponseData::ContactAnswer) {
        bail!("CONTACT-ANSWER answered with {}", answer.kind().as_str());
    }
    // CONTACT-CONNECTING to the target, CONTACT-ACCEPTED to the caller.
    loop {
        if let Event::ContactAccepted(_) = next_event(caller, Duration::from_secs(10)).await? {
            break;
        }
    }
    let _ = target.take_queued_events();
    Ok(())
}

/// Hands out work items 0..total to concurrent workers until the deadline.
#[derive(Debug)]
pub(crate) struct Tickets {
    next: AtomicU64,
    /// Items completed (for progress lines).
    pub(crate) done: AtomicU64,
    total: u64,
    deadline: Instant,
}

impl Tickets {
    /// `total` items, none handed out after `limit` from now.
    pub(crate) fn new(total: u64, limit: Duration) -> Arc<Self> {
        Arc::new(Self {
            next: AtomicU64::new(0),
            done: AtomicU64::new(0),
            total,
            deadline: Instant::now() + limit,
        })
    }

    /// The next item, or `None` when all are handed out or time is up.
    pub(crate) fn take(&self) -> Option<u64> {
        if Instant::now() >= self.deadline {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        (i < self.total).then_some(i)
    }

    /// Marks one item done.
    pub(crate) fn finish(&self) {
        self.done.fetch_add(1, Ordering::Relaxed);
    }

    /// True when the deadline passed before every item was handed out.
    pub(crate) fn timed_out(&self) -> bool {
        self.done.load(Ordering::Relaxed) < self.total && Instant::now() >= self.deadline
    }
}

/// Prints `label: done/total, rate/s` to stderr every second until dropped.
#[derive(Debug)]
pub(crate) struct Progress {
    task: tokio::task::JoinHandle<()>,
}

impl Progress {
    /// Starts printing the progress of `tickets`.
    pub(crate) fn start(label: &str, total: u64, done: Arc<Tickets>) -> Self {
        let label = label.to_owned();
        let task = tokio::spawn(async move {
            let start = Instant::now();
            let mut last = 0;
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            loop {
                tick.tick().await;
                let now = done.done.load(Ordering::Relaxed);
                eprintln!(
                    "  {label}: {now}/{total} in {:.0} s ({} in the last second)",
                    start.elapsed().as_secs_f64(),
                    now - last
                );
                last = now;
            }
        });
        Self { task }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The server URL of `DATABASE_URL`, with a clear error when it is not set.
pub(crate) fn database_url() -> anyhow::Result<String> {
    std::env::var("DATABASE_URL").map_err(|_| {
        anyhow::anyhow!(
            "--store postgres needs DATABASE_URL (postgres://USER@HOST:PORT/DB of a server where \
             this tool may create and drop databases); `scripts/postgres start` runs one and \
             prints it"
        )
    })
}

/// A database created for one run on the `DATABASE_URL` server; dropped by [`PgDatabase::drop_now`].
#[derive(Debug)]
pub(crate) struct PgDatabase {
    admin_url: String,
    /// Its name.
    pub(crate) name: String,
    /// Its URL.
    pub(crate) url: String,
}

impl PgDatabase {
    /// Creates `micromsg_bench_<random>`.
    pub(crate) async fn create() -> anyhow::Result<Self> {
        use rand_core::RngCore;
        use sqlx::Connection;
        let admin_url = database_url()?;
        let name = format!("micromsg_bench_{:08x}", rand_core::OsRng.next_u32());
        let mut conn = sqlx::PgConnection::connect(&admin_url)
            .await
            .with_context(|| format!("connecting to DATABASE_URL ({admin_url})"))?;
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .context("creating the benchmark database")?;
        let Some((base, _)) = admin_url.rsplit_once('/') else {
            bail!("DATABASE_URL must end in /DBNAME, got {admin_url:?}");
        };
        let url = format!("{base}/{name}");
        Ok(Self {
            admin_url,
            name,
            url,
        })
    }

    /// The CPU time so far of the server processes connected to this database (the broker's
    /// pooled backends; this machine's Postgres runs here, so `/proc` shows them). Background
    /// processes (WAL writer, checkpointer) are not counted.
    pub(crate) async fn backends_cpu(&self) -> anyhow::Result<Duration> {
        use sqlx::Connection;
        let mut conn = sqlx::PgConnection::connect(&self.admin_url).await?;
        let pids: Vec<i32> = sqlx::query_scalar(
            "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
        )
        .bind(&self.name)
        .fetch_all(&mut conn)
        .await
        .context("listing the benchmark database's backends")?;
        Ok(pids
            .iter()
            .filter_map(|pid| crate::child::cpu_of(&pid.to_string()))
            .sum())
    }

    /// Drops the database (forcing out any connection left).
    pub(crate) async fn drop_now(self) -> anyhow::Result<()> {
        use sqlx::Connection;
        let mut conn = sqlx::PgConnection::connect(&self.admin_url).await?;
        sqlx::query(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        ))
        .execute(&mut conn)
        .await
        .context("dropping the benchmark database")?;
        Ok(())
    }
}

/// Random bytes.
pub(crate) fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut b);
    b
}

/// A 16-byte message id unique within a run: a random prefix and the item number.
pub(crate) fn message_id(run: &[u8; 8], i: u64) -> [u8; 16] {
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(run);
    id[8..].copy_from_slice(&i.to_be_bytes());
    id
}

/// Gives this process the heap policy of the `micromsg` binary (`micromsg_heap`), for the
/// scenarios whose ends stand for client processes, and says so in the report. Broker children
/// are processes of their own and keep glibc's defaults, as `micromsg-broker` does.
pub(crate) fn client_heap_policy(report: &mut Report, scenario: &str) {
    if micromsg_heap::keep_freed_heap() {
        report.note(format!(
            "{scenario}: the client ends run with the micromsg binary's heap policy \
             (micromsg-heap: up to {} MiB of freed heap kept mapped per heap)",
            micromsg_heap::TRIM_THRESHOLD >> 20
        ));
    }
}
