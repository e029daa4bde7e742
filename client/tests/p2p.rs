//! Client-to-client sessions over real TCP on 127.0.0.1, and the local store.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use micromsg_client::p2p::{
    self, EndReason, Established, P2pError, PeerEvent, SessionConfig, SessionEnd, SessionHandle,
    StoredSession,
};
use micromsg_client::profile::Profile;
use micromsg_client::store::{self, Direction, Entry, PinResult, Store};
use micromsg_crypto::handshake::{AbortReason, HandshakeError, Initiator, Role, token_id};
use micromsg_crypto::message::{Kind, OfflineEnvelope};
use micromsg_crypto::{IdentityKey, Secret32, SessionKeys};
use micromsg_wire::io::{FrameReader, write_frame};
use rand_core::OsRng;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout};

const WAIT: Duration = Duration::from_secs(10);

fn identity(seed: u8) -> IdentityKey {
    IdentityKey::from_seed(&Secret32::from_bytes([seed; 32]))
}

fn token(seed: u8) -> Secret32 {
    Secret32::from_bytes([seed; 32])
}

fn fast(interval_ms: u64) -> SessionConfig {
    SessionConfig {
        heartbeat_interval: Duration::from_millis(interval_ms),
        missed_heartbeats: 3,
        ..SessionConfig::default()
    }
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A listener whose responder knows one pending token (`known`).
async fn listen(
    known: Secret32,
    id: IdentityKey,
    cfg: SessionConfig,
) -> (SocketAddr, JoinHandle<Result<Established, P2pError>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let known_id = token_id(&known);
        p2p::accept(
            stream,
            async |tid| (tid == known_id).then(|| known.clone()),
            &id,
            cfg,
        )
        .await
    });
    (addr, task)
}

/// Initiator (identity 1) and responder (identity 2) after a successful handshake.
async fn pair(cfg_i: SessionConfig, cfg_r: SessionConfig) -> (Established, Established) {
    let (addr, responder) = listen(token(9), identity(2), cfg_r).await;
    let initiator = p2p::connect(addr, &token(9), &identity(1), cfg_i)
        .await
        .unwrap();
    let responder = responder.await.unwrap().unwrap();
    (initiator, responder)
}

/// Completes the handshake by hand with the crypto crate, as a peer we fully control.
async fn raw_initiator(
    addr: SocketAddr,
    token: &Secret32,
    id: &IdentityKey,
) -> (FrameReader<OwnedReadHalf>, OwnedWriteHalf, SessionKeys) {
    let (read, mut write) = TcpStream::connect(addr).await.unwrap().into_split();
    let mut reader = FrameReader::new(read, p2p::DEFAULT_MAX_FRAME_LEN);
    let (state, init) = Initiator::new(&mut OsRng, id, token);
    write_frame(&mut write, &init).await.unwrap();
    let accept = reader.next_frame().await.unwrap().unwrap();
    let outcome = state.handle_accept(&accept).unwrap();
    write_frame(&mut write, &outcome.finish).await.unwrap();
    (reader, write, outcome.keys)
}

/// A responder session (identity 2) driven by a raw initiator (identity 1).
async fn raw_pair(
    cfg: SessionConfig,
) -> (
    FrameReader<OwnedReadHalf>,
    OwnedWriteHalf,
    SessionKeys,
    SessionHandle,
) {
    let (addr, responder) = listen(token(9), identity(2), cfg).await;
    let (reader, writer, keys) = raw_initiator(addr, &token(9), &identity(1)).await;
    let responder = responder.await.unwrap().unwrap();
    assert_eq!(responder.session_id(), keys.session_id);
    (reader, writer, keys, responder.start(None))
}

/// Polls `done` until it holds (another task gets there); panics naming `what` after [`WAIT`].
async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn event(handle: &mut SessionHandle) -> PeerEvent {
    timeout(WAIT, handle.next_event())
        .await
        .expect("no event in time")
        .expect("event queue closed before Ended")
}

async fn ended(handle: &mut SessionHandle) -> SessionEnd {
    loop {
        if let PeerEvent::Ended(end) = event(handle).await {
            return end;
        }
    }
}

