//! The client-to-client (P2P) handshake: INIT, ACCEPT, FINISH; transcript, signatures and key
//! schedule, as a sans-IO state machine.
//!
//! ```text
//! I -> R  INIT   0x01 || version(1) || token_id(16) || nonce_i || proof_i || id_i || eph_i
//! R -> I  ACCEPT 0x02 || nonce_r || proof_r || id_r || eph_r || sig_r
//! I -> R  FINISH 0x03 || sig_i
//!
//! proof_i = HMAC(token, "micromsg/p2p-proof/v1" || 0x01 || nonce_i)
//! proof_r = HMAC(token, "micromsg/p2p-proof/v1" || 0x02 || nonce_i || nonce_r)
//! H       = SHA-256("micromsg/p2p-transcript/v1" || nonce_i || proof_i || id_i || eph_i
//!                   || nonce_r || proof_r || id_r || eph_r)
//! sig_x   = Ed25519(id_x, "micromsg/p2p-sig/v1" || role byte || H)   (0x01 = I, 0x02 = R)
//! PRK     = HKDF-Extract(salt = H, IKM = X25519(eph) || token)
//! ```
//!
//! [`Initiator`] and [`Responder`] consume their state on each step, so a step cannot be run
//! twice. Neither pins identities: both hand the peer's [`IdentityPublicKey`] to the caller,
//! which must compare it with what it has pinned before it sends the next message.

use core::fmt;

use rand_core::CryptoRngCore;
use subtle::ConstantTimeEq;
use thiserror::Error;

use crate::agreement::{AgreementError, EphemeralSecret};
use crate::identity::{IdentityError, IdentityKey, IdentityPublicKey, SIGNATURE_LEN, Signature};
use crate::kdf;
use crate::message::DirectionKeys;
use crate::secret::Secret32;

/// Protocol version carried in INIT.
pub const VERSION: u8 = 1;
/// Length of the connect token.
pub const TOKEN_LEN: usize = 32;
/// Length of a token id.
pub const TOKEN_ID_LEN: usize = 16;
/// Length of the random nonces.
pub const NONCE_LEN: usize = 32;
/// Length of a token proof.
pub const PROOF_LEN: usize = 32;
/// Length of a session id.
pub const SESSION_ID_LEN: usize = 16;
/// Frame type byte of INIT.
pub const TYPE_INIT: u8 = 0x01;
/// Frame type byte of ACCEPT.
pub const TYPE_ACCEPT: u8 = 0x02;
/// Frame type byte of FINISH.
pub const TYPE_FINISH: u8 = 0x03;
/// Frame type byte of ABORT.
pub const TYPE_ABORT: u8 = 0x7f;
/// Encoded length of INIT.
pub const INIT_LEN: usize = 146;
/// Encoded length of ACCEPT.
pub const ACCEPT_LEN: usize = 193;
/// Encoded length of FINISH.
pub const FINISH_LEN: usize = 65;
/// Encoded length of ABORT.
pub const ABORT_LEN: usize = 2;

const TOKEN_ID_LABEL: &[u8] = b"micromsg/p2p-token-id/v1";
const PROOF_LABEL: &[u8] = b"micromsg/p2p-proof/v1";
const TRANSCRIPT_LABEL: &[u8] = b"micromsg/p2p-transcript/v1";
const SIG_LABEL: &[u8] = b"micromsg/p2p-sig/v1";
const INFO_TS_I2R: &[u8] = b"micromsg/p2p/v1 timestamp i2r";
const INFO_TS_R2I: &[u8] = b"micromsg/p2p/v1 timestamp r2i";
const INFO_SEED_I2R: &[u8] = b"micromsg/p2p/v1 seed i2r";
const INFO_SEED_R2I: &[u8] = b"micromsg/p2p/v1 seed r2i";
const INFO_SESSION_ID: &[u8] = b"micromsg/p2p/v1 session id";

