//! Federation: three brokers in this process on loopback, each with its own database, linked by
//! gRPC over mutual TLS. Clients are driven with raw `BrokerLink` requests so every byte of the
//! networked flow (protocol.md section 11) is checked: IS-NETWORKED, INITIATE-*-NETWORKED, the
//! sealed address handoff and its tokens, the silent-drop rule across brokers, offline deposits
//! through the outbox (also across broker restarts), what a relaying broker stores and logs,
//! the mTLS refusals, and the admin status.

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use micromsg_broker::config::LogFormat;
use micromsg_broker::federation::mtls::MtlsConfig;
use micromsg_broker::federation::network::BrokerEntry;
use micromsg_broker::federation::peers::PeerLink;
use micromsg_broker::federation::proto::PingRequest;
use micromsg_client::account::{self, Session};
use micromsg_client::profile::Profile;
use micromsg_crypto::Secret32;
use micromsg_crypto::agreement::EphemeralSecret;
use micromsg_tests::{Backend, TestNetwork, open_address, seal_address};
use micromsg_wire::message::event::{ContactAccepted, ContactKind, ContactRequest};
use micromsg_wire::message::request::{
    Answer, ContactAnswerArgs, DepositArgs, InitiateNetworkedArgs, TargetArgs,
};
use micromsg_wire::message::response::{Home, InboxMessage};
use micromsg_wire::{Blob, ErrorCode, Event, Hex16, Hex32, Number, Request, ResponseData};

macro_rules! federation_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(micromsg_tests::Backend::Sqlite).await })*
        }
        mod postgres {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(micromsg_tests::Backend::Postgres).await })*
        }
    };
}

federation_backends!(
    is_networked_answers_own_peer_and_foreign_numbers,
    networked_contact_setup_hands_over_a_sealed_address,
    silent_drop_holds_across_brokers,
    offline_deposits_cross_brokers_once,
    outbox_loses_nothing_when_brokers_restart,
    outbox_handoff_overflows_into_the_table,
    status_shows_the_peers,
    a_peer_back_before_the_next_probe_is_used_at_once,
);

/// The three-broker network of these tests: x serves 555, y 556, z 557 and 558.
const BROKERS: &[(&str, &[&str])] = &[("x", &["555"]), ("y", &["556"]), ("z", &["557", "558"])];
const X: usize = 0;
const Y: usize = 1;
const Z: usize = 2;

/// B's listening address in the networked flow: it must never be seen in clear by a broker.
/// (A TEST-NET-2 address: nothing else in these tests uses it.)
const B_ADDRESS: &str = "198.51.100.23:40123";

const EVENT_WAIT: Duration = Duration::from_secs(15);

async fn network(backend: Backend) -> TestNetwork {
    let net = TestNetwork::start(backend, BROKERS, |_, _| {}).await;
    net.wait_linked().await;
    net
}

async fn user(net: &TestNetwork, broker: usize, name: &str) -> Session {
    let b = net.broker(broker);
    let p = Profile::new(b.profile_dir(name));
    account::register(&p, &b.addr, &b.ca, None).await.unwrap()
}

async fn relogin(net: &TestNetwork, broker: usize, name: &str) -> Session {
    let p = Profile::new(net.broker(broker).profile_dir(name));
    account::connect(&p).await.unwrap()
}

fn number(s: &Session) -> Number {
    Number::new(s.info.number.clone()).unwrap()
}

/// A fresh broker keypair (protocol.md 11.2).
fn keypair() -> (Secret32, [u8; 32]) {
    let sk = Secret32::generate(&mut rand_core::OsRng);
    let pk = EphemeralSecret::from_secret(&sk).public_key();
    (sk, pk)
}

async fn next_event(s: &mut Session) -> Event {
    tokio::time::timeout(EVENT_WAIT, s.link.next_event())
        .await
        .expect("no event in time")
        .unwrap()
}

async fn no_event_within(s: &mut Session, wait: Duration) {
    if let Ok(event) = tokio::time::timeout(wait, s.link.next_event()).await {
        panic!("expected silence, got {event:?}");
    }
}

async fn is_networked(s: &mut Session, target: &str) -> (bool, Home, Option<String>) {
    match s
        .link
        .call(Request::IsNetworked(TargetArgs {
            target: Number::new(target).unwrap(),
        }))
        .await
        .unwrap()
    {
        ResponseData::IsNetworked(d) => (d.networked, d.home, d.broker),
        other => panic!("{other:?}"),
    }
}

async fn initiate_networked(
    caller: &mut Session,
    target: &Number,
    pubkey: [u8; 32],
    existing: bool,
) -> Result<[u8; 16], micromsg_client::link::LinkError> {
    let args = InitiateNetworkedArgs {
        target: target.clone(),
        pubkey: Hex32::from_bytes(pubkey),
    };
    let request = if existing {
        Request::InitiateExistingNetworked(args)
    } else {
        Request::InitiateNewNetworked(args)
    };
    match caller.link.call(request).await? {
        ResponseData::InitiateNewNetworked(d) | ResponseData::InitiateExistingNetworked(d) => {
            Ok(*d.request.as_bytes())
        }
        other => panic!("{other:?}"),
    }
}

async fn expect_contact_request(s: &mut Session) -> ContactRequest {
    match next_event(s).await {
        Event::ContactRequest(r) => r,
        other => panic!("expected CONTACT-REQUEST, got {other:?}"),
    }
}

