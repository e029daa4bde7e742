//! `micromsg move` (issue 22, item 2; protocol.md 12.13): A and B are contacts on broker X and
//! in a group with C; A moves to broker Y with a new number, keeping the identity key. B's and
//! C's clients follow the signed notice (same name, pinned key, safety number and history),
//! the brokers' contact pair is set up again with no request for anyone to accept, and
//! messages flow both ways again, live and offline; the group keeps working. A notice signed
//! with another key is refused and shown, and changes nothing. The `move` command line, run as
//! a child process, prints its documented object and switches the profile.

use std::time::Duration;

use micromsg_client::account;
use micromsg_client::agent::{AcceptPolicy, AgentConfig, AgentHandle, Command, Notice};
use micromsg_client::groups::GroupState;
use micromsg_client::inbox::Arrived;
use micromsg_client::move_account::{STAGE, move_to};
use micromsg_client::moving::Moved;
use micromsg_client::store::{Direction, Store, safety_number_with};
use micromsg_crypto::Secret32;
use micromsg_crypto::identity::IdentityKey;
use micromsg_crypto::message::Kind;
use micromsg_tests::agents::Ask as _;
use micromsg_tests::agents::{
    self, Device, contact_add, deposit_sealed, expect, message_from, register, send, session_ended,
    session_started,
};
use micromsg_tests::{Backend, TestBroker, TestNetwork};
use tokio::sync::mpsc;

micromsg_tests::both_backends!(a_contact_moves_to_another_broker_and_everything_follows);

const X: usize = 0;
const Y: usize = 1;

fn config(accept: AcceptPolicy) -> AgentConfig {
    AgentConfig {
        offline_after: Duration::from_secs(2),
        ..agents::config(accept)
    }
}

/// The client binary run as a user runs it, on `d`'s profile, to its end.
fn run_client(d: &Device, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_micromsg-test-client"))
        .arg("--profile")
        .arg(d.profile.dir())
        .args(args)
        .env_remove("MICROMSG_PROFILE")
        .output()
        .unwrap()
}

async fn online(d: &Device, accept: AcceptPolicy) -> (AgentHandle, mpsc::Receiver<Notice>) {
    agents::online(d, config(accept)).await
}

fn safety(of: &Device, peer: &str) -> String {
    let own = IdentityKey::from_seed(&of.profile.secrets().unwrap().identity_seed).public_key();
    let number = of.profile.info().unwrap().number;
    let contact = Store::new(&of.profile).contact(peer).unwrap().unwrap();
    safety_number_with(
        &number,
        &own,
        peer,
        &contact.identity.unwrap(),
        Some(&contact),
    )
    .unwrap()
}

fn group_state(d: &Device, group: &str) -> Option<GroupState> {
    Store::new(&d.profile)
        .load_group(group)
        .unwrap()
        .map(|g| g.state)
}

