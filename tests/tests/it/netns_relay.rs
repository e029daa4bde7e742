//! Two clients that cannot reach each other directly — one behind a NAT router, one behind a
//! firewall that drops incoming connections, each on a host of its own (network namespaces,
//! `micromsg_tests::netns`) — talk through the broker's relay, with the real `micromsg` and
//! broker binaries started the ordinary way (`listen`, `contact add`, `send`, no extra flag).
//! The direct attempt fails; the relay carries the handshake, messages both ways and the
//! disconnect notice; a broker restart cuts the relayed session, and the next message (deposited)
//! makes the sender's agent set one up again, the other way round: the client behind the NAT,
//! now the target, asks for the relay from the start;
//! and no relayed text ever appears in the broker's log (at debug level) or data directory.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use micromsg_tests::netns::{self, Hosts};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Child;
use tokio::sync::mpsc;

use crate::broker_binary;

fn client_binary() -> std::path::PathBuf {
    env!("CARGO_BIN_EXE_micromsg-test-client").into()
}

/// Runs a one-shot `micromsg --json …` on `host`; returns its JSON answer.
async fn micromsg(host: &str, profile: &Path, args: &[&str]) -> Value {
    let out = Hosts::command(host, client_binary())
        .arg("--profile")
        .arg(profile)
        .arg("--json")
        .args(args)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "micromsg {args:?} on {host} failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("micromsg {args:?}: not JSON ({e}): {stdout}"))
}

/// A `listen --json` on a host, its events as they come.
struct Listen {
    child: Child,
    events: mpsc::Receiver<Value>,
}

impl Listen {
    fn start(host: &str, profile: &Path) -> Self {
        let mut child = Hosts::command(host, client_binary())
            .arg("--profile")
            .arg(profile)
            .args([
                "--json",
                "listen",
                "--accept",
                "any",
                "--reconnect-max",
                "2",
            ])
            .args(["--peer-listen", "0.0.0.0:7001"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let (tx, events) = mpsc::channel(1024);
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Ok(value) = serde_json::from_str(&line)
                    && tx.send(value).await.is_err()
                {
                    break;
                }
            }
        });
        Self { child, events }
    }

    /// The next event for which `pick` holds; panics after 60 s.
    async fn expect(&mut self, what: &str, pick: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let mut skipped = Vec::new();
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(event)) if pick(&event) => return event,
                Ok(Some(other)) => skipped.push(other.to_string()),
                Ok(None) => panic!("listen ended while waiting for {what}; saw {skipped:#?}"),
                Err(_) => panic!("no {what} within 60 s; saw {skipped:#?}"),
            }
        }
    }

    /// The next events for which `first` and `second` hold, in either order.
    async fn expect_both(
        &mut self,
        what: &str,
        first: impl Fn(&Value) -> bool,
        second: impl Fn(&Value) -> bool,
    ) -> (Value, Value) {
        let (mut a, mut b) = (None, None);
        while a.is_none() || b.is_none() {
            let e = self
                .expect(what, |e| {
                    (a.is_none() && first(e)) || (b.is_none() && second(e))
                })
                .await;
            if a.is_none() && first(&e) {
                a = Some(e);
            } else {
                b = Some(e);
            }
        }
        (a.unwrap_or_default(), b.unwrap_or_default())
    }

    /// SIGINT, as Ctrl-C: the agent says goodbye to its peers.
    async fn interrupt(mut self) {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-INT", &pid.to_string()])
                .status();
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
    }
}

fn event(kind: &'static str) -> impl Fn(&Value) -> bool {
    move |e| e["event"] == kind
}

/// The broker on the public host, on the address clients use.
struct Broker {
    child: Option<Child>,
    config: std::path::PathBuf,
    log: std::path::PathBuf,
    host: String,
    port: u16,
}

