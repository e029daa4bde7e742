//! Group chat through the client agents (docs/groups.md): five members, one offline during the
//! first messages; removal and leave; concurrent changes converge; two devices of one member
//! show the same history (one broker, SQLite); a group across two brokers (both stores); a
//! forged op refused and reported; members who are not contacts reach each other; a `listen`
//! SIGKILLed around its inbox fetch loses no group frame.

use std::collections::BTreeSet;
use std::time::Duration;

use micromsg_client::agent::{self, AcceptPolicy, AgentConfig, AgentHandle, Command, Notice};
use micromsg_client::groups::GroupState;
use micromsg_client::store::Store;
use micromsg_tests::agents::Ask as _;
use micromsg_tests::agents::{self, Device as Member, expect, register};
use micromsg_tests::{Backend, TestBroker};
use tokio::sync::mpsc;

struct Online {
    agent: AgentHandle,
    rx: mpsc::Receiver<Notice>,
}

async fn link_device(broker: &TestBroker, old: &Member, name: &str) -> Member {
    agents::link_device(broker, old, name).await.device
}

async fn online(m: &Member) -> Online {
    let config = AgentConfig {
        offline_after: Duration::from_secs(1),
        ..agents::config(AcceptPolicy::Any)
    };
    let (agent, rx) = agents::online(m, config).await;
    Online { agent, rx }
}

async fn group_message(o: &mut Online, from: &str) -> String {
    expect(&mut o.rx, |n| match n {
        Notice::GroupMessage { from: f, text, .. } if f == from => Some(text.clone()),
        _ => None,
    })
    .await
}

async fn contact(a: &Online, b: &Member) {
    let reply = a
        .agent
        .ask(Command::ContactAdd {
            number: b.number.clone(),
            wait_secs: None,
        })
        .await;
    assert!(reply.ok, "{reply:?}");
}

async fn run(o: &Online, command: Command) -> agent::Reply {
    let reply = o.agent.ask(command).await;
    assert!(reply.ok, "{reply:?}");
    reply
}

async fn send(o: &Online, group: &str, text: &str) {
    run(
        o,
        Command::GroupSend {
            group: group.into(),
            text: text.into(),
        },
    )
    .await;
}

fn state(m: &Member, group: &str) -> Option<GroupState> {
    Store::new(&m.profile)
        .load_group(group)
        .unwrap()
        .map(|g| g.state)
}

/// How long group changes and messages get to reach every member.
const WAIT: Duration = Duration::from_secs(20);