async fn wait_group(d: &Device, group: &str, ok: impl Fn(&GroupState) -> bool) -> GroupState {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(s) = group_state(d, group)
            && ok(&s)
        {
            return s;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "group state of {} stuck at {:?}",
            d.number,
            group_state(d, group)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn group_message(rx: &mut mpsc::Receiver<Notice>, from: &str) -> String {
    expect(rx, |n| match n {
        Notice::GroupMessage { from: f, text, .. } if f == from => Some(text.clone()),
        _ => None,
    })
    .await
}

/// Waits for `ContactMoved` from `old`, failing on a contact request meanwhile (nobody has
/// to accept anything after a move).
async fn followed(rx: &mut mpsc::Receiver<Notice>, old: &str) -> String {
    expect(rx, |n| match n {
        Notice::ContactMoved { old: o, new, .. } if o == old => Some(new.clone()),
        Notice::MoveRefused { reason, .. } => panic!("the genuine notice was refused: {reason}"),
        Notice::ContactRequest { from, .. } => panic!("{from} asked to be a contact"),
        _ => None,
    })
    .await
}

/// A session with `peer` comes up, and no contact request for the user on the way.
async fn session_without_asking(rx: &mut mpsc::Receiver<Notice>, peer: &str) {
    expect(rx, |n| match n {
        Notice::SessionStarted { peer: p, .. } if p == peer => Some(()),
        Notice::ContactRequest { from, .. } => panic!("{from} asked to be a contact"),
        _ => None,
    })
    .await;
}

async fn a_contact_moves_to_another_broker_and_everything_follows(backend: Backend) {
    let net = TestNetwork::start(backend, &[("x", &["555"]), ("y", &["556"])], |_, _| {}).await;
    net.wait_linked().await;
    let a = register(net.broker(X), "a").await;
    let b = register(net.broker(X), "b").await;
    let c = register(net.broker(X), "c").await;

    // Before: A, B and C are contacts on X, in a group A made; B named A.
    let (oa, mut a_rx) = online(&a, AcceptPolicy::Any).await;
    let (ob, mut b_rx) = online(&b, AcceptPolicy::Any).await;
    let (oc, _c_rx) = online(&c, AcceptPolicy::Any).await;
    for (from, to) in [(&oa, &b), (&oa, &c), (&ob, &c)] {
        let reply = contact_add(from, &to.number).await;
        assert!(reply.ok, "{reply:?}");
    }
    let reply = ob
        .ask(Command::ContactName {
            number: a.number.clone(),
            name: Some("Alice".into()),
        })
        .await;
    assert!(reply.ok, "{reply:?}");
    let reply = oa
        .ask(Command::GroupCreate {
            name: "trio".into(),
            members: vec![b.number.clone(), c.number.clone()],
        })
        .await;
    assert!(reply.ok, "{reply:?}");
    let group = reply.data.unwrap()["group"].as_str().unwrap().to_owned();
    wait_group(&b, &group, |s| s.version == 1).await;
    wait_group(&c, &group, |s| s.version == 1).await;
    assert!(send(&oa, &b.number, "before the move").await.ok);
    assert_eq!(
        message_from(&mut b_rx, &a.number).await.0,
        "before the move"
    );
    assert!(send(&ob, &a.number, "reply before").await.ok);
    assert_eq!(message_from(&mut a_rx, &b.number).await.0, "reply before");
    for o in [oa, ob, oc] {
        o.stop().await.unwrap();
    }
    let before = Store::new(&b.profile).contact(&a.number).unwrap().unwrap();
    let b_safety = safety(&b, &a.number);
    let a_safety = safety(&a, &b.number);
    assert_eq!(a_safety, b_safety);

    // Something waits in A's old inbox: `move` fetches it first.
    let (ob, _b_rx) = online(&b, AcceptPolicy::Ask).await;
    let reply = send(&ob, &a.number, "waiting in the old inbox").await;
    assert_eq!(reply.data.unwrap()["delivered"], "deposited");
    ob.stop().await.unwrap();
    let b_history = Store::new(&b.profile).read_history(&a.number).unwrap();
    assert_eq!(b_history.len(), 3);

    // A moves to Y.
    let y = net.broker(Y);
    let done = move_to(&a.profile, &y.addr, &y.ca, None, Default::default(), |_| {})
        .await
        .unwrap();
    assert_eq!(done.old_number, a.number);
    assert!(done.new_number.starts_with("556"), "{done:?}");
    assert_eq!(done.fetched, 1);
    assert_eq!(done.report.notified[&b.number], "deposited");
    assert_eq!(done.report.notified[&c.number], "deposited");
    assert_eq!(done.report.groups, std::slice::from_ref(&group));
    let info = a.profile.info().unwrap();
    assert_eq!(
        (info.number.as_str(), info.broker.as_str()),
        (done.new_number.as_str(), y.addr.as_str())
    );
    assert!(!a.profile.path(STAGE).exists());
    let old_texts: Vec<String> = Store::new(&a.profile)
        .read_history(&b.number)
        .unwrap()
        .into_iter()
        .map(|e| e.text)
        .collect();
    assert_eq!(
        old_texts,
        [
            "before the move",
            "reply before",
            "waiting in the old inbox"
        ]
    );
    let a_new = Device {
        profile: a.profile.clone(),
        number: done.new_number.clone(),
    };

    // B and C (asking before accepting anyone) follow the notice from their inboxes.
    let (ob, mut b_rx) = online(&b, AcceptPolicy::Ask).await;
    assert_eq!(followed(&mut b_rx, &a.number).await, a_new.number);
    let (oc, mut c_rx) = online(&c, AcceptPolicy::Ask).await;
    assert_eq!(followed(&mut c_rx, &a.number).await, a_new.number);
    let store_b = Store::new(&b.profile);
    assert!(store_b.contact(&a.number).unwrap().is_none());
    let after = store_b.contact(&a_new.number).unwrap().unwrap();
    assert_eq!(after.name.as_deref(), Some("Alice"));
    assert_eq!(after.identity, before.identity);
    assert_eq!(safety(&b, &a_new.number), b_safety);
    assert_eq!(safety(&a_new, &b.number), a_safety);
    assert_eq!(store_b.read_history(&a_new.number).unwrap(), b_history);
    assert!(store_b.read_history(&a.number).unwrap().is_empty());
    let s = wait_group(&b, &group, |s| s.is_member(&a_new.number)).await;
    assert_eq!(s.members, [&a_new, &b, &c].map(|d| d.number.clone()));
    wait_group(&c, &group, |s| s.is_member(&a_new.number)).await;

    // A comes online at Y: the contact pair is set up again without anyone accepting.
    let (oa, mut a_rx) = online(&a_new, AcceptPolicy::Ask).await;
    session_without_asking(&mut a_rx, &b.number).await;
    session_without_asking(&mut b_rx, &a_new.number).await;

    // Live, both ways.
    let reply = send(&oa, &b.number, "hello from Y").await;
    assert_eq!(reply.data.unwrap()["delivered"], "live");
    assert_eq!(
        message_from(&mut b_rx, &a_new.number).await.0,
        "hello from Y"
    );
    let reply = send(&ob, &a_new.number, "hello to Y").await;
    assert_eq!(reply.data.unwrap()["delivered"], "live");
    assert_eq!(message_from(&mut a_rx, &b.number).await.0, "hello to Y");

    // The group, both ways.
    let reply = oa
        .ask(Command::GroupSend {
            group: group.clone(),
            text: "group from Y".into(),
        })
        .await;
    assert!(reply.ok, "{reply:?}");
    assert_eq!(
        group_message(&mut b_rx, &a_new.number).await,
        "group from Y"
    );
    assert_eq!(
        group_message(&mut c_rx, &a_new.number).await,
        "group from Y"
    );
    let reply = ob
        .ask(Command::GroupSend {
            group: group.clone(),
            text: "group to Y".into(),
        })
        .await;
    assert!(reply.ok, "{reply:?}");
    assert_eq!(group_message(&mut a_rx, &b.number).await, "group to Y");

    // Offline, both ways: A away, then B away. Before each stop, the session between the two
    // is up on both sides, so no handshake is cut in half (keys on one side only).
    oa.stop().await.unwrap();
    session_ended(&mut b_rx, &a_new.number).await;
    let reply = send(&ob, &a_new.number, "while A is away").await;
    assert_eq!(
        reply.data.clone().unwrap()["delivered"],
        "deposited",
        "{reply:?}"
    );
    let (oa, mut a_rx) = online(&a_new, AcceptPolicy::Ask).await;
    assert_eq!(
        message_from(&mut a_rx, &b.number).await,
        ("while A is away".to_owned(), true)
    );
    // Live again (a message that found no session asks for one, which B's agent accepts).
    assert!(send(&oa, &b.number, "back").await.ok);
    session_started(&mut a_rx, &b.number).await;
    session_started(&mut b_rx, &a_new.number).await;
    ob.stop().await.unwrap();
    session_ended(&mut a_rx, &b.number).await;
    let reply = send(&oa, &b.number, "while B is away").await;
    assert_eq!(
        reply.data.clone().unwrap()["delivered"],
        "deposited",
        "{reply:?}"
    );
    let (ob, mut b_rx) = online(&b, AcceptPolicy::Ask).await;
    assert_eq!(
        message_from(&mut b_rx, &a_new.number).await,
        ("while B is away".to_owned(), true)
    );
    let in_b: Vec<(Direction, String)> = store_b
        .read_history(&a_new.number)
        .unwrap()
        .into_iter()
        .map(|e| (e.direction, e.text))
        .collect();
    assert_eq!(in_b.first().map(|e| e.1.as_str()), Some("before the move"));
    assert!(in_b.contains(&(Direction::In, "while B is away".into())));
    assert!(in_b.contains(&(Direction::Out, "while A is away".into())));

    for o in [oa, ob, oc] {
        o.stop().await.unwrap();
    }
    net.stop().await;
}

/// A *moved* notice signed with another key than the one B pinned for A, carried in A's own
/// session (so only the signature is wrong): refused, shown as a warning, B's contact
/// unchanged. Then the genuine notice with the same content is followed, and a replay of it
/// (the same time) is ignored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_notice_is_refused_and_changes_nothing() {
    let (broker, a, b) = contacts_both_stopped().await;
    let store_b = Store::new(&b.profile);
    let before = store_b.contact(&a.number).unwrap().unwrap();

    let moved = moved_elsewhere(&a);
    let forger = IdentityKey::from_seed(&Secret32::from_bytes([0x42; 32]));
    let genuine = IdentityKey::from_seed(&a.profile.secrets().unwrap().identity_seed);
    let deposit = |notice: Vec<u8>| deposit_notice(&a, &b, notice);

    deposit(moved.sign(&forger).unwrap()).await;
    let (ob, mut b_rx) = online(&b, AcceptPolicy::Ask).await;
    let (from, reason) = expect(&mut b_rx, |n| match n {
        Notice::MoveRefused { from, reason } => Some((from.clone(), reason.clone())),
        Notice::ContactMoved { .. } => panic!("a forged notice was followed"),
        _ => None,
    })
    .await;
    assert_eq!(from, a.number);
    assert!(
        reason.contains("not signed by the identity key pinned"),
        "{reason}"
    );
    assert_eq!(store_b.contact(&a.number).unwrap().unwrap(), before);
    assert!(store_b.contact(&moved.new).unwrap().is_none());
    ob.stop().await.unwrap();

    // The genuine one is followed; the same notice again is not a second move.
    deposit(moved.sign(&genuine).unwrap()).await;
    let (ob, mut b_rx) = online(&b, AcceptPolicy::Ask).await;
    assert_eq!(followed(&mut b_rx, &a.number).await, moved.new);
    let after = store_b.contact(&moved.new).unwrap().unwrap();
    assert_eq!(
        (after.identity, after.moved_at, &after.former),
        (before.identity, Some(moved.time), &vec![a.number.clone()])
    );
    assert_eq!(store_b.read_history(&moved.new).unwrap().len(), 1);
    ob.stop().await.unwrap();

    // A replay of it (the same time) moves nothing again and is not reported as a move.
    deposit(moved.sign(&genuine).unwrap()).await;
    let (ob, mut b_rx) = online(&b, AcceptPolicy::Ask).await;
    let reply = ob.ask(Command::Inbox).await;
    assert!(reply.ok, "{reply:?}");
    agents::expect_none(&mut b_rx, Duration::from_secs(1), |n| {
        matches!(n, Notice::ContactMoved { .. })
    })
    .await;
    assert_eq!(store_b.contact(&moved.new).unwrap().unwrap(), after);
    ob.stop().await.unwrap();
    broker.stop().await;
}

/// The `move` command line, run as a user runs it (the real client binary, `--json`): it
/// prints its documented object, switches the profile, and the contact follows; a second
/// `move` to the same broker is refused with the one error shape.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_move_command_line_switches_the_profile_and_the_contact_follows() {
    let x = TestBroker::start(Backend::Sqlite, |_| {}).await;
    let z = TestBroker::start(Backend::Sqlite, |_| {}).await;
    let a = register(&x, "a").await;
    let b = register(&x, "b").await;
    let (oa, _a_rx) = online(&a, AcceptPolicy::Any).await;
    let (ob, _b_rx) = online(&b, AcceptPolicy::Any).await;
    let reply = contact_add(&oa, &b.number).await;
    assert!(reply.ok, "{reply:?}");
    oa.stop().await.unwrap();
    ob.stop().await.unwrap();

    let run = |args: &[&str]| {
        let out = run_client(&a, &[&["--json"][..], args].concat());
        let stdout = String::from_utf8(out.stdout).unwrap();
        let value: serde_json::Value = serde_json::from_str(stdout.trim())
            .unwrap_or_else(|e| panic!("{args:?}: not one JSON object ({e}): {stdout}"));
        (out.status.success(), value)
    };
    let ca = z.ca.to_str().unwrap();
    let (ok, moved) =
        tokio::task::block_in_place(|| run(&["move", "--broker", z.addr.as_str(), "--ca", ca]));
    assert!(ok, "{moved}");
    let mut keys: Vec<&str> = moved
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "broker",
            "fetched",
            "forward_expires",
            "groups",
            "notified",
            "number",
            "old_deleted",
            "old_number",
            "warnings"
        ]
    );
    let new = moved["number"].as_str().unwrap().to_owned();
    assert_eq!(moved["old_number"], a.number.as_str());
    assert_ne!(new, a.number);
    assert_eq!(moved["broker"], z.addr.as_str());
    assert_eq!(moved["notified"][&b.number], "deposited");
    assert_eq!(moved["old_deleted"], false);
    assert_eq!(moved["forward_expires"], serde_json::Value::Null);
    let (ok, whoami) = tokio::task::block_in_place(|| run(&["whoami"]));
    assert!(ok, "{whoami}");
    assert_eq!(
        (&whoami["number"], &whoami["broker"]),
        (&serde_json::json!(new), &serde_json::json!(z.addr))
    );
    let (ok, again) =
        tokio::task::block_in_place(|| run(&["move", "--broker", z.addr.as_str(), "--ca", ca]));
    assert!(!ok);
    assert!(
        again["error"].as_str().unwrap().contains("already uses"),
        "{again}"
    );

    let (ob, mut b_rx) = online(&b, AcceptPolicy::Ask).await;
    assert_eq!(followed(&mut b_rx, &a.number).await, new);
    ob.stop().await.unwrap();
    x.stop().await;
    z.stop().await;
}