/// The next text, past the key confirmation (the first event of a session).
async fn text(handle: &mut SessionHandle) -> (u64, String) {
    loop {
        match event(handle).await {
            PeerEvent::Confirmed => {}
            PeerEvent::Text { counter, text, .. } => return (counter, text),
            other => panic!("expected a text, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn handshake_then_messages_both_ways_in_order() {
    let (i, r) = pair(SessionConfig::default(), SessionConfig::default()).await;
    assert_eq!(i.peer_identity, identity(2).public_key());
    assert_eq!(r.peer_identity, identity(1).public_key());
    assert_eq!(i.session_id(), r.session_id());
    assert_eq!((i.role, r.role), (Role::Initiator, Role::Responder));
    assert_eq!(i.token_id, token_id(&token(9)));
    assert_eq!(r.token_id, token_id(&token(9)));
    assert_eq!(i.keys.send, r.keys.recv);
    assert_eq!(i.keys.recv, r.keys.send);

    let mut a = i.start(None);
    let mut b = r.start(None);
    const N: u64 = 300;
    let (sa, sb) = (a.sender(), b.sender());
    let send_a = tokio::spawn(async move {
        for n in 0..N {
            sa.send_text(format!("a→b {n} é")).await.unwrap();
        }
    });
    let send_b = tokio::spawn(async move {
        for n in 0..N {
            sb.send_text(format!("b→a {n}")).await.unwrap();
        }
    });
    // Counter 0 of each side is the HEARTBEAT that confirms the keys (12.3).
    for n in 0..N {
        assert_eq!(text(&mut b).await, (n + 1, format!("a→b {n} é")));
        assert_eq!(text(&mut a).await, (n + 1, format!("b→a {n}")));
    }
    send_a.await.unwrap();
    send_b.await.unwrap();

    let sealed = a.sender().send_text_tracked("tracked").await.unwrap();
    let sealed = timeout(WAIT, sealed).await.unwrap().unwrap();
    assert_eq!(sealed.counter, N + 1);
    assert!(sealed.unix >= now() - 5);
    assert_eq!(text(&mut b).await, (N + 1, "tracked".to_owned()));

    // Orderly end: DISCONNECT with its reason; both report the counters to persist.
    a.close("see you").await.unwrap();
    let end_b = ended(&mut b).await;
    assert_eq!(end_b.reason, EndReason::PeerDisconnected("see you".into()));
    assert_eq!(
        end_b.last_recv_counter,
        Some(N + 2),
        "the confirming HEARTBEAT, texts, then DISCONNECT"
    );
    assert_eq!(end_b.next_send_counter, N + 1);
    let end_a = ended(&mut a).await;
    assert_eq!(end_a.reason, EndReason::LocalClose);
    assert_eq!(end_a.next_send_counter, N + 3);
    assert_eq!(a.next_send_counter(), N + 3);
    assert!(a.next_event().await.is_none(), "Ended is the last event");
    assert!(a.send_text("late").await.is_err());
}

#[tokio::test]
async fn dropping_the_handle_disconnects_with_an_empty_reason() {
    let (i, r) = pair(SessionConfig::default(), SessionConfig::default()).await;
    let a = i.start(None);
    let mut b = r.start(None);
    a.send_text("last words").await.unwrap();
    drop(a);
    assert_eq!(text(&mut b).await, (1, "last words".to_owned()));
    let end = ended(&mut b).await;
    assert_eq!(end.reason, EndReason::PeerDisconnected(String::new()));
}

#[tokio::test]
async fn unknown_token_is_refused_with_abort_on_both_sides() {
    let (addr, responder) = listen(token(9), identity(2), SessionConfig::default()).await;
    let err = p2p::connect(addr, &token(8), &identity(1), SessionConfig::default())
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            P2pError::Handshake(HandshakeError::PeerAborted(AbortReason::BadToken))
        ),
        "{err:?}"
    );
    assert!(err.peer_aborted());
    let err = responder.await.unwrap().unwrap_err();
    assert!(
        matches!(err, P2pError::Handshake(HandshakeError::UnknownToken)),
        "{err:?}"
    );
}

#[tokio::test]
async fn wrong_token_for_a_known_id_is_refused_with_abort_on_both_sides() {
    // The responder finds a token for the id, but not the one the initiator proves.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let responder = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        p2p::accept(
            stream,
            async |_| Some(token(7)),
            &identity(2),
            SessionConfig::default(),
        )
        .await
    });
    let err = p2p::connect(addr, &token(8), &identity(1), SessionConfig::default())
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            P2pError::Handshake(HandshakeError::PeerAborted(AbortReason::BadToken))
        ),
        "{err:?}"
    );
    let err = responder.await.unwrap().unwrap_err();
    assert!(
        matches!(err, P2pError::Handshake(HandshakeError::BadProof)),
        "{err:?}"
    );
}