/// Which end of the handshake we are; also the role byte in proofs and signatures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Role {
    /// The contacter, who connects.
    Initiator = 0x01,
    /// The target, who listens.
    Responder = 0x02,
}

/// Reason byte of an ABORT frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
#[non_exhaustive]
pub enum AbortReason {
    /// Unknown token or wrong proof.
    BadToken = 1,
    /// A signature or identity key was refused.
    BadSignature = 2,
    /// INIT carried a version we do not speak.
    UnsupportedVersion = 3,
    /// Anything else: malformed frame, low-order key, unexpected frame.
    ProtocolError = 4,
}

impl AbortReason {
    /// Decodes a reason byte; unknown values read as [`AbortReason::ProtocolError`].
    pub fn from_byte(b: u8) -> Self {
        match b {
            1 => Self::BadToken,
            2 => Self::BadSignature,
            3 => Self::UnsupportedVersion,
            _ => Self::ProtocolError,
        }
    }

    /// The ABORT frame body for this reason.
    pub fn encode(self) -> [u8; ABORT_LEN] {
        [TYPE_ABORT, self as u8]
    }
}

/// Errors of the handshake. [`HandshakeError::abort_reason`] says what ABORT to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum HandshakeError {
    /// The frame has the wrong type or length.
    #[error("malformed {0} frame")]
    Malformed(&'static str),
    /// INIT carries another protocol version.
    #[error("unsupported handshake version {0}")]
    UnsupportedVersion(u8),
    /// No pending token has this id.
    #[error("unknown connect token")]
    UnknownToken,
    /// The token proof does not match.
    #[error("token proof mismatch")]
    BadProof,
    /// The peer's identity key is not acceptable.
    #[error("peer identity key: {0}")]
    InvalidIdentity(IdentityError),
    /// The peer's transcript signature does not verify.
    #[error("bad transcript signature")]
    BadSignature,
    /// The peer's ephemeral key has low order.
    #[error("key agreement: {0}")]
    Agreement(#[from] AgreementError),
    /// The peer sent ABORT.
    #[error("peer aborted the handshake: {0:?}")]
    PeerAborted(AbortReason),
}

impl HandshakeError {
    /// The ABORT reason to send the peer for this error, or `None` when the peer aborted.
    pub fn abort_reason(&self) -> Option<AbortReason> {
        match self {
            Self::Malformed(_) | Self::Agreement(_) => Some(AbortReason::ProtocolError),
            Self::UnsupportedVersion(_) => Some(AbortReason::UnsupportedVersion),
            Self::UnknownToken | Self::BadProof => Some(AbortReason::BadToken),
            Self::InvalidIdentity(_) | Self::BadSignature => Some(AbortReason::BadSignature),
            Self::PeerAborted(_) => None,
        }
    }
}

/// token_id = SHA-256("micromsg/p2p-token-id/v1" || token)[0..16].
pub fn token_id(token: &Secret32) -> [u8; TOKEN_ID_LEN] {
    let h = kdf::sha256(&[TOKEN_ID_LABEL, token.expose()]);
    core::array::from_fn(|i| h[i])
}

/// proof_i = HMAC(token, "micromsg/p2p-proof/v1" || 0x01 || nonce_i).
pub fn initiator_proof(token: &Secret32, nonce_i: &[u8; NONCE_LEN]) -> [u8; PROOF_LEN] {
    kdf::hmac_sha256(
        token.expose(),
        &[PROOF_LABEL, &[Role::Initiator as u8], nonce_i],
    )
}

/// proof_r = HMAC(token, "micromsg/p2p-proof/v1" || 0x02 || nonce_i || nonce_r).
pub fn responder_proof(
    token: &Secret32,
    nonce_i: &[u8; NONCE_LEN],
    nonce_r: &[u8; NONCE_LEN],
) -> [u8; PROOF_LEN] {
    kdf::hmac_sha256(
        token.expose(),
        &[PROOF_LABEL, &[Role::Responder as u8], nonce_i, nonce_r],
    )
}

fn check_abort(bytes: &[u8]) -> Result<(), HandshakeError> {
    if bytes.first() == Some(&TYPE_ABORT) {
        return match bytes {
            [_, reason] => Err(HandshakeError::PeerAborted(AbortReason::from_byte(*reason))),
            _ => Err(HandshakeError::Malformed("ABORT")),
        };
    }
    Ok(())
}

/// Reads fixed-size fields in order from a frame of known length.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        // Callers check the total length first, so `N <= self.0.len()` always holds here; a
        // short read would leave zeros, never panic.
        let mut out = [0u8; N];
        let n = N.min(self.0.len());
        out[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        out
    }
}

