//! Servers in child processes, so their memory is theirs alone and the load generator's file
//! limit is not shared: this binary re-executes itself with a hidden subcommand (`__broker`
//! runs a real broker with `micromsg_broker::run::start`, `__tls-ceiling` a bare tokio-rustls
//! server with the broker's certificate and TLS configuration).
//!
//! Protocol with the parent: the child prints `READY <addr>` on stdout once it listens, and
//! stops when its stdin closes (so it never outlives the parent). Its stderr goes to a log
//! file in the run's temporary directory.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use micromsg_broker::config::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Memory figures of a process, from `/proc/PID/status`, in KiB.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Memory {
    /// Current resident set (VmRSS).
    pub(crate) rss_kib: u64,
    /// Peak resident set (VmHWM).
    pub(crate) peak_kib: u64,
    /// The anonymous part of the resident set (RssAnon): the heap, stacks and other memory
    /// the process allocated, as opposed to pages of its executable and libraries.
    pub(crate) anon_kib: u64,
    /// The file-backed part (RssFile): code and read-only data paged in from the executable
    /// and libraries; shared with other processes running them and reclaimable.
    pub(crate) file_kib: u64,
}

/// Reads VmRSS and VmHWM of `pid` (`"self"` for this process).
pub(crate) fn memory_of(pid: &str) -> Option<Memory> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| {
                rest.trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
    };
    Some(Memory {
        rss_kib: field("VmRSS:")?,
        peak_kib: field("VmHWM:")?,
        anon_kib: field("RssAnon:").unwrap_or(0),
        file_kib: field("RssFile:").unwrap_or(0),
    })
}

/// A server running in a child process.
#[derive(Debug)]
pub(crate) struct ChildServer {
    /// Where it listens (clients).
    pub(crate) addr: SocketAddr,
    child: Child,
    stdin: Option<ChildStdin>,
    log: PathBuf,
}

impl ChildServer {
    /// Starts a broker with `config` (its data directory and listen address already set).
    pub(crate) fn broker(config: &Config, dir: &Path, name: &str) -> anyhow::Result<Self> {
        let config_file = dir.join(format!("{name}.json"));
        std::fs::write(&config_file, serde_json::to_vec_pretty(config)?)
            .with_context(|| format!("writing {}", config_file.display()))?;
        // A profiling hook: the broker runs as `$MICROMSG_BENCH_BROKER_WRAPPER <this binary>
        // __broker <config>`. The wrapper should `exec` its arguments, so the broker keeps the
        // child's pid and its memory is still what the bench reads (performance.md, "Soak").
        let exe = self_exe()?;
        let mut cmd = match std::env::var_os(BROKER_WRAPPER).filter(|w| !w.is_empty()) {
            Some(wrapper) => {
                let mut cmd = Command::new(wrapper);
                cmd.arg(exe);
                cmd
            }
            None => Command::new(exe),
        };
        cmd.arg("__broker").arg(&config_file);
        Self::spawn(cmd, &dir.join(format!("{name}.log")))
    }

    /// Starts the bare TLS 1.3 server with the certificate and key files; with `hold`, it keeps
    /// each connection open until the client closes it (for memory per connection), otherwise
    /// it sends one byte after the handshake and closes.
    pub(crate) fn tls_ceiling(
        cert: &Path,
        key: &Path,
        mode: CeilingMode,
        dir: &Path,
    ) -> anyhow::Result<Self> {
        let mut cmd = Command::new(self_exe()?);
        cmd.arg("__tls-ceiling")
            .arg(cert)
            .arg(key)
            .arg(mode.to_arg());
        let log = match mode {
            CeilingMode::Exchange { .. } => "tls-exchange.log",
            CeilingMode::Greet | CeilingMode::Hold => "tls-ceiling.log",
        };
        Self::spawn(cmd, &dir.join(log))
    }

