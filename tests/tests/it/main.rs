//! In-process integration tests: real brokers on `127.0.0.1:0`, real TLS, real SQLite and
//! Postgres, driven through the client library.
#![allow(clippy::unwrap_used)]

mod broker_core;
mod chat_tui;
mod cli_cancel;
mod cli_json;
mod clock;
mod contacts;
mod federation;
mod groups;
mod half_handshake;
mod inbox;
mod netns_relay;
mod networked_sessions;
mod offline;
mod portability_broker;
mod portability_delete;
mod portability_export;
mod portability_forward;
mod portability_move;
mod portability_number;
mod process;
mod reconnect;
mod relay;
mod sessions;
mod storage_faults;

/// The broker's command line as a binary: this package's `micromsg-test-broker`
/// (`src/bin/micromsg-test-broker.rs`, which runs `micromsg_broker::cli::main`), which cargo
/// builds for this test run. For the tests that run the real binary in a child process.
fn broker_binary() -> std::path::PathBuf {
    env!("CARGO_BIN_EXE_micromsg-test-broker").into()
}
