//! Moving data between stores: entity export and import ([`Store::export_bundles`],
//! [`Store::import_bundles`]) and the whole-store copy ([`micromsg_store::migrate`]), from a
//! real SQLite file into a real Postgres database (`DATABASE_URL`, as the conformance suite:
//! without it these tests fail, they never skip) and into another SQLite file; and the check
//! that the one table list covers the schema on both backends.

#![allow(clippy::unwrap_used)]

use std::ops::ControlFlow;

use micromsg_store::migrate::{MigrateOutcome, migrate};
use micromsg_store::portable::{Bundle, exported_tables};
use micromsg_store::tables::{Scope, TABLES, Value, table};
use micromsg_store::{DeviceId, NewDevice, NewInboxItem, Number, Store};

const NOW: i64 = 1_700_000_000;
const DAY: i64 = 86_400;

fn num(i: usize) -> Number {
    Number::new(format!("55500{i:05}")).unwrap()
}

fn dev(id: u32) -> DeviceId {
    DeviceId::new(id).unwrap()
}

/// A store in a temporary directory (kept alive by the returned guard).
async fn sqlite() -> (Store, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_sqlite(dir.path().join("broker.sqlite3"))
        .await
        .unwrap();
    (store, dir)
}

/// A fresh Postgres database and a store on it; the URL to drop it afterwards.
async fn postgres() -> (Store, String) {
    let url = micromsg_testdb::fresh_database("mm_test").await;
    let store = Store::connect_postgres(&url, 4, micromsg_store::DEFAULT_STORE_TIMEOUT)
        .await
        .unwrap();
    (store, url)
}

/// `n` entities through the store's own API: two devices each (the second with distinct
/// secrets), a contact, a block, a setting on every other one, a key backup, three inbox items
/// (two for the number, one for device 1), one of them acknowledged by device 1; and some of
/// the broker's own rows (a poisoned INITIATE).
async fn fill(store: &Store, n: usize) {
    for i in 0..n {
        let device = NewDevice {
            client_secret: [i as u8; 32],
            server_secret: [!(i as u8); 32],
            name: Some(format!("device of {i}")),
        };
        store.create_entity(&num(i), &device, NOW).await.unwrap();
    }
    let devices = table("devices").unwrap();
    let second: Vec<Vec<Value>> = (0..n)
        .map(|i| {
            vec![
                Value::Text(num(i).as_str().to_owned()),
                Value::Int(2),
                Value::Null,
                Value::Blob(vec![7; 32]),
                Value::Blob(vec![i as u8 ^ 0x55; 32]),
                Value::Int(NOW),
                Value::Int(NOW + 5),
                Value::Null,
                Value::Int(123),
            ]
        })
        .collect();
    assert_eq!(store.insert_rows(devices, &second).await.unwrap(), n as u64);
    let mut items = Vec::new();
    for i in 0..n {
        let me = num(i);
        let next = num((i + 1) % n);
        store.add_contact(&me, &next, NOW).await.unwrap();
        store.block(&me, &num(n + 7), NOW).await.unwrap();
        if i % 2 == 0 {
            store.set_auto_existing(&me, true).await.unwrap();
        }
        store
            .put_backup(&me, 0, 1, format!("backup {i}").as_bytes(), NOW)
            .await
            .unwrap();
        for (k, device) in [(0u8, None), (1, None), (2, Some(dev(1)))] {
            let mut id = [k; 16];
            id[..8].copy_from_slice(&(i as u64).to_be_bytes());
            items.push(NewInboxItem {
                id,
                recipient_number: me.clone(),
                recipient_device: device,
                sender_number: next.clone(),
                sender_device: dev(1),
                created_at: NOW,
                expires_at: NOW + DAY,
                body: format!("sealed {i}/{k}").into_bytes(),
            });
        }
    }
    for outcome in store.deposit_batch(&items, 100).await.unwrap() {
        outcome.unwrap();
    }
    for i in 0..n {
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&(i as u64).to_be_bytes());
        assert_eq!(
            store.ack_inbox(&num(i), dev(1), &[id], NOW).await.unwrap(),
            1
        );
    }
    store
        .remember_unknown_target(&num(0), &num(n + 9), NOW)
        .await
        .unwrap();
}

