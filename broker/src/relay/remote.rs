//! A relay half that is a federation stream (`Relay` in `federation.proto`): the half of a
//! client on a peer broker. [`stream_half`] turns the gRPC frames into the byte stream the
//! splice copies, so a relay across brokers is spliced exactly like one on a broker: at each of
//! the two brokers, the local client's connection on one side and the stream on the other.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tonic::Status;

use super::splice::Half;
use crate::federation::Federation;
use crate::federation::proto::{RelayFrame, RelayWaitingRequest};

/// Largest relayed chunk in one frame.
const CHUNK: usize = 16 * 1024;

/// Frames queued towards the peer before the reader waits.
const QUEUE: usize = 16;

/// A [`Half`] whose bytes are `inbound`'s frames and whose writes become frames on
/// `outbound` (chunked); `outbound` ends when the half is shut down or dropped.
pub fn stream_half<S, T>(inbound: S, outbound: mpsc::Sender<T>, wrap: fn(RelayFrame) -> T) -> Half
where
    S: tokio_stream::Stream<Item = Result<RelayFrame, Status>> + Send + Unpin + 'static,
    T: Send + 'static,
{
    let (near, far) = tokio::io::duplex(CHUNK * 4);
    let (mut far_read, mut far_write) = tokio::io::split(far);
    // Peer → splice.
    tokio::spawn(async move {
        let mut inbound = inbound;
        while let Some(Ok(frame)) = inbound.next().await {
            if !frame.data.is_empty() && far_write.write_all(&frame.data).await.is_err() {
                return;
            }
        }
        let _ = far_write.shutdown().await;
    });
    // Splice → peer.
    tokio::spawn(async move {
        let mut buf = vec![0u8; CHUNK];
        loop {
            match far_read.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    let frame = RelayFrame {
                        relay: Vec::new(),
                        data: buf[..n].to_vec(),
                    };
                    if outbound.send(wrap(frame)).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    let (read, write) = tokio::io::split(near);
    Half {
        read: Box::new(read),
        write: Box::new(write),
        early: Vec::new(),
        slot: None,
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
