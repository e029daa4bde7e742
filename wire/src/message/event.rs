//! Events (broker to client, unsolicited, never with an `Id`).

use crate::codec::{Path, WireValue, wire_enum, wire_struct};
use crate::error::DecodeError;
use crate::value::{Address, Blob, DeviceId, Hex16, Hex32, Number};
use crate::yaml::Node;

wire_enum! {
    /// The name of an event, as written after `Event:`.
    pub enum EventKind {
        /// Someone asks to become (or reach) a contact.
        ContactRequest = "CONTACT-REQUEST",
        /// The target accepted a contact request.
        ContactAccepted = "CONTACT-ACCEPTED",
        /// The caller is about to connect to the target.
        ContactConnecting = "CONTACT-CONNECTING",
        /// Networked: the home broker needs a fresh public key.
        PubkeyRequest = "PUBKEY-REQUEST",
        /// New messages are waiting.
        Inbox = "INBOX",
        /// This device was revoked; the connection closes next.
        DeviceRevoked = "DEVICE-REVOKED",
        /// The broker is shutting down.
        Shutdown = "SHUTDOWN",
        /// The other side of a relay is waiting for this device to join it.
        RelayWaiting = "RELAY-WAITING",
        /// A relay this device is a party to was closed.
        RelayClosed = "RELAY-CLOSED",
        /// The number an INITIATE named has moved; its holder left a signed notice.
        Forwarded = "FORWARDED",
    }
}

/// An event and its `Data`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// `CONTACT-REQUEST`.
    ContactRequest(ContactRequest),
    /// `CONTACT-ACCEPTED`.
    ContactAccepted(ContactAccepted),
    /// `CONTACT-CONNECTING`.
    ContactConnecting(ContactConnecting),
    /// `PUBKEY-REQUEST`.
    PubkeyRequest(PubkeyRequest),
    /// `INBOX`.
    Inbox(InboxNotice),
    /// `DEVICE-REVOKED`.
    DeviceRevoked(DeviceRevoked),
    /// `SHUTDOWN`.
    Shutdown(Shutdown),
    /// `RELAY-WAITING`.
    RelayWaiting(RelayWaiting),
    /// `RELAY-CLOSED`.
    RelayClosed(RelayClosed),
    /// `FORWARDED`.
    Forwarded(Forwarded),
}

impl Event {
    /// The event's name.
    pub fn kind(&self) -> EventKind {
        match self {
            Event::ContactRequest(_) => EventKind::ContactRequest,
            Event::ContactAccepted(_) => EventKind::ContactAccepted,
            Event::ContactConnecting(_) => EventKind::ContactConnecting,
            Event::PubkeyRequest(_) => EventKind::PubkeyRequest,
            Event::Inbox(_) => EventKind::Inbox,
            Event::DeviceRevoked(_) => EventKind::DeviceRevoked,
            Event::Shutdown(_) => EventKind::Shutdown,
            Event::RelayWaiting(_) => EventKind::RelayWaiting,
            Event::RelayClosed(_) => EventKind::RelayClosed,
            Event::Forwarded(_) => EventKind::Forwarded,
        }
    }

    pub(crate) fn decode(
        kind: EventKind,
        data: Node,
        path: &Path<'_>,
    ) -> Result<Event, DecodeError> {
        Ok(match kind {
            EventKind::ContactRequest => Event::ContactRequest(WireValue::decode(data, path)?),
            EventKind::ContactAccepted => Event::ContactAccepted(WireValue::decode(data, path)?),
            EventKind::ContactConnecting => {
                Event::ContactConnecting(WireValue::decode(data, path)?)
            }
            EventKind::PubkeyRequest => Event::PubkeyRequest(WireValue::decode(data, path)?),
            EventKind::Inbox => Event::Inbox(WireValue::decode(data, path)?),
            EventKind::DeviceRevoked => Event::DeviceRevoked(WireValue::decode(data, path)?),
            EventKind::Shutdown => Event::Shutdown(WireValue::decode(data, path)?),
            EventKind::RelayWaiting => Event::RelayWaiting(WireValue::decode(data, path)?),
            EventKind::RelayClosed => Event::RelayClosed(WireValue::decode(data, path)?),
            EventKind::Forwarded => Event::Forwarded(WireValue::decode(data, path)?),
        })
    }