/// INIT, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Init {
    /// Protocol version, [`VERSION`].
    pub version: u8,
    /// Which pending token is meant.
    pub token_id: [u8; TOKEN_ID_LEN],
    /// The initiator's random nonce.
    pub nonce_i: [u8; NONCE_LEN],
    /// Proof of the token.
    pub proof_i: [u8; PROOF_LEN],
    /// The initiator's identity key.
    pub id_i: [u8; 32],
    /// The initiator's ephemeral X25519 key.
    pub eph_i: [u8; 32],
}

impl Init {
    /// The 146-byte frame body.
    pub fn encode(&self) -> [u8; INIT_LEN] {
        let mut out = [0u8; INIT_LEN];
        out[0] = TYPE_INIT;
        out[1] = self.version;
        out[2..18].copy_from_slice(&self.token_id);
        out[18..50].copy_from_slice(&self.nonce_i);
        out[50..82].copy_from_slice(&self.proof_i);
        out[82..114].copy_from_slice(&self.id_i);
        out[114..146].copy_from_slice(&self.eph_i);
        out
    }

    /// Parses a frame body. A version other than [`VERSION`] is refused before the length is
    /// checked, since another version may have another layout.
    pub fn decode(bytes: &[u8]) -> Result<Self, HandshakeError> {
        check_abort(bytes)?;
        if bytes.first() != Some(&TYPE_INIT) {
            return Err(HandshakeError::Malformed("INIT"));
        }
        match bytes.get(1) {
            Some(&VERSION) => {}
            Some(&v) => return Err(HandshakeError::UnsupportedVersion(v)),
            None => return Err(HandshakeError::Malformed("INIT")),
        }
        if bytes.len() != INIT_LEN {
            return Err(HandshakeError::Malformed("INIT"));
        }
        let mut r = Reader(&bytes[2..]);
        Ok(Self {
            version: VERSION,
            token_id: r.take(),
            nonce_i: r.take(),
            proof_i: r.take(),
            id_i: r.take(),
            eph_i: r.take(),
        })
    }
}

/// ACCEPT, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accept {
    /// The responder's random nonce.
    pub nonce_r: [u8; NONCE_LEN],
    /// Proof of the token, bound to both nonces.
    pub proof_r: [u8; PROOF_LEN],
    /// The responder's identity key.
    pub id_r: [u8; 32],
    /// The responder's ephemeral X25519 key.
    pub eph_r: [u8; 32],
    /// The responder's signature over the transcript hash.
    pub sig_r: Signature,
}

impl Accept {
    /// The 193-byte frame body.
    pub fn encode(&self) -> [u8; ACCEPT_LEN] {
        let mut out = [0u8; ACCEPT_LEN];
        out[0] = TYPE_ACCEPT;
        out[1..33].copy_from_slice(&self.nonce_r);
        out[33..65].copy_from_slice(&self.proof_r);
        out[65..97].copy_from_slice(&self.id_r);
        out[97..129].copy_from_slice(&self.eph_r);
        out[129..193].copy_from_slice(&self.sig_r);
        out
    }

