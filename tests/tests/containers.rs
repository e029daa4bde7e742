//! Container tests: the images of `scripts/images` (the broker of `deploy/Dockerfile` and
//! Postgres) started with testcontainers on a private Docker network, driven from this process
//! through the client library, as a user on the host would. Two brokers federate over mutual
//! TLS on that network; faults are a broker container stopped and started again, and cut off
//! the network and connected again.
//!
//! A test binary of its own, so it can be run alone:
//!
//! ```sh
//! scripts/images --profile debug     # builds micromsg/{debian,postgres,broker} once
//! cargo nextest run -p micromsg-tests --test containers
//! ```
//!
//! Rules every test here follows (through [`Docker::ready`]):
//! - no Docker engine reachable: the test FAILS, saying why, unless
//!   `MICROMSG_SKIP_DOCKER_TESTS=1`, when it prints a loud `SKIPPED: …` line and returns. The test
//!   command (`scripts/test`) decides whether to run this binary at all and says so.
//! - an image missing: the test fails and names `scripts/images`. Nothing is ever pulled.
//! - the images can be overridden with `BROKER_IMAGE` and `POSTGRES_IMAGE` (as in compose).
//!
//! testcontainers 0.27 talks to the engine through bollard with a fixed API version (1.52),
//! and engines older than that refuse every call ("client version 1.52 is too new"); Debian 12's
//! docker.io 20.10 speaks 1.41. For such an engine, [`Docker::ready`] starts a small relay in
//! this process that rewrites the version in each request path to the engine's, and runs the
//! test again in a child process whose `DOCKER_HOST` points at the relay (the environment of
//! this process cannot be changed safely, and testcontainers reads only the environment).
#![allow(clippy::unwrap_used)]

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use micromsg_client::account::{self, Session};
use micromsg_client::agent::AcceptPolicy;
use micromsg_client::profile::Profile;
use micromsg_tests::agents::{self, Device};
use micromsg_wire::message::request::{DepositArgs, InboxAckArgs};
use micromsg_wire::message::response::InboxMessage;
use micromsg_wire::{Blob, Hex16, Number, Request, ResponseData};
use testcontainers::core::logs::LogFrame;
use testcontainers::core::{ExecCommand, IntoContainerPort, WaitFor};
use testcontainers::runners::AsyncRunner;
use testcontainers::{ContainerAsync, CopyTargetOptions, GenericImage, Healthcheck, ImageExt};

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

/// One broker container on Postgres: a client on the host registers through the published
/// port, logs in, reads BROKER-INFO; the data is in Postgres, the broker runs unprivileged and
/// stops promptly on SIGTERM, and after a restart the same client logs in again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_container_on_postgres_serves_a_client() {
    let Some(docker) = Docker::ready("broker_container_on_postgres_serves_a_client").await else {
        return;
    };
    let pg = docker.start_postgres("pg-x").await;
    let broker = docker.start_broker("x", "100", &pg).await;

    let work = tempfile::tempdir().unwrap();
    let ca = broker.copy_ca(work.path()).await;
    let alice = Profile::new(work.path().join("alice"));
    let session = account::register(&alice, &broker.addr, &ca, None)
        .await
        .unwrap();
    let number = session.info.number.clone();
    assert!(
        number.starts_with("100") && number.len() == 10,
        "a number of broker x: {number}"
    );
    drop(session);

    let info = account::broker_info(&alice).await.unwrap();
    assert_eq!(info.info.broker_id, "x");
    let again = account::connect(&alice).await.unwrap();
    assert_eq!(again.info.number, number);
    drop(again);

    // The entity is in Postgres, not in a SQLite file in the container.
    let count = docker
        .exec(
            &pg.container,
            &[
                "psql",
                "-U",
                "micromsg",
                "-d",
                "micromsg",
                "-tAc",
                "SELECT count(*) FROM entities",
            ],
        )
        .await;
    assert_eq!(count.trim(), "1", "entities in Postgres");
    let uid = docker.exec(&broker.container, &["id", "-u"]).await;
    assert_eq!(uid.trim(), "7400", "the broker runs as the micromsg user");

    // SIGTERM: the broker shuts down gracefully well inside Docker's 10 s before SIGKILL.
    let t0 = Instant::now();
    broker.container.stop().await.unwrap();
    let stop_time = t0.elapsed();
    assert!(
        stop_time < Duration::from_secs(8),
        "docker stop took {stop_time:?}: the broker ignored SIGTERM?"
    );
    broker.container.start().await.unwrap();
    let after = broker.connect_when_up(&alice).await;
    assert_eq!(after.info.number, number, "same entity after a restart");
    let info_after = account::broker_info(&alice).await.unwrap();
    assert_eq!(
        info_after.identity_key, info.identity_key,
        "the identity key survives a restart (data volume)"
    );
}

