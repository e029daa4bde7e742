//! Number portability inside a network (protocol.md 6.27, 6.28; docs/federation.md 12):
//! three brokers x, y, z in this process, real TLS and mutual-TLS federation, SQLite and
//! Postgres. A on x moves to y keeping the number: the messages waiting for A at x arrive at
//! y, C on z still reaches A at the same number (offline and live), z — down while the entry
//! was announced — learns it when it is back, x refuses A's logins with PORTED, and the
//! refusals (no or a spent token, a statement not signed by the user, a forged or misdirected
//! announcement) change nothing. The last tests run the real `micromsg move --keep-number`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use micromsg_broker::federation::mtls::MtlsConfig;
use micromsg_broker::federation::network::BrokerEntry;
use micromsg_broker::federation::peers::PeerLink;
use micromsg_broker::federation::proto::{PortOutRequest, PortedEntry as ProtoEntry};
use micromsg_client::account::{self, Session};
use micromsg_client::link::BrokerLink;
use micromsg_client::profile::{Profile, ProfileInfo, Secrets};
use micromsg_client::tls::client_config;
use micromsg_crypto::Secret32;
use micromsg_crypto::agreement::EphemeralSecret;
use micromsg_crypto::identity::IdentityKey;
use micromsg_tests::{Backend, TestNetwork, seal_address};
use micromsg_wire::message::event::ContactRequest;
use micromsg_wire::message::request::{
    Answer, ContactAnswerArgs, DepositArgs, InitiateNetworkedArgs, PortInArgs, PortOutArgs,
    TargetArgs,
};
use micromsg_wire::message::response::{InboxMessage, PortInData};
use micromsg_wire::{
    Blob, ErrorCode, Event, Hex16, Hex32, Hex64, Number, Request, ResponseData, port_statement,
};

macro_rules! backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(micromsg_tests::Backend::Sqlite).await })*
        }
        mod postgres {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(micromsg_tests::Backend::Postgres).await })*
        }
    };
}

backends!(
    a_ported_number_keeps_its_messages_and_is_reached_at_its_new_home,
    ports_without_the_users_authorisation_are_refused,
);

const BROKERS: &[(&str, &[&str])] = &[("x", &["555"]), ("y", &["556"]), ("z", &["557"])];
const X: usize = 0;
const Y: usize = 1;
const Z: usize = 2;
const WAIT: Duration = Duration::from_secs(20);
/// A's sealed listening address in the networked contact flows (TEST-NET-2).
const ADDRESS: &str = "198.51.100.7:40100";

async fn network(backend: Backend) -> TestNetwork {
    let net = TestNetwork::start(backend, BROKERS, |_, _| {}).await;
    net.wait_linked().await;
    net
}

async fn user(net: &TestNetwork, broker: usize, name: &str) -> Session {
    let b = net.broker(broker);
    let p = Profile::new(b.profile_dir(name));
    account::register(&p, &b.addr, &b.ca, None).await.unwrap()
}

fn number(s: &Session) -> Number {
    Number::new(s.info.number.clone()).unwrap()
}

fn identity_of(profile: &Profile) -> IdentityKey {
    IdentityKey::from_seed(&profile.secrets().unwrap().identity_seed)
}

/// The next event other than INBOX (deliveries notify whenever they land).
async fn next_event(s: &mut Session) -> Event {
    loop {
        let event = tokio::time::timeout(WAIT, s.link.next_event())
            .await
            .expect("no event in time")
            .unwrap();
        if !matches!(event, Event::Inbox(_)) {
            return event;
        }
    }
}

fn keypair() -> [u8; 32] {
    let sk = Secret32::generate(&mut rand_core::OsRng);
    EphemeralSecret::from_secret(&sk).public_key()
}