/// The target accepts a networked request, sealing `address` to the caller's key. Returns
/// the target's public key and the token of its CONTACT-CONNECTING.
async fn accept_networked(
    target: &mut Session,
    request: &ContactRequest,
    address: &str,
) -> ([u8; 32], [u8; 32]) {
    let pk_caller = *request
        .pubkey
        .as_ref()
        .expect("networked request has PUBKEY")
        .as_bytes();
    let (sk, pk) = keypair();
    let mut nonce = [0u8; 24];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut nonce);
    let sealed = seal_address(&sk, &pk_caller, &nonce, address);
    let answer = target
        .link
        .call(Request::ContactAnswer(ContactAnswerArgs {
            request: request.request,
            answer: Answer::AcceptNetworked {
                pubkey: Hex32::from_bytes(pk),
                sealed_address: Blob::new(sealed),
            },
        }))
        .await
        .unwrap();
    assert!(matches!(answer, ResponseData::ContactAnswer), "{answer:?}");
    let token = match next_event(target).await {
        Event::ContactConnecting(c) => {
            assert_eq!(c.request, request.request);
            assert_eq!(c.from, request.from);
            *c.token.as_bytes()
        }
        other => panic!("expected CONTACT-CONNECTING, got {other:?}"),
    };
    (pk, token)
}

async fn expect_accepted(s: &mut Session) -> ContactAccepted {
    match next_event(s).await {
        Event::ContactAccepted(a) => a,
        other => panic!("expected CONTACT-ACCEPTED, got {other:?}"),
    }
}

/// A on one broker and B on another become a contact pair through the networked flow.
async fn networked_pair(a: &mut Session, b: &mut Session) {
    let (_sk_a, pk_a) = keypair();
    initiate_networked(a, &number(b), pk_a, false)
        .await
        .unwrap();
    let request = expect_contact_request(b).await;
    accept_networked(b, &request, B_ADDRESS).await;
    expect_accepted(a).await;
}

async fn deposit(s: &mut Session, to: &Number, id: [u8; 16], body: &[u8]) -> ResponseData {
    s.link
        .call(Request::Deposit(DepositArgs {
            target: to.clone(),
            id: Hex16::from_bytes(id),
            body: Blob::new(body.to_vec()),
        }))
        .await
        .unwrap()
}

async fn fetch_all(s: &mut Session) -> Vec<InboxMessage> {
    micromsg_tests::fetch_whole_inbox(s).await
}

/// Fetches until `want` messages are there (or panics after `wait`).
async fn fetch_until(s: &mut Session, want: usize, wait: Duration) -> Vec<InboxMessage> {
    let deadline = Instant::now() + wait;
    loop {
        let got = fetch_all(s).await;
        if got.len() >= want || Instant::now() > deadline {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn message_id(tag: u8, i: u32) -> [u8; 16] {
    let mut id = [tag; 16];
    id[12..].copy_from_slice(&i.to_be_bytes());
    id
}

// ---------------------------------------------------------------------------------------------

async fn is_networked_answers_own_peer_and_foreign_numbers(backend: Backend) {
    let net = network(backend).await;
    let mut a = user(&net, X, "a").await;
    assert!(
        a.info.number.starts_with("555"),
        "x allocates from its prefix"
    );
    for i in 0..4 {
        let c = user(&net, Z, &format!("c{i}")).await;
        assert!(
            c.info.number.starts_with("557") || c.info.number.starts_with("558"),
            "z allocates from its prefixes in the network file, got {}",
            c.info.number
        );
    }
    assert_eq!(
        is_networked(&mut a, "5550000001").await,
        (false, Home::Own, Some("x".into()))
    );
    assert_eq!(
        is_networked(&mut a, "5560000001").await,
        (true, Home::Peer, Some("y".into()))
    );
    assert_eq!(
        is_networked(&mut a, "5580000001").await,
        (true, Home::Peer, Some("z".into()))
    );
    assert_eq!(
        is_networked(&mut a, "5590000001").await,
        (false, Home::None, None)
    );

    // BROKER-INFO publishes the network (signed).
    let info = match a.link.call(Request::BrokerInfo).await.unwrap() {
        ResponseData::BrokerInfo(i) => i.info,
        other => panic!("{other:?}"),
    };
    assert_eq!(info.network.name.as_deref(), Some("test-net"));
    let peers: Vec<(String, Vec<String>)> = info
        .network
        .peers
        .iter()
        .map(|p| {
            (
                p.id.clone(),
                p.prefixes.iter().map(|x| x.as_str().to_owned()).collect(),
            )
        })
        .collect();
    assert_eq!(
        peers,
        vec![
            ("y".to_owned(), vec!["556".to_owned()]),
            ("z".to_owned(), vec!["557".to_owned(), "558".to_owned()])
        ]
    );

    // -NETWORKED requests for numbers outside every peer's share are refused from
    // configuration alone.
    let (_sk, pk) = keypair();
    for target in ["5590000001", "5550000001"] {
        let err = initiate_networked(&mut a, &Number::new(target).unwrap(), pk, false)
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::NotNetworked), "{target}");
    }
    net.stop().await;
}

async fn networked_contact_setup_hands_over_a_sealed_address(backend: Backend) {
    let logs = capture_logs();
    let net = network(backend).await;
    let mut a = user(&net, X, "a").await;
    let mut b = user(&net, Y, "b").await;

    let (sk_a, pk_a) = keypair();
    let request = initiate_networked(&mut a, &number(&b), pk_a, false)
        .await
        .unwrap();
    let asked = expect_contact_request(&mut b).await;
    assert_eq!(asked.from.as_str(), a.info.number);
    assert_eq!(asked.kind, ContactKind::New);
    assert!(asked.networked);
    assert_eq!(asked.pubkey.map(|k| *k.as_bytes()), Some(pk_a));

    // An answer of the wrong shape is refused and does not consume the request.
    let bad = b
        .link
        .call(Request::ContactAnswer(ContactAnswerArgs {
            request: asked.request,
            answer: Answer::Accept {
                address: micromsg_wire::Address::new(B_ADDRESS).unwrap(),
            },
        }))
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Some(ErrorCode::BadArgs));

    let (pk_b, token_b) = accept_networked(&mut b, &asked, B_ADDRESS).await;
    let accepted = expect_accepted(&mut a).await;
    assert_eq!(accepted.request.as_bytes(), &request);
    assert_eq!(accepted.target, number(&b));
    assert!(
        accepted.address.is_none(),
        "no clear address across brokers"
    );
    assert_eq!(accepted.pubkey.map(|k| *k.as_bytes()), Some(pk_b));
    assert_eq!(
        accepted.token.as_bytes(),
        &token_b,
        "both sides hold one token"
    );
    let sealed = accepted.sealed_address.unwrap();
    assert_eq!(
        open_address(&sk_a, &pk_b, sealed.as_bytes()).as_deref(),
        Some(B_ADDRESS),
        "A opens B's address"
    );

    // Both home brokers hold the other side's pubkey, with an expiry.
    let now = micromsg_broker::clock::unix_now() as i64;
    let x_store = &net.broker(X).running.broker.store();
    let y_store = &net.broker(Y).running.broker.store();
    assert_eq!(
        x_store
            .peer_pubkey(&Number::new(b.info.number.clone()).unwrap(), now)
            .await
            .unwrap(),
        Some(pk_b)
    );
    assert_eq!(
        y_store
            .peer_pubkey(&Number::new(a.info.number.clone()).unwrap(), now)
            .await
            .unwrap(),
        Some(pk_a)
    );
    let ttl = net.config(X).federation.pubkey_ttl_secs as i64;
    assert_eq!(
        x_store
            .peer_pubkey(&Number::new(b.info.number.clone()).unwrap(), now + ttl + 1)
            .await
            .unwrap(),
        None,
        "expired pubkeys are not used"
    );
    // … and the sweep removes them once expired.
    let swept = x_store.sweep(now + ttl + 1).await.unwrap();
    assert!(swept.peer_pubkeys >= 1, "{swept:?}");
    // The pair is recorded on both brokers.
    assert!(
        x_store
            .is_contact(
                &Number::new(a.info.number.clone()).unwrap(),
                &Number::new(b.info.number.clone()).unwrap(),
            )
            .await
            .unwrap()
    );
    assert!(
        y_store
            .is_contact(
                &Number::new(b.info.number.clone()).unwrap(),
                &Number::new(a.info.number.clone()).unwrap(),
            )
            .await
            .unwrap()
    );

    // Later: INITIATE-EXISTING-NETWORKED between the pair works the same way.
    let (_sk2, pk_a2) = keypair();
    initiate_networked(&mut a, &number(&b), pk_a2, true)
        .await
        .unwrap();
    let again = expect_contact_request(&mut b).await;
    assert_eq!(again.kind, ContactKind::Existing);
    accept_networked(&mut b, &again, B_ADDRESS).await;
    expect_accepted(&mut a).await;

    // No broker ever had B's address in clear: not in a store, not in a log.
    for i in [X, Y] {
        assert_store_lacks(&net, i, B_ADDRESS.as_bytes()).await;
    }
    let text = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    assert!(
        text.contains("peer broker reachable"),
        "logs are being captured"
    );
    assert!(!text.contains(B_ADDRESS), "a broker logged B's address");
    net.stop().await;
}