/// Two broker containers, x (numbers `100…`) and y (`200…`), each on a Postgres container of
/// its own, federated over mutual TLS with network files made in this process by `network
/// init`'s code, endpoints `CONTAINER-NAME:7401` on the private Docker network. Clients on the
/// host, through the published client ports:
///
/// 1. A on x adds B on y with the client agent (the brokers relay the request and the sealed
///    addresses), and they talk directly both ways.
/// 2. A deposits for B at x without pause (raw DEPOSIT requests, for exact accounting) while
///    y's container is stopped and started again: every deposit x acknowledged is in B's inbox
///    at y exactly once, nothing missing, nothing twice.
/// 3. The same while y's container is cut off the Docker network and connected again (under
///    the same name, so x's endpoint resolves again).
/// 4. `micromsg-broker status --json` inside x's container shows peer y reachable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_containers_federate_and_deliver_exactly_once_across_faults() {
    const TEST: &str = "broker_containers_federate_and_deliver_exactly_once_across_faults";
    let Some(docker) = Docker::ready(TEST).await else {
        return;
    };
    let t0 = Instant::now();
    let work = tempfile::tempdir().unwrap();
    let network = docker.make_network(&work.path().join("network"), &[("x", "100"), ("y", "200")]);
    let (pg_x, pg_y) = tokio::join!(docker.start_postgres("pg-x"), docker.start_postgres("pg-y"));
    let (x, y) = tokio::join!(
        docker.start_networked_broker("x", "100", &pg_x, &network),
        docker.start_networked_broker("y", "200", &pg_y, &network),
    );
    docker.wait_peer(&x, "y", true).await;
    docker.wait_peer(&y, "x", true).await;
    eprintln!("[{:.1?}] two brokers linked", t0.elapsed());

    // 1. A on x adds B on y through the agents; then they talk directly (both agents run in
    //    this process and seal their 127.0.0.1 address, so the P2P connection is on the host).
    let a = register(&x, work.path(), "a").await;
    let b = register(&y, work.path(), "b").await;
    assert!(a.number.starts_with("100"), "a number of x: {}", a.number);
    assert!(b.number.starts_with("200"), "a number of y: {}", b.number);
    let (b_agent, mut b_rx) = agents::online(&b, agents::config(AcceptPolicy::Any)).await;
    let (a_agent, mut a_rx) = agents::online(&a, agents::config(AcceptPolicy::Any)).await;
    let reply = agents::contact_add(&a_agent, &b.number).await;
    assert!(reply.ok, "contact add across broker containers: {reply:?}");
    agents::session_started(&mut a_rx, &b.number).await;
    agents::session_started(&mut b_rx, &a.number).await;
    // Each side's send goes over the P2P session ("live"). The receiver may still show it as
    // arriving from the inbox: the sender also deposits a copy for the receiver's other
    // devices (protocol.md 13), and under load that copy can get through the two brokers
    // before the live frame is handled (the agent then drops the live one as a repeat).
    for (agent, rx, from, to, text) in [
        (&a_agent, &mut b_rx, &a.number, &b.number, "hello from x"),
        (&b_agent, &mut a_rx, &b.number, &a.number, "hello from y"),
    ] {
        let reply = agents::send(agent, to, text).await;
        assert!(reply.ok, "{reply:?}");
        assert_eq!(
            reply.data.as_ref().map(|d| &d["delivered"]),
            Some(&serde_json::json!("live")),
            "sent directly: {reply:?}"
        );
        let (got, offline) = agents::message_from(rx, from).await;
        assert_eq!(got, text);
        if offline {
            eprintln!("({text:?} was shown from the inbox copy: it beat the live frame)");
        }
    }
    a_agent.stop().await.unwrap();
    b_agent.stop().await.unwrap();
    eprintln!("[{:.1?}] A and B talked directly", t0.elapsed());

    // From here on A and B are driven with raw requests, B offline. B's inbox may hold the
    // copy of A's live message that A's agent deposited for B's other devices (protocol.md 13;
    // B's agent drops it as a repeat if it is still online when it arrives): clear it.
    let from_a = Number::new(a.number.clone()).unwrap();
    let to_b = Number::new(b.number.clone()).unwrap();
    docker.wait_outbox(&x, "y", "drained", |n| n == 0).await;
    let mut b_session = account::connect(&b.profile).await.unwrap();
    let copies = fetch_all(&mut b_session).await;
    assert!(copies.len() <= 1, "one live message from A: {copies:?}");
    assert!(copies.iter().all(|m| m.from == from_a), "{copies:?}");
    ack(&mut b_session, &copies).await;
    eprintln!(
        "cleared {} copies of live messages from B's inbox",
        copies.len()
    );
    drop(b_session);
    let a_session = account::connect(&a.profile).await.unwrap();

    // 2. y's container stops (SIGTERM) and starts again while A deposits for B at x.
    let depositing = Depositor::start(a_session, to_b.clone(), TAG_STOP);
    depositing.wait_acked(DEPOSITS_PER_STEP).await;
    eprintln!("[{:.1?}] stopping y", t0.elapsed());
    y.container.stop().await.unwrap();
    docker.wait_peer(&x, "y", false).await;
    depositing
        .wait_acked(depositing.acked() + DEPOSITS_PER_STEP)
        .await;
    docker
        .wait_outbox(&x, "y", "queued while y is down", |n| n > 0)
        .await;
    eprintln!("[{:.1?}] starting y", t0.elapsed());
    y.start_again().await;
    docker.wait_peer(&x, "y", true).await;
    depositing
        .wait_acked(depositing.acked() + DEPOSITS_PER_STEP)
        .await;
    let (a_session, acked) = depositing.finish().await;
    docker.wait_outbox(&x, "y", "drained", |n| n == 0).await;
    let mut b_session = y.connect_when_up(&b.profile).await;
    expect_inbox_exactly(&mut b_session, &from_a, &acked).await;
    drop(b_session);
    eprintln!(
        "[{:.1?}] y stopped and started: {} deposits, each delivered once",
        t0.elapsed(),
        acked.len()
    );

    // 3. y is cut off the Docker network and connected again while A deposits for B at x.
    let depositing = Depositor::start(a_session, to_b.clone(), TAG_PARTITION);
    depositing.wait_acked(DEPOSITS_PER_STEP).await;
    eprintln!(
        "[{:.1?}] disconnecting y from {}",
        t0.elapsed(),
        docker.network
    );
    docker.disconnect(&y).await;
    docker.wait_peer(&x, "y", false).await;
    depositing
        .wait_acked(depositing.acked() + DEPOSITS_PER_STEP)
        .await;
    docker
        .wait_outbox(&x, "y", "queued while y is cut off", |n| n > 0)
        .await;
    eprintln!(
        "[{:.1?}] connecting y to {} again",
        t0.elapsed(),
        docker.network
    );
    docker.connect(&y).await;
    let lookup = ["getent", "hosts", y.name.as_str()];
    let resolved = wait_until(
        "x to resolve y's endpoint host again",
        Duration::from_secs(30),
        async || docker.try_exec(&x.container, &lookup).await,
    )
    .await;
    eprintln!("  {}", resolved.trim());
    docker.wait_peer(&x, "y", true).await;
    depositing
        .wait_acked(depositing.acked() + DEPOSITS_PER_STEP)
        .await;
    let (a_session, acked) = depositing.finish().await;
    docker.wait_outbox(&x, "y", "drained", |n| n == 0).await;
    let mut b_session = y.connect_when_up(&b.profile).await;
    // Exactly this step's deposits: nothing of step 2 comes back after B's acknowledgement.
    expect_inbox_exactly(&mut b_session, &from_a, &acked).await;
    eprintln!(
        "[{:.1?}] y cut off and reconnected: {} deposits, each delivered once",
        t0.elapsed(),
        acked.len()
    );
    drop((a_session, b_session));

    // 4. The operator's view from inside x's container: peer y, reachable, nothing waiting.
    let text = docker
        .exec(
            &x.container,
            &[
                "micromsg-broker",
                "status",
                "--admin",
                ADMIN_IN_CONTAINER,
                "--json",
            ],
        )
        .await;
    assert!(text.contains("\"broker_id\": \"y\""), "{text}");
    assert!(text.contains("\"reachable\": true"), "{text}");
    let status: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(status["broker_id"], "x", "{text}");
    assert_eq!(status["network"], NETWORK_NAME, "{text}");
    assert_eq!(status["store_backend"], "postgres", "{text}");
    assert_eq!(status["prefixes"], serde_json::json!(["100"]), "{text}");
    let peers = status["peers"].as_array().unwrap();
    assert_eq!(peers.len(), 1, "{text}");
    assert_eq!(peers[0]["broker_id"], "y", "{text}");
    assert_eq!(peers[0]["reachable"], true, "{text}");
    assert_eq!(
        peers[0]["endpoint"],
        format!("{}:{FEDERATION_PORT}", y.name),
        "{text}"
    );
    assert_eq!(peers[0]["outbox_depth"], 0, "{text}");
    assert_eq!(status["outbox_depth"], 0, "{text}");
    let text = docker
        .exec(
            &x.container,
            &["micromsg-broker", "status", "--admin", ADMIN_IN_CONTAINER],
        )
        .await;
    assert!(text.contains("reachable"), "{text}");
    docker.wait_peer(&y, "x", true).await;
    eprintln!("[{:.1?}] done", t0.elapsed());
}

