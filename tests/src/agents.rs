//! Client agents (what `micromsg listen` runs) for end-to-end tests: a registered device, an
//! agent started for it with test timings, and waiting for its notices.

use std::time::Duration;

use micromsg_client::account;
use micromsg_client::agent::{
    self, AcceptPolicy, AgentConfig, AgentHandle, Command, Notice, Reply,
};
use micromsg_client::inbox::{Arrived, Delivery, LiveTable};
use micromsg_client::profile::Profile;
use micromsg_client::store::Store;
use micromsg_crypto::identity::IdentityKey;
use tokio::sync::mpsc;

use crate::TestBroker;

/// How long [`expect`] waits for a notice.
pub const NOTICE_WAIT: Duration = Duration::from_secs(20);

/// A registered device: its profile directory and its entity's number.
#[derive(Debug, Clone)]
pub struct Device {
    /// The device's profile.
    pub profile: Profile,
    /// The entity's number.
    pub number: String,
}

/// Takes the device's inbox as the agent's fetch does (opened, stored, then acknowledged) and
/// runs nothing after it: what a SIGKILL right after the store leaves behind. Returns what
/// arrived.
pub async fn take_inbox(profile: &Profile) -> Vec<Arrived> {
    let mut session = account::connect(profile).await.unwrap();
    let seed = IdentityKey::from_seed(&profile.secrets().unwrap().identity_seed).seed();
    let mut delivery = Delivery::new(
        Store::new(profile),
        &session.info.number,
        session.info.device,
        seed,
    )
    .unwrap();
    delivery
        .fetch_all(
            &mut session.link,
            &mut LiveTable::new(),
            account::unix_now(),
        )
        .await
        .unwrap()
}

/// Registers a new entity at `broker`, with its profile under the broker's directory.
pub async fn register(broker: &TestBroker, name: &str) -> Device {
    register_at(&broker.addr, &broker.ca, broker.profile_dir(name)).await
}

/// Registers a new entity at the broker listening on `addr` (trusting `ca`), with its
/// profile in `dir`.
pub async fn register_at(addr: &str, ca: &std::path::Path, dir: std::path::PathBuf) -> Device {
    let profile = Profile::new(dir);
    let session = account::register(&profile, addr, ca, None).await.unwrap();
    Device {
        profile,
        number: session.info.number,
    }
}

/// Agent settings for tests: peers on loopback, no control socket, short waits.
pub fn config(accept: AcceptPolicy) -> AgentConfig {
    AgentConfig {
        accept,
        peer_listen: "127.0.0.1:0".parse().unwrap(),
        control: false,
        answer_timeout: Duration::from_secs(5),
        offline_after: Duration::from_secs(2),
        ..AgentConfig::default()
    }
}

/// Starts an agent for `device`; its notices arrive on the receiver.
pub async fn online(device: &Device, config: AgentConfig) -> (AgentHandle, mpsc::Receiver<Notice>) {
    let (tx, rx) = mpsc::channel(1024);
    let handle = agent::start(device.profile.clone(), config, tx)
        .await
        .unwrap();
    (handle, rx)
}

/// The next notice for which `pick` returns something, skipping others; panics after
/// [`NOTICE_WAIT`].
pub async fn expect<T>(
    rx: &mut mpsc::Receiver<Notice>,
    mut pick: impl FnMut(&Notice) -> Option<T>,
) -> T {
    let deadline = tokio::time::Instant::now() + NOTICE_WAIT;
    loop {
        let notice = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .expect("timed out waiting for a notice")
            .expect("the agent stopped");
        if let Some(t) = pick(&notice) {
            return t;
        }
    }
}

/// Asserts that no notice matching `pick` arrives within `within`.
pub async fn expect_none(
    rx: &mut mpsc::Receiver<Notice>,
    within: Duration,
    mut pick: impl FnMut(&Notice) -> bool,
) {
    let deadline = tokio::time::Instant::now() + within;
    while let Ok(Some(notice)) = tokio::time::timeout_at(deadline, rx.recv()).await {
        assert!(!pick(&notice), "unexpected {notice:?}");
    }
}

/// The next message from `from`: its text and whether it came through the inbox.
pub async fn message_from(rx: &mut mpsc::Receiver<Notice>, from: &str) -> (String, bool) {
    expect(rx, |n| match n {
        Notice::Message {
            from: f,
            text,
            offline,
            ..
        } if f == from => Some((text.clone(), *offline)),
        _ => None,
    })
    .await
}

/// Waits for a session with `peer` to start.
pub async fn session_started(rx: &mut mpsc::Receiver<Notice>, peer: &str) {
    expect(rx, |n| {
        matches!(n, Notice::SessionStarted { peer: p, .. } if p == peer).then_some(())
    })
    .await;
}

/// Waits for the session with `peer` to end.
pub async fn session_ended(rx: &mut mpsc::Receiver<Notice>, peer: &str) {
    expect(rx, |n| {
        matches!(n, Notice::SessionEnded { peer: p, .. } if p == peer).then_some(())
    })
    .await;
}

/// Runs a command in an agent and answers as a program sees it: the JSON line of the control
/// socket ([`Reply`]: `ok`, `message`, `data`), so the tests check the documented shapes.
pub trait Ask {
    /// Runs `command`.
    fn ask(&self, command: Command) -> impl std::future::Future<Output = Reply> + Send;
}

impl Ask for AgentHandle {
    async fn ask(&self, command: Command) -> Reply {
        Reply::from(self.command(command).await)
    }
}

