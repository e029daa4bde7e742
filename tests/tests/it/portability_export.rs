//! `micromsg export` and `micromsg import` (protocol.md 13.5), run as a user runs them: the
//! real client binary against the real broker binary over TLS. A device is exported, then
//! imported into a new profile directory, and the imported device keeps talking to its
//! contact, live and offline; the file holds no plaintext; a wrong passphrase, a damaged file
//! and a newer format are each refused with their own error and write nothing.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout};

use crate::process::BrokerProcess;

const PASSPHRASE: &str = "seven tired owls guard the lighthouse";

fn client_binary() -> PathBuf {
    env!("CARGO_BIN_EXE_micromsg-test-client").into()
}

/// `micromsg --json --profile DIR ARGS…` with `MICROMSG_PASSPHRASE` set to `passphrase` (or
/// unset): exit status, stdout, stderr.
fn run_with(profile: &Path, args: &[&str], passphrase: Option<&str>) -> (bool, String, String) {
    let mut command = Command::new(client_binary());
    command
        .arg("--json")
        .arg("--profile")
        .arg(profile)
        .args(args)
        .env_remove("MICROMSG_PROFILE")
        .env_remove("MICROMSG_PASSPHRASE")
        .stdin(Stdio::null());
    if let Some(p) = passphrase {
        command.env("MICROMSG_PASSPHRASE", p);
    }
    let out = command.output().unwrap();
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

/// A command that must succeed: its one JSON object.
fn object(profile: &Path, args: &[&str]) -> Value {
    let (ok, stdout, stderr) = run_with(profile, args, Some(PASSPHRASE));
    assert!(ok, "{args:?} failed: {stdout} {stderr}");
    serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("{args:?}: not one JSON object ({e}): {stdout}"))
}

/// A command that must fail: the text of its one JSON error.
fn error(profile: &Path, args: &[&str], passphrase: Option<&str>) -> String {
    let (ok, stdout, stderr) = run_with(profile, args, passphrase);
    assert!(!ok, "{args:?} succeeded: {stdout}");
    assert_eq!(stderr, "", "{args:?}: nothing on stderr under --json");
    let value: Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("{args:?}: not the JSON error ({e}): {stdout}"));
    value["error"].as_str().unwrap().to_owned()
}

/// The keys of a JSON object, which must be exactly `keys` (docs/cli.md).
fn has_keys(value: &Value, keys: &[&str]) {
    let mut got: Vec<&str> = value
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {value}"))
        .keys()
        .map(String::as_str)
        .collect();
    got.sort_unstable();
    let mut want = keys.to_vec();
    want.sort_unstable();
    assert_eq!(got, want, "{value}");
}

const COUNTS: [&str; 6] = [
    "files",
    "bytes",
    "contacts",
    "conversations",
    "groups",
    "outbox",
];

/// The names in `dir`, sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

/// A `listen --json` child process and its event lines.
struct Listen {
    _child: Child,
    events: Lines<BufReader<ChildStdout>>,
}

impl Listen {
    /// Starts `listen --accept any --offline-after 0` and waits for its `listening` event.
    async fn start(profile: &Path) -> Self {
        let mut child = tokio::process::Command::new(client_binary())
            .args(["--json", "--profile"])
            .arg(profile)
            .args(["listen", "--accept", "any", "--offline-after", "0"])
            .env_remove("MICROMSG_PROFILE")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let events = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut listen = Self {
            _child: child,
            events,
        };
        listen
            .until("the listening event", |e| e["event"] == "listening")
            .await;
        listen
    }

