//! The single-broker core: registration, devices, mutual login, bad input, shutdown.
//! Every scenario runs on both store backends.

use std::collections::HashSet;
use std::sync::Arc;

use micromsg_broker::config::RegistrationPolicy;
use micromsg_client::account::{self, AccountError};
use micromsg_client::link::{BrokerLink, LinkError};
use micromsg_client::profile::Profile;
use micromsg_client::tls::client_config;
use micromsg_crypto::Secret32;
use micromsg_tests::{Backend, TestBroker};
use micromsg_wire::message::request::{DeviceRevokeArgs, RegisterArgs};
use micromsg_wire::{DeviceId, ErrorCode, Event, Hex32, Message, Request, ResponseData};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

micromsg_tests::both_backends!(
    register_login_add_join_list_revoke,
    replayed_login_is_refused,
    broker_with_wrong_server_secret_is_refused,
    thousand_concurrent_registrations_get_distinct_numbers,
    malformed_frames_get_errors_while_another_client_works,
    registration_token_policy,
    shutdown_tells_connected_clients,
);

async fn register_login_add_join_list_revoke(backend: Backend) {
    let broker = TestBroker::start(backend, |_| {}).await;
    let alice = Profile::new(broker.profile_dir("alice"));
    let mut session = account::register(&alice, &broker.addr, &broker.ca, None)
        .await
        .unwrap();
    let number = session.info.number.clone();
    assert_eq!(session.info.device, 1);
    assert!(number.starts_with("555") && number.len() == 10);

    // Secrets are private to the user.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(alice.path("secrets.toml"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    // A second device joins with a one-time secret.
    let secret = micromsg_tests::agents::add_device_secret(&mut session).await;
    let phone = Profile::new(broker.profile_dir("alice-phone"));
    let phone_session = account::join(&phone, &broker.addr, &broker.ca, &number, &secret)
        .await
        .unwrap();
    assert_eq!(phone_session.info.device, 2);
    assert_eq!(phone_session.info.number, number);

    // The secret is single use.
    let again = Profile::new(broker.profile_dir("alice-tablet"));
    let err = account::join(&again, &broker.addr, &broker.ca, &number, &secret)
        .await
        .unwrap_err();
    assert_eq!(link_code(&err), Some(ErrorCode::BadSecret), "{err}");

    // Both devices are listed; the current one is marked.
    let devices = match session.link.call(Request::DeviceList).await.unwrap() {
        ResponseData::DeviceList(d) => d.devices,
        other => panic!("{other:?}"),
    };
    let ids: Vec<u32> = devices.iter().map(|d| d.id.get()).collect();
    assert_eq!(ids, vec![1, 2]);
    assert!(devices[0].current && !devices[1].current);

    // A fresh login of the phone works; revoking it pushes DEVICE-REVOKED and closes it.
    let mut phone_live = account::connect(&phone).await.unwrap();
    session
        .link
        .call(Request::DeviceRevoke(DeviceRevokeArgs {
            device: DeviceId::new(2).unwrap(),
        }))
        .await
        .unwrap();
    match phone_live.link.next_event().await.unwrap() {
        Event::DeviceRevoked(e) => assert_eq!(e.device.get(), 2),
        other => panic!("{other:?}"),
    }
    let err = account::connect(&phone).await.unwrap_err();
    assert_eq!(link_code(&err), Some(ErrorCode::AuthFailed), "{err}");

    // Revoking yourself is refused with a clear error.
    let err = session
        .link
        .call(Request::DeviceRevoke(DeviceRevokeArgs {
            device: DeviceId::new(1).unwrap(),
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::BadArgs));

    // Requests before login are refused.
    let mut anon = raw_link(&broker).await;
    let err = anon.call(Request::DeviceList).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotLoggedIn));
    broker.stop().await;
}

