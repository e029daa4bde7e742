//! `micromsg chat` end to end: the real binary in two pseudo-terminals (tmux, driven with
//! `send-keys` and read with `capture-pane`), on a real broker process. Alice types; Bob's
//! screen shows the message with her name and the time, his unread count moves until he looks,
//! his reply reaches her. The broker is killed and started again while both screens are open:
//! the status bars say reconnecting, then connected, and the message sent meanwhile (over the
//! live end-to-end session) is not lost.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use micromsg_client::agent::{AcceptPolicy, Command as AgentCommand};
use micromsg_tests::agents::{self, Ask as _, register_at};

use crate::process::BrokerProcess;

/// A tmux server of the test's own, with one window per screen; killed when dropped.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn new() -> Self {
        let socket = format!("mm-chat-{}-{}", std::process::id(), rand_suffix());
        Self { socket }
    }

    fn tmux(&self, args: &[&str]) -> std::process::Output {
        Command::new("tmux")
            .args(["-L", &self.socket])
            .args(args)
            .output()
            .unwrap_or_else(|e| {
                panic!("THIS TEST CANNOT RUN: tmux is needed to drive a terminal ({e})")
            })
    }

    /// Opens a 100×30 screen named `name` running `command`.
    fn open(&self, name: &str, command: &str) {
        let out = self.tmux(&[
            "new-session",
            "-d",
            "-s",
            name,
            "-x",
            "100",
            "-y",
            "30",
            command,
        ]);
        assert!(
            out.status.success(),
            "tmux: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn keys(&self, name: &str, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", name];
        args.extend_from_slice(keys);
        assert!(self.tmux(&args).status.success());
    }

    fn type_text(&self, name: &str, text: &str) {
        assert!(
            self.tmux(&["send-keys", "-t", name, "-l", text])
                .status
                .success()
        );
    }

    fn screen(&self, name: &str) -> String {
        String::from_utf8_lossy(&self.tmux(&["capture-pane", "-p", "-t", name]).stdout).into()
    }

    /// Waits until `name`'s screen satisfies `ok`; panics with the screen after 30 s.
    fn wait_for(&self, name: &str, what: &str, ok: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let screen = self.screen(name);
            if ok(&screen) {
                return screen;
            }
            assert!(
                Instant::now() < deadline,
                "{name}'s screen never showed {what}:\n{screen}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.tmux(&["kill-server"]);
    }
}

fn rand_suffix() -> u32 {
    use rand_core::RngCore as _;
    rand_core::OsRng.next_u32() % 100_000
}

fn chat_command(profile: &Path) -> String {
    format!(
        "env TERM=xterm-256color TZ=UTC {} --profile {} chat --accept any",
        env!("CARGO_BIN_EXE_micromsg-test-client"),
        profile.display()
    )
}

