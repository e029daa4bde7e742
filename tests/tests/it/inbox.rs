//! Offline inboxes at the broker: deposits acknowledged after commit, delivery by fetch and
//! ack, both multi-device modes, quota, and copies of sent messages to the sender's devices.
//! Bodies here are opaque bytes; end-to-end sealing is the client's (see the client tests).

use std::time::{Duration, Instant};

use micromsg_broker::config::InboxMode;
use micromsg_client::account::{self, Session};
use micromsg_client::profile::Profile;
use micromsg_tests::raw::{deposit, number, pair, user};
use micromsg_tests::{Backend, TestBroker};
use micromsg_wire::message::request::{InboxAckArgs, InboxFetchArgs, SyncCopyArgs, TargetArgs};
use micromsg_wire::message::response::InboxMessage;
use micromsg_wire::{Blob, ErrorCode, Event, Hex16, Request, ResponseData};

micromsg_tests::both_backends!(
    entity_mode_copies_to_every_device,
    number_mode_keeps_until_every_device_acked,
    quota_exceeded_keeps_what_is_stored,
    deposits_need_a_contact_pair,
);

/// A second device for `s`, logged in.
async fn second_device(broker: &TestBroker, s: &mut Session, name: &str) -> Session {
    let secret = micromsg_tests::agents::add_device_secret(s).await;
    let p = Profile::new(broker.profile_dir(name));
    account::join(&p, &broker.addr, &broker.ca, &s.info.number, &secret)
        .await
        .unwrap()
}

/// One INBOX-FETCH page of `s`'s device from the start (also used by `groups`).
pub(crate) async fn fetch(s: &mut Session) -> Vec<InboxMessage> {
    match s
        .link
        .call(Request::InboxFetch(InboxFetchArgs {
            limit: None,
            after: None,
        }))
        .await
        .unwrap()
    {
        ResponseData::InboxFetch(d) => d.messages,
        other => panic!("{other:?}"),
    }
}

async fn ack(s: &mut Session, ids: &[u8]) -> u32 {
    match s
        .link
        .call(Request::InboxAck(InboxAckArgs {
            ids: ids.iter().map(|i| Hex16::from_bytes([*i; 16])).collect(),
        }))
        .await
        .unwrap()
    {
        ResponseData::InboxAck(d) => d.removed,
        other => panic!("{other:?}"),
    }
}

async fn entity_mode_copies_to_every_device(backend: Backend) {
    let broker = TestBroker::start(backend, |c| c.inbox.mode = InboxMode::Entity).await;
    let mut a = user(&broker, "a").await;
    let mut b = user(&broker, "b").await;
    pair(&mut a, &mut b).await;
    let mut b2 = second_device(&broker, &mut b, "b2").await;
    let mut a2 = second_device(&broker, &mut a, "a2").await;
    deposit(&mut a, &number(&b), 1, b"first").await.unwrap();
    deposit(&mut a, &number(&b), 2, b"second").await.unwrap();
    // Re-depositing the same id is idempotent (a retry after a lost ack).
    deposit(&mut a, &number(&b), 2, b"second").await.unwrap();
    // The sender copies what it sent to its other devices.
    a.link
        .call(Request::SyncCopy(SyncCopyArgs {
            id: Hex16::from_bytes([1; 16]),
            body: Blob::new(b"copy of first".to_vec()),
            peer: number(&b),
        }))
        .await
        .unwrap();
    // Online devices are told something is waiting.
    assert!(matches!(
        tokio::time::timeout(Duration::from_secs(5), b2.link.next_event())
            .await
            .unwrap()
            .unwrap(),
        Event::Inbox(_)
    ));
    for device in [&mut b, &mut b2] {
        let got = fetch(device).await;
        let bodies: Vec<&[u8]> = got.iter().map(|m| m.body.as_bytes()).collect();
        assert_eq!(
            bodies,
            vec![&b"first"[..], &b"second"[..]],
            "each device has its own copy, in order"
        );
        assert!(got.iter().all(|m| m.from.as_str() == a.info.number));
        assert_eq!(ack(device, &[1, 2]).await, 2);
        assert!(fetch(device).await.is_empty());
    }
    let copies = fetch(&mut a2).await;
    assert_eq!(copies.len(), 1);
    assert_eq!(copies[0].body.as_bytes(), b"copy of first");
    assert!(
        fetch(&mut a).await.is_empty(),
        "the sending device gets no copy of its own"
    );
    broker.stop().await;
}

