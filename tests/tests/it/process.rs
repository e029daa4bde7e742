//! The real broker binary in a child process, for the tests that kill it (SIGKILL: no
//! shutdown, no flush, no goodbye) and start it again on the same data and port.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use crate::broker_binary;

/// A broker process on a fixed loopback port, with its data under a directory of the test.
pub(crate) struct BrokerProcess {
    /// `127.0.0.1:PORT`, the same across restarts.
    pub(crate) addr: String,
    /// The CA that clients trust (written by the broker at first start).
    pub(crate) ca: PathBuf,
    config: PathBuf,
    log: PathBuf,
    /// Environment variables the process gets besides the usual ones.
    env: Vec<(String, String)>,
    child: Option<Child>,
}

impl BrokerProcess {
    /// Writes a configuration under `dir` (on a free port; `extra` is appended as TOML, e.g. a
    /// `[database]` table) and starts the broker; returns once it accepts connections.
    pub(crate) async fn start(dir: &Path, extra: &str) -> Self {
        Self::start_with_env(dir, extra, &[]).await
    }

    /// [`Self::start`] with environment variables `env` set for the process.
    pub(crate) async fn start_with_env(dir: &Path, extra: &str, env: &[(&str, &str)]) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}");
        let data = dir.join("data");
        let config = format!(
            "[server]\nlisten = \"{addr}\"\ndata_dir = \"{}\"\n{extra}",
            data.display()
        );
        let config_path = dir.join("broker.toml");
        std::fs::write(&config_path, config).unwrap();
        let mut broker = Self {
            addr,
            ca: data.join("tls").join("ca.pem"),
            config: config_path,
            log: dir.join("broker.log"),
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            child: None,
        };
        broker.restart().await;
        broker
    }

    /// Sets an environment variable for the next start (as an operator edits the service's
    /// environment between restarts).
    pub(crate) fn set_env(&mut self, key: &str, value: &str) {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.to_owned(), value.to_owned()));
    }

    /// Starts the process again (after [`Self::kill`]); returns once it accepts connections.
    pub(crate) async fn restart(&mut self) {
        self.spawn();
        self.wait_until_up().await;
    }

    /// Starts the process and returns at once (the broker may not listen yet).
    pub(crate) fn spawn(&mut self) {
        assert!(self.child.is_none(), "the broker is already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = std::process::Command::new(broker_binary())
            .args(["serve", "--config"])
            .arg(&self.config)
            .env("MICROMSG_LOG", "warn")
            // Brokers that have an admin listener get a free port (others ignore this).
            .env("MICROMSG_ADMIN_LISTEN", "127.0.0.1:0")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    /// Polls until the broker accepts TCP connections (and its CA exists), for up to 60 s.
    pub(crate) async fn wait_until_up(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if self.ca.exists() && tokio::net::TcpStream::connect(&self.addr).await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        panic!(
            "the broker did not come up at {}; its log:\n{log}",
            self.addr
        );
    }

    /// SIGTERM, as `systemctl stop` or `docker stop` sends: waits up to 30 s for the broker to
    /// shut down on its own and returns how it exited.
    pub(crate) async fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("the broker is not running");
        let status = std::process::Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -TERM failed");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                child.kill().unwrap();
                child.wait().unwrap();
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                panic!("the broker did not stop within 30 s of SIGTERM; its log:\n{log}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The broker's data directory.
    pub(crate) fn data_dir(&self) -> PathBuf {
        self.ca
            .parent()
            .and_then(Path::parent)
            .expect("the CA is under DATA/tls")
            .to_path_buf()
    }

    /// SIGKILL, and reaps the process.
    pub(crate) fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
