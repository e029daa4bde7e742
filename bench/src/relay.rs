//! `relay`: one end-to-end session through the broker's relay (protocol.md 6.26; the broker a
//! separate process), beside the same session directly on loopback in the same run: msg/s at
//! 256 B, MB/s at 64 KiB, round-trip latency; and the broker's memory per idle relay beside
//! its memory per idle logged-in connection.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use micromsg_client::link::BrokerLink;
use micromsg_client::p2p::SessionConfig;
use micromsg_client::profile::Profile;
use micromsg_client::relay::Relayed;
use micromsg_crypto::Secret32;
use micromsg_wire::message::request::{Answer, ContactAnswerArgs, InitiateNewArgs};
use micromsg_wire::{Address, Event, Hex16, Request};

use crate::child::ChildServer;
use crate::common::{self, User};
use crate::p2p::{Ends, one_way, round_trips};
use crate::report::{Report, Row};

/// Options of `relay`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Messages of --small bytes sent one way (each path).
    #[arg(long, default_value_t = 500_000)]
    pub(crate) small_count: u64,
    /// Size of the small messages.
    #[arg(long, default_value_t = 256)]
    pub(crate) small: usize,
    /// Messages of --large bytes sent one way (each path).
    #[arg(long, default_value_t = 10_000)]
    pub(crate) large_count: u64,
    /// Size of the large messages.
    #[arg(long, default_value_t = 65_536)]
    pub(crate) large: usize,
    /// Round trips for the latency figures (each path).
    #[arg(long, default_value_t = 10_000)]
    pub(crate) round_trips: u64,
    /// Idle relays held open for the memory figure (each holds two broker connections).
    #[arg(long, default_value_t = 100)]
    pub(crate) idle_relays: u64,
    /// Time limit of each measured phase, in seconds.
    #[arg(long, default_value_t = 60)]
    pub(crate) max_secs: u64,
}

const SCENARIO: &str = "relay";

