//! The client side of federation (protocol.md section 11), end to end through the client agent:
//! two users on two brokers add each other with the same `contact add NUMBER` as on one broker
//! (the agent asks IS-NETWORKED, sends INITIATE-*-NETWORKED with a fresh broker keypair, seals
//! and opens the address), chat directly both ways, deposit across brokers while the other is
//! offline, and reconnect as existing contacts.

use micromsg_client::agent::{AcceptPolicy, AgentConfig, Command, Notice};
use micromsg_tests::agents::Ask as _;
use micromsg_tests::agents::{
    config, contact_add, expect, message_from, online, register, send, session_ended,
    session_started,
};
use micromsg_tests::{Backend, TestNetwork};

micromsg_tests::both_backends!(
    users_on_two_brokers_chat_deposit_and_reconnect,
    sends_while_the_contacts_broker_is_down_arrive_once_after,
);

/// A contact who kept their number while moving to another broker (`move --keep-number`,
/// docs/federation.md 12) is reached live again by an agent that ran through the port, though
/// the agent had learnt where the number lived (IS-NETWORKED): the broker the number left drops
/// a local INITIATE for it, the broker it came to refuses a networked one, and the agent asks
/// IS-NETWORKED again after either. Before, it deposited every message until it restarted.
/// Here the contact leaves the agent's broker for a peer broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_agent_reaches_a_contact_who_ported_away_live_again() {
    reach_a_ported_contact_live(Y).await;
}

/// As above, the contact coming from a peer broker to the agent's own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_agent_reaches_a_contact_who_ported_to_its_broker_live_again() {
    reach_a_ported_contact_live(X).await;
}

