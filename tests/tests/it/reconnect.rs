//! Agents that stay up: the broker killed (SIGKILL) and restarted under running agents, and an
//! agent started before its broker (issue 18: reconnect). The broker is the real binary in a
//! child process; the agents are what `micromsg listen` runs.

use std::path::Path;
use std::time::Duration;

use micromsg_client::agent::{self, AcceptPolicy, AgentConfig, AgentHandle, Command, Notice};
use micromsg_tests::agents::Ask as _;
use micromsg_tests::agents::{
    self, Device, contact_add, expect, message_from, send, session_started,
};
use tokio::sync::mpsc;

use crate::process::BrokerProcess;

/// The reconnect cap of these agents: each must be back within it (plus a login) once the
/// broker listens again.
const RECONNECT_MAX: Duration = Duration::from_secs(2);

fn config() -> AgentConfig {
    AgentConfig {
        wait_for_broker: true,
        reconnect_initial: Duration::from_millis(200),
        reconnect_max: RECONNECT_MAX,
        ..agents::config(AcceptPolicy::Any)
    }
}

async fn register(broker: &BrokerProcess, dir: &Path, name: &str) -> Device {
    agents::register_at(&broker.addr, &broker.ca, dir.join(name)).await
}

async fn start(device: &Device) -> (AgentHandle, mpsc::Receiver<Notice>) {
    let (tx, rx) = mpsc::channel(1024);
    let handle = agent::start(device.profile.clone(), config(), tx)
        .await
        .unwrap();
    (handle, rx)
}

async fn broker_lost(rx: &mut mpsc::Receiver<Notice>) -> u64 {
    expect(rx, |n| match n {
        Notice::BrokerLost { retry_in_secs, .. } => Some(*retry_in_secs),
        _ => None,
    })
    .await
}

async fn broker_back(rx: &mut mpsc::Receiver<Notice>) -> u64 {
    expect(rx, |n| match n {
        Notice::BrokerBack { offline_secs } => Some(*offline_secs),
        _ => None,
    })
    .await
}

/// Three agents; the broker is SIGKILLed and restarted. Each agent says the broker is gone,
/// keeps running, and is logged in again within the backoff cap once the broker is up. The
/// live session between two of them carries messages both ways through the outage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_agents_ride_out_a_broker_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = BrokerProcess::start(dir.path(), "").await;
    let (a, b, c) = (
        register(&broker, dir.path(), "a").await,
        register(&broker, dir.path(), "b").await,
        register(&broker, dir.path(), "c").await,
    );
    let (a_agent, mut a_rx) = start(&a).await;
    let (b_agent, mut b_rx) = start(&b).await;
    let (c_agent, mut c_rx) = start(&c).await;
    assert!(contact_add(&a_agent, &b.number).await.ok);
    session_started(&mut a_rx, &b.number).await;
    session_started(&mut b_rx, &a.number).await;

    broker.kill();
    for rx in [&mut a_rx, &mut b_rx, &mut c_rx] {
        let retry = broker_lost(rx).await;
        assert!(retry <= RECONNECT_MAX.as_secs(), "first retry in {retry} s");
    }

    // Peer to peer needs no broker: the session goes on through the outage.
    let reply = send(&a_agent, &b.number, "during the outage").await;
    assert!(reply.ok, "{reply:?}");
    assert_eq!(
        message_from(&mut b_rx, &a.number).await,
        ("during the outage".to_owned(), false)
    );
    let reply = send(&b_agent, &a.number, "still here").await;
    assert!(reply.ok, "{reply:?}");
    assert_eq!(
        message_from(&mut a_rx, &b.number).await,
        ("still here".to_owned(), false)
    );
    // What needs the broker says so at once, and the agent stays up.
    let reply = contact_add(&c_agent, &a.number).await;
    assert!(!reply.ok);
    assert!(
        reply.message.contains("not connected to the broker"),
        "{reply:?}"
    );

    broker.restart().await;
    let up = tokio::time::Instant::now();
    for rx in [&mut a_rx, &mut b_rx, &mut c_rx] {
        broker_back(rx).await;
    }
    // Within the cap (plus a login; generous for a loaded machine).
    assert!(
        up.elapsed() < RECONNECT_MAX + Duration::from_secs(8),
        "back after {:?}",
        up.elapsed()
    );

    // Logged in for real: a new contact request goes through the broker.
    let reply = contact_add(&c_agent, &a.number).await;
    assert!(reply.ok, "{reply:?}");
    session_started(&mut c_rx, &a.number).await;
    // And the session that rode out the outage still carries messages.
    assert!(send(&a_agent, &b.number, "after").await.ok);
    // (With the broker back, the copy deposited for b's other devices may beat the live frame,
    // so the offline flag is not asserted here.)
    assert_eq!(message_from(&mut b_rx, &a.number).await.0, "after");
    for agent in [a_agent, b_agent, c_agent] {
        agent.stop().await.unwrap();
    }
}

