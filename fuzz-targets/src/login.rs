//! The login sequence against the broker's request handlers on a real SQLite store (one per
//! input, on a RAM disk where there is one): REGISTER, LOGIN with a right, altered, stale or
//! replayed nonce, ADD-DEVICE, DEVICE-JOIN with a right or altered secret, DEVICE-REVOKE,
//! LOGOUT, and time passing, on a few connections from a few addresses, in the order the input
//! gives.
//!
//! Invariants: a LOGIN succeeds only with the nonce of an active device of that entity for
//! that connection, used once; a DEVICE-JOIN only with an unspent secret the entity handed out;
//! a revoked device never logs in again; every refusal is a typed error; nothing panics.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use micromsg_broker::broker::Broker;
use micromsg_broker::clock::Now;
use micromsg_broker::config::Config;
use micromsg_broker::handlers::{self, Authenticated, Login, Public, PublicOutcome, Session};
use micromsg_crypto::Secret32;
use micromsg_crypto::identity::IdentityKey;
use micromsg_crypto::nonce::{self, Direction, NonceContext};
use micromsg_store::Store;
use micromsg_wire::message::request::{
    AddDeviceArgs, DeviceJoinArgs, DeviceRevokeArgs, LoginArgs, RegisterArgs,
};
use micromsg_wire::{DeviceId, ErrorCode, Hex32, Number, ResponseData};

use crate::input::Input;

/// A device the input has made: its number, id and secrets, and whether it was revoked.
#[derive(Clone)]
struct Device {
    number: Number,
    device: DeviceId,
    client_secret: [u8; 32],
    revoked: bool,
}

/// A connection: its session and, once logged in, the login.
struct Conn {
    session: Session,
    login: Option<Login>,
}

/// One current-thread runtime per process, for the targets that drive async code.
pub fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime")
    })
}

/// A fresh directory for one input's store: on the RAM disk where there is one.
pub fn scratch_dir() -> tempfile::TempDir {
    let ram = std::path::Path::new("/dev/shm");
    if ram.is_dir() {
        tempfile::tempdir_in(ram)
    } else {
        tempfile::tempdir()
    }
    .expect("a temporary directory")
}

/// The target.
pub fn run(data: &[u8]) {
    runtime().block_on(drive(data));
}

