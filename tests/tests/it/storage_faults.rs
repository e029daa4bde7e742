//! Storage faults, with the real parts: a disk that fills up (SQLite on a small tmpfs) and a
//! Postgres that goes away or hangs (the real server behind a [`FaultProxy`]). While it lasts
//! the broker answers a typed, retryable UNAVAILABLE, never INTERNAL and never after a long
//! hang; nothing it acknowledged is lost; and it recovers by itself, without a restart
//! (issue 19, findings 6 and 7).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use micromsg_client::link::LinkError;
use micromsg_tests::fault_proxy::{FaultProxy, Mode};
use micromsg_tests::raw::{deposit, number, pair, user};
use micromsg_tests::{Backend, TestBroker, drop_postgres_database, fetch_whole_inbox};
use micromsg_wire::message::request::AddDeviceArgs;
use micromsg_wire::{ErrorCode, Request, ResponseData};

/// A tmpfs of a fixed size, mounted for the test and unmounted when dropped.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status();
        assert!(
            matches!(status, Ok(s) if s.success()),
            "THIS TEST CANNOT RUN: mounting a {size} tmpfs at {} failed ({status:?}); it needs \
             root (scripts/test runs as root) to make a disk it can fill",
            dir.path().display()
        );
        Self { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// Fills the file system under `dir` with one file, to the last byte it takes.
fn fill(dir: &Path) -> PathBuf {
    use std::io::Write;
    let path = dir.join("filler");
    let mut file = std::fs::File::create(&path).unwrap();
    for chunk in [64 * 1024, 4096, 512, 1] {
        let block = vec![0u8; chunk];
        while file.write_all(&block).is_ok() {}
    }
    let _ = file.sync_all();
    path
}

/// A refusal that must be the typed, retryable UNAVAILABLE.
fn assert_unavailable(e: &LinkError) {
    match e {
        LinkError::Refused {
            code: ErrorCode::Unavailable,
            retry_after: Some(_),
            ..
        } => {}
        other => panic!("expected UNAVAILABLE with RetryAfter, got {other:?}"),
    }
}

#[tokio::test]
async fn a_full_disk_answers_unavailable_and_the_broker_recovers_once_there_is_room() {
    let disk = Tmpfs::mount("8m");
    let data = disk.path().join("data");
    let broker = TestBroker::start(Backend::Sqlite, |c| c.server.data_dir = data).await;
    let mut sender = user(&broker, "sender").await;
    let mut recipient = user(&broker, "recipient").await;
    pair(&mut sender, &mut recipient).await;
    let to = number(&recipient);

    let filler = fill(disk.path());
    // Deposits until the full disk refuses one: each is kept (OK) or refused with
    // UNAVAILABLE, never INTERNAL.
    let body = vec![0x5a; 40_000];
    let mut kept = 0;
    let mut refused_id = None;
    for id in 0..100u8 {
        match deposit(&mut sender, &to, id, &body).await {
            Ok(_) => kept += 1,
            Err(e) => {
                assert_unavailable(&e);
                refused_id = Some(id);
                break;
            }
        }
    }
    let refused_id = refused_id.expect("the full disk never refused a deposit");
    // The same deposit again, still full: the same typed answer.
    assert_unavailable(
        &deposit(&mut sender, &to, refused_id, &body)
            .await
            .unwrap_err(),
    );

    // Room again; no restart. The refused deposit goes in, and so do the writes that used to
    // keep failing: REGISTER, ADD-DEVICE, more deposits.
    std::fs::remove_file(&filler).unwrap();
    deposit(&mut sender, &to, refused_id, &body).await.unwrap();
    for id in 200..210u8 {
        deposit(&mut sender, &to, id, b"small").await.unwrap();
    }
    let _newcomer = user(&broker, "newcomer").await;
    let added = sender
        .link
        .call(Request::AddDevice(AddDeviceArgs { name: None }))
        .await
        .unwrap();
    assert!(matches!(added, ResponseData::AddDevice(_)), "{added:?}");

    // Nothing acknowledged was lost, and nothing refused was stored twice.
    let inbox = fetch_whole_inbox(&mut recipient).await;
    assert_eq!(inbox.len(), kept + 1 + 10);
    broker.stop().await;
}

/// `url` with its `host:port` replaced by `addr`.
fn through(url: &str, addr: std::net::SocketAddr) -> String {
    let (scheme, rest) = url.split_once("://").unwrap();
    let (authority, path) = rest.split_once('/').unwrap();
    let user = authority.rsplit_once('@').map(|(u, _)| format!("{u}@"));
    format!("{scheme}://{}{addr}/{path}", user.unwrap_or_default())
}

/// The `host:port` of a Postgres URL.
fn server_of(url: &str) -> std::net::SocketAddr {
    let rest = url.split_once("://").unwrap().1;
    let authority = rest.split_once('/').unwrap().0;
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host_port = host_port.replace("localhost", "127.0.0.1");
    host_port.parse().unwrap()
}

#[tokio::test]
async fn deposits_fail_fast_while_postgres_is_down_or_hangs_and_work_again_after() {
    let url = micromsg_tests::fresh_postgres_database().await;
    let proxy = FaultProxy::start(server_of(&url)).await;
    let proxied = through(&url, proxy.addr);
    let broker = TestBroker::start(Backend::Sqlite, |c| {
        c.database.url = Some(proxied);
        c.database.timeout_ms = 1000;
    })
    .await;
    let mut sender = user(&broker, "sender").await;
    let mut recipient = user(&broker, "recipient").await;
    pair(&mut sender, &mut recipient).await;
    let to = number(&recipient);
    deposit(&mut sender, &to, 1, b"before").await.unwrap();

    // Before, a DEPOSIT hung for up to 46 s while Postgres was down. Now it is refused
    // within the store timeout (1 s here) and a little.
    for (mode, id) in [(Mode::Down, 2), (Mode::Blackhole, 3)] {
        proxy.set(mode).await;
        for _ in 0..2 {
            let started = Instant::now();
            let refused = deposit(&mut sender, &to, id, b"during").await.unwrap_err();
            let took = started.elapsed();
            assert_unavailable(&refused);
            assert!(
                took < Duration::from_secs(5),
                "{mode:?}: UNAVAILABLE came after {took:?}, not within the 1 s store timeout"
            );
        }
    }

    // Back up: the pool reconnects by itself; the deposit that was refused goes in.
    proxy.set(Mode::Forward).await;
    let started = Instant::now();
    loop {
        match deposit(&mut sender, &to, 3, b"after").await {
            Ok(_) => break,
            Err(e) => {
                assert_unavailable(&e);
                assert!(
                    started.elapsed() < Duration::from_secs(20),
                    "the broker did not recover after Postgres came back: {e}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    let bodies: Vec<Vec<u8>> = fetch_whole_inbox(&mut recipient)
        .await
        .into_iter()
        .map(|m| m.body.into_vec())
        .collect();
    assert_eq!(bodies, vec![b"before".to_vec(), b"after".to_vec()]);
    broker.stop().await;
    drop_postgres_database(&url).await;
}

#[tokio::test]
async fn a_request_the_store_never_answers_is_cut_at_the_request_timeout() {
    let url = micromsg_tests::fresh_postgres_database().await;
    let proxy = FaultProxy::start(server_of(&url)).await;
    let proxied = through(&url, proxy.addr);
    // The store's own timeout is long on purpose: what ends the request below is the broker's
    // outer bound on every request, which holds whatever the store does (a black-holed
    // connection never lets `statement_timeout` act: the server never hears the statement).
    let broker = TestBroker::start(Backend::Sqlite, |c| {
        c.database.url = Some(proxied);
        c.database.timeout_ms = 60_000;
        c.limits.request_timeout_ms = 1_500;
    })
    .await;
    let mut owner = user(&broker, "owner").await;
    owner.link.call(Request::DeviceList).await.unwrap();

    proxy.set(Mode::Blackhole).await;
    let started = Instant::now();
    let refused = owner.link.call(Request::DeviceList).await.unwrap_err();
    let took = started.elapsed();
    assert_unavailable(&refused);
    assert!(
        took < Duration::from_secs(6),
        "DEVICE-LIST on a black-holed store was answered after {took:?}, not at the 1.5 s \
         request timeout"
    );
    // The connection is still usable: PING needs no store.
    owner.link.call(Request::Ping).await.unwrap();

    proxy.set(Mode::Forward).await;
    let started = Instant::now();
    loop {
        match owner.link.call(Request::DeviceList).await {
            Ok(_) => break,
            Err(e) => {
                assert_unavailable(&e);
                assert!(
                    started.elapsed() < Duration::from_secs(90),
                    "the broker did not recover after the store came back: {e}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    broker.stop().await;
    drop_postgres_database(&url).await;
}
