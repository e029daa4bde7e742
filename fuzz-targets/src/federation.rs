//! The federation's receiving side (protocol.md 11): Deliver, Initiate and Accepted calls from a
//! peer broker, as the input makes them (well-formed or not, from the right peer or another,
//! for numbers of any broker's share, repeated), into broker `x` of a two-broker network with
//! a real SQLite store (one per input, on a RAM disk where there is one).
//!
//! Invariants: every call ends in an answer or a typed gRPC status, never a panic; a Deliver
//! answers one result per item, with its key; an item is stored at most once whatever is
//! re-delivered (no inbox holds a message id twice); only a recipient homed at `x` with a
//! contact pair with the sender gets anything.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use micromsg_broker::broker::Broker;
use micromsg_broker::clock::Now;
use micromsg_broker::config::Config;
use micromsg_broker::federation::network::{InitBroker, init_keeping_ca};
use micromsg_broker::federation::proto::{
    AcceptedRequest, DeliverRequest, Delivery, InitiateKind, InitiateRequest,
};
use micromsg_broker::federation::{Federation, contact, outbox};
use micromsg_crypto::Secret32;
use micromsg_crypto::identity::IdentityKey;
use micromsg_store::{NewDevice, Number, Store};

use crate::input::Input;

/// The network file of the test network (made once per process): `x` holds 555, `y` 666.
fn network() -> &'static PathBuf {
    static NET: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &NET.get_or_init(|| {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let specs = [("x", "555", "127.0.0.1:1"), ("y", "666", "127.0.0.1:2")].map(
            |(id, prefix, endpoint)| InitBroker {
                id: id.to_owned(),
                prefixes: vec![prefix.to_owned()],
                endpoint: endpoint.to_owned(),
            },
        );
        let (report, _ca) =
            init_keeping_ca(&dir.path().join("network"), "fuzz-net", &specs).expect("a network");
        (dir, report.network_file)
    })
    .1
}

const LOCAL: [&str; 2] = ["5550000001", "5550000002"];
const REMOTE: [&str; 2] = ["6660000001", "6660000002"];
const ELSEWHERE: &str = "7770000001";

fn number(input: &mut Input<'_>) -> String {
    match input.below(6) {
        0 | 1 => LOCAL[input.below(2)].to_owned(),
        2 | 3 => REMOTE[input.below(2)].to_owned(),
        4 => ELSEWHERE.to_owned(),
        _ => String::from_utf8_lossy(&input.bytes(20)).into_owned(),
    }
}

fn bytes16(input: &mut Input<'_>) -> Vec<u8> {
    match input.below(8) {
        0 => input.bytes(40),
        _ => vec![input.below(4) as u8; 16],
    }
}

/// The target.
pub fn run(data: &[u8]) {
    crate::login::runtime().block_on(drive(data));
}

async fn drive(data: &[u8]) {
    let mut input = Input::new(data);
    let dir = crate::login::scratch_dir();
    let store = Store::open_sqlite_with(dir.path().join("fuzz.db"), 1)
        .await
        .expect("a store");
    let mut config = Config::default();
    config.server.broker_id = "x".into();
    config.federation.network_file = Some(network().clone());
    config.numbers.prefixes = vec!["555".into()];
    let federation = Federation::load(&config.federation, "x")
        .expect("the network loads")
        .expect("x is networked");
    for n in LOCAL {
        let device = NewDevice {
            client_secret: [1; 32],
            server_secret: [2; 32],
            name: None,
        };
        store
            .create_entity(&Number::new(n.to_owned()).expect("a number"), &device, 0)
            .await
            .expect("an entity");
    }
    // Contact pairs: the first local number with both remote ones (kept on its home broker).
    for r in REMOTE {
        let (l, r) = (
            Number::new(LOCAL[0].to_owned()).expect("a number"),
            Number::new(r.to_owned()).expect("a number"),
        );
        store.add_contact(&l, &r, 0).await.expect("a contact");
    }
    let broker = Arc::new(Broker::with_federation(
        config,
        store,
        IdentityKey::from_seed(&Secret32::from_bytes([9; 32])),
        Some(federation),
    ));
    let f = broker.federation().expect("networked");
    let now = Now::read();
    let mut steps = 0;
    while !input.is_empty() && steps < 32 {
        steps += 1;
        let peer = if input.below(8) == 0 { "z" } else { "y" };
        match input.below(3) {
            0 => {
                let count = input.below(5);
                let items: Vec<Delivery> = (0..count)
                    .map(|_| Delivery {
                        idempotency_key: bytes16(&mut input),
                        message_id: bytes16(&mut input),
                        sender: number(&mut input),
                        sender_device: u32::from(input.byte() % 3),
                        recipient: number(&mut input),
                        created_at: now.unix,
                        expires_at: now.unix + u64::from(input.u16()),
                        body: input.bytes(100),
                        moved: input.byte().is_multiple_of(4),
                    })
                    .collect();
                let keys: Vec<Vec<u8>> = items.iter().map(|i| i.idempotency_key.clone()).collect();
                if let Ok(results) = outbox::receive(&broker, peer, DeliverRequest { items }).await
                {
                    assert_eq!(results.len(), keys.len(), "one result per item");
                    for (result, key) in results.iter().zip(&keys) {
                        assert_eq!(&result.idempotency_key, key, "results in item order");
                    }
                }
            }
            1 => {
                let call = InitiateRequest {
                    request: bytes16(&mut input),
                    caller: number(&mut input),
                    target: number(&mut input),
                    kind: i32::from(input.byte() % 4),
                    caller_pubkey: input.bytes(40),
                };
                let _ = contact::receive_initiate(broker.router(), f, peer, call, now);
            }
            _ => {
                let call = AcceptedRequest {
                    request: bytes16(&mut input),
                    caller: number(&mut input),
                    target: number(&mut input),
                    target_pubkey: input.bytes(40),
                    sealed_address: input.bytes(80),
                    token: input.bytes(40),
                    relay: input.bytes(20),
                };
                let _ = contact::receive_accepted(broker.router(), f, peer, call, now).await;
            }
        }
        let _ = InitiateKind::New;
    }
    // No message stored twice, and only for the local number with contact pairs.
    for (i, n) in LOCAL.iter().enumerate() {
        let n = Number::new((*n).to_owned()).expect("a number");
        let (items, _) = broker
            .store()
            .fetch_inbox(
                &n,
                micromsg_store::DeviceId::new(1).expect("device 1"),
                None,
                1_000,
                0,
            )
            .await
            .expect("an inbox");
        let mut ids = HashSet::new();
        for item in &items {
            assert!(ids.insert(item.id), "a message stored twice in {n}'s inbox");
            assert!(
                REMOTE.contains(&item.sender_number.as_str()),
                "a delivery from {} (not a peer's number with a contact pair) was stored",
                item.sender_number.as_str()
            );
        }
        if i == 1 {
            assert!(
                items.is_empty(),
                "a number with no contact pair got a delivery"
            );
        }
    }
    broker.store().close().await;
}
