//! FORWARD (issue 22, item 2; protocol.md 6.28, 10.2), over real brokers and TLS, on both
//! backends: A moves to another broker with `move --forward 5 --delete-old` (the real client
//! binary). Afterwards, with A's old account deleted:
//!
//! - D, who never had A as a contact, asks for A's old number and learns the new one (shown,
//!   not verifiable: nothing is pinned for it), and its request ends at once;
//! - B, a contact that missed the moved notice, asks for A's old number and follows the
//!   forward, verified against the key it pinned;
//! - E, whom A had blocked, gets exactly what a number that does not exist gives;
//! - the old account is gone, its number is retired, and the forward lives until its expiry.

use std::time::Duration;

use micromsg_client::account;
use micromsg_client::agent::{AcceptPolicy, AgentHandle, Command, Notice, Reply};
use micromsg_client::store::Store;
use micromsg_tests::agents::{self, Ask as _, contact_add, expect, expect_none, register};
use micromsg_tests::{Backend, TestBroker};
use micromsg_wire::message::request::{InboxAckArgs, InboxFetchArgs, TargetArgs};
use micromsg_wire::{Number, Request, ResponseData};

micromsg_tests::both_backends!(a_forward_tells_callers_of_the_old_number_where_it_went);

/// A contact request for `number` that waits at most `secs`.
async fn ask_for(agent: &AgentHandle, number: &str, secs: u64) -> Reply {
    agent
        .ask(Command::ContactAdd {
            number: number.to_owned(),
            wait_secs: Some(secs),
        })
        .await
}

/// Runs the client binary on `profile` with `--json`; its exit status and its one JSON object.
fn run(profile: &std::path::Path, args: &[&str]) -> (bool, serde_json::Value) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_micromsg-test-client"))
        .arg("--json")
        .arg("--profile")
        .arg(profile)
        .args(args)
        .env_remove("MICROMSG_PROFILE")
        .output()
        .unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    let value: serde_json::Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("{args:?}: not one JSON object ({e}): {stdout}"));
    (out.status.success(), value)
}

