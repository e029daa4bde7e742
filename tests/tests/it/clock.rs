//! A device whose clock is off the broker's by more than the login window (protocol 9.3):
//! the real broker binary runs with its wall clock moved back two minutes by an `LD_PRELOAD`
//! shim (built here with the C compiler), as a broker on another host with another clock
//! would be. The client reads the broker's clock after the refused LOGIN, logs in at the
//! broker's time and says so; a device refused at the broker's time is told what that means.
//! The same check follows an operator who changes the broker's nonce step.

use std::path::{Path, PathBuf};

use micromsg_client::account;
use micromsg_client::agent::{AcceptPolicy, Notice};
use micromsg_tests::agents::{self, expect};
use micromsg_wire::message::request::DeviceRevokeArgs;
use micromsg_wire::{DeviceId, Request};

use crate::process::BrokerProcess;

/// How far the broker's clock is moved: back, so that the certificates it makes at its first
/// start are already valid by the test's clock.
const SHIFT_SECS: i64 = -120;

/// A shared object that moves `CLOCK_REALTIME` (what `SystemTime::now` reads) by the
/// `MICROMSG_TEST_SHIFT_SECS` seconds of the process's environment.
const SHIM: &str = r#"
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdlib.h>
#include <time.h>

int clock_gettime(clockid_t id, struct timespec *ts) {
    static int (*real)(clockid_t, struct timespec *);
    if (!real) real = (int (*)(clockid_t, struct timespec *))dlsym(RTLD_NEXT, "clock_gettime");
    int result = real(id, ts);
    const char *shift = getenv("MICROMSG_TEST_SHIFT_SECS");
    if (result == 0 && shift && (id == CLOCK_REALTIME || id == CLOCK_REALTIME_COARSE))
        ts->tv_sec += atol(shift);
    return result;
}
"#;

