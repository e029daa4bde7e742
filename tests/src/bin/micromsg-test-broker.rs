//! `micromsg-test-broker`: the `micromsg-broker` command line ([`micromsg_broker::cli`]) as a
//! binary of this package, for the integration tests that run the real binary in a child
//! process (`tests/it/federation.rs`, `tests/it/offline.rs`).
//!
//! Cargo builds a package's binaries before its integration tests and tells each test where
//! they are (`env!("CARGO_BIN_EXE_micromsg-test-broker")`), but only the package's own: this
//! shim makes the broker one of them, so no test has to run cargo to build `micromsg-broker`.
fn main() -> std::process::ExitCode {
    micromsg_broker::cli::main()
}
