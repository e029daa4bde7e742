//! This device's half of a broker relay (protocol.md 6.26), for when two clients cannot reach
//! each other directly (NAT, a firewall).
//!
//! [`open`] logs in on a new connection to the home broker, sends `RELAY` with the relay id of
//! the contact request, and hands what is left of the TLS stream to the section-12 handshake
//! ([`crate::p2p::initiate`] and [`crate::p2p::respond`] take it as they take a TCP
//! connection): the session runs inside that TLS connection with the same code, handshake and
//! encryption as on a direct one. The broker sees only the session's ciphertext.

use std::fmt;

use micromsg_wire::message::request::RelayArgs;
use micromsg_wire::{Hex16, Request, ResponseData};

use crate::account::{self, AccountError};
use crate::link::{LinkError, Stream};
use crate::profile::Profile;

/// How a session reaches its peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Path {
    /// A TCP connection between the two clients.
    Direct,
    /// Through the brokers' relay.
    Relay,
}

impl Path {
    /// `direct` or `relay`.
    pub fn as_str(self) -> &'static str {
        match self {
            Path::Direct => "direct",
            Path::Relay => "relay",
        }
    }
}

/// Whether this device can be reached directly by its peers (`listen --reach`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Reach {
    /// Decide from what the broker sees: behind a NAT (the broker sees another address than
    /// this end has), ask for the relay from the start; otherwise offer the direct path.
    #[default]
    Auto,
    /// Peers connect directly (the relay is still the fallback when that fails).
    Direct,
    /// Not reachable: ask for the relay at once.
    Relay,
}

impl std::str::FromStr for Reach {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Reach::Auto),
            "direct" => Ok(Reach::Direct),
            "relay" => Ok(Reach::Relay),
            other => Err(format!("{other:?} is not one of auto, direct, relay")),
        }
    }
}

impl Reach {
    /// Whether to join the relay as soon as a contact request is accepted, given whether the
    /// broker saw this end at its own address (`None`: it did not say).
    pub fn relay_at_once(self, seen_unchanged: Option<bool>) -> bool {
        match self {
            Reach::Direct => false,
            Reach::Relay => true,
            Reach::Auto => seen_unchanged == Some(false),
        }
    }
}

/// Why a relay could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// Logging in on the relay connection failed.
    #[error("logging in for the relay: {0}")]
    Login(#[from] AccountError),
    /// The broker refused the RELAY request (unknown or spent relay, a limit).
    #[error("the broker refused the relay: {0}")]
    Refused(LinkError),
}

/// This device's half of an open relay, for [`crate::p2p::initiate`] or
/// [`crate::p2p::respond`]: the TLS connection to the home broker after its RELAY answer, and
/// the relayed bytes already read past that answer.
pub struct Relayed {
    tls: Stream,
    early: Vec<u8>,
}

impl Relayed {
    /// The TLS stream, and the bytes to read before what it still holds.
    pub(crate) fn into_parts(self) -> (Stream, Vec<u8>) {
        (self.tls, self.early)
    }
}

impl fmt::Debug for Relayed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Relayed")
            .field("early_len", &self.early.len())
            .finish_non_exhaustive()
    }
}

/// Opens this device's half of relay `relay`, for the session's handshake.
pub async fn open(profile: &Profile, relay: &Hex16) -> Result<Relayed, RelayError> {
    let mut session = account::connect(profile).await?;
    match session
        .link
        .call(Request::Relay(RelayArgs { relay: *relay }))
        .await
    {
        Ok(ResponseData::Relay) => {}
        Ok(other) => {
            return Err(RelayError::Refused(LinkError::Protocol(format!(
                "RELAY answered with {}",
                other.kind().as_str()
            ))));
        }
        Err(e) => return Err(RelayError::Refused(e)),
    }
    let (tls, early) = session.link.into_pipe();
    Ok(Relayed { tls, early })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn auto_asks_for_the_relay_only_behind_a_nat() {
        assert!(Reach::Auto.relay_at_once(Some(false)));
        assert!(!Reach::Auto.relay_at_once(Some(true)));
        assert!(!Reach::Auto.relay_at_once(None));
        assert!(Reach::Relay.relay_at_once(Some(true)));
        assert!(!Reach::Direct.relay_at_once(Some(false)));
    }
}
