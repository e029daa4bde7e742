//! The broker relay (protocol.md 6.26) on one broker, with real agents, TLS and sockets on
//! loopback: a target that cannot be reached directly is reached through the relay after the
//! direct attempt fails; a target that asks for the relay gets it at once; the session inside
//! is the ordinary section-12 session (messages both ways, the disconnect notice); the relay's
//! refusals are typed; an idle relay is closed with a reason both sides see; a burst larger than
//! the pipe holds arrives whole through the TLS connections. NAT and firewalls
//! on real network namespaces are in `tests/netns`.

use std::time::{Duration, Instant};

use micromsg_client::account;
use micromsg_client::agent::{AcceptPolicy, AgentConfig, AgentHandle, Command, Detail, Notice};
use micromsg_client::relay::{Path, Reach};
use micromsg_tests::agents::{self, Device, expect, register};
use micromsg_tests::raw::{pair, user};
use micromsg_tests::{Backend, TestBroker};
use micromsg_wire::message::request::RelayArgs;
use micromsg_wire::{ErrorCode, Hex16, Request};
use tokio::sync::mpsc;

/// A loopback port where a new TCP connection hangs: its listener's accept queue is full, so
/// the kernel drops further SYNs (as a firewall that drops packets does).
struct Hanging {
    addr: std::net::SocketAddr,
    _listener: tokio::net::TcpListener,
    _queued: Vec<tokio::net::TcpStream>,
}

impl Hanging {
    async fn new() -> Self {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(1).unwrap();
        let addr = listener.local_addr().unwrap();
        let mut queued = Vec::new();
        // Fill the accept queue (backlog + 1 on Linux); stop at the first that hangs.
        while queued.len() < 8 {
            match tokio::time::timeout(
                Duration::from_millis(300),
                tokio::net::TcpStream::connect(addr),
            )
            .await
            {
                Ok(Ok(stream)) => queued.push(stream),
                _ => break,
            }
        }
        Self {
            addr,
            _listener: listener,
            _queued: queued,
        }
    }
}

async fn online(device: &Device, config: AgentConfig) -> (AgentHandle, mpsc::Receiver<Notice>) {
    agents::online(device, config).await
}

/// A target whose advertised address refuses connections (as behind a NAT without a port
/// mapping), and that does not ask for the relay itself.
fn unreachable_target() -> AgentConfig {
    AgentConfig {
        advertise: Some("127.0.0.1:1".into()),
        reach: Reach::Direct,
        ..agents::config(AcceptPolicy::Any)
    }
}

/// `contact add` of `to` in `agent`; its output (`what` names it in a failure).
async fn add(agent: &AgentHandle, to: &Device, what: &str) -> micromsg_client::agent::Output {
    agent
        .command(Command::ContactAdd {
            number: to.number.clone(),
            wait_secs: None,
        })
        .await
        .unwrap_or_else(|e| panic!("{what}: {e:?}"))
}

/// Brokers x (555) and y (556) of one network, linked.
async fn two_brokers() -> micromsg_tests::TestNetwork {
    let net = micromsg_tests::TestNetwork::start(
        Backend::Sqlite,
        &[("x", &["555"]), ("y", &["556"])],
        |_, _| {},
    )
    .await;
    net.wait_linked().await;
    net
}

/// B asks for the relay from the start and advertises a port where a TCP connection hangs
/// (like a firewall that drops packets: the attempt neither succeeds nor fails at once). A
/// would wait 20 s for its direct attempt; B's RELAY-WAITING ends the wait, and the session
/// comes up through the relay in well under that.
async fn target_first_gets_the_relay_at_once(a: &Device, b: &Device) {
    let silent = Hanging::new().await;
    let (b_agent, mut b_rx) = online(
        b,
        AgentConfig {
            reach: Reach::Relay,
            advertise: Some(silent.addr.to_string()),
            ..agents::config(AcceptPolicy::Any)
        },
    )
    .await;
    let (a_agent, mut a_rx) = online(
        a,
        AgentConfig {
            direct_timeout: Duration::from_secs(20),
            ..agents::config(AcceptPolicy::Any)
        },
    )
    .await;
    let started_at = Instant::now();
    add(&a_agent, b, "contact add").await;
    assert_eq!(started(&mut a_rx, &b.number).await, Path::Relay);
    assert_eq!(started(&mut b_rx, &a.number).await, Path::Relay);
    let took = started_at.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "the caller waited {took:?} for the direct path"
    );
    a_agent.stop().await.unwrap();
    b_agent.stop().await.unwrap();
}

