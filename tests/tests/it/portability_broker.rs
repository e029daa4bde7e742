//! The broker-level data commands with the real binary (issue 22, item 4): `export` then
//! `import` on another broker (SQLite to Postgres) keeps the counts and the logins, and runs
//! again harmlessly; `migrate-store` copies a SQLite broker of 10,000 entities and 100,000
//! inbox items into Postgres, and a broker started on Postgres serves them; both refuse to
//! write a SQLite store under a serving broker (the data directory's lock).

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Instant;

use micromsg_client::account::{self, Session};
use micromsg_client::profile::Profile;
use micromsg_store::tables::{TABLES, Value, table};
use micromsg_store::{DeviceId, NewInboxItem, Number, Store};
use micromsg_tests::raw::{deposit, number, pair};
use micromsg_tests::{drop_postgres_database, fetch_whole_inbox, fresh_postgres_database};

use crate::broker_binary;
use crate::process::BrokerProcess;

/// Runs `micromsg-broker ARGS` to its end.
fn broker_command(args: &[&str]) -> Output {
    Command::new(broker_binary())
        .args(args)
        .env("MICROMSG_LOG", "warn")
        .output()
        .unwrap()
}

fn text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).into_owned()
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Registers `name` at `broker`, its profile under `dir`.
async fn register(broker: &BrokerProcess, dir: &Path, name: &str) -> (Session, Profile) {
    let profile = Profile::new(dir.join("profiles").join(name));
    let session = account::register(&profile, &broker.addr, &broker.ca, None)
        .await
        .unwrap();
    (session, profile)
}

/// Logs the profile's device in at `broker` instead of the one it registered with: its
/// profile now names that broker and trusts its CA, as a moved user's would.
async fn login_at(profile: &Profile, broker: &BrokerProcess) -> Session {
    let file = profile.path("profile.toml");
    let info = profile.info().unwrap();
    let moved = std::fs::read_to_string(&file)
        .unwrap()
        .replace(&info.broker, &broker.addr);
    std::fs::write(&file, moved).unwrap();
    std::fs::copy(&broker.ca, profile.path("ca.pem")).unwrap();
    account::connect(profile)
        .await
        .unwrap_or_else(|e| panic!("login at the new broker: {e}"))
}