    /// Parses a frame body.
    pub fn decode(bytes: &[u8]) -> Result<Self, HandshakeError> {
        check_abort(bytes)?;
        if bytes.len() != ACCEPT_LEN || bytes[0] != TYPE_ACCEPT {
            return Err(HandshakeError::Malformed("ACCEPT"));
        }
        let mut r = Reader(&bytes[1..]);
        Ok(Self {
            nonce_r: r.take(),
            proof_r: r.take(),
            id_r: r.take(),
            eph_r: r.take(),
            sig_r: r.take(),
        })
    }
}

/// FINISH, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finish {
    /// The initiator's signature over the transcript hash.
    pub sig_i: Signature,
}

impl Finish {
    /// The 65-byte frame body.
    pub fn encode(&self) -> [u8; FINISH_LEN] {
        let mut out = [0u8; FINISH_LEN];
        out[0] = TYPE_FINISH;
        out[1..].copy_from_slice(&self.sig_i);
        out
    }

    /// Parses a frame body.
    pub fn decode(bytes: &[u8]) -> Result<Self, HandshakeError> {
        check_abort(bytes)?;
        if bytes.len() != FINISH_LEN || bytes[0] != TYPE_FINISH {
            return Err(HandshakeError::Malformed("FINISH"));
        }
        Ok(Self {
            sig_i: Reader(&bytes[1..]).take::<SIGNATURE_LEN>(),
        })
    }
}

/// H: SHA-256 over the label and every INIT and ACCEPT field except the token id, the version
/// and `sig_r` (which signs H).
pub fn transcript_hash(init: &Init, accept: &Accept) -> [u8; 32] {
    kdf::sha256(&[
        TRANSCRIPT_LABEL,
        &init.nonce_i,
        &init.proof_i,
        &init.id_i,
        &init.eph_i,
        &accept.nonce_r,
        &accept.proof_r,
        &accept.id_r,
        &accept.eph_r,
    ])
}

/// What `role` signs: "micromsg/p2p-sig/v1" || role byte || H.
pub fn signed_message(role: Role, transcript_hash: &[u8; 32]) -> [u8; 52] {
    let mut out = [0u8; 52];
    out[..19].copy_from_slice(SIG_LABEL);
    out[19] = role as u8;
    out[20..].copy_from_slice(transcript_hash);
    out
}

/// Every key the handshake derives. Kept whole for the known-answer vectors; sessions use
/// [`KeySchedule::session_keys`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySchedule {
    /// HKDF-Extract(salt = H, IKM = shared || token).
    pub prk: Secret32,
    /// Header key, initiator to responder.
    pub ts_key_i2r: Secret32,
    /// Header key, responder to initiator.
    pub ts_key_r2i: Secret32,
    /// Message-key seed, initiator to responder.
    pub seed_i2r: Secret32,
    /// Message-key seed, responder to initiator.
    pub seed_r2i: Secret32,
    /// Names the session (offline envelopes carry it in clear).
    pub session_id: [u8; SESSION_ID_LEN],
}

impl KeySchedule {
    /// Derives every key from the X25519 shared secret, the token and H.
    pub fn derive(shared: &Secret32, token: &Secret32, transcript_hash: &[u8; 32]) -> Self {
        let prk = kdf::extract_multi(transcript_hash, &[shared.expose(), token.expose()]);
        let mut session_id = [0u8; SESSION_ID_LEN];
        // 16 bytes from a 32-byte PRK is within HKDF's limits.
        if kdf::expand(prk.expose(), INFO_SESSION_ID, &mut session_id).is_err() {
            unreachable!("16-byte HKDF expand from a 32-byte PRK cannot fail");
        }
        Self {
            ts_key_i2r: kdf::expand_secret(&prk, INFO_TS_I2R),
            ts_key_r2i: kdf::expand_secret(&prk, INFO_TS_R2I),
            seed_i2r: kdf::expand_secret(&prk, INFO_SEED_I2R),
            seed_r2i: kdf::expand_secret(&prk, INFO_SEED_R2I),
            session_id,
            prk,
        }
    }