    /// Reads events until one satisfies `want` (30 s at most); returns it.
    async fn until(&mut self, what: &str, want: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let line = tokio::time::timeout_at(deadline, self.events.next_line())
                .await
                .unwrap_or_else(|_| panic!("listen printed no {what} within 30 s"))
                .unwrap()
                .unwrap_or_else(|| panic!("listen ended before {what}"));
            let event: Value = serde_json::from_str(&line).unwrap();
            assert_ne!(
                event["event"], "identity-changed",
                "the imported device must present the pinned key: {event}"
            );
            if want(&event) {
                return event;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_imported_device_keeps_talking_to_its_contact_live_and_offline() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path(), "").await;
    let ca = broker.ca.to_str().unwrap().to_owned();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let register = |p: &Path| {
        object(p, &["register", "--broker", &broker.addr, "--ca", &ca])["number"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let a_number = register(&a);
    let b_number = register(&b);

    // A talks to B, names B, and makes a group with B: all of it must travel.
    let mut b_listen = Listen::start(&b).await;
    object(&a, &["contact", "add", &b_number]);
    object(&a, &["contact", "name", &b_number, "Beatrix"]);
    object(&a, &["send", &b_number, "before the move"]);
    b_listen
        .until("A's first message", |e| {
            e["event"] == "message" && e["text"] == "before the move"
        })
        .await;
    let group = object(&a, &["group", "create", "lighthouse", &b_number])["data"]["group"]
        .as_str()
        .unwrap()
        .to_owned();
    let pinned = object(&a, &["contact", "list"])["contacts"][0]["identity"].clone();
    assert!(pinned.is_string(), "A pinned B's key: {pinned}");

    // No export while an agent runs for the profile: B's listen does.
    let refused = dir.path().join("b.mmdx");
    let why = error(
        &b,
        &["export", "--out", refused.to_str().unwrap()],
        Some(PASSPHRASE),
    );
    assert!(why.contains("`listen` or `chat` is running"), "{why}");
    assert!(!refused.exists());

    // A (no agent running) exports.
    let file = dir.path().join("a.mmdx");
    let exported = object(&a, &["export", "--out", file.to_str().unwrap()]);
    has_keys(
        &exported,
        &[&["file", "number", "device"][..], &COUNTS].concat(),
    );
    assert_eq!(exported["number"], a_number.as_str(), "{exported}");
    assert_eq!(exported["contacts"], 1, "{exported}");
    assert_eq!(exported["conversations"], 1, "{exported}");
    assert_eq!(exported["groups"], 1, "{exported}");
    let bytes = std::fs::read(&file).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "the export file is private");
    }
    assert_eq!(&bytes[..4], b"MMDX");
    for plain in [
        b_number.as_str(),
        a_number.as_str(),
        "before the move",
        "Beatrix",
        "lighthouse",
        group.as_str(),
    ] {
        assert!(
            !contains(&bytes, plain),
            "{plain:?} is readable in the file"
        );
    }

    // While A is away, B writes: B's agent deposits it at the broker.
    let sent = object(&b, &["send", &a_number, "while you were away"]);
    assert_eq!(sent["data"]["delivered"], "deposited", "{sent}");

    // The refusals, each with its own error, each writing nothing.
    let a2 = dir.path().join("a2");
    let before = names(dir.path());
    let file_arg = file.to_str().unwrap();
    let why = error(
        &a2,
        &["import", file_arg],
        Some("not the passphrase at all"),
    );
    assert!(why.contains("wrong passphrase"), "{why}");
    assert!(why.ends_with("nothing was written"), "{why}");
    let mut damaged = bytes.clone();
    let middle = damaged.len() / 2;
    damaged[middle] ^= 0x04;
    let damaged_path = dir.path().join("damaged.mmdx");
    std::fs::write(&damaged_path, &damaged).unwrap();
    let why = error(
        &a2,
        &["import", damaged_path.to_str().unwrap()],
        Some(PASSPHRASE),
    );
    assert!(why.contains("damaged"), "{why}");
    let mut newer = bytes.clone();
    newer[4..6].copy_from_slice(&2u16.to_be_bytes());
    let newer_path = dir.path().join("newer.mmdx");
    std::fs::write(&newer_path, &newer).unwrap();
    let why = error(
        &a2,
        &["import", newer_path.to_str().unwrap()],
        Some(PASSPHRASE),
    );
    assert!(why.contains("format version 2"), "{why}");
    // No passphrase and no terminal: refused before anything is read or written.
    let why = error(&a2, &["import", file_arg], None);
    assert!(why.contains("MICROMSG_PASSPHRASE"), "{why}");
    let mut after = names(dir.path());
    after.retain(|n| n != "damaged.mmdx" && n != "newer.mmdx");
    assert_eq!(after, before, "a refused import leaves nothing behind");
    // Nor into a profile that exists.
    let why = error(&b, &["import", file_arg], Some(PASSPHRASE));
    assert!(why.contains("already holds a profile"), "{why}");

    // The import.
    let imported = object(&a2, &["import", file_arg]);
    has_keys(
        &imported,
        &[&["profile", "number", "device"][..], &COUNTS].concat(),
    );
    assert_eq!(imported["number"], a_number.as_str(), "{imported}");
    assert_eq!(imported["files"], exported["files"], "{imported}");
    assert_eq!(imported["bytes"], exported["bytes"], "{imported}");
    assert_eq!(imported["contacts"], 1, "{imported}");
    assert_eq!(imported["groups"], 1, "{imported}");
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&a2.join("secrets.toml")), 0o600);
        assert_eq!(
            mode(&a2.join("profile.toml")),
            mode(&a.join("profile.toml"))
        );
    }
    let contacts = object(&a2, &["contact", "list"]);
    let bea = &contacts["contacts"][0];
    assert_eq!(bea["number"], b_number.as_str(), "{contacts}");
    assert_eq!(bea["name"], "Beatrix", "{contacts}");
    assert_eq!(bea["identity"], pinned, "the pinned key travelled");
    let history = object(&a2, &["history", &b_number]);
    assert_eq!(
        history["messages"][0]["text"], "before the move",
        "{history}"
    );
    let groups = object(&a2, &["group", "list"]);
    assert_eq!(groups["groups"][0]["group"], group.as_str(), "{groups}");

    // Offline: what B deposited while A was away arrives at the imported device.
    let mut a2_listen = Listen::start(&a2).await;
    let offline = a2_listen
        .until("the message deposited while A was away", |e| {
            e["event"] == "message" && e["text"] == "while you were away"
        })
        .await;
    assert_eq!(offline["from"], b_number.as_str(), "{offline}");
    assert_eq!(offline["offline"], true, "{offline}");

    // Live, both ways, with the same identity B pinned.
    let added = object(&a2, &["contact", "add", &b_number]);
    assert_eq!(added["data"]["peer"], b_number.as_str(), "{added}");
    let sent = object(&a2, &["send", &b_number, "live from the new machine"]);
    assert_eq!(sent["data"]["delivered"], "live", "{sent}");
    let got = b_listen
        .until("the imported device's live message", |e| {
            e["event"] == "message" && e["text"] == "live from the new machine"
        })
        .await;
    assert_eq!(got["from"], a_number.as_str(), "{got}");
    assert_eq!(got["offline"], false, "{got}");
    let sent = object(&b, &["send", &a_number, "live to the new machine"]);
    assert_eq!(sent["data"]["delivered"], "live", "{sent}");
    a2_listen
        .until("B's live message", |e| {
            e["event"] == "message" && e["text"] == "live to the new machine"
        })
        .await;
    let b_contacts = object(&b, &["contact", "list"]);
    assert_eq!(
        b_contacts["contacts"][0]["identity_changed"], false,
        "{b_contacts}"
    );
}