async fn a_forward_tells_callers_of_the_old_number_where_it_went(backend: Backend) {
    let x = TestBroker::start(backend, |_| {}).await;
    let z = TestBroker::start(backend, |_| {}).await;
    let a = register(&x, "a").await;
    let b = register(&x, "b").await;
    let d = register(&x, "d").await;
    let e = register(&x, "e").await;
    let config = || agents::config(AcceptPolicy::Any);

    // A and B are contacts (keys pinned both ways); A blocks E.
    let (oa, _a_rx) = agents::online(&a, config()).await;
    let (ob, _b_rx) = agents::online(&b, config()).await;
    let reply = contact_add(&oa, &b.number).await;
    assert!(reply.ok, "{reply:?}");
    oa.stop().await.unwrap();
    ob.stop().await.unwrap();
    let mut session = account::connect(&a.profile).await.unwrap();
    let block = Request::Block(TargetArgs {
        target: Number::new(&e.number).unwrap(),
    });
    session.link.call(block).await.unwrap();
    drop(session);
    let kept = Store::new(&b.profile).contact(&a.number).unwrap().unwrap();

    let ca = z.ca.to_str().unwrap();
    let (ok, moved) = tokio::task::block_in_place(|| {
        run(
            a.profile.dir(),
            &[
                "move",
                "--broker",
                z.addr.as_str(),
                "--ca",
                ca,
                "--forward",
                "5",
                "--delete-old",
            ],
        )
    });
    assert!(ok, "{moved}");
    let new = moved["number"].as_str().unwrap().to_owned();
    assert_eq!(moved["old_deleted"], true);
    let expires = moved["forward_expires"].as_u64().unwrap();
    let now = micromsg_client::account::unix_now();
    assert!(
        (now + 5 * 86_400 - 60..=now + 5 * 86_400).contains(&expires),
        "{moved}"
    );
    let old = Number::new(&a.number).unwrap();
    let store = x.running.broker.store();
    assert!(!store.entity_exists(&old).await.unwrap());
    assert!(store.number_retired(&old).await.unwrap());

    // B misses the notice that waited in its inbox (it is fetched and dropped unread).
    let mut session = account::connect(&b.profile).await.unwrap();
    let fetched = session
        .link
        .call(Request::InboxFetch(InboxFetchArgs {
            limit: None,
            after: None,
        }))
        .await
        .unwrap();
    let ResponseData::InboxFetch(fetched) = fetched else {
        panic!("{fetched:?}")
    };
    assert_eq!(fetched.messages.len(), 1, "the moved notice");
    let ids = fetched.messages.iter().map(|m| m.id).collect();
    session
        .link
        .call(Request::InboxAck(InboxAckArgs { ids }))
        .await
        .unwrap();
    drop(session);

    // D, a stranger, learns the new number, shown as unverified; the request ends at once.
    let (od, mut d_rx) = agents::online(&d, config()).await;
    let started = std::time::Instant::now();
    let reply = ask_for(&od, &a.number, 20).await;
    assert!(!reply.ok, "{reply:?}");
    assert!(
        reply.message.contains(&format!("contact add {new}")),
        "{reply:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "it ended at once"
    );
    let forwarded = expect(&mut d_rx, |n| match n {
        Notice::NumberForwarded { old, new, broker } => {
            Some((old.clone(), new.clone(), broker.clone()))
        }
        _ => None,
    })
    .await;
    assert_eq!(forwarded, (a.number.clone(), new.clone(), z.addr.clone()));
    assert!(Store::new(&d.profile).contact(&new).unwrap().is_none());
    od.stop().await.unwrap();

    // B, which pinned A's key, follows the forward as a verified moved notice.
    let (ob, mut b_rx) = agents::online(&b, config()).await;
    let reply = ask_for(&ob, &a.number, 20).await;
    assert!(reply.ok, "{reply:?}");
    let followed = expect(&mut b_rx, |n| match n {
        Notice::ContactMoved { old, new, .. } if *old == a.number => Some(new.clone()),
        Notice::MoveRefused { reason, .. } => panic!("refused: {reason}"),
        _ => None,
    })
    .await;
    assert_eq!(followed, new);
    let after = Store::new(&b.profile).contact(&new).unwrap().unwrap();
    assert_eq!(after.identity, kept.identity, "the same pinned key");
    assert!(Store::new(&b.profile).contact(&a.number).unwrap().is_none());
    ob.stop().await.unwrap();

    // E, blocked by A, gets what an unallocated number gives: no answer, and no notice.
    let (oe, mut e_rx) = agents::online(&e, config()).await;
    let nobody = format!("{}9", &a.number[..a.number.len() - 1]);
    let nobody = if nobody == a.number {
        format!("{}8", &a.number[..a.number.len() - 1])
    } else {
        nobody
    };
    let blocked = ask_for(&oe, &a.number, 2).await;
    let unknown = ask_for(&oe, &nobody, 2).await;
    assert!(!blocked.ok && !unknown.ok);
    assert_eq!(
        blocked.message.replace(&a.number, "N"),
        unknown.message.replace(&nobody, "N")
    );
    expect_none(&mut e_rx, Duration::from_millis(500), |n| {
        matches!(
            n,
            Notice::NumberForwarded { .. } | Notice::ContactMoved { .. }
        )
    })
    .await;
    oe.stop().await.unwrap();

    // The forward lives until its expiry, not after.
    let d_number = Number::new(&d.number).unwrap();
    let live = store
        .forward_for(&old, &d_number, (expires - 1) as i64)
        .await
        .unwrap();
    assert!(live.is_some());
    let gone = store
        .forward_for(&old, &d_number, expires as i64)
        .await
        .unwrap();
    assert!(gone.is_none());
    x.stop().await;
    z.stop().await;
}