    /// The keys `role` sends and receives with.
    pub fn session_keys(&self, role: Role) -> SessionKeys {
        let i2r = DirectionKeys {
            ts_key: self.ts_key_i2r.clone(),
            seed: self.seed_i2r.clone(),
        };
        let r2i = DirectionKeys {
            ts_key: self.ts_key_r2i.clone(),
            seed: self.seed_r2i.clone(),
        };
        let (send, recv) = match role {
            Role::Initiator => (i2r, r2i),
            Role::Responder => (r2i, i2r),
        };
        SessionKeys {
            session_id: self.session_id,
            send,
            recv,
        }
    }
}

/// One side's keys for an established session. Secrets zeroize on drop and are redacted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionKeys {
    /// Names the session; carried in clear by offline envelopes.
    pub session_id: [u8; SESSION_ID_LEN],
    /// Keys for what we send.
    pub send: DirectionKeys,
    /// Keys for what we receive.
    pub recv: DirectionKeys,
}

/// What the initiator gets from a valid ACCEPT.
#[derive(Debug)]
pub struct InitiatorOutcome {
    /// The session keys.
    pub keys: SessionKeys,
    /// The FINISH frame body to send, once `peer_identity` is accepted.
    pub finish: [u8; FINISH_LEN],
    /// The responder's identity key, to compare with the pinned one.
    pub peer_identity: IdentityPublicKey,
}

/// The initiator after sending INIT, waiting for ACCEPT.
pub struct Initiator {
    identity: IdentityKey,
    token: Secret32,
    eph: EphemeralSecret,
    init: Init,
}

impl fmt::Debug for Initiator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Initiator")
            .field("identity", &self.identity)
            .field("token_id", &crate::hex::encode(&self.init.token_id))
            .finish_non_exhaustive()
    }
}

impl Initiator {
    /// Starts a handshake with a fresh nonce and ephemeral key; returns the INIT frame body.
    pub fn new<R: CryptoRngCore + ?Sized>(
        rng: &mut R,
        identity: &IdentityKey,
        token: &Secret32,
    ) -> (Self, [u8; INIT_LEN]) {
        let mut nonce_i = [0u8; NONCE_LEN];
        rng.fill_bytes(&mut nonce_i);
        let eph = EphemeralSecret::generate(rng);
        Self::from_parts(identity, token, nonce_i, eph)
    }

    /// Starts a handshake with a given nonce and ephemeral key. For known-answer vectors and
    /// tests; production code uses [`Initiator::new`].
    pub fn from_parts(
        identity: &IdentityKey,
        token: &Secret32,
        nonce_i: [u8; NONCE_LEN],
        eph: EphemeralSecret,
    ) -> (Self, [u8; INIT_LEN]) {
        let init = Init {
            version: VERSION,
            token_id: token_id(token),
            proof_i: initiator_proof(token, &nonce_i),
            nonce_i,
            id_i: *identity.public_key().as_bytes(),
            eph_i: eph.public_key(),
        };
        let bytes = init.encode();
        let state = Self {
            identity: identity.clone(),
            token: token.clone(),
            eph,
            init,
        };
        (state, bytes)
    }

    /// Checks ACCEPT (proof, identity, signature, ephemeral key) and derives the session.
    pub fn handle_accept(self, bytes: &[u8]) -> Result<InitiatorOutcome, HandshakeError> {
        let accept = Accept::decode(bytes)?;
        let expected = responder_proof(&self.token, &self.init.nonce_i, &accept.nonce_r);
        if !bool::from(expected.ct_eq(&accept.proof_r)) {
            return Err(HandshakeError::BadProof);
        }
        let peer_identity =
            IdentityPublicKey::from_bytes(&accept.id_r).map_err(HandshakeError::InvalidIdentity)?;
        let h = transcript_hash(&self.init, &accept);
        peer_identity
            .verify(&signed_message(Role::Responder, &h), &accept.sig_r)
            .map_err(|_| HandshakeError::BadSignature)?;
        let shared = self.eph.diffie_hellman(&accept.eph_r)?;
        let schedule = KeySchedule::derive(&shared, &self.token, &h);
        let finish = Finish {
            sig_i: self.identity.sign(&signed_message(Role::Initiator, &h)),
        };
        Ok(InitiatorOutcome {
            keys: schedule.session_keys(Role::Initiator),
            finish: finish.encode(),
            peer_identity,
        })
    }
}

