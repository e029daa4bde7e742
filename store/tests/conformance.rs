//! Store conformance suite: every case is written once as `async fn case_xxx(store: Store)`
//! and run against both backends, each run in its own fresh database:
//!
//! * `sqlite::case_xxx`: a new SQLite file in a temporary directory;
//! * `postgres::case_xxx`: a new database `mm_test_<random>` on the server named by
//!   `DATABASE_URL`, cloned from the migrated template (`micromsg-testdb`), dropped afterwards.
//!   Without `DATABASE_URL` these tests FAIL (they never skip): run `scripts/test`, which
//!   provides Postgres, or start one with `scripts/postgres start` and export the
//!   `DATABASE_URL` it prints.

#![allow(clippy::unwrap_used)]

use std::future::Future;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use micromsg_store::{
    AdmittedLogin, BatcherConfig, DepositBatcher, DepositOutcome, DeviceId, MessageId, NewDevice,
    NewInboxItem, Number, ReceivedDelivery, Store, StoreError,
};
use sqlx::Connection;
use sqlx::postgres::{PgConnectOptions, PgConnection};

const NOW: i64 = 1_700_000_000;
const DAY: i64 = 86_400;

// ---------------------------------------------------------------------------------------------
// Harness

async fn run_sqlite<F, Fut>(case: F)
where
    F: FnOnce(Store) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_sqlite(dir.path().join("broker.sqlite3"))
        .await
        .unwrap();
    assert_eq!(store.backend_name(), "sqlite");
    let outcome = tokio::spawn(case(store.clone())).await;
    store.close().await;
    drop(dir);
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
}

async fn run_postgres<F, Fut>(case: F)
where
    F: FnOnce(Store) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    run_postgres_with(|store, _| case(store)).await;
}

/// [`run_postgres`], also giving the case the fresh database's connect options, for the few
/// checks of rows the `Store` API does not show.
async fn run_postgres_with<F, Fut>(case: F)
where
    F: FnOnce(Store, PgConnectOptions) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    // A database of its own, cloned from the migrated template (micromsg-testdb), so a
    // case costs one CREATE DATABASE … TEMPLATE and not a migration.
    let url = micromsg_testdb::fresh_database("mm_test").await;
    let options = PgConnectOptions::from_str(&url)
        .unwrap_or_else(|e| panic!("micromsg-testdb gave an invalid URL: {e}"));
    let store =
        Store::connect_postgres_with(options.clone(), 16, micromsg_store::DEFAULT_STORE_TIMEOUT)
            .await
            .unwrap();
    assert_eq!(store.backend_name(), "postgres");
    let outcome = tokio::spawn(case(store.clone(), options)).await;
    store.close().await;
    micromsg_testdb::drop_database(&url).await.unwrap();
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
}

/// A number, for brevity (the store takes validated numbers).
fn num(digits: &str) -> Number {
    Number::new(digits).unwrap()
}

/// A device id, for brevity.
fn dev(id: u32) -> DeviceId {
    DeviceId::new(id).unwrap()
}

/// Device ids, for brevity.
fn devs(ids: &[u32]) -> Vec<DeviceId> {
    ids.iter().copied().map(dev).collect()
}

/// One deposit through the production path, a batch of one ([`Store::deposit_batch`]).
async fn deposit_one(
    store: &Store,
    item: &NewInboxItem,
    quota_per_device: u32,
) -> Result<DepositOutcome, StoreError> {
    let mut outcomes = store
        .deposit_batch(std::slice::from_ref(item), quota_per_device)
        .await?;
    assert_eq!(outcomes.len(), 1, "one outcome per deposit");
    outcomes.pop().unwrap()
}

/// The route of one DEPOSIT, through the batched query ([`Store::deposit_routes`]).
async fn route_of(store: &Store, sender: &Number, target: &Number) -> micromsg_store::DepositRoute {
    let mut routes = store
        .deposit_routes(&[(sender.clone(), target.clone())])
        .await
        .unwrap();
    assert_eq!(routes.len(), 1, "one route per pair");
    routes.pop().unwrap()
}

/// One outbox entry, through the batched insert ([`Store::enqueue_outbox_batch`]); `true` when
/// it was new.
async fn enqueue_one(store: &Store, key: &[u8; 16], peer: &str, payload: &[u8], now: i64) -> bool {
    let mut results = store
        .enqueue_outbox_batch(&[micromsg_store::OutboxEntry {
            idempotency_key: *key,
            peer_broker: peer.to_owned(),
            payload: payload.to_vec(),
            now,
            contact: None,
        }])
        .await
        .unwrap();
    assert_eq!(results.len(), 1, "one result per entry");
    results.pop().unwrap().unwrap()
}

macro_rules! conformance {
    ($($case:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    crate::run_sqlite(crate::$case).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    crate::run_postgres(crate::$case).await;
                }
            )*
        }
    };
}

conformance!(
    case_create_entity,
    case_device_for_login,
    case_duplicate_number,
    case_registration_secret_single_use,
    case_registration_secret_expired,
    case_concurrent_redeem,
    case_device_cap,
    case_revoke_and_ids_not_reused,
    case_blocks,
    case_poisoned_initiates,
    case_contacts_and_policy,
    case_deposit_idempotent,
    case_quota_exceeded_keeps_stored,
    case_fetch_order_and_paging,
    case_fetch_skips_expired,
    case_ack_entity_mode,
    case_ack_number_mode,
    case_revoke_releases_number_mode_items,
    case_sweep,
    case_sweep_batches,
    case_backup_versions,
    case_concurrent_batch_deposit,
    case_batcher_group_commit,
    case_federation_tables,
    case_received_deliveries_once,
    case_received_deliveries_once_through_the_batcher,
    case_deposit_route,
    case_deposit_routed,
    case_outbox_contact_checked,
    case_delivery_routes_and_completing_many,
    case_outbox_group_commit,
    case_quota_counter_bound,
    case_quota_with_batches_side_by_side,
    case_port_out_spends_the_token_once,
    case_port_out_moves_waiting_items_and_hands_over_contacts,
    case_port_in_and_announcements,
    case_ported_entries_by_seq,
    case_delete_entity,
    case_forwards,
);

/// Postgres only (migration 0005): number-mode acknowledgements leave with their item, through
/// the statement-level trigger that replaced the foreign key's cascade, on every path that
/// deletes items: the last acknowledgement, a revocation that completes one, the sweep.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_acks_leave_with_their_items() {
    run_postgres_with(|store, db| async move {
        let mut db = PgConnection::connect_with(&db).await.unwrap();
        entity(&store, &num("5550001")).await;
        add_devices(&store, &num("5550001"), 3).await;
        let mut items = vec![
            item(1, &num("5550001"), None, &num("5550002")),
            item(2, &num("5550001"), None, &num("5550002")),
            item(3, &num("5550001"), None, &num("5550002")),
            item(4, &num("5550001"), Some(1), &num("5550002")),
        ];
        items[2].expires_at = NOW + 10;
        store.deposit_batch(&items, 100).await.unwrap();
        for (dev, ids) in [(1, vec![id(1), id(2), id(3), id(4)]), (2, vec![id(1)])] {
            store
                .ack_inbox(&num("5550001"), crate::dev(dev), &ids, NOW)
                .await
                .unwrap();
        }
        let mut acks = async || -> i64 {
            sqlx::query_scalar("SELECT COUNT(*) FROM inbox_acks")
                .fetch_one(&mut db)
                .await
                .unwrap()
        };
        assert_eq!(
            acks().await,
            4,
            "items 1 (devices 1, 2), 2 and 3 (device 1)"
        );
        assert_eq!(
            store.inbox_depth().await.unwrap(),
            3,
            "device 1's own item 4 went"
        );

        // Revoking device 3 completes item 1: it goes, and its two acknowledgements with it.
        assert!(
            store
                .revoke_device(&num("5550001"), dev(3), NOW)
                .await
                .unwrap()
        );
        assert_eq!(acks().await, 2);
        // Device 2's acknowledgement completes item 2.
        store
            .ack_inbox(&num("5550001"), dev(2), &[id(2)], NOW)
            .await
            .unwrap();
        assert_eq!(acks().await, 1);
        // Item 3 expires with device 1's acknowledgement on it.
        assert_eq!(store.sweep(NOW + 10).await.unwrap().inbox_items, 1);
        assert_eq!(acks().await, 0);
        assert_eq!(store.inbox_depth().await.unwrap(), 0);
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Helpers

fn device(seed: u8, name: Option<&str>) -> NewDevice {
    NewDevice {
        client_secret: [seed; 32],
        server_secret: [seed.wrapping_add(1); 32],
        name: name.map(str::to_owned),
    }
}

fn hash(seed: u8) -> [u8; 32] {
    [seed; 32]
}

fn id(n: u32) -> MessageId {
    let mut id = [0x5a; 16];
    id[..4].copy_from_slice(&n.to_be_bytes());
    id
}

fn item(n: u32, to: &Number, to_device: Option<u32>, from: &Number) -> NewInboxItem {
    NewInboxItem {
        id: id(n),
        recipient_number: to.clone(),
        recipient_device: to_device.map(dev),
        sender_number: from.clone(),
        sender_device: DeviceId::FIRST,
        created_at: NOW,
        expires_at: NOW + 7 * DAY,
        body: format!("body {n}").into_bytes(),
    }
}

async fn entity(store: &Store, number: &Number) {
    store
        .create_entity(number, &device(1, Some("first")), NOW)
        .await
        .unwrap();
}

/// Adds devices to `number` until it has `n` active ones (via registration secrets).
async fn add_devices(store: &Store, number: &Number, n: u32) -> Vec<DeviceId> {
    static NEXT: AtomicU32 = AtomicU32::new(1);
    let mut ids = Vec::new();
    while store.active_device_count(number).await.unwrap() < i64::from(n) {
        let k = NEXT.fetch_add(1, Ordering::Relaxed);
        let mut h = [0xee; 32];
        h[..4].copy_from_slice(&k.to_be_bytes());
        store
            .create_registration_secret(number, &h, None, NOW, NOW + 600, 100)
            .await
            .unwrap();
        ids.push(
            store
                .redeem_registration_secret(number, &h, &device(k as u8, None), NOW, 100)
                .await
                .unwrap(),
        );
    }
    ids
}

async fn fetch_all(store: &Store, number: &Number, device: u32, now: i64) -> Vec<MessageId> {
    let (items, more) = store
        .fetch_inbox(number, dev(device), None, 1000, now)
        .await
        .unwrap();
    assert!(!more);
    items.into_iter().map(|i| i.id).collect()
}

// ---------------------------------------------------------------------------------------------
// Entities and devices

/// A LOGIN's reads: the device goes to the check; the pending count (unexpired items for the
/// device, and number-mode items it has not acknowledged) is read only when the check admits.
/// On SQLite, both on the pool and on a login reader (`Store::start_login_readers`), which
/// must see what the pool committed just before.
async fn case_device_for_login(store: Store) {
    let (a, b) = (num("5550001"), num("5550002"));
    entity(&store, &a).await;
    entity(&store, &b).await;
    let mut with_readers = store.clone();
    with_readers
        .start_login_readers(2, micromsg_store::DEFAULT_STORE_TIMEOUT)
        .await
        .unwrap();
    deposit_one(&store, &item(1, &a, Some(1), &b), 100)
        .await
        .unwrap();
    deposit_one(&store, &item(2, &a, None, &b), 100)
        .await
        .unwrap();
    let mut expired = item(3, &a, Some(1), &b);
    expired.expires_at = NOW + 10;
    deposit_one(&store, &expired, 100).await.unwrap();
    // For another device of the same number, not counted.
    deposit_one(&store, &item(4, &a, Some(2), &b), 100)
        .await
        .unwrap();
    for store in [&store, &with_readers] {
        logins_read_what_they_may(store, &a).await;
    }
    // A device revoked through the pool is revoked for the readers at once.
    assert!(store.revoke_device(&a, dev(1), NOW + 30).await.unwrap());
    for store in [&store, &with_readers] {
        let seen = store
            .device_for_login(&a, dev(1), NOW + 30, |r| r.map(|r| r.is_revoked()))
            .await
            .unwrap();
        let Some(AdmittedLogin { verdict, .. }) = seen else {
            panic!("the check admitted the device");
        };
        assert!(verdict, "the revocation is seen");
    }
}

async fn logins_read_what_they_may(store: &Store, a: &Number) {
    let admitted = store
        .device_for_login(a, dev(1), NOW + 20, |r| r.map(|r| r.device_id))
        .await
        .unwrap();
    let Some(AdmittedLogin {
        record,
        verdict,
        pending,
    }) = admitted
    else {
        panic!("the check admitted the device");
    };
    assert_eq!(verdict, dev(1), "the check sees the device");
    assert_eq!(record.client_secret, device(1, Some("first")).client_secret);
    assert_eq!(
        pending.unwrap(),
        2,
        "one for the device and one number-mode item"
    );

    // Refused: nothing more is read.
    let refused = store
        .device_for_login(a, dev(1), NOW + 20, |_| None::<()>)
        .await
        .unwrap();
    assert!(refused.is_none());

    // An unknown device: the check runs and sees none; even a check that would admit it
    // cannot, without a device.
    let called = Arc::new(AtomicBool::new(false));
    let saw = Arc::clone(&called);
    let unknown = store
        .device_for_login(a, dev(9), NOW, move |r| {
            saw.store(r.is_none(), Ordering::SeqCst);
            Some(())
        })
        .await
        .unwrap();
    assert!(
        called.load(Ordering::SeqCst),
        "the check runs for an unknown device too"
    );
    assert!(unknown.is_none());
}

async fn case_create_entity(store: Store) {
    assert!(!store.entity_exists(&num("5550001")).await.unwrap());
    let d = NewDevice {
        client_secret: [0xab; 32],
        server_secret: [0xcd; 32],
        name: Some("laptop".into()),
    };
    assert_eq!(
        store.create_entity(&num("5550001"), &d, NOW).await.unwrap(),
        dev(1)
    );
    assert!(store.entity_exists(&num("5550001")).await.unwrap());
    assert_eq!(store.entity_count().await.unwrap(), 1);
    assert_eq!(store.device_count().await.unwrap(), 1);
    assert_eq!(store.active_device_count(&num("5550001")).await.unwrap(), 1);

    let rec = store
        .device(&num("5550001"), dev(1))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(rec.number, num("5550001"));
    assert_eq!(rec.device_id, dev(1));
    assert_eq!(rec.name.as_deref(), Some("laptop"));
    assert_eq!(rec.client_secret, [0xab; 32]);
    assert_eq!(rec.server_secret, [0xcd; 32]);
    assert_eq!(rec.created_at, NOW);
    assert_eq!(rec.last_seen, None);
    assert!(!rec.is_revoked());
    assert!(
        store
            .device(&num("5550001"), dev(2))
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        store
            .device(&num("5550002"), dev(1))
            .await
            .unwrap()
            .is_none()
    );

    // Secrets never show in Debug output.
    for shown in [format!("{rec:?}"), format!("{d:?}")] {
        assert!(shown.contains("redacted"), "{shown}");
        assert!(!shown.contains("171") && !shown.contains("205"), "{shown}");
        assert!(!shown.to_lowercase().contains("abab"), "{shown}");
    }
    let shown = format!("{store:?}");
    assert!(!shown.contains("postgres://"), "{shown}");

    assert!(
        store
            .touch_device(&num("5550001"), dev(1), NOW + 5)
            .await
            .unwrap()
    );
    assert!(
        !store
            .touch_device(&num("5550001"), dev(9), NOW + 5)
            .await
            .unwrap()
    );
    let list = store.list_devices(&num("5550001")).await.unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].device_id, dev(1));
    assert_eq!(list[0].last_seen, Some(NOW + 5));
    assert_eq!(list[0].created_at, NOW);
    assert!(
        store
            .list_devices(&num("5550009"))
            .await
            .unwrap()
            .is_empty()
    );
    store.ping().await.unwrap();
}

