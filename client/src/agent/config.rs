//! How an agent runs: who may connect, where it listens, its timers and limits.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::p2p::SessionConfig;

/// Who may set up a session with this device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AcceptPolicy {
    /// Everyone who is not blocked.
    Any,
    /// Only numbers already in the contact list; others are rejected (and so blocked).
    Contacts,
    /// Print the request and wait for `micromsg contact accept|reject`.
    Ask,
}

/// How the agent runs.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Who may connect.
    pub accept: AcceptPolicy,
    /// Where to listen for peers. Default `0.0.0.0:0` (any interface, a free port).
    pub peer_listen: SocketAddr,
    /// The `HOST:PORT` peers are told to connect to. Default: `0.0.0.0:<port>`, which the
    /// broker replaces with the address it sees for this device (protocol 10.7); a sealed
    /// address for a peer broker's caller uses the local address of the broker link instead.
    pub advertise: Option<String>,
    /// Session timers and limits.
    pub session: SessionConfig,
    /// Serve the control socket (`DIR/control.sock`) for one-shot commands.
    pub control: bool,
    /// Let existing contacts reconnect without asking (CONTACT-POLICY AUTO-EXISTING).
    pub auto_existing: bool,
    /// Accept a contact request from a number that is a member of a group this device is a
    /// member of, whatever `accept` says, so members who are not contacts reach each other
    /// (docs/groups.md section 3); the handshake must present the identity key the group
    /// carries for that number. Default true (`listen --ask-group-members` turns it off).
    pub accept_group_members: bool,
    /// How long a contact request or a reconnect waits for the other side.
    pub answer_timeout: Duration,
    /// Announce the listening address and contact policy to the broker (off for the short-lived
    /// agent of a one-shot command, which nobody should connect to).
    pub announce: bool,
    /// How long `send` waits for a contact without a live session to come online before it
    /// deposits the message at the broker instead. Default 10 s.
    pub offline_after: Duration,
    /// Fetch the inbox at start and on every INBOX event. Default true (off for the
    /// short-lived agent of a one-shot command other than `inbox`).
    pub inbox: bool,
    /// Copy what this device sends to the entity's other devices (SYNC-COPY), deposit a copy
    /// of each live message for the contact's other devices, and share new sessions' keys with
    /// the entity's other devices. Default true.
    pub copies: bool,
    /// How many group messages to hold that arrived before the ops that make them acceptable
    /// (across brokers a message can overtake the group's create or an add). Default 256.
    pub early_group_messages: usize,
    /// How long such a message is held. Default 1 hour.
    pub early_group_ttl: Duration,
    /// Start even when the broker cannot be reached, and log in once it can (`listen`).
    /// Default false: a one-shot command says at once that the broker is out of reach.
    pub wait_for_broker: bool,
    /// The first delay before logging in again after the link is lost. Default 1 s.
    pub reconnect_initial: Duration,
    /// The longest delay between two attempts (the delay doubles up to it, with jitter).
    /// Default 30 s.
    pub reconnect_max: Duration,
    /// How often group frames waiting for a first session with a member (docs/groups.md
    /// section 3) ask that member again, in case it was offline the last time. Default 60 s.
    pub member_retry: Duration,
    /// Whether peers can reach this device directly (`listen --reach`). Default `auto`.
    pub reach: crate::relay::Reach,
    /// How long this device keeps the keys of a session replaced by a newer one after it was
    /// last used or replaced, to open deposits sealed with them still on their way
    /// (`store/prune.rs`); never less than the broker's MESSAGE-TTL. Default 90 days
    /// (`listen --keep-replaced-keys-days`).
    pub keep_replaced_keys: Duration,
    /// How long a direct connection to a peer may take before the relay is used instead
    /// (when the broker offers one). Default 3 s.
    pub direct_timeout: Duration,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            accept: AcceptPolicy::Ask,
            peer_listen: SocketAddr::from(([0, 0, 0, 0], 0)),
            advertise: None,
            session: SessionConfig::default(),
            control: true,
            auto_existing: true,
            accept_group_members: true,
            answer_timeout: Duration::from_secs(60),
            announce: true,
            offline_after: Duration::from_secs(10),
            inbox: true,
            copies: true,
            early_group_messages: 256,
            early_group_ttl: Duration::from_secs(3600),
            wait_for_broker: false,
            reconnect_initial: Duration::from_secs(1),
            reconnect_max: Duration::from_secs(30),
            member_retry: Duration::from_secs(60),
            reach: crate::relay::Reach::Auto,
            keep_replaced_keys: Duration::from_secs(90 * 24 * 3600),
            direct_timeout: Duration::from_secs(3),
        }
    }
}