async fn started(rx: &mut mpsc::Receiver<Notice>, from: &str) -> Path {
    expect(rx, |n| match n {
        Notice::SessionStarted { peer, path, .. } if peer == from => Some(*path),
        _ => None,
    })
    .await
}

async fn message(rx: &mut mpsc::Receiver<Notice>, from: &str) -> String {
    expect(rx, |n| match n {
        Notice::Message { from: f, text, .. } if f == from => Some(text.clone()),
        _ => None,
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_target_is_reached_through_the_relay_after_the_direct_attempt_fails() {
    let broker = TestBroker::start(Backend::Sqlite, |_| {}).await;
    let a = register(&broker, "a").await;
    let b = register(&broker, "b").await;
    let (b_agent, mut b_rx) = online(&b, unreachable_target()).await;
    let (a_agent, mut a_rx) = online(&a, agents::config(AcceptPolicy::Any)).await;

    let reply = add(&a_agent, &b, "contact add").await;
    assert!(
        matches!(
            &reply.detail,
            Some(Detail::Session {
                path: Path::Relay,
                ..
            })
        ),
        "{reply:?}"
    );
    assert_eq!(started(&mut a_rx, &b.number).await, Path::Relay);
    assert_eq!(started(&mut b_rx, &a.number).await, Path::Relay);

    // The ordinary session runs inside: messages both ways.
    a_agent
        .command(Command::Send {
            number: b.number.clone(),
            text: "through the relay".into(),
        })
        .await
        .expect("send");
    assert_eq!(message(&mut b_rx, &a.number).await, "through the relay");
    b_agent
        .command(Command::Send {
            number: a.number.clone(),
            text: "and back".into(),
        })
        .await
        .expect("send back");
    assert_eq!(message(&mut a_rx, &b.number).await, "and back");

    // `status` shows the path of each live session.
    let status = a_agent.command(Command::Status).await.expect("status");
    match status.detail {
        Some(Detail::Status(s)) => {
            assert_eq!(s.sessions.len(), 1, "{s:?}");
            assert_eq!(s.sessions[0].peer, b.number);
            assert_eq!(s.sessions[0].path, Path::Relay);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(broker.running.broker.relays().open(), 1);
    // The operator sees it: `micromsg-broker status` (the admin service).
    let admin = broker
        .running
        .admin_addr
        .expect("an admin listener")
        .to_string();
    let status = micromsg_broker::admin::fetch_status(&admin).await.unwrap();
    let relays = status.relays.expect("relay counters");
    assert_eq!((relays.open, relays.spliced), (1, 1), "{relays:?}");
    assert!(relays.bytes > 0, "{relays:?}");
    let text = micromsg_broker::admin::render_text(&status);
    assert!(
        text.contains("relays    1 open; since up 1 joined"),
        "{text}"
    );

    // B goes offline: its disconnect notice crosses the relay.
    b_agent.stop().await.unwrap();
    expect(&mut a_rx, |n| match n {
        Notice::SessionEnded { peer, .. } if *peer == b.number => Some(()),
        _ => None,
    })
    .await;
    micromsg_tests::wait::eventually("the relay is released", Duration::from_secs(10), || async {
        broker.running.broker.relays().open() == 0
    })
    .await;
    // Both ends closed their TLS connections in order, so the broker saw a session that ended,
    // not a lost connection, and A is not warned about the relay.
    agents::expect_none(&mut a_rx, Duration::from_secs(2), |n| {
        matches!(n, Notice::Warning { .. })
    })
    .await;
    a_agent.stop().await.unwrap();
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_that_cannot_be_reached_asks_for_the_relay_from_the_start() {
    let broker = TestBroker::start(Backend::Sqlite, |_| {}).await;
    let a = register(&broker, "a").await;
    let b = register(&broker, "b").await;
    target_first_gets_the_relay_at_once(&a, &b).await;
    broker.stop().await;
}

#[tokio::test]
async fn relay_requests_for_an_unknown_foreign_or_spent_relay_are_refused() {
    let broker = TestBroker::start(Backend::Sqlite, |c| c.relay.max_per_device = 1).await;
    let mut a = user(&broker, "a").await;
    let mut b = user(&broker, "b").await;
    let mut stranger = user(&broker, "stranger").await;
    let relay = pair(&mut a, &mut b)
        .await
        .expect("the broker offers a relay");
    let ask = |relay: Hex16| Request::Relay(RelayArgs { relay });

    let unknown = stranger
        .link
        .call(ask(Hex16::from_bytes([9; 16])))
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Some(ErrorCode::NotFound), "{unknown}");
    let foreign = stranger.link.call(ask(relay)).await.unwrap_err();
    assert_eq!(foreign.code(), Some(ErrorCode::NotFound), "{foreign}");
    // A RELAY needs a login.
    let mut anonymous = micromsg_client::link::BrokerLink::connect(
        &broker.addr,
        "127.0.0.1",
        micromsg_client::tls::client_config(&broker.ca).unwrap(),
    )
    .await
    .unwrap();
    let err = anonymous.call(ask(relay)).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotLoggedIn), "{err}");

    // A joins on a connection of its own; the same side cannot join twice.
    let a_profile = micromsg_client::profile::Profile::new(broker.profile_dir("a"));
    let mut half = account::connect(&a_profile).await.unwrap();
    half.link.call(ask(relay)).await.unwrap();
    let mut again = account::connect(&a_profile).await.unwrap();
    let spent = again.link.call(ask(relay)).await.unwrap_err();
    assert_eq!(spent.code(), Some(ErrorCode::NotFound), "{spent}");

    // The device limit (1 here): a second relay for A is refused, typed and retryable.
    let mut c = user(&broker, "c").await;
    let second = pair(&mut a, &mut c).await.unwrap();
    let mut third = account::connect(&a_profile).await.unwrap();
    let limited = third.link.call(ask(second)).await.unwrap_err();
    assert_eq!(limited.code(), Some(ErrorCode::QuotaExceeded), "{limited}");
    assert_eq!(
        broker
            .running
            .broker
            .relays()
            .stats
            .refused_by_limit
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    // B was told that A waits.
    match b.link.next_event().await.unwrap() {
        micromsg_wire::Event::RelayWaiting(w) => {
            assert_eq!(w.relay, relay);
            assert_eq!(w.from.as_str(), a.info.number);
        }
        other => panic!("{other:?}"),
    }
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_relay_is_closed_and_both_sides_are_told_why() {
    let broker = TestBroker::start(Backend::Sqlite, |c| c.relay.idle_timeout_secs = 2).await;
    let a = register(&broker, "a").await;
    let b = register(&broker, "b").await;
    // Heartbeats every 30 s: the relay's 2 s idle timeout comes first.
    let quiet = |config: AgentConfig| AgentConfig {
        session: micromsg_client::p2p::SessionConfig {
            heartbeat_interval: Duration::from_secs(30),
            ..Default::default()
        },
        ..config
    };
    let (b_agent, mut b_rx) = online(&b, quiet(unreachable_target())).await;
    let (a_agent, mut a_rx) = online(&a, quiet(agents::config(AcceptPolicy::Any))).await;
    add(&a_agent, &b, "contact add").await;
    for rx in [&mut a_rx, &mut b_rx] {
        let warning = expect(rx, |n| match n {
            Notice::Warning { message } if message.contains("relay") => Some(message.clone()),
            _ => None,
        })
        .await;
        assert!(warning.contains("nothing was relayed for 2 s"), "{warning}");
    }
    a_agent.stop().await.unwrap();
    b_agent.stop().await.unwrap();
    broker.stop().await;
}

/// Across two brokers of a network: A on x, B on y, B unreachable directly. A's broker opens
/// the federation stream to B's (`Relay`), each broker splices its client's half to it, and the
/// session runs end to end through both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn across_two_brokers_the_home_brokers_join_the_halves() {
    let net = two_brokers().await;
    let a = register(net.broker(0), "a").await;
    let b = register(net.broker(1), "b").await;
    let (b_agent, mut b_rx) = online(&b, unreachable_target()).await;
    let (a_agent, mut a_rx) = online(&a, agents::config(AcceptPolicy::Any)).await;
    let reply = add(&a_agent, &b, "contact add across brokers").await;
    assert!(
        matches!(
            &reply.detail,
            Some(Detail::Session {
                path: Path::Relay,
                ..
            })
        ),
        "{reply:?}"
    );
    assert_eq!(started(&mut b_rx, &a.number).await, Path::Relay);
    a_agent
        .command(Command::Send {
            number: b.number.clone(),
            text: "from x through two brokers".into(),
        })
        .await
        .expect("send");
    assert_eq!(
        message(&mut b_rx, &a.number).await,
        "from x through two brokers"
    );
    b_agent
        .command(Command::Send {
            number: a.number.clone(),
            text: "and back from y".into(),
        })
        .await
        .expect("send back");
    assert_eq!(message(&mut a_rx, &b.number).await, "and back from y");
    for i in 0..2 {
        assert_eq!(
            net.broker(i).running.broker.relays().open(),
            1,
            "broker {i}"
        );
    }
    b_agent.stop().await.unwrap();
    expect(&mut a_rx, |n| match n {
        Notice::SessionEnded { peer, .. } if *peer == b.number => Some(()),
        _ => None,
    })
    .await;
    a_agent.stop().await.unwrap();
}

/// A relay across brokers ended by the other broker's shutdown: that broker says why in the
/// stream's last frame, so the client on the broker that stays up is told its contact's
/// broker is shutting down, not that the session ended in order (docs/federation.md 4.1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn across_two_brokers_the_other_brokers_shutdown_is_named() {
    let mut net = two_brokers().await;
    let a = register(net.broker(0), "a").await;
    let b = register(net.broker(1), "b").await;
    let (b_agent, _b_rx) = online(&b, unreachable_target()).await;
    let (a_agent, mut a_rx) = online(&a, agents::config(AcceptPolicy::Any)).await;
    add(&a_agent, &b, "contact add across brokers").await;
    assert_eq!(started(&mut a_rx, &b.number).await, Path::Relay);
    net.stop_broker(1).await;
    let warning = expect(&mut a_rx, |n| match n {
        Notice::Warning { message } if message.contains("relay") => Some(message.clone()),
        _ => None,
    })
    .await;
    assert!(
        warning.ends_with("the other side's broker is shutting down"),
        "{warning}"
    );
    a_agent.stop().await.unwrap();
    let _ = b_agent.stop().await;
}

/// The target (behind a NAT, say) asks for the relay at once across brokers: its broker tells
/// the caller's (`RelayWaiting`), whose client stops waiting for the direct path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn across_two_brokers_a_target_that_asks_first_gets_the_relay_at_once() {
    let net = two_brokers().await;
    let a = register(net.broker(0), "a").await;
    let b = register(net.broker(1), "b").await;
    target_first_gets_the_relay_at_once(&a, &b).await;
}

/// The target asks for the relay (it believes it is behind a NAT) but can in fact be reached:
/// the caller's direct connection may win. Either way exactly one session comes up and
/// messages flow; an INIT that reached the target directly is never followed by a second one
/// through the relay (the token is spent once). Before, the caller abandoned a direct
/// handshake already under way when RELAY-WAITING came, and the relayed INIT was refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_that_asks_for_the_relay_but_is_reachable_gets_one_session() {
    let net = two_brokers().await;
    for round in 0..3 {
        let a = register(net.broker(0), &format!("a{round}")).await;
        let b = register(net.broker(1), &format!("b{round}")).await;
        let (b_agent, mut b_rx) = online(
            &b,
            AgentConfig {
                reach: Reach::Relay,
                ..agents::config(AcceptPolicy::Any)
            },
        )
        .await;
        let (a_agent, mut a_rx) = online(&a, agents::config(AcceptPolicy::Any)).await;
        add(&a_agent, &b, "contact add").await;
        started(&mut a_rx, &b.number).await;
        started(&mut b_rx, &a.number).await;
        a_agent
            .command(Command::Send {
                number: b.number.clone(),
                text: format!("round {round}"),
            })
            .await
            .expect("send");
        assert_eq!(
            message(&mut b_rx, &a.number).await,
            format!("round {round}")
        );
        a_agent.stop().await.unwrap();
        b_agent.stop().await.unwrap();
    }
}

/// Users a and b with an offered relay between them, and both halves of it opened as each
/// user (their main links, the relay id, a's half, b's half).
async fn joined_relay(
    broker: &TestBroker,
) -> (
    account::Session,
    account::Session,
    Hex16,
    micromsg_client::relay::Relayed,
    micromsg_client::relay::Relayed,
) {
    let mut a = user(broker, "a").await;
    let mut b = user(broker, "b").await;
    let relay = pair(&mut a, &mut b)
        .await
        .expect("the broker offers a relay");
    let open = |name: &str| {
        let profile = micromsg_client::profile::Profile::new(broker.profile_dir(name));
        async move {
            micromsg_client::relay::open(&profile, &relay)
                .await
                .unwrap()
        }
    };
    let (a_half, b_half) = tokio::join!(open("a"), open("b"));
    (a, b, relay, a_half, b_half)
}

/// The session runs inside each side's TLS connection to the broker (no loopback bridge),
/// where a write may stay buffered in rustls while the socket is full. A burst of 38 MB,
/// more than the sockets, the broker's splice and the sender's outgoing queue hold, sent
/// while the receiving application takes nothing, arrives whole and in order once it reads again; the heartbeats are two
/// minutes apart, so no later frame pushes a stuck tail out within the 30 s each message has.
/// (That the session flushes what such a writer holds back is pinned deterministically by
/// `p2p::session::timing_tests`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_through_the_relay_arrives_whole_while_the_receiver_lags() {
    use micromsg_client::p2p::{self, PeerEvent, SessionConfig};
    use micromsg_crypto::{IdentityKey, Secret32};

    let broker = TestBroker::start(Backend::Sqlite, |c| c.relay.bytes_per_sec = 0).await;
    // The main links stay logged in, as the offer's devices.
    let (_a, _b, _, a_half, b_half) = joined_relay(&broker).await;
    let cfg = SessionConfig {
        heartbeat_interval: Duration::from_secs(120),
        // The receiving session stops reading at this much, so the burst backs up through
        // the broker into the sender's socket.
        event_queue_bytes: 128 * 1024,
        ..SessionConfig::default()
    };
    let token = Secret32::from_bytes([7; 32]);
    let token_id = micromsg_crypto::handshake::token_id(&token);
    let known = token.clone();
    let b_cfg = cfg.clone();
    let responder = tokio::spawn(async move {
        let identity = IdentityKey::generate(&mut rand_core::OsRng);
        p2p::accept(
            b_half,
            async |id| (id == token_id).then(|| known.clone()),
            &identity,
            b_cfg,
        )
        .await
    });
    let identity = IdentityKey::generate(&mut rand_core::OsRng);
    let initiator = p2p::initiate(a_half, &token, &identity, cfg, |_| true)
        .await
        .expect("the initiator's handshake through the relay");
    let responder = responder.await.unwrap().expect("the responder's handshake");
    let sender = initiator.start(None);
    let mut receiver = responder.start(None);

    let count: u64 = 640;
    let text = "r".repeat(60_000);
    // Sent from a task of its own: past the outgoing queue's 16 MiB the sends wait for room.
    let sending = tokio::spawn({
        let (sender, text) = (sender.sender(), text.clone());
        async move {
            for _ in 0..count {
                sender.send_text(text.clone()).await.expect("queued");
            }
        }
    });
    // Let the burst back up while nothing is taken.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let started = Instant::now();
    let mut received = 0;
    while received < count {
        match tokio::time::timeout(Duration::from_secs(30), receiver.next_event()).await {
            Ok(Some(PeerEvent::Text {
                text: got, counter, ..
            })) => {
                assert_eq!(got.len(), text.len());
                // Counter 0 was the confirming heartbeat.
                assert_eq!(counter, received + 1, "in order");
                received += 1;
            }
            Ok(Some(PeerEvent::Confirmed)) => {}
            other => panic!(
                "{received} of {count} arrived in {:?}, then {other:?}",
                started.elapsed()
            ),
        }
    }
    sending.await.unwrap();
    let _ = sender.close("done").await;
    broker.stop().await;
}