/// `listen` started while its broker is down waits for it, then logs in; a one-shot agent
/// (which does not wait) says at once that the broker is out of reach.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_started_before_its_broker_waits_then_connects() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = BrokerProcess::start(dir.path(), "").await;
    let a = register(&broker, dir.path(), "a").await;
    broker.kill();

    let (tx, _rx) = mpsc::channel(16);
    let one_shot = AgentConfig {
        wait_for_broker: false,
        ..config()
    };
    let err = agent::start(a.profile.clone(), one_shot, tx)
        .await
        .expect_err("a one-shot agent does not wait for the broker");
    assert!(err.to_string().contains("cannot connect"), "{err}");

    let (a_agent, mut a_rx) = start(&a).await;
    expect(&mut a_rx, |n| {
        matches!(n, Notice::Listening { .. }).then_some(())
    })
    .await;
    broker_lost(&mut a_rx).await;
    let reply = a_agent.ask(Command::Inbox).await;
    assert!(!reply.ok, "{reply:?}");

    broker.restart().await;
    broker_back(&mut a_rx).await;
    let reply = a_agent.ask(Command::Inbox).await;
    assert!(reply.ok, "{reply:?}");
    a_agent.stop().await.unwrap();
}

/// Keys of a session that another device replaced long ago (`keys/`), kept for device 2.
fn plant_kept_sessions(device: &Device) -> ([u8; 16], [u8; 16]) {
    let store = micromsg_client::store::Store::new(&device.profile);
    store
        .save_shared(&agents::kept_session(1, 2, "5550002", 1000))
        .unwrap();
    store
        .save_shared(&agents::kept_session(2, 2, "5550002", 999))
        .unwrap();
    ([1; 16], [2; 16])
}

/// An agent that starts while its broker is down does not clean up `keys/` with the built-in
/// message lifetime: it waits for the broker's, and cleans up when it first logs in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_started_offline_cleans_up_old_keys_only_once_it_has_logged_in() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = BrokerProcess::start(dir.path(), "").await;
    let a = register(&broker, dir.path(), "a").await;
    let (replaced, newest) = plant_kept_sessions(&a);
    let kept = || -> Vec<[u8; 16]> {
        let store = micromsg_client::store::Store::new(&a.profile);
        let mut ids: Vec<[u8; 16]> = store
            .shared_sessions()
            .unwrap()
            .iter()
            .map(|s| s.session.session_id)
            .collect();
        ids.sort_unstable();
        ids
    };
    assert_eq!(kept(), [replaced, newest]);
    broker.kill();

    let (tx, mut a_rx) = mpsc::channel(1024);
    let config = AgentConfig {
        keep_replaced_keys: Duration::from_secs(1),
        ..config()
    };
    let a_agent = agent::start(a.profile.clone(), config, tx).await.unwrap();
    broker_lost(&mut a_rx).await;
    // The check at start has run (offline, it does nothing) and the next is hours away.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        kept(),
        [replaced, newest],
        "cleaned up before the broker's limits were read"
    );

    broker.restart().await;
    broker_back(&mut a_rx).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while kept() != [newest] {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not cleaned up after the login: {:?}",
            kept()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    a_agent.stop().await.unwrap();
}

