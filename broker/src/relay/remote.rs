//! A relay half that is a federation stream (`Relay` in `federation.proto`): the half of a
//! client on a peer broker. [`stream_half`] turns the gRPC frames into the byte stream the
//! splice copies, so a relay across brokers is spliced exactly like one on a broker: at each of
//! the two brokers, the local client's connection on one side and the stream on the other.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, DuplexStream, ReadBuf, ReadHalf};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tonic::Status;

use super::splice::{Ended, Ends, Half};
use crate::federation::Federation;
use crate::federation::proto::{RelayEnd, RelayFrame, RelayWaitingRequest};

/// Largest relayed chunk in one frame.
const CHUNK: usize = 16 * 1024;

/// Frames queued towards the peer before the reader waits.
const QUEUE: usize = 16;

/// A [`Half`] whose bytes are `inbound`'s frames and whose writes become frames on
/// `outbound` (chunked); `outbound` ends when the half is shut down or dropped, after a last
/// frame that says why when the splice ended for a reason of its own ([`Ends`]). A stream that
/// ends reads as the end of the half's bytes; one whose last frame says why, or that fails
/// (the peer broker went away, the connection between the brokers broke), reads as an error,
/// so the splice ends the relay with the peer's reason, or as lost, and the local client is
/// told so, not that the session ended.
pub fn stream_half<S, T>(inbound: S, outbound: mpsc::Sender<T>, wrap: fn(RelayFrame) -> T) -> Half
where
    S: tokio_stream::Stream<Item = Result<RelayFrame, Status>> + Send + Unpin + 'static,
    T: Send + 'static,
{
    let (near, far) = tokio::io::duplex(CHUNK * 4);
    let (mut far_read, mut far_write) = tokio::io::split(far);
    let failed = Arc::new(AtomicBool::new(false));
    let ends = Arc::new(Ends::default());
    // Peer → splice.
    let failing = Arc::clone(&failed);
    let told = Arc::clone(&ends);
    tokio::spawn(async move {
        let mut inbound = inbound;
        loop {
            match inbound.next().await {
                Some(Ok(frame)) => {
                    if !frame.data.is_empty() && far_write.write_all(&frame.data).await.is_err() {
                        return;
                    }
                    if let Some(theirs) = ended_of(frame.end) {
                        let _ = told.theirs.set(theirs);
                        failing.store(true, Ordering::Release);
                        break;
                    }
                }
                Some(Err(status)) => {
                    tracing::debug!(code = ?status.code(), "a relay stream from a peer broker failed");
                    // Set before the end of the bytes below, which the reader checks it at.
                    failing.store(true, Ordering::Release);
                    break;
                }
                None => break,
            }
        }
        let _ = far_write.shutdown().await;
    });
    // Splice → peer.
    let ours = Arc::clone(&ends);
    tokio::spawn(async move {
        let mut buf = vec![0u8; CHUNK];
        loop {
            match far_read.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let frame = RelayFrame {
                        relay: Vec::new(),
                        data: buf[..n].to_vec(),
                        end: RelayEnd::Unspecified.into(),
                    };
                    if outbound.send(wrap(frame)).await.is_err() {
                        return;
                    }
                }
            }
        }
        // The splice set its reason before it shut this half down (none yet: a half-close).
        // A reason the peer gave is not said back to it.
        let end = match (ours.ours.get(), ours.theirs.get()) {
            (Some(&ended), None) => end_of(ended),
            _ => RelayEnd::Unspecified,
        };
        if end != RelayEnd::Unspecified {
            let frame = RelayFrame {
                relay: Vec::new(),
                data: Vec::new(),
                end: end.into(),
            };
            let _ = outbound.send(wrap(frame)).await;
        }
    });
    let (read, write) = tokio::io::split(near);
    Half {
        read: Box::new(StreamRead {
            inner: read,
            failed,
        }),
        write: Box::new(write),
        early: Vec::new(),
        slot: None,
        ends: Some(ends),
    }
}

/// What a stream's last frame says of how this broker's splice ended.
fn end_of(ended: Ended) -> RelayEnd {
    match ended {
        Ended::Closed => RelayEnd::Unspecified,
        Ended::Lost => RelayEnd::Lost,
        Ended::Idle => RelayEnd::Idle,
        Ended::Shutdown => RelayEnd::Shutdown,
        // Said by the peer itself: nothing to tell it.
        Ended::PeerShutdown | Ended::PeerIdle => RelayEnd::Unspecified,
    }
}

/// How the peer broker's splice ended, from its stream's last frame (`None`: not the end). A
/// value this broker does not know (a newer peer's) is an end all the same: a lost half.
fn ended_of(end: i32) -> Option<Ended> {
    match RelayEnd::try_from(end) {
        Ok(RelayEnd::Unspecified) => None,
        Ok(RelayEnd::Lost) | Err(_) => Some(Ended::Lost),
        Ok(RelayEnd::Idle) => Some(Ended::Idle),
        Ok(RelayEnd::Shutdown) => Some(Ended::Shutdown),
    }
}