async fn replayed_login_is_refused(backend: Backend) {
    let broker = TestBroker::start(backend, |_| {}).await;
    let alice = Profile::new(broker.profile_dir("alice"));
    drop(
        account::register(&alice, &broker.addr, &broker.ca, None)
            .await
            .unwrap(),
    );
    let info = alice.info().unwrap();
    let secrets = alice.secrets().unwrap();

    // Capture the LOGIN frame a client sends on connection A …
    let mut a = raw_link(&broker).await;
    let now = account::unix_now();
    let (_, nonce) = micromsg_crypto::nonce::compute_now(
        &secrets.client_secret,
        micromsg_crypto::nonce::Direction::ClientToBroker,
        &micromsg_crypto::nonce::NonceContext {
            entity: &info.number,
            device: info.device,
            binding: a.binding(),
        },
        now,
        u64::from(info.nonce_step),
    )
    .unwrap();
    let login = Request::Login(micromsg_wire::message::request::LoginArgs {
        entity: micromsg_wire::Number::new(info.number.clone()).unwrap(),
        device: DeviceId::new(info.device).unwrap(),
        secret: Hex32::from_bytes(nonce),
    });
    // … an attacker replays it on connection B: the nonce is bound to A's TLS session.
    let mut b = raw_link(&broker).await;
    let err = b.call(login.clone()).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::AuthFailed));
    // The genuine client on A still logs in once …
    assert!(matches!(
        a.call(login.clone()).await.unwrap(),
        ResponseData::Login(_)
    ));
    // … and the same frame a second time on A is refused too.
    let err = a.call(login).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::AlreadyLoggedIn));
    // A logged-in connection cannot register or join either (protocol.md 6.0, 6.2, 6.3).
    let register = Request::Register(RegisterArgs {
        token: None,
        server_secret: Hex32::from_bytes([7; 32]),
    });
    let err = a.call(register).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::AlreadyLoggedIn), "REGISTER");
    let join = Request::DeviceJoin(micromsg_wire::message::request::DeviceJoinArgs {
        entity: micromsg_wire::Number::new(info.number.clone()).unwrap(),
        secret: Hex32::from_bytes([8; 32]),
        server_secret: Hex32::from_bytes([9; 32]),
    });
    let err = a.call(join).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::AlreadyLoggedIn), "DEVICE-JOIN");
    broker.stop().await;
}

async fn broker_with_wrong_server_secret_is_refused(backend: Backend) {
    let broker = TestBroker::start(backend, |_| {}).await;
    let alice = Profile::new(broker.profile_dir("alice"));
    drop(
        account::register(&alice, &broker.addr, &broker.ca, None)
            .await
            .unwrap(),
    );
    // The broker knows a different server secret than the one in this profile now: exactly
    // what an impostor holding a stolen client secret would look like.
    let mut secrets = alice.secrets().unwrap();
    secrets.server_secret = Secret32::from_bytes([9; 32]);
    alice.write_secrets(&secrets).unwrap();
    let err = account::connect(&alice).await.unwrap_err();
    assert!(
        matches!(err, AccountError::Link(LinkError::BrokerNotVerified)),
        "{err}"
    );
    broker.stop().await;
}

async fn thousand_concurrent_registrations_get_distinct_numbers(backend: Backend) {
    let broker = TestBroker::start(backend, |c| {
        c.limits.max_connections_per_ip = 2_000;
    })
    .await;
    let tls = client_config(&broker.ca).unwrap();
    let addr = Arc::new(broker.addr.clone());
    let mut tasks = tokio::task::JoinSet::new();
    // 1,000 clients connect and register at the same time, each on its own connection.
    let start = Arc::new(tokio::sync::Barrier::new(1000));
    for _ in 0..1000 {
        let tls = Arc::clone(&tls);
        let addr = Arc::clone(&addr);
        let start = Arc::clone(&start);
        tasks.spawn(async move {
            let mut link = BrokerLink::connect(&addr, "127.0.0.1", tls).await.unwrap();
            start.wait().await;
            let data = link
                .call(Request::Register(RegisterArgs {
                    token: None,
                    server_secret: Hex32::from_bytes([7; 32]),
                }))
                .await
                .unwrap();
            match data {
                ResponseData::Register(d) => d.entity.as_str().to_owned(),
                other => panic!("{other:?}"),
            }
        });
    }
    let mut all = Vec::new();
    while let Some(number) = tasks.join_next().await {
        all.push(number.unwrap());
    }
    assert_eq!(all.len(), 1000);
    let distinct: HashSet<_> = all.iter().collect();
    assert_eq!(distinct.len(), 1000, "numbers must be unique");
    assert_eq!(
        broker.running.broker.store().entity_count().await.unwrap(),
        1000
    );
    broker.stop().await;
}