/// The responder after sending ACCEPT, waiting for FINISH.
pub struct Responder {
    peer_identity: IdentityPublicKey,
    transcript_hash: [u8; 32],
    keys: SessionKeys,
}

impl fmt::Debug for Responder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Responder")
            .field("peer_identity", &self.peer_identity)
            .finish_non_exhaustive()
    }
}

impl Responder {
    /// Checks INIT and answers it. `lookup` maps a token id to the pending token, if any.
    /// Returns the state and the ACCEPT frame body; check [`Responder::peer_identity`] against
    /// the pinned key before sending it.
    pub fn handle_init<R, F>(
        rng: &mut R,
        identity: &IdentityKey,
        init: &[u8],
        lookup: F,
    ) -> Result<(Self, [u8; ACCEPT_LEN]), HandshakeError>
    where
        R: CryptoRngCore + ?Sized,
        F: FnOnce(&[u8; TOKEN_ID_LEN]) -> Option<Secret32>,
    {
        let mut nonce_r = [0u8; NONCE_LEN];
        rng.fill_bytes(&mut nonce_r);
        let eph = EphemeralSecret::generate(rng);
        Self::handle_init_with(identity, init, lookup, nonce_r, eph)
    }

    /// [`Responder::handle_init`] with a given nonce and ephemeral key. For known-answer
    /// vectors and tests.
    pub fn handle_init_with<F>(
        identity: &IdentityKey,
        init: &[u8],
        lookup: F,
        nonce_r: [u8; NONCE_LEN],
        eph: EphemeralSecret,
    ) -> Result<(Self, [u8; ACCEPT_LEN]), HandshakeError>
    where
        F: FnOnce(&[u8; TOKEN_ID_LEN]) -> Option<Secret32>,
    {
        let init = Init::decode(init)?;
        let token = lookup(&init.token_id).ok_or(HandshakeError::UnknownToken)?;
        let expected = initiator_proof(&token, &init.nonce_i);
        if !bool::from(expected.ct_eq(&init.proof_i)) {
            return Err(HandshakeError::BadProof);
        }
        let peer_identity =
            IdentityPublicKey::from_bytes(&init.id_i).map_err(HandshakeError::InvalidIdentity)?;
        let shared = eph.diffie_hellman(&init.eph_i)?;
        let mut accept = Accept {
            proof_r: responder_proof(&token, &init.nonce_i, &nonce_r),
            nonce_r,
            id_r: *identity.public_key().as_bytes(),
            eph_r: eph.public_key(),
            sig_r: [0u8; SIGNATURE_LEN],
        };
        let h = transcript_hash(&init, &accept);
        accept.sig_r = identity.sign(&signed_message(Role::Responder, &h));
        let keys = KeySchedule::derive(&shared, &token, &h).session_keys(Role::Responder);
        let state = Self {
            peer_identity,
            transcript_hash: h,
            keys,
        };
        Ok((state, accept.encode()))
    }

    /// The initiator's identity key, from INIT.
    pub fn peer_identity(&self) -> &IdentityPublicKey {
        &self.peer_identity
    }

    /// Checks FINISH (the initiator's signature) and releases the session keys.
    pub fn handle_finish(self, bytes: &[u8]) -> Result<SessionKeys, HandshakeError> {
        let finish = Finish::decode(bytes)?;
        self.peer_identity
            .verify(
                &signed_message(Role::Initiator, &self.transcript_hash),
                &finish.sig_i,
            )
            .map_err(|_| HandshakeError::BadSignature)?;
        Ok(self.keys)
    }
}