#[tokio::test]
async fn a_refused_identity_gets_abort_2() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let responder = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        p2p::respond(
            stream,
            async |_| Some(token(9)),
            &identity(2),
            SessionConfig::default(),
            |_, _| false,
        )
        .await
    });
    let err = p2p::connect(addr, &token(9), &identity(1), SessionConfig::default())
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            P2pError::Handshake(HandshakeError::PeerAborted(AbortReason::BadSignature))
        ),
        "{err:?}"
    );
    assert!(matches!(
        responder.await.unwrap(),
        Err(P2pError::PeerRefused)
    ));
}

#[tokio::test]
async fn a_silent_responder_times_out_the_handshake() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let _hold = tokio::spawn(async move {
        // Accepts, then says nothing and holds the connection open until the test ends.
        let (_stream, _) = listener.accept().await.unwrap();
        std::future::pending::<()>().await;
    });
    let cfg = SessionConfig {
        handshake_timeout: Duration::from_millis(100),
        ..SessionConfig::default()
    };
    let err = p2p::connect(addr, &token(9), &identity(1), cfg)
        .await
        .unwrap_err();
    assert!(matches!(err, P2pError::Timeout(_)), "{err:?}");
}

#[tokio::test]
async fn heartbeats_keep_an_idle_session_alive() {
    let (i, r) = pair(fast(40), fast(40)).await;
    let mut a = i.start(None);
    let mut b = r.start(None);
    // Ten intervals with no traffic but heartbeats (exactly, on paused time:
    // p2p::session::timing_tests).
    eventually("ten heartbeats from a", || a.next_send_counter() >= 10).await;
    assert!(a.next_send_counter() >= 5, "heartbeats use counters");
    a.send_text("still here").await.unwrap();
    let (counter, body) = text(&mut b).await;
    assert_eq!(body, "still here");
    assert!(counter >= 5);
    b.close("done").await.unwrap();
    assert_eq!(
        ended(&mut a).await.reason,
        EndReason::PeerDisconnected("done".into())
    );
    assert_eq!(ended(&mut b).await.reason, EndReason::LocalClose);
}

#[tokio::test]
async fn a_peer_that_goes_silent_is_detected_after_three_intervals() {
    let interval = Duration::from_millis(60);
    let started = Instant::now();
    let (mut reader, writer, keys, mut session) = raw_pair(fast(60)).await;
    // The raw peer reads (and checks) what the session sends, but sends nothing itself.
    let watcher = tokio::spawn(async move {
        let mut kinds = Vec::new();
        while let Ok(Some(frame)) = reader.next_frame().await {
            let opened = keys.recv.open(&frame).unwrap();
            assert_eq!(opened.counter, kinds.len() as u64);
            kinds.push(opened.kind);
        }
        kinds
    });
    let end = ended(&mut session).await;
    let elapsed = started.elapsed();
    assert_eq!(end.reason, EndReason::HeartbeatTimeout);
    assert!(elapsed >= interval * 3, "{elapsed:?}");
    assert!(
        elapsed < interval * 3 + Duration::from_secs(2),
        "{elapsed:?}"
    );
    // The session closed the connection; the raw peer saw its heartbeats.
    let kinds = timeout(WAIT, watcher).await.unwrap().unwrap();
    assert!(kinds.len() >= 2, "{kinds:?}");
    assert!(kinds.iter().all(|k| *k == Kind::Heartbeat), "{kinds:?}");
    drop(writer);
}

