//! Container tests: the images of `scripts/images` (the broker of `deploy/Dockerfile` and
//! Postgres) started with testcontainers on a private Docker network, driven from this process
//! through the client library, as a user on the host would.
//!
//! A test binary of its own, so it can be run alone:
//!
//! ```sh
//! scripts/images --profile debug     # builds micromsg/{debian,postgres,broker} once
//! cargo nextest run -p micromsg-tests --test containers
//! ```
//!
//! Rules every test here follows (through [`Docker::ready`]):
//! - no Docker engine reachable: the test FAILS, saying why, unless
//!   `MICROMSG_SKIP_DOCKER_TESTS=1`, when it prints a loud `SKIPPED: …` line and returns. The test
//!   command (`scripts/test`) decides whether to run this binary at all and says so.
//! - an image missing: the test fails and names `scripts/images`. Nothing is ever pulled.
//! - the images can be overridden with `BROKER_IMAGE` and `POSTGRES_IMAGE` (as in compose).
//!
//! testcontainers 0.27 talks to the engine through bollard with a fixed API version (1.52),
//! and engines older than that refuse every call ("client version 1.52 is too new"); Debian 12's
//! docker.io 20.10 speaks 1.41. For such an engine, [`Docker::ready`] starts a small relay in
//! this process that rewrites the version in each request path to the engine's, and runs the
//! test again in a child process whose `DOCKER_HOST` points at the relay (the environment of
//! this process cannot be changed safely, and testcontainers reads only the environment).
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use micromsg_client::account;
use micromsg_client::profile::Profile;
use testcontainers::core::logs::LogFrame;
use testcontainers::core::{ExecCommand, IntoContainerPort, WaitFor};
use testcontainers::runners::AsyncRunner;
use testcontainers::{ContainerAsync, GenericImage, Healthcheck, ImageExt};

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

/// One broker container on Postgres: a client on the host registers through the published
/// port, logs in, reads BROKER-INFO; the data is in Postgres, the broker runs unprivileged and
/// stops promptly on SIGTERM, and after a restart the same client logs in again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_container_on_postgres_serves_a_client() {
    let Some(docker) = Docker::ready("broker_container_on_postgres_serves_a_client").await else {
        return;
    };
    let pg = docker.start_postgres("pg-x").await;
    let broker = docker.start_broker("x", "100", &pg).await;

    let work = tempfile::tempdir().unwrap();
    let ca = broker.copy_ca(work.path()).await;
    let alice = Profile::new(work.path().join("alice"));
    let session = account::register(&alice, &broker.addr, &ca, None)
        .await
        .unwrap();
    let number = session.info.number.clone();
    assert!(
        number.starts_with("100") && number.len() == 10,
        "a number of broker x: {number}"
    );
    drop(session);

    let info = account::broker_info(&alice).await.unwrap();
    assert_eq!(info.info.broker_id, "x");
    let again = account::connect(&alice).await.unwrap();
    assert_eq!(again.info.number, number);
    drop(again);

    // The entity is in Postgres, not in a SQLite file in the container.
    let count = docker
        .exec(
            &pg.container,
            &[
                "psql",
                "-U",
                "micromsg",
                "-d",
                "micromsg",
                "-tAc",
                "SELECT count(*) FROM entities",
            ],
        )
        .await;
    assert_eq!(count.trim(), "1", "entities in Postgres");
    let uid = docker.exec(&broker.container, &["id", "-u"]).await;
    assert_eq!(uid.trim(), "7400", "the broker runs as the micromsg user");

    // SIGTERM: the broker shuts down gracefully well inside Docker's 10 s before SIGKILL.
    let t0 = Instant::now();
    broker.container.stop().await.unwrap();
    let stop_time = t0.elapsed();
    assert!(
        stop_time < Duration::from_secs(8),
        "docker stop took {stop_time:?}: the broker ignored SIGTERM?"
    );
    broker.container.start().await.unwrap();
    let after = broker.connect_when_up(&alice).await;
    assert_eq!(after.info.number, number, "same entity after a restart");
    let info_after = account::broker_info(&alice).await.unwrap();
    assert_eq!(
        info_after.identity_key, info.identity_key,
        "the identity key survives a restart (data volume)"
    );
}

// ---------------------------------------------------------------------------------------------
// Support: Docker, images, containers
// ---------------------------------------------------------------------------------------------

