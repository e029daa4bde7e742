//! The `micromsg-broker` binary's command line, run as a user runs it: `--help`, `--version`,
//! `config` (the effective configuration as TOML) and the errors of a bad configuration.
//!
//! It also makes cargo build the binary for every test run of this package (cargo builds a
//! package's binaries for its integration tests), which `scripts/test` then gives to the demos
//! and the broker image instead of building the workspace a second time.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Command, Output};

use micromsg_broker::config::Config;

/// The binary with `args`, run in `dir`, without the `MICROMSG_*` overrides of this
/// environment (a developer's shell may have some) and without backtraces (with
/// `RUST_BACKTRACE` set, anyhow appends one to the error message).
fn command(dir: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_micromsg-broker"));
    cmd.args(args)
        .current_dir(dir)
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE");
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("MICROMSG_") {
            cmd.env_remove(name);
        }
    }
    cmd
}

/// Runs [`command`].
fn broker(dir: &Path, args: &[&str]) -> Output {
    command(dir, args).output().unwrap()
}

fn stdout(out: &Output) -> String {
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8(out.stderr.clone()).unwrap()
}

#[test]
fn help_lists_the_commands() {
    let dir = tempfile::tempdir().unwrap();
    let out = broker(dir.path(), &["--help"]);
    assert!(out.status.success(), "{out:?}");
    let help = stdout(&out);
    assert!(help.contains("Usage: micromsg-broker <COMMAND>"), "{help}");
    for command in ["serve", "config", "network", "status"] {
        assert!(
            help.lines()
                .any(|l| l.trim_start().starts_with(&format!("{command} "))),
            "{command} missing from:\n{help}"
        );
    }
    // The long description, from the doc comment of the command line.
    assert!(help.contains("MICROMSG_<SECTION>_<KEY>"), "{help}");

    let out = broker(dir.path(), &["network", "init", "--help"]);
    assert!(out.status.success(), "{out:?}");
    assert!(stdout(&out).contains("--broker <ID=PREFIXES>"), "{out:?}");
}

#[test]
fn version_is_the_package_version() {
    let dir = tempfile::tempdir().unwrap();
    let out = broker(dir.path(), &["--version"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        stdout(&out),
        format!("micromsg-broker {}\n", env!("CARGO_PKG_VERSION"))
    );
}

/// `config` prints the file, overridden by the environment, overridden by the flags, as TOML
/// that reads back as the same configuration.
#[test]
fn config_prints_the_effective_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("broker.toml");
    std::fs::write(
        &file,
        "[server]\nlisten = \"127.0.0.1:7000\"\nbroker_id = \"from-file\"\n\
         [inbox]\nquota_per_device = 1234\n",
    )
    .unwrap();
    let out = command(dir.path(), &["config", "--config"])
        .arg(&file)
        .args(["--listen", "127.0.0.1:7100", "--data-dir", "/srv/mm"])
        .env("MICROMSG_SERVER_BROKER_ID", "from-env")
        .env("MICROMSG_INBOX_QUOTA_PER_DEVICE", "99")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let printed: Config = toml::from_str(&stdout(&out)).unwrap();
    assert_eq!(printed.server.listen, "127.0.0.1:7100".parse().unwrap());
    assert_eq!(printed.server.data_dir, Path::new("/srv/mm"));
    assert_eq!(printed.server.broker_id, "from-env");
    assert_eq!(printed.inbox.quota_per_device, 99);

    // With nothing set, the defaults.
    let out = broker(dir.path(), &["config"]);
    assert!(out.status.success(), "{out:?}");
    let printed: Config = toml::from_str(&stdout(&out)).unwrap();
    assert_eq!(printed, Config::default());
}

/// A configuration that cannot be used is refused before anything starts: exit code 1 and
/// `Error: ` with the cause on stderr, nothing on stdout.
#[test]
fn a_bad_configuration_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let unknown = dir.path().join("unknown.toml");
    std::fs::write(&unknown, "[server]\nlisten_on = \"127.0.0.1:1\"\n").unwrap();
    let invalid = dir.path().join("invalid.toml");
    std::fs::write(&invalid, "[numbers]\nlength = 3\n").unwrap();
    let missing = dir.path().join("missing.toml");
    let cases: [(&[&str], &Path, &str); 3] = [
        (
            &["config", "--config"],
            &unknown,
            "unknown field `listen_on`",
        ),
        (
            &["serve", "--config"],
            &invalid,
            "numbers.length must be 4..=15, got 3",
        ),
        (&["config", "--config"], &missing, "cannot read config file"),
    ];
    for (args, file, cause) in cases {
        let mut all: Vec<&str> = args.to_vec();
        all.push(file.to_str().unwrap());
        let out = broker(dir.path(), &all);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{all:?}: {out:?}");
        assert!(
            err.starts_with("Error: loading the configuration"),
            "{all:?}: {err}"
        );
        assert!(err.contains(cause), "{all:?}: {cause:?} not in {err}");
        assert!(out.stdout.is_empty(), "{all:?}: {out:?}");
    }

    let out = broker(dir.path(), &["config", "--log-format", "xml"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_eq!(
        stderr(&out),
        "Error: --log-format must be text or json, not \"xml\"\n"
    );

    // A usage error is clap's: exit code 2.
    let out = broker(dir.path(), &["serve", "--no-such-flag"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(stderr(&out).contains("--no-such-flag"), "{out:?}");
}