/// `a` on broker y; `b` on `b_from` ports to the other broker, with `a`'s agent running.
async fn reach_a_ported_contact_live(b_from: usize) {
    let net = TestNetwork::start(
        Backend::Sqlite,
        &[("x", &["555"]), ("y", &["556"])],
        |_, _| {},
    )
    .await;
    net.wait_linked().await;
    let a = register(net.broker(Y), "a").await;
    let b = register(net.broker(b_from), "b").await;
    let quick = || AgentConfig {
        answer_timeout: std::time::Duration::from_secs(1),
        ..config(AcceptPolicy::Any)
    };
    let (a_agent, mut a_rx) = online(&a, quick()).await;
    let (b_agent, mut b_rx) = online(&b, quick()).await;
    assert!(contact_add(&a_agent, &b.number).await.ok);
    session_started(&mut a_rx, &b.number).await;
    session_started(&mut b_rx, &a.number).await;
    b_agent.stop().await.unwrap();
    session_ended(&mut a_rx, &b.number).await;

    let (to, to_id) = if b_from == X { (Y, "y") } else { (X, "x") };
    let dest = net.broker(to);
    let ported = micromsg_client::porting::port(&b.profile, &dest.addr, &dest.ca, |_| {})
        .await
        .unwrap();
    assert_eq!(
        (ported.number.as_str(), ported.to.as_str()),
        (b.number.as_str(), to_id)
    );
    let (b_agent, mut b_rx) = online(&b, quick()).await;

    // The first message goes into b's inbox at its new broker, and a asks for a session in the
    // background in the form it learnt before the port, which fails; a later send asks in the
    // right form, b's agent accepts, and the next message goes live.
    let mut live = None;
    for i in 0..10 {
        let text = format!("after the port, {i}");
        let reply = send(&a_agent, &b.number, &text).await;
        assert!(reply.ok, "{reply:?}");
        assert_eq!(message_from(&mut b_rx, &a.number).await.0, text);
        if reply
            .data
            .as_ref()
            .is_some_and(|d| d["delivered"] == "live")
        {
            live = Some(i);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
    assert!(
        live.is_some_and(|i| i > 0),
        "a's agent never reached b live after b's port: {live:?}"
    );
    a_agent.stop().await.unwrap();
    b_agent.stop().await.unwrap();
    net.stop().await;
}

fn assert_live(reply: micromsg_client::agent::Reply) {
    assert!(reply.ok, "{reply:?}");
    assert_eq!(reply.data.unwrap()["delivered"], "live");
}

const X: usize = 0;
const Y: usize = 1;

async fn users_on_two_brokers_chat_deposit_and_reconnect(backend: Backend) {
    let net = TestNetwork::start(backend, &[("x", &["555"]), ("y", &["556"])], |_, _| {}).await;
    net.wait_linked().await;
    let a = register(net.broker(X), "a").await;
    let b = register(net.broker(Y), "b").await;
    assert!(a.number.starts_with("555") && b.number.starts_with("556"));

    // B asks before accepting, so the request is seen as a networked NEW request.
    let (b_agent, mut b_rx) = online(&b, config(AcceptPolicy::Ask)).await;
    let (a_agent, mut a_rx) = online(&a, config(AcceptPolicy::Ask)).await;
    let adding = {
        let number = b.number.clone();
        tokio::spawn(async move {
            let reply = contact_add(&a_agent, &number).await;
            (a_agent, reply)
        })
    };
    let request = expect(&mut b_rx, |n| match n {
        Notice::ContactRequest {
            from,
            request,
            kind,
        } if *from == a.number => Some((request.clone(), kind.clone())),
        _ => None,
    })
    .await;
    assert_eq!(request.1, "NEW");
    let reply = b_agent
        .ask(Command::Answer {
            request: request.0,
            accept: true,
        })
        .await;
    assert!(reply.ok, "{reply:?}");
    let (a_agent, reply) = adding.await.unwrap();
    assert!(reply.ok, "contact add across brokers: {reply:?}");
    session_started(&mut a_rx, &b.number).await;
    session_started(&mut b_rx, &a.number).await;

    // Directly, both ways.
    assert_live(send(&a_agent, &b.number, "hello from x").await);
    // Live, as the sender was told; the copy deposited for other devices may get here
    // first, so the receiver's `offline` flag is not asserted.
    assert_eq!(message_from(&mut b_rx, &a.number).await.0, "hello from x");
    assert_live(send(&b_agent, &a.number, "hello from y").await);
    // Live, as the sender was told; the copy deposited for other devices may get here
    // first, so the receiver's `offline` flag is not asserted.
    assert_eq!(message_from(&mut a_rx, &b.number).await.0, "hello from y");

    // B goes offline: A's message is deposited at A's broker and forwarded to B's.
    b_agent.stop().await.unwrap();
    session_ended(&mut a_rx, &b.number).await;
    let reply = send(&a_agent, &b.number, "while you were away").await;
    assert!(reply.ok, "{reply:?}");
    assert!(reply.message.contains("deposited"), "{reply:?}");
    let (b_agent, mut b_rx) = online(&b, config(AcceptPolicy::Ask)).await;
    assert_eq!(
        message_from(&mut b_rx, &a.number).await,
        ("while you were away".to_owned(), true)
    );

    // Now existing contacts: B's first message is deposited at once (B cannot know whether A
    // is online), and B asks for a new session in the background with
    // INITIATE-EXISTING-NETWORKED, which A's agent answers without asking (AUTO-EXISTING).
    // (A's own request for a session, made with the deposit above, may also reach B once it
    // is back; then B's message goes live. Either way a session comes up.)
    let reply = send(&b_agent, &a.number, "I am back").await;
    assert!(reply.ok, "{reply:?}");
    let how = reply.data.unwrap()["delivered"].clone();
    assert!(how == "deposited" || how == "live", "{how}");
    let (mut got_message, mut got_session) = (false, false);
    expect(&mut a_rx, |n| {
        match n {
            Notice::Message { from, text, .. } if *from == b.number && text == "I am back" => {
                got_message = true;
            }
            Notice::SessionStarted { peer, .. } if *peer == b.number => got_session = true,
            _ => {}
        }
        (got_message && got_session).then_some(())
    })
    .await;
    assert_live(send(&a_agent, &b.number, "live again").await);
    // Live, as the sender was told; the copy deposited for other devices may get here
    // first, so the receiver's `offline` flag is not asserted.
    assert_eq!(message_from(&mut b_rx, &a.number).await.0, "live again");

    a_agent.stop().await.unwrap();
    b_agent.stop().await.unwrap();
    net.stop().await;
}

/// The broker that serves a contact is down: five sends are accepted (deposited into the home
/// broker's durable outbox, not refused with PEER-UNAVAILABLE), and the contact gets all five,
/// once each, after its broker is back.
async fn sends_while_the_contacts_broker_is_down_arrive_once_after(backend: Backend) {
    let mut net = TestNetwork::start(backend, &[("x", &["555"]), ("y", &["556"])], |_, _| {}).await;
    net.wait_linked().await;
    let a = register(net.broker(X), "a").await;
    let b = register(net.broker(Y), "b").await;
    let (b_agent, mut b_rx) = online(&b, config(AcceptPolicy::Any)).await;
    let (a_agent, mut a_rx) = online(&a, config(AcceptPolicy::Any)).await;
    assert!(contact_add(&a_agent, &b.number).await.ok);
    session_started(&mut a_rx, &b.number).await;
    session_started(&mut b_rx, &a.number).await;
    b_agent.stop().await.unwrap();
    session_ended(&mut a_rx, &b.number).await;

    net.stop_broker(Y).await;
    let texts = ["one", "two", "three", "four", "five"];
    for text in texts {
        let reply = send(&a_agent, &b.number, text).await;
        assert!(reply.ok, "{reply:?}");
        assert_eq!(reply.data.unwrap()["delivered"], "deposited");
    }
    net.start_broker(Y).await;
    net.wait_linked().await;
    let (b_agent, mut b_rx) = online(&b, config(AcceptPolicy::Any)).await;
    // Once each. (In order only per delivery batch: x's outbox forwards batches side by side,
    // so messages to a peer broker's user are not ordered; docs/federation.md.)
    let mut got = Vec::new();
    for _ in texts {
        let (text, offline) = message_from(&mut b_rx, &a.number).await;
        assert!(offline, "{text}");
        got.push(text);
    }
    got.sort();
    let mut want = texts.map(str::to_owned).to_vec();
    want.sort();
    assert_eq!(got, want);
    micromsg_tests::agents::expect_none(&mut b_rx, std::time::Duration::from_millis(500), |n| {
        matches!(n, Notice::Message { .. })
    })
    .await;
    a_agent.stop().await.unwrap();
    b_agent.stop().await.unwrap();
    net.stop().await;
}