    fn spawn(mut cmd: Command, log: &Path) -> anyhow::Result<Self> {
        let log_file = std::fs::File::create(log)
            .with_context(|| format!("creating the child log {}", log.display()))?;
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log_file))
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            );
        let mut child = cmd.spawn().context("starting a child process")?;
        let stdout = child.stdout.take().context("child stdout")?;
        let stdin = child.stdin.take();
        // Blocking read of the first line, with a watchdog that kills a child that never
        // becomes ready.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                bail!(
                    "child server did not start within 120 s (log: {})",
                    log.display()
                );
            }
        };
        let Some(addr) = line.trim().strip_prefix("READY ") else {
            let _ = child.kill();
            let _ = child.wait();
            let tail = std::fs::read_to_string(log).unwrap_or_default();
            let tail: Vec<&str> = tail.lines().rev().take(15).collect();
            bail!(
                "child server failed to start (log {}):\n{}",
                log.display(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        };
        let addr: SocketAddr = addr
            .parse()
            .with_context(|| format!("child printed a bad address {addr:?}"))?;
        Ok(Self {
            addr,
            child,
            stdin,
            log: log.to_owned(),
        })
    }

    /// The child's memory now.
    pub(crate) fn memory(&self) -> Option<Memory> {
        memory_of(&self.child.id().to_string())
    }

    /// Stops the child (closes its stdin, then kills it after a grace period) and returns its
    /// memory just before.
    pub(crate) fn stop(mut self) -> Option<Memory> {
        let memory = self.memory();
        drop(self.stdin.take());
        for _ in 0..100 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return memory;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!(
            "warning: child server did not stop within 5 s; killing it (log {})",
            self.log.display()
        );
        let _ = self.child.kill();
        let _ = self.child.wait();
        memory
    }
}

impl Drop for ChildServer {
    fn drop(&mut self) {
        // Only reached without `stop` (an error path): never leave a server behind.
        if self.stdin.is_some() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The environment variable naming a program the broker child is started through.
const BROKER_WRAPPER: &str = "MICROMSG_BENCH_BROKER_WRAPPER";

fn self_exe() -> anyhow::Result<PathBuf> {
    std::env::current_exe().context("locating this executable to start a child server")
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// Waits until stdin is closed (the parent is done or gone). A plain thread reads it, so no
/// extra tokio feature is needed.
async fn stdin_closed() {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        use std::io::Read;
        let mut stdin = std::io::stdin();
        let mut buf = [0u8; 64];
        while let Ok(n) = stdin.read(&mut buf) {
            if n == 0 {
                break;
            }
        }
        let _ = tx.send(());
    });
    let _ = rx.await;
}

/// Child side of [`ChildServer::broker`].
pub(crate) fn run_broker(config_file: &Path) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(config_file)
        .with_context(|| format!("reading {}", config_file.display()))?;
    let config: Config = serde_json::from_str(&text).context("parsing the broker config")?;
    config.validate().context("broker config")?;
    runtime()?.block_on(async {
        let running = micromsg_broker::run::start(config)
            .await
            .context("starting the broker")?;
        println!("READY {}", running.addr);
        stdin_closed().await;
        running.stop().await;
        Ok(())
    })
}

/// What the bare TLS server does with each connection once its handshake is done.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CeilingMode {
    /// Writes one byte and closes: the client has seen the handshake through.
    Greet,
    /// Keeps the connection open until the client closes it (idle memory).
    Hold,
    /// Reads `request` bytes, answers `answer` bytes, then waits for the client to close: one
    /// request and its answer, as LOGIN's, with no work between them.
    Exchange { request: usize, answer: usize },
}

impl CeilingMode {
    fn to_arg(self) -> String {
        match self {
            CeilingMode::Greet => "greet".into(),
            CeilingMode::Hold => "hold".into(),
            CeilingMode::Exchange { request, answer } => format!("exchange:{request}:{answer}"),
        }
    }

    /// The mode named by [`CeilingMode::to_arg`].
    pub(crate) fn parse(arg: &str) -> anyhow::Result<Self> {
        let bytes = |what: &str, n: &str| -> anyhow::Result<usize> {
            let count = n
                .bytes()
                .all(|b| b.is_ascii_digit())
                .then(|| n.parse::<usize>().ok())
                .flatten()
                .filter(|count| (1..=1 << 20).contains(count));
            count.with_context(|| {
                format!("ceiling mode {arg:?}: the {what} must be 1 to 1048576 bytes, not {n:?}")
            })
        };
        match arg.split(':').collect::<Vec<_>>()[..] {
            ["greet"] => Ok(CeilingMode::Greet),
            ["hold"] => Ok(CeilingMode::Hold),
            ["exchange", request, answer] => Ok(CeilingMode::Exchange {
                request: bytes("request", request)?,
                answer: bytes("answer", answer)?,
            }),
            _ => anyhow::bail!(
                "unknown ceiling mode {arg:?} (greet, hold or exchange:REQUEST:ANSWER)"
            ),
        }
    }
}