/// The broker's RELAY-CLOSED reason for `relay`, as `link`'s device is told it.
async fn relay_closed_reason(link: &mut micromsg_client::link::BrokerLink, relay: Hex16) -> String {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let micromsg_wire::Event::RelayClosed(c) = link.next_event().await.unwrap()
                && c.relay == relay
            {
                return c.reason;
            }
        }
    })
    .await
    .expect("RELAY-CLOSED within 10 s")
}

/// A handshake refused inside the relay (the responder's check says no: ABORT) ends both halves
/// with `close_notify`, so the broker tells both devices the session ended, not that a
/// connection was lost (protocol.md 6.26).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_refused_through_the_relay_ends_both_halves_in_order() {
    use micromsg_client::p2p::{self, P2pError, SessionConfig};
    use micromsg_crypto::{IdentityKey, Secret32};

    let broker = TestBroker::start(Backend::Sqlite, |_| {}).await;
    let (mut a, mut b, relay, a_half, b_half) = joined_relay(&broker).await;
    let token = Secret32::from_bytes([5; 32]);
    let responder = respond_through(b_half, &token, false);
    let identity = IdentityKey::generate(&mut rand_core::OsRng);
    let initiated = p2p::initiate(a_half, &token, &identity, SessionConfig::default(), |_| {
        true
    })
    .await;
    assert!(
        initiated.as_ref().is_err_and(P2pError::peer_aborted),
        "{initiated:?}"
    );
    let responded = responder.await.unwrap();
    assert!(
        matches!(responded, Err(P2pError::PeerRefused)),
        "{responded:?}"
    );
    assert_eq!(told_both(&mut a, &mut b, relay).await, ENDED);
    broker.stop().await;
}