async fn counts(store: &Store) -> Vec<(&'static str, i64)> {
    let mut out = Vec::new();
    for t in TABLES {
        out.push((t.name, store.count_rows(t).await.unwrap()));
    }
    out
}

/// Every entity of `store`, 7 to a page, as an `--all` export reads them.
async fn export_all(store: &Store) -> Vec<Bundle> {
    let mut all = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = store.entity_numbers(after.as_deref(), 7).await.unwrap();
        let Some(last) = page.last() else { break };
        after = Some(last.clone());
        all.extend(store.export_bundles(&page).await.unwrap());
    }
    all
}

/// Export from a filled SQLite store, import into `target` in two chunks: the moved tables
/// have the same counts, the broker's own tables none of it; a second import adds nothing;
/// the moved devices keep their secrets and the inbox its items and acknowledgements.
async fn export_then_import(target: &Store) {
    let (source, _dir) = sqlite().await;
    let n = 20;
    fill(&source, n).await;
    let bundles = export_all(&source).await;
    assert_eq!(bundles.len(), n);

    let (first, second) = bundles.split_at(8);
    let mut report = target.import_bundles(first).await.unwrap();
    report.add(target.import_bundles(second).await.unwrap());
    assert_eq!(report.entities_new, n as u64);
    assert!(report.conflicts.is_empty());
    assert_eq!(report.rows_skipped, 0);

    let (src, dst) = (counts(&source).await, counts(target).await);
    for ((name, s), (_, d)) in src.iter().zip(&dst) {
        let t = table(name).unwrap();
        match t.scope {
            Scope::Entity(_) | Scope::ItemAcks | Scope::Derived => {
                assert_eq!(s, d, "{name}: the same rows at the target")
            }
            Scope::Stays => assert_eq!(*d, 0, "{name} stays at the source"),
        }
    }
    assert_eq!(
        report.rows_inserted as i64,
        exported_tables()
            .map(|t| src.iter().find(|(n, _)| *n == t.name).unwrap().1)
            .sum::<i64>()
    );

    // Run again: the same entities are recognised, every row is skipped, nothing doubles.
    let again = target.import_bundles(&bundles).await.unwrap();
    assert_eq!(again.entities_present, n as u64);
    assert_eq!(again.entities_new, 0);
    assert_eq!(again.rows_inserted, 0);
    assert_eq!(again.rows_skipped, report.rows_inserted);
    assert_eq!(counts(target).await, dst);

    // The secrets moved (a login checks these), and the inbox with its acknowledgement:
    // device 1 acknowledged its first number-mode item, device 2 did not.
    let moved = target.device(&num(3), dev(2)).await.unwrap().unwrap();
    let original = source.device(&num(3), dev(2)).await.unwrap().unwrap();
    assert_eq!(moved.client_secret, original.client_secret);
    assert_eq!(moved.server_secret, original.server_secret);
    let (for_1, _) = target
        .fetch_inbox(&num(3), dev(1), None, 10, NOW)
        .await
        .unwrap();
    let (for_2, _) = target
        .fetch_inbox(&num(3), dev(2), None, 10, NOW)
        .await
        .unwrap();
    assert_eq!(
        for_1.len(),
        2,
        "one number-mode item and its own: {for_1:?}"
    );
    assert_eq!(for_2.len(), 2, "both number-mode items: {for_2:?}");
    assert_eq!(for_2[0].body, b"sealed 3/0");
    assert!(target.auto_existing(&num(2)).await.unwrap());
    assert!(target.is_contact(&num(3), &num(4)).await.unwrap());
    assert_eq!(
        target.get_backup(&num(5)).await.unwrap().unwrap().blob,
        b"backup 5"
    );
    source.close().await;
}