async fn case_duplicate_number(store: Store) {
    store
        .create_entity(&num("5550001"), &device(1, None), NOW)
        .await
        .unwrap();
    let err = store
        .create_entity(&num("5550001"), &device(9, None), NOW + 1)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NumberTaken), "{err:?}");
    // The first registration is untouched.
    let rec = store
        .device(&num("5550001"), dev(1))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(rec.client_secret, [1; 32]);
    assert_eq!(rec.created_at, NOW);
    assert_eq!(store.entity_count().await.unwrap(), 1);
    assert_eq!(store.device_count().await.unwrap(), 1);
    // Another number is fine.
    assert_eq!(
        store
            .create_entity(&num("5550002"), &device(2, None), NOW)
            .await
            .unwrap(),
        dev(1)
    );
}

async fn case_registration_secret_single_use(store: Store) {
    entity(&store, &num("5550001")).await;
    entity(&store, &num("5550002")).await;
    store
        .create_registration_secret(&num("5550001"), &hash(7), Some("phone"), NOW, NOW + 600, 5)
        .await
        .unwrap();
    // Unknown entity.
    let err = store
        .create_registration_secret(&num("5559999"), &hash(8), None, NOW, NOW + 600, 5)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NotFound), "{err:?}");

    // Wrong number, wrong secret: BadSecret, and the secret stays usable.
    for (number, h) in [
        (&num("5550002"), hash(7)),
        (&num("5550001"), hash(6)),
        (&num("5559999"), hash(7)),
    ] {
        let err = store
            .redeem_registration_secret(number, &h, &device(2, None), NOW + 1, 5)
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::BadSecret), "{err:?}");
    }
    let id = store
        .redeem_registration_secret(&num("5550001"), &hash(7), &device(2, None), NOW + 1, 5)
        .await
        .unwrap();
    assert_eq!(id, dev(2));
    let rec = store
        .device(&num("5550001"), dev(2))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        rec.name.as_deref(),
        Some("phone"),
        "name comes from the secret"
    );
    assert_eq!(rec.client_secret, [2; 32]);
    assert_eq!(rec.server_secret, [3; 32]);
    assert_eq!(rec.created_at, NOW + 1);

    // Used: BadSecret, no new device.
    let err = store
        .redeem_registration_secret(&num("5550001"), &hash(7), &device(3, None), NOW + 2, 5)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::BadSecret), "{err:?}");
    assert_eq!(store.active_device_count(&num("5550001")).await.unwrap(), 2);

    // A name given at redeem wins over the secret's.
    store
        .create_registration_secret(&num("5550001"), &hash(9), Some("old"), NOW, NOW + 600, 5)
        .await
        .unwrap();
    let id = store
        .redeem_registration_secret(
            &num("5550001"),
            &hash(9),
            &device(4, Some("new")),
            NOW + 3,
            5,
        )
        .await
        .unwrap();
    assert_eq!(id, dev(3));
    let rec = store
        .device(&num("5550001"), dev(3))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(rec.name.as_deref(), Some("new"));
}

async fn case_registration_secret_expired(store: Store) {
    entity(&store, &num("5550001")).await;
    store
        .create_registration_secret(&num("5550001"), &hash(7), None, NOW, NOW + 600, 5)
        .await
        .unwrap();
    for at in [NOW + 600, NOW + 601, NOW + DAY] {
        let err = store
            .redeem_registration_secret(&num("5550001"), &hash(7), &device(2, None), at, 5)
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::BadSecret), "{err:?}");
    }
    assert_eq!(store.active_device_count(&num("5550001")).await.unwrap(), 1);
    // Just before expiry it works.
    store
        .create_registration_secret(&num("5550001"), &hash(8), None, NOW, NOW + 600, 5)
        .await
        .unwrap();
    assert_eq!(
        store
            .redeem_registration_secret(&num("5550001"), &hash(8), &device(2, None), NOW + 599, 5)
            .await
            .unwrap(),
        dev(2)
    );
}

async fn case_concurrent_redeem(store: Store) {
    entity(&store, &num("5550001")).await;
    store
        .create_registration_secret(&num("5550001"), &hash(7), None, NOW, NOW + 600, 10)
        .await
        .unwrap();
    let tasks: Vec<_> = (0..8u8)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .redeem_registration_secret(
                        &num("5550001"),
                        &hash(7),
                        &device(10 + i, None),
                        NOW,
                        10,
                    )
                    .await
            })
        })
        .collect();
    let mut won = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(id) => {
                assert_eq!(id, dev(2));
                won += 1;
            }
            Err(StoreError::BadSecret) => {}
            Err(e) => panic!("unexpected error: {e:?}"),
        }
    }
    assert_eq!(won, 1, "exactly one concurrent redeem wins");
    assert_eq!(store.active_device_count(&num("5550001")).await.unwrap(), 2);

    // Concurrent redeems of DIFFERENT secrets get distinct ids.
    for s in 20..26u8 {
        store
            .create_registration_secret(&num("5550001"), &hash(s), None, NOW, NOW + 600, 10)
            .await
            .unwrap();
    }
    let tasks: Vec<_> = (20..26u8)
        .map(|s| {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .redeem_registration_secret(
                        &num("5550001"),
                        &hash(s),
                        &device(s, None),
                        NOW,
                        10,
                    )
                    .await
            })
        })
        .collect();
    let mut ids = Vec::new();
    for t in tasks {
        ids.push(t.await.unwrap().unwrap());
    }
    ids.sort_unstable();
    assert_eq!(ids, devs(&[3, 4, 5, 6, 7, 8]));
}

async fn case_device_cap(store: Store) {
    entity(&store, &num("5550001")).await;
    let max = 3;
    // 1 device + 2 pending secrets = 3: the third secret is refused.
    for s in [1, 2] {
        store
            .create_registration_secret(&num("5550001"), &hash(s), None, NOW, NOW + 600, max)
            .await
            .unwrap();
    }
    let err = store
        .create_registration_secret(&num("5550001"), &hash(3), None, NOW, NOW + 600, max)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::DeviceLimit), "{err:?}");

    // Redeeming turns a pending secret into a device: still 3.
    store
        .redeem_registration_secret(&num("5550001"), &hash(1), &device(1, None), NOW, max)
        .await
        .unwrap();
    let err = store
        .create_registration_secret(&num("5550001"), &hash(3), None, NOW, NOW + 600, max)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::DeviceLimit), "{err:?}");

    // An expired unused secret no longer counts.
    store
        .create_registration_secret(&num("5550001"), &hash(3), None, NOW + 700, NOW + 1300, max)
        .await
        .unwrap();

    // The redeem-time check: with 2 active devices and max 2, redeeming fails and the secret
    // stays usable.
    let err = store
        .redeem_registration_secret(&num("5550001"), &hash(3), &device(3, None), NOW + 701, 2)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::DeviceLimit), "{err:?}");
    assert_eq!(store.active_device_count(&num("5550001")).await.unwrap(), 2);
    // Revoking a device makes room.
    assert!(
        store
            .revoke_device(&num("5550001"), dev(2), NOW + 702)
            .await
            .unwrap()
    );
    let id = store
        .redeem_registration_secret(&num("5550001"), &hash(3), &device(3, None), NOW + 703, 2)
        .await
        .unwrap();
    assert_eq!(id, dev(3), "ids are never reused");
    assert_eq!(store.active_device_count(&num("5550001")).await.unwrap(), 2);
}

async fn case_revoke_and_ids_not_reused(store: Store) {
    entity(&store, &num("5550001")).await;
    assert_eq!(add_devices(&store, &num("5550001"), 3).await, devs(&[2, 3]));
    assert!(
        store
            .revoke_device(&num("5550001"), dev(3), NOW + 10)
            .await
            .unwrap()
    );
    assert!(
        !store
            .revoke_device(&num("5550001"), dev(3), NOW + 11)
            .await
            .unwrap(),
        "already revoked"
    );
    assert!(
        !store
            .revoke_device(&num("5550001"), dev(9), NOW + 11)
            .await
            .unwrap(),
        "unknown"
    );
    assert!(
        !store
            .revoke_device(&num("5559999"), dev(1), NOW + 11)
            .await
            .unwrap(),
        "unknown entity"
    );
    let rec = store
        .device(&num("5550001"), dev(3))
        .await
        .unwrap()
        .unwrap();
    assert!(rec.is_revoked());
    assert_eq!(rec.revoked_at, Some(NOW + 10));
    assert!(
        !store
            .touch_device(&num("5550001"), dev(3), NOW + 12)
            .await
            .unwrap()
    );
    assert_eq!(store.active_device_count(&num("5550001")).await.unwrap(), 2);
    assert_eq!(store.device_count().await.unwrap(), 2);

    // The next device gets 4, not 3.
    assert_eq!(add_devices(&store, &num("5550001"), 3).await, devs(&[4]));
    // Even after revoking the highest id.
    assert!(
        store
            .revoke_device(&num("5550001"), dev(4), NOW + 20)
            .await
            .unwrap()
    );
    assert_eq!(add_devices(&store, &num("5550001"), 3).await, devs(&[5]));

    let list = store.list_devices(&num("5550001")).await.unwrap();
    let ids: Vec<_> = list
        .iter()
        .map(|d| (d.device_id, d.revoked_at.is_some()))
        .collect();
    assert_eq!(
        ids,
        vec![
            (dev(1), false),
            (dev(2), false),
            (dev(3), true),
            (dev(4), true),
            (dev(5), false)
        ]
    );
}

// ---------------------------------------------------------------------------------------------
// Blocks, poisoned initiates, contacts

async fn case_blocks(store: Store) {
    entity(&store, &num("5550001")).await;
    assert!(
        !store
            .is_blocked(&num("5550001"), &num("5550002"))
            .await
            .unwrap()
    );
    store
        .block(&num("5550001"), &num("5550003"), NOW)
        .await
        .unwrap();
    store
        .block(&num("5550001"), &num("5550002"), NOW)
        .await
        .unwrap();
    store
        .block(&num("5550001"), &num("5550002"), NOW + 1)
        .await
        .unwrap(); // idempotent
    assert!(
        store
            .is_blocked(&num("5550001"), &num("5550002"))
            .await
            .unwrap()
    );
    assert!(
        !store
            .is_blocked(&num("5550002"), &num("5550001"))
            .await
            .unwrap(),
        "directional"
    );
    assert_eq!(
        store.blocked_by(&num("5550001")).await.unwrap(),
        vec![num("5550002"), num("5550003")]
    );
    assert!(
        store
            .unblock(&num("5550001"), &num("5550002"))
            .await
            .unwrap()
    );
    assert!(
        !store
            .unblock(&num("5550001"), &num("5550002"))
            .await
            .unwrap()
    );
    assert!(
        !store
            .is_blocked(&num("5550001"), &num("5550002"))
            .await
            .unwrap()
    );
    assert_eq!(
        store.blocked_by(&num("5550001")).await.unwrap(),
        vec![num("5550003")]
    );
    assert!(store.blocked_by(&num("5550002")).await.unwrap().is_empty());
    // A block by a number that is not an entity here.
    let err = store
        .block(&num("5559999"), &num("5550001"), NOW)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NotFound), "{err:?}");
}

