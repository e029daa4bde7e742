//! Offline messages and several devices, end to end through the client agent: deposit when
//! the contact is offline and delivery when it comes back (both stores), both multi-device
//! modes, copies of sent messages on the sender's other devices, expiry, the inbox quota, key
//! transfer at linking and the key backup. The durability test (real broker binary, SIGKILL in
//! a burst of 10,000 deposits) is at the end.

use std::time::Duration;

use micromsg_broker::config::{Config, InboxMode};
use micromsg_client::account;
use micromsg_client::agent::{AcceptPolicy, AgentConfig, AgentHandle, Command, Notice};
use micromsg_client::devices;
use micromsg_client::profile::Profile;
use micromsg_client::store::{Direction, Store};
use micromsg_tests::agents::Ask as _;
use micromsg_tests::agents::{self, Device, expect, expect_none, message_from, register, send};
use micromsg_tests::{Backend, TestBroker};
use tokio::sync::mpsc;

/// Links a new device `name` to `old`'s entity, with the key transfer of `device add`.
async fn link_device(broker: &TestBroker, old: &Device, name: &str) -> Device {
    let linked = agents::link_device(broker, old, name).await;
    assert_eq!(linked.sent_to, linked.joined_as);
    assert!(linked.installed.contacts >= Store::new(&old.profile).contacts().unwrap().len());
    assert_eq!(
        linked.device.profile.secrets().unwrap().identity_seed,
        old.profile.secrets().unwrap().identity_seed,
        "the new device has the entity's identity key"
    );
    linked.device
}

/// Agents that deposit after 1 s without a session.
async fn online(device: &Device) -> (AgentHandle, mpsc::Receiver<Notice>) {
    let config = AgentConfig {
        answer_timeout: Duration::from_secs(3),
        offline_after: Duration::from_secs(1),
        ..agents::config(AcceptPolicy::Any)
    };
    agents::online(device, config).await
}

/// `a` and `b` become contacts (both online), then `b` goes offline.
async fn contacts_then_offline(a: &Device, b: &Device) -> (AgentHandle, mpsc::Receiver<Notice>) {
    let (b_agent, mut b_rx) = online(b).await;
    let (a_agent, mut a_rx) = online(a).await;
    let reply = a_agent
        .ask(Command::ContactAdd {
            number: b.number.clone(),
            wait_secs: None,
        })
        .await;
    assert!(reply.ok, "{reply:?}");
    expect(&mut b_rx, |n| {
        matches!(n, Notice::SessionStarted { peer, .. } if *peer == a.number).then_some(())
    })
    .await;
    b_agent.stop().await.unwrap();
    expect(&mut a_rx, |n| {
        matches!(n, Notice::SessionEnded { peer, .. } if *peer == b.number).then_some(())
    })
    .await;
    (a_agent, a_rx)
}

