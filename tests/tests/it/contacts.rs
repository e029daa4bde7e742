//! Contact setup on one broker: INITIATE, the target's answer, tokens, blacklist, and the
//! silent-drop rule that keeps numbers from being enumerated.

use std::time::{Duration, Instant};

use micromsg_client::account::{self, Session};
use micromsg_client::profile::Profile;
use micromsg_tests::{Backend, TestBroker};
use micromsg_wire::message::request::{Answer, ContactAnswerArgs, InitiateNewArgs, TargetArgs};
use micromsg_wire::{Address, Event, Number, Request, ResponseData};

micromsg_tests::both_backends!(
    accept_hands_out_address_and_one_token_to_both,
    rejection_blacklists_the_caller,
    unknown_offline_and_blocking_numbers_look_the_same,
    a_probed_number_stays_unreachable_for_the_prober_once_given_out,
);

async fn user(broker: &TestBroker, name: &str) -> Session {
    let p = Profile::new(broker.profile_dir(name));
    account::register(&p, &broker.addr, &broker.ca, None)
        .await
        .unwrap()
}

fn number(s: &Session) -> Number {
    Number::new(s.info.number.clone()).unwrap()
}

async fn initiate(caller: &mut Session, target: &Number) -> [u8; 16] {
    match caller
        .link
        .call(Request::InitiateNew(InitiateNewArgs {
            target: target.clone(),
            address: None,
        }))
        .await
        .unwrap()
    {
        ResponseData::InitiateNew(d) => *d.request.as_bytes(),
        other => panic!("{other:?}"),
    }
}

async fn no_event_within(s: &mut Session, wait: Duration) {
    if let Ok(event) = tokio::time::timeout(wait, s.link.next_event()).await {
        panic!("expected silence, got {event:?}");
    }
}