/// Builds [`SHIM`] into `dir`; panics (loudly: the test cannot run without it) when the C
/// compiler is missing or fails.
fn build_shim(dir: &Path) -> PathBuf {
    let source = dir.join("shift.c");
    let object = dir.join("shift.so");
    std::fs::write(&source, SHIM).unwrap();
    let out = std::process::Command::new("cc")
        .args(["-shared", "-fPIC", "-O2", "-o"])
        .arg(&object)
        .arg(&source)
        .arg("-ldl")
        .output()
        .expect("this test needs a C compiler (`cc`) to move the broker's clock");
    assert!(
        out.status.success(),
        "building the clock shim failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    object
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_whose_clock_is_off_logs_in_at_the_brokers_time_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let shim = build_shim(dir.path());
    let shift = SHIFT_SECS.to_string();
    let broker = BrokerProcess::start_with_env(
        dir.path(),
        "",
        &[
            ("LD_PRELOAD", shim.to_str().unwrap()),
            ("MICROMSG_TEST_SHIFT_SECS", &shift),
        ],
    )
    .await;
    // The broker's BROKER-INFO says a clock two minutes behind the test's; the profile keeps
    // the difference, and a later login starts from it.
    let a = agents::register_at(&broker.addr, &broker.ca, dir.path().join("a")).await;
    let kept = std::fs::read_to_string(a.profile.path("clock-offset.json"))
        .expect("the learned difference is kept in the profile");
    assert!(kept.contains(&broker.addr), "{kept}");
    let mut session = account::connect(&a.profile).await.unwrap();
    let offset = session.clock_offset;
    assert!(
        (SHIFT_SECS - 2..=SHIFT_SECS + 2).contains(&offset),
        "logged in at an offset of {offset} s"
    );
    assert!(session.link.call(Request::Ping).await.is_ok());

    // The agent says so, with the difference.
    let (agent, mut rx) = agents::online(&a, agents::config(AcceptPolicy::Any)).await;
    let warning = expect(&mut rx, |n| match n {
        Notice::Warning { message } if message.contains("clock") => Some(message.clone()),
        _ => None,
    })
    .await;
    assert!(warning.contains("this device's clock is off"), "{warning}");
    assert!(warning.contains("s behind it;"), "{warning}");
    agent.stop().await.unwrap();

    // A revoked device is told what the refusal means: at the broker's time it learned, the
    // clock is ruled out; without it, it is refused at the broker's time too, and says so.
    let linked = agents::link_device_at(&broker.addr, &broker.ca, dir.path().join("a2"), &a).await;
    let revoked = DeviceId::new(linked.joined_as).unwrap();
    let mut session = account::connect(&a.profile).await.unwrap();
    session
        .link
        .call(Request::DeviceRevoke(DeviceRevokeArgs { device: revoked }))
        .await
        .unwrap();
    let refused = account::connect(&linked.device.profile).await.unwrap_err();
    let text = refused.to_string();
    assert!(text.contains("AUTH-FAILED"), "{text}");
    assert!(text.contains("this device was revoked"), "{text}");
    assert!(!text.contains("broker's time too"), "{text}");
    std::fs::remove_file(linked.device.profile.path("clock-offset.json")).unwrap();
    let text = account::connect(&linked.device.profile)
        .await
        .unwrap_err()
        .to_string();
    assert!(text.contains("this device was revoked"), "{text}");
    assert!(
        text.contains("refused at the broker's time too, 12"),
        "{text}"
    );
    assert!(text.contains("s behind this device's)"), "{text}");
}

/// An operator changes `auth.nonce_step_secs` after devices registered: each device's next
/// LOGIN, proved with the step its profile kept, is refused; the client reads the new step
/// from BROKER-INFO, logs in with it and keeps it, so the logins after it go through at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_nonce_step_is_learned_at_the_next_login() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = BrokerProcess::start(dir.path(), "").await;
    let a = agents::register_at(&broker.addr, &broker.ca, dir.path().join("a")).await;
    assert_eq!(a.profile.info().unwrap().nonce_step, 6);

    broker.terminate().await;
    broker.set_env("MICROMSG_AUTH_NONCE_STEP_SECS", "30");
    broker.restart().await;

    // BROKER-INFO is taken only from the broker the profile pinned: with another key pinned,
    // the refusal says so and nothing is learned.
    let info = a.profile.info().unwrap();
    let pinned = info
        .broker_identity
        .clone()
        .expect("pinned at registration");
    let mut other = info.clone();
    other.broker_identity = Some("ab".repeat(32));
    a.profile.write_info(&other).unwrap();
    let text = account::connect(&a.profile).await.unwrap_err().to_string();
    assert!(text.contains("identity key changed"), "{text}");
    assert_eq!(a.profile.info().unwrap().nonce_step, 6);
    a.profile.write_info(&info).unwrap();
    assert_eq!(a.profile.info().unwrap().broker_identity, Some(pinned));

    let mut session = account::connect(&a.profile).await.unwrap();
    assert_eq!(session.info.nonce_step, 30);
    assert_eq!(session.clock_offset, 0, "the clocks agree");
    assert!(session.link.call(Request::Ping).await.is_ok());
    assert_eq!(
        a.profile.info().unwrap().nonce_step,
        30,
        "kept in the profile"
    );
    assert!(
        !a.profile.path("clock-offset.json").exists(),
        "the step, not the clock, was the cause"
    );
    let again = account::connect(&a.profile).await.unwrap();
    assert_eq!(again.info.nonce_step, 30);
}

/// What the fake broker of [`after_a_refused_login`] does with the BROKER-INFO that follows the
/// LOGIN it refuses.
#[derive(Clone, Copy)]
enum BrokerInfoAnswer {
    /// A response that does not decode (as one with an unknown `NONCE-ALGORITHM` would not).
    Undecodable,
    /// The connection closes before the answer.
    Close,
    /// Refused with RATE-LIMITED, retry after 5 s.
    RateLimited,
    /// Refused with INTERNAL: the broker's clock cannot be read.
    Internal,
}