/// Env var: set to 1 to skip (loudly) instead of failing when no Docker engine is reachable.
const SKIP_VAR: &str = "MICROMSG_SKIP_DOCKER_TESTS";
/// Env var set in the child process that runs a test behind the API version relay.
const CHILD_VAR: &str = "MICROMSG_DOCKER_RELAY_CHILD";
/// Env var naming a file the child creates once its test has started.
const STARTED_VAR: &str = "MICROMSG_DOCKER_RELAY_STARTED";

/// Postgres credentials of the test databases.
const PG_USER: &str = "micromsg";
const PG_PASSWORD: &str = "micromsg-test";
const PG_DB: &str = "micromsg";

/// A test's view of Docker: the images and a private network of its own.
#[derive(Debug)]
struct Docker {
    broker_image: (String, String),
    postgres_image: (String, String),
    /// A fresh user-defined network; containers reach each other by container name.
    network: String,
}

/// A started Postgres container.
struct Postgres {
    container: ContainerAsync<GenericImage>,
    /// Its name on the private network.
    host: String,
}

/// A started broker container.
struct Broker {
    container: ContainerAsync<GenericImage>,
    /// `127.0.0.1:PORT`, the client port published on the host (fixed across restarts).
    addr: String,
}

impl Docker {
    /// Checks the engine and the images. `None` means "do not run the test body here": it was
    /// skipped (and said so), or it ran in a child process behind the version relay and passed.
    /// `test` must be the test function's name (the child runs exactly it).
    async fn ready(test: &str) -> Option<Docker> {
        let images = Docker::images();
        if std::env::var_os(CHILD_VAR).is_some() {
            if let Some(path) = std::env::var_os(STARTED_VAR) {
                std::fs::write(path, test).unwrap();
            }
            return Some(Docker::new(images));
        }
        let engine = DockerEndpoint::from_env();
        let version = match engine.api_version().await {
            Ok(v) => v,
            Err(e) => {
                let why = format!("no Docker engine reachable at {}: {e}", engine.describe());
                if std::env::var(SKIP_VAR).as_deref() == Ok("1") {
                    eprintln!();
                    eprintln!("SKIPPED: {test}: {why} ({SKIP_VAR}=1)");
                    eprintln!("SKIPPED: this container test did NOT run and proves nothing.");
                    eprintln!();
                    return None;
                }
                panic!(
                    "{test}: {why}.\nThe container tests need Docker and the images of \
                     scripts/images; set {SKIP_VAR}=1 to skip them explicitly."
                );
            }
        };
        for (name, tag) in [&images.0, &images.1] {
            match engine.image_exists(&format!("{name}:{tag}")).await {
                Ok(true) => {}
                Ok(false) => panic!(
                    "{test}: the image {name}:{tag} is missing; build it with scripts/images \
                     (nothing is pulled: this machine may have no registry)"
                ),
                Err(e) => panic!("{test}: inspecting image {name}:{tag}: {e}"),
            }
        }
        let client = api_version_of(testcontainers::bollard::API_DEFAULT_VERSION);
        match version {
            Some(server) if server < client => {
                relay::run_test_in_child(test, &engine, server).await;
                None
            }
            _ => Some(Docker::new(images)),
        }
    }

    fn images() -> ((String, String), (String, String)) {
        let pick = |var: &str, default: &str| {
            let image = std::env::var(var).unwrap_or_else(|_| default.to_owned());
            match image.rsplit_once(':') {
                Some((name, tag)) if !tag.contains('/') => (name.to_owned(), tag.to_owned()),
                _ => (image, "latest".to_owned()),
            }
        };
        (
            pick("BROKER_IMAGE", "micromsg/broker:dev"),
            pick("POSTGRES_IMAGE", "micromsg/postgres:15"),
        )
    }

    fn new((broker_image, postgres_image): ((String, String), (String, String))) -> Docker {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        Docker {
            broker_image,
            postgres_image,
            network: format!("micromsg-test-{}-{nanos:08x}", std::process::id()),
        }
    }