async fn accept_hands_out_address_and_one_token_to_both(backend: Backend) {
    let broker = TestBroker::start(backend, |_| {}).await;
    let mut a = user(&broker, "a").await;
    let mut b = user(&broker, "b").await;
    let request = initiate(&mut a, &number(&b)).await;
    let asked = match b.link.next_event().await.unwrap() {
        Event::ContactRequest(r) => r,
        other => panic!("{other:?}"),
    };
    assert_eq!(asked.request.as_bytes(), &request);
    assert_eq!(asked.from.as_str(), a.info.number);
    b.link
        .call(Request::ContactAnswer(ContactAnswerArgs {
            request: asked.request,
            answer: Answer::Accept {
                address: Address::new("0.0.0.0:45678").unwrap(),
            },
        }))
        .await
        .unwrap();
    let connecting = match b.link.next_event().await.unwrap() {
        Event::ContactConnecting(c) => c,
        other => panic!("{other:?}"),
    };
    let accepted = match a.link.next_event().await.unwrap() {
        Event::ContactAccepted(c) => c,
        other => panic!("{other:?}"),
    };
    assert_eq!(accepted.target.as_str(), b.info.number);
    // 0.0.0.0 is replaced by the address the broker sees for B.
    assert_eq!(accepted.address.unwrap().as_str(), "127.0.0.1:45678");
    assert_eq!(accepted.token.as_bytes(), connecting.token.as_bytes());
    assert_eq!(connecting.from.as_str(), a.info.number);
    // Answering the same request twice is refused.
    let err = b
        .link
        .call(Request::ContactAnswer(ContactAnswerArgs {
            request: asked.request,
            answer: Answer::Accept {
                address: Address::new("127.0.0.1:1").unwrap(),
            },
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(micromsg_wire::ErrorCode::NotFound));
    broker.stop().await;
}

async fn rejection_blacklists_the_caller(backend: Backend) {
    let broker = TestBroker::start(backend, |_| {}).await;
    let mut a = user(&broker, "a").await;
    let mut b = user(&broker, "b").await;
    initiate(&mut a, &number(&b)).await;
    let asked = match b.link.next_event().await.unwrap() {
        Event::ContactRequest(r) => r,
        other => panic!("{other:?}"),
    };
    b.link
        .call(Request::ContactAnswer(ContactAnswerArgs {
            request: asked.request,
            answer: Answer::Decline,
        }))
        .await
        .unwrap();
    no_event_within(&mut a, Duration::from_millis(300)).await;
    // B's block list now holds A, and A's next request never reaches B.
    match b.link.call(Request::BlockList).await.unwrap() {
        ResponseData::BlockList(l) => {
            assert_eq!(
                l.numbers.iter().map(|n| n.as_str()).collect::<Vec<_>>(),
                vec![a.info.number.as_str()]
            )
        }
        other => panic!("{other:?}"),
    }
    initiate(&mut a, &number(&b)).await;
    no_event_within(&mut b, Duration::from_millis(300)).await;
    // Unblocking lets A through again.
    b.link
        .call(Request::Unblock(TargetArgs { target: number(&a) }))
        .await
        .unwrap();
    initiate(&mut a, &number(&b)).await;
    assert!(matches!(
        b.link.next_event().await.unwrap(),
        Event::ContactRequest(_)
    ));
    broker.stop().await;
}

/// The caller's view of an INITIATE: the ack frame (with its request id zeroed, since ids are
/// random) and how long it took. Unknown, offline and blocking targets must give the same
/// frame, then silence; the timing must not separate them.
///
/// How timing is measured: for each kind of target we send 40 INITIATEs on one logged-in
/// connection, interleaving the kinds so drift affects all alike, and time each round trip
/// from send to ack. We compare medians: each kind's median must lie within 1 ms or 50% of the
/// others'. The broker writes the ack before it looks anything up (the lookup runs as a
/// separate task), so the medians differ only by scheduling noise.
async fn unknown_offline_and_blocking_numbers_look_the_same(backend: Backend) {
    let broker = TestBroker::start(backend, |c| {
        c.contacts.initiates_per_minute = 10_000;
    })
    .await;
    let mut caller = user(&broker, "caller").await;
    let offline = user(&broker, "offline").await;
    let offline_number = number(&offline);
    drop(offline); // logs out by closing
    let mut blocker = user(&broker, "blocker").await;
    blocker
        .link
        .call(Request::Block(TargetArgs {
            target: number(&caller),
        }))
        .await
        .unwrap();
    // A number in the broker's prefix that nobody holds (numbers are 10 digits under 555).
    let unknown = loop {
        let candidate = format!("555{:07}", rand_u32() % 10_000_000);
        if !broker
            .running
            .broker
            .store()
            .entity_exists(&Number::new(candidate.clone()).unwrap())
            .await
            .unwrap()
        {
            break Number::new(candidate).unwrap();
        }
    };
    let targets = [
        ("unknown", unknown),
        ("offline", offline_number),
        ("blocking", number(&blocker)),
    ];
    let mut frames: Vec<Vec<String>> = vec![Vec::new(); 3];
    let mut times: Vec<Vec<Duration>> = vec![Vec::new(); 3];
    for _ in 0..40 {
        for (i, (_, target)) in targets.iter().enumerate() {
            let started = Instant::now();
            let data = caller
                .link
                .call(Request::InitiateNew(InitiateNewArgs {
                    target: target.clone(),
                    address: None,
                }))
                .await
                .unwrap();
            times[i].push(started.elapsed());
            let ResponseData::InitiateNew(mut d) = data else {
                panic!("{data:?}")
            };
            d.request = micromsg_wire::Hex16::from_bytes([0; 16]);
            frames[i].push(format!("{:?}", ResponseData::InitiateNew(d)));
        }
    }
    for i in 1..3 {
        assert_eq!(
            frames[0], frames[i],
            "ack frames differ for {}",
            targets[i].0
        );
    }
    let medians: Vec<Duration> = times
        .iter_mut()
        .map(|t| {
            t.sort();
            t[t.len() / 2]
        })
        .collect();
    for a in &medians {
        for b in &medians {
            let diff = a.abs_diff(*b);
            assert!(
                diff <= Duration::from_millis(1) || diff <= a.max(b).mul_f64(0.5),
                "ack timing separates the kinds: medians {medians:?}"
            );
        }
    }
    // And then nothing, whatever the target.
    no_event_within(&mut caller, Duration::from_millis(300)).await;
    no_event_within(&mut blocker, Duration::from_millis(100)).await;
    broker.stop().await;
}

fn rand_u32() -> u32 {
    use rand_core::RngCore;
    rand_core::OsRng.next_u32()
}

/// The seed's option (on by default): an INITIATE to a number that does not exist is
/// remembered, and if that number is handed out later, the prober cannot reach it — while
/// everybody else can.
async fn a_probed_number_stays_unreachable_for_the_prober_once_given_out(backend: Backend) {
    use micromsg_client::link::BrokerLink;
    use micromsg_crypto::Secret32;
    use micromsg_store::NewDevice;

    let broker = TestBroker::start(backend, |_| {}).await;
    let mut prober = user(&broker, "prober").await;
    let mut other = user(&broker, "other").await;
    let future = loop {
        let candidate = format!("555{:07}", rand_u32() % 10_000_000);
        if !broker
            .running
            .broker
            .store()
            .entity_exists(&Number::new(candidate.clone()).unwrap())
            .await
            .unwrap()
        {
            break candidate;
        }
    };
    initiate(&mut prober, &Number::new(future.clone()).unwrap()).await;
    // The routing task records the probe after the acknowledgement.
    micromsg_tests::wait::eventually(
        "the INITIATE to the unknown number recorded",
        Duration::from_secs(10),
        async || {
            let store = broker.running.broker.store();
            store
                .is_poisoned(
                    &Number::new(prober.info.number.clone()).unwrap(),
                    &Number::new(future.clone()).unwrap(),
                )
                .await
                .unwrap()
        },
    )
    .await;

    // The number is given out later (as the allocator would, had it drawn it).
    let device = NewDevice {
        client_secret: [3; 32],
        server_secret: [4; 32],
        name: None,
    };
    let store = &broker.running.broker.store();
    store
        .create_entity(
            &Number::new(future.clone()).unwrap(),
            &device,
            account::unix_now() as i64,
        )
        .await
        .unwrap();
    let tls = micromsg_client::tls::client_config(&broker.ca).unwrap();
    let mut target = BrokerLink::connect(&broker.addr, "127.0.0.1", tls)
        .await
        .unwrap();
    target
        .login(
            &future,
            1,
            &Secret32::from_bytes([3; 32]),
            &Secret32::from_bytes([4; 32]),
            6,
            account::unix_now(),
        )
        .await
        .unwrap();

    // The prober is silently dropped; anyone else gets through.
    initiate(&mut prober, &Number::new(future.clone()).unwrap()).await;
    if let Ok(event) = tokio::time::timeout(Duration::from_millis(300), target.next_event()).await {
        panic!("the prober must not reach the number: {event:?}");
    }
    initiate(&mut other, &Number::new(future).unwrap()).await;
    match tokio::time::timeout(Duration::from_secs(5), target.next_event()).await {
        Ok(Ok(Event::ContactRequest(r))) => assert_eq!(r.from.as_str(), other.info.number),
        other => panic!("{other:?}"),
    }
    broker.stop().await;
}
