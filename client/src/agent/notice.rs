//! What the agent tells the user: one [`Notice`] per event, printed as a line of text or one
//! JSON object by the CLI.

use serde::{Deserialize, Serialize};

/// Something the user should see; printed as a line of text or one JSON object.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "event", rename_all = "kebab-case")]
#[non_exhaustive]
pub enum Notice {
    /// The agent is up.
    Listening {
        /// This entity's number.
        number: String,
        /// This device.
        device: u32,
        /// Where peers connect.
        peer_address: String,
    },
    /// Someone asks to become a contact (ask mode).
    ContactRequest {
        /// The caller's number.
        from: String,
        /// Answer with `micromsg contact accept|reject <request>`.
        request: String,
        /// `NEW` or `EXISTING`.
        kind: String,
    },
    /// A contact request was refused by the accept policy.
    ContactRefused {
        /// The caller's number.
        from: String,
    },
    /// An end-to-end session is up.
    SessionStarted {
        /// The other side.
        peer: String,
        /// True the first time this contact's identity key was seen (it is now pinned).
        first_contact: bool,
        /// The safety number to compare out of band.
        safety_number: String,
        /// How the session reaches the peer: `direct` or `relay`.
        path: crate::relay::Path,
    },
    /// The peer's identity key differs from the pinned one: the session was refused.
    IdentityChanged {
        /// The other side.
        peer: String,
        /// The pinned key.
        pinned: String,
        /// The key it presented.
        presented: String,
    },
    /// A message arrived.
    Message {
        /// The sender.
        from: String,
        /// The text.
        text: String,
        /// The sender's clock (Unix seconds).
        time: u64,
        /// True when it came through the broker's inbox (deposited while this device was
        /// offline, or a copy), false when it came over a live session.
        offline: bool,
    },
    /// A copy of a message another device of this entity sent.
    SentElsewhere {
        /// The contact it went to.
        to: String,
        /// The device of this entity that sent it.
        device: u32,
        /// The text.
        text: String,
        /// The sending device's clock (Unix seconds).
        time: u64,
    },
    /// Another device of this entity shared the keys of a session with `peer`, so this device
    /// can read that conversation.
    KeysSynced {
        /// The contact.
        peer: String,
        /// The device that set the session up.
        device: u32,
    },
    /// A group message arrived (or a copy of one another device of this entity sent).
    GroupMessage {
        /// The group id.
        group: String,
        /// The group's name.
        name: String,
        /// The sender (this entity's own number for a copy).
        from: String,
        /// The text.
        text: String,
        /// The sender's clock (Unix seconds).
        time: u64,
        /// True when it came through the broker's inbox.
        offline: bool,
    },
    /// A group's membership or name changed.
    GroupChanged {
        /// The group id.
        group: String,
        /// The group's name (after the change).
        name: String,
        /// Who made the change.
        by: String,
        /// What changed, for people (`created`, `added 1234`, `removed 1234`, `left`,
        /// `renamed`).
        change: String,
        /// The members after it, in order.
        members: Vec<String>,
        /// The membership version after it.
        version: u64,
    },
    /// A group control op was refused and not applied (docs/groups.md 2.2): its signature does
    /// not verify under the claimed author's key in the group state (a forgery, or altered on
    /// the way), it is not the group's create, or it carries a key that differs from a pin.
    GroupOpRefused {
        /// The group id.
        group: String,
        /// The group's name.
        name: String,
        /// The member whose frame carried it (the forger, or a relay that passed it on).
        relayed_by: String,
        /// Who it claims made it.
        author: String,
        /// `create`, `add`, `remove`, `leave` or `rename`.
        op: String,
        /// Why, for people.
        reason: String,
    },
    /// A session is over.
    SessionEnded {
        /// The other side.
        peer: String,
        /// Why.
        reason: String,
    },
    /// The broker link is down; the agent logs in again by itself. Live sessions go on.
    BrokerLost {
        /// What happened, for people.
        reason: String,
        /// Seconds until the first attempt (later ones back off up to the configured cap).
        retry_in_secs: u64,
    },
    /// The broker link is back (logged in again); the inbox is fetched next.
    BrokerBack {
        /// How long the link was down, in whole seconds (rounded up).
        offline_secs: u64,
    },
    /// A message that an earlier `send` left queued on this device went out: the broker has
    /// it now.
    QueuedSent {
        /// The contact.
        to: String,
        /// Its deposit id.
        id: String,
        /// When it was queued (Unix seconds).
        queued_at: u64,
    },
    /// A contact moved to a new number (a *moved* notice signed with its pinned key,
    /// protocol 12.13): the contact is filed under the new number, with its name, pinned key,
    /// safety number and history.
    ContactMoved {
        /// The number it had.
        old: String,
        /// The number it has now.
        new: String,
        /// Its name, if the user gave it one.
        name: Option<String>,
        /// Its new broker's `HOST:PORT`.
        broker: String,
    },
    /// A number this device tried to reach has moved, says its old broker (FORWARDED,
    /// protocol.md 6.28), and no key is pinned for it here, so the holder's signature could
    /// not be checked: nothing changed; to reach it, add the new number.
    NumberForwarded {
        /// The number asked for.
        old: String,
        /// The number its holder announced.
        new: String,
        /// The new broker's `HOST:PORT`.
        broker: String,
    },
    /// A *moved* notice was refused (not signed with the pinned key, not from the contact it
    /// names, or not newer than the last one followed): nothing changed.
    MoveRefused {
        /// The contact whose session carried it.
        from: String,
        /// Why, for people.
        reason: String,
    },
    /// Something failed (the agent goes on).
    Warning {
        /// What.
        message: String,
    },
}