async fn offline_deposit_and_later_delivery(backend: Backend) {
    let broker = TestBroker::start(backend, |_| {}).await;
    let a = register(&broker, "a").await;
    let b = register(&broker, "b").await;
    let (a_agent, _a_rx) = contacts_then_offline(&a, &b).await;

    let reply = send(&a_agent, &b.number, "while you were away").await;
    assert!(reply.ok, "{reply:?}");
    assert!(
        reply.message.starts_with(&format!(
            "no live session with {}; message deposited",
            b.number
        )),
        "{reply:?}"
    );
    let data = reply.data.unwrap();
    assert_eq!(data["delivered"], "deposited");
    let reply = send(&a_agent, &b.number, "and this too").await;
    assert!(reply.ok, "{reply:?}");
    let a_history = Store::new(&a.profile).read_history(&b.number).unwrap();
    let sent: Vec<_> = a_history
        .iter()
        .filter(|e| e.offline)
        .map(|e| e.text.as_str())
        .collect();
    assert_eq!(sent, ["while you were away", "and this too"]);

    // B comes back: the agent fetches at start and shows them, marked offline, in order.
    let (b_agent, mut b_rx) = online(&b).await;
    assert_eq!(
        message_from(&mut b_rx, &a.number).await,
        ("while you were away".into(), true)
    );
    assert_eq!(
        message_from(&mut b_rx, &a.number).await,
        ("and this too".into(), true)
    );
    let history = Store::new(&b.profile).read_history(&a.number).unwrap();
    let got: Vec<_> = history
        .iter()
        .map(|e| (e.text.as_str(), e.offline))
        .collect();
    assert_eq!(got, [("while you were away", true), ("and this too", true)]);
    let store = &broker.running.broker.store();
    assert_eq!(
        store.inbox_depth().await.unwrap(),
        0,
        "acknowledged items are deleted at the broker"
    );
    b_agent.stop().await.unwrap();

    // A second start delivers nothing twice.
    let (b_agent, mut b_rx) = online(&b).await;
    expect_none(&mut b_rx, Duration::from_secs(1), |n| {
        matches!(n, Notice::Message { .. })
    })
    .await;
    b_agent.stop().await.unwrap();
    assert_eq!(
        Store::new(&b.profile)
            .read_history(&a.number)
            .unwrap()
            .len(),
        2
    );
    a_agent.stop().await.unwrap();
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_deposit_and_later_delivery_sqlite() {
    offline_deposit_and_later_delivery(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_deposit_and_later_delivery_postgres() {
    offline_deposit_and_later_delivery(Backend::Postgres).await;
}

/// More offline messages than one INBOX-FETCH page holds: the client pipelines the next page's
/// FETCH before the ACK of the current one (protocol.md 13.2) and still stores every message
/// once, in order, and leaves nothing at the broker.
async fn offline_backlog_over_several_pages(backend: Backend) {
    const COUNT: usize = 300; // about 100 per page with these bodies: at least three pages
    let broker = TestBroker::start(backend, |_| {}).await;
    let a = register(&broker, "a").await;
    let b = register(&broker, "b").await;
    let (a_agent, _a_rx) = contacts_then_offline(&a, &b).await;
    a_agent.stop().await.unwrap();
    // Deposit at once, without first asking for a session.
    let config = AgentConfig {
        offline_after: Duration::ZERO,
        ..agents::config(AcceptPolicy::Any)
    };
    let (a_agent, _a_rx) = agents::online(&a, config).await;
    let texts: Vec<String> = (0..COUNT)
        .map(|i| format!("{i:04} {}", "x".repeat(200)))
        .collect();
    for text in &texts {
        let reply = send(&a_agent, &b.number, text).await;
        assert!(reply.ok, "{reply:?}");
    }
    let store = &broker.running.broker.store();
    assert_eq!(store.inbox_depth().await.unwrap(), COUNT as i64);

    let (b_agent, mut b_rx) = online(&b).await;
    for text in &texts {
        assert_eq!(
            message_from(&mut b_rx, &a.number).await,
            (text.clone(), true)
        );
    }
    b_agent.stop().await.unwrap();
    let history = Store::new(&b.profile).read_history(&a.number).unwrap();
    let got: Vec<&str> = history.iter().map(|e| e.text.as_str()).collect();
    assert_eq!(got, texts, "every message once, in order");
    assert_eq!(store.inbox_depth().await.unwrap(), 0, "all acknowledged");
    a_agent.stop().await.unwrap();
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_backlog_over_several_pages_sqlite() {
    offline_backlog_over_several_pages(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_backlog_over_several_pages_postgres() {
    offline_backlog_over_several_pages(Backend::Postgres).await;
}

/// B has two devices. A message to B sent live reaches the live device, and the other device
/// through the broker; B1's reply shows on B2 as sent by B; an offline message reaches both.
async fn two_devices(mode: InboxMode) {
    let broker = TestBroker::start(Backend::Sqlite, |c: &mut Config| c.inbox.mode = mode).await;
    let a = register(&broker, "a").await;
    let b1 = register(&broker, "b1").await;
    let b2 = link_device(&broker, &b1, "b2").await;

    // B1 alone online: the contact's live session is with B1.
    let (b1_agent, mut b1_rx) = online(&b1).await;
    let (a_agent, mut a_rx) = online(&a).await;
    let reply = a_agent
        .ask(Command::ContactAdd {
            number: b1.number.clone(),
            wait_secs: None,
        })
        .await;
    assert!(reply.ok, "{reply:?}");
    let (b2_agent, mut b2_rx) = online(&b2).await;
    // B2 gets the session keys B1 set up.
    expect(&mut b2_rx, |n| {
        matches!(n, Notice::KeysSynced { peer, .. } if *peer == a.number).then_some(())
    })
    .await;

    let reply = send(&a_agent, &b1.number, "live hello").await;
    assert!(reply.ok, "{reply:?}");
    assert_eq!(reply.data.unwrap()["delivered"], "live");
    // Live, as the sender was told; the copy deposited for other devices may get here
    // first, so the receiver's `offline` flag is not asserted.
    assert_eq!(message_from(&mut b1_rx, &a.number).await.0, "live hello");
    assert_eq!(
        message_from(&mut b2_rx, &a.number).await,
        ("live hello".into(), true),
        "the other device reads the sender's copy"
    );
    // B1 does not show the broker's copy of what it got live.
    expect_none(&mut b1_rx, Duration::from_millis(800), |n| {
        matches!(n, Notice::Message { .. })
    })
    .await;

    // B1's reply: A gets it live, B2 sees it as sent by B.
    let reply = send(&b1_agent, &a.number, "reply from b1").await;
    assert!(reply.ok, "{reply:?}");
    // Live, as the sender was told; the copy deposited for other devices may get here
    // first, so the receiver's `offline` flag is not asserted.
    assert_eq!(message_from(&mut a_rx, &b1.number).await.0, "reply from b1");
    let copy = expect(&mut b2_rx, |n| match n {
        Notice::SentElsewhere {
            to, text, device, ..
        } if *to == a.number => Some((text.clone(), *device)),
        _ => None,
    })
    .await;
    assert_eq!(copy, ("reply from b1".into(), 1));
    let b2_history = Store::new(&b2.profile).read_history(&a.number).unwrap();
    let seen: Vec<_> = b2_history
        .iter()
        .map(|e| (e.direction, e.text.as_str()))
        .collect();
    assert_eq!(
        seen,
        [
            (Direction::In, "live hello"),
            (Direction::Out, "reply from b1")
        ],
        "B2 shows the whole conversation"
    );

    // Both of B's devices go offline; A deposits; each device gets it when it comes back.
    b1_agent.stop().await.unwrap();
    b2_agent.stop().await.unwrap();
    expect(&mut a_rx, |n| {
        matches!(n, Notice::SessionEnded { peer, .. } if *peer == b1.number).then_some(())
    })
    .await;
    let reply = send(&a_agent, &b1.number, "for all of B").await;
    assert!(reply.message.contains("deposited"), "{reply:?}");
    let (b2_agent, mut b2_rx) = online(&b2).await;
    assert_eq!(
        message_from(&mut b2_rx, &a.number).await,
        ("for all of B".into(), true)
    );
    let store = &broker.running.broker.store();
    if mode == InboxMode::Number {
        assert!(
            store.inbox_depth().await.unwrap() >= 1,
            "number mode keeps the item until every device acknowledged it"
        );
    }
    let (b1_agent, mut b1_rx) = online(&b1).await;
    assert_eq!(
        message_from(&mut b1_rx, &a.number).await,
        ("for all of B".into(), true)
    );
    // A new session with A on either device leaves its keys for the other (MMK1, a SYNC-COPY)
    // at its own pace; both are online, so each fetches what the other left. Stopping them
    // before that would leave it in the inbox, which is not what this test is about. A's
    // request for a session (made with its deposit) may reach B only now, so an empty inbox
    // must stay empty for a while: a CI run once stopped B in the moment between an empty
    // inbox and a late session's keys.
    let settled = tokio::time::Instant::now() + Duration::from_secs(15);
    let mut empty_since = None;
    while tokio::time::Instant::now() < settled {
        if store.inbox_depth().await.unwrap() > 0 {
            empty_since = None;
        } else if empty_since
            .get_or_insert_with(tokio::time::Instant::now)
            .elapsed()
            >= Duration::from_secs(1)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    b1_agent.stop().await.unwrap();
    b2_agent.stop().await.unwrap();
    assert_eq!(
        store.inbox_depth().await.unwrap(),
        0,
        "all acknowledged; left: {}",
        left_in_inbox(store, &[(&a.number, 1), (&b1.number, 1), (&b1.number, 2)]).await
    );
    a_agent.stop().await.unwrap();
    broker.stop().await;
}

/// What is still in the inbox of each `(number, device)`, for a failure message: the
/// recipient, the sender and the body's first four bytes (its kind: `MMO1`, `MMK1`, …).
async fn left_in_inbox(store: &micromsg_store::Store, devices: &[(&String, u32)]) -> String {
    let mut left = Vec::new();
    for (number, device) in devices {
        let number = micromsg_store::Number::new((*number).clone()).unwrap();
        let device = micromsg_store::DeviceId::new(*device).unwrap();
        let now = micromsg_broker::clock::unix_now() as i64;
        let (items, _) = store
            .fetch_inbox(&number, device, None, 100, now)
            .await
            .unwrap();
        for item in items {
            let kind = String::from_utf8_lossy(item.body.get(..4).unwrap_or_default()).into_owned();
            left.push(format!(
                "to {number}/{device:?} ({:?}) from {}/{:?}: {kind}",
                item.recipient_device, item.sender_number, item.sender_device
            ));
        }
    }
    left.join("; ")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_devices_entity_mode() {
    two_devices(InboxMode::Entity).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_devices_number_mode() {
    two_devices(InboxMode::Number).await;
}

/// What A1 deposits while B is offline shows on A2 as sent by A.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_message_sent_shows_on_the_senders_other_device() {
    let broker = TestBroker::start(Backend::Postgres, |_| {}).await;
    let a1 = register(&broker, "a1").await;
    let b = register(&broker, "b").await;
    let a2 = link_device(&broker, &a1, "a2").await;
    let (a1_agent, _a1_rx) = contacts_then_offline(&a1, &b).await;
    let reply = send(&a1_agent, &b.number, "sent from a1").await;
    assert!(reply.message.contains("deposited"), "{reply:?}");
    let (a2_agent, mut a2_rx) = online(&a2).await;
    let copy = expect(&mut a2_rx, |n| match n {
        Notice::SentElsewhere { to, text, .. } if *to == b.number => Some(text.clone()),
        _ => None,
    })
    .await;
    assert_eq!(copy, "sent from a1");
    a2_agent.stop().await.unwrap();
    a1_agent.stop().await.unwrap();
    broker.stop().await;
}

/// The keys of a session replaced by a newer one are forgotten once the keep period has passed
/// since it was last used or replaced (client `store/prune.rs`), when the agent starts: a
/// stolen device then cannot open old deposits recorded on the way. The keep period never goes
/// below the broker's MESSAGE-TTL (10 s here), and the latest session keeps working: a deposit
/// sealed with it after the clean-up opens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_forgets_the_keys_of_sessions_replaced_long_enough_ago() {
    let broker = TestBroker::start(Backend::Sqlite, |c| c.inbox.ttl_secs = 10).await;
    let a = register(&broker, "a").await;
    let b = register(&broker, "b").await;
    let online = async |device: &Device| {
        let config = AgentConfig {
            answer_timeout: Duration::from_secs(5),
            offline_after: Duration::from_secs(5),
            keep_replaced_keys: Duration::from_secs(1),
            ..agents::config(AcceptPolicy::Any)
        };
        agents::online(device, config).await
    };
    let latest = |d: &Device, peer: &str| {
        Store::new(&d.profile)
            .load_session(peer)
            .unwrap()
            .unwrap()
            .session_id
    };
    let kept = |d: &Device| -> Vec<[u8; 16]> {
        Store::new(&d.profile)
            .shared_sessions()
            .unwrap()
            .iter()
            .map(|s| s.session.session_id)
            .collect()
    };
    // A talks both ways over a first session, then over a second one after a restart.
    let (b_agent, mut b_rx) = online(&b).await;
    let (a_agent, mut a_rx) = online(&a).await;
    let reply = agents::contact_add(&a_agent, &b.number).await;
    assert!(reply.ok, "{reply:?}");
    let talk = async |a_agent: &AgentHandle,
                      a_rx: &mut mpsc::Receiver<Notice>,
                      b_rx: &mut mpsc::Receiver<Notice>,
                      round| {
        let sent = send(a_agent, &b.number, &format!("a{round}")).await;
        assert_eq!(sent.data.unwrap()["delivered"], "live");
        let got = message_from(b_rx, &a.number).await;
        assert_eq!(got, (format!("a{round}"), false));
        assert!(send(&b_agent, &a.number, &format!("b{round}")).await.ok);
        assert_eq!(
            message_from(a_rx, &b.number).await,
            (format!("b{round}"), false)
        );
    };
    talk(&a_agent, &mut a_rx, &mut b_rx, 1).await;
    let first = latest(&a, &b.number);
    a_agent.stop().await.unwrap();
    // Whole seconds apart from the first session's last live use.
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    let deposited_at = account::unix_now();
    let (a_agent, mut a_rx) = online(&a).await;
    // The first message after the restart is deposited, sealed with the first session, and
    // asks for a new one.
    let sent = send(&a_agent, &b.number, "a2").await;
    assert!(sent.message.contains("deposited"), "{sent:?}");
    expect(&mut a_rx, |n| {
        matches!(n, Notice::SessionStarted { peer, .. } if *peer == b.number).then_some(())
    })
    .await;
    assert_eq!(
        message_from(&mut b_rx, &a.number).await,
        ("a2".into(), true)
    );
    // Opening it was a use of the first session at B, stored with it: a replaced session's
    // keys are kept for the keep period after their last use.
    let opened_with = Store::new(&b.profile)
        .find_session(&first)
        .unwrap()
        .unwrap();
    assert!(
        opened_with.session().last_used >= deposited_at,
        "last used {} before the deposit at {deposited_at}",
        opened_with.session().last_used
    );
    talk(&a_agent, &mut a_rx, &mut b_rx, 3).await;
    let second = latest(&a, &b.number);
    assert_ne!(first, second, "a new session after the restart");
    // When the first session was replaced, at the latest (whole seconds).
    let replaced = Store::new(&a.profile)
        .load_session(&b.number)
        .unwrap()
        .unwrap()
        .established_at;
    assert_eq!(
        kept(&a),
        [first],
        "the replaced session is kept for a while"
    );
    assert_eq!(kept(&b), [first]);
    a_agent.stop().await.unwrap();

    // Past the agent's keep period (1 s) but within the broker's MESSAGE-TTL (10 s): kept.
    let until = |unix: u64| {
        Duration::from_secs(unix.saturating_sub(account::unix_now())) + Duration::from_millis(100)
    };
    tokio::time::sleep(until(replaced + 2)).await;
    let (a_agent, _a_rx) = online(&a).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        account::unix_now() < replaced + 9,
        "the check ran late; the TTL may have passed"
    );
    assert_eq!(kept(&a), [first], "kept for the broker's MESSAGE-TTL");
    a_agent.stop().await.unwrap();

    // Past the broker's MESSAGE-TTL since the replacement, the next start forgets it.
    tokio::time::sleep(until(replaced + 11)).await;
    let forgotten = async |d: &Device, id: [u8; 16]| {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while kept(d).contains(&id) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the replaced session's keys are still kept at {}: {:?} (latest {:?})",
                account::unix_now(),
                Store::new(&d.profile).shared_sessions().unwrap(),
                Store::new(&d.profile).own_sessions().unwrap(),
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let (a_agent, _a_rx) = online(&a).await;
    forgotten(&a, first).await;
    assert!(kept(&a).is_empty());
    assert_eq!(latest(&a, &b.number), second);
    // B was running all along (its clean-up runs at start, then hours apart): it still has
    // them. Offline, then back, it forgets them too and opens a deposit sealed with the
    // latest session.
    assert_eq!(kept(&b), [first]);
    b_agent.stop().await.unwrap();
    let reply = send(&a_agent, &b.number, "after the clean-up").await;
    assert!(reply.message.contains("deposited"), "{reply:?}");
    let (b_agent, mut b_rx) = online(&b).await;
    assert_eq!(
        message_from(&mut b_rx, &a.number).await,
        ("after the clean-up".into(), true)
    );
    // (B's return may bring a new session with A, which keeps the second one for a while.)
    forgotten(&b, first).await;
    b_agent.stop().await.unwrap();
    a_agent.stop().await.unwrap();
    broker.stop().await;
}

/// Removing a contact forgets every key kept with it at once: the session this device sends
/// with, and those kept for opening (here another device's, which came with the link).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_contact_forgets_every_key_kept_with_it() {
    let broker = TestBroker::start(Backend::Sqlite, |_| {}).await;
    let a1 = register(&broker, "a1").await;
    let b = register(&broker, "b").await;
    // A1 has a session with B; a device linked after it gets its keys, kept for device 1.
    let (a1_agent, _a1_rx) = contacts_then_offline(&a1, &b).await;
    a1_agent.stop().await.unwrap();
    let a2 = link_device(&broker, &a1, "a2").await;
    let kept = |d: &Device| -> Vec<(String, u32)> {
        Store::new(&d.profile)
            .shared_sessions()
            .unwrap()
            .into_iter()
            .map(|s| (s.peer, s.device))
            .collect()
    };
    assert_eq!(kept(&a2), [(b.number.clone(), 1)]);
    // `contact remove B` through a running agent, as the command runs it.
    let remove_b = async |d: &Device| {
        let (agent, _rx) = agents::online(d, agents::config(AcceptPolicy::Any)).await;
        let reply = agent
            .ask(Command::ContactRemove {
                number: b.number.clone(),
            })
            .await;
        assert!(reply.ok, "{reply:?}");
        agent.stop().await.unwrap();
    };
    remove_b(&a2).await;
    assert!(kept(&a2).is_empty());
    assert!(
        Store::new(&a2.profile)
            .contact(&b.number)
            .unwrap()
            .is_none()
    );
    // A1 removes B too: its own latest session with B goes as well.
    assert!(
        Store::new(&a1.profile)
            .load_session(&b.number)
            .unwrap()
            .is_some()
    );
    remove_b(&a1).await;
    assert!(
        Store::new(&a1.profile)
            .load_session(&b.number)
            .unwrap()
            .is_none()
    );
    assert!(kept(&a1).is_empty());
    broker.stop().await;
}

/// Items past their lifetime are never delivered and the sweep removes them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_items_are_swept_not_delivered() {
    let broker = TestBroker::start(Backend::Sqlite, |c: &mut Config| c.inbox.ttl_secs = 1).await;
    let a = register(&broker, "a").await;
    let b = register(&broker, "b").await;
    let (a_agent, _a_rx) = contacts_then_offline(&a, &b).await;
    let reply = send(&a_agent, &b.number, "short-lived").await;
    assert!(reply.message.contains("deposited"), "{reply:?}");
    let store = &broker.running.broker.store();
    assert_eq!(store.inbox_depth().await.unwrap(), 1);
    // The sweep takes the time: it runs here as it will once the lifetime is over, instead of
    // the test waiting for that.
    let past_expiry = micromsg_broker::clock::unix_now() as i64 + 2;
    let report = store.sweep(past_expiry).await.unwrap();
    assert_eq!(report.inbox_items, 1);
    assert_eq!(store.inbox_depth().await.unwrap(), 0);
    let (b_agent, mut b_rx) = online(&b).await;
    expect_none(&mut b_rx, Duration::from_secs(1), |n| {
        matches!(n, Notice::Message { .. })
    })
    .await;
    b_agent.stop().await.unwrap();
    a_agent.stop().await.unwrap();
    broker.stop().await;
}

/// A full inbox refuses the next deposit with a clear reason and keeps what it holds; the
/// message waits in the sender's outbox and goes out, once, when the inbox has room again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_exceeded_is_clear_and_loses_nothing() {
    let broker = TestBroker::start(Backend::Sqlite, |c: &mut Config| {
        c.inbox.quota_per_device = 2
    })
    .await;
    let a = register(&broker, "a").await;
    let b = register(&broker, "b").await;
    let (a_agent, mut a_rx) = contacts_then_offline(&a, &b).await;
    for text in ["one", "two"] {
        let reply = send(&a_agent, &b.number, text).await;
        assert!(reply.ok, "{reply:?}");
    }
    let reply = send(&a_agent, &b.number, "three").await;
    assert!(reply.ok, "{reply:?}");
    assert!(reply.message.contains("QUOTA-EXCEEDED"), "{reply:?}");
    assert!(reply.message.contains("queued on this device"), "{reply:?}");
    assert_eq!(reply.data.unwrap()["delivered"], "queued");
    let (b_agent, mut b_rx) = online(&b).await;
    for want in ["one", "two", "three"] {
        assert_eq!(
            message_from(&mut b_rx, &a.number).await,
            (want.into(), true)
        );
    }
    expect(&mut a_rx, |n| {
        matches!(n, Notice::QueuedSent { to, .. } if *to == b.number).then_some(())
    })
    .await;
    expect_none(&mut b_rx, Duration::from_millis(500), |n| {
        matches!(n, Notice::Message { .. })
    })
    .await;
    let texts: Vec<String> = Store::new(&b.profile)
        .read_history(&a.number)
        .unwrap()
        .into_iter()
        .map(|e| e.text)
        .collect();
    assert_eq!(texts, ["one", "two", "three"]);
    b_agent.stop().await.unwrap();
    a_agent.stop().await.unwrap();
    broker.stop().await;
}

/// A device that joined without a transfer restores the backup: it reads new messages to the
/// entity, and continues the contact (INITIATE-EXISTING, same identity key, no warning).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restored_device_reads_new_messages_and_continues_the_contact() {
    let broker = TestBroker::start(Backend::Sqlite, |_| {}).await;
    let a = register(&broker, "a").await;
    let b1 = register(&broker, "b1").await;
    let (a_agent, mut a_rx) = contacts_then_offline(&a, &b1).await;

    let mut s = account::connect(&b1.profile).await.unwrap();
    let done = devices::backup(&mut s, &b1.profile, None).await.unwrap();
    assert_eq!(done.version, 1);
    assert!(done.sessions >= 1);
    let recovery = done
        .new_recovery
        .expect("the first backup makes the secret");
    let again = devices::backup(&mut s, &b1.profile, None).await.unwrap();
    assert_eq!(again.version, 2, "the next backup reuses the secret");
    assert!(again.new_recovery.is_none());
    let secret = agents::add_device_secret(&mut s).await;
    let p2 = Profile::new(broker.profile_dir("b2"));
    let mut s2 = account::join(&p2, &broker.addr, &broker.ca, &b1.number, &secret)
        .await
        .unwrap();
    assert!(
        devices::restore(&mut s2, &p2, "not the secret")
            .await
            .is_err(),
        "a wrong recovery secret is refused"
    );
    assert!(
        p2.awaiting_keys(),
        "a joined device waits for the entity's keys"
    );
    let installed = devices::restore(&mut s2, &p2, &recovery).await.unwrap();
    assert!(!p2.awaiting_keys(), "still waiting after the restore");
    assert_eq!(installed.contacts, 1);
    assert!(installed.sessions >= 1);
    let b2 = Device {
        profile: p2,
        number: b1.number.clone(),
    };

    let reply = send(&a_agent, &b1.number, "after the restore").await;
    assert!(reply.message.contains("deposited"), "{reply:?}");
    let (b2_agent, mut b2_rx) = online(&b2).await;
    assert_eq!(
        message_from(&mut b2_rx, &a.number).await,
        ("after the restore".into(), true)
    );
    // The reply goes live when the new device asks `a` for a session, or is sealed with a
    // session the device already holds and deposited (which of the two depends on whether
    // the session keys reached it before this send); either way `a` reads it, with the
    // same identity key and no warning.
    let reply = send(&b2_agent, &a.number, "hello from the new device").await;
    assert!(reply.ok, "{reply:?}");
    let delivered = reply.data.unwrap()["delivered"].clone();
    assert!(
        delivered == "live" || delivered == "deposited",
        "{delivered:?}"
    );
    // The receiver's `offline` flag is not asserted: a live message's copy deposited for
    // other devices may get here first.
    assert_eq!(
        message_from(&mut a_rx, &b1.number).await.0,
        "hello from the new device"
    );
    b2_agent.stop().await.unwrap();
    a_agent.stop().await.unwrap();
    broker.stop().await;
}

/// A new device that joined without receiving the entity's keys (`device join` gave up
/// waiting, or had no transfer key) and runs `listen` when the old device's transfer arrives
/// does not lose it: the agent leaves it in the inbox, and `device receive-keys` (its library
/// call here) installs it afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_transfer_that_arrives_while_the_new_device_listens_is_received_later() {
    let broker = TestBroker::start(Backend::Sqlite, |_| {}).await;
    let a1 = register(&broker, "a1").await;
    let mut old = account::connect(&a1.profile).await.unwrap();
    let known = devices::highest_device(&mut old).await.unwrap();
    let secret = agents::add_device_secret(&mut old).await;
    let transfer = devices::new_transfer_key();
    let p2 = Profile::new(broker.profile_dir("a2"));
    let joined = account::join(&p2, &broker.addr, &broker.ca, &a1.number, &secret)
        .await
        .unwrap();
    let joined_as = joined.info.device;
    drop(joined);
    assert!(p2.awaiting_keys());
    let a2 = Device {
        profile: p2.clone(),
        number: a1.number.clone(),
    };
    let (a2_agent, _a2_rx) = online(&a2).await;
    // `device add` on the old device sends the keys once the new device has joined.
    let sent_to = devices::send_link_transfer(
        &mut old,
        &a1.profile,
        &transfer,
        known,
        Duration::from_secs(20),
    )
    .await
    .unwrap();
    assert_eq!(sent_to, joined_as);
    // The running agent takes its inbox with the transfer in it.
    let reply = a2_agent.ask(Command::Inbox).await;
    assert!(reply.ok, "{reply:?}");
    a2_agent.stop().await.unwrap();
    assert!(p2.awaiting_keys());
    // `device receive-keys --transfer-key`.
    let mut s2 = account::connect(&p2).await.unwrap();
    let installed = devices::receive_link_transfer(&mut s2, &p2, &transfer, Duration::from_secs(5))
        .await
        .expect("the transfer was dropped by the agent");
    assert_eq!(installed.contacts, 0);
    assert!(!p2.awaiting_keys());
    assert_eq!(
        p2.secrets().unwrap().identity_seed,
        a1.profile.secrets().unwrap().identity_seed,
        "the new device has the entity's identity key"
    );
    broker.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Durability: the real broker binary, killed with SIGKILL in the middle of a burst.

mod durability {
    use std::collections::{HashMap, HashSet};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::{Duration, Instant};

    use micromsg_client::account::{self, Session};
    use micromsg_client::inbox::new_message_id;
    use micromsg_client::profile::Profile;
    use micromsg_wire::message::request::{
        Answer, ContactAnswerArgs, DepositArgs, InboxFetchArgs, InitiateNewArgs,
    };
    use micromsg_wire::{Address, Blob, Event, Hex16, Number, Request, ResponseData};
    use tokio::sync::Mutex;

    // 2,400 deposits from 8 senders, the broker killed after 720 acknowledgements: enough for
    // every sender to have acknowledged and unacknowledged deposits in flight at the kill, and
    // for the recipient's inbox to span ten pages; small enough to stay under the 30 s a test
    // may take with the second core busy (10,000 took 30-60 s on 2 busy cores, 4,000 up to
    // 34 s under `stress -c 1`, for no further coverage).
    const SENDERS: usize = 8;
    const PER_SENDER: usize = 300;
    const KILL_AFTER: usize = 720;

    use crate::process::BrokerProcess;

    async fn connect_retrying(profile: &Profile) -> Session {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            match account::connect(profile).await {
                Ok(s) => return s,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("cannot reconnect: {e}"),
            }
        }
    }

    async fn pair(a: &mut Session, b: &mut Session) {
        let target = Number::new(b.info.number.clone()).unwrap();
        a.link
            .call(Request::InitiateNew(InitiateNewArgs {
                target,
                address: None,
            }))
            .await
            .unwrap();
        let request = loop {
            if let Event::ContactRequest(r) = b.link.next_event().await.unwrap() {
                break r.request;
            }
        };
        b.link
            .call(Request::ContactAnswer(ContactAnswerArgs {
                request,
                answer: Answer::Accept {
                    address: Address::new("127.0.0.1:9").unwrap(),
                },
            }))
            .await
            .unwrap();
        loop {
            if let Event::ContactAccepted(_) = a.link.next_event().await.unwrap() {
                break;
            }
        }
    }

    /// Every acknowledged deposit of a burst interrupted by SIGKILL is delivered, exactly once
    /// after de-duplication by id, in order per sender.
    async fn sigkill_during_a_burst(database_url: Option<String>) {
        let dir = tempfile::tempdir().unwrap();
        let mut extra = "[registration]\nper_ip_per_hour = 100000\n\
             [limits]\nrequests_per_sec = 1000000\nrequests_burst = 1000000\n\
             [inbox]\nquota_per_device = 1000000\n"
            .to_owned();
        if let Some(url) = &database_url {
            extra.push_str(&format!("[database]\nurl = \"{url}\"\n"));
        }
        let mut broker = BrokerProcess::start(dir.path(), &extra).await;
        let (addr, ca) = (broker.addr.clone(), broker.ca.clone());

        let recipient = Profile::new(dir.path().join("r"));
        let mut r = account::register(&recipient, &addr, &ca, None)
            .await
            .unwrap();
        let mut senders = Vec::new();
        for i in 0..SENDERS {
            let p = Profile::new(dir.path().join(format!("s{i}")));
            let mut s = account::register(&p, &addr, &ca, None).await.unwrap();
            pair(&mut s, &mut r).await;
            senders.push((p, s));
        }
        drop(r);
        let target = Number::new(recipient.info().unwrap().number).unwrap();

        // Each sender deposits its messages one after another, retrying the same id and body
        // after a failure (DEPOSIT is idempotent by id), and records what was acknowledged.
        let acked_total = Arc::new(AtomicUsize::new(0));
        let failed_total = Arc::new(AtomicUsize::new(0));
        let acked: Arc<Mutex<Vec<(usize, usize, Hex16)>>> = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for (i, (profile, mut session)) in senders.into_iter().enumerate() {
            let (target, acked, acked_total, failed_total) = (
                target.clone(),
                Arc::clone(&acked),
                Arc::clone(&acked_total),
                Arc::clone(&failed_total),
            );
            tasks.push(tokio::spawn(async move {
                let mut failures = 0;
                for seq in 0..PER_SENDER {
                    let id = new_message_id();
                    let body = format!("{i}:{seq}").into_bytes();
                    loop {
                        let request = Request::Deposit(DepositArgs {
                            target: target.clone(),
                            id,
                            body: Blob::new(body.clone()),
                        });
                        match session.link.call(request).await {
                            Ok(ResponseData::Deposit(_)) => break,
                            Ok(other) => panic!("{other:?}"),
                            Err(_) => {
                                failures += 1;
                                failed_total.fetch_add(1, Ordering::SeqCst);
                                session = connect_retrying(&profile).await;
                            }
                        }
                    }
                    acked.lock().await.push((i, seq, id));
                    acked_total.fetch_add(1, Ordering::SeqCst);
                }
                failures
            }));
        }
        // Kill the broker mid-burst, then start it again on the same data.
        let deadline = Instant::now() + Duration::from_secs(120);
        while acked_total.load(Ordering::SeqCst) < KILL_AFTER {
            assert!(Instant::now() < deadline, "the burst is too slow");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        broker.kill();
        let at_kill = acked_total.load(Ordering::SeqCst);
        assert!(
            at_kill < SENDERS * PER_SENDER,
            "killed before the end of the burst"
        );
        // Start it again once the kill has reached the senders.
        micromsg_tests::wait::eventually(
            "a sender saw the broker go",
            Duration::from_secs(30),
            async || failed_total.load(Ordering::SeqCst) > 0,
        )
        .await;
        broker.restart().await;
        let mut failures = 0;
        for t in tasks {
            failures += t.await.unwrap();
        }
        assert!(failures > 0, "the kill interrupted the senders");
        let acked = acked.lock().await.clone();
        assert_eq!(acked.len(), SENDERS * PER_SENDER);

        // The recipient reads everything (paged), de-duplicating by id.
        let mut r = connect_retrying(&recipient).await;
        let mut seen: HashSet<Hex16> = HashSet::new();
        let mut order: HashMap<usize, Vec<usize>> = HashMap::new();
        let mut after = None;
        loop {
            let page = match r
                .link
                .call(Request::InboxFetch(InboxFetchArgs {
                    limit: Some(250),
                    after,
                }))
                .await
                .unwrap()
            {
                ResponseData::InboxFetch(p) => p,
                other => panic!("{other:?}"),
            };
            for m in &page.messages {
                if !seen.insert(m.id) {
                    continue;
                }
                let text = String::from_utf8(m.body.as_bytes().to_vec()).unwrap();
                let (i, seq) = text.split_once(':').unwrap();
                order
                    .entry(i.parse().unwrap())
                    .or_default()
                    .push(seq.parse().unwrap());
            }
            match (page.more, page.messages.last()) {
                (true, Some(last)) => after = Some(last.id),
                _ => break,
            }
        }
        for (i, seq, id) in &acked {
            assert!(seen.contains(id), "acknowledged deposit {i}:{seq} was lost");
        }
        for i in 0..SENDERS {
            let got = order.remove(&i).unwrap_or_default();
            assert_eq!(
                got,
                (0..PER_SENDER).collect::<Vec<_>>(),
                "sender {i}: every message exactly once, in order"
            );
        }
        broker.kill();
    }

    /// SIGTERM stops the broker cleanly: it exits with success, its SQLite store is one file
    /// again (the WAL checkpointed and removed, so an operator's copy of `micromsg.db` alone
    /// is whole), and what it held is there after a restart.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sigterm_leaves_the_sqlite_store_in_one_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut broker = BrokerProcess::start(dir.path(), "").await;
        let profile = Profile::new(dir.path().join("a"));
        let registered = account::register(&profile, &broker.addr, &broker.ca, None)
            .await
            .unwrap()
            .info
            .number;
        let db = broker.data_dir().join("micromsg.db");
        let wal = broker.data_dir().join("micromsg.db-wal");
        assert!(wal.exists(), "a serving broker's store has a WAL");

        let status = broker.terminate().await;
        assert!(status.success(), "{status:?}");
        assert!(db.exists());
        assert!(!wal.exists(), "the WAL was left behind after a clean stop");

        broker.restart().await;
        let again = connect_retrying(&profile).await;
        assert_eq!(
            again.info.number, registered,
            "the account survived the stop"
        );
        broker.kill();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sigkill_during_a_burst_of_deposits_sqlite() {
        sigkill_during_a_burst(None).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sigkill_during_a_burst_of_deposits_postgres() {
        let url = micromsg_tests::fresh_postgres_database().await;
        sigkill_during_a_burst(Some(url.clone())).await;
        micromsg_tests::drop_postgres_database(&url).await;
    }
}