async fn silent_drop_holds_across_brokers(backend: Backend) {
    let net = network(backend).await;
    let mut a = user(&net, X, "a").await;
    let mut blocker = user(&net, Y, "blocker").await;
    let mut decliner = user(&net, Y, "decliner").await;
    let offline = user(&net, Y, "offline").await;
    let offline_number = number(&offline);
    drop(offline);
    let mut stranger = user(&net, Z, "stranger").await;

    blocker
        .link
        .call(Request::Block(TargetArgs { target: number(&a) }))
        .await
        .unwrap();
    let (_sk, pk) = keypair();

    // Every case gets an acknowledgement with a fresh request id, then nothing.
    let unallocated = Number::new("5569999999").unwrap();
    let mut ids = Vec::new();
    for target in [&unallocated, &number(&blocker), &offline_number] {
        ids.push(initiate_networked(&mut a, target, pk, false).await.unwrap());
    }
    // EXISTING without a contact pair is dropped too, and the target hears nothing.
    ids.push(
        initiate_networked(&mut a, &number(&stranger), pk, true)
            .await
            .unwrap(),
    );
    // The decliner is asked, declines; the caller is blocked there and told nothing.
    ids.push(
        initiate_networked(&mut a, &number(&decliner), pk, false)
            .await
            .unwrap(),
    );
    let asked = expect_contact_request(&mut decliner).await;
    decliner
        .link
        .call(Request::ContactAnswer(ContactAnswerArgs {
            request: asked.request,
            answer: Answer::Decline,
        }))
        .await
        .unwrap();
    let blocked = match decliner.link.call(Request::BlockList).await.unwrap() {
        ResponseData::BlockList(l) => l.numbers,
        other => panic!("{other:?}"),
    };
    assert_eq!(blocked, vec![number(&a)]);

    let distinct: std::collections::HashSet<_> = ids.iter().collect();
    assert_eq!(distinct.len(), ids.len(), "fresh random ids every time");
    no_event_within(&mut a, Duration::from_secs(3)).await;
    no_event_within(&mut blocker, Duration::from_millis(200)).await;
    no_event_within(&mut stranger, Duration::from_millis(200)).await;

    // The requests did reach the target brokers (the silence is theirs, not a lost call).
    let received = |i: usize| {
        net.broker(i)
            .running
            .broker
            .federation()
            .unwrap()
            .counters
            .initiates_received
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    assert_eq!(received(Y), 4);
    assert_eq!(received(Z), 1);

    // A later INITIATE from the declined caller is dropped as well.
    initiate_networked(&mut a, &number(&decliner), pk, false)
        .await
        .unwrap();
    no_event_within(&mut decliner, Duration::from_secs(2)).await;
    net.stop().await;
}

async fn offline_deposits_cross_brokers_once(backend: Backend) {
    let net = network(backend).await;
    let mut a = user(&net, X, "a").await;
    let mut b = user(&net, Y, "b").await;
    networked_pair(&mut a, &mut b).await;

    // A → B: acknowledged at once by x, delivered to y's inbox.
    for i in 0..5 {
        let answer = deposit(&mut a, &number(&b), message_id(1, i), &[i as u8; 100]).await;
        assert!(matches!(answer, ResponseData::Deposit(_)), "{answer:?}");
    }
    // A client retry of the same message is idempotent end to end.
    deposit(&mut a, &number(&b), message_id(1, 0), &[0u8; 100]).await;
    let mut got = fetch_until(&mut b, 5, Duration::from_secs(15)).await;
    assert_eq!(got.len(), 5);
    // Cross-broker deliveries keep no order (the client orders by envelope counters).
    got.sort_by_key(|m| *m.id.as_bytes());
    for (i, m) in got.iter().enumerate() {
        assert_eq!(m.id.as_bytes(), &message_id(1, i as u32));
        assert_eq!(m.from, number(&a));
        assert_eq!(m.body.as_bytes(), &[i as u8; 100][..]);
    }
    // B → A, the other way.
    deposit(&mut b, &number(&a), message_id(2, 0), b"back").await;
    let got = fetch_until(&mut a, 1, Duration::from_secs(15)).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].body.as_bytes(), b"back");

    // No contact pair, no deposit (decided at the sender's broker).
    let c = user(&net, Z, "c").await;
    let err = a
        .link
        .call(Request::Deposit(DepositArgs {
            target: number(&c),
            id: Hex16::from_bytes(message_id(3, 0)),
            body: Blob::new(b"x".to_vec()),
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotFound));

    // B blocks A: A's deposits are still acknowledged, and never arrive.
    b.link
        .call(Request::Block(TargetArgs { target: number(&a) }))
        .await
        .unwrap();
    deposit(&mut a, &number(&b), message_id(4, 0), b"blocked").await;
    wait_outbox_empty(&net, X).await;
    assert_eq!(fetch_all(&mut b).await.len(), 5);
    net.stop().await;
}