/// The splice's read side of a stream half: its end of bytes is an error when the stream
/// failed rather than ended.
struct StreamRead {
    inner: ReadHalf<DuplexStream>,
    failed: Arc<AtomicBool>,
}

impl AsyncRead for StreamRead {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        let at_end = buf.filled().len() == before && buf.remaining() > 0;
        if at_end && this.failed.load(Ordering::Acquire) {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "the peer broker's relay stream failed",
            )));
        }
        Poll::Ready(Ok(()))
    }
}

/// Opens `Relay` for relay `id` on peer broker `peer` (the caller's broker does, when its
/// client joins); the half that stands for the target's client.
pub async fn dial(federation: &Federation, peer: &str, id: [u8; 16]) -> Result<Half, String> {
    let link = federation
        .link(peer)
        .ok_or_else(|| format!("broker {peer} is not a peer of this network"))?
        .clone();
    let (tx, rx) = mpsc::channel::<RelayFrame>(QUEUE);
    tx.send(RelayFrame {
        relay: id.to_vec(),
        data: Vec::new(),
        end: RelayEnd::Unspecified.into(),
    })
    .await
    .map_err(|_| "the relay stream closed at once".to_owned())?;
    let mut client = link.client();
    let timeout = federation.request_timeout();
    let opened = tokio::time::timeout(
        timeout,
        client.relay(tokio_stream::wrappers::ReceiverStream::new(rx)),
    )
    .await
    .unwrap_or_else(|_| Err(Status::deadline_exceeded("opening the relay timed out")));
    let inbound = link
        .record(opened)
        .map_err(|s| format!("broker {peer} refused the relay: {}", s.message()))?
        .into_inner();
    Ok(stream_half(inbound, tx, |frame| frame))
}