    /// Starts Postgres (healthy: `pg_isready` answers on TCP) as `NETWORK-NAME`.
    async fn start_postgres(&self, name: &str) -> Postgres {
        let host = format!("{}-{name}", self.network);
        let (image, tag) = &self.postgres_image;
        let container = GenericImage::new(image, tag)
            .with_wait_for(WaitFor::healthcheck())
            .with_network(&self.network)
            .with_container_name(&host)
            .with_env_var("POSTGRES_USER", PG_USER)
            .with_env_var("POSTGRES_PASSWORD", PG_PASSWORD)
            .with_env_var("POSTGRES_DB", PG_DB)
            .with_health_check(
                Healthcheck::cmd_shell(format!(
                    "pg_isready -q -h 127.0.0.1 -U {PG_USER} -d {PG_DB}"
                ))
                .with_interval(Duration::from_millis(500))
                .with_timeout(Duration::from_secs(5))
                .with_retries(240),
            )
            .with_log_consumer(log_printer(name.to_owned()))
            .with_startup_timeout(Duration::from_secs(120))
            .start()
            .await
            .unwrap_or_else(|e| panic!("starting {image}:{tag}: {e}"));
        Postgres { container, host }
    }

    /// Starts broker `id` with number prefix `prefix` on `pg`, its client port published on a
    /// fixed free host port, and waits until it listens and its health check passes.
    async fn start_broker(&self, id: &str, prefix: &str, pg: &Postgres) -> Broker {
        let name = format!("{}-broker-{id}", self.network);
        let port = free_port();
        let (image, tag) = &self.broker_image;
        let container = GenericImage::new(image, tag)
            .with_wait_for(WaitFor::message_on_stderr("listening for clients"))
            .with_wait_for(WaitFor::healthcheck())
            .with_network(&self.network)
            .with_container_name(&name)
            .with_mapped_port(port, 7400.tcp())
            .with_env_var("MICROMSG_SERVER_BROKER_ID", id)
            .with_env_var("MICROMSG_NUMBERS_PREFIXES", format!("[\"{prefix}\"]"))
            .with_env_var(
                "MICROMSG_DATABASE_URL",
                format!(
                    "postgres://{PG_USER}:{PG_PASSWORD}@{}:5432/{PG_DB}",
                    pg.host
                ),
            )
            .with_env_var("MICROMSG_SERVER_SHUTDOWN_GRACE_SECS", "3")
            .with_env_var("MICROMSG_REGISTRATION_PER_IP_PER_HOUR", "100000")
            .with_health_check(
                Healthcheck::cmd(["micromsg-healthcheck"])
                    .with_interval(Duration::from_millis(500))
                    .with_timeout(Duration::from_secs(5))
                    .with_retries(120),
            )
            .with_log_consumer(log_printer(format!("broker-{id}")))
            .with_startup_timeout(Duration::from_secs(120))
            .start()
            .await
            .unwrap_or_else(|e| panic!("starting {image}:{tag}: {e}"));
        Broker {
            container,
            addr: format!("127.0.0.1:{port}"),
        }
    }

    /// Runs `cmd` in `container` and returns its standard output; panics when it fails.
    async fn exec(&self, container: &ContainerAsync<GenericImage>, cmd: &[&str]) -> String {
        let mut result = container
            .exec(ExecCommand::new(cmd.iter().copied()))
            .await
            .unwrap_or_else(|e| panic!("exec {cmd:?}: {e}"));
        let stdout = result.stdout_to_vec().await.unwrap();
        let stderr = result.stderr_to_vec().await.unwrap();
        let code = result.exit_code().await.unwrap();
        assert_eq!(
            code,
            Some(0),
            "exec {cmd:?}: {}",
            String::from_utf8_lossy(&stderr)
        );
        String::from_utf8(stdout).unwrap()
    }
}

impl Broker {
    /// Copies the broker's private CA (made on first start in /data/tls/) to `dir`.
    async fn copy_ca(&self, dir: &Path) -> PathBuf {
        let path = dir.join(format!("ca-{}.pem", self.container.id()));
        self.container
            .copy_file_from("/data/tls/ca.pem", path.clone())
            .await
            .unwrap();
        path
    }

    /// Logs `profile` in, retrying for up to a minute while the broker (re)starts: Docker's
    /// port proxy accepts connections before the broker inside listens.
    async fn connect_when_up(&self, profile: &Profile) -> account::Session {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match account::connect(profile).await {
                Ok(session) => return session,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("waiting for {}: {e}", self.addr);
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => panic!("{} did not come back: {e}", self.addr),
            }
        }
    }
}