async fn outbox_loses_nothing_when_brokers_restart(backend: Backend) {
    let mut net = network(backend).await;
    let mut a = user(&net, X, "a").await;
    let mut b = user(&net, Y, "b").await;
    networked_pair(&mut a, &mut b).await;
    let to_b = number(&b);
    drop(b);
    let body = |i: u32| format!("message {i}").into_bytes();

    // 1. y is down: x acknowledges every deposit and keeps it in its durable outbox.
    net.stop_broker(Y).await;
    for i in 0..40 {
        let answer = deposit(&mut a, &to_b, message_id(5, i), &body(i)).await;
        assert!(matches!(answer, ResponseData::Deposit(_)), "{answer:?}");
    }
    let x = &net.broker(X).running.broker;
    assert_eq!(x.store().outbox_depth().await.unwrap(), 40);
    let admin = net.broker(X).running.admin_addr.unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let status = micromsg_broker::admin::fetch_status(&admin).await.unwrap();
        let y = status.peers.iter().find(|p| p.broker_id == "y").unwrap();
        if !y.reachable {
            assert_eq!(y.outbox_depth, 40, "status counts the outbox per peer");
            assert!(!y.last_error.is_empty());
            break;
        }
        assert!(
            Instant::now() < deadline,
            "status never showed y unreachable"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Contact requests to y's numbers are refused up front while the link is down.
    let (_sk, pk) = keypair();
    let err = initiate_networked(&mut a, &to_b, pk, true)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::PeerUnavailable));

    // 2. y comes back: the outbox drains.
    net.start_broker(Y).await;
    wait_outbox_empty(&net, X).await;

    // 3. y stops while a burst of deliveries is in flight, then comes back.
    for i in 40..240 {
        deposit(&mut a, &to_b, message_id(5, i), &body(i)).await;
    }
    net.stop_broker(Y).await;
    net.start_broker(Y).await;

    // 4. x stops with deliveries still queued, then comes back and resumes from its outbox.
    for i in 240..300 {
        deposit(&mut a, &to_b, message_id(5, i), &body(i)).await;
    }
    drop(a);
    net.stop_broker(X).await;
    net.start_broker(X).await;
    wait_outbox_empty(&net, X).await;

    // Nothing lost, nothing twice.
    let mut b = relogin(&net, Y, "b").await;
    let got = fetch_until(&mut b, 300, Duration::from_secs(60)).await;
    assert_eq!(got.len(), 300, "every message arrives exactly once");
    let ids: std::collections::HashSet<[u8; 16]> = got.iter().map(|m| *m.id.as_bytes()).collect();
    assert_eq!(ids.len(), 300);
    for m in &got {
        let i = u32::from_be_bytes(m.id.as_bytes()[12..].try_into().unwrap());
        assert_eq!(m.body.as_bytes(), body(i).as_slice());
    }
    net.stop().await;
}

/// Committed outbox rows reach the worker in memory through a bounded channel; when it is full
/// they stay in the table, which the worker reads when told to (not on its hourly poll here), and
/// after a restart it reads everything back: nothing lost, nothing twice.
async fn outbox_handoff_overflows_into_the_table(backend: Backend) {
    // One-item batches, one in flight: the worker holds 2 rows per peer and the channel 4.
    let mut net = TestNetwork::start(backend, BROKERS, |_, config| {
        config.federation.outbox_batch = 1;
        config.federation.outbox_batches_in_flight = 1;
        config.federation.outbox_poll_ms = 3_600_000;
    })
    .await;
    net.wait_linked().await;
    let mut a = user(&net, X, "a").await;
    let mut b = user(&net, Y, "b").await;
    networked_pair(&mut a, &mut b).await;
    let to_b = number(&b);
    drop(b);
    let body = |i: u32| format!("handed {i}").into_bytes();

    // y is down: far more deposits than the worker and its channel hold.
    net.stop_broker(Y).await;
    for i in 0..30 {
        let answer = deposit(&mut a, &to_b, message_id(6, i), &body(i)).await;
        assert!(matches!(answer, ResponseData::Deposit(_)), "{answer:?}");
    }
    // y comes back: the rows the channel could not take are read from the table.
    net.start_broker(Y).await;
    wait_outbox_empty(&net, X).await;

    // Again, and this time x restarts with rows in memory and in the table.
    net.stop_broker(Y).await;
    for i in 30..60 {
        deposit(&mut a, &to_b, message_id(6, i), &body(i)).await;
    }
    drop(a);
    net.stop_broker(X).await;
    net.start_broker(X).await;
    net.start_broker(Y).await;
    wait_outbox_empty(&net, X).await;

    let mut b = relogin(&net, Y, "b").await;
    let got = fetch_until(&mut b, 60, Duration::from_secs(60)).await;
    let ids: std::collections::HashSet<[u8; 16]> = got.iter().map(|m| *m.id.as_bytes()).collect();
    assert_eq!((got.len(), ids.len()), (60, 60), "every message once");
    for m in &got {
        let i = u32::from_be_bytes(m.id.as_bytes()[12..].try_into().unwrap());
        assert_eq!(m.body.as_bytes(), body(i).as_slice());
    }
    net.stop().await;
}

