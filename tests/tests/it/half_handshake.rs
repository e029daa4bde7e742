//! A P2P handshake cut off half-way (the peer killed, or the connection lost, around FINISH)
//! leaves the new session's keys on one side only (protocol.md 12.3, key confirmation). The
//! side that has them must not seal offline messages with them until the peer proves it holds
//! them too: deposits it made with them would wait at the peer, which cannot open them, until
//! they expire.
//!
//! Here B's device is played by hand (its real profile, its real keys, the real broker): it
//! runs the handshake with A's real agent up to the cut, then vanishes the way a SIGKILLed
//! `listen` does, before it could store anything. Deterministic: the cut is at a chosen frame.

use std::time::Duration;

use micromsg_client::account::{self, Session};
use micromsg_client::agent::{AcceptPolicy, Notice};
use micromsg_client::store::Store;
use micromsg_crypto::Secret32;
use micromsg_crypto::handshake::{Initiator, Responder};
use micromsg_crypto::identity::IdentityKey;
use micromsg_tests::agents::{self, Device, expect, message_from, register, session_started};
use micromsg_tests::{Backend, TestBroker};
use micromsg_wire::io::{FrameReader, write_frame};
use micromsg_wire::message::request::{ContactPolicyArgs, TargetArgs};
use micromsg_wire::{Address, Event, Number, Request};
use rand_core::OsRng;
use tokio::net::{TcpListener, TcpStream};

const WAIT: Duration = Duration::from_secs(20);

/// A and B with a first session (confirmed on both sides: both agents were online), then B's
/// agent stopped. A's agent stays online.
async fn contacts_then_b_offline(
    broker: &TestBroker,
) -> (
    Device,
    Device,
    micromsg_client::agent::AgentHandle,
    tokio::sync::mpsc::Receiver<Notice>,
) {
    let a = register(broker, "a").await;
    let b = register(broker, "b").await;
    let (b_agent, mut b_rx) = agents::online(&b, agents::config(AcceptPolicy::Any)).await;
    let (a_agent, mut a_rx) = agents::online(&a, agents::config(AcceptPolicy::Any)).await;
    let reply = agents::contact_add(&a_agent, &b.number).await;
    assert!(reply.ok, "{reply:?}");
    session_started(&mut a_rx, &b.number).await;
    session_started(&mut b_rx, &a.number).await;
    // Something both ways, so the first session is confirmed whatever the timing.
    assert!(agents::send(&a_agent, &b.number, "hello").await.ok);
    assert_eq!(message_from(&mut b_rx, &a.number).await.0, "hello");
    b_agent.stop().await.unwrap();
    agents::session_ended(&mut a_rx, &b.number).await;
    (a, b, a_agent, a_rx)
}

/// B's device, logged in by hand, and its identity key.
async fn b_by_hand(b: &Device) -> (Session, IdentityKey) {
    let session = account::connect(&b.profile).await.unwrap();
    let secrets = b.profile.secrets().unwrap();
    (session, IdentityKey::from_seed(&secrets.identity_seed))
}

/// The next event of `want`'s kind on B's hand-driven link, skipping the others.
async fn next_event<T>(session: &mut Session, mut want: impl FnMut(Event) -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let event = tokio::time::timeout_at(deadline, session.link.next_event())
            .await
            .expect("no such event in time")
            .unwrap();
        if let Some(t) = want(event) {
            return t;
        }
    }
}

/// B comes back (its real agent) and must get each of `texts` from A once, and be left with
/// nothing it cannot open.
async fn b_gets_everything(b: &Device, a: &Device, texts: &[&str]) {
    let (_b_agent, mut b_rx) = agents::online(b, agents::config(AcceptPolicy::Any)).await;
    let mut got = Vec::new();
    while !texts.iter().all(|t| got.iter().any(|g| g == t)) {
        got.push(message_from(&mut b_rx, &a.number).await.0);
    }
    for t in texts {
        assert_eq!(
            got.iter().filter(|g| g == t).count(),
            1,
            "{t:?} once: {got:?}"
        );
    }
    let state = Store::new(&b.profile).inbox_state().unwrap();
    assert!(
        state.pending.is_empty(),
        "items B cannot open: {:?}",
        state.pending
    );
}

