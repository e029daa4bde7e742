//! The broker link: one TLS 1.3 connection to the home broker, requests with correlated
//! answers, pushed events, and the mutual LOGIN.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use micromsg_crypto::Secret32;
use micromsg_crypto::nonce::{self, Direction, NonceContext};
use micromsg_wire::io::{FrameReadError, FrameReader, write_frame};
use micromsg_wire::message::request::LoginArgs;
use micromsg_wire::message::response::LoginData;
use micromsg_wire::{
    DeviceId, ErrorCode, Event, Hex32, Limits, Message, Number, Request, ResponseData,
};
use subtle::ConstantTimeEq;
use tokio::io::{ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// The TLS stream to the broker.
pub type Stream = TlsStream<TcpStream>;

/// Why a broker request failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LinkError {
    /// The TCP connection could not be made.
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// The broker address.
        addr: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The TLS handshake failed (wrong CA, wrong name, not TLS 1.3, ...).
    #[error("TLS handshake with {addr} failed: {source}")]
    Tls {
        /// The broker address.
        addr: String,
        /// The I/O error carrying the TLS error.
        #[source]
        source: std::io::Error,
    },
    /// The broker answered with an error.
    #[error("broker refused: {code}: {message}")]
    Refused {
        /// The stable error code.
        code: ErrorCode,
        /// The broker's explanation.
        message: String,
        /// Seconds to wait before retrying, when given.
        retry_after: Option<u32>,
    },
    /// The broker could not prove it knows this device's server secret.
    #[error(
        "the broker failed the mutual login check: it could not prove it knows this device's \
         server secret (an impostor, or a broker that lost its data); refusing to continue"
    )]
    BrokerNotVerified,
    /// The broker sent something this client does not understand.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The connection failed or closed.
    #[error("connection to the broker lost: {0}")]
    Io(#[from] std::io::Error),
    /// The broker closed the connection.
    #[error("the broker closed the connection")]
    Closed,
    /// No answer in time.
    #[error("the broker did not answer within {0:?}")]
    Timeout(Duration),
    /// The agent's link is down and being re-established; nothing was sent.
    #[error("not connected to the broker (reconnecting); nothing was sent")]
    Offline,
}

impl LinkError {
    /// The broker's error code, when the broker refused.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            LinkError::Refused { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// How long [`BrokerLink::call`] waits before sending a request again after `result`, the
/// answer to its attempt after `retries` retries; `None` when the answer is final. Its own
/// function (sans-IO) so that the rule is tested without a broker.
fn rate_limit_wait<T>(result: &Result<T, LinkError>, retries: u32) -> Option<Duration> {
    match result {
        Err(LinkError::Refused {
            code: ErrorCode::RateLimited,
            retry_after: Some(secs),
            ..
        }) if *secs <= RATE_LIMIT_WAIT_MAX && retries < RATE_LIMIT_RETRIES => {
            Some(Duration::from_secs(u64::from((*secs).max(1))))
        }
        _ => None,
    }
}

/// A connection to the home broker.
pub struct BrokerLink {
    reader: FrameReader<ReadHalf<Stream>>,
    writer: WriteHalf<Stream>,
    binding: [u8; 32],
    limits: Limits,
    next_id: u32,
    events: VecDeque<Event>,
    timeout: Duration,
    local_ip: Option<std::net::IpAddr>,
    /// This end's IP address as the broker saw it at LOGIN (`CLIENT-IP`), if it said.
    client_ip: Option<std::net::IpAddr>,
}

impl std::fmt::Debug for BrokerLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerLink")
            .field("next_id", &self.next_id)
            .finish_non_exhaustive()
    }
}

/// How long connecting to the broker (TCP and TLS) may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a request waits for its answer by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// The longest `RetryAfter` (seconds) that [`BrokerLink::call`] waits out by itself.
pub const RATE_LIMIT_WAIT_MAX: u32 = 2;

/// How many times [`BrokerLink::call`] retries one request after RATE-LIMITED.
pub const RATE_LIMIT_RETRIES: u32 = 3;

impl BrokerLink {
    /// Connects to `addr` (`HOST:PORT`) and checks its certificate for `tls_name`; the TCP
    /// connect and the TLS handshake together take at most [`CONNECT_TIMEOUT`] (a host that
    /// drops packets would otherwise hold the caller for minutes).
    pub async fn connect(
        addr: &str,
        tls_name: &str,
        tls: Arc<rustls::ClientConfig>,
    ) -> Result<Self, LinkError> {
        tokio::time::timeout(
            CONNECT_TIMEOUT,
            Self::connect_unbounded(addr, tls_name, tls),
        )
        .await
        .unwrap_or(Err(LinkError::Timeout(CONNECT_TIMEOUT)))
    }