/// `account::connect` against a broker that refuses every LOGIN and answers the BROKER-INFO
/// after it with `answer`: a real TLS server with the real broker's certificate (the profile
/// was registered there), speaking the protocol's frames, so that each way the clock check can
/// go wrong can be made to happen.
async fn after_a_refused_login(answer: BrokerInfoAnswer) -> account::AccountError {
    use micromsg_wire::io::{FrameReader, write_frame};
    use micromsg_wire::{ErrorBody, ErrorCode, Limits, RequestKind, Response, decode_request};

    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path(), "").await;
    let a = agents::register_at(&broker.addr, &broker.ca, dir.path().join("a")).await;
    let tls = broker.data_dir().join("tls");
    let config = micromsg_broker::tls::server_config(&micromsg_broker::tls::TlsFiles {
        cert: tls.join("server.pem"),
        key: tls.join("server.key"),
        ca: None,
    })
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let fake = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let stream = tokio_rustls::TlsAcceptor::from(config)
            .accept(tcp)
            .await
            .unwrap();
        let (read, mut write) = tokio::io::split(stream);
        let mut reader = FrameReader::new(read, 1 << 16);
        while let Ok(Some(body)) = reader.next_frame().await {
            let (id, request) = decode_request(&body, &Limits::default()).unwrap();
            let reply = match (request.kind(), answer) {
                (RequestKind::Login, _) => Response::error(
                    id,
                    Some(RequestKind::Login),
                    ErrorBody::new(ErrorCode::AuthFailed, "refused"),
                )
                .encode(),
                (RequestKind::BrokerInfo, BrokerInfoAnswer::Undecodable) => {
                    format!("Response: BROKER-INFO\nId: {id}\nStatus: OK\nData:\n  Bogus: 1\n")
                        .into_bytes()
                }
                (RequestKind::BrokerInfo, BrokerInfoAnswer::Close) => return,
                (RequestKind::BrokerInfo, BrokerInfoAnswer::RateLimited) => Response::error(
                    id,
                    Some(RequestKind::BrokerInfo),
                    ErrorBody::new(ErrorCode::RateLimited, "slow down").retry_after(5),
                )
                .encode(),
                (RequestKind::BrokerInfo, BrokerInfoAnswer::Internal) => Response::error(
                    id,
                    Some(RequestKind::BrokerInfo),
                    ErrorBody::new(ErrorCode::Internal, "store unavailable"),
                )
                .encode(),
                (other, _) => panic!("the client sent {other:?}"),
            };
            write_frame(&mut write, &reply).await.unwrap();
        }
    });
    let mut info = a.profile.info().unwrap();
    info.broker = fake.to_string();
    a.profile.write_info(&info).unwrap();
    let refused = account::connect(&a.profile).await.unwrap_err();
    server.abort();
    assert_eq!(a.profile.info().unwrap().nonce_step, 6, "nothing learned");
    refused
}

/// After a refused LOGIN, a BROKER-INFO that does not decode is refused as one that does not
/// verify (an agent stops: retrying would only add refused LOGINs towards a lockout); a lost
/// connection is an outage (an agent tries again); RATE-LIMITED is that refusal, with its wait;
/// any other refusal leaves the LOGIN's AUTH-FAILED, saying the clock could not be checked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_goes_wrong_after_a_refused_login_is_said_as_it_is() {
    use micromsg_client::account::AccountError;
    use micromsg_client::link::LinkError;
    use micromsg_wire::ErrorCode;

    let undecodable = after_a_refused_login(BrokerInfoAnswer::Undecodable).await;
    assert!(
        matches!(undecodable, AccountError::BrokerInfo(_)),
        "{undecodable:?}"
    );
    let closed = after_a_refused_login(BrokerInfoAnswer::Close).await;
    assert!(
        matches!(
            closed,
            AccountError::Link(LinkError::Closed | LinkError::Io(_))
        ),
        "{closed:?}"
    );
    let limited = after_a_refused_login(BrokerInfoAnswer::RateLimited).await;
    assert!(
        matches!(
            limited,
            AccountError::Link(LinkError::Refused {
                code: ErrorCode::RateLimited,
                retry_after: Some(5),
                ..
            })
        ),
        "{limited:?}"
    );
    // Any other refusal: the LOGIN's own refusal, saying the clock could not be checked.
    let unknown = after_a_refused_login(BrokerInfoAnswer::Internal).await;
    assert!(
        matches!(
            &unknown,
            AccountError::Link(LinkError::Refused {
                code: ErrorCode::AuthFailed,
                ..
            })
        ),
        "{unknown:?}"
    );
    assert!(
        unknown.to_string().contains("could not be read"),
        "{unknown}"
    );
}
