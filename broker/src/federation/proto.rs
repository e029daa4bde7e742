//! The generated gRPC code of `micromsg.federation.v1`
//! (`proto/micromsg/federation/v1/federation.proto`).
#![allow(
    missing_docs,
    unreachable_pub,
    missing_debug_implementations,
    clippy::all,
    clippy::pedantic
)]
tonic::include_proto!("micromsg.federation.v1");
