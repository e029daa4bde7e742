//! The MicroMsg broker.
//!
//! Built in floors (`broker/floors.txt`, checked by `scripts/check-floors`): a module imports
//! its own floor or lower ones, never a higher one, and there is no import cycle.
//!
//! 4. Assembly: [`run`] starts and stops a whole broker (what the binary and the tests call);
//!    [`cli`] is the `micromsg-broker` command line; [`admin_tools`] its export, import and
//!    migrate-store commands.
//! 3. Transport: [`server`] (the client listener), `connection` (one client connection's frame
//!    loop), [`federation::service`] (the gRPC listener of the network), [`admin`].
//! 2. Services: [`handlers`] (every client request, by area), [`contacts::routing`] (the
//!    silent-drop rules), [`federation::contact`] and [`federation::outbox`], [`metrics`].
//! 1. State: [`broker`] (the shared [`broker::Broker`]), [`online`] (logged-in devices and
//!    their event queues), [`contacts::pending`], [`federation`] (membership, peer links).
//! 0. Leaves: [`clock`], [`shutdown`], [`signals`], [`config`], [`limits`], [`numbers`],
//!    [`tls`], [`identity`], [`telemetry`], [`listener`] (the accept loop),
//!    [`federation::network`], [`federation::mtls`], [`datadir_lock`] (the data directory's
//!    lock file), [`export_file`] (the export file format).
//!
//! Storage is the `micromsg-store` crate: entities, devices, contacts, inboxes and the outbox
//! on SQLite or Postgres. `docs/architecture.md` follows one request from listener to store.
#![forbid(unsafe_code)]

pub mod admin;
pub mod admin_tools;
pub mod broker;
pub mod cli;
pub mod clock;
pub mod config;
mod connection;
pub mod contacts;
pub mod datadir_lock;
pub mod event_queue;
pub mod export_file;
pub mod federation;
pub mod handlers;
pub mod identity;
pub mod limits;
pub mod listener;
pub mod metrics;
pub mod numbers;
pub mod online;
pub mod relay;
pub mod run;
pub mod server;
pub mod shutdown;
pub mod signals;
pub mod telemetry;
pub mod tls;