/// Tells the caller's broker `peer` that the target's client joined relay `id` first.
pub fn notify_waiting(federation: &Federation, peer: &str, id: [u8; 16]) {
    let Some(link) = federation.link(peer).cloned() else {
        return;
    };
    let timeout = federation.request_timeout();
    tokio::spawn(async move {
        let mut client = link.client();
        let call = client.relay_waiting(RelayWaitingRequest { relay: id.to_vec() });
        let result = tokio::time::timeout(timeout.max(Duration::from_millis(1)), call)
            .await
            .unwrap_or_else(|_| Err(Status::deadline_exceeded("relay waiting timed out")));
        let _ = link.record(result);
    });
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn frame(data: &[u8]) -> Result<RelayFrame, Status> {
        Ok(RelayFrame {
            relay: Vec::new(),
            data: data.to_vec(),
            end: RelayEnd::Unspecified.into(),
        })
    }

    /// Everything the half yields until it ends: the bytes, then how it ended.
    async fn read_all(frames: Vec<Result<RelayFrame, Status>>) -> (Vec<u8>, io::Result<()>) {
        let (tx, _rx) = mpsc::channel::<RelayFrame>(1);
        let mut half = stream_half(tokio_stream::iter(frames), tx, |f| f);
        let mut got = Vec::new();
        let mut buf = [0u8; 64];
        loop {
            match half.read.read(&mut buf).await {
                Ok(0) => return (got, Ok(())),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) => return (got, Err(e)),
            }
        }
    }

    fn last(end: RelayEnd) -> Result<RelayFrame, Status> {
        Ok(RelayFrame {
            relay: Vec::new(),
            data: Vec::new(),
            end: end.into(),
        })
    }

    const LIMITS: super::super::splice::SpliceLimits = super::super::splice::SpliceLimits {
        bytes_per_sec: 0,
        idle: Duration::from_secs(5),
        buffer: 4096,
    };

    /// A broker that never shuts down.
    fn running() -> tokio::sync::watch::Receiver<bool> {
        tokio::sync::watch::channel(false).1
    }

    /// The half of a local client, and the client's end of it.
    fn local() -> (Half, tokio::io::DuplexStream) {
        let (client, broker) = tokio::io::duplex(1 << 16);
        let (read, write) = tokio::io::split(broker);
        let half = Half {
            read: Box::new(read),
            write: Box::new(write),
            early: Vec::new(),
            slot: None,
            ends: None,
        };
        (half, client)
    }

    /// `remote` spliced to a local client: the splice, and the client's end.
    fn spliced(remote: Half) -> (tokio::task::JoinHandle<Ended>, tokio::io::DuplexStream) {
        let (near, client) = local();
        let relay = tokio::spawn(super::super::splice::splice(
            near,
            remote,
            LIMITS,
            Arc::default(),
            running(),
        ));
        (relay, client)
    }

    #[tokio::test]
    async fn a_peer_that_says_it_is_shutting_down_ends_the_relay_with_that_reason() {
        let (tx, mut outbound) = mpsc::channel::<RelayFrame>(4);
        let frames = vec![frame(b"bye"), last(RelayEnd::Shutdown), frame(b"never")];
        let (relay, mut client) = spliced(stream_half(tokio_stream::iter(frames), tx, |f| f));
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(
            got, b"bye",
            "what came before, then the end of the client's stream"
        );
        assert_eq!(relay.await.unwrap(), Ended::PeerShutdown);
        assert_eq!(
            Ended::PeerShutdown.reason(LIMITS.idle),
            "the other side's broker is shutting down"
        );
        // Its reason is not said back to it.
        while let Some(sent) = outbound.recv().await {
            assert_eq!(sent.end(), RelayEnd::Unspecified);
        }
    }

    #[tokio::test]
    async fn a_peer_that_ended_on_its_idle_timeout_is_named_with_its_own() {
        let (tx, _outbound) = mpsc::channel::<RelayFrame>(4);
        let frames = vec![last(RelayEnd::Idle)];
        let (relay, _client) = spliced(stream_half(tokio_stream::iter(frames), tx, |f| f));
        let ended = relay.await.unwrap();
        assert_eq!(ended, Ended::PeerIdle);
        assert_eq!(
            ended.reason(LIMITS.idle),
            "nothing was relayed for the other side's broker's idle timeout"
        );
    }

    #[test]
    fn an_end_this_broker_does_not_know_is_a_lost_half() {
        assert_eq!(ended_of(0), None);
        assert_eq!(ended_of(RelayEnd::Shutdown.into()), Some(Ended::Shutdown));
        assert_eq!(ended_of(99), Some(Ended::Lost));
    }

    #[tokio::test]
    async fn a_reason_the_peer_gave_is_not_said_back_to_it() {
        let (tx, mut outbound) = mpsc::channel::<RelayFrame>(4);
        let frames = vec![last(RelayEnd::Lost)];
        let (relay, _client) = spliced(stream_half(tokio_stream::iter(frames), tx, |f| f));
        assert_eq!(relay.await.unwrap(), Ended::Lost);
        while let Some(sent) = outbound.recv().await {
            assert_eq!(sent.end(), RelayEnd::Unspecified);
        }
    }

    /// A relay spliced between a local client and a peer broker that sends nothing: the
    /// splice, the client's end, what the half sends the peer, and the peer's sending side
    /// (to keep the stream open).
    #[allow(clippy::type_complexity)]
    fn spliced_to_a_quiet_peer() -> (
        tokio::task::JoinHandle<Ended>,
        tokio::io::DuplexStream,
        mpsc::Receiver<RelayFrame>,
        mpsc::Sender<Result<RelayFrame, Status>>,
    ) {
        let (peer, inbound) = mpsc::channel::<Result<RelayFrame, Status>>(4);
        let (tx, outbound) = mpsc::channel::<RelayFrame>(4);
        let remote = stream_half(
            tokio_stream::wrappers::ReceiverStream::new(inbound),
            tx,
            |f| f,
        );
        let (relay, client) = spliced(remote);
        (relay, client, outbound, peer)
    }

    #[tokio::test(start_paused = true)]
    async fn a_splice_that_ends_for_a_reason_of_its_own_says_it_to_the_peer_last() {
        let (relay, mut client, mut outbound, _peer) = spliced_to_a_quiet_peer();
        client.write_all(b"hello").await.unwrap();
        assert_eq!(relay.await.unwrap(), Ended::Idle);
        let first = outbound.recv().await.unwrap();
        assert_eq!(first.data, b"hello");
        let end = outbound.recv().await.unwrap();
        assert_eq!((end.end(), end.data.len()), (RelayEnd::Idle, 0));
        assert!(outbound.recv().await.is_none(), "the stream ends after it");
    }

    #[tokio::test]
    async fn a_relay_that_ends_in_order_sends_no_reason() {
        let (_relay, mut client, mut outbound, _peer) = spliced_to_a_quiet_peer();
        client.write_all(b"done").await.unwrap();
        client.shutdown().await.unwrap();
        assert_eq!(outbound.recv().await.unwrap().data, b"done");
        // The client's half-close ends the stream at once, with no reason in it.
        assert!(outbound.recv().await.is_none());
    }

    #[tokio::test]
    async fn a_stream_that_ends_is_the_end_of_the_bytes() {
        let (got, end) = read_all(vec![frame(b"hello "), frame(b""), frame(b"there")]).await;
        assert_eq!(got, b"hello there");
        assert!(end.is_ok(), "{end:?}");
    }

    #[tokio::test]
    async fn a_stream_that_fails_reads_as_an_error_after_its_bytes() {
        let (got, end) = read_all(vec![
            frame(b"hello"),
            Err(Status::unavailable("connection reset")),
            frame(b"never read"),
        ])
        .await;
        assert_eq!(got, b"hello");
        let e = end.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionAborted, "{e}");
    }
}