/// An entity that exists at the target with other secrets is reported and left alone.
async fn conflict_is_reported(target: &Store) {
    let (source, _dir) = sqlite().await;
    fill(&source, 3).await;
    let other = NewDevice {
        client_secret: [0xee; 32],
        server_secret: [0xdd; 32],
        name: None,
    };
    target
        .create_entity(&num(1), &other, NOW + 1)
        .await
        .unwrap();
    let report = target
        .import_bundles(&export_all(&source).await)
        .await
        .unwrap();
    assert_eq!(report.conflicts, vec![num(1).as_str().to_owned()]);
    assert_eq!(report.entities_new, 2);
    let kept = target.device(&num(1), dev(1)).await.unwrap().unwrap();
    assert_eq!(kept.client_secret, [0xee; 32], "not overwritten");
    assert!(target.device(&num(1), dev(2)).await.unwrap().is_none());
    assert!(!target.is_contact(&num(1), &num(2)).await.unwrap());
    source.close().await;
}

/// A number the target retired (an entity deleted there) is not given to an imported entity:
/// reported as a conflict, nothing of it inserted.
async fn retired_number_is_not_imported(target: &Store) {
    let (source, _dir) = sqlite().await;
    fill(&source, 3).await;
    let other = NewDevice {
        client_secret: [0xee; 32],
        server_secret: [0xdd; 32],
        name: None,
    };
    target
        .create_entity(&num(2), &other, NOW + 1)
        .await
        .unwrap();
    target.delete_entity(&num(2), NOW + 2).await.unwrap();
    let report = target
        .import_bundles(&export_all(&source).await)
        .await
        .unwrap();
    assert_eq!(report.conflicts, vec![num(2).as_str().to_owned()]);
    assert_eq!(report.entities_new, 2);
    assert!(!target.entity_exists(&num(2)).await.unwrap());
    assert!(target.device(&num(2), dev(1)).await.unwrap().is_none());
    source.close().await;
}