/// Prints a container's log lines to this test's stderr (shown when a test fails).
fn log_printer(name: String) -> impl Fn(&LogFrame) + Send + Sync + 'static {
    move |frame: &LogFrame| {
        for line in String::from_utf8_lossy(frame.bytes()).lines() {
            eprintln!("[{name}] {line}");
        }
    }
}

/// A TCP port free on 127.0.0.1 right now (Docker binds it on every address).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `1.41` as (1, 41).
type ApiVersion = (usize, usize);

fn api_version_of(v: &testcontainers::bollard::ClientVersion) -> ApiVersion {
    (v.major_version, v.minor_version)
}

fn parse_api_version(s: &str) -> Option<ApiVersion> {
    let (major, minor) = s.split_once('.')?;
    Some((major.parse().ok()?, minor.parse().ok()?))
}

/// Where the Docker engine listens, from `DOCKER_HOST` (default `/var/run/docker.sock`), for
/// the plain HTTP probes this file makes itself.
#[derive(Debug, Clone)]
enum DockerEndpoint {
    Unix(PathBuf),
    Tcp(String),
    /// TLS (`https://`, or `DOCKER_TLS_VERIFY=1`): not probed here; testcontainers handles it.
    Tls(String),
}

impl DockerEndpoint {
    fn from_env() -> DockerEndpoint {
        let host = std::env::var("DOCKER_HOST")
            .ok()
            .filter(|h| !h.trim().is_empty())
            .unwrap_or_else(|| "unix:///var/run/docker.sock".to_owned());
        let tls = std::env::var("DOCKER_TLS_VERIFY").is_ok_and(|v| v == "1");
        if let Some(path) = host.strip_prefix("unix://") {
            DockerEndpoint::Unix(PathBuf::from(path))
        } else if let Some(addr) = host
            .strip_prefix("tcp://")
            .or_else(|| host.strip_prefix("http://"))
            .filter(|_| !tls)
        {
            DockerEndpoint::Tcp(addr.trim_end_matches('/').to_owned())
        } else {
            DockerEndpoint::Tls(host)
        }
    }

    fn describe(&self) -> String {
        match self {
            DockerEndpoint::Unix(p) => format!("unix://{}", p.display()),
            DockerEndpoint::Tcp(a) => format!("tcp://{a}"),
            DockerEndpoint::Tls(h) => h.clone(),
        }
    }

    async fn connect(&self) -> std::io::Result<relay::Stream> {
        match self {
            DockerEndpoint::Unix(path) => Ok(relay::Stream::Unix(
                tokio::net::UnixStream::connect(path).await?,
            )),
            DockerEndpoint::Tcp(addr) => Ok(relay::Stream::Tcp(
                tokio::net::TcpStream::connect(addr).await?,
            )),
            DockerEndpoint::Tls(host) => Err(std::io::Error::other(format!(
                "{host}: TLS endpoints are not probed"
            ))),
        }
    }

    /// `GET path` (unversioned, so any engine answers) → (status, body).
    async fn get(&self, path: &str) -> std::io::Result<(u16, Vec<u8>)> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let exchange = async {
            let mut stream = self.connect().await?;
            let request = format!("GET {path} HTTP/1.0\r\nHost: docker\r\n\r\n");
            stream.write_all(request.as_bytes()).await?;
            let mut response = Vec::new();
            stream.read_to_end(&mut response).await?;
            Ok::<_, std::io::Error>(response)
        };
        let response = tokio::time::timeout(Duration::from_secs(10), exchange)
            .await
            .map_err(|_| std::io::Error::other("no answer within 10 s"))??;
        let bad = || std::io::Error::other("not an HTTP response");
        let head_end = response
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .ok_or_else(bad)?;
        let head = std::str::from_utf8(&response[..head_end]).map_err(|_| bad())?;
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(bad)?;
        Ok((status, response[head_end + 4..].to_vec()))
    }

    /// The engine's API version; `Ok(None)` when it is not probed (TLS).
    async fn api_version(&self) -> std::io::Result<Option<ApiVersion>> {
        if matches!(self, DockerEndpoint::Tls(_)) {
            return Ok(None);
        }
        let (status, body) = self.get("/version").await?;
        if status != 200 {
            return Err(std::io::Error::other(format!(
                "GET /version: HTTP {status}"
            )));
        }
        let json: serde_json::Value = serde_json::from_slice(&body)
            .map_err(|e| std::io::Error::other(format!("GET /version: {e}")))?;
        let version = json["ApiVersion"]
            .as_str()
            .and_then(parse_api_version)
            .ok_or_else(|| std::io::Error::other("GET /version: no ApiVersion"))?;
        Ok(Some(version))
    }

    async fn image_exists(&self, image: &str) -> std::io::Result<bool> {
        if matches!(self, DockerEndpoint::Tls(_)) {
            return Ok(true);
        }
        let (status, _) = self.get(&format!("/images/{image}/json")).await?;
        match status {
            200 => Ok(true),
            404 => Ok(false),
            other => Err(std::io::Error::other(format!("HTTP {other}"))),
        }
    }
}

