//! Sessions on the raw request level (the client library's login and link, no agent), for
//! tests that drive the broker's requests one by one.

use micromsg_client::account::{self, Session};
use micromsg_client::link::LinkError;
use micromsg_client::profile::Profile;
use micromsg_wire::message::request::{Answer, ContactAnswerArgs, DepositArgs, InitiateNewArgs};
use micromsg_wire::{Address, Blob, Event, Hex16, Number, Request, ResponseData};

use crate::TestBroker;

/// Registers a new entity at `broker`, its profile under the test's directory as `name`.
pub async fn user(broker: &TestBroker, name: &str) -> Session {
    let p = Profile::new(broker.profile_dir(name));
    account::register(&p, &broker.addr, &broker.ca, None)
        .await
        .expect("registering a test user")
}

/// The session's number.
pub fn number(s: &Session) -> Number {
    Number::new(s.info.number.clone()).expect("a registered number")
}

/// Makes `a` and `b` a contact pair through INITIATE-NEW and an accepting answer; returns the
/// relay id the broker offered with it (CONTACT-ACCEPTED), if any.
pub async fn pair(a: &mut Session, b: &mut Session) -> Option<Hex16> {
    a.link
        .call(Request::InitiateNew(InitiateNewArgs {
            target: number(b),
            address: None,
        }))
        .await
        .expect("INITIATE-NEW");
    let Ok(Event::ContactRequest(r)) = b.link.next_event().await else {
        panic!("expected a contact request")
    };
    b.link
        .call(Request::ContactAnswer(ContactAnswerArgs {
            request: r.request,
            answer: Answer::Accept {
                address: Address::new("127.0.0.1:9").expect("an address"),
            },
        }))
        .await
        .expect("CONTACT-ANSWER");
    // The CONTACT-CONNECTING / CONTACT-ACCEPTED events.
    let _ = b.link.next_event().await;
    match a.link.next_event().await {
        Ok(Event::ContactAccepted(accepted)) => accepted.relay,
        _ => None,
    }
}

/// DEPOSIT of `body` for `to`, with the message id of 16 bytes `id`.
pub async fn deposit(
    s: &mut Session,
    to: &Number,
    id: u8,
    body: &[u8],
) -> Result<ResponseData, LinkError> {
    s.link
        .call(Request::Deposit(DepositArgs {
            target: to.clone(),
            id: Hex16::from_bytes([id; 16]),
            body: Blob::new(body.to_vec()),
        }))
        .await
}