/// A peer marked unreachable is tried once more when a `-NETWORKED` request needs it: while
/// it is down the request gets PEER-UNAVAILABLE, and as soon as it is back the request goes
/// through, long before the next probe (an hour away here).
async fn a_peer_back_before_the_next_probe_is_used_at_once(backend: Backend) {
    let mut net = TestNetwork::start(backend, BROKERS, |_, c| {
        c.federation.probe_interval_secs = 3600;
    })
    .await;
    // No waiting for the links: a broker that probed its peer before the peer listened has it
    // marked down for the hour until its next probe, and a request must still go through.
    let mut a = user(&net, X, "a").await;
    let b = user(&net, Y, "b").await;
    let to_b = number(&b);
    drop(b);
    let (_sk, pk) = keypair();
    initiate_networked(&mut a, &to_b, pk, false)
        .await
        .expect("a peer probed too early at start-up is tried again");
    net.stop_broker(Y).await;
    // The forward behind a request fails and marks y down at x (or the first request's
    // forward, still in flight when y stopped, already did: then it is refused). A request
    // that raced y's stop may not have marked it (seen once in CI under load, cause not
    // found), so while y still shows as reachable another goes out each second (well under
    // the 30 INITIATEs a minute an entity may make).
    let admin = net.broker(X).running.admin_addr.unwrap().to_string();
    let mut next_request = tokio::time::Instant::now();
    micromsg_tests::wait::eventually("x to mark y down", Duration::from_secs(15), async || {
        let status = micromsg_broker::admin::fetch_status(&admin).await.unwrap();
        let down = !status
            .peers
            .iter()
            .any(|p| p.broker_id == "y" && p.reachable);
        if !down && tokio::time::Instant::now() >= next_request {
            next_request = tokio::time::Instant::now() + Duration::from_secs(1);
            let _ = initiate_networked(&mut a, &to_b, pk, false).await;
        }
        down
    })
    .await;
    // Down, and still down when tried again: refused up front.
    let err = initiate_networked(&mut a, &to_b, pk, false)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::PeerUnavailable));
    // Back: the next request tries it, finds it, and goes through.
    net.start_broker(Y).await;
    initiate_networked(&mut a, &to_b, pk, false)
        .await
        .expect("y is back: the request is not refused until the next probe");
    net.stop().await;
}

async fn status_shows_the_peers(backend: Backend) {
    let net = network(backend).await;
    let admin = net.broker(X).running.admin_addr.unwrap().to_string();
    let status = micromsg_broker::admin::fetch_status(&admin).await.unwrap();
    assert_eq!(status.broker_id, "x");
    assert_eq!(status.network, "test-net");
    assert_eq!(status.prefixes, vec!["555"]);
    let expected_backend = match backend {
        Backend::Sqlite => "sqlite",
        Backend::Postgres => "postgres",
    };
    assert_eq!(status.store_backend, expected_backend);
    assert!(status.store_ok);
    let peers: Vec<(&str, bool)> = status
        .peers
        .iter()
        .map(|p| (p.broker_id.as_str(), p.reachable))
        .collect();
    assert_eq!(peers, vec![("y", true), ("z", true)]);
    assert_eq!(status.peers[0].endpoint, net.endpoints[Y]);

    let text = micromsg_broker::admin::render_text(&status);
    assert!(text.contains("network   test-net"), "{text}");
    assert!(text.contains("reachable"), "{text}");
    assert!(text.contains("since up  "), "{text}");
    let json = micromsg_broker::admin::render_json(&status);
    assert_eq!(json["peers"][1]["broker_id"], "z");
    let counters = status
        .federation
        .as_ref()
        .expect("a networked broker reports its federation counters");
    assert_eq!(json["federation"]["received"], counters.received);
    assert_eq!(json["federation"]["delivered"], counters.delivered);

    // Standard health checking and reflection, for any gRPC tool.
    assert!(
        micromsg_broker::admin::check_health(&admin, "")
            .await
            .unwrap()
    );
    assert!(
        micromsg_broker::admin::check_health(&admin, "micromsg.admin.v1.Admin")
            .await
            .unwrap()
    );
    let services = micromsg_broker::admin::reflected_services(&admin)
        .await
        .unwrap();
    for s in ["micromsg.admin.v1.Admin", "grpc.health.v1.Health"] {
        assert!(services.iter().any(|x| x == s), "{s} in {services:?}");
    }
    // Only what this port serves: the federation service is on the federation port.
    assert!(
        !services.iter().any(|x| x.contains("federation")),
        "{services:?}"
    );
    net.stop().await;
}

// ---------------------------------------------------------------------------------------------