/// Messages sent while the broker is down are queued on the device, survive a restart of the
/// agent, and go out by themselves once the broker is back: each exactly once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_queued_in_an_outage_survive_an_agent_restart_and_arrive_once_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = BrokerProcess::start(dir.path(), "").await;
    let a = register(&broker, dir.path(), "a").await;
    let b = register(&broker, dir.path(), "b").await;
    let (a_agent, mut a_rx) = start(&a).await;
    let (b_agent, _b_rx) = start(&b).await;
    assert!(contact_add(&a_agent, &b.number).await.ok);
    session_started(&mut a_rx, &b.number).await;
    b_agent.stop().await.unwrap();
    agents::session_ended(&mut a_rx, &b.number).await;

    broker.kill();
    broker_lost(&mut a_rx).await;
    let texts = ["first", "second", "third"];
    for text in texts {
        let reply = send(&a_agent, &b.number, text).await;
        assert!(reply.ok, "{reply:?}");
        let data = reply.data.clone().unwrap();
        assert_eq!(data["delivered"], "queued", "{reply:?}");
    }
    // The agent stops and starts again while the broker is still down: the outbox is on disk.
    a_agent.stop().await.unwrap();
    let queued = micromsg_client::outbox::Outbox::new(&a.profile)
        .load()
        .unwrap();
    let queued_texts: Vec<&str> = queued.iter().map(|q| q.text.as_str()).collect();
    assert_eq!(queued_texts, texts);
    let (a_agent, mut a_rx) = start(&a).await;
    broker_lost(&mut a_rx).await;

    broker.restart().await;
    broker_back(&mut a_rx).await;
    for _ in texts {
        expect(&mut a_rx, |n| {
            matches!(n, Notice::QueuedSent { to, .. } if *to == b.number).then_some(())
        })
        .await;
    }
    // The file is rewritten once the round of deposits is over.
    micromsg_tests::wait::eventually(
        "the outbox file empty once everything went out",
        Duration::from_secs(10),
        async || {
            micromsg_client::outbox::Outbox::new(&a.profile)
                .load()
                .unwrap()
                .is_empty()
        },
    )
    .await;
    let (b_agent, mut b_rx) = start(&b).await;
    for text in texts {
        assert_eq!(
            message_from(&mut b_rx, &a.number).await,
            (text.to_owned(), true)
        );
    }
    agents::expect_none(&mut b_rx, Duration::from_millis(500), |n| {
        matches!(n, Notice::Message { .. })
    })
    .await;
    a_agent.stop().await.unwrap();
    b_agent.stop().await.unwrap();
}

/// `group send` while the broker is down: the member without a live session is named as not
/// reached yet and the command fails, the copy waits in the outbox, and the member gets it once
/// the broker is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_send_names_the_members_it_could_not_reach_and_their_copies_go_out_later() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = BrokerProcess::start(dir.path(), "").await;
    let a = register(&broker, dir.path(), "a").await;
    let b = register(&broker, dir.path(), "b").await;
    let (a_agent, mut a_rx) = start(&a).await;
    let (b_agent, mut b_rx) = start(&b).await;
    assert!(contact_add(&a_agent, &b.number).await.ok);
    session_started(&mut a_rx, &b.number).await;
    let reply = a_agent
        .ask(Command::GroupCreate {
            name: "two".into(),
            members: vec![b.number.clone()],
        })
        .await;
    assert!(reply.ok, "{reply:?}");
    let group = reply.data.unwrap()["group"].as_str().unwrap().to_owned();
    expect(&mut b_rx, |n| {
        matches!(n, Notice::GroupChanged { group: g, .. } if *g == group).then_some(())
    })
    .await;
    b_agent.stop().await.unwrap();
    agents::session_ended(&mut a_rx, &b.number).await;

    broker.kill();
    broker_lost(&mut a_rx).await;
    let reply = a_agent
        .ask(Command::GroupSend {
            group: group.clone(),
            text: "while it was down".into(),
        })
        .await;
    assert!(!reply.ok, "{reply:?}");
    assert!(reply.message.contains("not yet to"), "{}", reply.message);
    assert!(reply.message.contains(&b.number), "{}", reply.message);
    let queued = micromsg_client::outbox::Outbox::new(&a.profile)
        .load()
        .unwrap();
    assert_eq!(queued.len(), 1, "{queued:?}");
    assert_eq!(queued[0].group.as_deref(), Some(group.as_str()));

    broker.restart().await;
    broker_back(&mut a_rx).await;
    let (b_agent, mut b_rx) = start(&b).await;
    let text = expect(&mut b_rx, |n| match n {
        Notice::GroupMessage { group: g, text, .. } if *g == group => Some(text.clone()),
        _ => None,
    })
    .await;
    assert_eq!(text, "while it was down");
    a_agent.stop().await.unwrap();
    b_agent.stop().await.unwrap();
}

