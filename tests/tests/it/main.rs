//! In-process integration tests: real brokers on `127.0.0.1:0`, real TLS, real SQLite and
//! Postgres, driven through the client library.
#![allow(clippy::unwrap_used)]

mod broker_core;
mod contacts;
mod federation;
mod groups;
mod inbox;
mod networked_sessions;
mod offline;
mod sessions;
