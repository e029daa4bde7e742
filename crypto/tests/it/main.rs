//! Integration tests of `micromsg-crypto`, one binary (see STYLE.md):
//!
//! - `wycheproof`: the Project Wycheproof files under `tests/vectors/wycheproof/`;
//! - `rfc`: RFC test vectors typed in from the RFC texts;
//! - `micromsg_vectors`: MicroMsg's own known-answer vectors, `tests/vectors/micromsg.json`;
//! - `handshake`, `message`, `nonce`: behaviour and property tests;
//! - `million`: no (key, nonce) pair repeats over a million messages.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;
mod handshake;
mod message;
mod micromsg_vectors;
mod million;
mod nonce;
mod rfc;
mod wycheproof;