/// The UTC clock `ago_secs` seconds ago, as the chat shows it.
fn utc_clock_now(ago_secs: i64) -> String {
    (jiff::Timestamp::now() - jiff::SignedDuration::from_secs(ago_secs))
        .to_zoned(jiff::tz::TimeZone::UTC)
        .strftime("%H:%M")
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_people_chat_in_their_terminals_through_a_broker_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = BrokerProcess::start(dir.path(), "").await;
    let alice = register_at(&broker.addr, &broker.ca, dir.path().join("alice")).await;
    let bob = register_at(&broker.addr, &broker.ca, dir.path().join("bob")).await;
    let carol = register_at(&broker.addr, &broker.ca, dir.path().join("carol")).await;
    // Contacts first (the agents of `listen`), with names: Bob knows Alice and Carol.
    {
        let (a, _a_rx) = agents::online(&alice, agents::config(AcceptPolicy::Any)).await;
        let (b, _b_rx) = agents::online(&bob, agents::config(AcceptPolicy::Any)).await;
        let (c, _c_rx) = agents::online(&carol, agents::config(AcceptPolicy::Any)).await;
        for (agent, number) in [(&a, &bob.number), (&c, &bob.number)] {
            assert!(agents::contact_add(agent, number).await.ok);
        }
        for (agent, number, name) in [
            (&b, &alice.number, "Alice"),
            (&b, &carol.number, "Carol"),
            (&a, &bob.number, "Bob"),
        ] {
            let reply = agent
                .ask(AgentCommand::ContactName {
                    number: number.clone(),
                    name: Some(name.into()),
                })
                .await;
            assert!(reply.ok, "{reply:?}");
        }
        for agent in [a, b, c] {
            agent.stop().await.unwrap();
        }
    }

    let tmux = Tmux::new();
    tmux.open("alice", &chat_command(alice.profile.dir()));
    tmux.open("bob", &chat_command(bob.profile.dir()));
    tmux.wait_for("alice", "its contacts", |s| {
        s.contains("Bob") && s.contains("connected")
    });
    tmux.wait_for("bob", "its contacts", |s| {
        s.contains("Alice") && s.contains("Carol")
    });
    // Bob looks at Carol's conversation (contacts are listed by number).
    let alice_first = alice.number < carol.number;
    if alice_first {
        tmux.keys("bob", &["Down"]);
    }
    tmux.wait_for("bob", "Carol's conversation", |s| s.contains("Carol ("));

    tmux.type_text("alice", "hello bob, it is alice");
    tmux.keys("alice", &["Enter"]);
    tmux.wait_for("alice", "her message delivered live", |s| {
        s.contains("me: hello bob, it is alice ✓")
    });
    tmux.wait_for("bob", "an unread count on Alice", |s| {
        s.contains("Alice (1)")
    });
    tmux.keys("bob", &[if alice_first { "Up" } else { "Down" }]);
    let screen = tmux.wait_for("bob", "Alice's message with her name and the time", |s| {
        s.contains("Alice: hello bob, it is alice")
    });
    assert!(
        !screen.contains("Alice (1)"),
        "the unread count stayed:\n{screen}"
    );
    // Sent within the last minute (the clock may have turned since).
    let times = [utc_clock_now(0), utc_clock_now(60)];
    assert!(
        times
            .iter()
            .any(|t| screen.contains(&format!("{t} Alice: hello bob"))),
        "no {times:?} before the message:\n{screen}"
    );
    tmux.type_text("bob", "hi alice");
    tmux.keys("bob", &["Enter"]);
    tmux.wait_for("alice", "Bob's reply", |s| s.contains("Bob: hi alice"));
    // Once each: the message that arrived while Bob looked elsewhere, and his reply.
    let bob_screen = tmux.screen("bob");
    assert_eq!(
        bob_screen.matches("Alice: hello bob, it is alice").count(),
        1,
        "{bob_screen}"
    );
    assert!(bob_screen.contains(" me: hi alice"), "{bob_screen}");
    assert!(
        !bob_screen.contains("--:--"),
        "a message without its time:\n{bob_screen}"
    );

    // The device list, from inside the chat.
    tmux.type_text("alice", "/devices");
    tmux.keys("alice", &["Enter"]);
    tmux.wait_for("alice", "the device list", |s| {
        s.contains("Devices (Esc closes)") && s.contains("(this device)")
    });
    tmux.keys("alice", &["Escape"]);
    tmux.wait_for("alice", "the list closed", |s| {
        !s.contains("Devices (Esc closes)")
    });

    // The broker goes away and comes back while both screens are open.
    broker.kill();
    tmux.wait_for("alice", "reconnecting", |s| s.contains("reconnecting in"));
    tmux.wait_for("bob", "reconnecting", |s| s.contains("reconnecting in"));
    // The live session is peer to peer: a message now is not lost.
    tmux.type_text("alice", "during the outage");
    tmux.keys("alice", &["Enter"]);
    tmux.wait_for("bob", "the message sent during the outage", |s| {
        s.contains("Alice: during the outage")
    });
    broker.restart().await;
    tmux.wait_for("alice", "connected again", |s| {
        s.contains("broker: connected")
    });
    tmux.wait_for("bob", "connected again", |s| {
        s.contains("broker: connected")
    });
    tmux.type_text("bob", "after the restart");
    tmux.keys("bob", &["Enter"]);
    tmux.wait_for("alice", "the message after the restart", |s| {
        s.contains("Bob: after the restart")
    });

    // Leaving restores the terminal and ends the program.
    tmux.keys("alice", &["C-c"]);
    tmux.keys("bob", &["C-c"]);
    let deadline = Instant::now() + Duration::from_secs(15);
    while tmux.tmux(&["has-session", "-t", "alice"]).status.success() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        !tmux.tmux(&["has-session", "-t", "alice"]).status.success(),
        "chat did not exit on Ctrl-C"
    );
}

/// A `listen` already runs for the profile: `chat` attaches to it (commands and notices over
/// its control socket) instead of starting a second agent, and leaving the screen leaves the
/// `listen` running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_attaches_to_a_running_listen() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path(), "").await;
    let alice = register_at(&broker.addr, &broker.ca, dir.path().join("alice")).await;
    let bob = register_at(&broker.addr, &broker.ca, dir.path().join("bob")).await;
    let (a, mut a_rx) = agents::online(&alice, agents::config(AcceptPolicy::Any)).await;
    // Bob's `listen`, with its control socket.
    let (b, _b_rx) = agents::online(
        &bob,
        micromsg_client::agent::AgentConfig {
            control: true,
            ..agents::config(AcceptPolicy::Any)
        },
    )
    .await;
    assert!(agents::contact_add(&a, &bob.number).await.ok);

    let tmux = Tmux::new();
    tmux.open("bob", &chat_command(bob.profile.dir()));
    tmux.wait_for("bob", "the attached screen", |s| {
        s.contains("attached to the running `listen`") && s.contains("online, direct")
    });
    let reply = a
        .ask(AgentCommand::Send {
            number: bob.number.clone(),
            text: "to the attached screen".into(),
        })
        .await;
    assert!(reply.ok, "{reply:?}");
    tmux.wait_for("bob", "alice's message", |s| {
        s.contains("to the attached screen")
    });
    tmux.type_text("bob", "from the attached screen");
    tmux.keys("bob", &["Enter"]);
    let got = micromsg_tests::agents::message_from(&mut a_rx, &bob.number).await;
    assert_eq!(got.0, "from the attached screen");

    // Leaving the screen leaves the listen running: it still answers.
    tmux.keys("bob", &["C-c"]);
    let deadline = Instant::now() + Duration::from_secs(15);
    while tmux.tmux(&["has-session", "-t", "bob"]).status.success() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let status = b.ask(AgentCommand::Status).await;
    assert!(status.ok, "{status:?}");
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}