async fn malformed_frames_get_errors_while_another_client_works(backend: Backend) {
    let broker = TestBroker::start(backend, |_| {}).await;
    let alice = Profile::new(broker.profile_dir("alice"));
    let mut good = account::register(&alice, &broker.addr, &broker.ca, None)
        .await
        .unwrap();

    let mut bad = raw_tls(&broker).await;
    // Each malformed request gets a typed error frame and the connection stays usable.
    let cases: &[(&[u8], ErrorCode)] = &[
        (b"Request: NO-SUCH-THING\nId: 1\n", ErrorCode::UnknownRequest),
        (b"Request: LOGIN\nId: 2\nArgs:\n  ENTITY: \"12\"\n", ErrorCode::BadArgs),
        (b"a: &x [1]\nb: *x\n", ErrorCode::BadYaml),
        (b"\xff\xfe not utf-8", ErrorCode::BadYaml),
        (b"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]", ErrorCode::BadYaml),
    ];
    for (body, code) in cases {
        write_raw(&mut bad, body).await;
        let reply = read_raw(&mut bad).await;
        match reply {
            Message::Response(r) => {
                let e = r.result.unwrap_err();
                assert_eq!(
                    e.error.code,
                    *code,
                    "for {:?}",
                    String::from_utf8_lossy(body)
                );
            }
            other => panic!("{other:?}"),
        }
        // Meanwhile the good client is not disturbed.
        assert!(matches!(
            good.link.call(Request::Ping).await.unwrap(),
            ResponseData::Ping(_)
        ));
    }
    // A framing violation (oversize length) is answered and closes that connection only.
    bad.write_all(&(10_000_000u32).to_be_bytes()).await.unwrap();
    match read_raw(&mut bad).await {
        Message::Response(r) => {
            assert_eq!(r.result.unwrap_err().error.code, ErrorCode::FrameTooLarge)
        }
        other => panic!("{other:?}"),
    }
    let mut rest = Vec::new();
    let n = bad.read_to_end(&mut rest).await.unwrap_or(0);
    assert_eq!(
        n, 0,
        "the connection must be closed after a framing violation"
    );
    assert!(matches!(
        good.link.call(Request::DeviceList).await.unwrap(),
        ResponseData::DeviceList(_)
    ));
    broker.stop().await;
}

async fn registration_token_policy(backend: Backend) {
    let broker = TestBroker::start(backend, |c| {
        c.registration.policy = RegistrationPolicy::Token;
        c.registration.tokens = vec!["let-me-in".into()];
    })
    .await;
    let p = Profile::new(broker.profile_dir("nobody"));
    let err = account::register(&p, &broker.addr, &broker.ca, Some("wrong".into()))
        .await
        .unwrap_err();
    assert_eq!(link_code(&err), Some(ErrorCode::BadToken));
    assert!(
        !p.exists(),
        "a refused registration must not leave a profile"
    );
    let session = account::register(&p, &broker.addr, &broker.ca, Some("let-me-in".into()))
        .await
        .unwrap();
    assert_eq!(session.info.device, 1);
    broker.stop().await;
}

async fn shutdown_tells_connected_clients(backend: Backend) {
    let broker = TestBroker::start(backend, |_| {}).await;
    let alice = Profile::new(broker.profile_dir("alice"));
    let mut session = account::register(&alice, &broker.addr, &broker.ca, None)
        .await
        .unwrap();
    let stop = tokio::spawn(broker.stop());
    match session.link.next_event().await.unwrap() {
        Event::Shutdown(s) => assert!(s.reconnect_after > 0),
        other => panic!("{other:?}"),
    }
    stop.await.unwrap();
}