/// `caller` asks `target` (at another broker) for a networked contact; `target` accepts.
async fn networked_contact(caller: &mut Session, target: &mut Session, existing: bool) {
    let args = InitiateNetworkedArgs {
        target: number(target),
        pubkey: Hex32::from_bytes(keypair()),
    };
    let request = if existing {
        Request::InitiateExistingNetworked(args)
    } else {
        Request::InitiateNewNetworked(args)
    };
    caller.link.call(request).await.unwrap();
    let asked: ContactRequest = match next_event(target).await {
        Event::ContactRequest(r) => r,
        other => panic!("expected CONTACT-REQUEST, got {other:?}"),
    };
    assert_eq!(asked.from, number(caller));
    let pk_caller = *asked.pubkey.as_ref().unwrap().as_bytes();
    let sk = Secret32::generate(&mut rand_core::OsRng);
    let pk = EphemeralSecret::from_secret(&sk).public_key();
    let sealed = seal_address(&sk, &pk_caller, &[3; 24], ADDRESS);
    target
        .link
        .call(Request::ContactAnswer(ContactAnswerArgs {
            request: asked.request,
            answer: Answer::AcceptNetworked {
                pubkey: Hex32::from_bytes(pk),
                sealed_address: Blob::new(sealed),
            },
        }))
        .await
        .unwrap();
    assert!(matches!(
        next_event(target).await,
        Event::ContactConnecting(_)
    ));
    match next_event(caller).await {
        Event::ContactAccepted(a) => assert_eq!(a.target, number(target)),
        other => panic!("expected CONTACT-ACCEPTED, got {other:?}"),
    }
}

async fn deposit(s: &mut Session, to: &Number, id: [u8; 16], body: &[u8]) {
    let answer = s
        .link
        .call(Request::Deposit(DepositArgs {
            target: to.clone(),
            id: Hex16::from_bytes(id),
            body: Blob::new(body.to_vec()),
        }))
        .await
        .unwrap();
    assert!(matches!(answer, ResponseData::Deposit(_)), "{answer:?}");
}

