//! ACCOUNT-DELETE (issue 22, item 2; protocol.md 6.27), through the real client binary over
//! TLS on both backends: `move --delete-old` moves A to another broker and then deletes A's
//! old account. The old account's secrets no longer log in (AUTH-FAILED, as for an unknown
//! device), its number is retired at the old broker (never handed out again), and a contact
//! that was offline during the move still finds the notice in its own inbox and follows it.
//! `account delete` refuses to run without a confirmation, and with `--yes` deletes.

use std::path::Path;
use std::process::Stdio;

use micromsg_client::account;
use micromsg_client::agent::{AcceptPolicy, Notice};
use micromsg_client::profile::Profile;
use micromsg_tests::agents::{self, Device, contact_add, expect, register};
use micromsg_tests::{Backend, TestBroker};
use micromsg_wire::{ErrorCode, Number};

micromsg_tests::both_backends!(
    move_with_delete_old_retires_the_old_account_and_the_offline_contact_still_follows,
    account_delete_needs_a_confirmation_and_then_the_devices_cannot_log_in,
);

/// Runs the client binary on `profile` with `--json`; its exit status and its one JSON object.
fn run(profile: &Path, args: &[&str]) -> (bool, serde_json::Value) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_micromsg-test-client"))
        .arg("--json")
        .arg("--profile")
        .arg(profile)
        .args(args)
        .env_remove("MICROMSG_PROFILE")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    let value: serde_json::Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("{args:?}: not one JSON object ({e}): {stdout}"));
    (out.status.success(), value)
}

/// A copy of `from`'s profile files in `to`: the account's secrets as they were.
fn copy_profile(from: &Profile, to: &Path) -> Profile {
    std::fs::create_dir_all(to).unwrap();
    for name in ["profile.toml", "secrets.toml", "ca.pem"] {
        std::fs::copy(from.path(name), to.join(name)).unwrap();
    }
    Profile::new(to)
}

/// A login with `profile`'s secrets is refused with AUTH-FAILED.
async fn login_refused(profile: &Profile) {
    let refused = account::connect(profile).await.unwrap_err();
    let code = match &refused {
        account::AccountError::Link(l) => l.code(),
        _ => None,
    };
    assert_eq!(code, Some(ErrorCode::AuthFailed), "{refused}");
}

async fn move_with_delete_old_retires_the_old_account_and_the_offline_contact_still_follows(
    backend: Backend,
) {
    let x = TestBroker::start(backend, |_| {}).await;
    let z = TestBroker::start(backend, |_| {}).await;
    let a = register(&x, "a").await;
    let b = register(&x, "b").await;
    let (oa, _a_rx) = agents::online(&a, agents::config(AcceptPolicy::Any)).await;
    let (ob, _b_rx) = agents::online(&b, agents::config(AcceptPolicy::Any)).await;
    let reply = contact_add(&oa, &b.number).await;
    assert!(reply.ok, "{reply:?}");
    oa.stop().await.unwrap();
    ob.stop().await.unwrap();
    let kept = tempfile::tempdir().unwrap();
    let old_account = copy_profile(&a.profile, kept.path());

    // B is offline: the notice goes to B's inbox at X, then A's account at X is deleted.
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
                "--delete-old",
            ],
        )
    });
    assert!(ok, "{moved}");
    assert_eq!(moved["old_deleted"], true);
    assert_eq!(moved["notified"][&b.number], "deposited");
    let new = moved["number"].as_str().unwrap().to_owned();

    let store = &x.running.broker.store();
    let old_number = Number::new(&a.number).unwrap();
    assert!(!store.entity_exists(&old_number).await.unwrap());
    assert!(store.number_retired(&old_number).await.unwrap());
    login_refused(&old_account).await;
    // The profile now logs in at Z as the new number.
    assert_eq!(account::connect(&a.profile).await.unwrap().info.number, new);

    // B comes online later and follows the notice that waited in its own inbox.
    let (ob, mut b_rx) = agents::online(&b, agents::config(AcceptPolicy::Ask)).await;
    let followed = expect(&mut b_rx, |n| match n {
        Notice::ContactMoved { old, new, .. } if *old == a.number => Some(new.clone()),
        _ => None,
    })
    .await;
    assert_eq!(followed, new);
    ob.stop().await.unwrap();
    x.stop().await;
    z.stop().await;
}

async fn account_delete_needs_a_confirmation_and_then_the_devices_cannot_log_in(backend: Backend) {
    let x = TestBroker::start(backend, |_| {}).await;
    let c: Device = register(&x, "c").await;
    let number = Number::new(&c.number).unwrap();

    // No terminal to type the number on, and no --yes: nothing is deleted.
    let (ok, refused) =
        tokio::task::block_in_place(|| run(c.profile.dir(), &["account", "delete"]));
    assert!(!ok);
    assert!(
        refused["error"].as_str().unwrap().contains("--yes"),
        "{refused}"
    );
    assert!(
        x.running
            .broker
            .store()
            .entity_exists(&number)
            .await
            .unwrap()
    );
    account::connect(&c.profile).await.unwrap();

    let (ok, deleted) =
        tokio::task::block_in_place(|| run(c.profile.dir(), &["account", "delete", "--yes"]));
    assert!(ok, "{deleted}");
    assert_eq!(
        deleted,
        serde_json::json!({"deleted": c.number, "broker": x.addr})
    );
    assert!(
        !x.running
            .broker
            .store()
            .entity_exists(&number)
            .await
            .unwrap()
    );
    assert!(
        x.running
            .broker
            .store()
            .number_retired(&number)
            .await
            .unwrap()
    );
    login_refused(&c.profile).await;
    // Deleting again: the login itself is refused, with the broker's code.
    let (ok, again) =
        tokio::task::block_in_place(|| run(c.profile.dir(), &["account", "delete", "--yes"]));
    assert!(!ok);
    assert_eq!(again["code"], "AUTH-FAILED", "{again}");
    x.stop().await;
}