fn link_code(err: &AccountError) -> Option<ErrorCode> {
    match err {
        AccountError::Link(l) => l.code(),
        _ => None,
    }
}

async fn raw_link(broker: &TestBroker) -> BrokerLink {
    BrokerLink::connect(
        &broker.addr,
        "127.0.0.1",
        client_config(&broker.ca).unwrap(),
    )
    .await
    .unwrap()
}

type RawTls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

async fn raw_tls(broker: &TestBroker) -> RawTls {
    let tcp = tokio::net::TcpStream::connect(&broker.addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    tokio_rustls::TlsConnector::from(client_config(&broker.ca).unwrap())
        .connect(name, tcp)
        .await
        .unwrap()
}

async fn write_raw(stream: &mut RawTls, body: &[u8]) {
    stream
        .write_all(&(body.len() as u32).to_be_bytes())
        .await
        .unwrap();
    stream.write_all(body).await.unwrap();
    stream.flush().await.unwrap();
}

async fn read_raw(stream: &mut RawTls) -> Message {
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).await.unwrap();
    let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
    stream.read_exact(&mut body).await.unwrap();
    Message::decode(&body, &micromsg_wire::Limits::default()).unwrap()
}

/// Server hygiene does not depend on the store, so these run on SQLite only.
mod hygiene {
    use super::*;
    use std::time::{Duration, Instant};

