//! This device's half of a broker relay (protocol.md 6.26), for when two clients cannot reach
//! each other directly (NAT, a firewall).
//!
//! [`open`] logs in on a new connection to the home broker, sends `RELAY` with the relay id of
//! the contact request, and turns what is left of the TLS stream into a loopback TCP socket: the
//! section-12 session then runs on it exactly as on a direct connection (same code, same
//! handshake, same encryption), while a task copies bytes between the socket and the broker.
//! The broker sees only the session's ciphertext.

use std::net::{IpAddr, SocketAddr};

use micromsg_wire::message::request::RelayArgs;
use micromsg_wire::{Hex16, Request, ResponseData};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

use crate::account::{self, AccountError};
use crate::link::LinkError;
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
    /// The loopback socket for the session could not be made.
    #[error("making the local socket for the relayed session: {0}")]
    Local(std::io::Error),
}

/// Opens this device's half of relay `relay` and returns the socket the session runs on.
pub async fn open(profile: &Profile, relay: &Hex16) -> Result<TcpStream, RelayError> {
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
    bridge(tls, early).await.map_err(RelayError::Local)
}

/// The copy buffer of each direction of the loopback bridge.
const BRIDGE_BUFFER: usize = 64 * 1024;

/// A loopback TCP socket whose other end is spliced to `remote` (after writing `early`, the
/// bytes already read from it, to the socket).
async fn bridge<S>(remote: S, early: Vec<u8>) -> std::io::Result<TcpStream>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let listener = TcpListener::bind(SocketAddr::from((IpAddr::from([127, 0, 0, 1]), 0))).await?;
    let ours = TcpStream::connect(listener.local_addr()?).await?;
    let expected = ours.local_addr()?;
    // Only our own connection is taken: another local process that raced to the port is
    // turned away.
    let mut inner = loop {
        let (stream, from) = listener.accept().await?;
        if from == expected {
            break stream;
        }
    };
    drop(listener);
    let _ = ours.set_nodelay(true);
    let _ = inner.set_nodelay(true);
    tokio::spawn(async move {
        let mut remote = remote;
        if !early.is_empty() && inner.write_all(&early).await.is_err() {
            return;
        }
        // Ends when either side closes; the session notices through its heartbeats and EOF.
        // Buffers of a 64 KiB message each way (the default 8 KiB cut the large-message rate
        // through the relay by a fifth: docs/performance.md).
        let _ = tokio::io::copy_bidirectional_with_sizes(
            &mut inner,
            &mut remote,
            BRIDGE_BUFFER,
            BRIDGE_BUFFER,
        )
        .await;
    });
    Ok(ours)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use tokio::io::{AsyncReadExt, duplex};

    #[tokio::test]
    async fn the_bridge_carries_early_bytes_first_then_both_ways() {
        let (mut far, near) = duplex(4096);
        let mut socket = bridge(near, b"early".to_vec()).await.unwrap();
        far.write_all(b" later").await.unwrap();
        let mut got = [0u8; 11];
        socket.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"early later");
        socket.write_all(b"back").await.unwrap();
        let mut back = [0u8; 4];
        far.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"back");
    }

    #[test]
    fn auto_asks_for_the_relay_only_behind_a_nat() {
        assert!(Reach::Auto.relay_at_once(Some(false)));
        assert!(!Reach::Auto.relay_at_once(Some(true)));
        assert!(!Reach::Auto.relay_at_once(None));
        assert!(Reach::Relay.relay_at_once(Some(true)));
        assert!(!Reach::Direct.relay_at_once(Some(false)));
    }
}
