//! Links to peer brokers: one gRPC channel per peer (connected lazily, reconnected by tonic
//! after a failure) and its reachability ([`super::probe`] keeps it fresh).
//!
//! Reachability is local link state: the outcome of the last call or probe. A `-NETWORKED`
//! request to a peer marked unreachable first tries it once more on demand
//! ([`super::probe::recheck`], within `connect_timeout_ms`), so a peer that came back since
//! the last probe is used at once; it gets PEER-UNAVAILABLE only if that fails too
//! (protocol.md 6.13). A peer never tried yet counts as reachable, so a broker that just
//! started does not refuse requests while its first probes are in flight.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tonic::transport::{Channel, Endpoint};
use tracing::{info, warn};

use super::network::BrokerEntry;
use super::proto::federation_client::FederationClient;
use crate::clock::unix_now;
use crate::telemetry::TraceContext;

/// A client of a peer's Federation service, with trace context injected into every call.
pub type PeerClient =
    FederationClient<tonic::service::interceptor::InterceptedService<Channel, TraceContext>>;

/// What is known about a link.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LinkState {
    /// `Some(true)` after a success, `Some(false)` after a failure, `None` before any try.
    pub reachable: Option<bool>,
    /// Unix seconds of the last success, 0 if none.
    pub last_ok: u64,
    /// The last failure, empty after a success.
    pub last_error: String,
}

/// One peer broker.
#[derive(Debug)]
pub struct PeerLink {
    /// The peer's entry in the network file.
    pub entry: BrokerEntry,
    client: PeerClient,
    state: Mutex<LinkState>,
    /// One on-demand recheck at a time: the requests that find the link down meanwhile wait
    /// for its outcome instead of each trying the peer.
    pub(super) rechecking: tokio::sync::Mutex<()>,
}

impl PeerLink {
    /// A link whose channel connects on first use (TCP to the endpoint, TLS verified for the
    /// peer's id).
    pub fn new(
        entry: BrokerEntry,
        client_tls: Arc<rustls::ClientConfig>,
        connect_timeout: Duration,
        max_message_bytes: usize,
    ) -> Self {
        // The URI only names the authority for HTTP/2; the connector below decides where the
        // bytes go and what certificate must answer.
        let endpoint = Endpoint::from_shared(format!("http://{}", entry.id))
            .unwrap_or_else(|_| Endpoint::from_static("http://peer"))
            .connect_timeout(connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_while_idle(true);
        let channel = endpoint.connect_with_connector_lazy(super::mtls::connector(
            client_tls,
            entry.endpoint.clone(),
            entry.id.clone(),
            connect_timeout,
        ));
        let client = FederationClient::with_interceptor(channel, TraceContext)
            .max_decoding_message_size(max_message_bytes)
            .max_encoding_message_size(max_message_bytes);
        Self {
            entry,
            client,
            state: Mutex::new(LinkState::default()),
            rechecking: tokio::sync::Mutex::new(()),
        }
    }

    /// A client for one call (clones share the channel).
    pub fn client(&self) -> PeerClient {
        self.client.clone()
    }

    /// The link state now.
    pub fn state(&self) -> LinkState {
        self.lock().clone()
    }

    /// False only when the last attempt failed.
    pub fn is_available(&self) -> bool {
        self.lock().reachable != Some(false)
    }

    /// Records a successful call.
    pub fn record_ok(&self) {
        let mut s = self.lock();
        if s.reachable != Some(true) {
            info!(peer = %self.entry.id, "peer broker reachable");
        }
        s.reachable = Some(true);
        s.last_ok = unix_now();
        s.last_error.clear();
    }

    /// Records a failed call.
    pub fn record_err(&self, error: &str) {
        let mut s = self.lock();
        if s.reachable != Some(false) {
            warn!(peer = %self.entry.id, error, "peer broker unreachable");
        }
        s.reachable = Some(false);
        error.clone_into(&mut s.last_error);
    }

    /// Records the outcome of a call and passes it on.
    pub fn record<T>(&self, result: Result<T, tonic::Status>) -> Result<T, tonic::Status> {
        match &result {
            Ok(_) => self.record_ok(),
            Err(status) => self.record_err(&describe(status)),
        }
        result
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LinkState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A short description of a failed call for logs and status (the transport error's cause,
/// which names TLS failures such as an unknown issuer or an expired certificate). The
/// message may be the peer broker's own text: its control characters are escaped, so a peer
/// cannot write escape sequences into an operator's terminal through `status` or a log.
pub fn describe(status: &tonic::Status) -> String {
    use std::error::Error as _;
    let mut text = format!("{:?}: {}", status.code(), status.message().escape_debug());
    crate::telemetry::append_causes(&mut text, status.source());
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peers_message_cannot_drive_the_operators_terminal() {
        let said = describe(&tonic::Status::unavailable("down\u{1b}[2J\u{1b}]0;x\u{7}"));
        assert!(!said.chars().any(char::is_control), "{said:?}");
        assert_eq!(said, "Unavailable: down\\u{1b}[2J\\u{1b}]0;x\\u{7}");
    }
}
