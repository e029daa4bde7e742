//! Every `--json` shape of the `micromsg` command line (docs/cli.md), parsed from the real
//! client binary run as a user runs it, against the real broker binary: one object per
//! command on stdout, the one error shape, and nothing on stderr for an error under --json.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::process::BrokerProcess;

fn client_binary() -> PathBuf {
    env!("CARGO_BIN_EXE_micromsg-test-client").into()
}

/// `micromsg --json --profile DIR ARGS…`: its exit status, stdout and stderr.
fn run(profile: &Path, args: &[&str]) -> (bool, String, String) {
    run_with(&["--json"], profile, args)
}

/// `micromsg --profile DIR ARGS…` without `--json`: its exit status, stdout and stderr.
fn run_for_people(profile: &Path, args: &[&str]) -> (bool, String, String) {
    run_with(&[], profile, args)
}

fn run_with(flags: &[&str], profile: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(client_binary())
        .args(flags)
        .arg("--profile")
        .arg(profile)
        .args(args)
        .env_remove("MICROMSG_PROFILE")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

/// Runs a command that must succeed and print exactly one JSON object; returns it.
fn object(profile: &Path, args: &[&str]) -> Value {
    let (ok, stdout, stderr) = run(profile, args);
    assert!(ok, "{args:?} failed: {stdout} {stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "{args:?}: one JSON object, got {stdout:?}");
    let value: Value = serde_json::from_str(lines[0])
        .unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {stdout}"));
    assert!(value.is_object(), "{args:?}: {value}");
    value
}

/// The keys of `value`, which must be exactly `keys`.
fn has_keys(value: &Value, keys: &[&str], what: &str) {
    let mut got: Vec<&str> = value
        .as_object()
        .unwrap_or_else(|| panic!("{what}: not an object: {value}"))
        .keys()
        .map(String::as_str)
        .collect();
    got.sort_unstable();
    let mut want = keys.to_vec();
    want.sort_unstable();
    assert_eq!(got, want, "{what}: {value}");
}

/// An agent command's reply: `ok`, `message`, and `data` when there is some.
fn reply(value: &Value, what: &str) -> Option<Value> {
    assert_eq!(value["ok"], true, "{what}: {value}");
    assert!(value["message"].is_string(), "{what}: {value}");
    let data = value.get("data").cloned();
    let mut keys = vec!["ok", "message"];
    if data.is_some() {
        keys.push("data");
    }
    has_keys(value, &keys, what);
    data
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_json_shape_parses() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path(), "").await;
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let ca = broker.ca.to_str().unwrap().to_owned();

    let reg = |p: &Path| {
        let v = object(p, &["register", "--broker", &broker.addr, "--ca", &ca]);
        has_keys(&v, &["number", "device", "broker"], "register");
        assert!(v["device"].is_u64());
        v["number"].as_str().unwrap().to_owned()
    };
    let a_number = reg(&a);
    let b_number = reg(&b);

    let v = object(&a, &["whoami"]);
    has_keys(
        &v,
        &["number", "device", "broker", "broker_identity"],
        "whoami",
    );
    let v = object(&a, &["broker-info"]);
    assert!(
        v["protocol"].is_u64() && v["limits"]["max_frame"].is_u64(),
        "{v}"
    );

    // B stays online with --json: one event object per line.
    let mut listen = tokio::process::Command::new(client_binary())
        .args(["--json", "--profile"])
        .arg(&b)
        .args(["listen", "--accept", "any"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut events = BufReader::new(listen.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(Duration::from_secs(20), events.next_line())
        .await
        .expect("listen printed nothing")
        .unwrap()
        .unwrap();
    let first: Value = serde_json::from_str(&first).unwrap();
    assert_eq!(first["event"], "listening", "{first}");

    let v = object(&a, &["contact", "add", &b_number]);
    let data = reply(&v, "contact add").expect("contact add says the session's path");
    assert_eq!(data["path"], "direct", "{data}");
    assert_eq!(data["peer"], b_number.as_str(), "{data}");
    // `status`: through B's running listen, and for A, whose agent ran only for the command.
    let v = object(&b, &["status"]);
    let data = reply(&v, "status").expect("the running agent's state");
    has_keys(
        &data,
        &["number", "device", "broker", "outbox", "sessions"],
        "status",
    );
    assert_eq!(data["broker"], "connected", "{data}");
    // A's agent ran only for `contact add` and said goodbye: no live session is left.
    assert_eq!(data["sessions"], serde_json::json!([]), "{data}");
    let v = object(&a, &["status"]);
    assert_eq!(v["data"]["broker"], "not running", "{v}");
    let v = object(&a, &["send", &b_number, "hello"]);
    let data = reply(&v, "send").expect("send says how it was delivered");
    assert!(
        ["live", "deposited", "queued"].contains(&data["delivered"].as_str().unwrap()),
        "{data}"
    );
    // A message with what a terminal would act on (clear the screen, retitle the window,
    // reverse the text): B's listen gets it intact in JSON, and A's history for people shows
    // it escaped, so the terminal prints it instead of obeying it.
    let evil = "clear\u{1b}[2J title\u{1b}]0;pwned\u{7} \u{202e}txet";
    let _ = object(&a, &["send", &b_number, evil]);
    let got = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let line = events.next_line().await.unwrap().expect("listen ended");
            let event: Value = serde_json::from_str(&line).unwrap_or_else(|e| {
                panic!("listen printed a line that is not JSON ({e}): {line:?}")
            });
            // (The "hello" above may come first.)
            if event["event"] == "message" && event["text"] != "hello" {
                return event;
            }
        }
    })
    .await
    .expect("B's listen printed no message");
    assert_eq!(got["text"], evil, "{got}");
    let (ok, stdout, _) = run_for_people(&a, &["history", &b_number]);
    assert!(ok);
    assert!(
        !stdout.contains('\u{1b}') && !stdout.contains('\u{7}') && !stdout.contains('\u{202e}'),
        "{stdout:?}"
    );
    assert!(
        stdout.contains("[me] clear\\u001b[2J title\\u001b]0;pwned\\u0007 \\u202etxet"),
        "{stdout}"
    );
    let v = object(&a, &["contact", "name", &b_number, "Bee"]);
    reply(&v, "contact name");
    let v = object(&a, &["contact", "list"]);
    has_keys(&v, &["contacts"], "contact list");
    let entry = &v["contacts"][0];
    has_keys(
        entry,
        &[
            "number",
            "name",
            "identity",
            "blocked",
            "added",
            "identity_changed",
        ],
        "contact list entry",
    );
    assert_eq!(entry["name"], "Bee");
    let v = object(&a, &["history", &b_number]);
    has_keys(&v, &["number", "messages"], "history");
    assert_eq!(v["messages"][0]["text"], "hello", "{v}");
    let v = object(&a, &["safety-number", &b_number]);
    has_keys(&v, &["number", "safety_number"], "safety-number");
    let v = object(&a, &["outbox"]);
    has_keys(&v, &["outbox"], "outbox");
    let v = object(&a, &["inbox"]);
    let data = reply(&v, "inbox").expect("inbox lists what arrived");
    assert!(data["messages"].is_array(), "{data}");
    let v = object(&a, &["device", "add", "--no-transfer"]);
    has_keys(
        &v,
        &["secret", "expires", "number", "transfer_key"],
        "device add",
    );
    let v = object(&a, &["device", "list"]);
    has_keys(&v, &["devices"], "device list");
    has_keys(
        &v["devices"][0],
        &["id", "name", "created", "last_seen", "current"],
        "device list entry",
    );
    // The broker's refusal carries its code, here through the device commands' errors.
    let (ok, stdout, _) = run(&a, &["device", "revoke", "99"]);
    assert!(!ok);
    let v: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(v["code"], "NOT-FOUND", "{v}");
    let v = object(&a, &["keys", "backup"]);
    has_keys(
        &v,
        &[
            "version",
            "contacts",
            "sessions",
            "left_out",
            "recovery_secret",
        ],
        "keys backup",
    );
    let v = object(&a, &["group", "create", "pair", &b_number]);
    let data = reply(&v, "group create").expect("the group id");
    let group = data["group"].as_str().unwrap().to_owned();
    let v = object(&a, &["group", "list"]);
    has_keys(&v, &["groups"], "group list");
    has_keys(
        &v["groups"][0],
        &["group", "name", "members", "version"],
        "group list entry",
    );
    let v = object(&a, &["group", "history", &group]);
    has_keys(&v, &["group", "messages"], "group history");
    // For people, a group's history reads as a contact's: local time, then who.
    let _ = object(&a, &["group", "send", &group, "to the pair"]);
    let (ok, stdout, stderr) = run_for_people(&a, &["group", "history", &group]);
    assert!(ok, "{stdout} {stderr}");
    let (time, line) = stdout.trim_end().split_once("  ").unwrap();
    assert_eq!(line, "[me] to the pair", "{stdout:?}");
    // `HH:MM`, or `YYYY-MM-DD HH:MM` when the day turned meanwhile.
    let clock = &time.as_bytes()[time.len().saturating_sub(5)..];
    assert!(
        clock.len() == 5 && clock[2] == b':' && time.bytes().all(|b| b"0123456789:- ".contains(&b)),
        "a local time, not Unix seconds: {stdout:?}"
    );

    // A number that is not one is told at once, before any "asking … waiting" line.
    let (ok, stdout, stderr) = run_for_people(&a, &["contact", "add", "abc"]);
    assert!(!ok && stdout.is_empty(), "{stdout}");
    assert_eq!(
        stderr,
        "error: \"abc\" is not a number (a number is 4 to 15 digits)\n"
    );
    // So is one's own number.
    let (ok, stdout, stderr) = run_for_people(&a, &["contact", "add", &a_number]);
    assert!(!ok && stdout.is_empty(), "{stdout}");
    assert_eq!(stderr, "error: that is your own number\n");

    // The one error shape: one object on stdout, nothing on stderr, exit status 1.
    let (ok, stdout, stderr) = run(&a, &["send", "5550000", "to nobody"]);
    assert!(!ok);
    assert_eq!(stderr, "", "an error under --json prints nothing on stderr");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "one error object: {stdout:?}");
    let v: Value = serde_json::from_str(lines[0]).unwrap();
    has_keys(&v, &["error", "code"], "error");
    assert!(
        v["error"].as_str().unwrap().contains("not a contact"),
        "{v}"
    );
    // Without --json the error is one line on stderr, and stdout stays empty.
    let out = Command::new(client_binary())
        .arg("--profile")
        .arg(&a)
        .args(["send", "5550000", "to nobody"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        out.stdout.is_empty(),
        "{:?}",
        String::from_utf8_lossy(&out.stdout)
    );
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");

    // B's events so far are JSON objects with an `event` name, one per line.
    drop(listen);
    while let Ok(Ok(Some(line))) =
        tokio::time::timeout(Duration::from_secs(2), events.next_line()).await
    {
        let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(v["event"].is_string(), "{v}");
    }
    let _ = a_number;
}

/// `device join` without a transfer key, then `device receive-keys --transfer-key`: the keys
/// the old device sent (its side through the library, as `device add` does) are installed,
/// and the answers have their documented shapes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_receive_keys_installs_the_old_devices_transfer() {
    use micromsg_client::profile::Profile;
    use micromsg_client::{account, devices};

    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path(), "").await;
    let (a1, a2) = (dir.path().join("a1"), dir.path().join("a2"));
    let ca = broker.ca.to_str().unwrap().to_owned();
    let v = object(&a1, &["register", "--broker", &broker.addr, "--ca", &ca]);
    let number = v["number"].as_str().unwrap().to_owned();

    let old_profile = Profile::new(&a1);
    let mut old = account::connect(&old_profile).await.unwrap();
    let known = devices::highest_device(&mut old).await.unwrap();
    let secret = micromsg_tests::agents::add_device_secret(&mut old).await;
    let transfer = devices::new_transfer_key();
    let key = transfer.clone();
    let sender = tokio::spawn(async move {
        devices::send_link_transfer(&mut old, &old_profile, &key, known, Duration::from_secs(30))
            .await
            .unwrap()
    });

    let join = [
        "device",
        "join",
        "--broker",
        &broker.addr,
        "--ca",
        &ca,
        "--number",
        &number,
        "--secret",
        &secret,
    ];
    let v = tokio::task::block_in_place(|| object(&a2, &join));
    has_keys(&v, &["number", "device", "keys"], "device join");
    assert!(v["keys"].is_null(), "{v}");
    let joined_as = v["device"].as_u64().unwrap();
    let hex = transfer.to_hex();
    let args = [
        "device",
        "receive-keys",
        "--transfer-key",
        hex.as_str(),
        "--wait",
        "30",
    ];
    let v = tokio::task::block_in_place(|| object(&a2, &args));
    has_keys(&v, &["keys"], "device receive-keys");
    has_keys(
        &v["keys"],
        &["contacts", "sessions"],
        "device receive-keys keys",
    );
    assert_eq!(u64::from(sender.await.unwrap()), joined_as);
    assert_eq!(
        Profile::new(&a2).secrets().unwrap().identity_seed,
        Profile::new(&a1).secrets().unwrap().identity_seed,
        "the new device has the entity's identity key"
    );
    // Asked again, now that it has the keys: nothing comes, and the answer says why rather
    // than blaming the old device.
    let again = [
        "device",
        "receive-keys",
        "--transfer-key",
        hex.as_str(),
        "--wait",
        "1",
    ];
    let (ok, stdout, _) = tokio::task::block_in_place(|| run(&a2, &again));
    assert!(!ok);
    assert!(stdout.contains("already has the entity's keys"), "{stdout}");
    // A transfer key that is not 64 hex digits is refused before anything is done.
    let (ok, stdout, _) = run(&a2, &["device", "receive-keys", "--transfer-key", "xyz"]);
    assert!(!ok);
    assert!(stdout.contains("--transfer-key"), "{stdout}");
    // Revoked, the device's commands are refused with the broker's code, also those that run
    // an agent of their own (`inbox`), and the text says what it means.
    let id = joined_as.to_string();
    let v = tokio::task::block_in_place(|| object(&a1, &["device", "revoke", &id]));
    assert_eq!(v["revoked"], joined_as);
    let (ok, stdout, _) = tokio::task::block_in_place(|| run(&a2, &["inbox"]));
    assert!(!ok);
    let v: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(v["code"], "AUTH-FAILED", "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("this device was revoked"),
        "{v}"
    );
    drop(broker);
}