/// The API version relay for engines older than testcontainers' client (see the module docs).
mod relay {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

    use super::{ApiVersion, CHILD_VAR, DockerEndpoint, STARTED_VAR};

    /// How long a test may run in the child process before it is killed and fails.
    const CHILD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15 * 60);

    /// A connection to the engine.
    pub(super) enum Stream {
        Unix(tokio::net::UnixStream),
        Tcp(tokio::net::TcpStream),
    }

    impl AsyncRead for Stream {
        fn poll_read(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            match self.get_mut() {
                Stream::Unix(s) => Pin::new(s).poll_read(cx, buf),
                Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            }
        }
    }

    impl AsyncWrite for Stream {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            match self.get_mut() {
                Stream::Unix(s) => Pin::new(s).poll_write(cx, buf),
                Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            }
        }
        fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            match self.get_mut() {
                Stream::Unix(s) => Pin::new(s).poll_flush(cx),
                Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
            }
        }
        fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            match self.get_mut() {
                Stream::Unix(s) => Pin::new(s).poll_shutdown(cx),
                Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            }
        }
    }

    /// Runs `test` in a child process of this test binary, with `DOCKER_HOST` at a relay that
    /// forwards to `engine` and rewrites `/vX.Y/` in request paths to the engine's version.
    /// Panics unless the child ran the test and it passed.
    pub(super) async fn run_test_in_child(test: &str, engine: &DockerEndpoint, server: ApiVersion) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let relay_addr = listener.local_addr().unwrap();
        let engine = engine.clone();
        let relay = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                let engine = engine.clone();
                tokio::spawn(async move {
                    if let Ok(upstream) = engine.connect().await {
                        let _ = pipe(client, upstream, server).await;
                    }
                });
            }
        });
        eprintln!(
            "Docker engine speaks API {}.{}, older than testcontainers' {}.{}: running {test} in a \
             child process through a version relay at {relay_addr}",
            server.0,
            server.1,
            testcontainers::bollard::API_DEFAULT_VERSION.major_version,
            testcontainers::bollard::API_DEFAULT_VERSION.minor_version,
        );
        let started = tempfile::NamedTempFile::new().unwrap();
        let started_path = started.path().to_owned();
        std::fs::remove_file(&started_path).unwrap();
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args([test, "--exact", "--nocapture", "--test-threads=1"])
            .env("DOCKER_HOST", format!("tcp://{relay_addr}"))
            .env(CHILD_VAR, "1")
            .env(STARTED_VAR, &started_path)
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + CHILD_TIMEOUT;
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{test} did not finish within {CHILD_TIMEOUT:?} in the child process");
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        };
        relay.abort();
        assert!(
            started_path.exists(),
            "the child process did not run {test} (is the name passed to Docker::ready right?)"
        );
        let _ = std::fs::remove_file(&started_path);
        assert!(
            status.success(),
            "{test} failed in the child process: {status}"
        );
    }

    /// Copies both ways until either side closes; requests get their API version rewritten.
    async fn pipe(
        client: tokio::net::TcpStream,
        upstream: Stream,
        server: ApiVersion,
    ) -> std::io::Result<()> {
        let (mut client_read, mut client_write) = tokio::io::split(client);
        let (mut up_read, mut up_write) = tokio::io::split(upstream);
        let requests = async {
            let mut rewriter = Rewriter::new(server);
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = client_read.read(&mut buf).await?;
                if n == 0 {
                    let rest = rewriter.finish();
                    up_write.write_all(&rest).await?;
                    up_write.shutdown().await?;
                    return Ok::<_, std::io::Error>(());
                }
                let out = rewriter.feed(&buf[..n]);
                up_write.write_all(&out).await?;
            }
        };
        let responses = async {
            tokio::io::copy(&mut up_read, &mut client_write).await?;
            client_write.shutdown().await?;
            Ok::<_, std::io::Error>(())
        };
        // Either direction ending (or failing) ends the connection.
        tokio::select! {
            r = requests => r,
            r = responses => r,
        }
    }

    /// Rewrites ` /vMAJOR.MINOR/` to the engine's version when it is newer, in a byte stream
    /// cut at arbitrary places: a tail that may be the start of such a path is held back
    /// until the next bytes arrive.
    pub(super) struct Rewriter {
        server: ApiVersion,
        pending: Vec<u8>,
    }

    impl Rewriter {
        pub(super) fn new(server: ApiVersion) -> Rewriter {
            Rewriter {
                server,
                pending: Vec::new(),
            }
        }

        pub(super) fn feed(&mut self, bytes: &[u8]) -> Vec<u8> {
            self.pending.extend_from_slice(bytes);
            let data = std::mem::take(&mut self.pending);
            let mut out = Vec::with_capacity(data.len());
            let mut i = 0;
            while i < data.len() {
                if data[i] == b' ' {
                    match self.match_version(&data[i + 1..]) {
                        Match::Yes { len, version } => {
                            out.push(b' ');
                            if version > self.server {
                                out.extend_from_slice(
                                    format!("/v{}.{}/", self.server.0, self.server.1).as_bytes(),
                                );
                            } else {
                                out.extend_from_slice(&data[i + 1..i + 1 + len]);
                            }
                            i += 1 + len;
                            continue;
                        }
                        Match::Partial => {
                            self.pending = data[i..].to_vec();
                            return out;
                        }
                        Match::No => {}
                    }
                }
                out.push(data[i]);
                i += 1;
            }
            out
        }

        pub(super) fn finish(&mut self) -> Vec<u8> {
            std::mem::take(&mut self.pending)
        }

        /// Does `s` start with `/vDIGITS.DIGITS/`?
        fn match_version(&self, s: &[u8]) -> Match {
            const MAX: usize = 16;
            let mut state = 0; // 0: '/', 1: 'v', 2: major, 3: minor
            let (mut major, mut minor) = (String::new(), String::new());
            for (k, &b) in s.iter().enumerate().take(MAX) {
                match (state, b) {
                    (0, b'/') => state = 1,
                    (1, b'v') => state = 2,
                    (2, b'0'..=b'9') => major.push(b as char),
                    (2, b'.') if !major.is_empty() => state = 3,
                    (3, b'0'..=b'9') => minor.push(b as char),
                    (3, b'/') if !minor.is_empty() => {
                        return match (major.parse(), minor.parse()) {
                            (Ok(a), Ok(b)) => Match::Yes {
                                len: k + 1,
                                version: (a, b),
                            },
                            _ => Match::No,
                        };
                    }
                    _ => return Match::No,
                }
            }
            if s.len() < MAX {
                Match::Partial
            } else {
                Match::No
            }
        }
    }

    enum Match {
        Yes { len: usize, version: ApiVersion },
        Partial,
        No,
    }
}

#[test]
fn relay_rewrites_versions_across_chunk_boundaries() {
    let request = b"GET /v1.52/containers/json HTTP/1.1\r\nHost: x\r\n\r\nPOST /v1.52/networks/create HTTP/1.1\r\n\r\n{\"a\": \"/v1.52/ in a body stays\"}GET /v1.30/_ping HTTP/1.1\r\n\r\n";
    let expected = String::from_utf8_lossy(request)
        .replacen("/v1.52/", "/v1.41/", 2)
        .into_bytes();
    for cut in 1..request.len() {
        let mut r = relay::Rewriter::new((1, 41));
        let mut out = Vec::new();
        for chunk in request.chunks(cut) {
            out.extend(r.feed(chunk));
        }
        out.extend(r.finish());
        assert_eq!(
            String::from_utf8_lossy(&out),
            String::from_utf8_lossy(&expected),
            "chunks of {cut}"
        );
    }
}