/// Waits until `m`'s state of the group satisfies `ok`.
async fn wait_state(m: &Member, group: &str, ok: impl Fn(&GroupState) -> bool) -> GroupState {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(s) = state(m, group)
            && ok(&s)
        {
            return s;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "group state of {} stuck at {:?}",
            m.number,
            state(m, group)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The texts of `m`'s group history, in order.
fn texts(m: &Member, group: &str) -> Vec<String> {
    Store::new(&m.profile)
        .read_group_history(group)
        .unwrap()
        .into_iter()
        .map(|e| e.text)
        .collect()
}

fn sorted(v: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = v.iter().map(|s| (*s).to_owned()).collect();
    v.sort();
    v
}

fn sorted_texts(m: &Member, group: &str) -> Vec<String> {
    let mut t = texts(m, group);
    t.sort();
    t
}

/// Every pair of `online` becomes contacts.
async fn all_contacts(online: &[&Online], members: &[&Member]) {
    for (i, o) in online.iter().enumerate() {
        for m in members.iter().skip(i + 1) {
            contact(o, m).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_members_one_offline_removal_and_leave() {
    let broker = TestBroker::start(Backend::Sqlite, |_| {}).await;
    let a = register(&broker, "a").await;
    let b = register(&broker, "b").await;
    let c = register(&broker, "c").await;
    let d = register(&broker, "d").await;
    let e = register(&broker, "e").await;
    let mut oa = online(&a).await;
    let mut ob = online(&b).await;
    let mut oc = online(&c).await;
    let mut od = online(&d).await;
    let oe = online(&e).await;
    all_contacts(&[&oa, &ob, &oc, &od, &oe], &[&a, &b, &c, &d, &e]).await;
    // E goes offline before the group exists.
    oe.agent.stop().await.unwrap();

    // A stranger cannot be a member.
    let reply = oa
        .agent
        .ask(Command::GroupCreate {
            name: "friends".into(),
            members: vec![b.number.clone(), "5550000".into()],
        })
        .await;
    assert!(
        !reply.ok && reply.message.contains("not contacts"),
        "{reply:?}"
    );

    let data = run(
        &oa,
        Command::GroupCreate {
            name: "friends".into(),
            members: vec![
                b.number.clone(),
                c.number.clone(),
                d.number.clone(),
                e.number.clone(),
            ],
        },
    )
    .await;
    let data = data.data.unwrap();
    let group = data["group"].as_str().unwrap().to_owned();
    assert_eq!(data["delivered"][&e.number], "deposited");
    let all = [&a, &b, &c, &d, &e].map(|m| m.number.clone());
    for m in [&b, &c, &d] {
        let s = wait_state(m, &group, |s| s.version == 1).await;
        assert_eq!(s.members, all);
        assert_eq!(s.name, "friends");
    }

    // First messages while E is offline; a prefix of the id names the group.
    send(&oa, &group[..6], "hello from a").await;
    send(&ob, &group, "hello from b").await;
    send(&oc, &group, "hello from c").await;
    assert_eq!(group_message(&mut ob, &a.number).await, "hello from a");
    assert_eq!(group_message(&mut oc, &b.number).await, "hello from b");
    assert_eq!(group_message(&mut od, &c.number).await, "hello from c");
    assert_eq!(group_message(&mut oa, &c.number).await, "hello from c");

    // E comes back and gets the group and every message once.
    let oe = online(&e).await;
    wait_state(&e, &group, |s| s.version == 1).await;
    let first = sorted(&["hello from a", "hello from b", "hello from c"]);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while sorted_texts(&e, &group) != first {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{:?}",
            texts(&e, &group)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for m in [&a, &b, &c, &d] {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while sorted_texts(m, &group) != first {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{:?}",
                texts(m, &group)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    // A removes D: D learns of it and gets nothing after.
    run(
        &oa,
        Command::GroupRemove {
            group: group.clone(),
            number: d.number.clone(),
        },
    )
    .await;
    for m in [&a, &b, &c, &d, &e] {
        wait_state(m, &group, |s| !s.is_member(&d.number)).await;
    }
    send(&ob, &group, "after d left").await;
    assert_eq!(group_message(&mut oa, &b.number).await, "after d left");

    // C leaves.
    run(
        &oc,
        Command::GroupLeave {
            group: group.clone(),
        },
    )
    .await;
    for m in [&a, &b, &c, &e] {
        wait_state(m, &group, |s| !s.is_member(&c.number)).await;
    }
    let reply = oc
        .agent
        .ask(Command::GroupSend {
            group: group.clone(),
            text: "not a member".into(),
        })
        .await;
    assert!(!reply.ok, "{reply:?}");
    send(&oe, &group, "last from e").await;
    assert_eq!(group_message(&mut oa, &e.number).await, "last from e");
    assert_eq!(group_message(&mut ob, &e.number).await, "last from e");

    let mut rest = first.clone();
    rest.extend(["after d left".to_owned(), "last from e".to_owned()]);
    rest.sort();
    let mut c_sees = first.clone();
    c_sees.push("after d left".to_owned());
    c_sees.sort();
    // Wait until every history and state is as the assertions below want it. C and D would
    // get a stray message in the same fan-out as the members (the sender answers after it),
    // so by the time the members' copies are in, a stray one would be too.
    micromsg_tests::wait::eventually("the histories and states settled", WAIT, async || {
        [&a, &b, &e].iter().all(|m| sorted_texts(m, &group) == rest)
            && sorted_texts(&c, &group) == c_sees
            && sorted_texts(&d, &group) == first
            && state(&a, &group).is_some_and(|s| s.version == 3)
            && [&b, &e]
                .iter()
                .all(|m| state(m, &group) == state(&a, &group))
    })
    .await;
    for m in [&a, &b, &e] {
        assert_eq!(sorted_texts(m, &group), rest, "{}", m.number);
    }
    assert_eq!(
        sorted_texts(&c, &group),
        c_sees,
        "C sees nothing after leaving"
    );
    assert_eq!(
        sorted_texts(&d, &group),
        first,
        "D sees nothing after its removal"
    );
    let final_state = state(&a, &group).unwrap();
    assert_eq!(final_state.members, [&a, &b, &e].map(|m| m.number.clone()));
    assert_eq!(final_state.version, 3);
    for m in [&b, &e] {
        assert_eq!(state(m, &group).unwrap(), final_state);
    }

    for o in [oa, ob, oc, od, oe] {
        o.agent.stop().await.unwrap();
    }
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_changes_converge() {
    let broker = TestBroker::start(Backend::Sqlite, |_| {}).await;
    let a = register(&broker, "a").await;
    let b = register(&broker, "b").await;
    let c = register(&broker, "c").await;
    let d = register(&broker, "d").await;
    let oa = online(&a).await;
    let ob = online(&b).await;
    let oc = online(&c).await;
    let od = online(&d).await;
    all_contacts(&[&oa, &ob, &oc, &od], &[&a, &b, &c, &d]).await;
    let data = run(
        &oa,
        Command::GroupCreate {
            name: "g".into(),
            members: vec![b.number.clone(), c.number.clone()],
        },
    )
    .await;
    let data = data.data.unwrap();
    let group = data["group"].as_str().unwrap().to_owned();
    for m in [&b, &c] {
        wait_state(m, &group, |s| s.version == 1).await;
    }
    // At the same time: A adds D, B removes C, C renames the group.
    let add = Command::GroupAdd {
        group: group.clone(),
        number: d.number.clone(),
    };
    let remove = Command::GroupRemove {
        group: group.clone(),
        number: c.number.clone(),
    };
    let rename = Command::GroupRename {
        group: group.clone(),
        name: "renamed".into(),
    };
    let (r1, r2, r3) = tokio::join!(
        oa.agent.ask(add),
        ob.agent.ask(remove),
        oc.agent.ask(rename)
    );
    // C's rename may come after B's removal reached C: then C is told it is not a member.
    assert!(r1.ok && r2.ok, "{r1:?} {r2:?}");
    assert!(r3.ok || r3.message.contains("not a member"), "{r3:?}");
    // Everyone still in the group ends with the same state, D included (it learns of B's
    // change through the members that relay it).
    // The ops each member knows (empty before it knows the group).
    let log = |m: &Member| -> BTreeSet<String> {
        Store::new(&m.profile)
            .load_group(&group)
            .unwrap()
            .map(|g| g.log.into_iter().map(|o| o.id).collect())
            .unwrap_or_default()
    };
    // Settled: A, B and D hold the same state and the same ops, and those include every op C
    // made or saw (its rename, when it got one in, went to A and B before C learned of its
    // removal).
    let target = micromsg_tests::wait::eventually_some(
        "A, B and D agree on the group, C's ops included",
        WAIT,
        async || {
            let target = state(&a, &group)?;
            let settled = !target.is_member(&c.number)
                && target.is_member(&d.number)
                && [&b, &d]
                    .iter()
                    .all(|m| state(m, &group).as_ref() == Some(&target))
                && log(&b) == log(&a)
                && log(&d) == log(&a)
                && log(&c).is_subset(&log(&a));
            settled.then_some(target)
        },
    )
    .await;
    for m in [&b, &d] {
        let s = wait_state(m, &group, |s| *s == target).await;
        assert_eq!(s, target);
    }
    let logs: Vec<BTreeSet<String>> = [&a, &b, &d]
        .iter()
        .map(|m| {
            Store::new(&m.profile)
                .load_group(&group)
                .unwrap()
                .unwrap()
                .log
                .into_iter()
                .map(|o| o.id)
                .collect()
        })
        .collect();
    assert_eq!(logs[0], logs[1]);
    assert_eq!(logs[0], logs[2]);
    assert!(target.is_member(&d.number) && !target.is_member(&c.number));
    for o in [oa, ob, oc, od] {
        o.agent.stop().await.unwrap();
    }
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_devices_of_one_member_show_the_same_history() {
    let broker = TestBroker::start(Backend::Sqlite, |_| {}).await;
    let a1 = register(&broker, "a1").await;
    let b = register(&broker, "b").await;
    let c = register(&broker, "c").await;
    let a2 = link_device(&broker, &a1, "a2").await;
    let oa1 = online(&a1).await;
    let ob = online(&b).await;
    let oc = online(&c).await;
    let mut oa2 = online(&a2).await;
    all_contacts(&[&oa1, &ob, &oc], &[&a1, &b, &c]).await;
    for _ in 0..2 {
        expect(&mut oa2.rx, |n| {
            matches!(n, Notice::KeysSynced { .. }).then_some(())
        })
        .await;
    }
    let data = run(
        &ob,
        Command::GroupCreate {
            name: "devices".into(),
            members: vec![a1.number.clone(), c.number.clone()],
        },
    )
    .await;
    let data = data.data.unwrap();
    let group = data["group"].as_str().unwrap().to_owned();
    wait_state(&a1, &group, |s| s.version == 1).await;
    wait_state(&a2, &group, |s| s.version == 1).await;
    send(&ob, &group, "from b").await;
    send(&oc, &group, "from c").await;
    send(&oa1, &group, "from a1").await;
    let want = sorted(&["from a1", "from b", "from c"]);
    for m in [&a1, &a2, &b, &c] {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while sorted_texts(m, &group) != want {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{}: {:?}",
                m.profile.dir().display(),
                texts(m, &group)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let ids = |m: &Member| -> BTreeSet<(String, String)> {
        Store::new(&m.profile)
            .read_group_history(&group)
            .unwrap()
            .into_iter()
            .map(|e| (e.id, e.from))
            .collect()
    };
    assert_eq!(ids(&a1), ids(&a2), "both devices hold the same messages");
    assert_eq!(state(&a1, &group), state(&a2, &group));
    for o in [oa1, ob, oc, oa2] {
        o.agent.stop().await.unwrap();
    }
    broker.stop().await;
}

micromsg_tests::both_backends!(a_group_across_two_brokers);

/// Five members on two brokers of a network (x: 555 has A, B, E; y: 556 has C, D), on both
/// stores: the create, messages from members on either side (live, and deposited across brokers
/// for D, offline during the first messages) reach every member exactly once, and a removal
/// reaches everyone.
async fn a_group_across_two_brokers(backend: Backend) {
    let net =
        micromsg_tests::TestNetwork::start(backend, &[("x", &["555"]), ("y", &["556"])], |_, _| {})
            .await;
    net.wait_linked().await;
    let a = register(net.broker(0), "a").await;
    let b = register(net.broker(0), "b").await;
    let c = register(net.broker(1), "c").await;
    let d = register(net.broker(1), "d").await;
    let e = register(net.broker(0), "e").await;
    let mut oa = online(&a).await;
    let mut ob = online(&b).await;
    let mut oc = online(&c).await;
    let od = online(&d).await;
    let oe = online(&e).await;
    all_contacts(&[&oa, &ob, &oc, &od, &oe], &[&a, &b, &c, &d, &e]).await;
    // D (on y) is offline while the group starts.
    od.agent.stop().await.unwrap();

    let data = run(
        &oa,
        Command::GroupCreate {
            name: "across".into(),
            members: vec![
                b.number.clone(),
                c.number.clone(),
                d.number.clone(),
                e.number.clone(),
            ],
        },
    )
    .await
    .data
    .unwrap();
    let group = data["group"].as_str().unwrap().to_owned();
    assert_eq!(data["delivered"][&d.number], "deposited");
    for m in [&b, &c, &e] {
        wait_state(m, &group, |s| s.version == 1).await;
    }
    send(&oa, &group, "from x").await;
    send(&oc, &group, "from y").await;
    assert_eq!(group_message(&mut oc, &a.number).await, "from x");
    assert_eq!(group_message(&mut ob, &c.number).await, "from y");
    assert_eq!(group_message(&mut oa, &c.number).await, "from y");

    // D comes back: the group and both messages came through x's outbox (and y's own inbox).
    let _od = online(&d).await;
    wait_state(&d, &group, |s| s.version == 1).await;
    let both = sorted(&["from x", "from y"]);
    for m in [&a, &b, &c, &d, &e] {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while sorted_texts(m, &group) != both {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{}: {:?}",
                m.number,
                texts(m, &group)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    // C (on y) removes B (on x); everyone on both brokers applies it.
    run(
        &oc,
        Command::GroupRemove {
            group: group.clone(),
            number: b.number.clone(),
        },
    )
    .await;
    for m in [&a, &b, &c, &d, &e] {
        wait_state(m, &group, |s| !s.is_member(&b.number)).await;
    }
    net.stop().await;
}

/// The real `micromsg listen` SIGKILLed at points around its first inbox fetch (from its
/// start to well past the fetch), one group create waiting for it each time: whatever the point
/// (before the fetch, between storing a frame and the group layer, after), the next agent of
/// the device has every group. Nothing fetched is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_sigkilled_around_an_inbox_fetch_loses_no_group_frame() {
    let broker = TestBroker::start(Backend::Sqlite, |_| {}).await;
    let a = register(&broker, "a").await;
    let b = register(&broker, "b").await;
    let oa = online(&a).await;
    let mut ob = online(&b).await;
    contact(&oa, &b).await;
    agents::session_started(&mut ob.rx, &a.number).await;
    ob.agent.stop().await.unwrap();

    let mut groups = Vec::new();
    for (round, delay_ms) in [0u64, 40, 80, 120, 160, 240, 320, 480]
        .into_iter()
        .enumerate()
    {
        let data = run(
            &oa,
            Command::GroupCreate {
                name: format!("kill {round}"),
                members: vec![b.number.clone()],
            },
        )
        .await
        .data
        .unwrap();
        groups.push(data["group"].as_str().unwrap().to_owned());
        let mut listen = tokio::process::Command::new(env!("CARGO_BIN_EXE_micromsg-test-client"))
            .arg("--profile")
            .arg(b.profile.dir())
            .args(["listen", "--accept", "any"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        listen.start_kill().unwrap(); // SIGKILL
        let _ = listen.wait().await;
    }

    // The next agent of B's device has every group.
    let _ob = online(&b).await;
    let store = Store::new(&b.profile);
    micromsg_tests::wait::eventually(
        "every group created while B's listen was being killed is on B's device",
        Duration::from_secs(30),
        async || {
            groups
                .iter()
                .all(|g| matches!(store.load_group(g), Ok(Some(group)) if group.state.is_member(&b.number)))
        },
    )
    .await;
}

/// A group frame taken from the inbox is acknowledged to the broker together with the inbox
/// state that holds it, and the group layer gets it even when the agent stopped (or was
/// killed) between the two: the next agent of the device finishes it. Here the inbox is taken
/// as the agent's fetch does, and nothing after it runs, which is what a SIGKILL right after
/// the store leaves behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_frame_stored_but_not_applied_is_applied_by_the_next_agent() {
    use micromsg_client::inbox::Arrived;

    let (_broker, a_agent, b, group) = create_for_offline_member("kept").await;

    // B's device takes its inbox (stored, then acknowledged) and stops before the group layer.
    let arrived = agents::take_inbox(&b.profile).await;
    assert!(
        arrived.iter().any(|a| matches!(a, Arrived::Group { .. })),
        "the create came through the inbox: {arrived:?}"
    );
    assert!(
        Store::new(&b.profile).load_group(&group).unwrap().is_none(),
        "the group layer has not run"
    );

    // The next agent of B's device applies it (the broker no longer has it).
    next_agent_has_the_group(&b, &group).await;
    let state = Store::new(&b.profile).load_group(&group).unwrap().unwrap();
    assert_eq!(state.state.name, "kept");
    a_agent.agent.stop().await.unwrap();
}

/// The inbox is stored in steps (session receive state, history, inbox state), each synced;
/// a SIGKILL can fall between two. Here B's device opened A's group create and stored the
/// session's receive state (its offline seen-set now holds the frame's counter), then died
/// before the inbox state that keeps the frame for the group layer: the item is still at the
/// broker, and the next agent must not take it for a repeat and drop it. (The cause of the
/// rare loss in `listen_sigkilled_around_an_inbox_fetch_loses_no_group_frame`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_frame_whose_counter_was_stored_before_the_frame_is_not_lost() {
    use micromsg_client::account;
    use micromsg_crypto::message::OfflineEnvelope;

    let (_broker, a_agent, b, group) = create_for_offline_member("half stored").await;

    // B's device fetches, opens the create and stores the session's receive state, as the
    // agent's fetch does first; killed there: no inbox state, no acknowledgement.
    let mut session = account::connect(&b.profile).await.unwrap();
    let messages = crate::inbox::fetch(&mut session).await;
    let store = Store::new(&b.profile);
    let mut opened = 0;
    for item in messages {
        let body = item.body.into_vec();
        let Ok(envelope) = OfflineEnvelope::decode(&body) else {
            continue;
        };
        let Some(mut found) = store.find_session(&envelope.session_id).unwrap() else {
            continue;
        };
        if found
            .session_mut()
            .open_offline(envelope.frame)
            .unwrap()
            .is_some()
        {
            store.save_found(&found).unwrap();
            opened += 1;
        }
    }
    assert_eq!(opened, 1, "the create, from A's session");
    drop(session);

    // The next agent of B's device has the group.
    next_agent_has_the_group(&b, &group).await;
    assert!(store.load_group(&group).unwrap().is_some());
    a_agent.agent.stop().await.unwrap();
}

/// A and B on one broker, contacts with a session, B's agent stopped; A creates a group `name`
/// with B, whose create goes into B's inbox. Returns the broker, A's running agent, B and the
/// group's id.
async fn create_for_offline_member(name: &str) -> (TestBroker, Online, Member, String) {
    let broker = TestBroker::start(Backend::Sqlite, |_| {}).await;
    let a = register(&broker, "a").await;
    let b = register(&broker, "b").await;
    let oa = online(&a).await;
    let mut ob = online(&b).await;
    contact(&oa, &b).await;
    agents::session_started(&mut ob.rx, &a.number).await;
    ob.agent.stop().await.unwrap();
    let data = run(
        &oa,
        Command::GroupCreate {
            name: name.into(),
            members: vec![b.number.clone()],
        },
    )
    .await
    .data
    .unwrap();
    let group = data["group"].as_str().unwrap().to_owned();
    assert_eq!(data["delivered"][&b.number], "deposited");
    (broker, oa, b, group)
}

/// Starts B's agent again and waits for it to report `group` created; stops it.
async fn next_agent_has_the_group(b: &Member, group: &str) {
    let mut ob = online(b).await;
    expect(&mut ob.rx, |n| match n {
        Notice::GroupChanged {
            group: g, change, ..
        } if g == group => (change == "created").then_some(()),
        _ => None,
    })
    .await;
    ob.agent.stop().await.unwrap();
}

/// Finding 13 (issue 19): B forges A's removal of C and A's rename (signed with B's own key,
/// as B has no other) and sends them to C through the real path (sealed with B's session with
/// C, deposited at the broker, fetched and opened by C's agent). C refuses both, names B as
/// the relay and A as the claimed author, and its state is unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_remove_or_rename_is_refused_and_reported_sqlite() {
    use micromsg_client::account;
    use micromsg_client::groups::{Change, Frame, Op, Payload, new_id, signing};
    use micromsg_crypto::identity::IdentityKey;
    use micromsg_crypto::message::Kind;
    use micromsg_tests::agents::deposit_sealed;

    let broker = TestBroker::start(Backend::Sqlite, |_| {}).await;
    let a = register(&broker, "a").await;
    let b = register(&broker, "b").await;
    let c = register(&broker, "c").await;
    let oa = online(&a).await;
    let ob = online(&b).await;
    let mut oc = online(&c).await;
    all_contacts(&[&oa, &ob, &oc], &[&a, &b, &c]).await;
    let data = run(
        &oa,
        Command::GroupCreate {
            name: "honest".into(),
            members: vec![b.number.clone(), c.number.clone()],
        },
    )
    .await
    .data
    .unwrap();
    let group = data["group"].as_str().unwrap().to_owned();
    wait_state(&c, &group, |s| s.version == 1).await;
    wait_state(&b, &group, |s| s.version == 1).await;
    // B's agent stops, so B's stored session with C is free to seal with.
    ob.agent.stop().await.unwrap();

    let b_key = IdentityKey::from_seed(&b.profile.secrets().unwrap().identity_seed);
    let forge = |lamport: u64, change: Change| {
        let mut op = Op {
            id: new_id(),
            lamport,
            author: a.number.clone(),
            change,
            sig: [0; 64],
        };
        op.sig = signing::sign(&b_key, &group, &op);
        Frame {
            group: group.clone(),
            payload: Payload::Op(Box::new(op)),
        }
    };
    let mut session = account::connect(&b.profile).await.unwrap();
    for frame in [
        forge(2, Change::Remove(c.number.clone())),
        forge(3, Change::Rename("forged".into())),
    ] {
        deposit_sealed(
            &mut session.link,
            &b,
            &c.number,
            Kind::Group,
            &frame.encode(),
        )
        .await;
    }
    for op in ["remove", "rename"] {
        let (relayed_by, author) = expect(&mut oc.rx, |n| match n {
            Notice::GroupOpRefused {
                group: g,
                relayed_by,
                author,
                op: o,
                ..
            } if *g == group && o == op => Some((relayed_by.clone(), author.clone())),
            _ => None,
        })
        .await;
        assert_eq!((relayed_by, author), (b.number.clone(), a.number.clone()));
    }
    let s = state(&c, &group).unwrap();
    assert_eq!(s.members, [&a, &b, &c].map(|m| m.number.clone()));
    assert_eq!((s.name.as_str(), s.version), ("honest", 1));
    let log = Store::new(&c.profile)
        .load_group(&group)
        .unwrap()
        .unwrap()
        .log;
    assert_eq!(log.len(), 1, "refused ops are not stored: {log:?}");
    oc.agent.stop().await.unwrap();
    oa.agent.stop().await.unwrap();
}

/// Finding 14 (issue 19): A is a contact of B and of C; B and C are not contacts (and accept
/// only contacts). A makes a group of the three. B's rename reaches C and verifies there with
/// the key the group carries for B; B's message waits for a session with C, which the agents
/// set up by themselves (C accepts B as a fellow member, the handshake presents the key the
/// group carries); C gets the message, and C's reply reaches B. Before, B's frames to C
/// failed with "not a contact" and were lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_who_are_not_contacts_set_up_a_session_and_talk_sqlite() {
    let broker = TestBroker::start(Backend::Sqlite, |_| {}).await;
    let a = register(&broker, "a").await;
    let b = register(&broker, "b").await;
    let c = register(&broker, "c").await;
    let oa = online(&a).await;
    let ob = online(&b).await;
    let oc = online(&c).await;
    contact(&oa, &b).await;
    contact(&oa, &c).await;
    // B and C now take only contacts (a stranger's request is refused, and blocked).
    ob.agent.stop().await.unwrap();
    oc.agent.stop().await.unwrap();
    let strict = |m: Member| async move {
        let config = AgentConfig {
            offline_after: Duration::from_secs(1),
            ..agents::config(AcceptPolicy::Contacts)
        };
        let (agent, rx) = agents::online(&m, config).await;
        Online { agent, rx }
    };
    let mut ob = strict(b.clone()).await;
    let mut oc = strict(c.clone()).await;
    assert!(Store::new(&b.profile).contact(&c.number).unwrap().is_none());

    let data = run(
        &oa,
        Command::GroupCreate {
            name: "three".into(),
            members: vec![b.number.clone(), c.number.clone()],
        },
    )
    .await
    .data
    .unwrap();
    let group = data["group"].as_str().unwrap().to_owned();
    wait_state(&b, &group, |s| s.version == 1).await;
    wait_state(&c, &group, |s| s.version == 1).await;

    // An honest op of B, who is not C's contact: C verifies it with the key in the state.
    let _ = ob
        .agent
        .ask(Command::GroupRename {
            group: group.clone(),
            name: "renamed by b".into(),
        })
        .await;
    wait_state(&c, &group, |s| s.name == "renamed by b").await;

    // B's message: to A live, to C once the B-C session is up.
    let reply = ob
        .agent
        .ask(Command::GroupSend {
            group: group.clone(),
            text: "hello from b".into(),
        })
        .await;
    assert!(reply.ok || reply.message.contains("queued"), "{reply:?}");
    assert_eq!(group_message(&mut oc, &b.number).await, "hello from b");
    // C pinned the key the group carries for B.
    let pinned = Store::new(&c.profile)
        .contact(&b.number)
        .unwrap()
        .unwrap()
        .identity
        .unwrap();
    assert_eq!(state(&c, &group).unwrap().keys[&b.number], pinned);

    send(&oc, &group, "hello from c").await;
    assert_eq!(group_message(&mut ob, &c.number).await, "hello from c");
    for o in [oa, ob, oc] {
        o.agent.stop().await.unwrap();
    }
}

/// Finding 14, the member that is offline: B's group message for C (not B's contact) waits
/// while C is offline; once C is back, B's agent asks again by itself (`member_retry`) and the
/// message arrives. Before, B asked once, when the message was queued, and never again while
/// it ran, so the message waited until B's agent restarted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_message_for_an_offline_member_goes_out_once_it_is_back_sqlite() {
    let broker = TestBroker::start(Backend::Sqlite, |_| {}).await;
    let a = register(&broker, "a").await;
    let b = register(&broker, "b").await;
    let c = register(&broker, "c").await;
    let oa = online(&a).await;
    let ob = online(&b).await;
    let oc = online(&c).await;
    contact(&oa, &b).await;
    contact(&oa, &c).await;
    ob.agent.stop().await.unwrap();
    oc.agent.stop().await.unwrap();
    let retrying = |m: Member| async move {
        let config = AgentConfig {
            offline_after: Duration::from_secs(1),
            answer_timeout: Duration::from_secs(2),
            member_retry: Duration::from_secs(1),
            ..agents::config(AcceptPolicy::Contacts)
        };
        let (agent, rx) = agents::online(&m, config).await;
        Online { agent, rx }
    };
    let ob = retrying(b.clone()).await;

    // C is offline: the create reaches its inbox; B's message waits for a session with C.
    let data = run(
        &oa,
        Command::GroupCreate {
            name: "three".into(),
            members: vec![b.number.clone(), c.number.clone()],
        },
    )
    .await
    .data
    .unwrap();
    let group = data["group"].as_str().unwrap().to_owned();
    wait_state(&b, &group, |s| s.version == 1).await;
    let reply = ob
        .agent
        .ask(Command::GroupSend {
            group: group.clone(),
            text: "while you were away".into(),
        })
        .await;
    assert!(reply.ok || reply.message.contains("queued"), "{reply:?}");
    // Long enough for B's first request to C to have failed or timed out.
    tokio::time::sleep(Duration::from_secs(3)).await;

    let mut oc = retrying(c.clone()).await;
    assert_eq!(
        group_message(&mut oc, &b.number).await,
        "while you were away"
    );
    for o in [oa, ob, oc] {
        o.agent.stop().await.unwrap();
    }
}