async fn counts(store: &Store) -> Vec<(&'static str, i64)> {
    let mut out = Vec::new();
    for t in TABLES {
        out.push((t.name, store.count_rows(t).await.unwrap()));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_then_import_on_a_postgres_broker_keeps_counts_logins_and_inboxes() {
    let dir = tempfile::tempdir().unwrap();
    let (a_dir, b_dir) = (dir.path().join("a"), dir.path().join("b"));
    std::fs::create_dir_all(&a_dir).unwrap();
    std::fs::create_dir_all(&b_dir).unwrap();
    let a = BrokerProcess::start(&a_dir, "").await;
    let (mut alice, alice_profile) = register(&a, dir.path(), "alice").await;
    let (mut bob, bob_profile) = register(&a, dir.path(), "bob").await;
    pair(&mut alice, &mut bob).await;
    let to_alice = number(&alice);
    for (id, body) in [(1u8, "first"), (2, "second"), (3, "third")] {
        deposit(&mut bob, &to_alice, id, body.as_bytes())
            .await
            .unwrap();
    }
    drop((alice, bob));

    // Export while A serves: allowed (a consistent read per batch).
    let file = dir.path().join("moved.export");
    let a_config = a_dir.join("broker.toml");
    let out = broker_command(&[
        "export",
        "--config",
        path(&a_config),
        "--all",
        "--out",
        path(&file),
    ]);
    assert!(out.status.success(), "export: {}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("exported 2 entities"),
        "{}",
        text(&out.stdout)
    );
    let mode = std::fs::metadata(&file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the file holds login secrets");
    let content = std::fs::read_to_string(&file).unwrap();
    let header = content.lines().next().unwrap();
    assert!(
        header.contains(r#""format":"micromsg-broker-export""#)
            && header.contains(r#""version":1"#),
        "{header}"
    );
    assert!(content.contains(r#"{"end":{"entities":2,"#), "an end line");

    // Import into A's own SQLite store while A serves: refused by the lock, nothing written.
    let refused = broker_command(&["import", "--config", path(&a_config), path(&file)]);
    assert!(!refused.status.success());
    assert!(
        text(&refused.stderr).contains("locked by a running process"),
        "{}",
        text(&refused.stderr)
    );

    // B: a broker on Postgres. Import twice: the second run stores nothing new.
    let url = fresh_postgres_database().await;
    let b = BrokerProcess::start(&b_dir, &format!("[database]\nurl = \"{url}\"\n")).await;
    let b_config = b_dir.join("broker.toml");
    let out = broker_command(&["import", "--config", path(&b_config), path(&file)]);
    assert!(out.status.success(), "import: {}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("imported 2 new entities"),
        "{}",
        text(&out.stdout)
    );
    let again = broker_command(&["import", "--config", path(&b_config), path(&file)]);
    assert!(
        again.status.success(),
        "import again: {}",
        text(&again.stderr)
    );
    assert!(
        text(&again.stdout).contains("imported 0 new entities; 2 were already here")
            && text(&again.stdout).contains(" 0 rows stored"),
        "{}",
        text(&again.stdout)
    );

    // The same counts of everything that moves.
    let a_store = Store::open_sqlite(a_dir.join("data").join("micromsg.db"))
        .await
        .unwrap();
    let b_store = Store::connect_postgres(&url, 2, micromsg_store::DEFAULT_STORE_TIMEOUT)
        .await
        .unwrap();
    let (from, to) = (counts(&a_store).await, counts(&b_store).await);
    for name in [
        "entities",
        "devices",
        "contacts",
        "inbox_items",
        "inbox_acks",
    ] {
        let f = from.iter().find(|(n, _)| *n == name).unwrap().1;
        let t = to.iter().find(|(n, _)| *n == name).unwrap().1;
        assert_eq!(f, t, "{name}: {from:?} vs {to:?}");
    }
    assert_eq!(to.iter().find(|(n, _)| *n == "inbox_items").unwrap().1, 3);
    a_store.close().await;
    b_store.close().await;

    // The secrets moved: alice logs in at B and finds her inbox there; bob too.
    let mut alice = login_at(&alice_profile, &b).await;
    let inbox = fetch_whole_inbox(&mut alice).await;
    let bodies: Vec<_> = inbox
        .iter()
        .map(|m| String::from_utf8_lossy(m.body.as_bytes()).into_owned())
        .collect();
    assert_eq!(bodies, ["first", "second", "third"]);
    login_at(&bob_profile, &b).await;

    // A third store where alice's number is another entity: alice is reported and left
    // alone (exit status 3), bob is imported.
    let c_data = dir.path().join("c").join("data");
    std::fs::create_dir_all(&c_data).unwrap();
    let c_store = Store::open_sqlite(c_data.join("micromsg.db"))
        .await
        .unwrap();
    let other = micromsg_store::NewDevice {
        client_secret: [0xee; 32],
        server_secret: [0xdd; 32],
        name: None,
    };
    c_store
        .create_entity(&to_alice, &other, 1_700_000_000)
        .await
        .unwrap();
    let out = broker_command(&["import", "--data-dir", path(&c_data), path(&file)]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains(&format!(
            "NOT imported: 1 entities exist here with other data or under a number deleted here (left as they are): {}",
            to_alice.as_str()
        )),
        "{}",
        text(&out.stderr)
    );
    assert!(text(&out.stdout).contains("imported 1 new entities"));
    let kept = c_store
        .device(&to_alice, DeviceId::new(1).unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(kept.client_secret, [0xee; 32], "not overwritten");
    assert_eq!(
        c_store.inbox_depth().await.unwrap(),
        0,
        "alice's inbox stayed out"
    );
    c_store.close().await;

    drop(alice);
    drop(b);
    drop_postgres_database(&url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_refuses_a_damaged_file_and_a_newer_format_before_writing() {
    let dir = tempfile::tempdir().unwrap();
    let a = BrokerProcess::start(dir.path(), "").await;
    let (_alice, _) = register(&a, dir.path(), "alice").await;
    let config = dir.path().join("broker.toml");
    let file = dir.path().join("one.export");
    let out = broker_command(&[
        "export",
        "--config",
        path(&config),
        "--all",
        "--out",
        path(&file),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    // An entity that is not there: an error, and no file.
    let missing = dir.path().join("missing.export");
    let out = broker_command(&[
        "export",
        "--config",
        path(&config),
        "--entity",
        "123456789",
        "--out",
        path(&missing),
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("no entity 123456789 at this broker"),
        "{}",
        text(&out.stderr)
    );
    assert!(!missing.exists());
    assert_eq!(
        std::fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| e
                .as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .contains("partial"))
            .count(),
        0,
        "no partial file left behind"
    );
    drop(a);
    let lines: Vec<String> = std::fs::read_to_string(&file)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    let target = tempfile::tempdir().unwrap();
    let import = |name: &str, lines: &[String]| {
        let damaged = dir.path().join(name);
        std::fs::write(&damaged, lines.join("\n") + "\n").unwrap();
        broker_command(&[
            "import",
            "--data-dir",
            path(&target.path().join("data")),
            path(&damaged),
        ])
    };
    let mut newer = lines.clone();
    newer[0] = newer[0].replace("\"version\":1", "\"version\":9");
    let out = import("newer.export", &newer);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("line 1: format version 9 is newer"),
        "{}",
        text(&out.stderr)
    );
    let mut cut = lines.clone();
    cut.truncate(lines.len() - 1);
    let out = import("cut.export", &cut);
    assert!(
        text(&out.stderr).contains("cut short"),
        "{}",
        text(&out.stderr)
    );
    let mut garbled = lines;
    garbled[2] = garbled[2][..garbled[2].len() / 2].to_owned();
    let out = import("garbled.export", &garbled);
    assert!(
        text(&out.stderr).contains("line 3: damaged line"),
        "{}",
        text(&out.stderr)
    );
    // Nothing was written by any of them.
    let store = Store::open_sqlite(target.path().join("data").join("micromsg.db"))
        .await
        .unwrap();
    assert_eq!(store.entity_count().await.unwrap(), 0);
    store.close().await;
}

const ENTITIES: usize = 10_000;
const ITEMS: usize = 100_000;

/// Fills the SQLite store at `db` with [`ENTITIES`] entities of one device each and
/// [`ITEMS`] inbox items (ten each) through the store's batch APIs.
async fn fill_big(db: &Path) {
    let store = Store::open_sqlite(db).await.unwrap();
    let number = |i: usize| format!("77{i:08}");
    let entities: Vec<Vec<Value>> = (0..ENTITIES)
        .map(|i| {
            vec![
                Value::Text(number(i)),
                Value::Int(1_700_000_000),
                Value::Int(2),
            ]
        })
        .collect();
    let devices: Vec<Vec<Value>> = (0..ENTITIES)
        .map(|i| {
            vec![
                Value::Text(number(i)),
                Value::Int(1),
                Value::Null,
                Value::Blob(vec![(i % 251) as u8; 32]),
                Value::Blob(vec![(i % 241) as u8; 32]),
                Value::Int(1_700_000_000),
                Value::Null,
                Value::Null,
                Value::Null,
            ]
        })
        .collect();
    store
        .insert_rows(table("entities").unwrap(), &entities)
        .await
        .unwrap();
    store
        .insert_rows(table("devices").unwrap(), &devices)
        .await
        .unwrap();
    let now = micromsg_broker::clock::unix_now() as i64;
    for batch in 0..ITEMS / 2_000 {
        let items: Vec<NewInboxItem> = (0..2_000)
            .map(|k| {
                let n = batch * 2_000 + k;
                let mut id = [0u8; 16];
                id[..8].copy_from_slice(&(n as u64).to_be_bytes());
                NewInboxItem {
                    id,
                    recipient_number: Number::new(number(n % ENTITIES)).unwrap(),
                    recipient_device: None,
                    sender_number: Number::new(number((n + 1) % ENTITIES)).unwrap(),
                    sender_device: DeviceId::new(1).unwrap(),
                    created_at: now,
                    expires_at: now + 86_400,
                    body: vec![0x5a; 64],
                }
            })
            .collect();
        for outcome in store.deposit_batch(&items, 1_000).await.unwrap() {
            outcome.unwrap();
        }
    }
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_store_moves_10k_entities_and_100k_items_to_postgres_and_refuses_while_serving() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("broker.toml");
    let db: PathBuf = dir.path().join("data").join("micromsg.db");
    let mut a = BrokerProcess::start(dir.path(), "").await;
    let (mut alice, alice_profile) = register(&a, dir.path(), "alice").await;
    let (mut bob, _) = register(&a, dir.path(), "bob").await;
    pair(&mut alice, &mut bob).await;
    let to_alice = number(&alice);
    deposit(&mut bob, &to_alice, 9, b"before the move")
        .await
        .unwrap();
    drop((alice, bob));
    let filled = Instant::now();
    fill_big(&db).await;
    eprintln!("filled in {:.1} s", filled.elapsed().as_secs_f64());

    let url = fresh_postgres_database().await;
    // While A serves: refused, and nothing copied.
    let refused = broker_command(&["migrate-store", "--config", path(&config), "--to", &url]);
    assert!(!refused.status.success());
    assert!(
        text(&refused.stderr).contains("locked by a running process"),
        "{}",
        text(&refused.stderr)
    );
    let untouched = Store::connect_postgres(&url, 1, micromsg_store::DEFAULT_STORE_TIMEOUT)
        .await
        .unwrap();
    assert_eq!(untouched.entity_count().await.unwrap(), 0, "nothing copied");
    untouched.close().await;
    // A second `serve` on the same data directory is refused by the same lock.
    let second = broker_command(&["serve", "--config", path(&config)]);
    assert!(!second.status.success());
    assert!(
        text(&second.stderr).contains("locked by a running process"),
        "{}",
        text(&second.stderr)
    );
    a.kill();

    let started = Instant::now();
    let out = broker_command(&["migrate-store", "--config", path(&config), "--to", &url]);
    let took = started.elapsed();
    assert!(out.status.success(), "migrate-store: {}", text(&out.stderr));
    eprintln!(
        "migrate-store of {ENTITIES} entities and {ITEMS} items took {:.1} s\n{}{}",
        took.as_secs_f64(),
        text(&out.stderr),
        text(&out.stdout)
    );
    assert!(
        text(&out.stdout).contains("verified"),
        "{}",
        text(&out.stdout)
    );
    assert!(
        !text(&out.stderr).contains(&url),
        "the URL is never printed"
    );

    let pg = Store::connect_postgres(&url, 2, micromsg_store::DEFAULT_STORE_TIMEOUT)
        .await
        .unwrap();
    let sqlite = Store::open_sqlite(&db).await.unwrap();
    assert_eq!(counts(&pg).await, counts(&sqlite).await);
    assert_eq!(pg.entity_count().await.unwrap(), ENTITIES as i64 + 2);
    assert_eq!(pg.inbox_depth().await.unwrap(), ITEMS as i64 + 1);
    sqlite.close().await;
    pg.close().await;

    // A broker on the Postgres store, with the same data directory, serves the same entities.
    let c = BrokerProcess::start(dir.path(), &format!("[database]\nurl = \"{url}\"\n")).await;
    let mut alice = login_at(&alice_profile, &c).await;
    let inbox = fetch_whole_inbox(&mut alice).await;
    assert_eq!(inbox.len(), 1);
    assert_eq!(inbox[0].body.as_bytes(), b"before the move");
    // New deposits get seqs after the copied ones (the sequence was set).
    let (mut carol, _) = register(&c, dir.path(), "carol").await;
    pair(&mut carol, &mut alice).await;
    deposit(&mut carol, &to_alice, 10, b"after the move")
        .await
        .unwrap();
    assert_eq!(fetch_whole_inbox(&mut alice).await.len(), 2);
    drop((alice, carol, c));
    drop_postgres_database(&url).await;
}