#[tokio::test]
async fn a_slow_reader_does_not_time_out_or_lose_messages() {
    let cfg = SessionConfig {
        event_queue: 2,
        outgoing_queue: 4,
        ..fast(40)
    };
    let (i, r) = pair(cfg.clone(), cfg).await;
    let a = i.start(None);
    let mut b = r.start(None);
    for n in 0..50 {
        a.send_text(format!("m{n}")).await.unwrap();
    }
    // b does not read for many liveness periods: a sends twelve heartbeats after its texts
    // (four of b's liveness periods) while b's application reads nothing. (Exactly, on paused
    // time: p2p::session::timing_tests.)
    eventually("twelve heartbeats from a after its texts", || {
        a.next_send_counter() >= 1 + 50 + 12
    })
    .await;
    for n in 0..50 {
        assert_eq!(text(&mut b).await, (n + 1, format!("m{n}")));
    }
    a.close("").await.unwrap();
    assert_eq!(
        ended(&mut b).await.reason,
        EndReason::PeerDisconnected(String::new())
    );
}

#[tokio::test]
async fn a_replayed_frame_is_refused_and_not_delivered() {
    let (_reader, mut writer, keys, mut session) = raw_pair(SessionConfig::default()).await;
    let frame = keys.send.seal(0, now(), Kind::Text, b"once").unwrap();
    write_frame(&mut writer, &frame).await.unwrap();
    write_frame(&mut writer, &frame).await.unwrap();
    assert_eq!(text(&mut session).await, (0, "once".to_owned()));
    let end = ended(&mut session).await;
    assert_eq!(
        end.reason,
        EndReason::Replay {
            counter: 0,
            expected: 1
        }
    );
    assert_eq!(end.last_recv_counter, Some(0));
}

#[tokio::test]
async fn a_skipped_counter_is_refused() {
    let (_reader, mut writer, keys, mut session) = raw_pair(SessionConfig::default()).await;
    let frame = keys.send.seal(1, now(), Kind::Text, b"early").unwrap();
    write_frame(&mut writer, &frame).await.unwrap();
    let end = ended(&mut session).await;
    assert_eq!(
        end.reason,
        EndReason::Replay {
            counter: 1,
            expected: 0
        }
    );
    assert_eq!(end.last_recv_counter, None);
}

#[tokio::test]
async fn a_tampered_frame_is_refused_and_not_delivered() {
    for flip in [12, usize::MAX] {
        let (_reader, mut writer, keys, mut session) = raw_pair(SessionConfig::default()).await;
        let mut frame = keys.send.seal(0, now(), Kind::Text, b"secret").unwrap();
        // A byte of the header ciphertext, or the last byte of the body tag.
        let at = flip.min(frame.len() - 1);
        frame[at] ^= 0x01;
        write_frame(&mut writer, &frame).await.unwrap();
        let end = ended(&mut session).await;
        assert_eq!(end.reason, EndReason::Tampered, "flip at {at}");
        assert_eq!(end.last_recv_counter, None);
    }
}

#[tokio::test]
async fn a_close_without_disconnect_is_connection_lost() {
    let (reader, writer, keys, mut session) = raw_pair(SessionConfig::default()).await;
    let mut writer = writer;
    let frame = keys.send.seal(0, now(), Kind::Text, b"bye?").unwrap();
    write_frame(&mut writer, &frame).await.unwrap();
    drop((reader, writer));
    assert_eq!(text(&mut session).await, (0, "bye?".to_owned()));
    assert_eq!(ended(&mut session).await.reason, EndReason::ConnectionLost);
}