impl Broker {
    /// A broker on the public host at `BROKER_IP:port`, its data in `dir/name`; `extra` is
    /// appended to its configuration (TOML).
    async fn start(host: &str, dir: &Path, name: &str, port: u16, extra: &str) -> Self {
        let config = dir.join(format!("{name}.toml"));
        std::fs::write(
            &config,
            format!(
                "[server]\nlisten = \"0.0.0.0:{port}\"\ndata_dir = \"{}\"\n{extra}\n[tls]\nnames = [\"{}\"]\n",
                dir.join(name).display(),
                netns::BROKER_IP
            ),
        )
        .unwrap();
        let mut broker = Self {
            child: None,
            config,
            log: dir.join(format!("{name}.log")),
            host: host.to_owned(),
            port,
        };
        broker.spawn().await;
        broker
    }

    async fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Hosts::command(&self.host, broker_binary())
            .args(["serve", "--config"])
            .arg(&self.config)
            // Debug: the most the broker ever logs; relayed bytes must not be in it either.
            .env("MICROMSG_LOG", "debug")
            .env("MICROMSG_ADMIN_LISTEN", "127.0.0.1:0")
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        self.child = Some(child);
        for _ in 0..600 {
            if Hosts::can_connect(&self.host, &format!("127.0.0.1:{}", self.port), 1) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "the broker did not come up; its log:\n{}",
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
    }

    async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().await.unwrap();
        }
    }
}

/// `micromsg register` on `host` with its profile in `profile`; the new number.
async fn register(host: &str, profile: &Path, broker: &str, ca: &Path) -> String {
    let ca = ca.to_str().unwrap();
    let answer = micromsg(host, profile, &["register", "--broker", broker, "--ca", ca]).await;
    answer["number"].as_str().unwrap().to_owned()
}

