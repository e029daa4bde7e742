//! The MicroMsg broker.
//!
//! Layout:
//! - [`run`]: start and stop a whole broker (what the binary and the tests call).
//! - [`config`]: the typed configuration (TOML file, `MICROMSG_*` overrides, flags).
//! - [`server`]: accept loop, connection limits, graceful shutdown.
//! - `connection`: one client connection: frame loop and request handlers.
//! - [`broker`]: the state shared by all connections.
//! - [`online`]: logged-in devices and their bounded event queues.
//! - storage is the `micromsg-store` crate: entities, devices, inboxes on SQLite or Postgres.
//! - [`tls`], [`identity`]: certificates (a private CA on first start) and the signing key.
//! - [`limits`], [`numbers`]: rate limiters, number allocation.
//! - [`federation`]: the broker network: network file, mutual TLS, the gRPC federation
//!   service, networked contact setup, the cross-broker outbox.
//! - [`admin`]: the operator's gRPC service (status, health, reflection).
//! - [`telemetry`]: logs, OpenTelemetry export, trace context across brokers.
#![forbid(unsafe_code)]

pub mod admin;
pub mod broker;
pub mod cli;
pub mod clock;
pub mod config;
mod connection;
pub mod contacts;
pub mod federation;
pub mod handlers;
pub mod identity;
pub mod limits;
pub mod listener;
pub mod metrics;
pub mod numbers;
pub mod online;
pub mod run;
pub mod server;
pub mod shutdown;
pub mod signals;
pub mod telemetry;
pub mod tls;
