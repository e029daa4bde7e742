//! End-to-end sessions through the client agent (what `micromsg listen` runs): contact setup,
//! messages both ways, the disconnect notice, accept policies, and identity key changes.
//! Wire-level session properties (heartbeat timeout, replay and tamper refusal) are tested
//! against real sockets in `client/tests/p2p.rs`.

use std::time::Duration;

use micromsg_client::agent::{AcceptPolicy, AgentConfig, AgentHandle, Command, Notice};
use micromsg_crypto::Secret32;
use micromsg_tests::agents::Ask as _;
use micromsg_tests::agents::{self, Device, expect, register};
use micromsg_tests::{Backend, TestBroker};
use tokio::sync::mpsc;

/// Agents with a short answer timeout: the "no answer" cases below wait for it.
async fn online(device: &Device, accept: AcceptPolicy) -> (AgentHandle, mpsc::Receiver<Notice>) {
    let config = AgentConfig {
        answer_timeout: Duration::from_secs(2),
        ..agents::config(accept)
    };
    agents::online(device, config).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contact_setup_messages_both_ways_and_disconnect_notice() {
    let broker = TestBroker::start(Backend::Sqlite, |_| {}).await;
    let a = register(&broker, "a").await;
    let b = register(&broker, "b").await;
    let (b_agent, mut b_rx) = online(&b, AcceptPolicy::Any).await;
    let (a_agent, mut a_rx) = online(&a, AcceptPolicy::Any).await;

    let reply = a_agent
        .ask(Command::ContactAdd {
            number: b.number.clone(),
            wait_secs: None,
        })
        .await;
    assert!(reply.ok, "{reply:?}");
    let a_safety = expect(&mut a_rx, |n| match n {
        Notice::SessionStarted {
            peer,
            first_contact: true,
            safety_number,
            // On one host the broker sees the client at its own address: no relay.
            path: micromsg_client::relay::Path::Direct,
        } if *peer == b.number => Some(safety_number.clone()),
        _ => None,
    })
    .await;
    let b_safety = expect(&mut b_rx, |n| match n {
        Notice::SessionStarted {
            peer,
            safety_number,
            ..
        } if *peer == a.number => Some(safety_number.clone()),
        _ => None,
    })
    .await;
    assert_eq!(
        a_safety, b_safety,
        "both sides compute the same safety number"
    );

    for text in ["hello", "second", "third"] {
        let reply = a_agent
            .ask(Command::Send {
                number: b.number.clone(),
                text: text.into(),
            })
            .await;
        assert!(reply.ok, "{reply:?}");
    }
    for want in ["hello", "second", "third"] {
        let got = expect(&mut b_rx, |n| match n {
            Notice::Message { from, text, .. } if *from == a.number => Some(text.clone()),
            _ => None,
        })
        .await;
        assert_eq!(got, want, "messages arrive in order");
    }
    let reply = b_agent
        .ask(Command::Send {
            number: a.number.clone(),
            text: "hi back".into(),
        })
        .await;
    assert!(reply.ok, "{reply:?}");
    let got = expect(&mut a_rx, |n| match n {
        Notice::Message { from, text, .. } if *from == b.number => Some(text.clone()),
        _ => None,
    })
    .await;
    assert_eq!(got, "hi back");

    // B goes offline: A is told, with B's reason.
    b_agent.stop().await.unwrap();
    let reason = expect(&mut a_rx, |n| match n {
        Notice::SessionEnded { peer, reason } if *peer == b.number => Some(reason.clone()),
        _ => None,
    })
    .await;
    assert!(reason.contains("going offline"), "{reason}");

    // Both histories hold the conversation.
    let history = micromsg_client::store::Store::new(&a.profile)
        .read_history(&b.number)
        .unwrap();
    let texts: Vec<&str> = history.iter().map(|e| e.text.as_str()).collect();
    assert_eq!(texts, vec!["hello", "second", "third", "hi back"]);
    a_agent.stop().await.unwrap();
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ask_policy_waits_for_an_answer_and_contacts_policy_refuses_strangers() {
    let broker = TestBroker::start(Backend::Sqlite, |_| {}).await;
    let a = register(&broker, "a").await;
    let b = register(&broker, "b").await;
    let c = register(&broker, "c").await;
    let (b_agent, mut b_rx) = online(&b, AcceptPolicy::Ask).await;
    let (a_agent, mut a_rx) = online(&a, AcceptPolicy::Any).await;

    let adding = tokio::spawn(async move {
        let reply = a_agent
            .ask(Command::ContactAdd {
                number: b.number.clone(),
                wait_secs: None,
            })
            .await;
        (a_agent, reply)
    });
    let request = expect(&mut b_rx, |n| match n {
        Notice::ContactRequest { from, request, .. } if *from == a.number => Some(request.clone()),
        _ => None,
    })
    .await;
    let reply = b_agent
        .ask(Command::Answer {
            request,
            accept: true,
        })
        .await;
    assert!(reply.ok, "{reply:?}");
    let (a_agent, reply) = adding.await.unwrap();
    assert!(reply.ok, "{reply:?}");
    expect(&mut a_rx, |n| {
        matches!(n, Notice::SessionStarted { .. }).then_some(())
    })
    .await;
    b_agent.stop().await.unwrap();
    a_agent.stop().await.unwrap();

    // With the contacts policy, a stranger is refused and hears nothing back.
    let (c_agent, mut c_rx) = online(&c, AcceptPolicy::Contacts).await;
    let (a_agent, _a_rx) = online(&a, AcceptPolicy::Any).await;
    let reply = a_agent
        .ask(Command::ContactAdd {
            number: c.number.clone(),
            wait_secs: None,
        })
        .await;
    assert!(!reply.ok, "{reply:?}");
    assert!(reply.message.contains("no answer"), "{}", reply.message);
    expect(&mut c_rx, |n| match n {
        Notice::ContactRefused { from } if *from == a.number => Some(()),
        _ => None,
    })
    .await;
    c_agent.stop().await.unwrap();
    a_agent.stop().await.unwrap();
    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_identity_key_is_detected_and_refused() {
    let broker = TestBroker::start(Backend::Sqlite, |_| {}).await;
    let a = register(&broker, "a").await;
    let b = register(&broker, "b").await;
    let (b_agent, _b_rx) = online(&b, AcceptPolicy::Any).await;
    let (a_agent, mut a_rx) = online(&a, AcceptPolicy::Any).await;
    let reply = a_agent
        .ask(Command::ContactAdd {
            number: b.number.clone(),
            wait_secs: None,
        })
        .await;
    assert!(reply.ok, "{reply:?}");
    b_agent.stop().await.unwrap();
    // Until A has seen the session end, a send would go to the dead session and fail for
    // that reason instead of reaching the identity check.
    expect(&mut a_rx, |n| {
        matches!(n, Notice::SessionEnded { peer, .. } if *peer == b.number).then_some(())
    })
    .await;

    // B comes back with a different identity key (a reinstall — or an impostor holding B's
    // broker secrets).
    let mut secrets = b.profile.secrets().unwrap();
    secrets.identity_seed = Secret32::from_bytes([0x42; 32]);
    b.profile.write_secrets(&secrets).unwrap();
    let (b_agent, _b_rx) = online(&b, AcceptPolicy::Any).await;

    // A does not know yet: the message is sealed with the session A had with the B it pinned
    // (only a holder of that session's keys can open it, not the new key by itself);
    // meanwhile A asks for a new session, and the handshake shows the changed key.
    let reply = a_agent
        .ask(Command::Send {
            number: b.number.clone(),
            text: "are you still you?".into(),
        })
        .await;
    assert!(reply.ok, "{reply:?}");
    assert_eq!(reply.data.unwrap()["delivered"], "deposited");
    let (pinned, presented) = expect(&mut a_rx, |n| match n {
        Notice::IdentityChanged {
            peer,
            pinned,
            presented,
        } if *peer == b.number => Some((pinned.clone(), presented.clone())),
        _ => None,
    })
    .await;
    assert_ne!(pinned, presented);
    // Now that A knows, nothing goes to the changed key.
    let reply = a_agent
        .ask(Command::Send {
            number: b.number.clone(),
            text: "hello?".into(),
        })
        .await;
    assert!(!reply.ok, "nothing may be sent to a changed key: {reply:?}");
    assert!(reply.message.contains("CHANGED"), "{}", reply.message);
    b_agent.stop().await.unwrap();
    a_agent.stop().await.unwrap();
    broker.stop().await;
}

/// Too long a text is refused before it leaves the device, with the limit, and the agent stays
/// up; the longest text the broker carries goes out live (with its copy for the contact's other
/// devices) and does not cost the broker link (it used to: the copy went past the frame limit
/// and the broker closed the link, which ended the agent).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_text_too_long_is_refused_before_sending_and_the_longest_one_goes_out() {
    let broker = TestBroker::start(Backend::Sqlite, |_| {}).await;
    let a = register(&broker, "a").await;
    let b = register(&broker, "b").await;
    let (_b_agent, mut b_rx) = online(&b, AcceptPolicy::Any).await;
    let (a_agent, mut a_rx) = online(&a, AcceptPolicy::Any).await;
    assert!(agents::contact_add(&a_agent, &b.number).await.ok);
    agents::session_started(&mut a_rx, &b.number).await;

    let megabyte = "x".repeat(1 << 20);
    let reply = agents::send(&a_agent, &b.number, &megabyte).await;
    assert!(!reply.ok, "{reply:?}");
    assert!(
        reply.message.starts_with("message too long: 1048576 bytes"),
        "{}",
        reply.message
    );
    assert!(
        reply.message.contains("nothing was sent"),
        "{}",
        reply.message
    );
    let limit: usize = reply
        .message
        .split("at most ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no limit in {:?}", reply.message));
    let reply = agents::send(&a_agent, &b.number, &"y".repeat(limit + 1)).await;
    assert!(!reply.ok, "one byte over the limit: {reply:?}");

    let longest = "z".repeat(limit);
    let reply = agents::send(&a_agent, &b.number, &longest).await;
    assert!(reply.ok, "{reply:?}");
    // (Sent live; the copy deposited for the contact's other devices may get here first, so
    // the receiver's `offline` flag is not asserted.)
    let (got, _) = agents::message_from(&mut b_rx, &a.number).await;
    assert_eq!(got.len(), limit);
    // The broker link survived the copies: a request through it still works.
    let reply = a_agent.ask(Command::Inbox).await;
    assert!(reply.ok, "{reply:?}");
    assert!(agents::send(&a_agent, &b.number, "still up").await.ok);
    assert_eq!(
        agents::message_from(&mut b_rx, &a.number).await.0,
        "still up"
    );
    agents::expect_none(&mut a_rx, Duration::from_millis(300), |n| {
        matches!(n, Notice::Warning { .. } | Notice::BrokerLost { .. })
    })
    .await;
}

/// Protocol 12.3, step 4: only a verified INIT spends the connect token. An INIT that names
/// the token but does not prove it (anyone who reaches the responder's port first can send
/// one) is refused with ABORT 1 and leaves the token for the real initiator, whose handshake
/// then succeeds. Before, the responder spent the token on any INIT that named it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unverified_init_does_not_spend_the_connect_token() {
    use micromsg_client::p2p::{self, SessionConfig};
    use micromsg_crypto::identity::IdentityKey;
    use micromsg_wire::message::request::InitiateNewArgs;
    use micromsg_wire::{Event, Request};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let broker = TestBroker::start(Backend::Sqlite, |_| {}).await;
    let b = register(&broker, "b").await;
    let (_b_agent, _b_rx) = online(&b, AcceptPolicy::Any).await;
    let mut a = micromsg_tests::raw::user(&broker, "a").await;
    a.link
        .call(Request::InitiateNew(InitiateNewArgs {
            target: micromsg_wire::Number::new(b.number.clone()).unwrap(),
            address: None,
        }))
        .await
        .unwrap();
    let accepted = loop {
        match tokio::time::timeout(Duration::from_secs(10), a.link.next_event())
            .await
            .expect("no CONTACT-ACCEPTED")
            .unwrap()
        {
            Event::ContactAccepted(accepted) => break accepted,
            _ => continue,
        }
    };
    let address = accepted.address.unwrap().as_str().to_owned();
    let token = Secret32::from_bytes(*accepted.token.as_bytes());

    // Someone who knows the token id but not the token: a 146-byte INIT with a wrong proof.
    let mut init = vec![0x01, 0x01];
    init.extend_from_slice(&micromsg_crypto::handshake::token_id(&token));
    init.extend_from_slice(&[0x42; 32 * 4]);
    let mut forged = tokio::net::TcpStream::connect(&address).await.unwrap();
    forged
        .write_all(&(init.len() as u32).to_be_bytes())
        .await
        .unwrap();
    forged.write_all(&init).await.unwrap();
    let mut len = [0u8; 4];
    forged.read_exact(&mut len).await.unwrap();
    let mut abort = vec![0u8; u32::from_be_bytes(len) as usize];
    forged.read_exact(&mut abort).await.unwrap();
    assert_eq!(abort.first(), Some(&0x7f), "an ABORT: {abort:?}");
    assert_eq!(
        abort.get(1),
        Some(&1),
        "ABORT 1 (bad token proof): {abort:?}"
    );

    // The real initiator, with the token, still gets its session.
    let identity = IdentityKey::from_seed(&Secret32::from_bytes([9; 32]));
    let established = p2p::connect(&address, &token, &identity, SessionConfig::default()).await;
    assert!(
        established.is_ok(),
        "the forged INIT spent the token: {:?}",
        established.err()
    );
    broker.stop().await;
}