    pub(crate) fn encode_data(&self) -> Node {
        match self {
            Event::ContactRequest(data) => data.encode(),
            Event::ContactAccepted(data) => data.encode(),
            Event::ContactConnecting(data) => data.encode(),
            Event::PubkeyRequest(data) => data.encode(),
            Event::Inbox(data) => data.encode(),
            Event::DeviceRevoked(data) => data.encode(),
            Event::Shutdown(data) => data.encode(),
            Event::RelayWaiting(data) => data.encode(),
            Event::RelayClosed(data) => data.encode(),
            Event::Forwarded(data) => data.encode(),
        }
    }
}

wire_enum! {
    /// `KIND` of a contact request.
    pub enum ContactKind {
        /// Not yet a contact.
        New = "NEW",
        /// Already a contact.
        Existing = "EXISTING",
    }
}

wire_struct! {
    /// `Data` of `CONTACT-REQUEST`.
    pub struct ContactRequest {
        /// The contact request id.
        req "REQUEST" request: Hex16,
        /// Who asks.
        req "FROM" from: Number,
        /// New or existing contact.
        req "KIND" kind: ContactKind,
        /// Whether the caller is on a peer broker.
        req "NETWORKED" networked: bool,
        /// Networked: the caller's public key.
        opt "PUBKEY" pubkey: Option<Hex32>,
    }
}

wire_struct! {
    /// `Data` of `CONTACT-ACCEPTED`.
    pub struct ContactAccepted {
        /// The contact request id.
        req "REQUEST" request: Hex16,
        /// Who accepted.
        req "TARGET" target: Number,
        /// Same broker: where the target listens.
        opt "ADDRESS" address: Option<Address>,
        /// Networked: the target's address sealed to the caller's key.
        opt "SEALED-ADDRESS" sealed_address: Option<Blob>,
        /// One-time connect token.
        req "TOKEN" token: Hex32,
        /// Networked: the target's public key.
        opt "PUBKEY" pubkey: Option<Hex32>,
        /// The relay id for this request, when the broker offers a relay (section 6.26).
        opt "RELAY" relay: Option<Hex16>,
    }
}

wire_struct! {
    /// `Data` of `CONTACT-CONNECTING` (to the target after it accepted).
    pub struct ContactConnecting {
        /// The contact request id.
        req "REQUEST" request: Hex16,
        /// Who will connect.
        req "FROM" from: Number,
        /// The token the connecting peer will prove.
        req "TOKEN" token: Hex32,
        /// The relay id for this request, when the broker offers a relay (section 6.26).
        opt "RELAY" relay: Option<Hex16>,
    }
}

wire_struct! {
    /// `Data` of `RELAY-WAITING`.
    pub struct RelayWaiting {
        /// The relay id.
        req "RELAY" relay: Hex16,
        /// The number on the other side, which has joined.
        req "FROM" from: Number,
    }
}

wire_struct! {
    /// `Data` of `RELAY-CLOSED`.
    pub struct RelayClosed {
        /// The relay id.
        req "RELAY" relay: Hex16,
        /// Why, for people.
        req "REASON" reason: String,
    }
}

wire_struct! {
    /// `Data` of `PUBKEY-REQUEST`.
    pub struct PubkeyRequest {
        /// The contact request id.
        req "REQUEST" request: Hex16,
        /// The other party.
        req "PEER" peer: Number,
    }
}

wire_struct! {
    /// `Data` of `INBOX`.
    pub struct InboxNotice {
        /// Messages waiting.
        req "COUNT" count: u32,
    }
}

wire_struct! {
    /// `Data` of `DEVICE-REVOKED`.
    pub struct DeviceRevoked {
        /// The revoked device.
        req "DEVICE" device: DeviceId,
    }
}

wire_struct! {
    /// `Data` of `SHUTDOWN`.
    pub struct Shutdown {
        /// Seconds to wait before reconnecting.
        req "RECONNECT-AFTER" reconnect_after: u32,
    }
}

wire_struct! {
    /// `Data` of `FORWARDED`.
    pub struct Forwarded {
        /// The INITIATE's `REQUEST` id (from its acknowledgement).
        req "REQUEST" request: Hex16,
        /// The number the INITIATE named (the old number).
        req "TARGET" target: Number,
        /// The signed moved notice its holder left (protocol.md 12.13), to verify.
        req "NOTICE" notice: Blob,
        /// Unix seconds when the broker drops the forward.
        req "EXPIRES" expires: u64,
    }
}