/// While a move of the profile is under way (its lock held, as the first `move` holds it to
/// the end), a second `move` and a `move --keep-number`, run as a user runs them, are refused
/// at once with a clear error, register nothing and stage nothing; an agent, a one-shot
/// command and an export do not start either. Once the first lets go, the move goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_move_while_one_is_under_way_is_refused_and_changes_nothing() {
    let x = TestBroker::start(Backend::Sqlite, |_| {}).await;
    let z = TestBroker::start(Backend::Sqlite, |_| {}).await;
    let a = register(&x, "a").await;
    let before = a.profile.info().unwrap();
    let run = |args: &[&str]| {
        let out = run_client(&a, args);
        (out.status.success(), String::from_utf8(out.stderr).unwrap())
    };
    let ca = z.ca.to_str().unwrap();

    let first = a.profile.lock_for_move().unwrap();
    let export = a.profile.dir().with_extension("mmx");
    let export = export.to_str().unwrap();
    let move_to_z = ["move", "--broker", z.addr.as_str(), "--ca", ca];
    let port_to_z = [&move_to_z[..], &["--keep-number"]].concat();
    // Two moves, a one-shot command (its own agent would log in with the account being
    // replaced) and an export (it would read a profile half switched).
    for args in [
        &move_to_z[..],
        &port_to_z,
        &["inbox"],
        &["export", "--out", export],
    ] {
        let (ok, stderr) = tokio::task::block_in_place(|| run(args));
        assert!(!ok, "{args:?} ran under another move");
        assert!(stderr.contains("under way"), "{args:?}: {stderr}");
    }
    assert!(
        !std::path::Path::new(export).exists(),
        "an export was written"
    );
    // With its control socket, as `listen` and `chat` run it.
    let listen = AgentConfig {
        control: true,
        ..config(AcceptPolicy::Any)
    };
    let agent = micromsg_client::agent::start(a.profile.clone(), listen, mpsc::channel(8).0).await;
    let refused = agent.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(refused.contains("under way"), "an agent started: {refused}");
    assert!(
        !micromsg_client::agent::control_path(&a.profile).exists(),
        "the refused agent left its control socket"
    );
    assert_eq!(a.profile.info().unwrap(), before);
    assert!(!a.profile.path(STAGE).exists(), "a refused move staged");
    assert!(!a.profile.path("porting").exists(), "a refused port staged");
    assert_eq!(
        z.running.broker.store().entity_count().await.unwrap(),
        0,
        "a refused move registered"
    );

    drop(first);
    let done = move_to(&a.profile, &z.addr, &z.ca, None, Default::default(), |_| {})
        .await
        .unwrap();
    assert_eq!(a.profile.info().unwrap().number, done.new_number);
    x.stop().await;
    z.stop().await;
}