/// A delivery whose answer is lost after the receiving broker committed it is stored once,
/// even when the recipient fetches and acknowledges it before the sender's retry: y's
/// database is paused so a Deliver stalls, then x is paused and y's database resumed, so y
/// commits and answers a frozen x; B fetches and acknowledges; x resumes, its call times out
/// and it re-sends the batch. B must not get anything twice (twice per round before
/// `received_deliveries`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_resent_after_a_lost_answer_is_not_stored_twice() {
    const TEST: &str = "a_delivery_resent_after_a_lost_answer_is_not_stored_twice";
    let Some(docker) = Docker::ready(TEST).await else {
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let network = docker.make_network(&work.path().join("network"), &[("x", "100"), ("y", "200")]);
    let (pg_x, pg_y) = tokio::join!(docker.start_postgres("pg-x"), docker.start_postgres("pg-y"));
    // x stays paused for as long as y takes to commit, which on a busy machine has passed the
    // store's 5 s: a timer that runs out while a process is frozen fires as it resumes, and the
    // deposit batch x had in flight was then refused UNAVAILABLE (retryable, and right for a
    // broker that stalled; not what this test is about). Its store waits longer here, and so
    // does a request; the delivery call's own 5 s still runs out, as the test needs.
    let x_env = [
        ("MICROMSG_DATABASE_TIMEOUT_MS", "60000"),
        ("MICROMSG_LIMITS_REQUEST_TIMEOUT_MS", "90000"),
    ];
    let (x, y) = tokio::join!(
        docker.start_networked_broker_with("x", "100", &pg_x, &network, &x_env),
        docker.start_networked_broker("y", "200", &pg_y, &network),
    );
    docker.wait_peer(&x, "y", true).await;
    let a = register(&x, work.path(), "a").await;
    let b = register(&y, work.path(), "b").await;
    let (b_agent, _b_rx) = agents::online(&b, agents::config(AcceptPolicy::Any)).await;
    let (a_agent, _a_rx) = agents::online(&a, agents::config(AcceptPolicy::Any)).await;
    assert!(agents::contact_add(&a_agent, &b.number).await.ok);
    a_agent.stop().await.unwrap();
    b_agent.stop().await.unwrap();
    let to_b = Number::new(b.number.clone()).unwrap();
    docker.wait_outbox(&x, "y", "drained", |n| n == 0).await;
    let mut a_session = account::connect(&a.profile).await.unwrap();
    let mut seen: HashSet<[u8; 16]> = HashSet::new();
    {
        let mut bs = account::connect(&b.profile).await.unwrap();
        let m = fetch_all(&mut bs).await;
        ack(&mut bs, &m).await;
    }
    for round in 0..2u8 {
        let depositing = Depositor::start(a_session, to_b.clone(), 0x10 + round);
        depositing.wait_acked(25).await;
        let received = docker.federation_counter(&y, "received").await;
        pause(&pg_y.container).await;
        // x's outbox backs up once its delivery call hangs in y's frozen commit (deposits keep
        // coming every DEPOSIT_PACE); well inside federation.request_timeout_ms (5 s).
        docker
            .wait_outbox(&x, "y", "backing up behind y's frozen store", |n| n >= 3)
            .await;
        pause(&x.container).await;
        pg_y.container.unpause().await.unwrap();
        eprintln!("round {round}: x paused while y commits");
        // y commits the delivery that x, frozen, will never see acknowledged.
        docker
            .wait_federation_counter(&y, "received", |n| n > received)
            .await;
        {
            let mut bs = account::connect(&b.profile).await.unwrap();
            let m = fetch_all(&mut bs).await;
            for msg in &m {
                assert!(
                    seen.insert(*msg.id.as_bytes()),
                    "a duplicate while x is paused"
                );
            }
            ack(&mut bs, &m).await;
        }
        x.container.unpause().await.unwrap();
        // x takes deposits again after the freeze before it stops.
        depositing.wait_acked(depositing.acked() + 5).await;
        let (session, acked) = depositing.finish().await;
        a_session = session;
        docker.wait_outbox(&x, "y", "drained", |n| n == 0).await;
        let mut bs = account::connect(&b.profile).await.unwrap();
        let m = fetch_all(&mut bs).await;
        let dups: Vec<[u8; 16]> = m
            .iter()
            .map(|msg| *msg.id.as_bytes())
            .filter(|id| !seen.insert(*id))
            .collect();
        ack(&mut bs, &m).await;
        assert!(
            dups.is_empty(),
            "round {round}: delivered twice: {}",
            describe_ids(dups.iter())
        );
        let missing: Vec<&[u8; 16]> = acked.iter().filter(|id| !seen.contains(*id)).collect();
        assert!(
            missing.is_empty(),
            "round {round}: acknowledged but never delivered: {}",
            describe_ids(missing)
        );
    }
    drop(y);
}

// ---------------------------------------------------------------------------------------------
// Support: clients and deposits
// ---------------------------------------------------------------------------------------------

/// Message id tags of the deposits of the two fault steps.
const TAG_STOP: u8 = 0xa1;
const TAG_PARTITION: u8 = 0xb2;
/// Deposits acknowledged before, during and after each fault.
const DEPOSITS_PER_STEP: usize = 25;
/// Pause between two deposits of a [`Depositor`].
const DEPOSIT_PACE: Duration = Duration::from_millis(20);

/// Registers `name` at `broker` with a profile in `dir`.
/// Pauses a container (the cgroup freezer), trying again when runc answers "unable to freeze":
/// the freezer gives up when a task does not stop within its own short timeout, which happens
/// on a loaded machine and says nothing about the code under test. Any other error, or a
/// third refusal, fails the test.
async fn pause(container: &ContainerAsync<GenericImage>) {
    for attempt in 1..=3 {
        match container.pause().await {
            Ok(()) => return,
            Err(e) if attempt < 3 && e.to_string().contains("unable to freeze") => {
                eprintln!("docker pause: {e}; trying again");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("docker pause failed: {e}"),
        }
    }
}

async fn register(broker: &Broker, dir: &Path, name: &str) -> Device {
    let ca = broker.copy_ca(dir).await;
    let profile = Profile::new(dir.join(name));
    let session = account::register(&profile, &broker.addr, &ca, None)
        .await
        .unwrap();
    Device {
        profile,
        number: session.info.number,
    }
}

/// Message `i` of the step tagged `tag`: a unique 16-byte id, and a body that names it.
fn message_id(tag: u8, i: u32) -> [u8; 16] {
    let mut id = [tag; 16];
    id[12..].copy_from_slice(&i.to_be_bytes());
    id
}

fn message_body(id: &[u8; 16]) -> Vec<u8> {
    let i = u32::from_be_bytes(id[12..].try_into().unwrap());
    format!("step {:02x} message {i}", id[0]).into_bytes()
}

/// `tag:index` of message ids, for failure messages.
fn describe_ids<'a>(ids: impl IntoIterator<Item = &'a [u8; 16]>) -> String {
    let mut names: Vec<String> = ids
        .into_iter()
        .map(|id| {
            let i = u32::from_be_bytes(id[12..].try_into().unwrap());
            format!("{:02x}:{i}", id[0])
        })
        .collect();
    names.sort();
    format!("[{}]", names.join(", "))
}

/// A's deposits for B in a task of its own, without pause until [`Depositor::finish`]; keeps
/// every id x acknowledged. x stays up throughout, so any refusal fails the test.
struct Depositor {
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<(Session, Vec<[u8; 16]>)>,
}

