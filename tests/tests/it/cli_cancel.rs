//! Ctrl-C during `send`, with an agent running (issue 18): the real client binary's `send`
//! waits for a session with a contact, is interrupted (SIGINT), and the message never leaves,
//! even when the session comes up right after.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use micromsg_client::agent::{AcceptPolicy, AgentConfig, Command, Notice};
use micromsg_client::store::Store;
use micromsg_tests::agents::Ask as _;
use micromsg_tests::agents::{self, contact_add, expect, expect_none, session_started};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::process::BrokerProcess;

fn client_binary() -> PathBuf {
    env!("CARGO_BIN_EXE_micromsg-test-client").into()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_during_send_with_an_agent_running_sends_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path(), "").await;
    let register = async |name: &str| {
        agents::register_at(&broker.addr, &broker.ca, dir.path().join(name)).await
    };
    let a = register("a").await;
    let b = register("b").await;

    // A and B are contacts (the broker holds the pair); then A's device loses its own session
    // keys with B, as a device has that only read a contact's keys from another device: a
    // `send` to B must first ask B for a session, and waits.
    {
        let (a_agent, mut a_rx) = agents::online(&a, agents::config(AcceptPolicy::Any)).await;
        let (b_agent, _b_rx) = agents::online(&b, agents::config(AcceptPolicy::Any)).await;
        assert!(contact_add(&a_agent, &b.number).await.ok);
        session_started(&mut a_rx, &b.number).await;
        a_agent.stop().await.unwrap();
        b_agent.stop().await.unwrap();
    }
    std::fs::remove_file(a.profile.path(&format!("sessions/{}.json", b.number))).unwrap();

    // B answers only when told to (it is asked, also as an existing contact).
    let b_config = AgentConfig {
        auto_existing: false,
        ..agents::config(AcceptPolicy::Ask)
    };
    let (b_agent, mut b_rx) = agents::online(&b, b_config).await;

    // A's `listen`, the real binary.
    let mut listen = tokio::process::Command::new(client_binary())
        .arg("--profile")
        .arg(a.profile.dir())
        .args(["listen", "--accept", "any", "--offline-after", "60"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut a_out = BufReader::new(listen.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(Duration::from_secs(20), a_out.next_line())
        .await
        .expect("listen printed nothing")
        .unwrap()
        .unwrap();
    assert!(line.contains("listening as"), "{line}");

    let send = tokio::process::Command::new(client_binary())
        .arg("--profile")
        .arg(a.profile.dir())
        .args(["send", &b.number, "never to be read"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The send waits: B is being asked for a session.
    let request = expect(&mut b_rx, |n| match n {
        Notice::ContactRequest { from, request, .. } if *from == a.number => Some(request.clone()),
        _ => None,
    })
    .await;
    let pid = send.id().unwrap().to_string();
    let status = std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap();
    assert!(status.success());
    let out = tokio::time::timeout(Duration::from_secs(15), send.wait_with_output())
        .await
        .expect("send did not end after Ctrl-C")
        .unwrap();
    assert!(!out.status.success(), "a cancelled send fails");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cancelled: nothing was sent"),
        "{stderr} / {}",
        String::from_utf8_lossy(&out.stdout)
    );

    // B accepts now: the session comes up, and the cancelled message does not go over it.
    let reply = b_agent
        .ask(Command::Answer {
            request,
            accept: true,
        })
        .await;
    assert!(reply.ok, "{reply:?}");
    session_started(&mut b_rx, &a.number).await;
    expect_none(&mut b_rx, Duration::from_secs(2), |n| {
        matches!(n, Notice::Message { .. })
    })
    .await;
    let history = Store::new(&a.profile).read_history(&b.number).unwrap();
    assert!(
        history.iter().all(|e| e.text != "never to be read"),
        "{history:?}"
    );
    drop(listen);
    b_agent.stop().await.unwrap();
}