/// RELAY-CLOSED's reason for a session that ended in order, to both devices.
const ENDED: [&str; 2] = ["the session ended", "the session ended"];

/// B's side of a handshake through the relay with a fresh identity: it knows `token`, and
/// `accept` is its answer to the initiator's identity.
fn respond_through(
    b_half: micromsg_client::relay::Relayed,
    token: &micromsg_crypto::Secret32,
    accept: bool,
) -> tokio::task::JoinHandle<
    Result<micromsg_client::p2p::Established, micromsg_client::p2p::P2pError>,
> {
    let known = token.clone();
    tokio::spawn(async move {
        let identity = micromsg_crypto::IdentityKey::generate(&mut rand_core::OsRng);
        micromsg_client::p2p::respond(
            b_half,
            async |_| Some(known),
            &identity,
            micromsg_client::p2p::SessionConfig::default(),
            |_, _| accept,
        )
        .await
    })
}

/// What RELAY-CLOSED told each device about `relay`, A's then B's.
async fn told_both(
    a: &mut account::Session,
    b: &mut account::Session,
    relay: Hex16,
) -> [String; 2] {
    [
        relay_closed_reason(&mut a.link, relay).await,
        relay_closed_reason(&mut b.link, relay).await,
    ]
}

/// A session refused after its handshake (the agent does so when the peer's identity key
/// changed, say) through the relay is closed in order too (`Established::close`): the other
/// side's session ends, and the broker tells both devices that the session ended, not that a
/// connection was lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_refused_after_its_handshake_through_the_relay_ends_in_order() {
    use micromsg_client::p2p::{self, PeerEvent, SessionConfig};
    use micromsg_crypto::{IdentityKey, Secret32};

    let broker = TestBroker::start(Backend::Sqlite, |_| {}).await;
    let (mut a, mut b, relay, a_half, b_half) = joined_relay(&broker).await;
    let token = Secret32::from_bytes([6; 32]);
    let responding = respond_through(b_half, &token, true);
    let responder = tokio::spawn(async move {
        // B accepts and runs the session: it ends when A's side closes.
        let established = responding.await.unwrap().unwrap();
        let (_sender, mut events) = established.start(None).into_parts();
        loop {
            match tokio::time::timeout(Duration::from_secs(20), events.recv()).await {
                Ok(Some(PeerEvent::Ended(_)) | None) => break,
                Ok(Some(_)) => {}
                Err(_) => panic!("B's session did not end"),
            }
        }
    });
    let identity = IdentityKey::generate(&mut rand_core::OsRng);
    let established = p2p::initiate(a_half, &token, &identity, SessionConfig::default(), |_| {
        true
    })
    .await
    .unwrap();
    // A refuses the session it has just set up.
    established.close();
    responder.await.unwrap();
    assert_eq!(told_both(&mut a, &mut b, relay).await, ENDED);
    broker.stop().await;
}