/// A move interrupted while it switched the profile (the new secrets in place, `profile.toml`
/// still naming the old broker): the next `move` finishes the switch, and the profile logs in
/// at the new broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_interrupted_while_switching_is_finished_by_the_next() {
    let x = TestBroker::start(Backend::Sqlite, |_| {}).await;
    let z = TestBroker::start(Backend::Sqlite, |_| {}).await;
    let a = register(&x, "a").await;
    // What step 2 staged: an account at Z; then the crash after the secrets were written.
    let stage = micromsg_client::profile::Profile::new(a.profile.path(STAGE));
    let staged = account::register(&stage, &z.addr, &z.ca, None)
        .await
        .unwrap()
        .info;
    a.profile.write_secrets(&stage.secrets().unwrap()).unwrap();
    assert_eq!(a.profile.info().unwrap().number, a.number);

    let done = move_to(&a.profile, &z.addr, &z.ca, None, Default::default(), |_| {})
        .await
        .unwrap();
    assert_eq!(
        (done.old_number.as_str(), done.new_number.as_str()),
        (a.number.as_str(), staged.number.as_str())
    );
    assert_eq!(a.profile.info().unwrap(), staged);
    assert!(!a.profile.path(STAGE).exists());
    let session = account::connect(&a.profile).await.unwrap();
    assert_eq!(session.info.number, staged.number);
    x.stop().await;
    z.stop().await;
}