/// Seals `payload` as a frame of `kind` with `from`'s latest session with `to` (advancing
/// its stored counter) and DEPOSITs it for `to` over `link`, as an agent's offline send does,
/// but with whatever payload a test forges.
pub async fn deposit_sealed(
    link: &mut micromsg_client::link::BrokerLink,
    from: &Device,
    to: &str,
    kind: micromsg_crypto::message::Kind,
    payload: &[u8],
) {
    use micromsg_wire::message::request::DepositArgs;
    use micromsg_wire::{Blob, Number, Request};

    let store = Store::new(&from.profile);
    let mut stored = store.load_session(to).unwrap().unwrap();
    let envelope = stored
        .seal_offline(account::unix_now(), kind, payload)
        .unwrap();
    store.save_session(to, &stored).unwrap();
    link.call(Request::Deposit(DepositArgs {
        target: Number::new(to).unwrap(),
        id: micromsg_client::inbox::new_message_id(),
        body: Blob::new(envelope),
    }))
    .await
    .unwrap();
}

/// `send TEXT` to `to`.
pub async fn send(agent: &AgentHandle, to: &str, text: &str) -> Reply {
    agent
        .ask(Command::Send {
            number: to.to_owned(),
            text: text.to_owned(),
        })
        .await
}

/// `contact add NUMBER`.
pub async fn contact_add(agent: &AgentHandle, number: &str) -> Reply {
    agent
        .ask(Command::ContactAdd {
            number: number.to_owned(),
            wait_secs: None,
        })
        .await
}

/// What [`link_device`] did.
#[derive(Debug)]
pub struct Linked {
    /// The new device of `old`'s entity.
    pub device: Device,
    /// The device id the old device sent its keys to.
    pub sent_to: u32,
    /// The device id the new device got at DEVICE-JOIN.
    pub joined_as: u32,
    /// What the new device installed from the transfer.
    pub installed: micromsg_client::devices::Installed,
}

/// `device add`'s ADD-DEVICE on `session`: the one-time registration secret for a new device,
/// hex.
pub async fn add_device_secret(session: &mut account::Session) -> String {
    use micromsg_wire::message::request::AddDeviceArgs;
    use micromsg_wire::{Request, ResponseData};
    match session
        .link
        .call(Request::AddDevice(AddDeviceArgs { name: None }))
        .await
        .unwrap()
    {
        ResponseData::AddDevice(d) => d.secret.to_hex(),
        other => panic!("{other:?}"),
    }
}

/// Links a new device `name` to `old`'s entity as `device add` / `device join --transfer-key`
/// do: a one-time secret, the join, and the key transfer from the old device.
pub async fn link_device(broker: &TestBroker, old: &Device, name: &str) -> Linked {
    link_device_at(&broker.addr, &broker.ca, broker.profile_dir(name), old).await
}

/// [`link_device`] for a broker at `addr` whose CA is `ca`, the new profile in `dir`.
pub async fn link_device_at(
    addr: &str,
    ca: &std::path::Path,
    dir: std::path::PathBuf,
    old: &Device,
) -> Linked {
    use micromsg_client::devices;
    let mut session = account::connect(&old.profile).await.unwrap();
    let known = devices::highest_device(&mut session).await.unwrap();
    let secret = add_device_secret(&mut session).await;
    let transfer = devices::new_transfer_key();
    let key = transfer.clone();
    let old_profile = old.profile.clone();
    let sender = tokio::spawn(async move {
        devices::send_link_transfer(
            &mut session,
            &old_profile,
            &key,
            known,
            Duration::from_secs(20),
        )
        .await
        .unwrap()
    });
    let profile = Profile::new(dir);
    let mut new = account::join(&profile, addr, ca, &old.number, &secret)
        .await
        .unwrap();
    let installed =
        devices::receive_link_transfer(&mut new, &profile, &transfer, Duration::from_secs(20))
            .await
            .unwrap();
    Linked {
        sent_to: sender.await.unwrap(),
        joined_as: new.info.device,
        installed,
        device: Device {
            profile,
            number: old.number.clone(),
        },
    }
}

/// A kept session (`keys/`) whose id and keys are all made of `id`, set up `days_ago` days
/// ago by device `device` of the entity, with `peer`.
pub fn kept_session(
    id: u8,
    device: u32,
    peer: &str,
    days_ago: u64,
) -> micromsg_client::keys::SharedSession {
    use micromsg_crypto::handshake::Role;
    use micromsg_crypto::message::DirectionKeys;
    use micromsg_crypto::{Secret32, SessionKeys};
    let keys = SessionKeys {
        session_id: [id; 16],
        send: DirectionKeys {
            ts_key: Secret32::from_bytes([id; 32]),
            seed: Secret32::from_bytes([id ^ 0x55; 32]),
        },
        recv: DirectionKeys {
            ts_key: Secret32::from_bytes([id ^ 0xaa; 32]),
            seed: Secret32::from_bytes([id ^ 0xff; 32]),
        },
    };
    let peer_identity =
        IdentityKey::from_seed(&micromsg_crypto::Secret32::from_bytes([3; 32])).public_key();
    let set_up = account::unix_now() - days_ago * 86_400;
    micromsg_client::keys::SharedSession {
        peer: peer.to_owned(),
        device,
        session: micromsg_client::p2p::StoredSession::new(
            &keys,
            Role::Initiator,
            peer_identity,
            set_up,
        ),
    }
}