async fn number_mode_keeps_until_every_device_acked(backend: Backend) {
    let broker = TestBroker::start(backend, |c| c.inbox.mode = InboxMode::Number).await;
    let mut a = user(&broker, "a").await;
    let mut b = user(&broker, "b").await;
    pair(&mut a, &mut b).await;
    let mut b2 = second_device(&broker, &mut b, "b2").await;
    deposit(&mut a, &number(&b), 7, b"shared").await.unwrap();
    assert_eq!(fetch(&mut b).await.len(), 1);
    assert_eq!(ack(&mut b, &[7]).await, 1);
    assert!(
        fetch(&mut b).await.is_empty(),
        "acknowledged by this device"
    );
    let still = fetch(&mut b2).await;
    assert_eq!(
        still.len(),
        1,
        "kept for the device that has not acknowledged"
    );
    assert_eq!(ack(&mut b2, &[7]).await, 1);
    assert!(fetch(&mut b2).await.is_empty());
    assert_eq!(
        broker.running.broker.store().inbox_depth().await.unwrap(),
        0,
        "deleted once all acked"
    );
    broker.stop().await;
}

async fn quota_exceeded_keeps_what_is_stored(backend: Backend) {
    let broker = TestBroker::start(backend, |c| c.inbox.quota_per_device = 3).await;
    let mut a = user(&broker, "a").await;
    let mut b = user(&broker, "b").await;
    pair(&mut a, &mut b).await;
    for id in 1..=3 {
        deposit(&mut a, &number(&b), id, &[id; 32]).await.unwrap();
    }
    let err = deposit(&mut a, &number(&b), 4, &[4; 32]).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::QuotaExceeded), "{err}");
    let got = fetch(&mut b).await;
    assert_eq!(got.len(), 3);
    assert_eq!(got[2].body.as_bytes(), &[3; 32]);
    broker.stop().await;
}

async fn deposits_need_a_contact_pair(backend: Backend) {
    let broker = TestBroker::start(backend, |_| {}).await;
    let mut a = user(&broker, "a").await;
    let b = user(&broker, "b").await;
    let err = deposit(&mut a, &number(&b), 1, b"x").await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotFound));
    let big = vec![0u8; 48_001];
    let err = deposit(&mut a, &number(&b), 1, &big).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::BadArgs));
    broker.stop().await;
}

/// The silent drop of a blocked sender's DEPOSIT, including its timing (protocol.md 6.20, 14):
/// the answers to a deposit the target keeps and to one it discards (it blocked the sender)
/// are the same frame, and their latency distributions must not tell them apart. Before the
/// discarded deposit went through the group commit it answered in about half the time, from
/// one deposit. SQLite with `synchronous=FULL` on a real disk, so a commit costs an fsync.
#[tokio::test]
async fn a_blocked_senders_deposits_answer_like_kept_ones() {
    let broker = TestBroker::start(Backend::Sqlite, |_| {}).await;
    let mut sender = user(&broker, "sender").await;
    let mut friend = user(&broker, "friend").await;
    let mut blocker = user(&broker, "blocker").await;
    pair(&mut sender, &mut friend).await;
    pair(&mut sender, &mut blocker).await;
    blocker
        .link
        .call(Request::Block(TargetArgs {
            target: number(&sender),
        }))
        .await
        .unwrap();
    let targets = [number(&friend), number(&blocker)];
    const ROUNDS: u8 = 100;
    let mut times: [Vec<Duration>; 2] = [Vec::new(), Vec::new()];
    for round in 0..ROUNDS {
        // Alternate which goes first, so that neither always follows the other's commit.
        let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for i in order {
            let id = round + 120 * i as u8;
            let started = Instant::now();
            let answer = deposit(&mut sender, &targets[i], id, b"sealed envelope")
                .await
                .unwrap();
            times[i].push(started.elapsed());
            let ResponseData::Deposit(d) = answer else {
                panic!("{answer:?}")
            };
            assert_eq!(d.id, Hex16::from_bytes([id; 16]));
        }
    }
    // What was kept and what was not.
    assert_eq!(fetch(&mut friend).await.len(), usize::from(ROUNDS));
    assert!(fetch(&mut blocker).await.is_empty());
    let [kept, discarded] = times.map(|mut t| {
        t.sort();
        t[t.len() / 2]
    });
    eprintln!("DEPOSIT medians: {kept:?} kept, {discarded:?} discarded");
    let (low, high) = (kept.min(discarded), kept.max(discarded));
    assert!(
        high - low <= Duration::from_micros(300) || low.as_secs_f64() >= 0.75 * high.as_secs_f64(),
        "DEPOSIT timing tells a blocked sender apart: median {kept:?} kept, {discarded:?} \
         discarded"
    );
}