/// Child side of [`ChildServer::tls_ceiling`].
pub(crate) fn run_tls_ceiling(cert: &Path, key: &Path, mode: CeilingMode) -> anyhow::Result<()> {
    let files = micromsg_broker::tls::TlsFiles {
        cert: cert.to_owned(),
        key: key.to_owned(),
        ca: None,
    };
    let config = micromsg_broker::tls::server_config(&files).context("TLS configuration")?;
    runtime()?.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        println!("READY {}", listener.local_addr()?);
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::clone(&config));
        let serve = async {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    // Out of file descriptors or similar: back off like the broker does.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let _ = tcp.set_nodelay(true);
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(Ok(mut tls)) =
                        tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await
                    else {
                        return;
                    };
                    match mode {
                        CeilingMode::Greet => {
                            let _ = tls.write_all(b"k").await;
                            let _ = tls.shutdown().await;
                        }
                        CeilingMode::Hold => read_until_closed(&mut tls).await,
                        CeilingMode::Exchange { request, answer } => {
                            let mut asked = vec![0u8; request];
                            if tls.read_exact(&mut asked).await.is_ok()
                                && tls.write_all(&vec![b'a'; answer]).await.is_ok()
                                && tls.flush().await.is_ok()
                            {
                                read_until_closed(&mut tls).await;
                            }
                        }
                    }
                });
            }
        };
        tokio::select! {
            _ = serve => {}
            () = stdin_closed() => {}
        }
        Ok(())
    })
}

/// Reads and drops what the client sends until it closes.
async fn read_until_closed<S: tokio::io::AsyncRead + Unpin>(stream: &mut S) {
    let mut buf = [0u8; 64];
    while let Ok(n) = stream.read(&mut buf).await {
        if n == 0 {
            break;
        }
    }
}

/// CPU time of `pid` (`"self"` for this process) so far: the sum over its live threads of
/// `/proc/PID/task/TID/schedstat`'s time on CPU (nanoseconds, so no clock-tick rounding);
/// `None` if the process is gone. Threads that ended are not counted (the servers measured
/// here keep theirs).
pub(crate) fn cpu_of(pid: &str) -> Option<Duration> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut nanos: u64 = 0;
    for task in tasks.flatten() {
        // A thread that ended meanwhile counts nothing.
        nanos += schedstat_nanos(&task.path().join("schedstat")).unwrap_or(0);
    }
    Some(Duration::from_nanos(nanos))
}

/// The calling thread's CPU time since it started (a thread that ends before [`cpu_of`] reads
/// the process is missing from it, so such a thread reports its own).
pub(crate) fn cpu_of_this_thread() -> Option<Duration> {
    schedstat_nanos(std::path::Path::new("/proc/thread-self/schedstat")).map(Duration::from_nanos)
}

/// The time on CPU in a `schedstat` file, in nanoseconds.
fn schedstat_nanos(path: &std::path::Path) -> Option<u64> {
    std::fs::read_to_string(path)
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

impl ChildServer {
    /// The child's CPU time so far.
    pub(crate) fn cpu(&self) -> Option<Duration> {
        cpu_of(&self.child.id().to_string())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::CeilingMode;

    #[test]
    fn a_ceiling_mode_reads_back_what_it_writes() {
        for mode in [
            CeilingMode::Greet,
            CeilingMode::Hold,
            CeilingMode::Exchange {
                request: 140,
                answer: 200,
            },
        ] {
            assert_eq!(CeilingMode::parse(&mode.to_arg()).unwrap(), mode);
        }
    }

    #[test]
    fn a_bad_ceiling_mode_is_refused_saying_what_is_wrong() {
        for (arg, says) in [
            ("bogus", "unknown ceiling mode"),
            ("greet:1", "unknown ceiling mode"),
            ("exchange:140", "unknown ceiling mode"),
            ("exchange:0:200", "the request must be"),
            ("exchange:+140:200", "the request must be"),
            ("exchange:140:x", "the answer must be"),
            ("exchange:140:1048577", "the answer must be"),
        ] {
            let error = CeilingMode::parse(arg).unwrap_err().to_string();
            assert!(error.contains(says), "{arg}: {error}");
        }
    }
}