async fn case_poisoned_initiates(store: Store) {
    entity(&store, &num("5550001")).await;
    assert!(
        !store
            .is_poisoned(&num("5550001"), &num("5550777"))
            .await
            .unwrap()
    );
    store
        .remember_unknown_target(&num("5550001"), &num("5550777"), NOW)
        .await
        .unwrap();
    store
        .remember_unknown_target(&num("5550001"), &num("5550777"), NOW + 1)
        .await
        .unwrap();
    // Later the number is given out: the caller stays poisoned for it, nobody else is.
    entity(&store, &num("5550777")).await;
    assert!(
        store
            .is_poisoned(&num("5550001"), &num("5550777"))
            .await
            .unwrap()
    );
    assert!(
        !store
            .is_poisoned(&num("5550777"), &num("5550001"))
            .await
            .unwrap()
    );
    assert!(
        !store
            .is_poisoned(&num("5550002"), &num("5550777"))
            .await
            .unwrap()
    );
}

async fn case_contacts_and_policy(store: Store) {
    entity(&store, &num("5550001")).await;
    assert!(
        !store
            .is_contact(&num("5550001"), &num("5550002"))
            .await
            .unwrap()
    );
    assert!(
        store
            .add_contact(&num("5550001"), &num("5550002"), NOW)
            .await
            .unwrap()
    );
    assert!(
        !store
            .add_contact(&num("5550001"), &num("5550002"), NOW + 1)
            .await
            .unwrap()
    );
    assert!(
        store
            .is_contact(&num("5550001"), &num("5550002"))
            .await
            .unwrap()
    );
    assert!(
        !store
            .is_contact(&num("5550002"), &num("5550001"))
            .await
            .unwrap()
    );
    let c = store
        .contact(&num("5550001"), &num("5550002"))
        .await
        .unwrap()
        .unwrap();
    assert!(!c.auto_existing && !c.brokered);
    assert_eq!(c.created_at, NOW);
    store
        .set_contact_flags(&num("5550001"), &num("5550002"), true, false)
        .await
        .unwrap();
    let c = store
        .contact(&num("5550001"), &num("5550002"))
        .await
        .unwrap()
        .unwrap();
    assert!(c.auto_existing && !c.brokered);
    store
        .set_contact_flags(&num("5550001"), &num("5550002"), false, true)
        .await
        .unwrap();
    let c = store
        .contact(&num("5550001"), &num("5550002"))
        .await
        .unwrap()
        .unwrap();
    assert!(!c.auto_existing && c.brokered);
    // add_contact again keeps the flags.
    store
        .add_contact(&num("5550001"), &num("5550002"), NOW + 2)
        .await
        .unwrap();
    assert!(
        store
            .contact(&num("5550001"), &num("5550002"))
            .await
            .unwrap()
            .unwrap()
            .brokered
    );
    let err = store
        .set_contact_flags(&num("5550001"), &num("5550003"), true, true)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NotFound), "{err:?}");
    assert!(
        store
            .contact(&num("5550001"), &num("5550003"))
            .await
            .unwrap()
            .is_none()
    );

    assert!(!store.auto_existing(&num("5550001")).await.unwrap());
    store
        .set_auto_existing(&num("5550001"), true)
        .await
        .unwrap();
    assert!(store.auto_existing(&num("5550001")).await.unwrap());
    store
        .set_auto_existing(&num("5550001"), false)
        .await
        .unwrap();
    assert!(!store.auto_existing(&num("5550001")).await.unwrap());
    let err = store
        .set_auto_existing(&num("5559999"), true)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NotFound), "{err:?}");
}

// ---------------------------------------------------------------------------------------------
// Inboxes

async fn case_deposit_idempotent(store: Store) {
    entity(&store, &num("5550001")).await;
    add_devices(&store, &num("5550001"), 2).await;
    let a = item(1, &num("5550001"), Some(1), &num("5550002"));
    assert_eq!(
        deposit_one(&store, &a, 100).await.unwrap(),
        DepositOutcome::Stored
    );
    // A repeat changes nothing and keeps the stored expiry, though the retry came later.
    let mut retry = a.clone();
    retry.expires_at += 100;
    retry.created_at += 100;
    assert_eq!(
        deposit_one(&store, &retry, 100).await.unwrap(),
        DepositOutcome::AlreadyStored {
            expires_at: a.expires_at
        }
    );
    // A different body under the same id and sender is another message: refused (6.20),
    // whether it is longer, shorter or the same length.
    for body in [&b"other"[..], &b""[..], &vec![0xAA; a.body.len()][..]] {
        let mut a2 = a.clone();
        a2.body = body.to_vec();
        assert!(matches!(
            deposit_one(&store, &a2, 100).await,
            Err(StoreError::DuplicateId)
        ));
    }
    // Same id, another sender (or sender device): refused.
    let mut other = a.clone();
    other.sender_number = num("5550003");
    assert!(matches!(
        deposit_one(&store, &other, 100).await,
        Err(StoreError::DuplicateId)
    ));
    let mut other_dev = a.clone();
    other_dev.sender_device = dev(2);
    assert!(matches!(
        deposit_one(&store, &other_dev, 100).await,
        Err(StoreError::DuplicateId)
    ));
    // Same id to the other device (entity-mode fan-out) and to the number inbox: new rows.
    let to2 = item(1, &num("5550001"), Some(2), &num("5550002"));
    let to_number = item(1, &num("5550001"), None, &num("5550002"));
    assert_eq!(
        deposit_one(&store, &to2, 100).await.unwrap(),
        DepositOutcome::Stored
    );
    assert_eq!(
        deposit_one(&store, &to_number, 100).await.unwrap(),
        DepositOutcome::Stored
    );
    assert_eq!(store.inbox_depth().await.unwrap(), 3);

    // Duplicates inside one batch, and an item that fails alone (an id already stored from
    // another sender; device ids below 1 cannot even be expressed since the store takes
    // `DeviceId`).
    let b = item(2, &num("5550001"), Some(1), &num("5550002"));
    let mut b_other = b.clone();
    b_other.sender_number = num("5550004");
    let mut bad = a.clone();
    bad.sender_number = num("5550009");
    let c = item(4, &num("5550001"), Some(1), &num("5550002"));
    let mut b_body = b.clone();
    b_body.body = b"another body".to_vec();
    let out = store
        .deposit_batch(
            &[b.clone(), b.clone(), b_other, bad, a.clone(), c, b_body],
            100,
        )
        .await
        .unwrap();
    assert_eq!(out.len(), 7);
    assert!(matches!(out[0], Ok(DepositOutcome::Stored)));
    assert_eq!(
        out[1].as_ref().ok(),
        Some(&DepositOutcome::AlreadyStored {
            expires_at: b.expires_at
        })
    );
    assert!(matches!(out[2], Err(StoreError::DuplicateId)));
    assert!(matches!(out[3], Err(StoreError::DuplicateId)));
    assert!(matches!(out[4], Ok(DepositOutcome::AlreadyStored { .. })));
    assert!(matches!(out[5], Ok(DepositOutcome::Stored)));
    assert!(matches!(out[6], Err(StoreError::DuplicateId)));
    assert_eq!(store.inbox_depth().await.unwrap(), 5);
    assert!(store.deposit_batch(&[], 100).await.unwrap().is_empty());

    // A discarded deposit (blocked sender) commits and stores nothing, alone or beside kept
    // ones, and its inbox's quota counter still holds.
    let blocked = item(9, &num("5550001"), Some(1), &num("5550002"));
    let alone = store
        .deposit_batch_discarding(&[], std::slice::from_ref(&blocked), 100)
        .await
        .unwrap();
    assert!(alone.is_empty());
    let kept = item(10, &num("5550001"), Some(2), &num("5550002"));
    let beside = store
        .deposit_batch_discarding(std::slice::from_ref(&kept), &[blocked], 100)
        .await
        .unwrap();
    assert!(matches!(beside[..], [Ok(DepositOutcome::Stored)]));
    assert_eq!(store.inbox_depth().await.unwrap(), 6);

    // The stored copy is the first one.
    let (items, _) = store
        .fetch_inbox(&num("5550001"), dev(1), None, 10, NOW)
        .await
        .unwrap();
    let first = items
        .iter()
        .find(|i| i.id == id(1) && i.recipient_device == Some(dev(1)))
        .unwrap();
    assert_eq!(first.body, b"body 1");
    assert_eq!(first.sender_number, num("5550002"));
    assert_eq!(first.sender_device, dev(1));
}

async fn case_quota_exceeded_keeps_stored(store: Store) {
    entity(&store, &num("5550001")).await;
    add_devices(&store, &num("5550001"), 2).await;
    let batch: Vec<_> = (1..=5)
        .map(|n| item(n, &num("5550001"), Some(1), &num("5550002")))
        .collect();
    let out = store.deposit_batch(&batch, 3).await.unwrap();
    let kinds: Vec<_> = out
        .iter()
        .map(|r| match r {
            Ok(DepositOutcome::Stored) => "stored",
            Err(StoreError::QuotaExceeded) => "quota",
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(kinds, ["stored", "stored", "stored", "quota", "quota"]);

    // A full inbox refuses new items, accepts re-deposits of stored ones, and other inboxes
    // in the same batch are unaffected.
    let out = store
        .deposit_batch(
            &[
                item(6, &num("5550001"), Some(1), &num("5550002")),
                item(2, &num("5550001"), Some(1), &num("5550002")),
                item(6, &num("5550001"), Some(2), &num("5550002")),
                item(7, &num("5550001"), None, &num("5550002")),
            ],
            3,
        )
        .await
        .unwrap();
    assert!(matches!(out[0], Err(StoreError::QuotaExceeded)));
    assert!(matches!(out[1], Ok(DepositOutcome::AlreadyStored { .. })));
    assert!(matches!(out[2], Ok(DepositOutcome::Stored)));
    assert!(matches!(out[3], Ok(DepositOutcome::Stored)));
    assert!(matches!(
        deposit_one(
            &store,
            &item(8, &num("5550001"), Some(1), &num("5550002")),
            3
        )
        .await,
        Err(StoreError::QuotaExceeded)
    ));

    // What was stored is intact.
    let (items, more) = store
        .fetch_inbox(&num("5550001"), dev(1), None, 100, NOW)
        .await
        .unwrap();
    assert!(!more);
    let got: Vec<_> = items.iter().map(|i| (i.id, i.body.clone())).collect();
    assert_eq!(
        got,
        vec![
            (id(1), b"body 1".to_vec()),
            (id(2), b"body 2".to_vec()),
            (id(3), b"body 3".to_vec()),
            (id(7), b"body 7".to_vec()),
        ]
    );

    // Acknowledging frees room.
    assert_eq!(
        store
            .ack_inbox(&num("5550001"), dev(1), &[id(1)], NOW)
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        deposit_one(
            &store,
            &item(8, &num("5550001"), Some(1), &num("5550002")),
            3
        )
        .await
        .unwrap(),
        DepositOutcome::Stored
    );
    assert_eq!(
        store
            .inbox_count(&num("5550001"), dev(1), NOW)
            .await
            .unwrap(),
        4
    ); // 2, 3, 8 + number 7
}

async fn case_fetch_order_and_paging(store: Store) {
    entity(&store, &num("5550001")).await;
    // 25 items from two senders, interleaved, over several batches (same created_at).
    let mut all = Vec::new();
    for n in 1..=25u32 {
        let from = if n % 2 == 0 {
            &num("5550002")
        } else {
            &num("5550003")
        };
        all.push(item(n, &num("5550001"), Some(1), from));
    }
    for chunk in all.chunks(7) {
        for r in store.deposit_batch(chunk, 100).await.unwrap() {
            assert_eq!(r.unwrap(), DepositOutcome::Stored);
        }
    }
    let (p1, more) = store
        .fetch_inbox(&num("5550001"), dev(1), None, 10, NOW)
        .await
        .unwrap();
    assert!(more);
    assert_eq!(p1.len(), 10);
    let (p2, more) = store
        .fetch_inbox(&num("5550001"), dev(1), Some(p1[9].id), 10, NOW)
        .await
        .unwrap();
    assert!(more);
    let (p3, more) = store
        .fetch_inbox(&num("5550001"), dev(1), Some(p2[9].id), 10, NOW)
        .await
        .unwrap();
    assert!(!more);
    assert_eq!(p3.len(), 5);
    let ids: Vec<_> = p1.iter().chain(&p2).chain(&p3).map(|i| i.id).collect();
    assert_eq!(ids, (1..=25).map(id).collect::<Vec<_>>(), "deposit order");
    let seqs: Vec<_> = p1.iter().chain(&p2).chain(&p3).map(|i| i.seq).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]));
    let x = &p1[0];
    assert_eq!(x.sender_number, num("5550003"));
    assert_eq!(x.created_at, NOW);
    assert_eq!(x.expires_at, NOW + 7 * DAY);
    assert_eq!(x.recipient_device, Some(dev(1)));
    // Exactly `limit` left: more = false.
    let (p, more) = store
        .fetch_inbox(&num("5550001"), dev(1), Some(p2[4].id), 10, NOW)
        .await
        .unwrap();
    assert_eq!(p.len(), 10);
    assert!(!more);

    // Ack the first page, then continue after its (now deleted) last id: starts over from
    // what is left, which is exactly the rest.
    let first: Vec<_> = p1.iter().map(|i| i.id).collect();
    assert_eq!(
        store
            .ack_inbox(&num("5550001"), dev(1), &first, NOW)
            .await
            .unwrap(),
        10
    );
    let (rest, more) = store
        .fetch_inbox(&num("5550001"), dev(1), Some(p1[9].id), 100, NOW)
        .await
        .unwrap();
    assert!(!more);
    assert_eq!(
        rest.iter().map(|i| i.id).collect::<Vec<_>>(),
        (11..=25).map(id).collect::<Vec<_>>()
    );

    // Another device sees none of them.
    assert!(fetch_all(&store, &num("5550001"), 2, NOW).await.is_empty());
    // Number-mode items are merged in seq order.
    deposit_one(
        &store,
        &item(100, &num("5550001"), None, &num("5550002")),
        100,
    )
    .await
    .unwrap();
    deposit_one(
        &store,
        &item(101, &num("5550001"), Some(1), &num("5550002")),
        100,
    )
    .await
    .unwrap();
    let ids = fetch_all(&store, &num("5550001"), 1, NOW).await;
    assert_eq!(&ids[ids.len() - 2..], &[id(100), id(101)]);
    assert_eq!(
        fetch_all(&store, &num("5550001"), 2, NOW).await,
        vec![id(100)]
    );
}