async fn fetch_until(s: &mut Session, want: usize) -> Vec<InboxMessage> {
    let deadline = Instant::now() + WAIT;
    loop {
        let got = micromsg_tests::fetch_whole_inbox(s).await;
        if got.len() >= want || Instant::now() > deadline {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn port_out(
    s: &mut Session,
    to: &str,
    identity: &IdentityKey,
) -> Result<[u8; 32], micromsg_client::link::LinkError> {
    match s
        .link
        .call(Request::PortOut(PortOutArgs {
            to: to.into(),
            identity_key: Hex32::from_bytes(*identity.public_key().as_bytes()),
        }))
        .await?
    {
        ResponseData::PortOut(d) => Ok(*d.token.as_bytes()),
        other => panic!("{other:?}"),
    }
}

/// PORT-IN at broker `at` for `number` from broker `from`, signed by `signer` now.
async fn port_in(
    net: &TestNetwork,
    at: usize,
    number: &Number,
    from: &str,
    token: [u8; 32],
    signer: &IdentityKey,
    server_secret: &Secret32,
) -> Result<PortInData, micromsg_client::link::LinkError> {
    let time = micromsg_client::account::unix_now();
    port_in_at(net, at, number, from, token, signer, server_secret, time).await
}

/// [`port_in`] with the statement's TIME given.
#[allow(clippy::too_many_arguments)]
async fn port_in_at(
    net: &TestNetwork,
    at: usize,
    number: &Number,
    from: &str,
    token: [u8; 32],
    signer: &IdentityKey,
    server_secret: &Secret32,
    time: u64,
) -> Result<PortInData, micromsg_client::link::LinkError> {
    let b = net.broker(at);
    let tls_name = account::tls_name_of(&b.addr).unwrap();
    let mut link = BrokerLink::connect(&b.addr, &tls_name, client_config(&b.ca).unwrap())
        .await
        .unwrap();
    let to = &net.ids[at];
    let signature = signer.sign(&port_statement(number.as_str(), from, to, time));
    match link
        .call(Request::PortIn(PortInArgs {
            number: number.clone(),
            from: from.into(),
            token: Hex32::from_bytes(token),
            identity_key: Hex32::from_bytes(*signer.public_key().as_bytes()),
            time,
            signature: Hex64::from_bytes(signature),
            server_secret: Hex32::from_bytes(*server_secret.expose()),
        }))
        .await?
    {
        ResponseData::PortIn(d) => Ok(d),
        other => panic!("{other:?}"),
    }
}

/// Points `profile` at broker `at` with the device PORT-IN created, and logs in there.
async fn login_after_port(
    net: &TestNetwork,
    at: usize,
    profile: &Profile,
    data: &PortInData,
    server_secret: Secret32,
) -> Session {
    let b = net.broker(at);
    let old = profile.secrets().unwrap();
    std::fs::copy(&b.ca, profile.path("ca.pem")).unwrap();
    profile
        .write_secrets(&Secrets {
            client_secret: Secret32::from_bytes(*data.client_secret.as_bytes()),
            server_secret,
            identity_seed: old.identity_seed,
        })
        .unwrap();
    let info = profile.info().unwrap();
    profile
        .write_info(&ProfileInfo {
            broker: b.addr.clone(),
            device: data.device.get(),
            nonce_step: data.nonce_step,
            broker_identity: None,
            ..info
        })
        .unwrap();
    account::connect(profile).await.unwrap()
}

/// Broker `i`'s route for `number`, as IS-NETWORKED would answer it.
fn route_at(net: &TestNetwork, i: usize, number: &Number) -> Option<String> {
    let f = net.broker(i).running.broker.federation().unwrap();
    f.route(number.as_str()).map(|r| r.to)
}

async fn wait_route(net: &TestNetwork, i: usize, number: &Number, to: &str) {
    let what = format!("broker {} to route {number} to {to}", net.ids[i]);
    micromsg_tests::wait::eventually(&what, WAIT, async || {
        route_at(net, i, number).as_deref() == Some(to)
    })
    .await;
}

async fn wait_outbox_empty(net: &TestNetwork, i: usize) {
    let store = net.broker(i).running.broker.store();
    micromsg_tests::wait::eventually("the outbox to drain", WAIT, async || {
        store.outbox_depth().await.unwrap() == 0
    })
    .await;
}

async fn is_networked(s: &mut Session, target: &Number) -> Option<String> {
    match s
        .link
        .call(Request::IsNetworked(TargetArgs {
            target: target.clone(),
        }))
        .await
        .unwrap()
    {
        ResponseData::IsNetworked(d) => d.broker,
        other => panic!("{other:?}"),
    }
}

fn message_id(tag: u8, i: u32) -> [u8; 16] {
    let mut id = [tag; 16];
    id[12..].copy_from_slice(&i.to_be_bytes());
    id
}

// ---------------------------------------------------------------------------------------------

async fn a_ported_number_keeps_its_messages_and_is_reached_at_its_new_home(backend: Backend) {
    let mut net = network(backend).await;
    let a_profile = Profile::new(net.broker(X).profile_dir("a"));
    let mut a = user(&net, X, "a").await;
    let mut c = user(&net, Z, "c").await;
    networked_contact(&mut c, &mut a, false).await;
    let a_number = number(&a);
    let c_number = number(&c);

    // Three messages from C wait for A at x.
    for i in 0..3 {
        deposit(
            &mut c,
            &a_number,
            message_id(1, i),
            format!("m{i}").as_bytes(),
        )
        .await;
    }
    wait_outbox_empty(&net, Z).await;
    let x_store = net.broker(X).running.broker.store().clone();
    assert_eq!(x_store.inbox_depth().await.unwrap(), 3);

    // z goes down: it is told of the port when it is back.
    drop(c);
    net.stop_broker(Z).await;

    // The port: x agrees (PORT-OUT, logged in as A), y takes the number (PORT-IN).
    let identity = identity_of(&a_profile);
    let token = port_out(&mut a, "y", &identity).await.unwrap();
    let server_secret = Secret32::generate(&mut rand_core::OsRng);
    let time = micromsg_client::account::unix_now();
    let data = port_in_at(
        &net,
        Y,
        &a_number,
        "x",
        token,
        &identity,
        &server_secret,
        time,
    )
    .await
    .unwrap();
    assert_eq!(data.entity, a_number, "the number is kept");
    assert_eq!(data.seq, 1);
    // The very same request again (its answer lost, say) gets the same answer.
    let repeat = port_in_at(
        &net,
        Y,
        &a_number,
        "x",
        token,
        &identity,
        &server_secret,
        time,
    )
    .await
    .unwrap();
    assert_eq!(repeat, data);

    // x closed A's connection and refuses its logins from now on, saying where it went.
    assert!(matches!(next_event(&mut a).await, Event::DeviceRevoked(_)));
    let err = account::connect(&a_profile).await.unwrap_err();
    let account::AccountError::Link(err) = err else {
        panic!("{err:?}")
    };
    assert_eq!(err.code(), Some(ErrorCode::Ported), "{err}");
    assert!(err.to_string().contains("broker y"), "{err}");

    // The same token with another statement, or another device's secret, is refused (at y:
    // the number is there already; at x: spent).
    let again = port_in_at(
        &net,
        Y,
        &a_number,
        "x",
        token,
        &identity,
        &server_secret,
        time + 1,
    )
    .await
    .unwrap_err();
    assert_eq!(again.code(), Some(ErrorCode::Conflict), "{again}");
    let other_secret = Secret32::generate(&mut rand_core::OsRng);
    let again = port_in_at(
        &net,
        Y,
        &a_number,
        "x",
        token,
        &identity,
        &other_secret,
        time,
    )
    .await
    .unwrap_err();
    assert_eq!(again.code(), Some(ErrorCode::Conflict), "{again}");

    // A logs in at y, same number; what waited at x arrives there (nothing lost).
    let mut a = login_after_port(&net, Y, &a_profile, &data, server_secret).await;
    assert_eq!(number(&a), a_number);
    let got = fetch_until(&mut a, 3).await;
    let mut bodies: Vec<Vec<u8>> = got.iter().map(|m| m.body.as_bytes().to_vec()).collect();
    bodies.sort();
    assert_eq!(bodies, [b"m0".to_vec(), b"m1".to_vec(), b"m2".to_vec()]);
    assert!(got.iter().all(|m| m.from == c_number));
    assert_eq!(x_store.inbox_depth().await.unwrap(), 0, "x kept no copy");
    wait_outbox_empty(&net, X).await;

    // x learnt the entry from y's announcement too (signed by y), and routes A to y.
    assert_eq!(route_at(&net, X, &a_number).as_deref(), Some("y"));
    micromsg_tests::wait::eventually("x to hold y's signed entry", WAIT, async || {
        x_store
            .ported_entry(&a_number)
            .await
            .unwrap()
            .is_some_and(|e| !e.broker_signature.is_empty())
    })
    .await;

    // z comes back and is told; C still reaches A at the same number.
    net.start_broker(Z).await;
    wait_route(&net, Z, &a_number, "y").await;
    let c_profile = Profile::new(net.broker(Z).profile_dir("c"));
    let mut c = account::connect(&c_profile).await.unwrap();
    assert_eq!(is_networked(&mut c, &a_number).await.as_deref(), Some("y"));
    // Offline: a deposit goes to y.
    deposit(&mut c, &a_number, message_id(2, 0), b"after the port").await;
    let got = fetch_until(&mut a, 4).await;
    assert!(
        got.iter().any(|m| m.body.as_bytes() == b"after the port"),
        "{got:?}"
    );
    // And back: A (at y) to C (at z), the contact pair moved with the number.
    deposit(&mut a, &c_number, message_id(3, 0), b"from the new home").await;
    let got = fetch_until(&mut c, 1).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].from, a_number);
    // Live: an existing-contact request from C reaches A at y.
    networked_contact(&mut c, &mut a, true).await;

    // Every broker's status lists the entry.
    for i in [X, Y, Z] {
        let admin = net.broker(i).running.admin_addr.unwrap().to_string();
        let status = micromsg_broker::admin::fetch_status(&admin).await.unwrap();
        let entry = status
            .ported
            .iter()
            .find(|p| p.number == a_number.as_str())
            .unwrap_or_else(|| panic!("{} lists no entry", net.ids[i]));
        assert_eq!(
            (entry.from_broker.as_str(), entry.to_broker.as_str()),
            ("x", "y")
        );
        assert_eq!(entry.seq, 1);
        let text = micromsg_broker::admin::render_text(&status);
        assert!(text.contains("ported numbers"), "{text}");
    }

    // A moves on from y to z: the number's second port (seq 2); every broker follows the
    // newer entry.
    let token = port_out(&mut a, "z", &identity).await.unwrap();
    let secret = Secret32::generate(&mut rand_core::OsRng);
    let second = port_in(&net, Z, &a_number, "y", token, &identity, &secret)
        .await
        .unwrap();
    assert_eq!(second.seq, 2);
    assert_eq!(route_at(&net, Y, &a_number).as_deref(), Some("z"));
    wait_route(&net, X, &a_number, "z").await;

    // The entries are durable: x, restarted, still routes A to z and refuses its logins.
    net.stop_broker(X).await;
    net.start_broker(X).await;
    assert_eq!(route_at(&net, X, &a_number).as_deref(), Some("z"));
    let x = net.broker(X);
    let mut link = BrokerLink::connect(
        &x.addr,
        &account::tls_name_of(&x.addr).unwrap(),
        client_config(&x.ca).unwrap(),
    )
    .await
    .unwrap();
    let refused = link
        .login(
            a_number.as_str(),
            1,
            &Secret32::generate(&mut rand_core::OsRng),
            &Secret32::generate(&mut rand_core::OsRng),
            6,
            micromsg_client::account::unix_now(),
        )
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Some(ErrorCode::Ported), "{refused}");

    // And back to x, which still holds the entity it let go at the first port: that
    // leftover is replaced (seq 3), A logs in at x again and C's broker routes A there.
    let mut a_at_z = login_after_port(&net, Z, &a_profile, &second, secret).await;
    let token = port_out(&mut a_at_z, "x", &identity).await.unwrap();
    let back_secret = Secret32::generate(&mut rand_core::OsRng);
    let back = port_in(&net, X, &a_number, "z", token, &identity, &back_secret)
        .await
        .unwrap();
    assert_eq!(back.seq, 3);
    assert_eq!(back.device.get(), 1);
    wait_route(&net, Y, &a_number, "x").await;
    assert_eq!(route_at(&net, Z, &a_number).as_deref(), Some("x"));
    let mut a_at_x = login_after_port(&net, X, &a_profile, &back, back_secret).await;
    assert_eq!(number(&a_at_x), a_number);
    assert_eq!(
        is_networked(&mut a_at_x, &c_number).await.as_deref(),
        Some("z")
    );
    net.stop().await;
}