impl Depositor {
    fn start(mut session: Session, to: Number, tag: u8) -> Depositor {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn({
            let (stop, acked) = (Arc::clone(&stop), Arc::clone(&acked));
            async move {
                let mut ids = Vec::new();
                for i in 0.. {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let id = message_id(tag, i);
                    let answer = session
                        .link
                        .call(Request::Deposit(DepositArgs {
                            target: to.clone(),
                            id: Hex16::from_bytes(id),
                            body: Blob::new(message_body(&id)),
                        }))
                        .await
                        .unwrap_or_else(|e| panic!("x refused deposit {tag:02x}:{i}: {e}"));
                    match answer {
                        ResponseData::Deposit(d) => assert_eq!(d.id.as_bytes(), &id),
                        other => panic!("DEPOSIT {tag:02x}:{i}: {other:?}"),
                    }
                    ids.push(id);
                    acked.store(ids.len(), Ordering::Relaxed);
                    tokio::time::sleep(DEPOSIT_PACE).await;
                }
                (session, ids)
            }
        });
        Depositor { stop, acked, task }
    }

    /// Deposits acknowledged so far.
    fn acked(&self) -> usize {
        self.acked.load(Ordering::Relaxed)
    }

    /// Waits until `n` deposits are acknowledged in all.
    async fn wait_acked(&self, n: usize) {
        wait_until(
            &format!("{n} deposits acknowledged by x"),
            Duration::from_secs(60),
            async || {
                assert!(!self.task.is_finished(), "the depositing task ended");
                let acked = self.acked();
                if acked >= n {
                    Ok(())
                } else {
                    Err(format!("{acked} so far"))
                }
            },
        )
        .await;
    }

    /// Stops depositing; the session and every acknowledged id.
    async fn finish(self) -> (Session, Vec<[u8; 16]>) {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap()
    }
}

async fn fetch_all(s: &mut Session) -> Vec<InboxMessage> {
    micromsg_tests::fetch_whole_inbox(s).await
}

/// Acknowledges `messages` (INBOX-ACK).
async fn ack(s: &mut Session, messages: &[InboxMessage]) {
    for chunk in messages.chunks(1000) {
        let answer = s
            .link
            .call(Request::InboxAck(InboxAckArgs {
                ids: chunk.iter().map(|m| m.id).collect(),
            }))
            .await
            .unwrap();
        assert!(matches!(answer, ResponseData::InboxAck(_)), "{answer:?}");
    }
}

/// B's inbox holds each of `acked` exactly once, from `from` with its body, and nothing else;
/// then B acknowledges them (INBOX-ACK) and the inbox is empty.
async fn expect_inbox_exactly(b: &mut Session, from: &Number, acked: &[[u8; 16]]) {
    let got = wait_until(
        &format!("{} messages in B's inbox at y", acked.len()),
        Duration::from_secs(30),
        async || {
            let got = fetch_all(b).await;
            if got.len() >= acked.len() {
                Ok(got)
            } else {
                Err(format!("{} so far", got.len()))
            }
        },
    )
    .await;
    let mut seen: HashMap<[u8; 16], usize> = HashMap::new();
    for m in &got {
        *seen.entry(*m.id.as_bytes()).or_default() += 1;
    }
    let expected: HashSet<[u8; 16]> = acked.iter().copied().collect();
    assert_eq!(expected.len(), acked.len(), "ids are unique");
    let twice = seen.iter().filter(|(_, n)| **n > 1).map(|(id, _)| id);
    let missing = expected.iter().filter(|id| !seen.contains_key(*id));
    let unexpected = seen.keys().filter(|id| !expected.contains(*id));
    let (twice, missing, unexpected) = (
        describe_ids(twice),
        describe_ids(missing),
        describe_ids(unexpected),
    );
    assert!(
        got.len() == acked.len() && twice == "[]" && missing == "[]" && unexpected == "[]",
        "{} deposits acknowledged by x, {} messages fetched at y; more than once: {twice}; \
         missing: {missing}; never acknowledged: {unexpected}",
        acked.len(),
        got.len()
    );
    for m in &got {
        assert_eq!(&m.from, from);
        assert_eq!(m.body.as_bytes(), message_body(m.id.as_bytes()).as_slice());
    }
    ack(b, &got).await;
    let left = fetch_all(b).await;
    assert!(
        left.is_empty(),
        "B's inbox after INBOX-ACK: {}",
        describe_ids(left.iter().map(|m| m.id.as_bytes()))
    );
}