async fn case_fetch_skips_expired(store: Store) {
    entity(&store, &num("5550001")).await;
    let mut short = item(1, &num("5550001"), Some(1), &num("5550002"));
    short.expires_at = NOW + 5;
    let mut short_number = item(2, &num("5550001"), None, &num("5550002"));
    short_number.expires_at = NOW + 5;
    let long = item(3, &num("5550001"), Some(1), &num("5550002"));
    store
        .deposit_batch(&[short, short_number, long], 100)
        .await
        .unwrap();
    assert_eq!(
        fetch_all(&store, &num("5550001"), 1, NOW + 4).await,
        vec![id(1), id(2), id(3)]
    );
    assert_eq!(
        store
            .inbox_count(&num("5550001"), dev(1), NOW + 4)
            .await
            .unwrap(),
        3
    );
    assert_eq!(
        fetch_all(&store, &num("5550001"), 1, NOW + 5).await,
        vec![id(3)]
    );
    assert_eq!(
        store
            .inbox_count(&num("5550001"), dev(1), NOW + 5)
            .await
            .unwrap(),
        1
    );
    assert_eq!(store.inbox_depth().await.unwrap(), 3, "not yet swept");
}

async fn case_ack_entity_mode(store: Store) {
    entity(&store, &num("5550001")).await;
    add_devices(&store, &num("5550001"), 2).await;
    // Entity mode: one copy per device.
    let out = store
        .deposit_batch(
            &[
                item(1, &num("5550001"), Some(1), &num("5550002")),
                item(1, &num("5550001"), Some(2), &num("5550002")),
                item(2, &num("5550001"), Some(1), &num("5550002")),
                item(2, &num("5550001"), Some(2), &num("5550002")),
            ],
            100,
        )
        .await
        .unwrap();
    assert!(out.iter().all(|r| matches!(r, Ok(DepositOutcome::Stored))));
    assert_eq!(
        store
            .ack_inbox(&num("5550001"), dev(1), &[id(1)], NOW)
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        fetch_all(&store, &num("5550001"), 1, NOW).await,
        vec![id(2)]
    );
    assert_eq!(
        fetch_all(&store, &num("5550001"), 2, NOW).await,
        vec![id(1), id(2)]
    );
    assert_eq!(
        store
            .ack_inbox(&num("5550001"), dev(1), &[id(1)], NOW)
            .await
            .unwrap(),
        0,
        "repeat"
    );
    assert_eq!(
        store
            .ack_inbox(&num("5550001"), dev(1), &[id(9)], NOW)
            .await
            .unwrap(),
        0,
        "unknown"
    );
    assert_eq!(
        store
            .ack_inbox(&num("5550001"), dev(1), &[], NOW)
            .await
            .unwrap(),
        0
    );
    // Acking another entity's ids does nothing.
    assert_eq!(
        store
            .ack_inbox(&num("5550002"), dev(1), &[id(2)], NOW)
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        store
            .ack_inbox(&num("5550001"), dev(2), &[id(1), id(2), id(9)], NOW)
            .await
            .unwrap(),
        2
    );
    assert_eq!(
        store
            .ack_inbox(&num("5550001"), dev(1), &[id(2)], NOW)
            .await
            .unwrap(),
        1
    );
    assert_eq!(store.inbox_depth().await.unwrap(), 0);
    assert_eq!(
        store
            .inbox_count(&num("5550001"), dev(1), NOW)
            .await
            .unwrap(),
        0
    );
}

async fn case_ack_number_mode(store: Store) {
    entity(&store, &num("5550001")).await;
    add_devices(&store, &num("5550001"), 3).await;
    store
        .revoke_device(&num("5550001"), dev(3), NOW)
        .await
        .unwrap(); // active: 1 and 2
    let out = store
        .deposit_batch(
            &[
                item(1, &num("5550001"), None, &num("5550002")),
                item(2, &num("5550001"), None, &num("5550002")),
            ],
            100,
        )
        .await
        .unwrap();
    assert!(out.iter().all(|r| matches!(r, Ok(DepositOutcome::Stored))));
    let (items, _) = store
        .fetch_inbox(&num("5550001"), dev(1), None, 10, NOW)
        .await
        .unwrap();
    assert!(items.iter().all(|i| i.recipient_device.is_none()));

    assert_eq!(
        store
            .ack_inbox(&num("5550001"), dev(1), &[id(1)], NOW)
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        fetch_all(&store, &num("5550001"), 1, NOW).await,
        vec![id(2)]
    );
    assert_eq!(
        fetch_all(&store, &num("5550001"), 2, NOW).await,
        vec![id(1), id(2)]
    );
    assert_eq!(
        store.inbox_depth().await.unwrap(),
        2,
        "kept until every device acked"
    );
    assert_eq!(
        store
            .inbox_count(&num("5550001"), dev(1), NOW)
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        store
            .inbox_count(&num("5550001"), dev(2), NOW)
            .await
            .unwrap(),
        2
    );
    assert_eq!(
        store
            .ack_inbox(&num("5550001"), dev(1), &[id(1)], NOW)
            .await
            .unwrap(),
        0,
        "repeat"
    );
    assert_eq!(store.inbox_depth().await.unwrap(), 2);

    // The last active device acks: gone (the revoked device 3 is not waited for).
    assert_eq!(
        store
            .ack_inbox(&num("5550001"), dev(2), &[id(1)], NOW)
            .await
            .unwrap(),
        1
    );
    assert_eq!(store.inbox_depth().await.unwrap(), 1);
    assert_eq!(
        fetch_all(&store, &num("5550001"), 1, NOW).await,
        vec![id(2)]
    );
    assert_eq!(
        fetch_all(&store, &num("5550001"), 2, NOW).await,
        vec![id(2)]
    );

    // A device added later must acknowledge too.
    add_devices(&store, &num("5550001"), 3).await; // device 4
    assert_eq!(
        store
            .ack_inbox(&num("5550001"), dev(1), &[id(2)], NOW)
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        store
            .ack_inbox(&num("5550001"), dev(2), &[id(2)], NOW)
            .await
            .unwrap(),
        1
    );
    assert_eq!(store.inbox_depth().await.unwrap(), 1);
    assert_eq!(
        fetch_all(&store, &num("5550001"), 4, NOW).await,
        vec![id(2)]
    );
    assert_eq!(
        store
            .ack_inbox(&num("5550001"), dev(4), &[id(2)], NOW)
            .await
            .unwrap(),
        1
    );
    assert_eq!(store.inbox_depth().await.unwrap(), 0);
}

async fn case_revoke_releases_number_mode_items(store: Store) {
    entity(&store, &num("5550001")).await;
    add_devices(&store, &num("5550001"), 2).await;
    store
        .deposit_batch(
            &[
                item(1, &num("5550001"), None, &num("5550002")),
                item(2, &num("5550001"), None, &num("5550002")),
                item(3, &num("5550001"), Some(2), &num("5550002")),
            ],
            100,
        )
        .await
        .unwrap();
    assert_eq!(
        store
            .ack_inbox(&num("5550001"), dev(1), &[id(1)], NOW)
            .await
            .unwrap(),
        1
    );
    assert_eq!(store.inbox_depth().await.unwrap(), 3);
    // Revoking device 2: its own item goes, and item 1 (acked by every remaining device) too.
    assert!(
        store
            .revoke_device(&num("5550001"), dev(2), NOW)
            .await
            .unwrap()
    );
    assert_eq!(store.inbox_depth().await.unwrap(), 1);
    assert_eq!(
        fetch_all(&store, &num("5550001"), 1, NOW).await,
        vec![id(2)]
    );
}

async fn case_sweep(store: Store) {
    entity(&store, &num("5550001")).await;
    add_devices(&store, &num("5550001"), 2).await;
    let mut items = Vec::new();
    for (n, dev, ttl) in [
        (1, Some(1), 10),
        (2, None, 10),
        (3, Some(1), 100),
        (4, None, 100),
    ] {
        let mut it = item(n, &num("5550001"), dev, &num("5550002"));
        it.expires_at = NOW + ttl;
        items.push(it);
    }
    store.deposit_batch(&items, 100).await.unwrap();
    // Device 1 acked the expiring number-mode item: the ack goes with it.
    assert_eq!(
        store
            .ack_inbox(&num("5550001"), dev(1), &[id(2)], NOW)
            .await
            .unwrap(),
        1
    );
    // Registration secrets: one used, one left to expire, one still valid.
    for s in [1, 2, 3] {
        store
            .create_registration_secret(&num("5550001"), &hash(s), None, NOW, NOW + 600, 10)
            .await
            .unwrap();
    }
    store
        .redeem_registration_secret(&num("5550001"), &hash(1), &device(1, None), NOW + 1, 10)
        .await
        .unwrap();
    store
        .put_peer_pubkey(&num("7770001"), &[7; 32], NOW + 10)
        .await
        .unwrap();
    store
        .put_peer_pubkey(&num("7770002"), &[8; 32], NOW + 10 * DAY)
        .await
        .unwrap();

    let r = store.sweep(NOW + 50).await.unwrap();
    assert_eq!(r.inbox_items, 2);
    assert_eq!(r.registration_secrets, 0, "kept for a day");
    assert_eq!(r.peer_pubkeys, 1);
    assert!(!r.more);
    assert_eq!(store.inbox_depth().await.unwrap(), 2);
    assert_eq!(
        fetch_all(&store, &num("5550001"), 1, NOW + 50).await,
        vec![id(3), id(4)]
    );
    assert!(
        store
            .peer_pubkey(&num("7770001"), NOW)
            .await
            .unwrap()
            .is_none(),
        "swept"
    );
    assert_eq!(
        store.peer_pubkey(&num("7770002"), NOW + 50).await.unwrap(),
        Some([8; 32])
    );

    // A day after expiry every secret goes: the three above (all expired at NOW + 600, one
    // used) and the one `add_devices` used.
    let r = store.sweep(NOW + 600 + DAY).await.unwrap();
    assert_eq!(r.registration_secrets, 4);
    assert_eq!(r.inbox_items, 2);
    assert_eq!(store.inbox_depth().await.unwrap(), 0);
    let r = store.sweep(NOW + 600 + DAY).await.unwrap();
    assert_eq!(r, Default::default());
    // Swept secrets cannot be redeemed (they were unusable anyway).
    let err = store
        .redeem_registration_secret(&num("5550001"), &hash(2), &device(2, None), NOW + 2, 10)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::BadSecret), "{err:?}");
}

async fn case_sweep_batches(store: Store) {
    entity(&store, &num("5550001")).await;
    let items: Vec<_> = (0..2500u32)
        .map(|n| {
            let mut it = item(
                n,
                &num("5550001"),
                if n % 2 == 0 { Some(1) } else { None },
                &num("5550002"),
            );
            it.expires_at = NOW + 1;
            it
        })
        .collect();
    for chunk in items.chunks(500) {
        let out = store.deposit_batch(chunk, 10_000).await.unwrap();
        assert!(out.iter().all(|r| matches!(r, Ok(DepositOutcome::Stored))));
    }
    deposit_one(
        &store,
        &item(9999, &num("5550001"), Some(1), &num("5550002")),
        10_000,
    )
    .await
    .unwrap();
    assert_eq!(store.inbox_depth().await.unwrap(), 2501);
    let r = store.sweep(NOW + 1).await.unwrap();
    assert_eq!(r.inbox_items, 2500);
    assert!(!r.more);
    assert_eq!(store.inbox_depth().await.unwrap(), 1);
}

async fn case_backup_versions(store: Store) {
    entity(&store, &num("5550001")).await;
    assert!(store.get_backup(&num("5550001")).await.unwrap().is_none());
    store
        .put_backup(&num("5550001"), 0, 1, b"v1", NOW)
        .await
        .unwrap();
    let err = store
        .put_backup(&num("5550001"), 0, 1, b"again", NOW)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict), "{err:?}");
    store
        .put_backup(&num("5550001"), 1, 2, b"v2", NOW + 1)
        .await
        .unwrap();
    // A second device that read version 1 loses.
    let err = store
        .put_backup(&num("5550001"), 1, 2, b"stale", NOW + 2)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict), "{err:?}");
    let err = store
        .put_backup(&num("5550001"), 5, 6, b"future", NOW + 2)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict), "{err:?}");
    let b = store.get_backup(&num("5550001")).await.unwrap().unwrap();
    assert_eq!(
        (b.version, b.blob.as_slice(), b.updated_at),
        (2, &b"v2"[..], NOW + 1)
    );
    assert!(!format!("{b:?}").contains("118"), "blob not in Debug");
    let err = store
        .put_backup(&num("5550001"), 2, 2, b"same", NOW)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::InvalidArgument(_)), "{err:?}");
    let err = store
        .put_backup(&num("5559999"), 0, 1, b"x", NOW)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NotFound), "{err:?}");
}