async fn ports_without_the_users_authorisation_are_refused(backend: Backend) {
    let net = network(backend).await;
    let a_profile = Profile::new(net.broker(X).profile_dir("a"));
    let mut a = user(&net, X, "a").await;
    let a_number = number(&a);
    let identity = identity_of(&a_profile);
    let secret = Secret32::generate(&mut rand_core::OsRng);

    // No token from x: refused by x, nothing changes.
    let err = port_in(&net, Y, &a_number, "x", [7; 32], &identity, &secret)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::BadToken), "{err}");

    // A token for z does not let y take the number.
    let for_z = port_out(&mut a, "z", &identity).await.unwrap();
    let err = port_in(&net, Y, &a_number, "x", for_z, &identity, &secret)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::BadToken), "{err}");

    // A real token, but the statement signed by someone else's key: x refuses it (the key is
    // not the one A named at PORT-OUT), and the token stays usable.
    let token = port_out(&mut a, "y", &identity).await.unwrap();
    let mallory = IdentityKey::generate(&mut rand_core::OsRng);
    let err = port_in(&net, Y, &a_number, "x", token, &mallory, &secret)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::AuthFailed), "{err}");
    // …and at x as well, when a broker forwards it anyway (y's certificate, mallory's key).
    let (cert, key) = net.issue_cert("y-again", "y", 30);
    let ca = net.dir.path().join("network").join("ca.pem");
    let tls = MtlsConfig::from_files(&ca, &cert, &key).unwrap();
    let x_entry = BrokerEntry {
        id: "x".into(),
        endpoint: net.endpoints[X].clone(),
        prefixes: vec!["555".into()],
    };
    let link = PeerLink::new(x_entry, tls.client, Duration::from_secs(2), 1 << 20);
    let time = micromsg_client::account::unix_now();
    let forged = PortOutRequest {
        number: a_number.as_str().into(),
        token: token.to_vec(),
        identity_key: mallory.public_key().as_bytes().to_vec(),
        time,
        signature: mallory
            .sign(&port_statement(a_number.as_str(), "x", "y", time))
            .to_vec(),
    };
    let status = link.client().port_out(forged).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);

    // A standalone broker and a broker outside the network are refused at PORT-OUT.
    let err = port_out(&mut a, "x", &identity).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::BadArgs));
    let err = port_out(&mut a, "nowhere", &identity).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::BadArgs));

    // Nothing changed: A still lives at x and logs in there.
    assert_eq!(route_at(&net, X, &a_number), None);
    assert_eq!(route_at(&net, Y, &a_number), None);
    drop(a);
    let mut a = account::connect(&a_profile).await.unwrap();

    // The genuine port, with x's first answer lost: x agreed (y called it, as y would), but y
    // never created the entity. y's PORT-IN with the very same statement completes it: x
    // answers the repeat again; any other statement with the spent token is refused.
    let token = port_out(&mut a, "y", &identity).await.unwrap();
    let time = micromsg_client::account::unix_now();
    let statement = |time: u64| PortOutRequest {
        number: a_number.as_str().into(),
        token: token.to_vec(),
        identity_key: identity.public_key().as_bytes().to_vec(),
        time,
        signature: identity
            .sign(&port_statement(a_number.as_str(), "x", "y", time))
            .to_vec(),
    };
    let first = link.client().port_out(statement(time)).await.unwrap();
    assert_eq!(first.get_ref().seq, 1);
    assert_eq!(route_at(&net, X, &a_number).as_deref(), Some("y"));
    assert!(
        !net.broker(Y)
            .running
            .broker
            .store()
            .entity_exists(&a_number)
            .await
            .unwrap()
    );
    let data = port_in_at(&net, Y, &a_number, "x", token, &identity, &secret, time)
        .await
        .unwrap();
    assert_eq!((data.entity.clone(), data.seq), (a_number.clone(), 1));
    let status = link
        .client()
        .port_out(statement(time + 1))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied);

    // Announcements: only the gaining broker may announce, and only with its signature.
    wait_route(&net, Z, &a_number, "y").await;
    let z_store = net.broker(Z).running.broker.store().clone();
    let held = z_store.ported_entry(&a_number).await.unwrap().unwrap();
    let genuine = ProtoEntry {
        number: held.number.as_str().into(),
        seq: held.seq,
        from_broker: held.from_broker.clone(),
        to_broker: held.to_broker.clone(),
        time: held.time,
        identity_key: held.identity_key.to_vec(),
        user_signature: held.user_signature.to_vec(),
        broker_key: held.broker_key.clone(),
        broker_signature: held.broker_signature.clone(),
    };
    let z_entry = BrokerEntry {
        id: "z".into(),
        endpoint: net.endpoints[Z].clone(),
        prefixes: vec!["557".into()],
    };
    // As x (not the entry's to_broker): refused.
    let (xcert, xkey) = net.issue_cert("x-again", "x", 30);
    let as_x = MtlsConfig::from_files(&ca, &xcert, &xkey).unwrap();
    let to_z_as_x = PeerLink::new(
        z_entry.clone(),
        as_x.client,
        Duration::from_secs(2),
        1 << 20,
    );
    let status = to_z_as_x
        .client()
        .ported(genuine.clone())
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    // As y, but moving the number to y a second time with a forged seq 2 signed by another key.
    let tls = MtlsConfig::from_files(&ca, &cert, &key).unwrap();
    let to_z_as_y = PeerLink::new(z_entry, tls.client, Duration::from_secs(2), 1 << 20);
    let mut forged = genuine.clone();
    forged.seq = 2;
    let status = to_z_as_y.client().ported(forged).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    // The genuine entry again: idempotent.
    to_z_as_y.client().ported(genuine).await.unwrap();
    let still = z_store.ported_entry(&a_number).await.unwrap().unwrap();
    assert_eq!(still, held);
    net.stop().await;
}

