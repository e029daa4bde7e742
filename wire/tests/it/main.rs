//! Integration tests of `micromsg-wire` (one test binary).
#![allow(clippy::unwrap_used)]

mod corpus;
// Needs `--features tokio`; a workspace test run has it, since the broker and client enable it.
#[cfg(feature = "tokio")]
mod frame_io;
mod framing;
mod golden;
mod robustness;
mod roundtrip;
mod server;
mod strategies;