    /// The whole malformed-input corpus of micromsg-wire (`wire/tests/corpus/`, checked there
    /// against the decoder alone), sent to a real broker over TLS: each input is answered with
    /// the typed error its manifest line names, the connection stays usable after every error
    /// that does not close it, and a logged-in client beside it is never disturbed.
    #[tokio::test]
    async fn every_malformed_corpus_input_gets_its_typed_error_from_a_real_broker() {
        let broker = TestBroker::start(Backend::Sqlite, |c| {
            c.limits.requests_per_sec = 100_000;
            c.limits.requests_burst = 100_000;
        })
        .await;
        let alice = Profile::new(broker.profile_dir("alice"));
        let mut good = account::register(&alice, &broker.addr, &broker.ca, None)
            .await
            .unwrap();
        let corpus = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../wire/tests/corpus");
        let manifest = std::fs::read_to_string(corpus.join("expected.txt")).unwrap();
        let mut conn = raw_tls(&broker).await;
        let (mut answered, mut closed_unanswered) = (0, 0);
        for line in manifest
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let [file, kind, code] = line.split('\t').collect::<Vec<_>>()[..] else {
                panic!("bad manifest line {line:?}");
            };
            let bytes = std::fs::read(corpus.join("malformed").join(file)).unwrap();
            match kind {
                // A stream has no end of frame: what follows a frame is the next frame's
                // length, so "trailing bytes" is an error of one-frame decoding only.
                "TrailingBytes" => continue,
                // The stream ends inside the frame: nothing can be answered; the broker closes.
                "Truncated" => {
                    let mut c = raw_tls(&broker).await;
                    c.write_all(&bytes).await.unwrap();
                    c.shutdown().await.unwrap();
                    let mut rest = Vec::new();
                    let read =
                        tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut rest))
                            .await
                            .unwrap_or_else(|_| {
                                panic!("{file}: the broker kept a truncated stream open")
                            });
                    assert!(
                        read.is_err() || rest.is_empty(),
                        "{file}: answered {rest:?}"
                    );
                    closed_unanswered += 1;
                    continue;
                }
                _ => {}
            }
            conn.write_all(&bytes).await.unwrap();
            conn.flush().await.unwrap();
            let reply = tokio::time::timeout(Duration::from_secs(5), read_raw(&mut conn))
                .await
                .unwrap_or_else(|_| panic!("{file}: no answer"));
            let Message::Response(r) = reply else {
                panic!("{file}: answered with {reply:?}");
            };
            let error = r.result.expect_err(file).error;
            // The manifest names what decoding the frame yields; a frame of another kind than a
            // request sent to the broker is refused as such, BAD-YAML (protocol.md 8), before
            // its `Response` name is looked at.
            let body = &bytes[4.min(bytes.len())..];
            let code = if body.starts_with(b"Response:") {
                "BAD-YAML"
            } else {
                code
            };
            assert_eq!(error.code.as_str(), code, "{file} ({kind}): {error:?}");
            answered += 1;
            if matches!(error.code, ErrorCode::FrameTooLarge | ErrorCode::BadFrame) {
                // A framing error closes the connection (section 4.2): start a new one.
                conn = raw_tls(&broker).await;
            }
        }
        assert!(
            answered + closed_unanswered >= 500,
            "{answered} + {closed_unanswered}"
        );
        assert!(matches!(
            good.link.call(Request::DeviceList).await.unwrap(),
            ResponseData::DeviceList(_)
        ));
        broker.stop().await;
    }

    /// A client that writes a whole oversize frame, and only then reads, gets FRAME-TOO-LARGE,
    /// not a connection reset: the broker drains the frame's declared length (up to a bound)
    /// before it closes. Closing with it unread made the kernel reset the connection, so the
    /// client's write failed and it never read the error frame.
    #[tokio::test]
    async fn a_whole_oversize_frame_is_answered_frame_too_large_not_reset() {
        let broker = TestBroker::start(Backend::Sqlite, |_| {}).await;
        for len in [70_000usize, 1_000_000, 8_000_000] {
            let mut tls = raw_tls(&broker).await;
            let mut frame = (len as u32).to_be_bytes().to_vec();
            frame.resize(4 + len, b'x');
            let wrote = tls.write_all(&frame).await;
            assert!(
                wrote.is_ok(),
                "{len} bytes: writing the frame failed: {wrote:?}"
            );
            tls.flush().await.unwrap();
            match read_raw(&mut tls).await {
                Message::Response(r) => {
                    assert_eq!(r.result.unwrap_err().error.code, ErrorCode::FrameTooLarge)
                }
                other => panic!("{other:?}"),
            }
        }
        broker.stop().await;
    }

    /// Reads until the peer closes; returns how long that took.
    async fn closed_within<S: tokio::io::AsyncRead + Unpin>(
        stream: &mut S,
        limit: Duration,
    ) -> Duration {
        let started = Instant::now();
        let mut buf = [0u8; 256];
        loop {
            match tokio::time::timeout(limit, stream.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return started.elapsed(),
                Ok(Ok(_)) => continue,
                Err(_) => panic!("the broker did not close the connection within {limit:?}"),
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn per_ip_connection_limit_closes_extra_connections() {
        let broker =
            TestBroker::start(Backend::Sqlite, |c| c.limits.max_connections_per_ip = 2).await;
        let mut first = raw_link(&broker).await;
        let mut second = raw_link(&broker).await;
        // The third TCP connection from the same address is closed before TLS.
        let mut third = tokio::net::TcpStream::connect(&broker.addr).await.unwrap();
        closed_within(&mut third, Duration::from_secs(5)).await;
        // The first two keep working.
        assert!(matches!(
            first.call(Request::Ping).await.unwrap(),
            ResponseData::Ping(_)
        ));
        assert!(matches!(
            second.call(Request::Ping).await.unwrap(),
            ResponseData::Ping(_)
        ));
        // A slot frees up when one leaves, once the broker has seen it go (until then a new
        // connection is closed before TLS, as the third was).
        drop(first);
        let mut again = micromsg_tests::wait::eventually_some(
            "a connection in the place the first one left",
            Duration::from_secs(10),
            async || {
                let tls = client_config(&broker.ca).unwrap();
                BrokerLink::connect(&broker.addr, "127.0.0.1", tls)
                    .await
                    .ok()
            },
        )
        .await;
        assert!(matches!(
            again.call(Request::Ping).await.unwrap(),
            ResponseData::Ping(_)
        ));
        broker.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn silent_connections_are_closed_by_the_handshake_and_idle_timeouts() {
        let broker = TestBroker::start(Backend::Sqlite, |c| {
            c.limits.handshake_timeout_secs = 1;
            c.limits.idle_timeout_secs = 1;
        })
        .await;
        // No TLS ClientHello at all: closed after the handshake timeout.
        let mut mute = tokio::net::TcpStream::connect(&broker.addr).await.unwrap();
        let took = closed_within(&mut mute, Duration::from_secs(5)).await;
        assert!(took >= Duration::from_millis(900), "{took:?}");
        // TLS done, then silence: closed after the idle timeout; a PING keeps it alive.
        let mut tls = raw_tls(&broker).await;
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_millis(500)).await;
            write_raw(&mut tls, b"Request: PING\nId: 1\n").await;
            assert!(matches!(read_raw(&mut tls).await, Message::Response(_)));
        }
        let took = closed_within(&mut tls, Duration::from_secs(5)).await;
        assert!(took >= Duration::from_millis(900), "{took:?}");
        broker.stop().await;
    }

    /// The `RetryAfter` of a RATE-LIMITED refusal; panics on any other error.
    fn rate_limited_retry_after(err: LinkError) -> Option<u32> {
        match err {
            LinkError::Refused {
                code: ErrorCode::RateLimited,
                retry_after,
                ..
            } => retry_after,
            other => panic!("expected RATE-LIMITED, got {other:?}"),
        }
    }

    /// Past the per-connection burst the broker answers RATE-LIMITED with a short
    /// `RetryAfter`; `BrokerLink::call` waits it out and the request goes through. Sending
    /// past the wait instead (`send`/`answer`) shows the refusal itself.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_short_rate_limit_wait_is_waited_out_by_the_client() {
        let broker = TestBroker::start(Backend::Sqlite, |c| {
            c.limits.requests_per_sec = 2;
            c.limits.requests_burst = 2;
        })
        .await;
        let mut link = raw_link(&broker).await;
        let started = Instant::now();
        for _ in 0..4 {
            let answer = link.call(Request::Ping).await.unwrap();
            assert!(matches!(answer, ResponseData::Ping(_)), "{answer:?}");
        }
        assert!(
            started.elapsed() >= Duration::from_millis(900),
            "the third PING had to wait for a token: {:?}",
            started.elapsed()
        );
        let id = link.send(&Request::Ping).await.unwrap();
        assert_eq!(
            rate_limited_retry_after(link.answer(id).await.unwrap_err()),
            Some(1)
        );
        broker.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn registrations_per_ip_and_login_failures_are_limited() {
        let broker = TestBroker::start(Backend::Sqlite, |c| {
            c.registration.per_ip_per_hour = 2;
            c.auth.max_login_failures = 3;
        })
        .await;
        let mut link = raw_link(&broker).await;
        let register = || {
            Request::Register(RegisterArgs {
                token: None,
                server_secret: Hex32::from_bytes([1; 32]),
            })
        };
        let first = match link.call(register()).await.unwrap() {
            ResponseData::Register(d) => d,
            other => panic!("{other:?}"),
        };
        link.call(register()).await.unwrap();
        let retry_after = rate_limited_retry_after(link.call(register()).await.unwrap_err());
        assert!(retry_after.is_some_and(|s| s > 0));

        // Three wrong nonces lock the entity; then even the right one is refused for a while.
        let bad = |n: u8| {
            Request::Login(micromsg_wire::message::request::LoginArgs {
                entity: first.entity.clone(),
                device: first.device,
                secret: Hex32::from_bytes([n; 32]),
            })
        };
        for n in 0..3 {
            let mut l = raw_link(&broker).await;
            assert_eq!(
                l.call(bad(n)).await.unwrap_err().code(),
                Some(ErrorCode::AuthFailed)
            );
        }
        let mut l = raw_link(&broker).await;
        let secret = Secret32::from_bytes(*first.client_secret.as_bytes());
        let err = l
            .login(
                first.entity.as_str(),
                first.device.get(),
                &secret,
                &Secret32::from_bytes([1; 32]),
                6,
                account::unix_now(),
            )
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::Locked), "{err}");
        broker.stop().await;
    }
}