/// A profile directory made with the client library: `export` needs no broker.
fn offline_profile(dir: &Path) {
    use micromsg_client::profile::{Profile, ProfileInfo, Secrets};
    let profile = Profile::new(dir);
    profile
        .write_info(&ProfileInfo {
            broker: "127.0.0.1:7400".into(),
            tls_name: "127.0.0.1".into(),
            number: "5550001".into(),
            device: 1,
            nonce_step: 6,
            broker_identity: None,
        })
        .unwrap();
    let secret = |b| micromsg_crypto::Secret32::from_bytes([b; 32]);
    profile
        .write_secrets(&Secrets {
            client_secret: secret(1),
            server_secret: secret(2),
            identity_seed: secret(3),
        })
        .unwrap();
}

/// Runs `export` on a terminal of its own (`script` gives it a pseudo-terminal) and types
/// `answers` at its prompts, each once the prompt is shown: its success and what the
/// terminal showed.
async fn export_on_a_terminal(profile: &Path, out: &Path, answers: [&str; 2]) -> (bool, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let quote = |p: &Path| format!("'{}'", p.display().to_string().replace('\'', "'\\''"));
    let command = format!(
        "{} --profile {} export --out {}",
        quote(&client_binary()),
        quote(profile),
        quote(out)
    );
    let mut child = tokio::process::Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .env_remove("MICROMSG_PASSPHRASE")
        .env_remove("MICROMSG_PROFILE")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("`script` (util-linux) runs the command on a pseudo-terminal");
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut shown = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    for (prompt, answer) in [
        "passphrase for the export file:",
        "the same passphrase again:",
    ]
    .into_iter()
    .zip(answers)
    {
        while !String::from_utf8_lossy(&shown).contains(prompt) {
            let mut chunk = [0u8; 1024];
            let n = tokio::time::timeout_at(deadline, stdout.read(&mut chunk))
                .await
                .unwrap_or_else(|_| panic!("no prompt {prompt:?} within 30 s: {shown:?}"))
                .unwrap();
            assert!(n > 0, "the terminal closed before {prompt:?}");
            shown.extend_from_slice(&chunk[..n]);
        }
        stdin
            .write_all(format!("{answer}\n").as_bytes())
            .await
            .unwrap();
    }
    tokio::time::timeout_at(deadline, stdout.read_to_end(&mut shown))
        .await
        .expect("export did not end within 30 s")
        .unwrap();
    let status = child.wait().await.unwrap();
    (
        status.success(),
        String::from_utf8_lossy(&shown).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_terminal_the_passphrase_is_asked_twice_and_must_match() {
    let dir = tempfile::tempdir().unwrap();
    let profile = dir.path().join("p");
    offline_profile(&profile);
    let out = dir.path().join("p.mmdx");

    let (ok, shown) = export_on_a_terminal(
        &profile,
        &out,
        ["first passphrase typed", "second passphrase typed"],
    )
    .await;
    assert!(!ok, "{shown}");
    assert!(shown.contains("the two passphrases differ"), "{shown}");
    assert!(!out.exists(), "a refused export writes no file");

    let typed = "the passphrase typed twice";
    let (ok, shown) = export_on_a_terminal(&profile, &out, [typed, typed]).await;
    assert!(ok, "{shown}");
    assert!(shown.contains("exported number 5550001"), "{shown}");
    // What was typed opens the file.
    let (ok, stdout, stderr) = run_with(
        &dir.path().join("q"),
        &["import", out.to_str().unwrap()],
        Some(typed),
    );
    assert!(ok, "{stdout} {stderr}");
    let imported: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(imported["number"], "5550001", "{imported}");
}