async fn case_concurrent_batch_deposit(store: Store) {
    entity(&store, &num("5550001")).await;
    add_devices(&store, &num("5550001"), 2).await;
    const TASKS: u32 = 20;
    const PER_TASK: u32 = 50;
    const BATCH: u32 = 10;
    let make = |t: u32, k: u32| {
        // Entity mode to device 1 and 2 alternately per task, number mode for every 5th.
        let dev = match t % 5 {
            0 => None,
            x if x % 2 == 0 => Some(2),
            _ => Some(1),
        };
        let mut it = item(
            t * 1000 + k,
            &num("5550001"),
            dev,
            &num(&format!("60000{t:02}")),
        );
        it.body = format!("{t}:{k}").into_bytes();
        it
    };
    let run = |expect: DepositOutcome| {
        let tasks: Vec<_> = (0..TASKS)
            .map(|t| {
                let store = store.clone();
                tokio::spawn(async move {
                    for b in 0..PER_TASK / BATCH {
                        let batch: Vec<_> = (0..BATCH).map(|i| make(t, b * BATCH + i)).collect();
                        let out = store.deposit_batch(&batch, 10_000).await.unwrap();
                        for r in out {
                            assert_eq!(r.unwrap(), expect);
                        }
                    }
                })
            })
            .collect();
        async move {
            for t in tasks {
                t.await.unwrap();
            }
        }
    };
    run(DepositOutcome::Stored).await;
    assert_eq!(
        store.inbox_depth().await.unwrap(),
        i64::from(TASKS * PER_TASK)
    );
    // Everything again, concurrently: all idempotent, nothing added.
    run(DepositOutcome::AlreadyStored {
        expires_at: make(0, 0).expires_at,
    })
    .await;
    assert_eq!(
        store.inbox_depth().await.unwrap(),
        i64::from(TASKS * PER_TASK)
    );

    // Each sender's items come out in the order it sent them, on every device.
    let mut seen = 0;
    for dev in [1, 2] {
        let mut all = Vec::new();
        let mut after = None;
        loop {
            let (page, more) = store
                .fetch_inbox(&num("5550001"), crate::dev(dev), after, 97, NOW)
                .await
                .unwrap();
            after = page.last().map(|i| i.id);
            all.extend(page);
            if !more {
                break;
            }
        }
        let mut last: std::collections::HashMap<String, u32> = Default::default();
        for it in &all {
            let body = String::from_utf8(it.body.clone()).unwrap();
            let (t, k) = body.split_once(':').unwrap();
            let k: u32 = k.parse().unwrap();
            if let Some(prev) = last.insert(t.to_owned(), k) {
                assert!(prev < k, "sender {t}: {prev} then {k}");
            }
            if it.recipient_device.is_some() {
                seen += 1;
            }
        }
        assert_eq!(all.len() as u32, count_for(dev, TASKS, PER_TASK));
    }
    assert_eq!(seen + 4 * PER_TASK, TASKS * PER_TASK);

    fn count_for(dev: u32, tasks: u32, per: u32) -> u32 {
        let number_mode = (0..tasks).filter(|t| t % 5 == 0).count() as u32;
        let own = (0..tasks)
            .filter(|t| t % 5 != 0 && ((t % 5) % 2 == 0) == (dev == 2))
            .count() as u32;
        (number_mode + own) * per
    }
}