#[tokio::test]
async fn an_identity_key_change_is_detected_by_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::new(&Profile::new(dir.path()));
    let peer = "5550002";

    // First handshake: trust on first use.
    let (i, _r) = pair(SessionConfig::default(), SessionConfig::default()).await;
    assert_eq!(
        store.pin_identity(peer, &i.peer_identity, now()).unwrap(),
        PinResult::FirstUse
    );
    assert_eq!(
        store.pin_identity(peer, &i.peer_identity, now()).unwrap(),
        PinResult::Same
    );

    // The same number comes back with another identity key.
    let (addr, responder) = listen(token(9), identity(3), SessionConfig::default()).await;
    let i2 = p2p::connect(addr, &token(9), &identity(1), SessionConfig::default())
        .await
        .unwrap();
    drop(responder);
    let old = identity(2).public_key();
    assert_eq!(
        store.pin_identity(peer, &i2.peer_identity, now()).unwrap(),
        PinResult::Changed { old }
    );
    // Still changed until the user accepts the new key.
    assert_eq!(
        store.pin_identity(peer, &i2.peer_identity, now()).unwrap(),
        PinResult::Changed { old }
    );
    assert_eq!(
        store.contact(peer).unwrap().unwrap().identity,
        Some(old),
        "the old key stays pinned"
    );
    store.repin(peer, &i2.peer_identity, now()).unwrap();
    assert_eq!(
        store.pin_identity(peer, &i2.peer_identity, now()).unwrap(),
        PinResult::Same
    );

    // The safety number changes with the key and is the same from both sides.
    let me = identity(1).public_key();
    let before = store::safety_number("5550001", &me, peer, &old).unwrap();
    let after = store::safety_number("5550001", &me, peer, &i2.peer_identity).unwrap();
    assert_ne!(before, after);
    assert_eq!(
        after,
        store::safety_number(peer, &i2.peer_identity, "5550001", &me).unwrap()
    );
    assert_eq!(after.len(), 71);
}

#[tokio::test]
async fn contacts_blocking_and_addresses_persist() {
    let dir = tempfile::tempdir().unwrap();
    let profile = Profile::new(dir.path());
    let store = Store::new(&profile);
    let c = store.add_contact("5550003", 100).unwrap();
    assert_eq!((c.added_at, c.blocked, c.identity), (100, false, None));
    store.set_blocked("5550003", true, 200).unwrap();
    store
        .set_address("5550003", Some("127.0.0.1:4000".into()), 200)
        .unwrap();
    let again = Store::new(&profile).contact("5550003").unwrap().unwrap();
    assert_eq!(again.added_at, 100);
    assert!(again.blocked);
    assert_eq!(again.address.as_deref(), Some("127.0.0.1:4000"));
    assert!(store.add_contact("../etc", 1).is_err());
    assert_eq!(store.contacts().unwrap().len(), 1);
}

#[tokio::test]
async fn history_is_append_only_json_lines() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::new(&Profile::new(dir.path()));
    let entry = |direction, counter: u64| Entry {
        direction,
        time: 1_700_000_000 + counter,
        text: format!("message {counter}\nwith a newline"),
        session: [5; 16],
        counter,
        offline: false,
    };
    assert!(store.read_history("5550002").unwrap().is_empty());
    store
        .append_history("5550002", &entry(Direction::Out, 0))
        .unwrap();
    store
        .append_history_all(
            "5550002",
            &[entry(Direction::In, 0), entry(Direction::In, 1)],
        )
        .unwrap();
    // A line torn by a crash costs only itself.
    let path = dir.path().join("history/5550002.jsonl");
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(b"{\"direction\":\"in\",\"ti").unwrap();
    }
    store
        .append_history("5550002", &entry(Direction::Out, 1))
        .unwrap();
    let read = store.read_history("5550002").unwrap();
    assert_eq!(
        read,
        vec![
            entry(Direction::Out, 0),
            entry(Direction::In, 0),
            entry(Direction::In, 1),
            entry(Direction::Out, 1),
        ]
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}