/// A MOVED notice taken from the inbox is acknowledged together with the inbox state that
/// keeps it, and followed even when the agent stopped (or was killed) between the two: the
/// next agent of the device follows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_moved_notice_taken_from_the_inbox_but_not_followed_is_followed_by_the_next_agent() {
    let (broker, a, b, moved, store_b) = notice_taken_not_followed().await;
    let (ob, mut b_rx) = online(&b, AcceptPolicy::Ask).await;
    assert_eq!(followed(&mut b_rx, &a.number).await, moved.new);
    let contact = store_b.contact(&moved.new).unwrap().unwrap();
    assert_eq!(contact.former, vec![a.number.clone()]);
    ob.stop().await.unwrap();
    broker.stop().await;
}

/// Killed after following the notice and before recording that it did: the next agent meets
/// the notice again under the old number, recognises the move it followed, and reports
/// nothing (no refusal, no second move); it finishes what the killed run may not have done
/// (the outbox for the old number now goes to the new one), and the notice leaves the inbox
/// state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_moved_notice_followed_but_not_recorded_is_not_refused_by_the_next_agent() {
    let (broker, a, b, moved, store_b) = notice_taken_not_followed().await;
    store_b
        .follow_move(&a.number, &moved.new, moved.time)
        .unwrap();
    let after = store_b.contact(&moved.new).unwrap().unwrap();
    // Queued for the old number before the kill; marked failed, so no attempt sends it.
    let outbox = micromsg_client::outbox::Outbox::new(&b.profile);
    let queued: micromsg_client::outbox::Queued = serde_json::from_value(serde_json::json!({
        "id": "00112233445566778899aabbccddeeff",
        "to": a.number,
        "text": "queued before the kill",
        "queued_at": 1,
        "session": "",
        "counter": 0,
        "envelope": "",
        "failed": "kept here by the test",
    }))
    .unwrap();
    outbox.save(&[queued]).unwrap();

    let (ob, mut b_rx) = online(&b, AcceptPolicy::Ask).await;
    let reply = ob.ask(Command::Inbox).await;
    assert!(reply.ok, "{reply:?}");
    agents::expect_none(&mut b_rx, Duration::from_secs(1), |n| {
        matches!(n, Notice::ContactMoved { .. } | Notice::MoveRefused { .. })
    })
    .await;
    ob.stop().await.unwrap();
    assert_eq!(store_b.contact(&moved.new).unwrap().unwrap(), after);
    assert!(
        store_b.inbox_state().unwrap().frames.is_empty(),
        "the notice is done with"
    );
    let to: Vec<String> = outbox.load().unwrap().into_iter().map(|q| q.to).collect();
    assert_eq!(to, vec![moved.new], "the outbox follows the move");
    broker.stop().await;
}