async fn case_batcher_group_commit(store: Store) {
    entity(&store, &num("5550001")).await;
    let config = BatcherConfig {
        quota_per_device: 900,
        ..BatcherConfig::default()
    };
    let batcher = DepositBatcher::spawn(store.clone(), config);
    // 50 senders, each depositing 20 items one after another (awaiting each, as a connection
    // handler does); many are pending at once, so they share transactions.
    let tasks: Vec<_> = (0..50u32)
        .map(|t| {
            let batcher = batcher.clone();
            tokio::spawn(async move {
                let mut outcomes = Vec::new();
                for k in 0..20 {
                    let mut it = item(
                        t * 100 + k,
                        &num("5550001"),
                        Some(1),
                        &num(&format!("60000{t:02}")),
                    );
                    it.body = format!("{t}:{k}").into_bytes();
                    outcomes.push(batcher.deposit(it).await);
                }
                outcomes
            })
        })
        .collect();
    let mut stored = 0;
    let mut quota = 0;
    for t in tasks {
        for r in t.await.unwrap() {
            match r {
                Ok(DepositOutcome::Stored) => stored += 1,
                Err(StoreError::QuotaExceeded) => quota += 1,
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    assert_eq!((stored, quota), (900, 100));
    assert_eq!(store.inbox_depth().await.unwrap(), 900);
    // Per-sender order holds.
    let (items, more) = store
        .fetch_inbox(&num("5550001"), dev(1), None, 1000, NOW)
        .await
        .unwrap();
    assert!(!more);
    let mut last: std::collections::HashMap<String, u32> = Default::default();
    for it in &items {
        let body = String::from_utf8(it.body.clone()).unwrap();
        let (t, k) = body.split_once(':').unwrap();
        let k: u32 = k.parse().unwrap();
        if let Some(prev) = last.insert(t.to_owned(), k) {
            assert!(prev < k, "sender {t}: {prev} then {k}");
        }
    }
    // Idempotent through the batcher too (the same message: same id, sender and body).
    let mut repeat = item(0, &num("5550001"), Some(1), &num("6000000"));
    repeat.body = b"0:0".to_vec();
    let again = batcher.deposit(repeat).await.unwrap();
    assert!(
        matches!(again, DepositOutcome::AlreadyStored { .. }),
        "{again:?}"
    );
    // Per-item errors stay per item.
    let bad = batcher
        .deposit(item(0, &num("5550001"), Some(1), &num("6000099")))
        .await
        .unwrap_err();
    assert!(matches!(bad, StoreError::DuplicateId), "{bad:?}");

    // A message's copies for several devices at once (another inbox: this one is full): one
    // outcome each, in order, and a repeat among them is told apart from the new ones.
    let copies: Vec<_> = [1, 2, 3]
        .into_iter()
        .map(|d| item(7000, &num("5550009"), Some(d), &num("6000001")))
        .collect();
    let mut with_repeat = copies.clone();
    with_repeat[1] = item(0, &num("5550001"), Some(1), &num("6000000"));
    with_repeat[1].body = b"0:0".to_vec();
    let outcomes = batcher.deposit_all(with_repeat).await;
    assert!(
        matches!(outcomes[0], Ok(DepositOutcome::Stored)),
        "{outcomes:?}"
    );
    assert!(
        matches!(outcomes[1], Ok(DepositOutcome::AlreadyStored { .. })),
        "{outcomes:?}"
    );
    assert!(
        matches!(outcomes[2], Ok(DepositOutcome::Stored)),
        "{outcomes:?}"
    );
    for d in [1, 3] {
        assert!(
            store
                .fetch_inbox(&num("5550009"), dev(d), None, 10, NOW)
                .await
                .unwrap()
                .0
                .iter()
                .any(|i| i.body == copies[0].body && i.sender_number == num("6000001")),
            "device {d}"
        );
    }
}

async fn case_federation_tables(store: Store) {
    // Broker-held pubkeys.
    assert!(
        store
            .peer_pubkey(&num("7770001"), NOW)
            .await
            .unwrap()
            .is_none()
    );
    store
        .put_peer_pubkey(&num("7770001"), &[1; 32], NOW + 100)
        .await
        .unwrap();
    assert_eq!(
        store.peer_pubkey(&num("7770001"), NOW).await.unwrap(),
        Some([1; 32])
    );
    store
        .put_peer_pubkey(&num("7770001"), &[2; 32], NOW + 200)
        .await
        .unwrap();
    assert_eq!(
        store.peer_pubkey(&num("7770001"), NOW + 150).await.unwrap(),
        Some([2; 32])
    );
    assert!(
        store
            .peer_pubkey(&num("7770001"), NOW + 200)
            .await
            .unwrap()
            .is_none(),
        "expired"
    );

    // Outbox.
    assert_eq!(store.outbox_depth().await.unwrap(), 0);
    assert!(enqueue_one(&store, &[1; 16], "broker-b", b"one", NOW).await);
    assert!(!enqueue_one(&store, &[1; 16], "broker-b", b"dup", NOW).await);
    assert!(enqueue_one(&store, &[2; 16], "broker-c", b"two", NOW + 1).await);
    assert_eq!(store.outbox_depth().await.unwrap(), 2);
    let due = store.due_outbox(NOW + 1, 10).await.unwrap();
    assert_eq!(due.len(), 2);
    assert_eq!(due[0].idempotency_key, [1; 16]);
    assert_eq!(due[0].payload, b"one");
    assert_eq!(due[0].peer_broker, "broker-b");
    assert_eq!(due[0].attempts, 0);
    assert_eq!(store.due_outbox(NOW, 10).await.unwrap().len(), 1);
    assert!(store.retry_outbox(&[1; 16], NOW + 60).await.unwrap());
    let due = store.due_outbox(NOW + 1, 10).await.unwrap();
    assert_eq!(due.len(), 1);
    assert_eq!(due[0].idempotency_key, [2; 16]);
    let due = store.due_outbox(NOW + 60, 1).await.unwrap();
    assert_eq!(due.len(), 1, "limit");
    let due = store.due_outbox(NOW + 60, 10).await.unwrap();
    let retried = due.iter().find(|o| o.idempotency_key == [1; 16]).unwrap();
    assert_eq!((retried.attempts, retried.next_attempt_at), (1, NOW + 60));
    assert!(store.complete_outbox(&[1; 16]).await.unwrap());
    assert!(!store.complete_outbox(&[1; 16]).await.unwrap());
    assert!(!store.retry_outbox(&[1; 16], NOW).await.unwrap());
    assert_eq!(store.outbox_depth().await.unwrap(), 1);
}

/// What a `Deliver` batch reads at the recipient's broker (one statement for every pair), and
/// the removal of many delivered outbox rows at once.
async fn case_delivery_routes_and_completing_many(store: Store) {
    use micromsg_store::DeliveryRoute;
    let (r, s, other) = (num("5560001"), num("5550001"), num("5550002"));
    entity(&store, &r).await;
    add_devices(&store, &r, 3).await;
    assert!(store.revoke_device(&r, dev(2), NOW).await.unwrap());
    store.add_contact(&r, &s, NOW).await.unwrap();
    store.add_contact(&r, &other, NOW).await.unwrap();
    store.block(&r, &other, NOW).await.unwrap();
    let mut pairs = Vec::new();
    for k in 0..600 {
        pairs.push(match k % 4 {
            0 => (r.clone(), s.clone()),
            1 => (r.clone(), other.clone()),
            2 => (r.clone(), num("5550003")),
            _ => (num("5569999"), s.clone()),
        });
    }
    let routes = store.delivery_routes(&pairs).await.unwrap();
    assert_eq!(routes.len(), 600);
    for (k, route) in routes.iter().enumerate() {
        let want = match k % 4 {
            0 => DeliveryRoute {
                exists: true,
                contact: true,
                blocked: false,
                devices: devs(&[1, 3]),
            },
            1 => DeliveryRoute {
                exists: true,
                contact: true,
                blocked: true,
                devices: devs(&[1, 3]),
            },
            2 => DeliveryRoute {
                exists: true,
                contact: false,
                blocked: false,
                devices: devs(&[1, 3]),
            },
            _ => DeliveryRoute::default(),
        };
        assert_eq!(route, &want, "pair {k}");
    }
    assert!(store.delivery_routes(&[]).await.unwrap().is_empty());

    // 300 rows (more than one SQLite statement's chunk), 299 of them removed at once.
    for k in 0..300u32 {
        let mut key = [7u8; 16];
        key[..4].copy_from_slice(&k.to_be_bytes());
        assert!(enqueue_one(&store, &key, "y", b"p", NOW).await);
    }
    let keys: Vec<[u8; 16]> = (1..300u32)
        .map(|k| {
            let mut key = [7u8; 16];
            key[..4].copy_from_slice(&k.to_be_bytes());
            key
        })
        .chain([[9u8; 16]])
        .collect();
    assert_eq!(store.complete_outbox_many(&keys).await.unwrap(), 299);
    assert_eq!(store.complete_outbox_many(&keys).await.unwrap(), 0);
    assert_eq!(store.complete_outbox_many(&[]).await.unwrap(), 0);
    assert_eq!(store.outbox_depth().await.unwrap(), 1);
    // The one left is due now; rescheduled, it is the next one due.
    assert_eq!(store.next_outbox_attempt(NOW).await.unwrap(), None);
    let mut first = [7u8; 16];
    first[..4].copy_from_slice(&0u32.to_be_bytes());
    assert!(store.retry_outbox(&first, NOW + 50).await.unwrap());
    assert_eq!(
        store.next_outbox_attempt(NOW).await.unwrap(),
        Some(NOW + 50)
    );
    assert_eq!(store.next_outbox_attempt(NOW + 50).await.unwrap(), None);
}

// ---------------------------------------------------------------------------------------------
// Reopening (not a conformance case: it is about SQLite files).

#[tokio::test]
async fn reopening_a_sqlite_store_keeps_its_data() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broker.sqlite3");
    let store = Store::open_sqlite(&path).await.unwrap();
    assert_eq!(store.backend_name(), "sqlite");
    store
        .create_entity(&num("5550001"), &device(1, None), NOW)
        .await
        .unwrap();
    store.close().await;
    // Reopening keeps the data (and re-running migrations is a no-op).
    let store = Store::open_sqlite(&path).await.unwrap();
    assert!(store.entity_exists(&num("5550001")).await.unwrap());
    store.close().await;
}

/// A SQLite database moved from Postgres (`migrate-store`) may hold quota counts in slots other
/// than 0, written by deposit batches that were in flight side by side there: SQLite, which adds
/// to slot 0 only, still counts them in the bound, so the quota holds.
#[tokio::test]
async fn a_sqlite_store_counts_quota_slots_moved_from_postgres() {
    use sqlx::sqlite::SqliteConnection;

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broker.sqlite3");
    let store = Store::open_sqlite(&path).await.unwrap();
    entity(&store, &num("5550001")).await;
    let first: Vec<_> = (0..8)
        .map(|k| item(k, &num("5550001"), Some(1), &num("5550002")))
        .collect();
    let out = store.deposit_batch(&first, 10).await.unwrap();
    assert!(out.iter().all(|r| matches!(r, Ok(DepositOutcome::Stored))));
    store.close().await;
    // As Postgres batches in slot 1 would have left it.
    let mut raw = SqliteConnection::connect(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    sqlx::query("UPDATE inbox_counters SET slot = 1")
        .execute(&mut raw)
        .await
        .unwrap();
    raw.close().await.unwrap();

    let store = Store::open_sqlite(&path).await.unwrap();
    let more: Vec<_> = (100..105)
        .map(|k| item(k, &num("5550001"), Some(1), &num("5550002")))
        .collect();
    let out = store.deposit_batch(&more, 10).await.unwrap();
    let stored = out
        .iter()
        .filter(|r| matches!(r, Ok(DepositOutcome::Stored)))
        .count();
    assert_eq!(stored, 2, "{out:?}");
    assert_eq!(store.inbox_depth().await.unwrap(), 10);
    store.close().await;
}

/// Received deliveries handed to the store alone ([`Store::receive_deliveries`]) or through a
/// deposit batcher with two batches in flight (the broker's path: each batch beside the other,
/// in a quota counter slot of its own on Postgres).
async fn receive(
    store: &Store,
    batched: bool,
    deliveries: &[ReceivedDelivery],
    quota: u32,
) -> Vec<Vec<Result<DepositOutcome, StoreError>>> {
    if !batched {
        return store.receive_deliveries(deliveries, quota).await.unwrap();
    }
    let config = BatcherConfig {
        quota_per_device: quota,
        max_in_flight: 2,
        ..BatcherConfig::default()
    };
    DepositBatcher::spawn(store.clone(), config)
        .receive(deliveries.to_vec())
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect()
}

/// A received delivery of item `n` with key `[key; 16]`, one copy per device in `devices`.
fn delivery(key: u8, n: u32, devices: &[u32]) -> ReceivedDelivery {
    ReceivedDelivery {
        key: [key; 16],
        keep_until: NOW + 100,
        copies: devices
            .iter()
            .map(|&d| item(n, &num("5550001"), Some(d), &num("6660002")))
            .collect(),
    }
}

/// Deliveries from a peer broker are stored once over their lifetime: re-sent after the
/// recipient acknowledged (deleted) them, they store nothing; a delivery refused for the quota
/// is not remembered (it may come again); expired keys are swept.
async fn received_deliveries_once(store: Store, batched: bool) {
    entity(&store, &num("5550001")).await;
    add_devices(&store, &num("5550001"), 2).await;
    let deliveries = [delivery(1, 1, &[1, 2]), delivery(2, 2, &[1])];
    let outcomes = receive(&store, batched, &deliveries, 100).await;
    assert!(
        outcomes.iter().flatten().count() == 3
            && outcomes
                .iter()
                .flatten()
                .all(|o| matches!(o, Ok(DepositOutcome::Stored))),
        "{outcomes:?}"
    );
    assert_eq!(
        fetch_all(&store, &num("5550001"), 1, NOW).await,
        vec![id(1), id(2)]
    );
    assert_eq!(
        fetch_all(&store, &num("5550001"), 2, NOW).await,
        vec![id(1)]
    );
    assert_eq!(
        store
            .ack_inbox(&num("5550001"), dev(1), &[id(1), id(2)], NOW)
            .await
            .unwrap(),
        2
    );

    // The same batch again (a lost answer): nothing is stored twice, on any device.
    let again = receive(&store, batched, &deliveries, 100).await;
    assert!(
        again.iter().map(Vec::len).eq([2, 1])
            && again
                .iter()
                .flatten()
                .all(|o| matches!(o, Ok(DepositOutcome::AlreadyStored { .. }))),
        "{again:?}"
    );
    assert!(fetch_all(&store, &num("5550001"), 1, NOW).await.is_empty());
    assert_eq!(
        fetch_all(&store, &num("5550001"), 2, NOW).await,
        vec![id(1)]
    );

    // Refused for the quota: not remembered, so the retry is stored once there is room.
    let third = [delivery(3, 3, &[1])];
    let full = receive(&store, batched, &third, 0).await;
    assert!(
        matches!(full[..], [ref one] if matches!(one[..], [Err(StoreError::QuotaExceeded)])),
        "{full:?}"
    );
    let retried = receive(&store, batched, &third, 100).await;
    assert!(
        matches!(retried[..], [ref one] if matches!(one[..], [Ok(DepositOutcome::Stored)])),
        "{retried:?}"
    );

    // Many deliveries in flight at once, the same key twice among them (a call re-sent while
    // the first is still being stored): each is stored once.
    let many: Vec<ReceivedDelivery> = (10..60u8)
        .chain([10, 11])
        .map(|k| delivery(k, u32::from(k), &[1]))
        .collect();
    let outcomes = receive(&store, batched, &many, 100).await;
    let stored = outcomes
        .iter()
        .flatten()
        .filter(|o| matches!(o, Ok(DepositOutcome::Stored)))
        .count();
    let repeats = outcomes
        .iter()
        .flatten()
        .filter(|o| matches!(o, Ok(DepositOutcome::AlreadyStored { .. })))
        .count();
    assert_eq!((stored, repeats), (50, 2), "{outcomes:?}");
    assert_eq!(fetch_all(&store, &num("5550001"), 1, NOW).await.len(), 51);

    let swept = store.sweep(NOW + 101).await.unwrap();
    assert_eq!(swept.received_deliveries, 53);
}

async fn case_received_deliveries_once(store: Store) {
    received_deliveries_once(store, false).await;
}

async fn case_received_deliveries_once_through_the_batcher(store: Store) {
    received_deliveries_once(store, true).await;
}

/// One query tells a DEPOSIT the contact pair, the block and the active devices.
async fn case_deposit_route(store: Store) {
    entity(&store, &num("5550001")).await;
    entity(&store, &num("5550002")).await;
    add_devices(&store, &num("5550002"), 3).await;
    let route = route_of(&store, &num("5550001"), &num("5550002")).await;
    assert!(!route.contact && !route.blocked);
    assert_eq!(route.devices, devs(&[1, 2, 3]));
    assert!(
        store
            .revoke_device(&num("5550002"), dev(2), NOW)
            .await
            .unwrap()
    );
    store
        .add_contact(&num("5550001"), &num("5550002"), NOW)
        .await
        .unwrap();
    store
        .block(&num("5550002"), &num("5550001"), NOW)
        .await
        .unwrap();
    let route = route_of(&store, &num("5550001"), &num("5550002")).await;
    assert!(route.contact && route.blocked);
    assert_eq!(route.devices, devs(&[1, 3]));
    // The other direction: 5550002 has no pair with 5550001 and is not blocked by it.
    let back = route_of(&store, &num("5550002"), &num("5550001")).await;
    assert!(!back.contact && !back.blocked);
    // An unknown number: no devices, nothing else.
    assert_eq!(
        route_of(&store, &num("5550001"), &num("5559999")).await,
        micromsg_store::DepositRoute::default()
    );
    // Batched: the same answers per pair, in order, repeats included, across statement chunks.
    let mut pairs = Vec::new();
    for k in 0..300 {
        let (s, t) = match k % 3 {
            0 => (&num("5550001"), &num("5550002")),
            1 => (&num("5550002"), &num("5550001")),
            _ => (&num("5550001"), &num("5559999")),
        };
        pairs.push((s.to_owned(), t.to_owned()));
    }
    let routes = store.deposit_routes(&pairs).await.unwrap();
    assert_eq!(routes.len(), 300);
    for (pair, route) in pairs.iter().zip(&routes) {
        assert_eq!(route, &route_of(&store, &pair.0, &pair.1).await);
    }
    assert!(routes[0].contact && routes[0].blocked && routes[0].devices == devs(&[1, 3]));
    // In the second chunk of 256 pairs.
    assert!(routes[297].contact && routes[297].blocked && routes[297].devices == devs(&[1, 3]));
    assert!(!routes[298].contact && !routes[298].blocked && routes[298].devices == devs(&[1]));
    assert_eq!(routes[299], micromsg_store::DepositRoute::default());
    assert!(store.deposit_routes(&[]).await.unwrap().is_empty());
}

/// DEPOSITs whose route is read in the transaction that stores them
/// ([`Store::deposit_routed_batch`]): no pair stores nothing, a block discards (and stores
/// nothing), a pair stores a copy per active device (or one in the shared inbox), repeats and
/// clashes answer per copy, and the batch's outcomes stay in order.
/// An outbox entry that names a contact pair is queued only if the pair exists when its batch
/// commits; the others in the same batch are not affected, and a pair that comes to exist
/// later lets the same entry in.
async fn case_outbox_contact_checked(store: Store) {
    use micromsg_store::OutboxEntry;
    let (a, b, c) = (num("5550001"), num("5550002"), num("5550003"));
    entity(&store, &a).await;
    entity(&store, &b).await;
    entity(&store, &c).await;
    store.add_contact(&a, &b, NOW).await.unwrap();
    let entry = |k: u8, pair: Option<(&Number, &Number)>| OutboxEntry {
        idempotency_key: [k; 16],
        peer_broker: "y".into(),
        payload: vec![k; 8],
        now: NOW,
        contact: pair.map(|(s, t)| (s.clone(), t.clone())),
    };
    let results = store
        .enqueue_outbox_batch(&[
            entry(1, Some((&a, &b))),
            entry(2, Some((&c, &b))), // no pair
            entry(3, None),           // passed on unchecked
            entry(4, Some((&a, &b))), // the same pair again
        ])
        .await
        .unwrap();
    assert!(
        matches!(
            results[..],
            [Ok(true), Err(StoreError::NotFound), Ok(true), Ok(true)]
        ),
        "{results:?}"
    );
    let mut keys: Vec<u8> = store
        .due_outbox(NOW, 10)
        .await
        .unwrap()
        .iter()
        .map(|i| i.idempotency_key[0])
        .collect();
    keys.sort_unstable();
    assert_eq!(keys, vec![1, 3, 4], "the refused entry is not queued");
    store.add_contact(&c, &b, NOW).await.unwrap();
    let again = store
        .enqueue_outbox_batch(&[entry(2, Some((&c, &b)))])
        .await
        .unwrap();
    assert!(matches!(again[..], [Ok(true)]), "{again:?}");
}

async fn case_deposit_routed(store: Store) {
    use micromsg_store::{RoutedDeposit, RoutedOutcome};
    let (a, b, c) = (num("5550001"), num("5550002"), num("5550003"));
    entity(&store, &a).await;
    entity(&store, &b).await;
    entity(&store, &c).await;
    add_devices(&store, &b, 3).await;
    assert!(store.revoke_device(&b, dev(2), NOW).await.unwrap());
    store.add_contact(&a, &b, NOW).await.unwrap();
    store.add_contact(&c, &b, NOW).await.unwrap();
    store.block(&b, &c, NOW).await.unwrap();
    let routed = |n: u32, from: &Number, shared: bool| RoutedDeposit {
        item: item(n, &b, None, from),
        shared_inbox: shared,
    };
    let kinds = |outcomes: &[RoutedOutcome]| -> Vec<String> {
        outcomes
            .iter()
            .map(|o| match o {
                RoutedOutcome::NoContact => "none".to_owned(),
                RoutedOutcome::Discarded => "discarded".to_owned(),
                RoutedOutcome::Kept(copies) => copies
                    .iter()
                    .map(|c| match c {
                        Ok(DepositOutcome::Stored) => "stored",
                        Ok(DepositOutcome::AlreadyStored { .. }) => "repeat",
                        Err(StoreError::DuplicateId) => "clash",
                        other => panic!("unexpected {other:?}"),
                    })
                    .collect::<Vec<_>>()
                    .join("+"),
            })
            .collect()
    };
    let batch = vec![
        routed(1, &a, false), // a pair: a copy for devices 1 and 3
        routed(2, &b, false), // b has no pair with itself
        routed(3, &c, false), // c is blocked by b
        routed(1, &a, false), // the same message again in the batch: a repeat per copy
        routed(4, &a, true),  // number mode: the shared inbox
    ];
    let outcomes = store.deposit_routed_batch(&batch, 100).await.unwrap();
    assert_eq!(
        kinds(&outcomes),
        [
            "stored+stored",
            "none",
            "discarded",
            "repeat+repeat",
            "stored"
        ]
    );
    // Stored: message 1 for devices 1 and 3, message 4 once (shared); nothing of c's.
    assert_eq!(store.inbox_depth().await.unwrap(), 3);
    for d in [1, 3] {
        let (items, _) = store.fetch_inbox(&b, dev(d), None, 10, NOW).await.unwrap();
        let ids: Vec<MessageId> = items.iter().map(|i| i.id).collect();
        assert_eq!(ids, vec![id(1), id(4)], "device {d}");
    }
    // Across batches: a repeat, and a clash (another body under a stored id).
    let mut clash = routed(1, &a, false);
    clash.item.body = b"another body".to_vec();
    let outcomes = store
        .deposit_routed_batch(&[routed(1, &a, false), clash], 100)
        .await
        .unwrap();
    assert_eq!(kinds(&outcomes), ["repeat+repeat", "clash+clash"]);
    assert!(
        store
            .deposit_routed_batch(&[], 100)
            .await
            .unwrap()
            .is_empty()
    );
    // The batcher gives the same answers, a job at a time.
    let batcher = DepositBatcher::spawn(store.clone(), BatcherConfig::default());
    let one = batcher.deposit_routed(routed(5, &c, false)).await.unwrap();
    assert!(matches!(one, RoutedOutcome::Discarded), "{one:?}");
    let one = batcher.deposit_routed(routed(5, &a, false)).await.unwrap();
    assert_eq!(kinds(&[one]), ["stored+stored"]);
    assert_eq!(store.inbox_depth().await.unwrap(), 5);
}

/// Cross-broker deposits enter the outbox through group commit: one transaction per batch,
/// each key once (within a batch and across batches), due at once.
async fn case_outbox_group_commit(store: Store) {
    use micromsg_store::{OutboxBatcher, OutboxEntry};
    let entry = |k: u8| OutboxEntry {
        idempotency_key: [k; 16],
        peer_broker: "y".into(),
        payload: vec![k; 8],
        now: NOW,
        contact: None,
    };
    let fresh = store
        .enqueue_outbox_batch(&[entry(1), entry(2), entry(1)])
        .await
        .unwrap();
    assert!(
        matches!(fresh[..], [Ok(true), Ok(true), Ok(false)]),
        "{fresh:?}"
    );
    let again = store
        .enqueue_outbox_batch(&[entry(2), entry(3)])
        .await
        .unwrap();
    assert!(matches!(again[..], [Ok(false), Ok(true)]), "{again:?}");
    let due = store.due_outbox(NOW, 10).await.unwrap();
    let mut keys: Vec<u8> = due.iter().map(|i| i.idempotency_key[0]).collect();
    keys.sort_unstable();
    assert_eq!(keys, vec![1, 2, 3]);
    assert_eq!(due[0].peer_broker, "y");

    // Through the batcher, from many tasks at once: every enqueue answered, each key once.
    let batcher = OutboxBatcher::spawn(store.clone(), BatcherConfig::default());
    let tasks: Vec<_> = (10..60u8)
        .map(|k| {
            let b = batcher.clone();
            tokio::spawn(async move { b.enqueue(entry(k)).await })
        })
        .collect();
    for t in tasks {
        assert!(t.await.unwrap().unwrap());
    }
    assert_eq!(store.due_outbox(NOW, 100).await.unwrap().len(), 53);
}

/// Fetches and acknowledges the `n` oldest items of device 1 of `number` (they are deleted).
async fn take_oldest(store: &Store, number: &Number, n: u32) {
    let (items, _) = store
        .fetch_inbox(number, dev(1), None, n, NOW)
        .await
        .unwrap();
    let ids: Vec<_> = items.iter().map(|i| i.id).collect();
    assert_eq!(store.ack_inbox(number, dev(1), &ids, NOW).await.unwrap(), n);
}

/// The quota is checked against a per-inbox upper bound (`inbox_counters`) that deletions leave
/// alone: room freed by an acknowledgement or a sweep must still be found (by an exact recount
/// once the bound reaches the quota), and concurrent batches at the limit must never store more
/// than the quota, on either backend.
async fn case_quota_counter_bound(store: Store) {
    entity(&store, &num("5550001")).await;
    let quota = 40;
    // Concurrent batches of 7 into one inbox, 98 items for 40 places: exactly 40 stored.
    let tasks: Vec<_> = (0..14u32)
        .map(|t| {
            let store = store.clone();
            tokio::spawn(async move {
                let batch: Vec<_> = (0..7)
                    .map(|k| item(t * 10 + k, &num("5550001"), Some(1), &num("5550002")))
                    .collect();
                store.deposit_batch(&batch, quota).await
            })
        })
        .collect();
    let mut stored = 0;
    for t in tasks {
        for r in t.await.unwrap().unwrap() {
            match r {
                Ok(DepositOutcome::Stored) => stored += 1,
                Err(StoreError::QuotaExceeded) => {}
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    assert_eq!(stored, 40);
    assert_eq!(store.inbox_depth().await.unwrap(), 40);

    // Drain 30 of them: the bound still says 40, yet 30 new items fit and the 31st does not.
    take_oldest(&store, &num("5550001"), 30).await;
    for round in 0..3u32 {
        let batch: Vec<_> = (0..10)
            .map(|k| {
                item(
                    1000 + round * 10 + k,
                    &num("5550001"),
                    Some(1),
                    &num("5550002"),
                )
            })
            .collect();
        let out = store.deposit_batch(&batch, quota).await.unwrap();
        assert!(
            out.iter().all(|r| matches!(r, Ok(DepositOutcome::Stored))),
            "{out:?}"
        );
    }
    assert!(matches!(
        deposit_one(
            &store,
            &item(2000, &num("5550001"), Some(1), &num("5550002")),
            quota
        )
        .await,
        Err(StoreError::QuotaExceeded)
    ));
    // A repeat of a stored item is still AlreadyStored at the limit, not refused.
    assert!(matches!(
        deposit_one(
            &store,
            &item(1000, &num("5550001"), Some(1), &num("5550002")),
            quota
        )
        .await,
        Ok(DepositOutcome::AlreadyStored { .. })
    ));

    // Room freed by the sweep is found too.
    let mut old = item(3000, &num("5550003"), Some(1), &num("5550002"));
    old.expires_at = NOW + 1;
    entity(&store, &num("5550003")).await;
    let out = store
        .deposit_batch(
            &[
                old.clone(),
                item(3001, &num("5550003"), Some(1), &num("5550002")),
            ],
            2,
        )
        .await
        .unwrap();
    assert!(out.iter().all(|r| matches!(r, Ok(DepositOutcome::Stored))));
    store.sweep(NOW + 2).await.unwrap();
    assert!(matches!(
        deposit_one(
            &store,
            &item(3002, &num("5550003"), Some(1), &num("5550002")),
            2
        )
        .await,
        Ok(DepositOutcome::Stored)
    ));
    assert!(matches!(
        deposit_one(
            &store,
            &item(3003, &num("5550003"), Some(1), &num("5550002")),
            2
        )
        .await,
        Err(StoreError::QuotaExceeded)
    ));
}

/// Several deposit batches in flight (migration 0009: each adds to a quota counter slot of its
/// own) beside writers that run alone (a delivery from a peer broker): at the limit exactly
/// the quota is stored, whatever interleaving the batches and the lone writer take, and room
/// freed later is found again. On SQLite the batches still commit one at a time.
async fn case_quota_with_batches_side_by_side(store: Store) {
    entity(&store, &num("5550001")).await;
    let quota = 60;
    let config = BatcherConfig {
        quota_per_device: quota,
        max_in_flight: 4,
        max_batch: 8,
        ..BatcherConfig::default()
    };
    let batcher = DepositBatcher::spawn(store.clone(), config);
    // 40 senders of 3 deposits each through the batcher, and 4 lone batches of 10: 160 items
    // for 60 places.
    let senders: Vec<_> = (0..40u32)
        .map(|t| {
            let batcher = batcher.clone();
            tokio::spawn(async move {
                let mut outcomes = Vec::new();
                for k in 0..3 {
                    let it = item(t * 10 + k, &num("5550001"), Some(1), &num("5550002"));
                    outcomes.push(batcher.deposit(it).await);
                }
                outcomes
            })
        })
        .collect();
    let alone: Vec<_> = (0..4u32)
        .map(|t| {
            let store = store.clone();
            tokio::spawn(async move {
                let batch: Vec<_> = (0..10)
                    .map(|k| item(5000 + t * 10 + k, &num("5550001"), Some(1), &num("5550003")))
                    .collect();
                store.deposit_batch(&batch, quota).await.unwrap()
            })
        })
        .collect();
    let mut outcomes = Vec::new();
    for t in senders {
        outcomes.extend(t.await.unwrap());
    }
    for t in alone {
        outcomes.extend(t.await.unwrap());
    }
    let stored = outcomes
        .iter()
        .filter(|r| matches!(r, Ok(DepositOutcome::Stored)))
        .count();
    let refused = outcomes
        .iter()
        .filter(|r| matches!(r, Err(StoreError::QuotaExceeded)))
        .count();
    assert_eq!((stored, refused), (60, 100), "{outcomes:?}");
    assert_eq!(store.inbox_depth().await.unwrap(), 60);

    // Drain 25: as many fit again through the batches in flight, and not one more.
    take_oldest(&store, &num("5550001"), 25).await;
    let again: Vec<_> = (0..30u32)
        .map(|t| {
            let batcher = batcher.clone();
            tokio::spawn(async move {
                batcher
                    .deposit(item(9000 + t, &num("5550001"), Some(1), &num("5550004")))
                    .await
            })
        })
        .collect();
    let mut stored = 0;
    for t in again {
        match t.await.unwrap() {
            Ok(DepositOutcome::Stored) => stored += 1,
            Err(StoreError::QuotaExceeded) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(stored, 25);
    assert_eq!(store.inbox_depth().await.unwrap(), 60);

    // Far from the quota, batches side by side lose nothing: 30 senders × 10 into another
    // inbox, all stored.
    entity(&store, &num("5550005")).await;
    let big = DepositBatcher::spawn(
        store.clone(),
        BatcherConfig {
            quota_per_device: 10_000,
            ..config
        },
    );
    let senders: Vec<_> = (0..30u32)
        .map(|t| {
            let big = big.clone();
            tokio::spawn(async move {
                for k in 0..10 {
                    let it = item(
                        20_000 + t * 100 + k,
                        &num("5550005"),
                        Some(1),
                        &num("5550002"),
                    );
                    assert!(matches!(big.deposit(it).await, Ok(DepositOutcome::Stored)));
                }
            })
        })
        .collect();
    for t in senders {
        t.await.unwrap();
    }
    assert_eq!(store.inbox_depth().await.unwrap(), 360);
}

// ---------------------------------------------------------------------------------------------
// Number portability (migration 0007)

fn ported_entry(number: &Number, seq: u64, from: &str, to: &str) -> micromsg_store::PortedEntry {
    micromsg_store::PortedEntry {
        number: number.clone(),
        seq,
        from_broker: from.into(),
        to_broker: to.into(),
        time: NOW as u64,
        identity_key: [0x11; 32],
        user_signature: [0x22; 64],
        broker_key: Vec::new(),
        broker_signature: Vec::new(),
    }
}

fn port_request(number: &Number, token: u8, to: &str, now: i64) -> micromsg_store::PortOut {
    micromsg_store::PortOut {
        entry: ported_entry(number, 0, "x", to),
        token_hash: hash(token),
        now,
    }
}

/// The outbox row of a moved item, as the broker would build it (here: key = id, payload =
/// body, enough to check what went where).
fn to_outbox(item: &micromsg_store::WaitingItem) -> ([u8; 16], Vec<u8>) {
    (item.id, item.body.clone())
}

async fn case_port_out_spends_the_token_once(store: Store) {
    let a = num("5550001");
    entity(&store, &a).await;
    store
        .create_port_token(&a, &hash(1), "y", &[0x11; 32], NOW + 600)
        .await
        .unwrap();
    // Unknown token, a token for another broker, another identity key, an expired token:
    // refused, and nothing changes.
    let refused = |r: Result<micromsg_store::PortedAway, StoreError>| match r {
        Err(StoreError::BadPortToken) => {}
        other => panic!("expected BadPortToken, got {other:?}"),
    };
    refused(
        store
            .port_out(&port_request(&a, 9, "y", NOW), &to_outbox)
            .await,
    );
    refused(
        store
            .port_out(&port_request(&a, 1, "z", NOW), &to_outbox)
            .await,
    );
    refused(
        store
            .port_out(&port_request(&a, 1, "y", NOW + 600), &to_outbox)
            .await,
    );
    let mut other_key = port_request(&a, 1, "y", NOW);
    other_key.entry.identity_key = [0x33; 32];
    assert!(matches!(
        store.port_out(&other_key, &to_outbox).await,
        Err(StoreError::InvalidArgument(_))
    ));
    assert_eq!(store.ported_entry(&a).await.unwrap(), None);
    // The right one, once.
    let away = store
        .port_out(&port_request(&a, 1, "y", NOW), &to_outbox)
        .await
        .unwrap();
    assert_eq!(away.seq, 1);
    refused(
        store
            .port_out(&port_request(&a, 1, "y", NOW), &to_outbox)
            .await,
    );
    let held = store.ported_entry(&a).await.unwrap().unwrap();
    assert_eq!((held.seq, held.to_broker.as_str()), (1, "y"));
    // A new token replaces an unused one.
    store
        .create_port_token(&a, &hash(2), "y", &[0x11; 32], NOW + 600)
        .await
        .unwrap();
    store
        .create_port_token(&a, &hash(3), "y", &[0x11; 32], NOW + 600)
        .await
        .unwrap();
    refused(
        store
            .port_out(&port_request(&a, 2, "y", NOW), &to_outbox)
            .await,
    );
    // A later port of the number gets the next seq.
    let away = store
        .port_out(&port_request(&a, 3, "y", NOW), &to_outbox)
        .await
        .unwrap();
    assert_eq!(away.seq, 2);
    // Expired tokens, used or not, are swept; the entry stays.
    store
        .create_port_token(&a, &hash(4), "y", &[0x11; 32], NOW + 600)
        .await
        .unwrap();
    assert_eq!(store.sweep(NOW + 599).await.unwrap().port_tokens, 0);
    // Tokens 1 and 3 (used) and 4 (unused); 2 was replaced by 3 before it was used.
    assert_eq!(store.sweep(NOW + 600).await.unwrap().port_tokens, 3);
    assert_eq!(store.ported_entry(&a).await.unwrap().unwrap().seq, 2);
}

async fn case_port_out_moves_waiting_items_and_hands_over_contacts(store: Store) {
    let (a, b, c) = (num("5550001"), num("5550002"), num("5570003"));
    entity(&store, &a).await;
    entity(&store, &b).await;
    add_devices(&store, &a, 2).await;
    store.add_contact(&a, &b, NOW).await.unwrap();
    store.add_contact(&a, &c, NOW).await.unwrap();
    store.block(&a, &num("5580009"), NOW).await.unwrap();
    // Entity mode: a copy per device of the same message, plus one for b (stays).
    for d in [1, 2] {
        deposit_one(&store, &item(1, &a, Some(d), &b), 100)
            .await
            .unwrap();
    }
    deposit_one(&store, &item(2, &a, Some(1), &c), 100)
        .await
        .unwrap();
    deposit_one(&store, &item(3, &b, Some(1), &a), 100)
        .await
        .unwrap();
    store
        .create_port_token(&a, &hash(1), "y", &[0x11; 32], NOW + 600)
        .await
        .unwrap();
    let away = store
        .port_out(&port_request(&a, 1, "y", NOW), &to_outbox)
        .await
        .unwrap();
    assert_eq!(
        away.moved, 2,
        "one delivery per message, not per device copy"
    );
    let peers: Vec<&str> = away.contacts.iter().map(|c| c.peer.as_str()).collect();
    assert_eq!(peers, ["5550002", "5570003"]);
    assert_eq!(away.blocks, [num("5580009")]);
    // The moved messages are outbox rows for y; a's inbox is empty, b's untouched.
    assert_eq!(
        store.outbox_depth_by_peer().await.unwrap(),
        [("y".to_owned(), 2)]
    );
    let due = store.due_outbox(NOW, 10).await.unwrap();
    let mut bodies: Vec<Vec<u8>> = due.iter().map(|i| i.payload.clone()).collect();
    bodies.sort();
    assert_eq!(bodies, [b"body 1".to_vec(), b"body 2".to_vec()]);
    assert_eq!(store.inbox_count(&a, dev(1), NOW).await.unwrap(), 0);
    assert_eq!(store.inbox_count(&b, dev(1), NOW).await.unwrap(), 1);
}

async fn case_port_in_and_announcements(store: Store) {
    let a = num("5550001");
    let mut entry = ported_entry(&a, 1, "x", "y");
    entry.broker_key = vec![0x44; 32];
    entry.broker_signature = vec![0x55; 64];
    let port = micromsg_store::PortIn {
        entry: entry.clone(),
        device: device(7, None),
        contacts: vec![micromsg_store::ContactRecord {
            owner: a.clone(),
            peer: num("5570003"),
            auto_existing: false,
            brokered: true,
            created_at: NOW - 10,
        }],
        blocks: vec![num("5580009")],
        announce_to: vec!["x".into(), "z".into()],
        now: NOW,
        replaces_leftover: false,
    };
    assert_eq!(store.port_in(&port).await.unwrap(), DeviceId::FIRST);
    assert!(store.entity_exists(&a).await.unwrap());
    let record = store.device(&a, DeviceId::FIRST).await.unwrap().unwrap();
    assert_eq!(record.client_secret, [7; 32]);
    assert!(store.is_contact(&a, &num("5570003")).await.unwrap());
    assert!(store.is_blocked(&a, &num("5580009")).await.unwrap());
    assert_eq!(store.ported_entry(&a).await.unwrap().unwrap(), entry);
    // A second port of the same number here writes nothing.
    assert!(matches!(
        store.port_in(&port).await,
        Err(StoreError::NumberTaken)
    ));
    // One announcement per peer, due now; a failure reschedules, a confirmation removes.
    let due = store.due_port_announcements(NOW, 10).await.unwrap();
    let peers: Vec<&str> = due.iter().map(|(_, p, _)| p.as_str()).collect();
    assert_eq!(peers.len(), 2);
    assert!(peers.contains(&"x") && peers.contains(&"z"));
    store
        .retry_port_announcement(&a, "z", NOW + 30)
        .await
        .unwrap();
    let due = store.due_port_announcements(NOW, 10).await.unwrap();
    assert_eq!(due, [(a.clone(), "x".to_owned(), 0)]);
    let later = store.due_port_announcements(NOW + 30, 10).await.unwrap();
    assert!(later.contains(&(a.clone(), "z".to_owned(), 1)));
    // A confirmation of an older seq does not remove the announcement of a newer one.
    store.complete_port_announcement(&a, "x", 0).await.unwrap();
    store.complete_port_announcement(&a, "x", 1).await.unwrap();
    assert_eq!(
        store.unannounced_by_number().await.unwrap(),
        [("5550001".to_owned(), 1)]
    );
    // The number comes back later (seq 3, after it went on elsewhere): the entity kept from
    // before is replaced, with nothing of it left (device secret, contacts, blocks).
    let back = micromsg_store::PortIn {
        entry: ported_entry(&a, 3, "z", "y"),
        device: device(9, None),
        contacts: Vec::new(),
        blocks: Vec::new(),
        announce_to: vec!["x".into(), "z".into()],
        now: NOW,
        replaces_leftover: true,
    };
    assert_eq!(store.port_in(&back).await.unwrap(), DeviceId::FIRST);
    let record = store.device(&a, DeviceId::FIRST).await.unwrap().unwrap();
    assert_eq!(record.client_secret, [9; 32]);
    assert!(!store.is_contact(&a, &num("5570003")).await.unwrap());
    assert!(!store.is_blocked(&a, &num("5580009")).await.unwrap());
    assert_eq!(store.ported_entry(&a).await.unwrap().unwrap().seq, 3);

    // Thousands of contacts and blocks (several statements of many rows each) all arrive.
    let big = num("5550004");
    let peer = |i: u32| num(&format!("56{i:05}"));
    let contacts: Vec<_> = (0..2500)
        .map(|i| micromsg_store::ContactRecord {
            owner: big.clone(),
            peer: peer(i),
            auto_existing: i % 2 == 0,
            brokered: i % 3 == 0,
            created_at: NOW - i64::from(i),
        })
        .collect();
    let blocks: Vec<_> = (0..1001).map(|i| num(&format!("57{i:05}"))).collect();
    let many = micromsg_store::PortIn {
        entry: ported_entry(&big, 1, "x", "y"),
        device: device(5, None),
        contacts: contacts.clone(),
        blocks: blocks.clone(),
        announce_to: Vec::new(),
        now: NOW,
        replaces_leftover: false,
    };
    assert_eq!(store.port_in(&many).await.unwrap(), DeviceId::FIRST);
    let (handed, blocked) = store.handover_of(&big).await.unwrap();
    let mut expected = contacts;
    expected.sort_by(|x, y| x.peer.as_str().cmp(y.peer.as_str()));
    let mut handed = handed;
    handed.sort_by(|x, y| x.peer.as_str().cmp(y.peer.as_str()));
    assert_eq!(handed, expected);
    let mut blocked = blocked;
    blocked.sort_by(|x, y| x.as_str().cmp(y.as_str()));
    assert_eq!(blocked, blocks);
}

async fn case_ported_entries_by_seq(store: Store) {
    use micromsg_store::PortedOutcome as O;
    let a = num("5550001");
    let first = ported_entry(&a, 1, "x", "y");
    assert_eq!(store.record_ported(&first, NOW).await.unwrap(), O::Recorded);
    // The same port again, now with the gaining broker's signature: kept, signature added.
    let mut signed = first.clone();
    signed.broker_key = vec![1; 32];
    signed.broker_signature = vec![2; 64];
    assert_eq!(
        store.record_ported(&signed, NOW).await.unwrap(),
        O::Unchanged
    );
    assert_eq!(store.ported_entry(&a).await.unwrap().unwrap(), signed);
    assert_eq!(
        store.record_ported(&signed, NOW).await.unwrap(),
        O::Unchanged
    );
    // Another port with the same seq: a conflict, nothing changes.
    let rival = ported_entry(&a, 1, "x", "z");
    assert_eq!(store.record_ported(&rival, NOW).await.unwrap(), O::Conflict);
    assert_eq!(store.ported_entry(&a).await.unwrap().unwrap(), signed);
    // A later port wins; an older one arriving late is stale.
    let second = ported_entry(&a, 2, "y", "z");
    assert_eq!(
        store.record_ported(&second, NOW).await.unwrap(),
        O::Recorded
    );
    assert_eq!(store.record_ported(&signed, NOW).await.unwrap(), O::Stale);
    let all = store.ported_entries().await.unwrap();
    assert_eq!(all, [second]);
}

// Deleting an entity

/// The rows of `table` in the whole store.
async fn rows(store: &Store, table: &str) -> i64 {
    store
        .count_rows(micromsg_store::tables::table(table).unwrap())
        .await
        .unwrap()
}

async fn case_delete_entity(store: Store) {
    let (a, b) = (num("5550001"), num("5550002"));
    entity(&store, &a).await;
    entity(&store, &b).await;
    add_devices(&store, &a, 2).await;
    // A pending ADD-DEVICE secret, a backup, a block, a contact, a setting, a poisoned
    // INITIATE, inbox items in both modes with an acknowledgement: all of A's.
    store
        .create_registration_secret(&a, &hash(9), None, NOW, NOW + 600, 100)
        .await
        .unwrap();
    store.put_backup(&a, 0, 1, b"backup", NOW).await.unwrap();
    store.block(&a, &num("5550009"), NOW).await.unwrap();
    store.add_contact(&a, &b, NOW).await.unwrap();
    store.set_auto_existing(&a, true).await.unwrap();
    store
        .remember_unknown_targets(&[(a.clone(), num("5550008"))], NOW)
        .await
        .unwrap();
    deposit_one(&store, &item(1, &a, None, &b), 100)
        .await
        .unwrap();
    deposit_one(&store, &item(2, &a, Some(1), &b), 100)
        .await
        .unwrap();
    store.ack_inbox(&a, dev(1), &[id(1)], NOW).await.unwrap();
    assert_eq!(
        rows(&store, "inbox_acks").await,
        1,
        "acknowledged by one of two"
    );
    // B's own rows, which name A, stay: B's contact of A and an item from A.
    store.add_contact(&b, &a, NOW).await.unwrap();
    deposit_one(&store, &item(3, &b, None, &a), 100)
        .await
        .unwrap();

    let ended = store.delete_entity(&a, NOW + 5).await.unwrap();
    assert_eq!(
        ended,
        devs(&[1, 2]),
        "the active devices, whose sessions end"
    );

    assert!(!store.entity_exists(&a).await.unwrap());
    assert!(store.device(&a, dev(1)).await.unwrap().is_none());
    assert!(store.get_backup(&a).await.unwrap().is_none());
    assert!(store.number_retired(&a).await.unwrap());
    assert!(!store.number_retired(&b).await.unwrap());
    for (table, left) in [
        ("entities", 1),
        ("devices", 1),
        ("registration_secrets", 0),
        ("key_backups", 0),
        ("blocks", 0),
        ("entity_settings", 0),
        ("poisoned_initiates", 0),
        ("contacts", 1),
        ("inbox_items", 1),
        ("inbox_acks", 0),
        ("retired_numbers", 1),
    ] {
        assert_eq!(rows(&store, table).await, left, "{table} after the delete");
    }
    assert_eq!(
        fetch_all(&store, &b, 1, NOW).await,
        vec![id(3)],
        "B's inbox kept"
    );

    // The number is never handed out again; a second delete finds nothing.
    assert!(matches!(
        store.create_entity(&a, &device(5, None), NOW + 6).await,
        Err(StoreError::NumberTaken)
    ));
    assert!(!store.entity_exists(&a).await.unwrap());
    assert!(matches!(
        store.delete_entity(&a, NOW + 7).await,
        Err(StoreError::NotFound)
    ));
}

async fn case_forwards(store: Store) {
    let (a, caller, blocked) = (num("5550001"), num("5550002"), num("5550003"));
    assert!(matches!(
        store.set_forward(&a, b"notice", NOW, NOW + DAY).await,
        Err(StoreError::NotFound)
    ));
    entity(&store, &a).await;
    assert_eq!(store.forward_for(&a, &caller, NOW).await.unwrap(), None);
    store
        .set_forward(&a, b"first", NOW, NOW + DAY)
        .await
        .unwrap();
    store
        .set_forward(&a, b"notice", NOW, NOW + 2 * DAY)
        .await
        .unwrap(); // replaces
    store.block(&a, &blocked, NOW).await.unwrap();
    let live = Some((b"notice".to_vec(), NOW + 2 * DAY));
    assert_eq!(store.forward_for(&a, &caller, NOW).await.unwrap(), live);
    assert_eq!(store.forward_for(&a, &blocked, NOW).await.unwrap(), None);

    // The delete keeps the forward, and the block list beside it.
    store.delete_entity(&a, NOW + 1).await.unwrap();
    assert_eq!(store.forward_for(&a, &caller, NOW + 1).await.unwrap(), live);
    assert_eq!(
        store.forward_for(&a, &blocked, NOW + 1).await.unwrap(),
        None
    );
    assert_eq!(rows(&store, "blocks").await, 0);
    assert_eq!(rows(&store, "forward_blocks").await, 1);

    // Expired: not answered, then swept with its block list.
    let expiry = NOW + 2 * DAY;
    assert_eq!(store.forward_for(&a, &caller, expiry).await.unwrap(), None);
    let report = store.sweep(expiry - 1).await.unwrap();
    assert_eq!(report.forwards, 0, "not yet expired");
    let report = store.sweep(expiry).await.unwrap();
    assert_eq!(report.forwards, 1);
    assert_eq!(rows(&store, "forwards").await, 0);
    assert_eq!(rows(&store, "forward_blocks").await, 0);
}