// ---------------------------------------------------------------------------------------------
// The real client binary: `micromsg move --keep-number`.

fn client_binary() -> PathBuf {
    env!("CARGO_BIN_EXE_micromsg-test-client").into()
}

fn run(profile: &Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(client_binary())
        .arg("--profile")
        .arg(profile)
        .args(args)
        .env_remove("MICROMSG_PROFILE")
        .output()
        .unwrap()
}

/// Runs `micromsg --json move --keep-number` for the profile in `dir`, to `broker`.
async fn move_keep_number(dir: &Path, broker: &micromsg_tests::TestBroker) -> std::process::Output {
    move_keep_number_as(dir, broker, true).await
}

/// Runs `micromsg move --keep-number`, with `--json` or for people.
async fn move_keep_number_as(
    dir: &Path,
    broker: &micromsg_tests::TestBroker,
    json: bool,
) -> std::process::Output {
    let profile = dir.to_owned();
    let (addr, ca) = (broker.addr.clone(), broker.ca.clone());
    tokio::task::spawn_blocking(move || {
        let format: &[&str] = if json { &["--json"] } else { &[] };
        let args = [
            "move",
            "--keep-number",
            "--broker",
            &addr,
            "--ca",
            ca.to_str().unwrap(),
        ];
        run(&profile, &[format, &args].concat())
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn move_keep_number_moves_the_profile_and_keeps_the_number() {
    let net = network(Backend::Sqlite).await;
    let dir = net.broker(X).profile_dir("a");
    let a = user(&net, X, "a").await;
    let a_number = number(&a);
    drop(a);
    let y = net.broker(Y);
    let out = move_keep_number(&dir, y).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(report["number"], a_number.as_str());
    assert_eq!(report["from"], "x");
    assert_eq!(report["to"], "y");
    assert_eq!(report["seq"], 1);

    // The profile now names y, with the same number and identity; it logs in there.
    let p = Profile::new(&dir);
    let info = p.info().unwrap();
    assert_eq!(info.broker, y.addr);
    assert_eq!(info.number, a_number.as_str());
    let session = account::connect(&p).await.unwrap();
    assert_eq!(number(&session), a_number);

    // Running it again is refused (y serves the number already) at its third step, which the
    // human output numbers, and the profile stays.
    let again = move_keep_number_as(&dir, y, false).await;
    assert!(!again.status.success());
    let said = String::from_utf8_lossy(&again.stderr);
    let steps: Vec<&str> = said.lines().filter(|l| l.ends_with('…')).collect();
    assert_eq!(
        steps,
        [
            "1/6 logging in at the old broker…",
            "2/6 fetching everything waiting in the old inbox…",
            "3/6 checking the new broker…",
        ],
        "{said}"
    );
    assert!(said.contains("which serves this number already"), "{said}");
    assert_eq!(p.info().unwrap().broker, y.addr);
    net.stop().await;
}

/// A second device of the entity ports the number: at the new broker it is device 1, the id
/// the old account's first device had. The sessions kept in `keys/` swap labels before the
/// profile names the new id (`store/relabel.rs`), so this device never takes the other
/// device's keys for its own (sealing with them would reuse that device's nonces).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ported_second_device_relabels_the_keys_it_keeps() {
    let net = network(Backend::Sqlite).await;
    let x = net.broker(X);
    let a = user(&net, X, "a").await;
    let first = micromsg_tests::agents::Device {
        profile: Profile::new(x.profile_dir("a")),
        number: number(&a).as_str().to_owned(),
    };
    drop(a);
    let dir = x.profile_dir("a2");
    let linked = micromsg_tests::agents::link_device_at(&x.addr, &x.ca, dir.clone(), &first).await;
    assert_eq!(linked.joined_as, 2);
    let store = micromsg_client::store::Store::new(&linked.device.profile);
    let peer = "5550002";
    store
        .save_shared(&micromsg_tests::agents::kept_session(1, 1, peer, 1))
        .unwrap();
    store
        .save_shared(&micromsg_tests::agents::kept_session(2, 2, peer, 1))
        .unwrap();
    let labels = || -> Vec<(u8, u32)> {
        let mut out: Vec<(u8, u32)> = store
            .shared_sessions()
            .unwrap()
            .iter()
            .filter(|s| s.peer == peer)
            .map(|s| (s.session.session_id[0], s.device))
            .collect();
        out.sort_unstable();
        out
    };
    assert_eq!(labels(), [(1, 1), (2, 2)]);

    let out = move_keep_number(&dir, net.broker(Y)).await;
    assert!(
        out.status.success(),
        "{} {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(Profile::new(&dir).info().unwrap().device, 1);
    assert_eq!(
        labels(),
        [(1, 2), (2, 1)],
        "this device's session is labelled 1 now"
    );
    net.stop().await;
}

/// A port whose process died after it sent PORT-IN (the request staged in `DIR/porting/`, as
/// `micromsg move --keep-number` stages it before sending): the next run sends the very same
/// request again and switches the profile; the number is kept and nothing else is asked of x.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_port_is_finished_by_the_next_run() {
    let net = network(Backend::Sqlite).await;
    let dir = net.broker(X).profile_dir("a");
    let mut a = user(&net, X, "a").await;
    let a_number = number(&a);
    let profile = Profile::new(&dir);
    let identity = identity_of(&profile);
    let y = net.broker(Y);

    // What the first run did before it died: PORT-OUT at x, the request staged and sent (y
    // completed the port; the answer never reached the client).
    let token = port_out(&mut a, "y", &identity).await.unwrap();
    drop(a);
    let time = micromsg_client::account::unix_now();
    let server_secret = Secret32::generate(&mut rand_core::OsRng);
    let request = Request::PortIn(PortInArgs {
        number: a_number.clone(),
        from: "x".into(),
        token: Hex32::from_bytes(token),
        identity_key: Hex32::from_bytes(*identity.public_key().as_bytes()),
        time,
        signature: Hex64::from_bytes(identity.sign(&port_statement(
            a_number.as_str(),
            "x",
            "y",
            time,
        ))),
        server_secret: Hex32::from_bytes(*server_secret.expose()),
    });
    let stage = dir.join("porting");
    std::fs::create_dir_all(&stage).unwrap();
    std::fs::copy(&y.ca, stage.join("ca.pem")).unwrap();
    std::fs::write(stage.join("port-in.yaml"), request.encode(1)).unwrap();
    let target = serde_json::json!({
        "broker": y.addr, "tls_name": account::tls_name_of(&y.addr).unwrap(),
        "broker_identity": "00".repeat(32), "from": "x", "to": "y",
    });
    std::fs::write(stage.join("target.json"), target.to_string()).unwrap();
    port_in_at(
        &net,
        Y,
        &a_number,
        "x",
        token,
        &identity,
        &server_secret,
        time,
    )
    .await
    .unwrap();
    // The profile still names x, which refuses it now.
    assert_eq!(profile.info().unwrap().broker, net.broker(X).addr);

    // The next run finishes it, numbering its steps by what they do (5/6 and 6/6).
    let out = move_keep_number_as(&dir, y, false).await;
    let (stdout, said) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout} {said}");
    assert_eq!(stdout.trim(), a_number.as_str());
    let steps: Vec<&str> = said.lines().filter(|l| l.ends_with('…')).collect();
    assert_eq!(
        steps,
        [
            "5/6 sending the unfinished port's PORT-IN again…",
            "6/6 updating the profile…",
        ],
        "{said}"
    );
    assert!(
        said.contains(&format!(
            "ported: number {} moved from broker x to broker y",
            a_number.as_str()
        )),
        "{said}"
    );
    assert!(!stage.exists(), "the stage is removed");
    assert_eq!(profile.info().unwrap().broker, y.addr);
    let session = account::connect(&profile).await.unwrap();
    assert_eq!(number(&session), a_number);
    net.stop().await;
}