/// A copy stopped after a few pages and run again completes without a duplicate, the counts
/// agree, and the next deposit at the target gets a seq after the copied ones.
async fn migrate_resumes(target: &Store) {
    let (source, _dir) = sqlite().await;
    fill(&source, 40).await;
    let mut pages = 0;
    let stopped = migrate(&source, target, 16, |p| {
        pages += 1;
        if p.table == "inbox_items" && p.done >= 48 {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    })
    .await
    .unwrap();
    assert!(matches!(stopped, MigrateOutcome::Stopped));
    let items = table("inbox_items").unwrap();
    assert_eq!(
        target.count_rows(items).await.unwrap(),
        48,
        "three pages copied"
    );

    let mut resumed_at = None;
    let done = migrate(&source, target, 16, |p| {
        if p.table == "inbox_items" && resumed_at.is_none() {
            resumed_at = Some(p.done);
        }
        ControlFlow::Continue(())
    })
    .await
    .unwrap();
    assert_eq!(
        resumed_at,
        Some(64),
        "continued after the 48 rows already there"
    );
    assert!(done.mismatches().is_empty(), "{done:?}");
    let MigrateOutcome::Done(table_counts) = &done else {
        panic!("not done: {done:?}")
    };
    let inbox = table_counts
        .iter()
        .find(|c| c.table == "inbox_items")
        .unwrap();
    assert_eq!((inbox.source, inbox.target, inbox.inserted), (120, 120, 72));
    assert_eq!(counts(&source).await, counts(target).await);
    assert_eq!(
        source.read_page(items, None, 1000).await.unwrap(),
        target.read_page(items, None, 1000).await.unwrap(),
        "the same rows, seqs and all"
    );
    let max = target.max_key(items).await.unwrap().unwrap();
    let fresh = NewInboxItem {
        id: [0xab; 16],
        recipient_number: num(0),
        recipient_device: None,
        sender_number: num(1),
        sender_device: dev(1),
        created_at: NOW,
        expires_at: NOW + DAY,
        body: b"after".to_vec(),
    };
    target.deposit_batch(&[fresh], 100).await.unwrap()[0]
        .as_ref()
        .unwrap();
    assert_eq!(target.max_key(items).await.unwrap(), Some(max + 1));
    source.close().await;
}

/// The other way: `source` (each backend) exported, imported into a new SQLite store, with the
/// same counts of everything that moves, acknowledgements included.
async fn export_from_either_backend(source: &Store) {
    fill(source, 9).await;
    let (target, _dir) = sqlite().await;
    let report = target
        .import_bundles(&export_all(source).await)
        .await
        .unwrap();
    assert_eq!(report.entities_new, 9);
    let (src, dst) = (counts(source).await, counts(&target).await);
    for t in exported_tables() {
        let of = |c: &[(&str, i64)]| c.iter().find(|(n, _)| *n == t.name).unwrap().1;
        assert_eq!(of(&src), of(&dst), "{}", t.name);
        assert!(of(&src) > 0, "{} has rows to move", t.name);
    }
    target.close().await;
}

async fn schema_is_covered(store: &Store) {
    let drift = store.schema_drift().await.unwrap();
    assert!(
        drift.is_empty(),
        "add these to micromsg_store::tables::TABLES: {drift:?}"
    );
}

/// Each case on a store of each backend (the import target, or for
/// `export_from_either_backend` the source).
macro_rules! on_both {
    ($($case:ident),*) => {
        mod sqlite { $(
            #[tokio::test]
            async fn $case() {
                let (store, _dir) = super::sqlite().await;
                super::$case(&store).await;
                store.close().await;
            }
        )* }
        mod postgres { $(
            #[tokio::test]
            async fn $case() {
                let (store, url) = super::postgres().await;
                super::$case(&store).await;
                store.close().await;
                micromsg_testdb::drop_database(&url).await.unwrap();
            }
        )* }
    };
}

on_both!(
    export_then_import,
    conflict_is_reported,
    retired_number_is_not_imported,
    migrate_resumes,
    export_from_either_backend,
    schema_is_covered
);

/// A port-in locks the inboxes it moves items into as a deposit batch running alone does
/// (exclusively), so it waits for a batch in flight beside others on them (a shared lock,
/// its own counter slot, which counts only what is committed) and none starts until it is
/// done: the quota's bound then always includes the moved items.
#[tokio::test]
async fn a_port_in_waits_for_deposit_batches_beside_it() {
    use sqlx::Connection as _;

    let (source, _dir) = sqlite().await;
    fill(&source, 1).await;
    let bundles = export_all(&source).await;
    let items = table("inbox_items").unwrap();
    let at = |name: &str| items.columns.iter().position(|c| c.name == name).unwrap();
    let (number, device) = (at("recipient_number"), at("recipient_device"));
    let inboxes: Vec<(String, i64)> = bundles[0]
        .rows_of("inbox_items")
        .iter()
        .map(|r| {
            let n = r[number].as_text().unwrap().to_owned();
            (n, r[device].as_int().unwrap())
        })
        .collect();
    assert!(!inboxes.is_empty());

    let (target, url) = postgres().await;
    // A deposit batch beside others, in flight on those inboxes: the broker's shared lock.
    let mut beside = sqlx::PgConnection::connect(&url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut beside).await.unwrap();
    for (n, d) in &inboxes {
        sqlx::query("SELECT pg_advisory_xact_lock_shared(19789, hashtext($1 || '/' || $2::text))")
            .bind(n)
            .bind(d)
            .execute(&mut beside)
            .await
            .unwrap();
    }
    let port_in = tokio::spawn({
        let target = target.clone();
        async move { target.import_bundles(&bundles).await }
    });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(
        !port_in.is_finished(),
        "the port-in did not wait for the batch in flight"
    );
    sqlx::query("COMMIT").execute(&mut beside).await.unwrap();
    let report = tokio::time::timeout(std::time::Duration::from_secs(10), port_in)
        .await
        .expect("the port-in goes on once the batch commits")
        .unwrap()
        .unwrap();
    assert_eq!(report.entities_new, 1);
    beside.close().await.unwrap();
    target.close().await;
    micromsg_testdb::drop_database(&url).await.unwrap();
}