/// A message sent live during an outage still reaches the sender's other devices: its copies
/// (SYNC-COPY for this entity's devices, DEPOSIT for the contact's) wait in the outbox under
/// their ids and go out once the broker is back, where before they were only warned about and
/// lost. The user is warned once while copies wait, not for each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_of_a_message_sent_live_in_an_outage_go_out_when_the_broker_is_back() {
    use micromsg_client::outbox::{CopyFor, Outbox};
    let dir = tempfile::tempdir().unwrap();
    let mut broker = BrokerProcess::start(dir.path(), "").await;
    let a1 = register(&broker, dir.path(), "a1").await;
    let b = register(&broker, dir.path(), "b").await;
    let a2 = agents::link_device_at(&broker.addr, &broker.ca, dir.path().join("a2"), &a1)
        .await
        .device;
    let (a1_agent, mut a1_rx) = start(&a1).await;
    let (b_agent, mut b_rx) = start(&b).await;
    assert!(contact_add(&a1_agent, &b.number).await.ok);
    session_started(&mut a1_rx, &b.number).await;

    broker.kill();
    broker_lost(&mut a1_rx).await;
    let texts = ["sent live in the outage", "and another one"];
    for text in texts {
        let reply = send(&a1_agent, &b.number, text).await;
        assert!(reply.ok, "{reply:?}");
        assert_eq!(message_from(&mut b_rx, &a1.number).await.0, text);
    }
    let mut copies: Vec<Option<CopyFor>> = Outbox::new(&a1.profile)
        .load()
        .unwrap()
        .iter()
        .map(|q| q.copy)
        .collect();
    copies.sort_by_key(|c| format!("{c:?}"));
    assert_eq!(
        copies,
        [
            Some(CopyFor::Contact),
            Some(CopyFor::Contact),
            Some(CopyFor::OwnDevices),
            Some(CopyFor::OwnDevices)
        ],
        "both copies of each message wait on the device"
    );
    // The agent answers commands in order, so once STATUS is answered every notice of the
    // sends is in the channel: the user was told once that copies wait, not once per copy.
    let _ = a1_agent.command(Command::Status).await;
    let mut told = Vec::new();
    while let Ok(notice) = a1_rx.try_recv() {
        if let Notice::Warning { message } = notice
            && message.contains("queued on this device")
        {
            told.push(message);
        }
    }
    assert_eq!(told.len(), 1, "one warning while copies wait: {told:?}");

    broker.restart().await;
    broker_back(&mut a1_rx).await;
    micromsg_tests::wait::eventually("the copies went out", Duration::from_secs(30), async || {
        Outbox::new(&a1.profile).load().unwrap().is_empty()
    })
    .await;
    // The other device reads what was sent from the first, as sent by this entity.
    let (a2_agent, mut a2_rx) = start(&a2).await;
    let mut copies = Vec::new();
    for _ in texts {
        copies.push(
            expect(&mut a2_rx, |n| match n {
                Notice::SentElsewhere { to, text, .. } if *to == b.number => Some(text.clone()),
                _ => None,
            })
            .await,
        );
    }
    copies.sort();
    let mut sent = texts.map(str::to_owned).to_vec();
    sent.sort();
    assert_eq!(copies, sent);
    for agent in [a1_agent, a2_agent, b_agent] {
        agent.stop().await.unwrap();
    }
}

/// The operator restarts the broker with another nonce step (`auth.nonce_step_secs`) under a
/// running agent: the agent's next LOGIN, proved with the step its profile kept, is refused;
/// it reads the new step from BROKER-INFO, logs in with it and keeps it, and stays up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_learns_a_nonce_step_changed_while_its_broker_was_down() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = BrokerProcess::start(dir.path(), "").await;
    let (a, b) = (
        register(&broker, dir.path(), "a").await,
        register(&broker, dir.path(), "b").await,
    );
    let (a_agent, mut a_rx) = start(&a).await;
    let (b_agent, mut b_rx) = start(&b).await;

    broker.terminate().await;
    broker.set_env("MICROMSG_AUTH_NONCE_STEP_SECS", "30");
    broker.restart().await;
    for (device, rx) in [(&a, &mut a_rx), (&b, &mut b_rx)] {
        broker_back(rx).await;
        assert_eq!(device.profile.info().unwrap().nonce_step, 30);
    }

    // Logged in for real: a contact request goes through the broker to the other agent.
    let reply = contact_add(&a_agent, &b.number).await;
    assert!(reply.ok, "{reply:?}");
    session_started(&mut a_rx, &b.number).await;
    for agent in [a_agent, b_agent] {
        agent.stop().await.unwrap();
    }
}