/// A broker that stops ends the relays it splices, closing each side in order: both ends of a
/// relayed session learn at once that it ended, instead of talking on through a broker that
/// has stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_stops_ends_its_relays() {
    let broker = TestBroker::start(Backend::Sqlite, |_| {}).await;
    let a = register(&broker, "a").await;
    let b = register(&broker, "b").await;
    let (b_agent, mut b_rx) = online(&b, unreachable_target()).await;
    let (a_agent, mut a_rx) = online(&a, agents::config(AcceptPolicy::Any)).await;
    add(&a_agent, &b, "contact add").await;
    assert_eq!(started(&mut a_rx, &b.number).await, Path::Relay);
    assert_eq!(started(&mut b_rx, &a.number).await, Path::Relay);
    assert_eq!(broker.running.broker.relays().open(), 1);

    let relays = std::sync::Arc::clone(&broker.running.broker);
    let stopping = Instant::now();
    broker.stop().await;
    assert_eq!(
        relays.relays().open(),
        0,
        "stop waits for the relays to end"
    );
    for (rx, peer) in [(&mut a_rx, &b.number), (&mut b_rx, &a.number)] {
        expect(rx, |n| match n {
            Notice::SessionEnded { peer: p, .. } if p == peer => Some(()),
            _ => None,
        })
        .await;
    }
    // Well before the sessions' liveness timeout (three heartbeat intervals of 10 s).
    assert!(
        stopping.elapsed() < Duration::from_secs(10),
        "{:?}",
        stopping.elapsed()
    );
    a_agent.stop().await.unwrap();
    b_agent.stop().await.unwrap();
}

/// A relay half is still a client connection: it keeps its place under the broker's
/// connection limits (`limits.max_connections` and the per-IP limit) until the relay ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_halves_count_toward_the_connection_limits() {
    use tokio::io::AsyncReadExt;

    // The two users' main links and the two halves: four connections from 127.0.0.1.
    let broker = TestBroker::start(Backend::Sqlite, |c| c.limits.max_connections_per_ip = 4).await;
    let (_a, _b, _, a_half, b_half) = joined_relay(&broker).await;
    // A fifth is closed before TLS.
    let mut fifth = tokio::net::TcpStream::connect(&broker.addr).await.unwrap();
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(5), fifth.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(0) | Err(_))),
        "the fifth connection was not closed: {read:?}"
    );
    // Once the relay ends, its places are free again.
    drop((a_half, b_half));
    micromsg_tests::wait::eventually("the relay is released", Duration::from_secs(10), || async {
        broker.running.broker.relays().open() == 0
    })
    .await;
    let profile = micromsg_client::profile::Profile::new(broker.profile_dir("a"));
    micromsg_tests::wait::eventually_some(
        "a connection in a place a half left",
        Duration::from_secs(10),
        async || account::connect(&profile).await.ok(),
    )
    .await;
    broker.stop().await;
}
