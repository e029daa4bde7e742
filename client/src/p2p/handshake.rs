//! The handshake pump: INIT / ACCEPT / FINISH through the crypto crate's state machines, ABORT
//! on refusal, all under [`SessionConfig::handshake_timeout`].

use micromsg_crypto::handshake::{AbortReason, HandshakeError, Init, Initiator, Responder, Role};
use micromsg_crypto::identity::{IdentityKey, IdentityPublicKey};
use micromsg_crypto::{Secret32, handshake::TOKEN_ID_LEN};
use micromsg_wire::io::{FrameReadError, FrameReader, write_frame};
use rand_core::OsRng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, ToSocketAddrs};
use tokio::time::timeout;

use super::session::SessionWrite;
use super::{Established, P2pError, PeerStream, ReadSide, SessionConfig, Transport, WriteSide};

/// Connects to `addr` and runs the handshake as initiator with the connect `token`, accepting
/// whatever identity the peer proves (check [`Established::peer_identity`] against the pin).
pub async fn connect(
    addr: impl ToSocketAddrs,
    token: &Secret32,
    identity: &IdentityKey,
    cfg: SessionConfig,
) -> Result<Established, P2pError> {
    cfg.validate()?;
    let limit = cfg.handshake_timeout;
    let stream = timeout(limit, TcpStream::connect(addr))
        .await
        .map_err(|_| P2pError::Timeout(limit))?
        .map_err(P2pError::Connect)?;
    initiate(stream, token, identity, cfg, |_| true).await
}

/// Runs the handshake as responder on an accepted connection. `lookup` maps the INIT's token
/// id to the pending connect token, if any (see [`respond`] for when to forget the token).
pub async fn accept<L>(
    stream: impl Into<PeerStream>,
    lookup: L,
    identity: &IdentityKey,
    cfg: SessionConfig,
) -> Result<Established, P2pError>
where
    L: AsyncFnOnce([u8; TOKEN_ID_LEN]) -> Option<Secret32>,
{
    respond(stream, lookup, identity, cfg, |_, _| true).await
}

/// The initiator's handshake on a connected stream (a [`TcpStream`] or a relay's
/// [`crate::relay::Relayed`]). `check` sees the responder's
/// (authenticated) identity key before FINISH is sent; `false` sends ABORT 2 and fails with
/// [`P2pError::PeerRefused`].
pub async fn initiate<C>(
    stream: impl Into<PeerStream>,
    token: &Secret32,
    identity: &IdentityKey,
    cfg: SessionConfig,
    check: C,
) -> Result<Established, P2pError>
where
    C: FnOnce(&IdentityPublicKey) -> bool,
{
    cfg.validate()?;
    let (mut reader, mut writer, peer_addr) = split(stream.into(), &cfg);
    let limit = cfg.handshake_timeout;
    let outcome = timeout(limit, async {
        let (state, init) = Initiator::new(&mut OsRng, identity, token);
        write_frame(&mut writer, &init).await?;
        let accept = read_frame(&mut reader, &mut writer).await?;
        let outcome = match state.handle_accept(&accept) {
            Ok(outcome) => outcome,
            Err(e) => return Err(refuse(&mut writer, e).await),
        };
        if !check(&outcome.peer_identity) {
            send_abort(&mut writer, AbortReason::BadSignature).await;
            return Err(P2pError::PeerRefused);
        }
        write_frame(&mut writer, &outcome.finish).await?;
        Ok(outcome)
    })
    .await
    .map_err(|_| P2pError::Timeout(limit))
    .flatten();
    let outcome = ended_in_order(&mut writer, outcome, &cfg).await?;
    Ok(Established {
        peer_identity: outcome.peer_identity,
        token_id: micromsg_crypto::handshake::token_id(token),
        keys: outcome.keys,
        role: Role::Initiator,
        transport: Transport {
            reader,
            writer,
            peer_addr,
            cfg,
        },
    })
}