    async fn connect_unbounded(
        addr: &str,
        tls_name: &str,
        tls: Arc<rustls::ClientConfig>,
    ) -> Result<Self, LinkError> {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|source| LinkError::Connect {
                addr: addr.to_owned(),
                source,
            })?;
        let _ = tcp.set_nodelay(true);
        let local_ip = tcp.local_addr().ok().map(|a| a.ip());
        let name = rustls::pki_types::ServerName::try_from(tls_name.to_owned()).map_err(|e| {
            LinkError::Tls {
                addr: addr.to_owned(),
                source: std::io::Error::new(std::io::ErrorKind::InvalidInput, e),
            }
        })?;
        let stream = TlsConnector::from(tls)
            .connect(name, tcp)
            .await
            .map_err(|source| LinkError::Tls {
                addr: addr.to_owned(),
                source,
            })?;
        let mut binding = [0u8; 32];
        stream
            .get_ref()
            .1
            .export_keying_material(&mut binding, nonce::TLS_EXPORTER_LABEL, None)
            .map_err(|e| LinkError::Protocol(format!("TLS exporter: {e}")))?;
        let limits = Limits::default();
        let (read, writer) = tokio::io::split(stream);
        Ok(Self {
            reader: FrameReader::new(read, limits.max_frame_len),
            writer,
            binding,
            limits,
            next_id: 1,
            events: VecDeque::new(),
            timeout: DEFAULT_TIMEOUT,
            local_ip,
            client_ip: None,
        })
    }

    /// This end's IP address on the connection: the interface that reaches the broker.
    pub fn local_ip(&self) -> Option<std::net::IpAddr> {
        self.local_ip
    }

    /// This end's IP address as the broker saw it at LOGIN (after any NAT on the way), when the
    /// broker said (`CLIENT-IP`, protocol.md 6.4).
    pub fn client_ip(&self) -> Option<std::net::IpAddr> {
        self.client_ip
    }

    /// Whether the broker sees this end at the address it has itself: no NAT between them
    /// (`None` when the broker did not say).
    pub fn seen_unchanged(&self) -> Option<bool> {
        let seen = self.client_ip?;
        let local = self.local_ip?;
        Some(seen.to_canonical() == local.to_canonical())
    }

    /// Ends the framed protocol after an accepted RELAY (protocol.md 6.26): the TLS stream, and
    /// the relayed bytes already read past the RELAY answer.
    pub fn into_pipe(self) -> (Stream, Vec<u8>) {
        let (read, early) = self.reader.into_parts();
        (read.unsplit(self.writer), early)
    }

    /// The TLS exporter value of this connection (what login nonces are bound to).
    pub fn binding(&self) -> &[u8; 32] {
        &self.binding
    }

    /// Sends `request` and waits for its answer; events that arrive meanwhile are queued
    /// for [`BrokerLink::next_event`].
    ///
    /// A RATE-LIMITED answer whose `RetryAfter` is at most [`RATE_LIMIT_WAIT_MAX`] seconds
    /// (the per-connection request bucket, protocol.md 2.4) is waited out and the request sent
    /// again, up to [`RATE_LIMIT_RETRIES`] times: a refused request changed nothing, so this
    /// is safe, and a burst of sends should slow down rather than fail. Longer waits (the
    /// INITIATE and registration budgets) come back as the error.
    pub async fn call(&mut self, request: Request) -> Result<ResponseData, LinkError> {
        let mut retries = 0;
        loop {
            let id = self.send(&request).await?;
            let result = self.answer(id).await;
            let Some(wait) = rate_limit_wait(&result, retries) else {
                return result;
            };
            retries += 1;
            tokio::time::sleep(wait).await;
        }
    }

    /// Waits for the answer to request `id`, sent with [`BrokerLink::send`]. The broker answers
    /// a connection's requests one at a time and in order (protocol.md 2.4), so after pipelining
    /// several requests, wait for their answers in the order they were sent.
    pub async fn answer(&mut self, id: u32) -> Result<ResponseData, LinkError> {
        let timeout = self.timeout;
        tokio::time::timeout(timeout, self.wait_response(id))
            .await
            .map_err(|_| LinkError::Timeout(timeout))?
    }

    /// Sends a request without waiting; returns its id.
    pub async fn send(&mut self, request: &Request) -> Result<u32, LinkError> {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1).max(1);
        write_frame(&mut self.writer, &request.encode(id)).await?;
        Ok(id)
    }

    async fn wait_response(&mut self, id: u32) -> Result<ResponseData, LinkError> {
        loop {
            match self.next_message().await? {
                Message::Event(event) => self.events.push_back(event),
                Message::Response(response) => {
                    if response.id != id && response.id != 0 {
                        return Err(LinkError::Protocol(format!(
                            "answer for request {} while waiting for {id}",
                            response.id
                        )));
                    }
                    return match response.result {
                        Ok(data) => Ok(data),
                        Err(e) => Err(LinkError::Refused {
                            code: e.error.code,
                            message: e.error.message,
                            retry_after: e.error.retry_after,
                        }),
                    };
                }
                Message::Request { .. } => {
                    return Err(LinkError::Protocol("the broker sent a request".into()));
                }
            }
        }
    }

    /// The next frame from the broker, decoded. Cancel-safe.
    pub async fn next_message(&mut self) -> Result<Message, LinkError> {
        let body = match self.reader.next_frame().await {
            Ok(Some(body)) => body,
            Ok(None) => return Err(LinkError::Closed),
            Err(FrameReadError::Io(e)) => return Err(LinkError::Io(e)),
            Err(e) => return Err(LinkError::Protocol(e.to_string())),
        };
        Message::decode(&body, &self.limits).map_err(|e| LinkError::Protocol(e.to_string()))
    }

    /// The next pushed event (queued ones first). Cancel-safe.
    pub async fn next_event(&mut self) -> Result<Event, LinkError> {
        if let Some(event) = self.events.pop_front() {
            return Ok(event);
        }
        match self.next_message().await? {
            Message::Event(event) => Ok(event),
            Message::Response(r) => Err(LinkError::Protocol(format!(
                "unexpected answer to request {}",
                r.id
            ))),
            Message::Request { .. } => Err(LinkError::Protocol("the broker sent a request".into())),
        }
    }

    /// Events already received and queued.
    pub fn take_queued_events(&mut self) -> Vec<Event> {
        self.events.drain(..).collect()
    }

    /// The mutual LOGIN: proves the client secret for the current nonce step, and checks that
    /// the broker's answer proves the server secret for the same step on this connection.
    pub async fn login(
        &mut self,
        number: &str,
        device: u32,
        client_secret: &Secret32,
        server_secret: &Secret32,
        step_secs: u32,
        now_unix: u64,
    ) -> Result<LoginData, LinkError> {
        let binding = self.binding;
        let ctx = NonceContext {
            entity: number,
            device,
            binding: &binding,
        };
        let (step, client_nonce) = nonce::compute_now(
            client_secret,
            Direction::ClientToBroker,
            &ctx,
            now_unix,
            u64::from(step_secs.max(1)),
        )
        .map_err(|e| LinkError::Protocol(format!("computing the login nonce: {e}")))?;
        let request = Request::Login(LoginArgs {
            entity: Number::new(number)
                .map_err(|e| LinkError::Protocol(format!("profile number: {e}")))?,
            device: DeviceId::new(device)
                .map_err(|e| LinkError::Protocol(format!("profile device: {e}")))?,
            secret: Hex32::from_bytes(client_nonce),
        });
        let data = match self.call(request).await? {
            ResponseData::Login(data) => data,
            other => {
                return Err(LinkError::Protocol(format!(
                    "LOGIN answered with {}",
                    other.kind().as_str()
                )));
            }
        };
        // The broker matched our nonce, so it must answer for our step; anything else is
        // either a bug or an attempt to make us accept a proof for another moment.
        let expected = nonce::compute(server_secret, Direction::BrokerToClient, &ctx, step)
            .map_err(|e| LinkError::Protocol(format!("computing the broker proof: {e}")))?;
        let proof_ok = expected.ct_eq(data.proof.as_bytes());
        if data.step != step || !bool::from(proof_ok) {
            return Err(LinkError::BrokerNotVerified);
        }
        self.client_ip = data.client_ip.as_deref().and_then(|ip| ip.parse().ok());
        Ok(data)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use micromsg_wire::ErrorCode;

    use super::{LinkError, RATE_LIMIT_RETRIES, RATE_LIMIT_WAIT_MAX, rate_limit_wait};

    fn refused(code: ErrorCode, retry_after: Option<u32>) -> Result<(), LinkError> {
        Err(LinkError::Refused {
            code,
            message: "no".into(),
            retry_after,
        })
    }

    fn limited(secs: u32) -> Result<(), LinkError> {
        refused(ErrorCode::RateLimited, Some(secs))
    }

    #[test]
    fn a_short_rate_limit_is_waited_out_for_as_long_as_it_says() {
        assert_eq!(RATE_LIMIT_WAIT_MAX, 2);
        assert_eq!(
            rate_limit_wait(&limited(1), 0),
            Some(Duration::from_secs(1))
        );
        assert_eq!(
            rate_limit_wait(&limited(2), 0),
            Some(Duration::from_secs(2))
        );
        // "Retry after 0 s" still waits a second.
        assert_eq!(
            rate_limit_wait(&limited(0), 0),
            Some(Duration::from_secs(1))
        );
        // Longer than the most it waits by itself: the caller decides.
        assert_eq!(rate_limit_wait(&limited(3), 0), None);
    }

    #[test]
    fn only_a_rate_limit_with_a_wait_is_retried_and_only_three_times() {
        assert_eq!(RATE_LIMIT_RETRIES, 3);
        for retries in 0..RATE_LIMIT_RETRIES {
            assert_eq!(
                rate_limit_wait(&limited(1), retries),
                Some(Duration::from_secs(1))
            );
        }
        assert_eq!(rate_limit_wait(&limited(1), RATE_LIMIT_RETRIES), None);
        assert_eq!(
            rate_limit_wait(&refused(ErrorCode::RateLimited, None), 0),
            None
        );
        assert_eq!(
            rate_limit_wait(&refused(ErrorCode::BadSecret, Some(1)), 0),
            None
        );
        assert_eq!(rate_limit_wait(&Ok(()), 0), None);
        let lost: Result<(), LinkError> = Err(LinkError::Closed);
        assert_eq!(rate_limit_wait(&lost, 0), None);
    }
}
