//! `micromsg-test-client`: the `micromsg` command line ([`micromsg_client::cli`]) as a binary
//! of this package, for the tests that run the real client in a child process (its `--json`
//! shapes, Ctrl-C during `send`). See `micromsg-test-broker` for why the shim exists.
fn main() -> std::process::ExitCode {
    micromsg_client::cli::main()
}