async fn wait_outbox_empty(net: &TestNetwork, i: usize) {
    let store = &net.broker(i).running.broker.store();
    let deadline = Instant::now() + Duration::from_secs(30);
    while store.outbox_depth().await.unwrap() > 0 {
        assert!(Instant::now() < deadline, "outbox did not drain");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Fails if broker `i`'s store holds `needle` anywhere (SQLite: the database and WAL files;
/// Postgres: every row of every table, as text, and as hex for binary columns).
async fn assert_store_lacks(net: &TestNetwork, i: usize, needle: &[u8]) {
    match net.backend {
        Backend::Sqlite => {
            let dir = net.broker(i).dir.path().join("data");
            for name in ["micromsg.db", "micromsg.db-wal"] {
                let Ok(bytes) = std::fs::read(dir.join(name)) else {
                    continue;
                };
                assert!(
                    !bytes.windows(needle.len()).any(|w| w == needle),
                    "{name} of broker {i} holds the address"
                );
            }
        }
        Backend::Postgres => {
            use sqlx::Connection;
            let url = net.config(i).database.url.clone().unwrap();
            let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
            let tables: Vec<String> = sqlx::query_scalar(
                "SELECT table_name::text FROM information_schema.tables \
                 WHERE table_schema = 'public'",
            )
            .fetch_all(&mut conn)
            .await
            .unwrap();
            let hex: String = needle.iter().map(|b| format!("{b:02x}")).collect();
            let text = String::from_utf8_lossy(needle).into_owned();
            for table in tables {
                let rows: Vec<String> =
                    sqlx::query_scalar(&format!("SELECT t::text FROM \"{table}\" t"))
                        .fetch_all(&mut conn)
                        .await
                        .unwrap();
                for row in rows {
                    assert!(
                        !row.contains(&text) && !row.contains(&hex),
                        "table {table} of broker {i} holds the address"
                    );
                }
            }
        }
    }
}

/// Every log line of this process, at trace level for the broker (installed once).
fn capture_logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&buffer);
        let _ = micromsg_broker::telemetry::init_with_writer(
            LogFormat::Text,
            "debug,micromsg_broker=trace,micromsg_client=trace,h2=info,hyper=info,tower=info",
            false,
            move || Sink(Arc::clone(&sink)),
        );
        buffer
    })
    .clone()
}

struct Sink(Arc<Mutex<Vec<u8>>>);

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Mutual TLS refusals (SQLite only: the store plays no part).

