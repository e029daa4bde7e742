//! A TCP proxy that a test can break: it forwards a port on loopback to a real server (the
//! test Postgres) and can close every connection and refuse new ones (the server is down), swallow
//! traffic without answering (the server or the network hangs), or forward again. The server
//! behind it is the real one: only the path to it is faulty.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// What the proxy does with traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Forward both ways.
    Forward,
    /// Close every connection and refuse new ones (the listener is closed).
    Down,
    /// Accept and keep connections, but pass nothing either way.
    Blackhole,
}

/// A running proxy (see the module docs). Dropping it stops it.
#[derive(Debug)]
pub struct FaultProxy {
    /// The loopback address clients connect to.
    pub addr: SocketAddr,
    target: SocketAddr,
    mode: watch::Sender<Mode>,
    listener: Mutex<Option<JoinHandle<()>>>,
}

impl FaultProxy {
    /// Starts forwarding a free loopback port to `target`.
    pub async fn start(target: SocketAddr) -> Arc<Self> {
        let port = crate::free_port();
        let addr: SocketAddr = format!("127.0.0.1:{port}")
            .parse()
            .expect("a loopback address");
        let (mode, _) = watch::channel(Mode::Forward);
        let proxy = Arc::new(Self {
            addr,
            target,
            mode,
            listener: Mutex::new(None),
        });
        proxy.listen().await;
        proxy
    }

    /// Switches to `mode`.
    pub async fn set(&self, mode: Mode) {
        let listening = self.listener_running();
        self.mode.send_replace(mode);
        match (mode, listening) {
            (Mode::Down, true) => {
                let task = self.listener.lock().expect("proxy lock").take();
                if let Some(task) = task {
                    task.abort();
                    let _ = task.await;
                }
            }
            (Mode::Forward | Mode::Blackhole, false) => self.listen().await,
            _ => {}
        }
    }

    fn listener_running(&self) -> bool {
        self.listener
            .lock()
            .expect("proxy lock")
            .as_ref()
            .is_some_and(|t| !t.is_finished())
    }

    async fn listen(&self) {
        let listener = TcpListener::bind(self.addr)
            .await
            .expect("binding the fault proxy's port");
        let target = self.target;
        let modes = self.mode.subscribe();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(serve(client, target, modes.clone()));
            }
        });
        *self.listener.lock().expect("proxy lock") = Some(task);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.mode.send_replace(Mode::Down);
        if let Ok(mut listener) = self.listener.lock()
            && let Some(task) = listener.take()
        {
            task.abort();
        }
    }
}

/// One proxied connection: forwards while the mode is `Forward`, stalls in `Blackhole`, and
/// ends (closing the client's connection) when it turns `Down`.
async fn serve(client: TcpStream, target: SocketAddr, mut modes: watch::Receiver<Mode>) {
    let mode = *modes.borrow_and_update();
    if mode == Mode::Down {
        return;
    }
    let server = if mode == Mode::Forward {
        match TcpStream::connect(target).await {
            Ok(s) => Some(s),
            Err(_) => return,
        }
    } else {
        None
    };
    let (mut client, mut server) = (client, server);
    loop {
        let mode = *modes.borrow_and_update();
        match (mode, server.as_mut()) {
            // Closed, as when the server process dies.
            (Mode::Down, _) => return,
            (Mode::Forward, Some(s)) => {
                tokio::select! {
                    r = tokio::io::copy_bidirectional(&mut client, s) => {
                        if r.is_err() { return; }
                        let _ = client.shutdown().await;
                        return;
                    }
                    changed = modes.changed() => if changed.is_err() { return },
                }
            }
            (Mode::Forward, None) => match TcpStream::connect(target).await {
                Ok(s) => server = Some(s),
                Err(_) => return,
            },
            (Mode::Blackhole, _) => {
                if modes.changed().await.is_err() {
                    return;
                }
            }
        }
    }
}