async fn drive(data: &[u8]) {
    let mut input = Input::new(data);
    let dir = scratch_dir();
    let store = Store::open_sqlite_with(dir.path().join("fuzz.db"), 1)
        .await
        .expect("a store");
    let mut config = Config::default();
    config.auth.max_login_failures = 4;
    config.auth.max_failures_per_source = 8;
    config.limits.max_devices = 4;
    let broker = Arc::new(Broker::new(
        config,
        store,
        IdentityKey::from_seed(&Secret32::from_bytes([9; 32])),
    ));
    let mut now = Now::read();
    let (queue, _events) = micromsg_broker::event_queue::channel(1024);
    let mut conns: Vec<Conn> = (0..4u8)
        .map(|i| Conn {
            session: Session {
                conn_id: u64::from(i),
                peer: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1 + i % 2)), 4000),
                binding: [i; 32],
                queue: queue.clone(),
            },
            login: None,
        })
        .collect();
    let mut devices: Vec<Device> = Vec::new();
    let mut secrets: Vec<(Number, [u8; 32])> = Vec::new();
    let mut spent: HashSet<[u8; 32]> = HashSet::new();
    let mut used_nonces: HashSet<[u8; 32]> = HashSet::new();
    let mut steps = 0;
    while !input.is_empty() && steps < 64 {
        steps += 1;
        let c = input.below(conns.len());
        match input.below(7) {
            0 => {
                let request = Public::Register(RegisterArgs {
                    token: None,
                    server_secret: Hex32::from_bytes(input.array()),
                });
                let conn = &mut conns[c];
                match handlers::public(&broker, &conn.session, request, now).await {
                    Ok(PublicOutcome::Answer(ResponseData::Register(d))) => {
                        devices.push(Device {
                            number: d.entity,
                            device: d.device,
                            client_secret: *d.client_secret.as_bytes(),
                            revoked: false,
                        });
                    }
                    Ok(other) => panic!("REGISTER answered {other:?}"),
                    Err(_) => {}
                }
            }
            1 if !devices.is_empty() => {
                let d = devices[input.below(devices.len())].clone();
                let conn = &mut conns[c];
                let ctx = NonceContext {
                    entity: d.number.as_str(),
                    device: d.device.get(),
                    binding: &conn.session.binding,
                };
                let step = now.unix / 6;
                let (presented, genuine_step) = match input.below(4) {
                    // The right nonce, for this step or one outside the window.
                    0 | 1 => (step, true),
                    2 => (step.saturating_sub(5), false),
                    _ => (step, false),
                };
                let Ok(nonce) = nonce::compute(
                    &Secret32::from_bytes(d.client_secret),
                    Direction::ClientToBroker,
                    &ctx,
                    presented,
                ) else {
                    continue;
                };
                let mut bytes = nonce;
                let altered = !genuine_step && presented == step;
                if altered {
                    bytes[input.below(32)] ^= 1 << input.below(8);
                }
                let request = Public::Login(LoginArgs {
                    entity: d.number.clone(),
                    device: d.device,
                    secret: Hex32::from_bytes(bytes),
                });
                let result = if conn.login.is_some() {
                    // A logged-in connection never logs in again (the connection refuses it).
                    continue;
                } else {
                    handlers::public(&broker, &conn.session, request, now).await
                };
                match result {
                    Ok(PublicOutcome::LoggedIn(_, login)) => {
                        assert!(genuine_step, "an altered or stale nonce logged in");
                        assert!(!d.revoked, "a revoked device logged in");
                        assert!(used_nonces.insert(bytes), "a nonce logged in twice");
                        assert_eq!(login.number, d.number);
                        conn.login = Some(login);
                    }
                    Ok(other) => panic!("LOGIN answered {other:?}"),
                    Err(refusal) => assert!(
                        matches!(
                            refusal.0.code,
                            ErrorCode::AuthFailed | ErrorCode::Locked | ErrorCode::RateLimited
                        ),
                        "LOGIN refused with {refusal:?}"
                    ),
                }
            }
            2 => {
                let conn = &mut conns[c];
                let Some(login) = &conn.login else { continue };
                let request = Authenticated::AddDevice(AddDeviceArgs { name: None });
                if let Ok(ResponseData::AddDevice(d)) =
                    handlers::authenticated(&broker, &conn.session, login, request, now).await
                {
                    secrets.push((login.number.clone(), *d.secret.as_bytes()));
                }
            }
            3 if !secrets.is_empty() => {
                let (number, mut secret) = secrets[input.below(secrets.len())].clone();
                let altered = input.below(4) == 0;
                if altered {
                    secret[input.below(32)] ^= 1 << input.below(8);
                }
                let conn = &mut conns[c];
                if conn.login.is_some() {
                    continue;
                }
                let request = Public::DeviceJoin(DeviceJoinArgs {
                    entity: number.clone(),
                    secret: Hex32::from_bytes(secret),
                    server_secret: Hex32::from_bytes(input.array()),
                });
                match handlers::public(&broker, &conn.session, request, now).await {
                    Ok(PublicOutcome::Answer(ResponseData::DeviceJoin(d))) => {
                        assert!(!altered, "an altered registration secret joined");
                        assert!(spent.insert(secret), "a registration secret was used twice");
                        devices.push(Device {
                            number,
                            device: d.device,
                            client_secret: *d.client_secret.as_bytes(),
                            revoked: false,
                        });
                    }
                    Ok(other) => panic!("DEVICE-JOIN answered {other:?}"),
                    Err(refusal) => assert!(
                        matches!(
                            refusal.0.code,
                            ErrorCode::BadSecret | ErrorCode::RateLimited | ErrorCode::DeviceLimit
                        ),
                        "DEVICE-JOIN refused with {refusal:?}"
                    ),
                }
            }
            4 if !devices.is_empty() => {
                let conn = &mut conns[c];
                let Some(login) = &conn.login else { continue };
                let target = input.below(devices.len());
                if devices[target].number != login.number {
                    continue;
                }
                let request = Authenticated::DeviceRevoke(DeviceRevokeArgs {
                    device: devices[target].device,
                });
                if let Ok(ResponseData::DeviceRevoke) =
                    handlers::authenticated(&broker, &conn.session, login, request, now).await
                {
                    devices[target].revoked = true;
                }
            }
            5 => {
                let conn = &mut conns[c];
                if let Some(login) = conn.login.take() {
                    let _ = handlers::authenticated(
                        &broker,
                        &conn.session,
                        &login,
                        Authenticated::Logout,
                        now,
                    )
                    .await;
                }
            }
            _ => {
                let secs = u64::from(input.byte()) * 4;
                now.unix += secs;
                now.instant += Duration::from_secs(secs);
            }
        }
    }
    broker.store().close().await;
}