/// `counter` once it reaches `want`, or its value after 5 s. The server counts a refusal after
/// its alert went out, so the refused client can see the refusal before the count moves.
async fn counted(counter: &std::sync::atomic::AtomicU64, want: u64) -> u64 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let n = counter.load(std::sync::atomic::Ordering::Relaxed);
        if n >= want || tokio::time::Instant::now() >= deadline {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_refuses_unknown_ca_expired_and_wrong_id() {
    let net = TestNetwork::start(Backend::Sqlite, &BROKERS[..2], |_, _| {}).await;
    net.wait_linked().await;
    let y = net.broker(Y);
    let refusals = y.running.federation_refusals.clone().unwrap();
    let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
    let extra = net.dir.path().join("extra");
    let ca = net.dir.path().join("network").join("ca.pem");

    // Calls y's endpoint as broker `id_claimed` would, expecting the server to be `expect`.
    let ping = |cert: std::path::PathBuf,
                key: std::path::PathBuf,
                trust: std::path::PathBuf,
                expect: &str| {
        let entry = BrokerEntry {
            id: expect.to_owned(),
            endpoint: net.endpoints[Y].clone(),
            prefixes: vec!["556".into()],
        };
        async move {
            let tls = MtlsConfig::from_files(&trust, &cert, &key).unwrap();
            let link = PeerLink::new(entry, tls.client, Duration::from_secs(2), 1 << 20);
            let mut client = link.client();
            tokio::time::timeout(Duration::from_secs(10), client.ping(PingRequest {}))
                .await
                .expect("a refusal is quick")
                .map(|r| r.into_inner().broker_id)
        }
    };

    // Positive control: a fresh certificate for x from the network CA works.
    let (cert, key) = net.issue_cert("x-again", "x", 30);
    assert_eq!(
        ping(cert.clone(), key.clone(), ca.clone(), "y")
            .await
            .unwrap(),
        "y"
    );
    let accepted = load(&refusals.accepted);

    // Unknown CA: a certificate for x from another CA.
    let rogue = micromsg_broker::tls::Authority::generate("rogue CA").unwrap();
    let (rcert, rkey) = micromsg_tests::issue_cert_with(&rogue, &extra, "rogue-x", "x", 30);
    let before = load(&refusals.handshake_failures);
    assert!(ping(rcert, rkey, ca.clone(), "y").await.is_err());
    assert_eq!(
        counted(&refusals.handshake_failures, before + 1).await,
        before + 1,
        "unknown CA refused"
    );

    // Expired: the network CA's certificate for x, expired yesterday.
    let (ecert, ekey) = net.issue_cert("expired-x", "x", -1);
    let before = load(&refusals.handshake_failures);
    assert!(ping(ecert, ekey, ca.clone(), "y").await.is_err());
    assert_eq!(
        counted(&refusals.handshake_failures, before + 1).await,
        before + 1,
        "expired refused"
    );

    // Wrong id (client side): a valid network certificate for an id not in the network file.
    let (icert, ikey) = net.issue_cert("intruder", "intruder", 30);
    let before = load(&refusals.unknown_ids);
    assert!(ping(icert, ikey, ca.clone(), "y").await.is_err());
    assert_eq!(
        counted(&refusals.unknown_ids, before + 1).await,
        before + 1,
        "unknown id refused"
    );

    // Wrong id (server side): whoever answers at y's endpoint is not "z", so a broker that
    // meant to reach z refuses the connection.
    assert!(ping(cert, key, ca, "z").await.is_err());

    assert_eq!(
        load(&refusals.accepted),
        accepted,
        "no refused peer got through"
    );
    net.stop().await;
}

// ---------------------------------------------------------------------------------------------
// The real binary: `network init`, two `serve` processes, `status` (text and JSON).

use crate::broker_binary;

/// Kills the child when the test ends, however it ends.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A broker whose federation port is taken stops with an error naming the port, and never says
/// it listens for clients first (scripts wait for that line before using the broker).
#[test]
fn serve_with_its_federation_port_taken_stops_before_claiming_to_listen() {
    use std::process::Command;
    let bin = broker_binary();
    let dir = tempfile::tempdir().unwrap();
    let net = dir.path().join("net");
    let taken = micromsg_tests::free_port();
    // The broker binds its federation port on every address.
    let _holder = std::net::TcpListener::bind(("0.0.0.0", taken)).unwrap();
    let init = Command::new(&bin)
        .args(["network", "init", "--out"])
        .arg(&net)
        .args(["--broker", "x=555", "--broker", "y=556"])
        .args(["--endpoint", &format!("x=127.0.0.1:{taken}")])
        .args([
            "--endpoint",
            &format!("y=127.0.0.1:{}", micromsg_tests::free_port()),
        ])
        .output()
        .unwrap();
    assert!(init.status.success(), "{init:?}");
    let served = Command::new(&bin)
        .args(["serve", "--broker-id", "x", "--network"])
        .arg(net.join("network.toml"))
        .arg("--data-dir")
        .arg(dir.path().join("data-x"))
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .env("MICROMSG_LOG", "info")
        .env_remove("RUST_BACKTRACE")
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&served.stderr);
    assert!(!served.status.success(), "{said}");
    assert!(
        said.contains(&format!("binding the federation listener 0.0.0.0:{taken}")),
        "{said}"
    );
    // The cause once, under the context, not repeated in it.
    assert_eq!(said.matches("Address already in use").count(), 1, "{said}");
    assert!(!said.contains("listening for clients"), "{said}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_network_init_serve_and_status() {
    use std::process::{Command, Stdio};
    let bin = broker_binary();
    let dir = tempfile::tempdir().unwrap();
    let net = dir.path().join("net");
    let (fx, fy, ax, ay) = (
        micromsg_tests::free_port(),
        micromsg_tests::free_port(),
        micromsg_tests::free_port(),
        micromsg_tests::free_port(),
    );
    let init = Command::new(&bin)
        .arg("network")
        .arg("init")
        .arg("--out")
        .arg(&net)
        .args([
            "--broker",
            "x=555",
            "--broker",
            "y=556,557",
            "--name",
            "cli-net",
        ])
        .args(["--endpoint", &format!("x=127.0.0.1:{fx}")])
        .args(["--endpoint", &format!("y=127.0.0.1:{fy}")])
        .output()
        .unwrap();
    assert!(init.status.success(), "{init:?}");
    for f in [
        "ca.pem",
        "ca.key",
        "x.pem",
        "x.key",
        "y.pem",
        "y.key",
        "network.toml",
    ] {
        assert!(net.join(f).exists(), "{f}");
    }
    let network =
        micromsg_broker::federation::network::Network::load(&net.join("network.toml")).unwrap();
    assert_eq!(network.name, "cli-net");
    assert_eq!(network.broker("y").unwrap().prefixes, vec!["556", "557"]);

    let serve = |id: &str, admin: u16| {
        Command::new(&bin)
            .args(["serve", "--broker-id", id, "--network"])
            .arg(net.join("network.toml"))
            .arg("--data-dir")
            .arg(dir.path().join(format!("data-{id}")))
            .args(["--listen", "127.0.0.1:0"])
            .args(["--admin-listen", &format!("127.0.0.1:{admin}")])
            .env("MICROMSG_FEDERATION_PROBE_INTERVAL_SECS", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map(Child)
            .unwrap()
    };
    let _x = serve("x", ax);
    let _y = serve("y", ay);

    let status = |json: bool| {
        let mut cmd = Command::new(&bin);
        cmd.args(["status", "--admin", &format!("127.0.0.1:{ax}")]);
        if json {
            cmd.arg("--json");
        }
        cmd.output().unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let json = loop {
        let out = status(true);
        if out.status.success() {
            let text = String::from_utf8(out.stdout.clone()).unwrap();
            if text.contains("\"reachable\": true") {
                break text;
            }
        }
        assert!(
            Instant::now() < deadline,
            "x never saw y reachable: {out:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    for field in [
        "\"broker_id\": \"x\"",
        "\"network\": \"cli-net\"",
        "\"store_backend\": \"sqlite\"",
        "\"broker_id\": \"y\"",
        &format!("\"endpoint\": \"127.0.0.1:{fy}\""),
        "\"outbox_depth\": 0",
    ] {
        assert!(json.contains(field), "{field} in {json}");
    }
    let text = String::from_utf8(status(false).stdout).unwrap();
    assert!(text.contains("network   cli-net"), "{text}");
    assert!(text.contains("reachable"), "{text}");
    // A wrong address is an error, not a hang.
    let down = Command::new(&bin)
        .args([
            "status",
            "--admin",
            &format!("127.0.0.1:{}", micromsg_tests::free_port()),
        ])
        .output()
        .unwrap();
    assert!(!down.status.success());
}

// ---------------------------------------------------------------------------------------------
// OpenTelemetry: two broker processes export to a stand-in OTLP collector.

mod collector {
    use std::sync::{Arc, Mutex};

    use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
        MetricsService, MetricsServiceServer,
    };
    use opentelemetry_proto::tonic::collector::metrics::v1::{
        ExportMetricsServiceRequest, ExportMetricsServiceResponse,
    };
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
        TraceService, TraceServiceServer,
    };
    use opentelemetry_proto::tonic::collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
    };

    /// A received span: service name, trace id, span name.
    pub(super) type Span = (String, Vec<u8>, String);

    /// What the collector received: spans as (service name, trace id, span name), and the
    /// names of the services that exported metrics.
    #[derive(Default, Clone)]
    pub(super) struct Received {
        pub(super) spans: Arc<Mutex<Vec<Span>>>,
        pub(super) metric_services: Arc<Mutex<Vec<String>>>,
    }

    fn service_name(
        resource: Option<&opentelemetry_proto::tonic::resource::v1::Resource>,
    ) -> String {
        use opentelemetry_proto::tonic::common::v1::any_value::Value;
        resource
            .into_iter()
            .flat_map(|r| &r.attributes)
            .find(|kv| kv.key == "service.name")
            .and_then(|kv| kv.value.as_ref()?.value.as_ref())
            .map(|v| match v {
                Value::StringValue(s) => s.clone(),
                other => format!("{other:?}"),
            })
            .unwrap_or_default()
    }

    #[tonic::async_trait]
    impl TraceService for Received {
        async fn export(
            &self,
            request: tonic::Request<ExportTraceServiceRequest>,
        ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
            let mut spans = self.spans.lock().unwrap();
            for rs in request.into_inner().resource_spans {
                let service = service_name(rs.resource.as_ref());
                for ss in rs.scope_spans {
                    for span in ss.spans {
                        spans.push((service.clone(), span.trace_id, span.name));
                    }
                }
            }
            Ok(tonic::Response::new(ExportTraceServiceResponse {
                partial_success: None,
            }))
        }
    }

    #[tonic::async_trait]
    impl MetricsService for Received {
        async fn export(
            &self,
            request: tonic::Request<ExportMetricsServiceRequest>,
        ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
            let mut services = self.metric_services.lock().unwrap();
            for rm in request.into_inner().resource_metrics {
                services.push(service_name(rm.resource.as_ref()));
            }
            Ok(tonic::Response::new(ExportMetricsServiceResponse {
                partial_success: None,
            }))
        }
    }

    /// Serves OTLP/gRPC on a loopback port; returns its `http://` endpoint.
    pub(super) async fn start(received: Received) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(received.clone()))
                .add_service(MetricsServiceServer::new(received))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        format!("http://{addr}")
    }
}