/// A's agent answers B's INITIATE-EXISTING and completes the handshake as responder when
/// FINISH arrives; B is gone before it stored the session (SIGKILL right after FINISH).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b_killed_after_its_finish_leaves_a_sealing_with_the_session_b_holds() {
    let broker = TestBroker::start(Backend::Sqlite, |_| {}).await;
    let (a, b, a_agent, mut a_rx) = contacts_then_b_offline(&broker).await;

    let (mut by_hand, b_id) = b_by_hand(&b).await;
    by_hand
        .link
        .call(Request::InitiateExisting(TargetArgs {
            target: Number::new(a.number.clone()).unwrap(),
        }))
        .await
        .unwrap();
    let accepted = next_event(&mut by_hand, |e| match e {
        Event::ContactAccepted(c) => Some(c),
        _ => None,
    })
    .await;
    let address = accepted.address.unwrap();
    let token = Secret32::from_bytes(*accepted.token.as_bytes());
    let stream = TcpStream::connect(address.as_str()).await.unwrap();
    let (read, mut write) = stream.into_split();
    let mut reader = FrameReader::new(read, micromsg_client::p2p::DEFAULT_MAX_FRAME_LEN);
    let (state, init) = Initiator::new(&mut OsRng, &b_id, &token);
    write_frame(&mut write, &init).await.unwrap();
    let accept = reader.next_frame().await.unwrap().unwrap();
    let outcome = state.handle_accept(&accept).unwrap();
    write_frame(&mut write, &outcome.finish).await.unwrap();
    // A completes the handshake and stores the session (before it reports it).
    session_started(&mut a_rx, &b.number).await;
    // B is killed: nothing of this session was stored on its side.
    drop((reader, write, by_hand));
    agents::session_ended(&mut a_rx, &b.number).await;

    let reply = agents::send(&a_agent, &b.number, "after the cut").await;
    assert!(reply.ok, "{reply:?}");
    b_gets_everything(&b, &a, &["after the cut"]).await;
    broker.stop().await;
}

/// A's agent asks B for a session and completes the handshake as initiator (it sends FINISH
/// and has the keys); B is killed before it could verify FINISH or store anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b_killed_before_it_stored_a_finish_leaves_a_sealing_with_the_session_b_holds() {
    let broker = TestBroker::start(Backend::Sqlite, |_| {}).await;
    let (a, b, a_agent, mut a_rx) = contacts_then_b_offline(&broker).await;

    // B's device is logged in and announces where it listens; A's next message to it asks
    // for a session (INITIATE-EXISTING, answered by the broker: AUTO-EXISTING).
    let (mut by_hand, b_id) = b_by_hand(&b).await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    by_hand
        .link
        .call(Request::ContactPolicy(ContactPolicyArgs {
            auto_existing: true,
            address: Some(Address::new(format!("127.0.0.1:{port}")).unwrap()),
        }))
        .await
        .unwrap();
    let reply = agents::send(&a_agent, &b.number, "before the cut").await;
    assert!(reply.ok, "{reply:?}");
    let connecting = next_event(&mut by_hand, |e| match e {
        Event::ContactConnecting(c) => Some(c),
        _ => None,
    })
    .await;
    let token = Secret32::from_bytes(*connecting.token.as_bytes());
    let (stream, _) = tokio::time::timeout(WAIT, listener.accept())
        .await
        .unwrap()
        .unwrap();
    let (read, mut write) = stream.into_split();
    let mut reader = FrameReader::new(read, micromsg_client::p2p::DEFAULT_MAX_FRAME_LEN);
    let init = reader.next_frame().await.unwrap().unwrap();
    let (state, accept) =
        Responder::handle_init(&mut OsRng, &b_id, &init, |_| Some(token.clone())).unwrap();
    write_frame(&mut write, &accept).await.unwrap();
    let finish = reader.next_frame().await.unwrap().unwrap();
    // The keys are derivable here, but B is killed before it stores them.
    assert!(state.handle_finish(&finish).is_ok());
    drop((reader, write, listener, by_hand));
    expect(&mut a_rx, |n| {
        matches!(n, Notice::SessionEnded { peer, .. } if *peer == b.number).then_some(())
    })
    .await;

    let reply = agents::send(&a_agent, &b.number, "after the cut").await;
    assert!(reply.ok, "{reply:?}");
    b_gets_everything(&b, &a, &["before the cut", "after the cut"]).await;
    broker.stop().await;
}