/// Polls `check` until it returns `Ok`, saying what it waits for and how long it took; panics
/// with the last `Err` (why not yet) after `limit`.
async fn wait_until<T>(
    what: &str,
    limit: Duration,
    mut check: impl AsyncFnMut() -> Result<T, String>,
) -> T {
    eprintln!("waiting for {what} (at most {limit:?})");
    let start = Instant::now();
    loop {
        match check().await {
            Ok(t) => {
                eprintln!("  {what}: after {:.1?}", start.elapsed());
                return t;
            }
            Err(why) if start.elapsed() < limit => {
                let _ = why;
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(why) => panic!("{what}: not within {limit:?}: {why}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Support: Docker, images, containers
// ---------------------------------------------------------------------------------------------

/// Env var: set to 1 to skip (loudly) instead of failing when no Docker engine is reachable.
const SKIP_VAR: &str = "MICROMSG_SKIP_DOCKER_TESTS";
/// Env var set in the child process that runs a test behind the API version relay.
const CHILD_VAR: &str = "MICROMSG_DOCKER_RELAY_CHILD";
/// Env var naming a file the child creates once its test has started.
const STARTED_VAR: &str = "MICROMSG_DOCKER_RELAY_STARTED";

/// Postgres credentials of the test databases.
const PG_USER: &str = "micromsg";
const PG_PASSWORD: &str = "micromsg-test";
const PG_DB: &str = "micromsg";

/// The name of the test broker network (in its network file).
const NETWORK_NAME: &str = "container-net";
/// The federation port inside a broker container (each container has its own address).
const FEDERATION_PORT: u16 = 7401;
/// Where a broker container gets the network files (the image's `/network`).
const NETWORK_DIR_IN_CONTAINER: &str = "/network";
/// The admin listener inside a broker container (the default `admin.listen`).
const ADMIN_IN_CONTAINER: &str = "127.0.0.1:7402";

/// A test's view of Docker: the images and a private network of its own.
#[derive(Debug)]
struct Docker {
    broker_image: (String, String),
    postgres_image: (String, String),
    /// A fresh user-defined network; containers reach each other by container name.
    network: String,
}

/// A started Postgres container.
struct Postgres {
    container: ContainerAsync<GenericImage>,
    /// Its name on the private network.
    host: String,
}

/// A started broker container.
struct Broker {
    container: ContainerAsync<GenericImage>,
    /// Its container name: its host name on the private network.
    name: String,
    /// `127.0.0.1:PORT`, the client port published on the host (fixed across restarts).
    addr: String,
    /// The prefix of its log lines in the test output.
    label: String,
    /// Log lines printed so far (see [`Broker::start_again`]).
    log_lines: Arc<AtomicUsize>,
}

impl Docker {
    /// Checks the engine and the images. `None` means "do not run the test body here": it was
    /// skipped (and said so), or it ran in a child process behind the version relay and passed.
    /// `test` must be the test function's name (the child runs exactly it).
    async fn ready(test: &str) -> Option<Docker> {
        let images = Docker::images();
        if std::env::var_os(CHILD_VAR).is_some() {
            if let Some(path) = std::env::var_os(STARTED_VAR) {
                std::fs::write(path, test).unwrap();
            }
            return Some(Docker::new(images));
        }
        let engine = DockerEndpoint::from_env();
        let version = match engine.api_version().await {
            Ok(v) => v,
            Err(e) => {
                let why = format!("no Docker engine reachable at {}: {e}", engine.describe());
                if std::env::var(SKIP_VAR).as_deref() == Ok("1") {
                    eprintln!();
                    eprintln!("SKIPPED: {test}: {why} ({SKIP_VAR}=1)");
                    eprintln!("SKIPPED: this container test did NOT run and proves nothing.");
                    eprintln!();
                    return None;
                }
                panic!(
                    "{test}: {why}.\nThe container tests need Docker and the images of \
                     scripts/images; set {SKIP_VAR}=1 to skip them explicitly."
                );
            }
        };
        for (name, tag) in [&images.0, &images.1] {
            match engine.image_exists(&format!("{name}:{tag}")).await {
                Ok(true) => {}
                Ok(false) => panic!(
                    "{test}: the image {name}:{tag} is missing; build it with scripts/images \
                     (nothing is pulled: this machine may have no registry)"
                ),
                Err(e) => panic!("{test}: inspecting image {name}:{tag}: {e}"),
            }
        }
        let client = api_version_of(testcontainers::bollard::API_DEFAULT_VERSION);
        match version {
            Some(server) if server < client => {
                relay::run_test_in_child(test, &engine, server).await;
                None
            }
            _ => Some(Docker::new(images)),
        }
    }

    fn images() -> ((String, String), (String, String)) {
        let pick = |var: &str, default: &str| {
            let image = std::env::var(var).unwrap_or_else(|_| default.to_owned());
            match image.rsplit_once(':') {
                Some((name, tag)) if !tag.contains('/') => (name.to_owned(), tag.to_owned()),
                _ => (image, "latest".to_owned()),
            }
        };
        (
            pick("BROKER_IMAGE", "micromsg/broker:dev"),
            pick("POSTGRES_IMAGE", "micromsg/postgres:15"),
        )
    }

    fn new((broker_image, postgres_image): ((String, String), (String, String))) -> Docker {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        Docker {
            broker_image,
            postgres_image,
            network: format!("micromsg-test-{}-{nanos:08x}", std::process::id()),
        }
    }

    /// Starts Postgres (healthy: `pg_isready` answers on TCP) as `NETWORK-NAME`.
    async fn start_postgres(&self, name: &str) -> Postgres {
        let host = format!("{}-{name}", self.network);
        let (image, tag) = &self.postgres_image;
        let container = GenericImage::new(image, tag)
            .with_wait_for(WaitFor::healthcheck())
            .with_network(&self.network)
            .with_container_name(&host)
            .with_env_var("POSTGRES_USER", PG_USER)
            .with_env_var("POSTGRES_PASSWORD", PG_PASSWORD)
            .with_env_var("POSTGRES_DB", PG_DB)
            .with_health_check(
                Healthcheck::cmd_shell(format!(
                    "pg_isready -q -h 127.0.0.1 -U {PG_USER} -d {PG_DB}"
                ))
                .with_interval(Duration::from_millis(500))
                .with_timeout(Duration::from_secs(5))
                .with_retries(240),
            )
            .with_log_consumer(log_printer(name.to_owned(), Arc::default()))
            .with_startup_timeout(Duration::from_secs(120))
            .start()
            .await
            .unwrap_or_else(|e| panic!("starting {image}:{tag}: {e}"));
        Postgres { container, host }
    }

    /// Starts broker `id` with number prefix `prefix` on `pg`, its client port published on a
    /// fixed free host port, and waits until it listens and its health check passes.
    async fn start_broker(&self, id: &str, prefix: &str, pg: &Postgres) -> Broker {
        self.start_broker_in(id, prefix, pg, None, &[]).await
    }

    /// The container name (and so the host name on the private network) of broker `id`.
    fn broker_name(&self, id: &str) -> String {
        format!("{}-broker-{id}", self.network)
    }

    /// Makes a broker network in `dir` with the code of `micromsg-broker network init`: the
    /// network CA, a certificate and key per broker (id, prefix) and `network.toml`, each
    /// broker's endpoint its container name and the federation port.
    fn make_network(&self, dir: &Path, brokers: &[(&str, &str)]) -> PathBuf {
        use micromsg_broker::federation::network::{InitBroker, init_keeping_ca};
        let specs: Vec<InitBroker> = brokers
            .iter()
            .map(|(id, prefix)| InitBroker {
                id: (*id).to_owned(),
                prefixes: vec![(*prefix).to_owned()],
                endpoint: format!("{}:{FEDERATION_PORT}", self.broker_name(id)),
            })
            .collect();
        init_keeping_ca(dir, NETWORK_NAME, &specs).unwrap();
        dir.to_owned()
    }

    /// Starts broker `id` of the network made in `network` by [`Docker::make_network`]: its
    /// network file, the network CA and its own certificate and key are copied into the
    /// container's `/network`, and its federation timings are short (1 s probes and retries).
    async fn start_networked_broker(
        &self,
        id: &str,
        prefix: &str,
        pg: &Postgres,
        network: &Path,
    ) -> Broker {
        self.start_broker_in(id, prefix, pg, Some(network), &[])
            .await
    }

    /// [`Docker::start_networked_broker`] with configuration `env` (`MICROMSG_…` variables)
    /// besides the usual.
    async fn start_networked_broker_with(
        &self,
        id: &str,
        prefix: &str,
        pg: &Postgres,
        network: &Path,
        env: &[(&str, &str)],
    ) -> Broker {
        self.start_broker_in(id, prefix, pg, Some(network), env)
            .await
    }

    async fn start_broker_in(
        &self,
        id: &str,
        prefix: &str,
        pg: &Postgres,
        network: Option<&Path>,
        env: &[(&str, &str)],
    ) -> Broker {
        let name = self.broker_name(id);
        let label = format!("broker-{id}");
        let log_lines = Arc::new(AtomicUsize::new(0));
        // Docker binds it on every address.
        let port = micromsg_tests::free_port();
        let (image, tag) = &self.broker_image;
        let mut request = GenericImage::new(image, tag)
            .with_wait_for(WaitFor::message_on_stderr("listening for clients"))
            .with_wait_for(WaitFor::healthcheck())
            .with_network(&self.network)
            .with_container_name(&name)
            .with_mapped_port(port, 7400.tcp())
            .with_env_var("MICROMSG_SERVER_BROKER_ID", id)
            .with_env_var("MICROMSG_NUMBERS_PREFIXES", format!("[\"{prefix}\"]"))
            .with_env_var(
                "MICROMSG_DATABASE_URL",
                format!(
                    "postgres://{PG_USER}:{PG_PASSWORD}@{}:5432/{PG_DB}",
                    pg.host
                ),
            )
            .with_env_var("MICROMSG_SERVER_SHUTDOWN_GRACE_SECS", "3")
            .with_env_var("MICROMSG_REGISTRATION_PER_IP_PER_HOUR", "100000")
            .with_health_check(
                Healthcheck::cmd(["micromsg-healthcheck"])
                    .with_interval(Duration::from_millis(500))
                    .with_timeout(Duration::from_secs(5))
                    .with_retries(120),
            )
            .with_log_consumer(log_printer(label.clone(), Arc::clone(&log_lines)))
            .with_startup_timeout(Duration::from_secs(120));
        for (key, value) in env {
            request = request.with_env_var(*key, *value);
        }
        if let Some(dir) = network {
            // The copies are owned by root in the container (testcontainers writes tar entries
            // with uid 0), so they must be readable by all for the broker's user (7400); the
            // key, 0600 on the host, is readable only inside this throwaway container.
            for file in [
                "network.toml".to_owned(),
                "ca.pem".to_owned(),
                format!("{id}.pem"),
                format!("{id}.key"),
            ] {
                request = request.with_copy_to(
                    CopyTargetOptions::new(format!("{NETWORK_DIR_IN_CONTAINER}/{file}"))
                        .with_mode(0o644),
                    dir.join(&file),
                );
            }
            for (key, value) in [
                (
                    "NETWORK_FILE",
                    format!("{NETWORK_DIR_IN_CONTAINER}/network.toml"),
                ),
                ("LISTEN", format!("0.0.0.0:{FEDERATION_PORT}")),
                ("PROBE_INTERVAL_SECS", "1".to_owned()),
                ("RETRY_INITIAL_SECS", "1".to_owned()),
                ("RETRY_MAX_SECS", "2".to_owned()),
                ("OUTBOX_POLL_MS", "200".to_owned()),
                ("CONNECT_TIMEOUT_MS", "1000".to_owned()),
                ("REQUEST_TIMEOUT_MS", "3000".to_owned()),
            ] {
                request = request.with_env_var(format!("MICROMSG_FEDERATION_{key}"), value);
            }
        }
        let container = request
            .start()
            .await
            .unwrap_or_else(|e| panic!("starting {image}:{tag}: {e}"));
        Broker {
            container,
            name,
            addr: format!("127.0.0.1:{port}"),
            label,
            log_lines,
        }
    }

    /// Runs `cmd` in `container` and returns its standard output; panics when it fails.
    async fn exec(&self, container: &ContainerAsync<GenericImage>, cmd: &[&str]) -> String {
        self.try_exec(container, cmd)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Runs `cmd` in `container`: its standard output, or why it failed.
    async fn try_exec(
        &self,
        container: &ContainerAsync<GenericImage>,
        cmd: &[&str],
    ) -> Result<String, String> {
        let mut result = container
            .exec(ExecCommand::new(cmd.iter().copied()))
            .await
            .map_err(|e| format!("exec {cmd:?}: {e}"))?;
        let stdout = result.stdout_to_vec().await.unwrap();
        let stderr = result.stderr_to_vec().await.unwrap();
        let code = result.exit_code().await.unwrap();
        if code != Some(0) {
            return Err(format!(
                "exec {cmd:?}: exit code {code:?}: {}",
                String::from_utf8_lossy(&stderr).trim()
            ));
        }
        Ok(String::from_utf8(stdout).unwrap())
    }

    /// `micromsg-broker status --json` run inside `broker`'s container: the parsed status and
    /// its text (for messages).
    async fn status(&self, broker: &Broker) -> Result<(serde_json::Value, String), String> {
        let cmd = [
            "micromsg-broker",
            "status",
            "--admin",
            ADMIN_IN_CONTAINER,
            "--json",
        ];
        let text = self.try_exec(&broker.container, &cmd).await?;
        let status =
            serde_json::from_str(&text).map_err(|e| format!("status --json: {e}: {text}"))?;
        Ok((status, text))
    }

    /// `peer`'s (reachable, outbox depth) in `broker`'s status.
    async fn peer_state(&self, broker: &Broker, peer: &str) -> Result<(bool, u64), String> {
        let (status, text) = self.status(broker).await?;
        let entry = status["peers"]
            .as_array()
            .and_then(|peers| peers.iter().find(|p| p["broker_id"] == peer))
            .ok_or_else(|| format!("no peer {peer} in {text}"))?;
        match (entry["reachable"].as_bool(), entry["outbox_depth"].as_u64()) {
            (Some(reachable), Some(depth)) => Ok((reachable, depth)),
            _ => Err(format!(
                "peer {peer} without reachable/outbox_depth: {text}"
            )),
        }
    }

    /// One of `broker`'s federation counters (`micromsg-broker status --json`, `federation`).
    async fn try_federation_counter(&self, broker: &Broker, name: &str) -> Result<u64, String> {
        let (status, text) = self.status(broker).await?;
        status["federation"][name]
            .as_u64()
            .ok_or_else(|| format!("no federation counter {name} in {text}"))
    }

    /// [`Self::try_federation_counter`], which must answer.
    async fn federation_counter(&self, broker: &Broker, name: &str) -> u64 {
        self.try_federation_counter(broker, name)
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", broker.name))
    }

    /// Waits until `broker`'s federation counter `name` satisfies `ok`.
    async fn wait_federation_counter(&self, broker: &Broker, name: &str, ok: impl Fn(u64) -> bool) {
        let what = format!("{}'s federation counter {name}", broker.name);
        wait_until(&what, Duration::from_secs(60), async || {
            match self.try_federation_counter(broker, name).await? {
                n if ok(n) => Ok(()),
                n => Err(format!("{name} = {n}")),
            }
        })
        .await;
    }

    /// Waits until `broker`'s status shows `peer` reachable (or not).
    async fn wait_peer(&self, broker: &Broker, peer: &str, reachable: bool) {
        let what = format!(
            "{} to see {peer} {}",
            broker.name,
            if reachable {
                "reachable"
            } else {
                "unreachable"
            }
        );
        wait_until(&what, Duration::from_secs(60), async || {
            match self.peer_state(broker, peer).await? {
                (r, _) if r == reachable => Ok(()),
                (r, depth) => Err(format!("reachable {r}, outbox {depth}")),
            }
        })
        .await;
    }

    /// Waits until `broker`'s outbox for `peer` (its status) has a depth for which `ok` holds.
    async fn wait_outbox(&self, broker: &Broker, peer: &str, what: &str, ok: impl Fn(u64) -> bool) {
        let what = format!("{}'s outbox for {peer}: {what}", broker.name);
        wait_until(&what, Duration::from_secs(60), async || {
            match self.peer_state(broker, peer).await? {
                (_, depth) if ok(depth) => Ok(()),
                (r, depth) => Err(format!("reachable {r}, outbox {depth}")),
            }
        })
        .await;
    }

    /// Cuts `broker` off the private network (`docker network disconnect`).
    async fn disconnect(&self, broker: &Broker) {
        use testcontainers::bollard::models::NetworkDisconnectRequest;
        let client = testcontainers::core::client::docker_client_instance()
            .await
            .unwrap();
        client
            .disconnect_network(
                &self.network,
                NetworkDisconnectRequest {
                    container: broker.name.clone(),
                    force: Some(true),
                },
            )
            .await
            .unwrap_or_else(|e| panic!("disconnecting {} from {}: {e}", broker.name, self.network));
    }

    /// Connects `broker` to the private network again (`docker network connect`), with its
    /// container name as an alias too, so peers resolve its endpoint as before.
    async fn connect(&self, broker: &Broker) {
        use testcontainers::bollard::models::{EndpointSettings, NetworkConnectRequest};
        let client = testcontainers::core::client::docker_client_instance()
            .await
            .unwrap();
        client
            .connect_network(
                &self.network,
                NetworkConnectRequest {
                    container: broker.name.clone(),
                    endpoint_config: Some(EndpointSettings {
                        aliases: Some(vec![broker.name.clone()]),
                        ..EndpointSettings::default()
                    }),
                },
            )
            .await
            .unwrap_or_else(|e| panic!("connecting {} to {}: {e}", broker.name, self.network));
    }
}

impl Broker {
    /// Starts the stopped container again and prints its new log lines: the log consumer
    /// given at creation follows the logs only until the container first stops. (Docker's log
    /// stream starts from the beginning, so the lines already printed are skipped; at worst a
    /// few of the last ones are printed twice.)
    async fn start_again(&self) {
        use tokio::io::AsyncBufReadExt;
        let printed = self.log_lines.load(Ordering::Relaxed);
        self.container.start().await.unwrap();
        let mut logs = self.container.stderr(true);
        let label = format!("{} again", self.label);
        tokio::spawn(async move {
            let mut line = String::new();
            let mut n = 0;
            while matches!(logs.read_line(&mut line).await, Ok(1..)) {
                n += 1;
                if n > printed {
                    eprintln!("[{label}] {}", line.trim_end());
                }
                line.clear();
            }
        });
    }

    /// Copies the broker's private CA (made on first start in /data/tls/) to `dir`.
    async fn copy_ca(&self, dir: &Path) -> PathBuf {
        let path = dir.join(format!("ca-{}.pem", self.container.id()));
        self.container
            .copy_file_from("/data/tls/ca.pem", path.clone())
            .await
            .unwrap();
        path
    }

    /// Logs `profile` in, retrying for up to a minute while the broker (re)starts: Docker's
    /// port proxy accepts connections before the broker inside listens.
    async fn connect_when_up(&self, profile: &Profile) -> account::Session {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match account::connect(profile).await {
                Ok(session) => return session,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("waiting for {}: {e}", self.addr);
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => panic!("{} did not come back: {e}", self.addr),
            }
        }
    }
}

/// Prints a container's log lines to this test's stderr (shown when a test fails), counting
/// the lines of its standard error in `stderr_lines`.
fn log_printer(
    name: String,
    stderr_lines: Arc<AtomicUsize>,
) -> impl Fn(&LogFrame) + Send + Sync + 'static {
    move |frame: &LogFrame| {
        for line in String::from_utf8_lossy(frame.bytes()).lines() {
            if matches!(frame, LogFrame::StdErr(_)) {
                stderr_lines.fetch_add(1, Ordering::Relaxed);
            }
            eprintln!("[{name}] {line}");
        }
    }
}

/// `1.41` as (1, 41).
type ApiVersion = (usize, usize);

fn api_version_of(v: &testcontainers::bollard::ClientVersion) -> ApiVersion {
    (v.major_version, v.minor_version)
}

fn parse_api_version(s: &str) -> Option<ApiVersion> {
    let (major, minor) = s.split_once('.')?;
    Some((major.parse().ok()?, minor.parse().ok()?))
}

/// Where the Docker engine listens, from `DOCKER_HOST` (default `/var/run/docker.sock`), for
/// the plain HTTP probes this file makes itself.
#[derive(Debug, Clone)]
enum DockerEndpoint {
    Unix(PathBuf),
    Tcp(String),
    /// TLS (`https://`, or `DOCKER_TLS_VERIFY=1`): not probed here; testcontainers handles it.
    Tls(String),
}

impl DockerEndpoint {
    fn from_env() -> DockerEndpoint {
        let host = std::env::var("DOCKER_HOST")
            .ok()
            .filter(|h| !h.trim().is_empty())
            .unwrap_or_else(|| "unix:///var/run/docker.sock".to_owned());
        let tls = std::env::var("DOCKER_TLS_VERIFY").is_ok_and(|v| v == "1");
        if let Some(path) = host.strip_prefix("unix://") {
            DockerEndpoint::Unix(PathBuf::from(path))
        } else if let Some(addr) = host
            .strip_prefix("tcp://")
            .or_else(|| host.strip_prefix("http://"))
            .filter(|_| !tls)
        {
            DockerEndpoint::Tcp(addr.trim_end_matches('/').to_owned())
        } else {
            DockerEndpoint::Tls(host)
        }
    }

    fn describe(&self) -> String {
        match self {
            DockerEndpoint::Unix(p) => format!("unix://{}", p.display()),
            DockerEndpoint::Tcp(a) => format!("tcp://{a}"),
            DockerEndpoint::Tls(h) => h.clone(),
        }
    }

    async fn connect(&self) -> std::io::Result<relay::Stream> {
        match self {
            DockerEndpoint::Unix(path) => Ok(relay::Stream::Unix(
                tokio::net::UnixStream::connect(path).await?,
            )),
            DockerEndpoint::Tcp(addr) => Ok(relay::Stream::Tcp(
                tokio::net::TcpStream::connect(addr).await?,
            )),
            DockerEndpoint::Tls(host) => Err(std::io::Error::other(format!(
                "{host}: TLS endpoints are not probed"
            ))),
        }
    }

    /// `GET path` (unversioned, so any engine answers) → (status, body).
    async fn get(&self, path: &str) -> std::io::Result<(u16, Vec<u8>)> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let exchange = async {
            let mut stream = self.connect().await?;
            let request = format!("GET {path} HTTP/1.0\r\nHost: docker\r\n\r\n");
            stream.write_all(request.as_bytes()).await?;
            let mut response = Vec::new();
            stream.read_to_end(&mut response).await?;
            Ok::<_, std::io::Error>(response)
        };
        let response = tokio::time::timeout(Duration::from_secs(10), exchange)
            .await
            .map_err(|_| std::io::Error::other("no answer within 10 s"))??;
        let bad = || std::io::Error::other("not an HTTP response");
        let head_end = response
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .ok_or_else(bad)?;
        let head = std::str::from_utf8(&response[..head_end]).map_err(|_| bad())?;
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(bad)?;
        Ok((status, response[head_end + 4..].to_vec()))
    }

    /// The engine's API version; `Ok(None)` when it is not probed (TLS).
    async fn api_version(&self) -> std::io::Result<Option<ApiVersion>> {
        if matches!(self, DockerEndpoint::Tls(_)) {
            return Ok(None);
        }
        let (status, body) = self.get("/version").await?;
        if status != 200 {
            return Err(std::io::Error::other(format!(
                "GET /version: HTTP {status}"
            )));
        }
        let json: serde_json::Value = serde_json::from_slice(&body)
            .map_err(|e| std::io::Error::other(format!("GET /version: {e}")))?;
        let version = json["ApiVersion"]
            .as_str()
            .and_then(parse_api_version)
            .ok_or_else(|| std::io::Error::other("GET /version: no ApiVersion"))?;
        Ok(Some(version))
    }

    async fn image_exists(&self, image: &str) -> std::io::Result<bool> {
        if matches!(self, DockerEndpoint::Tls(_)) {
            return Ok(true);
        }
        let (status, _) = self.get(&format!("/images/{image}/json")).await?;
        match status {
            200 => Ok(true),
            404 => Ok(false),
            other => Err(std::io::Error::other(format!("HTTP {other}"))),
        }
    }
}

/// The API version relay for engines older than testcontainers' client (see the module docs).
mod relay {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

    use super::{ApiVersion, CHILD_VAR, DockerEndpoint, STARTED_VAR};

    /// How long a test may run in the child process before it is killed and fails.
    const CHILD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15 * 60);

    /// A connection to the engine.
    pub(super) enum Stream {
        Unix(tokio::net::UnixStream),
        Tcp(tokio::net::TcpStream),
    }

    impl AsyncRead for Stream {
        fn poll_read(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            match self.get_mut() {
                Stream::Unix(s) => Pin::new(s).poll_read(cx, buf),
                Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            }
        }
    }

    impl AsyncWrite for Stream {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            match self.get_mut() {
                Stream::Unix(s) => Pin::new(s).poll_write(cx, buf),
                Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            }
        }
        fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            match self.get_mut() {
                Stream::Unix(s) => Pin::new(s).poll_flush(cx),
                Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
            }
        }
        fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            match self.get_mut() {
                Stream::Unix(s) => Pin::new(s).poll_shutdown(cx),
                Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            }
        }
    }

    /// Runs `test` in a child process of this test binary, with `DOCKER_HOST` at a relay that
    /// forwards to `engine` and rewrites `/vX.Y/` in request paths to the engine's version.
    /// Panics unless the child ran the test and it passed.
    pub(super) async fn run_test_in_child(test: &str, engine: &DockerEndpoint, server: ApiVersion) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let relay_addr = listener.local_addr().unwrap();
        let engine = engine.clone();
        let relay = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                let engine = engine.clone();
                tokio::spawn(async move {
                    if let Ok(upstream) = engine.connect().await {
                        let _ = pipe(client, upstream, server).await;
                    }
                });
            }
        });
        eprintln!(
            "Docker engine speaks API {}.{}, older than testcontainers' {}.{}: running {test} in a \
             child process through a version relay at {relay_addr}",
            server.0,
            server.1,
            testcontainers::bollard::API_DEFAULT_VERSION.major_version,
            testcontainers::bollard::API_DEFAULT_VERSION.minor_version,
        );
        let started = tempfile::NamedTempFile::new().unwrap();
        let started_path = started.path().to_owned();
        std::fs::remove_file(&started_path).unwrap();
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args([test, "--exact", "--nocapture", "--test-threads=1"])
            .env("DOCKER_HOST", format!("tcp://{relay_addr}"))
            .env(CHILD_VAR, "1")
            .env(STARTED_VAR, &started_path)
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + CHILD_TIMEOUT;
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{test} did not finish within {CHILD_TIMEOUT:?} in the child process");
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        };
        relay.abort();
        assert!(
            started_path.exists(),
            "the child process did not run {test} (is the name passed to Docker::ready right?)"
        );
        let _ = std::fs::remove_file(&started_path);
        assert!(
            status.success(),
            "{test} failed in the child process: {status}"
        );
    }

    /// Copies both ways until either side closes; requests get their API version rewritten.
    async fn pipe(
        client: tokio::net::TcpStream,
        upstream: Stream,
        server: ApiVersion,
    ) -> std::io::Result<()> {
        let (mut client_read, mut client_write) = tokio::io::split(client);
        let (mut up_read, mut up_write) = tokio::io::split(upstream);
        let requests = async {
            let mut rewriter = Rewriter::new(server);
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = client_read.read(&mut buf).await?;
                if n == 0 {
                    let rest = rewriter.finish();
                    up_write.write_all(&rest).await?;
                    up_write.shutdown().await?;
                    return Ok::<_, std::io::Error>(());
                }
                let out = rewriter.feed(&buf[..n]);
                up_write.write_all(&out).await?;
            }
        };
        let responses = async {
            tokio::io::copy(&mut up_read, &mut client_write).await?;
            client_write.shutdown().await?;
            Ok::<_, std::io::Error>(())
        };
        // Either direction ending (or failing) ends the connection.
        tokio::select! {
            r = requests => r,
            r = responses => r,
        }
    }

    /// Rewrites ` /vMAJOR.MINOR/` to the engine's version when it is newer, in a byte stream
    /// cut at arbitrary places: a tail that may be the start of such a path is held back
    /// until the next bytes arrive.
    pub(super) struct Rewriter {
        server: ApiVersion,
        pending: Vec<u8>,
    }

    impl Rewriter {
        pub(super) fn new(server: ApiVersion) -> Rewriter {
            Rewriter {
                server,
                pending: Vec::new(),
            }
        }

        pub(super) fn feed(&mut self, bytes: &[u8]) -> Vec<u8> {
            self.pending.extend_from_slice(bytes);
            let data = std::mem::take(&mut self.pending);
            let mut out = Vec::with_capacity(data.len());
            let mut i = 0;
            while i < data.len() {
                if data[i] == b' ' {
                    match self.match_version(&data[i + 1..]) {
                        Match::Yes { len, version } => {
                            out.push(b' ');
                            if version > self.server {
                                out.extend_from_slice(
                                    format!("/v{}.{}/", self.server.0, self.server.1).as_bytes(),
                                );
                            } else {
                                out.extend_from_slice(&data[i + 1..i + 1 + len]);
                            }
                            i += 1 + len;
                            continue;
                        }
                        Match::Partial => {
                            self.pending = data[i..].to_vec();
                            return out;
                        }
                        Match::No => {}
                    }
                }
                out.push(data[i]);
                i += 1;
            }
            out
        }

        pub(super) fn finish(&mut self) -> Vec<u8> {
            std::mem::take(&mut self.pending)
        }

        /// Does `s` start with `/vDIGITS.DIGITS/`?
        fn match_version(&self, s: &[u8]) -> Match {
            const MAX: usize = 16;
            let mut state = 0; // 0: '/', 1: 'v', 2: major, 3: minor
            let (mut major, mut minor) = (String::new(), String::new());
            for (k, &b) in s.iter().enumerate().take(MAX) {
                match (state, b) {
                    (0, b'/') => state = 1,
                    (1, b'v') => state = 2,
                    (2, b'0'..=b'9') => major.push(b as char),
                    (2, b'.') if !major.is_empty() => state = 3,
                    (3, b'0'..=b'9') => minor.push(b as char),
                    (3, b'/') if !minor.is_empty() => {
                        return match (major.parse(), minor.parse()) {
                            (Ok(a), Ok(b)) => Match::Yes {
                                len: k + 1,
                                version: (a, b),
                            },
                            _ => Match::No,
                        };
                    }
                    _ => return Match::No,
                }
            }
            if s.len() < MAX {
                Match::Partial
            } else {
                Match::No
            }
        }
    }

    enum Match {
        Yes { len: usize, version: ApiVersion },
        Partial,
        No,
    }
}

#[test]
fn relay_rewrites_versions_across_chunk_boundaries() {
    let request = b"GET /v1.52/containers/json HTTP/1.1\r\nHost: x\r\n\r\nPOST /v1.52/networks/create HTTP/1.1\r\n\r\n{\"a\": \"/v1.52/ in a body stays\"}GET /v1.30/_ping HTTP/1.1\r\n\r\n";
    let expected = String::from_utf8_lossy(request)
        .replacen("/v1.52/", "/v1.41/", 2)
        .into_bytes();
    for cut in 1..request.len() {
        let mut r = relay::Rewriter::new((1, 41));
        let mut out = Vec::new();
        for chunk in request.chunks(cut) {
            out.extend(r.feed(chunk));
        }
        out.extend(r.finish());
        assert_eq!(
            String::from_utf8_lossy(&out),
            String::from_utf8_lossy(&expected),
            "chunks of {cut}"
        );
    }
}