#[tokio::test]
async fn stored_session_round_trips_and_opens_later_frames() {
    let dir_a = tempfile::tempdir().unwrap();
    let dir_b = tempfile::tempdir().unwrap();
    let store_a = Store::new(&Profile::new(dir_a.path()));
    let store_b = Store::new(&Profile::new(dir_b.path()));
    let (num_a, num_b) = ("5550001", "5550002");
    let cfg = SessionConfig {
        counter_reservation: 4,
        ..SessionConfig::default()
    };
    let (i, r) = pair(cfg.clone(), cfg).await;
    let a_live_send = i.keys.send.clone();

    // Both save the session before starting it; A reserves its counters on disk.
    store_a
        .save_session(num_b, &i.stored_session(now()))
        .unwrap();
    let stored_b = r.stored_session(now());
    store_b.save_session(num_a, &stored_b).unwrap();
    let mut a = i.start(Some(store_a.counter_persister(num_b).unwrap()));
    let mut b = r.start(Some(store_b.counter_persister(num_a).unwrap()));

    for n in 0..10u64 {
        a.send_text(format!("live {n}")).await.unwrap();
    }
    for n in 0..10u64 {
        assert_eq!(text(&mut b).await, (n + 1, format!("live {n}")));
    }
    let reserved = store_a
        .load_session(num_b)
        .unwrap()
        .unwrap()
        .next_send_counter;
    assert!(reserved >= 11, "counters reserved before use: {reserved}");

    a.close("").await.unwrap();
    let end_b = ended(&mut b).await;
    let end_a = ended(&mut a).await;
    assert_eq!(end_a.next_send_counter, 12);
    // A records the end; the reservation on disk is never lowered.
    let mut sa = store_a.load_session(num_b).unwrap().unwrap();
    sa.record_end(&end_a, now());
    store_a.save_session(num_b, &sa).unwrap();
    assert!(
        store_a
            .load_session(num_b)
            .unwrap()
            .unwrap()
            .next_send_counter
            >= 12
    );

    // B's record: file round trip, 0600, redacted Debug.
    let mut sb = store_b.load_session(num_a).unwrap().unwrap();
    // B reserved counters for its confirming HEARTBEAT (12.3).
    assert!(sb.next_send_counter >= 1, "{sb:?}");
    let mut expected = stored_b.clone();
    expected.next_send_counter = sb.next_send_counter;
    assert_eq!(sb, expected);
    assert_eq!(sb.role, Role::Responder);
    assert_eq!(sb.peer_identity, identity(1).public_key());
    sb.record_end(&end_b, now());
    assert_eq!(sb.recv_last_live, Some(11));
    store_b.save_session(num_a, &sb).unwrap();
    let json = std::fs::read_to_string(dir_b.path().join("sessions/5550001.json")).unwrap();
    let parsed: StoredSession = serde_json::from_str(&json).unwrap();
    assert_eq!(parsed, sb);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(dir_b.path().join("sessions/5550001.json")).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    }
    let shown = format!("{sb:?}");
    assert!(!shown.contains(&*sb.recv.seed.to_hex()), "{shown}");
    assert!(!shown.contains(&*sb.send.ts_key.to_hex()), "{shown}");

    // A frame sealed with A's live send keys and a later counter opens with B's stored keys.
    let later_counter = sa.next_send_counter + 100;
    let later = a_live_send
        .seal(later_counter, now(), Kind::Text, b"offline")
        .unwrap();
    let mut sb = store_b.load_session(num_a).unwrap().unwrap();
    let opened = sb.open_offline(&later).unwrap().unwrap();
    assert_eq!(opened.payload, b"offline");
    assert_eq!(opened.counter, later_counter);
    assert_eq!(sb.open_offline(&later).unwrap(), None, "duplicate dropped");
    // A counter already received live is dropped.
    let old = a_live_send.seal(3, now(), Kind::Text, b"again").unwrap();
    assert_eq!(sb.open_offline(&old).unwrap(), None);

    // And A's stored record seals offline envelopes B opens.
    let envelope = sa.seal_offline_text(now(), "deposit").unwrap();
    let envelope = OfflineEnvelope::decode(&envelope).unwrap();
    assert_eq!(envelope.session_id, sb.session_id);
    let opened = sb.open_offline(envelope.frame).unwrap().unwrap();
    assert_eq!(opened.payload, b"deposit");
}

