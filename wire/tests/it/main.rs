//! Integration tests of `micromsg-wire` (one test binary).
#![allow(clippy::unwrap_used)]

mod corpus;
mod framing;
mod golden;
mod robustness;
mod roundtrip;
mod server;
mod strategies;