/// Two `micromsg-broker serve` processes with `OTEL_EXPORTER_OTLP_ENDPOINT` set: a networked
/// contact setup between their users is one trace, with spans from both brokers, and both
/// export metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_export_one_trace_across_brokers() {
    use std::process::{Command, Stdio};

    use micromsg_client::agent::AcceptPolicy;
    use micromsg_tests::agents;

    let received = collector::Received::default();
    let endpoint = collector::start(received.clone()).await;
    let bin = broker_binary();
    let dir = tempfile::tempdir().unwrap();
    let net = dir.path().join("net");
    let (fx, fy) = (micromsg_tests::free_port(), micromsg_tests::free_port());
    let (cx, cy) = (micromsg_tests::free_port(), micromsg_tests::free_port());
    let init = Command::new(&bin)
        .args(["network", "init", "--out"])
        .arg(&net)
        .args(["--broker", "x=555", "--broker", "y=556"])
        .args(["--endpoint", &format!("x=127.0.0.1:{fx}")])
        .args(["--endpoint", &format!("y=127.0.0.1:{fy}")])
        .output()
        .unwrap();
    assert!(init.status.success(), "{init:?}");
    let serve = |id: &str, client_port: u16| {
        Command::new(&bin)
            .args(["serve", "--broker-id", id, "--network"])
            .arg(net.join("network.toml"))
            .arg("--data-dir")
            .arg(dir.path().join(format!("data-{id}")))
            .args(["--listen", &format!("127.0.0.1:{client_port}")])
            .args(["--admin-listen", "127.0.0.1:0"])
            .env("MICROMSG_FEDERATION_PROBE_INTERVAL_SECS", "1")
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)
            .env("OTEL_SERVICE_NAME", format!("broker-{id}"))
            .env("OTEL_BSP_SCHEDULE_DELAY", "200")
            .env("OTEL_METRIC_EXPORT_INTERVAL", "500")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map(Child)
            .unwrap()
    };
    let _x = serve("x", cx);
    let _y = serve("y", cy);
    let (ca_x, ca_y) = (
        dir.path().join("data-x/tls/ca.pem"),
        dir.path().join("data-y/tls/ca.pem"),
    );
    let register = |port: u16, ca: std::path::PathBuf, name: &'static str| {
        let profile = Profile::new(dir.path().join(name));
        async move {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                match account::register(&profile, &format!("127.0.0.1:{port}"), &ca, None).await {
                    Ok(s) => {
                        break agents::Device {
                            profile,
                            number: s.info.number,
                        };
                    }
                    Err(e) => {
                        assert!(Instant::now() < deadline, "broker on {port}: {e}");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
        }
    };
    let a = register(cx, ca_x, "a").await;
    let b = register(cy, ca_y, "b").await;
    let (b_agent, _b_rx) = agents::online(&b, agents::config(AcceptPolicy::Any)).await;
    let (a_agent, _a_rx) = agents::online(&a, agents::config(AcceptPolicy::Any)).await;
    // The brokers probe each other every second; retry until they are linked.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let reply = agents::contact_add(&a_agent, &b.number).await;
        if reply.ok {
            break;
        }
        assert!(Instant::now() < deadline, "{reply:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // Some trace holds spans of both brokers: the networked setup crossed the link in one trace.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let shared = {
            let spans = received.spans.lock().unwrap();
            spans.iter().any(|(service, trace, _)| {
                service == "broker-x" && spans.iter().any(|(s, t, _)| s == "broker-y" && t == trace)
            })
        };
        let metrics = {
            let m = received.metric_services.lock().unwrap();
            m.iter().any(|s| s == "broker-x") && m.iter().any(|s| s == "broker-y")
        };
        if shared && metrics {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no trace spans both brokers (metrics from both: {metrics}); spans: {:?}",
            received
                .spans
                .lock()
                .unwrap()
                .iter()
                .map(|(s, _, n)| format!("{s}:{n}"))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    a_agent.stop().await.unwrap();
    b_agent.stop().await.unwrap();
}