/// The responder's handshake on an accepted stream.
///
/// `lookup` is called once, with the INIT's token id, before the token proof is checked. It is
/// async so that a listener can wait a moment for a token it has not been told yet: the
/// broker's CONTACT-CONNECTING event races the initiator's connection (protocol 7.3).
/// Protocol 12.3 says a *verified* INIT spends the token: forget it when this returns `Ok`, or
/// an error other than [`HandshakeError::UnknownToken`] / [`HandshakeError::BadProof`] (a
/// listener that simply takes the token out in `lookup` is stricter, and also fine).
///
/// `check` sees the token id and the initiator's identity key before ACCEPT is sent; `false`
/// sends ABORT 2 and fails with [`P2pError::PeerRefused`].
pub async fn respond<L, C>(
    stream: impl Into<PeerStream>,
    lookup: L,
    identity: &IdentityKey,
    cfg: SessionConfig,
    check: C,
) -> Result<Established, P2pError>
where
    L: AsyncFnOnce([u8; TOKEN_ID_LEN]) -> Option<Secret32>,
    C: FnOnce(&[u8; TOKEN_ID_LEN], &IdentityPublicKey) -> bool,
{
    cfg.validate()?;
    let (mut reader, mut writer, peer_addr) = split(stream.into(), &cfg);
    let limit = cfg.handshake_timeout;
    let answered = timeout(limit, async {
        let init = read_frame(&mut reader, &mut writer).await?;
        // A malformed INIT is refused by `handle_init` itself, without a lookup.
        let token = match Init::decode(&init) {
            Ok(parsed) => lookup(parsed.token_id).await,
            Err(_) => None,
        };
        let mut token_id = [0u8; TOKEN_ID_LEN];
        let answered = Responder::handle_init(&mut OsRng, identity, &init, |id| {
            token_id = *id;
            token
        });
        let (state, accept) = match answered {
            Ok(answer) => answer,
            Err(e) => return Err(refuse(&mut writer, e).await),
        };
        let peer_identity = *state.peer_identity();
        if !check(&token_id, &peer_identity) {
            send_abort(&mut writer, AbortReason::BadSignature).await;
            return Err(P2pError::PeerRefused);
        }
        write_frame(&mut writer, &accept).await?;
        let finish = read_frame(&mut reader, &mut writer).await?;
        match state.handle_finish(&finish) {
            Ok(keys) => Ok((keys, peer_identity, token_id)),
            Err(e) => Err(refuse(&mut writer, e).await),
        }
    })
    .await
    .map_err(|_| P2pError::Timeout(limit))
    .flatten();
    let (keys, peer_identity, token_id) = ended_in_order(&mut writer, answered, &cfg).await?;
    Ok(Established {
        peer_identity,
        keys,
        token_id,
        role: Role::Responder,
        transport: Transport {
            reader,
            writer,
            peer_addr,
            cfg,
        },
    })
}

fn split(
    stream: PeerStream,
    cfg: &SessionConfig,
) -> (
    FrameReader<ReadSide>,
    WriteSide,
    Option<std::net::SocketAddr>,
) {
    match stream {
        PeerStream::Direct(stream) => {
            let peer_addr = stream.peer_addr().ok();
            // Messages are small and interactive; the session batches writes itself.
            let _ = stream.set_nodelay(true);
            let (read, write) = stream.into_split();
            let read: ReadSide = Box::new(read);
            (
                FrameReader::new(read, cfg.max_frame_len),
                Box::new(write),
                peer_addr,
            )
        }
        PeerStream::Relayed(relayed) => {
            let (tls, early) = relayed.into_parts();
            let (read, write) = tokio::io::split(tls);
            // The peer's first bytes may have come in with the RELAY answer.
            let read: ReadSide = Box::new(std::io::Cursor::new(early).chain(read));
            let write: WriteSide = Box::new(write);
            (FrameReader::new(read, cfg.max_frame_len), write, None)
        }
    }
}

/// Passes a handshake's result on; when it failed, first closes a stream that holds writes
/// back (a relay's TLS) in order, bounded by `close_timeout`, so the broker sees the half end
/// and not a lost connection (protocol.md 6.26). A direct socket is just dropped.
async fn ended_in_order<T>(
    writer: &mut WriteSide,
    result: Result<T, P2pError>,
    cfg: &SessionConfig,
) -> Result<T, P2pError> {
    if result.is_err() && writer.holds_writes() {
        let _ = timeout(cfg.close_timeout, writer.shutdown()).await;
    }
    result
}

/// The next handshake frame; a bad length is answered with ABORT 4.
async fn read_frame(
    reader: &mut FrameReader<ReadSide>,
    writer: &mut WriteSide,
) -> Result<Vec<u8>, P2pError> {
    match reader.next_frame().await {
        Ok(Some(frame)) => Ok(frame),
        Ok(None) => Err(P2pError::Closed),
        Err(e @ FrameReadError::BadLength { .. }) => {
            send_abort(writer, AbortReason::ProtocolError).await;
            Err(P2pError::Frame(e))
        }
        Err(FrameReadError::Io(e)) => Err(P2pError::Io(e)),
        Err(e) => Err(P2pError::Frame(e)),
    }
}

/// Sends the ABORT the error calls for (none when the peer aborted) and returns the error.
async fn refuse(writer: &mut WriteSide, e: HandshakeError) -> P2pError {
    if let Some(reason) = e.abort_reason() {
        send_abort(writer, reason).await;
    }
    P2pError::Handshake(e)
}

/// Best effort: the connection is closed right after, whether or not the ABORT got out.
async fn send_abort(writer: &mut WriteSide, reason: AbortReason) {
    let _ = write_frame(writer, &reason.encode()).await;
}
