//! The pure cryptographic core of MicroMsg.
//!
//! Everything here is a function of its arguments: no I/O, no clock (time is a `unix_secs`
//! argument) and no ambient randomness (functions that need it take a
//! [`rand_core::CryptoRngCore`]; production passes `OsRng`, tests a seeded generator). The
//! broker and the client call in with bytes and get bytes back. The normative byte layouts are
//! in `docs/protocol.md`; `tests/vectors/micromsg.json` pins them.
//!
//! # Layout
//!
//! Primitives, thin wrappers over audited RustCrypto and dalek crates:
//! - [`secret`]: [`Secret32`], the container for every 32-byte secret (zeroize on drop,
//!   redacted `Debug`, constant-time equality, hex).
//! - [`hex`]: lowercase hex, the encoding of binary values on the YAML wire.
//! - [`kdf`]: SHA-256, HMAC-SHA256 and HKDF-SHA256.
//! - [`aead`]: ChaCha20-Poly1305 and XChaCha20-Poly1305.
//! - [`identity`]: Ed25519 identity keys, strict verification only.
//! - [`agreement`]: X25519, refusing low-order peer points.
//! - [`totp`]: generic HOTP/TOTP (RFC 4226 / RFC 6238).
//!
//! MicroMsg constructions:
//! - [`nonce`]: the mutual login nonce MM-NONCE-1 (client ↔ broker).
//! - [`handshake`]: the P2P handshake (INIT / ACCEPT / FINISH) and its key schedule.
//! - [`message`]: DATA frames, the header string, [`message::ReplayGuard`] and the offline
//!   envelope.
//! - [`safety`]: the safety number two people compare out of band.
//! - [`sealed`]: the address a networked target seals to the caller's broker keypair.
//!
//! Each module has its own error enum.

#![forbid(unsafe_code)]

pub mod aead;
pub mod agreement;
pub mod handshake;
pub mod hex;
pub mod identity;
pub mod kdf;
pub mod message;
pub mod nonce;
pub mod safety;
pub mod sealed;
pub mod secret;
pub mod totp;

pub use handshake::{Initiator, Responder, SessionKeys};
pub use identity::{IdentityKey, IdentityPublicKey};
pub use message::{DirectionKeys, Kind};
pub use secret::Secret32;
