//! MicroMsg's protocol-level fuzz targets, as plain functions of the fuzzer's bytes.
//!
//! cargo-fuzz runs each (the `fuzz/` project, with `RUSTC_BOOTSTRAP=1` on stable: see
//! docs/development.md), and `tests/replay.rs` runs every input of the checked-in corpora
//! (`fuzz/corpus/TARGET/`) through the same function as an ordinary test, so what the fuzzers
//! found stays fixed. A target panics only when an invariant of the protocol breaks; every
//! malformed input must end in a typed error.
//!
//! | target | what it drives |
//! |---|---|
//! | [`p2p_session`] | two P2P endpoints through the handshake, then DATA, heartbeats and BYE over a channel that drops, reorders, replays and corrupts |
//! | [`offline_envelope`] | MMO1 envelopes, genuine and forged, into a stored session |
//! | [`group_ops`] | signed group control ops, merged in two arrival orders |
//! | [`login`] | REGISTER, LOGIN, ADD-DEVICE, DEVICE-JOIN, REVOKE and LOGOUT sequences against the broker's handlers on a real store |
//! | [`federation`] | a peer broker's Deliver, Initiate and Accepted calls into a networked broker on a real store |

pub mod federation;
pub mod group_ops;
pub mod input;
pub mod login;
pub mod offline_envelope;
pub mod p2p_session;

/// A target: runs one input, panicking only when an invariant breaks.
pub type Target = fn(&[u8]);

/// The targets by name, for the replay test and the fuzz binaries.
pub const TARGETS: &[(&str, Target)] = &[
    ("p2p_session", p2p_session::run),
    ("offline_envelope", offline_envelope::run),
    ("group_ops", group_ops::run),
    ("login", login::run),
    ("federation", federation::run),
];