/// A and B contacts on one broker with a session, both agents stopped; A's genuine moved
/// notice (to a number elsewhere) deposited for B, whose device takes its inbox as the agent's
/// fetch does and runs nothing after it (what a SIGKILL right after the store leaves behind).
/// Returns B's store too.
async fn notice_taken_not_followed() -> (TestBroker, Device, Device, Moved, Store) {
    let (broker, a, b) = contacts_both_stopped().await;
    let moved = moved_elsewhere(&a);
    let genuine = IdentityKey::from_seed(&a.profile.secrets().unwrap().identity_seed);
    deposit_notice(&a, &b, moved.sign(&genuine).unwrap()).await;

    let arrived = agents::take_inbox(&b.profile).await;
    assert!(
        arrived.iter().any(|a| matches!(a, Arrived::Moved { .. })),
        "the notice came through the inbox: {arrived:?}"
    );
    let store_b = Store::new(&b.profile);
    assert!(
        store_b.contact(&moved.new).unwrap().is_none(),
        "nothing followed it yet"
    );
    (broker, a, b, moved, store_b)
}

/// A and B, contacts on one broker with a session, both agents stopped.
async fn contacts_both_stopped() -> (TestBroker, Device, Device) {
    let broker = TestBroker::start(Backend::Sqlite, |_| {}).await;
    let a = register(&broker, "a").await;
    let b = register(&broker, "b").await;
    let (oa, _a_rx) = online(&a, AcceptPolicy::Any).await;
    let (ob, _b_rx) = online(&b, AcceptPolicy::Any).await;
    let reply = contact_add(&oa, &b.number).await;
    assert!(reply.ok, "{reply:?}");
    assert!(send(&oa, &b.number, "hi").await.ok);
    oa.stop().await.unwrap();
    ob.stop().await.unwrap();
    (broker, a, b)
}

/// A move of `a` to a number at a broker elsewhere, unsigned.
fn moved_elsewhere(a: &Device) -> Moved {
    Moved {
        old: a.number.clone(),
        new: "5559999999".into(),
        broker: "elsewhere.example:7400".into(),
        tls_name: "elsewhere.example".into(),
        broker_key: [7; 32],
        time: account::unix_now(),
    }
}

/// `a` deposits `notice` for `b` in a MOVED frame of its session with `b`.
async fn deposit_notice(a: &Device, b: &Device, notice: Vec<u8>) {
    let mut session = account::connect(&a.profile).await.unwrap();
    deposit_sealed(&mut session.link, a, &b.number, Kind::Moved, &notice).await;
}