pub(crate) async fn run(args: Args) -> anyhow::Result<Report> {
    if args.small_count == 0 || args.large_count == 0 || args.round_trips == 0 {
        bail!("--small-count, --large-count and --round-trips must be at least 1");
    }
    let max_text = SessionConfig::default().max_text_len();
    if args.small == 0 || args.large == 0 || args.small.max(args.large) > max_text {
        bail!("message sizes must be 1 to {max_text} bytes");
    }
    if args.idle_relays == 0 {
        bail!("--idle-relays must be at least 1");
    }
    let limit = Duration::from_secs(args.max_secs);
    let dir = tempfile::tempdir().context("temporary directory")?;
    let mut config = common::load_config(dir.path())?;
    // The path is measured, not the limits.
    config.relay.bytes_per_sec = 0;
    config.relay.max_per_device = u32::MAX;
    config.relay.max_total = u32::MAX;
    config.contacts.initiates_per_minute = u32::MAX;
    eprintln!("relay: starting the broker (SQLite, separate process)");
    let broker = ChildServer::broker(&config, dir.path(), "broker")?;
    let ca = common::ca_of(&config);
    let addr = format!("127.0.0.1:{}", broker.addr.port());
    let users = common::register_users(&addr, &ca, &dir.path().join("profiles"), "r", 2).await?;
    let tls = micromsg_client::tls::client_config(&ca)?;
    let mut pairs = Pairs::new(&users, Arc::clone(&tls)).await?;
    let mut report = Report::default();
    common::client_heap_policy(&mut report, SCENARIO);

    for (size, count, unit) in [
        (args.small, args.small_count, "msg/s"),
        (args.large, args.large_count, "MB/s"),
    ] {
        let to_unit = |n: u64, t: Duration| {
            let per_sec = n as f64 / t.as_secs_f64().max(1e-9);
            if unit == "MB/s" {
                per_sec * size as f64 / 1e6
            } else {
                per_sec
            }
        };
        eprintln!("relay: direct session, {count} × {size} bytes one way");
        let direct = one_way(Ends::direct()?, size, count, limit).await?;
        let (d_done, d_time) = (direct.received, direct.elapsed);
        eprintln!("relay: relayed session, {count} × {size} bytes one way");
        let relayed = one_way(pairs.relayed().await?, size, count, limit).await?;
        let (done, errors, time) = (relayed.received, relayed.errors, relayed.elapsed);
        let direct = Row::new(
            SCENARIO,
            &format!("direct, {size} B one way"),
            d_done,
            0,
            d_time,
        )
        .unit(unit)
        .rate(to_unit(d_done, d_time));
        let mut row = Row::new(
            SCENARIO,
            &format!("relayed, {size} B one way"),
            done,
            errors,
            time,
        )
        .unit(unit)
        .rate(to_unit(done, time))
        .ceiling(direct.rate);
        row = if unit == "MB/s" {
            let met = row.rate >= direct.rate * 0.5;
            row.target("≥ 50% of direct", met)
        } else {
            let met = row.rate >= 50_000.0;
            row.target("≥ 50,000 msg/s", met)
        };
        report.push(direct);
        report.push(row);
    }

    eprintln!(
        "relay: {} round trips of {} bytes, each path",
        args.round_trips, args.small
    );
    let (d_done, d_time, mut d_lat) =
        round_trips(Ends::direct()?, args.small, args.round_trips, limit).await?;
    let (done, time, mut lat) =
        round_trips(pairs.relayed().await?, args.small, args.round_trips, limit).await?;
    let direct_p99 = d_lat.percentiles().map(|p| p.p99_ms);
    let relayed_p99 = lat.percentiles().map(|p| p.p99_ms);
    let direct = Row::new(
        SCENARIO,
        &format!("direct round trip {} B", args.small),
        d_done,
        0,
        d_time,
    )
    .unit("round trips/s")
    .latency(&mut d_lat);
    let mut row = Row::new(
        SCENARIO,
        &format!("relayed round trip {} B", args.small),
        done,
        0,
        time,
    )
    .unit("round trips/s")
    .latency(&mut lat);
    if let (Some(d), Some(r)) = (direct_p99, relayed_p99) {
        let added = r - d;
        row = row.target(
            &format!("≤ 1 ms added at p99 (added {added:.2} ms)"),
            added <= 1.0,
        );
    }
    report.push(direct);
    report.push(row);

    eprintln!(
        "relay: {} round trips across two brokers of a network",
        args.round_trips
    );
    let (net_brokers, cas) = crate::federation::start_network(&dir.path().join("net"), &[])?;
    let (net_pair, net_links) =
        across_brokers(&net_brokers, &cas, &dir.path().join("net-profiles")).await?;
    let (done, time, mut lat) = round_trips(net_pair, args.small, args.round_trips, limit).await?;
    drop(net_links);
    let across_p99 = lat.percentiles().map(|p| p.p99_ms);
    let mut row = Row::new(
        SCENARIO,
        &format!("relayed round trip {} B, two brokers", args.small),
        done,
        0,
        time,
    )
    .unit("round trips/s")
    .latency(&mut lat);
    if let (Some(d), Some(r)) = (direct_p99, across_p99) {
        let added = r - d;
        row = row.target(
            &format!("≤ 2 ms added at p99 (added {added:.2} ms)"),
            added <= 2.0,
        );
    }
    report.push(row);
    for b in net_brokers {
        b.stop();
    }

    // Memory: idle logged-in connections, then idle relays (two connections each, joined, no
    // traffic), each as the broker's RSS growth over the count.
    let n = args.idle_relays;
    eprintln!("relay: {n} idle logged-in connections, then {n} idle relays");
    let before = broker.memory().map(|m| m.rss_kib);
    let mut links = Vec::new();
    for _ in 0..n {
        links.push(users[0].login(Arc::clone(&tls)).await?);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let with_links = broker.memory().map(|m| m.rss_kib);
    let mut held = Vec::new();
    for _ in 0..n {
        held.push(pairs.joined_idle().await?);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let with_relays = broker.memory().map(|m| m.rss_kib);
    let per = |a: Option<u64>, b: Option<u64>| match (a, b) {
        (Some(a), Some(b)) => b.saturating_sub(a) as f64 / n as f64,
        _ => f64::NAN,
    };
    let per_conn = per(before, with_links);
    let per_relay = per(with_links, with_relays);
    report.push(
        Row::new(
            SCENARIO,
            "idle logged-in connection, broker memory",
            n,
            0,
            Duration::ZERO,
        )
        .unit("KiB/conn")
        .rate(per_conn),
    );
    report.push(
        Row::new(SCENARIO, "idle relay, broker memory", n, 0, Duration::ZERO)
            .unit("KiB/relay")
            .rate(per_relay)
            .ceiling(per_conn)
            .target("≤ 2 × a logged-in connection", per_relay <= 2.0 * per_conn),
    );
    report.note(
        "relay: the relayed session runs the same p2p code as the direct one, through the \
         broker (inside each client's TLS connection to the broker, and the broker's splice); \
         ceiling of a relayed row = the direct row of the same run",
    );
    drop(held);
    drop(links);
    drop(pairs);
    broker.stop();
    Ok(report)
}

/// Two users' links, for making contact requests and relays between them.
struct Pairs {
    users: [User; 2],
    links: [BrokerLink; 2],
}

impl Pairs {
    async fn new(users: &[User], tls: Arc<rustls::ClientConfig>) -> anyhow::Result<Self> {
        let [a, b] = [users[0].clone(), users[1].clone()];
        let links = [a.login(Arc::clone(&tls)).await?, b.login(tls).await?];
        Ok(Self {
            users: [a, b],
            links,
        })
    }

    /// A contact request from user 0 to user 1, accepted: the relay id and connect token.
    async fn offer(&mut self) -> anyhow::Result<(Hex16, Secret32)> {
        let target = self.users[1].number()?;
        let [a, b] = &mut self.links;
        a.call(Request::InitiateNew(InitiateNewArgs {
            target,
            address: None,
        }))
        .await
        .context("INITIATE-NEW")?;
        let request = loop {
            if let Event::ContactRequest(r) = common::next_event(b, Duration::from_secs(10)).await?
            {
                break r.request;
            }
        };
        b.call(Request::ContactAnswer(ContactAnswerArgs {
            request,
            answer: Answer::Accept {
                address: Address::new("127.0.0.1:9").context("address")?,
            },
        }))
        .await
        .context("CONTACT-ANSWER")?;
        let accepted = loop {
            if let Event::ContactAccepted(a) =
                common::next_event(a, Duration::from_secs(10)).await?
            {
                break a;
            }
        };
        let _ = b.take_queued_events();
        let relay = accepted.relay.context("the broker offered no relay")?;
        Ok((relay, Secret32::from_bytes(*accepted.token.as_bytes())))
    }

    /// Both halves of a fresh relay, joined, carrying nothing (for the memory figure).
    async fn joined_idle(&mut self) -> anyhow::Result<(Relayed, Relayed)> {
        let (relay, _) = self.offer().await?;
        let (pa, pb) = (self.users[0].profile.clone(), self.users[1].profile.clone());
        let (a, b) = tokio::join!(
            micromsg_client::relay::open(&pa, &relay),
            micromsg_client::relay::open(&pb, &relay)
        );
        Ok((a.context("caller's half")?, b.context("target's half")?))
    }

    /// The ends of a session through a fresh relay (initiator, responder): each opens its
    /// half of the relay on its own thread.
    async fn relayed(&mut self) -> anyhow::Result<Ends> {
        let (relay, token) = self.offer().await?;
        let (pa, pb) = (self.users[0].profile.clone(), self.users[1].profile.clone());
        Ok(through_relay(pa, pb, relay, token))
    }
}

/// Ends that each open their half of `relay`, as the profile's user.
fn through_relay(a: Profile, b: Profile, relay: Hex16, token: Secret32) -> Ends {
    let half = |profile: Profile, whose: &'static str| -> crate::p2p::Dial {
        Box::new(move || {
            Box::pin(async move {
                let relayed = micromsg_client::relay::open(&profile, &relay)
                    .await
                    .context(whose)?;
                Ok(relayed.into())
            })
        })
    };
    Ends {
        initiator: half(a, "caller's half"),
        responder: half(b, "target's half"),
        token,
    }
}

/// The ends of a session through a relay whose two clients are on brokers x and y of one network.
async fn across_brokers(
    brokers: &[ChildServer],
    cas: &[std::path::PathBuf],
    profiles: &std::path::Path,
) -> anyhow::Result<(Ends, [BrokerLink; 2])> {
    let addr = |i: usize| format!("127.0.0.1:{}", brokers[i].addr.port());
    let a = common::register_users(&addr(0), &cas[0], profiles, "x", 1)
        .await?
        .remove(0);
    let b = common::register_users(&addr(1), &cas[1], profiles, "y", 1)
        .await?
        .remove(0);
    let mut a_link = a
        .login(micromsg_client::tls::client_config(&cas[0])?)
        .await?;
    let mut b_link = b
        .login(micromsg_client::tls::client_config(&cas[1])?)
        .await?;
    let accepted =
        crate::federation::pair_networked(&mut a_link, &a.number()?, &mut b_link, &b.number()?)
            .await?;
    let relay = accepted.relay.context("the brokers offered no relay")?;
    let token = Secret32::from_bytes(*accepted.token.as_bytes());
    // The links stay logged in while the relay is opened, as the offer's devices.
    Ok((
        through_relay(a.profile.clone(), b.profile.clone(), relay, token),
        [a_link, b_link],
    ))
}
