//! Test hosts in Linux network namespaces: a "public" host for the broker and two client
//! hosts, one behind a NAT router (masquerade, no port mapping) and one behind a firewall that
//! drops incoming connections, so that neither client can reach the other directly — as most
//! devices on the internet cannot. Made with `ip netns`, veth pairs and iptables; removed when
//! the value is dropped. Needs root (`scripts/test` runs as root); when the namespaces cannot be
//! made the test fails and says THIS TEST CANNOT RUN, it is never counted as passed.
//!
//! ```text
//!  client A 192.168.1.2 ── 192.168.1.1 [NAT router] 203.0.113.2 ──┐
//!                                                                   ├── 203.0.113.1/.5 [public: broker]
//!  client B 198.51.100.2 ── 198.51.100.1 [firewall] 203.0.113.6 ──┘
//! ```

use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

/// The broker's address on the public host.
pub const BROKER_IP: &str = "203.0.113.1";
/// Client A's own address (behind the NAT).
pub const CLIENT_A_IP: &str = "192.168.1.2";
/// The NAT router's public address: what the broker sees for client A.
pub const NAT_PUBLIC_IP: &str = "203.0.113.2";
/// Client B's address (routed, behind the firewall).
pub const CLIENT_B_IP: &str = "198.51.100.2";

/// The hosts; see the module docs.
#[derive(Debug)]
pub struct Hosts {
    /// The public host (the broker).
    pub public: String,
    /// Client A, behind the NAT.
    pub nat_client: String,
    /// Client B, behind the firewall.
    pub firewalled_client: String,
    all: Vec<String>,
}

static NEXT: AtomicU32 = AtomicU32::new(0);

fn run(args: &[&str]) -> Output {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| cannot_run(&format!("running {args:?}: {e}")))
}

fn cannot_run(why: &str) -> ! {
    panic!(
        "THIS TEST CANNOT RUN: {why}. It needs root and network namespaces (ip netns, veth, \
         iptables); scripts/test runs as root on a machine that has them"
    )
}

fn must(args: &[&str]) {
    let out = run(args);
    if !out.status.success() {
        cannot_run(&format!(
            "{} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
}

impl Hosts {
    /// Builds the topology (unique names per call, so tests may run side by side).
    pub fn build() -> Self {
        let tag = format!(
            "{}{}",
            std::process::id() % 10_000,
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let ns = |role: &str| format!("mm{tag}{role}");
        let hosts = Self {
            public: ns("pub"),
            nat_client: ns("a"),
            firewalled_client: ns("b"),
            all: vec![ns("pub"), ns("ra"), ns("a"), ns("rb"), ns("b")],
        };
        for name in &hosts.all {
            must(&["ip", "netns", "add", name]);
        }
        let (public, nat, a, fw, b) = (ns("pub"), ns("ra"), ns("a"), ns("rb"), ns("b"));
        let link = |left_ns: &str, left: &str, right_ns: &str, right: &str| {
            must(&[
                "ip", "link", "add", left, "netns", left_ns, "type", "veth", "peer", "name", right,
                "netns", right_ns,
            ]);
        };
        let addr = |n: &str, dev: &str, cidr: &str| {
            must(&["ip", "-n", n, "addr", "add", cidr, "dev", dev]);
            must(&["ip", "-n", n, "link", "set", dev, "up"]);
        };
        let (pa, wa, la, ea) = (
            format!("p{tag}a"),
            format!("w{tag}a"),
            format!("l{tag}a"),
            format!("e{tag}a"),
        );
        let (pb, wb, lb, eb) = (
            format!("p{tag}b"),
            format!("w{tag}b"),
            format!("l{tag}b"),
            format!("e{tag}b"),
        );
        link(&public, &pa, &nat, &wa);
        link(&public, &pb, &fw, &wb);
        link(&nat, &la, &a, &ea);
        link(&fw, &lb, &b, &eb);
        addr(&public, &pa, "203.0.113.1/30");
        addr(&nat, &wa, "203.0.113.2/30");
        addr(&public, &pb, "203.0.113.5/30");
        addr(&fw, &wb, "203.0.113.6/30");
        addr(&nat, &la, "192.168.1.1/24");
        addr(&a, &ea, "192.168.1.2/24");
        addr(&fw, &lb, "198.51.100.1/24");
        addr(&b, &eb, "198.51.100.2/24");
        for n in &hosts.all {
            must(&["ip", "-n", n, "link", "set", "lo", "up"]);
        }
        must(&[
            "ip",
            "-n",
            &a,
            "route",
            "add",
            "default",
            "via",
            "192.168.1.1",
        ]);
        must(&[
            "ip",
            "-n",
            &b,
            "route",
            "add",
            "default",
            "via",
            "198.51.100.1",
        ]);
        must(&[
            "ip",
            "-n",
            &nat,
            "route",
            "add",
            "default",
            "via",
            "203.0.113.1",
        ]);
        must(&[
            "ip",
            "-n",
            &fw,
            "route",
            "add",
            "default",
            "via",
            "203.0.113.5",
        ]);
        must(&[
            "ip",
            "-n",
            &public,
            "route",
            "add",
            "198.51.100.0/24",
            "via",
            "203.0.113.6",
        ]);
        for n in [&public, &nat, &fw] {
            must(&[
                "ip",
                "netns",
                "exec",
                n,
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
            ]);
        }
        // The home router: everything from the LAN leaves with the router's address; nothing
        // comes in that the LAN did not ask for (no port mapping).
        must(&[
            "ip",
            "netns",
            "exec",
            &nat,
            "iptables",
            "-t",
            "nat",
            "-A",
            "POSTROUTING",
            "-o",
            &wa,
            "-j",
            "MASQUERADE",
        ]);
        must(&[
            "ip",
            "netns",
            "exec",
            &nat,
            "iptables",
            "-A",
            "FORWARD",
            "-i",
            &wa,
            "-m",
            "conntrack",
            "--ctstate",
            "NEW",
            "-j",
            "DROP",
        ]);
        // The firewall: addresses are routed as they are, but new connections from outside
        // are dropped (silently: a connection attempt hangs).
        must(&[
            "ip",
            "netns",
            "exec",
            &fw,
            "iptables",
            "-A",
            "FORWARD",
            "-i",
            &wb,
            "-m",
            "conntrack",
            "--ctstate",
            "NEW",
            "-j",
            "DROP",
        ]);
        hosts
    }

    /// A command run on host `ns` (`ip netns exec NS program`).
    pub fn command(ns: &str, program: impl AsRef<std::ffi::OsStr>) -> tokio::process::Command {
        let mut command = tokio::process::Command::new("ip");
        command.args(["netns", "exec", ns]).arg(program);
        command
    }

    /// Whether a TCP connection from host `from` to `addr` can be made within `secs`.
    pub fn can_connect(from: &str, addr: &str, secs: u32) -> bool {
        let (host, port) = addr.rsplit_once(':').unwrap_or((addr, "0"));
        let script = format!("exec 3<>/dev/tcp/{host}/{port}");
        run(&[
            "ip",
            "netns",
            "exec",
            from,
            "timeout",
            &secs.to_string(),
            "bash",
            "-c",
            &script,
        ])
        .status
        .success()
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for name in &self.all {
            // Kills what still runs there, then removes it (its veths go with it).
            let pids = run(&["ip", "netns", "pids", name]);
            for pid in String::from_utf8_lossy(&pids.stdout).split_whitespace() {
                let _ = run(&["kill", "-9", pid]);
            }
            let _ = run(&["ip", "netns", "del", name]);
        }
    }
}