/// Bob stops (Ctrl-C): his disconnect notice crosses the relay to Alice, who stops too.
async fn bob_leaves(mut a_listen: Listen, b_listen: Listen, bob: &str) {
    b_listen.interrupt().await;
    let ended = a_listen
        .expect("bob's disconnect", |e| {
            e["event"] == "session-ended" && e["peer"] == bob
        })
        .await;
    assert!(
        ended["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("disconnect"),
        "{ended}"
    );
    a_listen.interrupt().await;
}

/// Whether `needle` occurs in any file under `dir`.
fn found_under(dir: &Path, needle: &[u8]) -> Option<std::path::PathBuf> {
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        if path.is_dir() {
            if let Some(hit) = found_under(&path, needle) {
                return Some(hit);
            }
        } else if let Ok(bytes) = std::fs::read(&path)
            && bytes.windows(needle.len()).any(|w| w == needle)
        {
            return Some(path);
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_behind_a_nat_and_a_firewall_talk_through_the_relay() {
    let hosts = Hosts::build();
    let dir = tempfile::tempdir().unwrap();
    let mut broker = Broker::start(&hosts.public, dir.path(), "data", 7400, "").await;
    let ca = dir.path().join("data/tls/ca.pem");
    let broker_addr = format!("{}:7400", netns::BROKER_IP);
    let (a_host, b_host) = (hosts.nat_client.clone(), hosts.firewalled_client.clone());
    let (a_dir, b_dir) = (dir.path().join("alice"), dir.path().join("bob"));
    let alice = register(&a_host, &a_dir, &broker_addr, &ca).await;
    let bob = register(&b_host, &b_dir, &broker_addr, &ca).await;

    let mut a_listen = Listen::start(&a_host, &a_dir);
    let mut b_listen = Listen::start(&b_host, &b_dir);
    a_listen.expect("alice listening", event("listening")).await;
    b_listen.expect("bob listening", event("listening")).await;
    // The hosts are what they claim: each client listens for peers on port 7001, and neither
    // can open a connection to the other (at its own address, or at the NAT's).
    assert!(
        Hosts::can_connect(&b_host, "127.0.0.1:7001", 2),
        "bob's listen has no port"
    );
    let to_bob = format!("{}:7001", netns::CLIENT_B_IP);
    let to_alice = format!("{}:7001", netns::NAT_PUBLIC_IP);
    assert!(
        !Hosts::can_connect(&a_host, &to_bob, 2),
        "the firewall let alice in"
    );
    assert!(
        !Hosts::can_connect(&b_host, &to_alice, 2),
        "the NAT let bob in"
    );

    // Alice adds bob the ordinary way: the direct attempt fails, the relay carries the session.
    let added = micromsg(&a_host, &a_dir, &["contact", "add", &bob]).await;
    assert_eq!(added["data"]["path"], "relay", "{added}");
    let up = a_listen
        .expect("alice's session", event("session-started"))
        .await;
    assert_eq!(up["path"], "relay", "{up}");
    let up = b_listen
        .expect("bob's session", event("session-started"))
        .await;
    assert_eq!(up["path"], "relay", "{up}");
    let status = micromsg(&a_host, &a_dir, &["status"]).await;
    assert_eq!(status["data"]["sessions"][0]["path"], "relay", "{status}");

    // Messages both ways, live, end to end through the relay.
    let marker = format!("relayed-marker-{}", std::process::id());
    let sent = micromsg(
        &a_host,
        &a_dir,
        &["send", &bob, &format!("{marker} hello bob")],
    )
    .await;
    assert_eq!(sent["data"]["delivered"], "live", "{sent}");
    let got = b_listen
        .expect("alice's message", |e| {
            e["event"] == "message" && e["from"] == alice
        })
        .await;
    assert_eq!(got["text"], format!("{marker} hello bob"));
    assert_eq!(got["offline"], false);
    micromsg(
        &b_host,
        &b_dir,
        &["send", &alice, &format!("{marker} hello alice")],
    )
    .await;
    let got = a_listen
        .expect("bob's message", |e| {
            e["event"] == "message" && e["from"] == bob
        })
        .await;
    assert_eq!(got["text"], format!("{marker} hello alice"));

    // The broker restarts: the relayed session ends with it; both log in again; bob's next
    // message sets a session up again. This time alice (behind the NAT, as the broker's
    // CLIENT-IP tells her) is the target and joins the relay at once.
    broker.kill().await;
    a_listen
        .expect("alice's session to end", |e| e["event"] == "session-ended")
        .await;
    b_listen
        .expect("bob's session to end", |e| e["event"] == "session-ended")
        .await;
    broker.spawn().await;
    a_listen.expect("alice back", event("broker-back")).await;
    b_listen.expect("bob back", event("broker-back")).await;
    // With no live session, bob's message is deposited (sealed with their last session) and
    // his agent asks alice for a new session at once; alice gets the message either way.
    micromsg(
        &b_host,
        &b_dir,
        &["send", &alice, &format!("{marker} again")],
    )
    .await;
    let (up, got) = a_listen
        .expect_both(
            "alice's new session and bob's message after the restart",
            event("session-started"),
            |e| e["event"] == "message" && e["from"] == bob,
        )
        .await;
    assert_eq!(up["path"], "relay", "{up}");
    assert_eq!(got["text"], format!("{marker} again"));
    b_listen
        .expect("bob's new session", event("session-started"))
        .await;
    let sent = micromsg(
        &b_host,
        &b_dir,
        &["send", &alice, &format!("{marker} live again")],
    )
    .await;
    assert_eq!(sent["data"]["delivered"], "live", "{sent}");
    let got = a_listen
        .expect("bob's live message after the restart", |e| {
            e["event"] == "message" && e["from"] == bob && e["offline"] == false
        })
        .await;
    assert_eq!(got["text"], format!("{marker} live again"));

    // Bob stops (Ctrl-C): his disconnect notice crosses the relay.
    bob_leaves(a_listen, b_listen, &bob).await;
    broker.kill().await;

    // What the broker relayed never reached its log or its data directory.
    let log = std::fs::read_to_string(dir.path().join("data.log")).unwrap();
    assert!(
        log.contains("relay"),
        "the debug log shows no relay at all:\n{log}"
    );
    assert!(!log.contains(&marker), "relayed text in the broker's log");
    assert_eq!(
        found_under(&dir.path().join("data"), marker.as_bytes()),
        None
    );
}

/// The same hosts, with the two clients on two brokers of a network (both on the public host):
/// the brokers join the relay over their federation link.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_behind_a_nat_and_a_firewall_on_two_brokers_talk_through_the_relay() {
    let hosts = Hosts::build();
    let dir = tempfile::tempdir().unwrap();
    let init = std::process::Command::new(broker_binary())
        .current_dir(dir.path())
        .args([
            "network", "init", "--out", "net", "--broker", "x=555", "--broker", "y=556",
        ])
        .args([
            "--endpoint",
            "x=127.0.0.1:7500",
            "--endpoint",
            "y=127.0.0.1:7510",
        ])
        .output()
        .unwrap();
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    let network = dir.path().join("net/network.toml");
    let member = |id: &str| {
        format!(
            "broker_id = \"{id}\"\n[federation]\nnetwork_file = \"{}\"\n",
            network.display()
        )
    };
    let mut x = Broker::start(&hosts.public, dir.path(), "x", 7400, &member("x")).await;
    let mut y = Broker::start(&hosts.public, dir.path(), "y", 7410, &member("y")).await;
    let (a_host, b_host) = (hosts.nat_client.clone(), hosts.firewalled_client.clone());
    let (a_dir, b_dir) = (dir.path().join("alice"), dir.path().join("bob"));
    let at = |port: u16, name: &str| {
        let ca = dir.path().join(name).join("tls/ca.pem");
        (format!("{}:{port}", netns::BROKER_IP), ca)
    };
    let (x_addr, x_ca) = at(7400, "x");
    let (y_addr, y_ca) = at(7410, "y");
    let alice = register(&a_host, &a_dir, &x_addr, &x_ca).await;
    let bob = register(&b_host, &b_dir, &y_addr, &y_ca).await;
    assert!(
        alice.starts_with("555") && bob.starts_with("556"),
        "{alice} {bob}"
    );
    let mut a_listen = Listen::start(&a_host, &a_dir);
    let mut b_listen = Listen::start(&b_host, &b_dir);
    a_listen.expect("alice listening", event("listening")).await;
    b_listen.expect("bob listening", event("listening")).await;

    let added = micromsg(&a_host, &a_dir, &["contact", "add", &bob]).await;
    assert_eq!(added["data"]["path"], "relay", "{added}");
    let up = b_listen
        .expect("bob's session", event("session-started"))
        .await;
    assert_eq!(up["path"], "relay", "{up}");
    let marker = format!("two-broker-marker-{}", std::process::id());
    let sent = micromsg(&a_host, &a_dir, &["send", &bob, &format!("{marker} to y")]).await;
    assert_eq!(sent["data"]["delivered"], "live", "{sent}");
    let got = b_listen
        .expect("alice's message", |e| {
            e["event"] == "message" && e["from"] == alice
        })
        .await;
    assert_eq!(got["text"], format!("{marker} to y"));
    micromsg(
        &b_host,
        &b_dir,
        &["send", &alice, &format!("{marker} to x")],
    )
    .await;
    let got = a_listen
        .expect("bob's message", |e| {
            e["event"] == "message" && e["from"] == bob
        })
        .await;
    assert_eq!(got["text"], format!("{marker} to x"));

    bob_leaves(a_listen, b_listen, &bob).await;
    x.kill().await;
    y.kill().await;
    for name in ["x", "y"] {
        let log = std::fs::read_to_string(dir.path().join(format!("{name}.log"))).unwrap();
        assert!(
            !log.contains(&marker),
            "relayed text in broker {name}'s log"
        );
        assert_eq!(found_under(&dir.path().join(name), marker.as_bytes()), None);
    }
}