#[tokio::test]
async fn many_messages_flow_both_ways_under_backpressure() {
    let cfg = SessionConfig {
        outgoing_queue: 8,
        event_queue: 8,
        ..SessionConfig::default()
    };
    let (i, r) = pair(cfg.clone(), cfg).await;
    let a = i.start(None);
    let b = r.start(None);
    const N: u64 = 20_000;
    let payload = "x".repeat(256);
    let run = |handle: SessionHandle, tag: &'static str| {
        let payload = payload.clone();
        tokio::spawn(async move {
            let (sender, mut events) = handle.into_parts();
            let send = tokio::spawn(async move {
                for _ in 0..N {
                    sender.send_text(payload.clone()).await.unwrap();
                }
                sender
            });
            let first = timeout(WAIT, events.recv()).await.unwrap().unwrap();
            assert_eq!(first, PeerEvent::Confirmed, "{tag}");
            for n in 0..N {
                match timeout(WAIT, events.recv()).await.unwrap().unwrap() {
                    PeerEvent::Text { counter, text, .. } => {
                        assert_eq!(counter, n + 1, "{tag}");
                        assert_eq!(text.len(), 256);
                    }
                    other => panic!("{tag}: {other:?}"),
                }
            }
            (send.await.unwrap(), events)
        })
    };
    let (a, b) = (run(a, "a"), run(b, "b"));
    let (sa, mut ea) = a.await.unwrap();
    let (_sb, mut eb) = b.await.unwrap();
    sa.close("").await.unwrap();
    let end = |e: Option<PeerEvent>| match e {
        Some(PeerEvent::Ended(end)) => end,
        other => panic!("{other:?}"),
    };
    assert_eq!(
        end(timeout(WAIT, eb.recv()).await.unwrap()).reason,
        EndReason::PeerDisconnected(String::new())
    );
    assert_eq!(
        end(timeout(WAIT, ea.recv()).await.unwrap()).reason,
        EndReason::LocalClose
    );
}

/// Large messages queued far beyond what the sender seals ahead of the socket (256 KiB) wait
/// in their batch unsealed, and still all arrive, in order and intact, before the DISCONNECT
/// of the handle that queued them; tracked ones get their own frame back.
#[tokio::test]
async fn large_messages_beyond_the_write_high_water_arrive_in_order() {
    let (i, r) = pair(SessionConfig::default(), SessionConfig::default()).await;
    let a = i.start(None);
    let mut b = r.start(None);
    const N: usize = 48;
    const LEN: usize = 60_000;
    let body = |n: usize| format!("{n:04}").repeat(LEN / 4);
    let mut tracked = Vec::new();
    for n in 0..N {
        if n % 8 == 3 {
            tracked.push((n, a.sender().send_text_tracked(body(n)).await.unwrap()));
        } else {
            a.send_text(body(n)).await.unwrap();
        }
    }
    // Nothing is read at b yet: the sender is held up by the socket with most of the queue
    // still unsealed.
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(a);
    // Counter 0 is the HEARTBEAT that confirms the keys (12.3).
    for n in 0..N {
        let (counter, text) = text(&mut b).await;
        assert_eq!(counter, n as u64 + 1);
        assert!(text == body(n), "message {n} differs");
    }
    assert_eq!(
        ended(&mut b).await.reason,
        EndReason::PeerDisconnected(String::new())
    );
    for (n, sealed) in tracked {
        let sealed = timeout(WAIT, sealed).await.unwrap().unwrap();
        assert_eq!(sealed.counter, n as u64 + 1);
        assert_eq!(sealed.frame.first(), Some(&0x10), "a DATA frame");
        let overhead = sealed.frame.len() - LEN;
        assert!(
            (20..200).contains(&overhead),
            "frame of {}",
            sealed.frame.len()
        );
    }
}

#[tokio::test]
async fn texts_over_the_frame_limit_are_refused_locally() {
    let cfg = SessionConfig {
        max_frame_len: 400,
        ..SessionConfig::default()
    };
    let (i, r) = pair(cfg.clone(), cfg.clone()).await;
    let a = i.start(None);
    let mut b = r.start(None);
    let max = cfg.max_text_len();
    assert!(matches!(
        a.send_text("y".repeat(max + 1)).await,
        Err(p2p::SendError::TooLong { .. })
    ));
    a.send_text("y".repeat(max)).await.unwrap();
    assert_eq!(text(&mut b).await, (1, "y".repeat(max)));
}
