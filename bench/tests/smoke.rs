//! Smoke runs of every scenario with tiny counts, so the tool never rots: each run must exit
//! 0, print well-formed JSON, and its counts must add up. SQLite wherever a store is needed;
//! the Postgres deposits run only when DATABASE_URL is set (and says loudly when it is not).
#![allow(clippy::unwrap_used)]

use std::process::Command;

use serde_json::Value;

fn bench(args: &[&str]) -> Value {
    bench_with(args, &[])
}

/// [`bench`] with `env` set for the run (the broker's `MICROMSG_<SECTION>_<KEY>` settings).
fn bench_with(args: &[&str], env: &[(&str, &str)]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_micromsg-bench"))
        .args(args)
        .arg("--json")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "micromsg-bench {args:?} failed: {}\n{stderr}",
        out.status
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}):\n{}\nstderr:\n{stderr}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// The rows of a report, each checked for the fields every row has.
fn rows(report: &Value, scenario: &str) -> Vec<Value> {
    let rows = report["rows"].as_array().expect("rows").clone();
    assert!(!rows.is_empty(), "no rows: {report}");
    for r in &rows {
        assert_eq!(r["scenario"], scenario, "{r}");
        assert!(r["name"].is_string(), "{r}");
        assert!(r["count"].is_u64(), "{r}");
        assert!(r["errors"].is_u64(), "{r}");
        let rate = r["rate"].as_f64().expect("rate");
        assert!(rate.is_finite() && rate >= 0.0, "{r}");
        assert!(r["unit"].is_string(), "{r}");
        if let Some(l) = r["latency"].as_object() {
            let (p50, p99, p999) = (
                l["p50_ms"].as_f64().unwrap(),
                l["p99_ms"].as_f64().unwrap(),
                l["p999_ms"].as_f64().unwrap(),
            );
            assert!(p50 <= p99 && p99 <= p999, "{r}");
        }
        if let Some(ratio) = r["ratio"].as_f64() {
            let ceiling = r["ceiling"].as_f64().unwrap();
            assert!(
                (ratio * ceiling - rate).abs() <= 1e-6 * rate.max(1.0),
                "{r}"
            );
        }
    }
    rows
}

fn row<'a>(rows: &'a [Value], name_starts: &str) -> &'a Value {
    rows.iter()
        .find(|r| r["name"].as_str().unwrap().starts_with(name_starts))
        .unwrap_or_else(|| panic!("no row {name_starts:?} in {rows:?}"))
}

fn count(r: &Value) -> u64 {
    r["count"].as_u64().unwrap()
}

fn errors(r: &Value) -> u64 {
    r["errors"].as_u64().unwrap()
}

#[test]
fn logins() {
    let report = bench(&[
        "logins",
        "--count",
        "40",
        "--concurrency",
        "4",
        "--users",
        "2",
        "--rounds",
        "3",
    ]);
    let rows = rows(&report, "logins");
    assert_eq!(rows.len(), 3);
    for r in &rows {
        assert_eq!(count(r) + errors(r), 40, "{r}");
        assert_eq!(errors(r), 0, "{r}");
        assert!(r["latency"].is_object(), "{r}");
    }
    let micromsg = row(&rows, "TLS 1.3 + mutual LOGIN");
    assert!(micromsg["ratio"].is_f64() && micromsg["target"].is_object());
    // The handshake with one exchange of LOGIN's sizes, measured beside it against the bare one.
    let exchange = row(&rows, "ceiling: TLS 1.3 + one exchange");
    assert!(exchange["ratio"].is_f64() && exchange["target"].is_null());
    assert!(
        exchange["memory_source"]
            .as_str()
            .is_some_and(|m| m.starts_with("exchange")),
        "{exchange}"
    );
    // The CPU each side spent per operation, read from /proc.
    let notes = report["notes"].as_array().expect("notes");
    let noted = |what: &[&str]| {
        notes.iter().any(|n| {
            n.as_str()
                .is_some_and(|n| what.iter().all(|w| n.contains(w)))
        })
    };
    assert!(
        noted(&["CPU per bare handshake", "per login: broker"]),
        "{notes:?}"
    );
    assert!(
        noted(&["CPU per handshake + one exchange", "the logins at"]),
        "{notes:?}"
    );
}

#[test]
fn deposits_sqlite() {
    deposits("sqlite", &[]);
}

#[test]
fn deposits_postgres() {
    if std::env::var("DATABASE_URL").is_err() {
        eprintln!(
            "\n!!! DATABASE_URL is not set: the Postgres deposits smoke run is SKIPPED. \
             `scripts/postgres start` prints one. !!!\n"
        );
        return;
    }
    // The defaults: two batches side by side (each in its own quota counter slot), gathering.
    deposits("postgres", &[]);
    // One batch at a time, which runs alone, without gathering: it loses nothing either.
    deposits(
        "postgres",
        &[
            ("MICROMSG_DATABASE_DEPOSIT_BATCHES_IN_FLIGHT", "1"),
            ("MICROMSG_DATABASE_DEPOSIT_GATHER_US", "0"),
        ],
    );
}

fn deposits(store: &str, env: &[(&str, &str)]) {
    let report = bench_with(
        &[
            "deposits",
            "--store",
            store,
            "--count",
            "300",
            "--senders",
            "5",
            "--ceiling-clients",
            "5",
            "--ceiling-count",
            "100",
        ],
        env,
    );
    let rows = rows(&report, "deposits");
    assert_eq!(rows.len(), 3);
    let deposits = row(&rows, "DEPOSIT");
    assert_eq!((count(deposits), errors(deposits)), (300, 0), "{deposits}");
    assert!(deposits["peak_memory_kib"].as_u64().unwrap() > 0);
    let drain = row(&rows, "drain");
    assert_eq!(
        count(drain),
        300,
        "every acknowledged deposit is drained: {drain}"
    );
    let ceiling = row(&rows, "ceiling");
    assert_eq!((count(ceiling), errors(ceiling)), (100, 0), "{ceiling}");
}

#[test]
fn p2p() {
    let report = bench(&[
        "p2p",
        "--small-count",
        "500",
        "--large-count",
        "20",
        "--round-trips",
        "20",
    ]);
    let rows = rows(&report, "p2p");
    assert_eq!(rows.len(), 5);
    assert_eq!(count(row(&rows, "session, 256 B")), 500);
    assert_eq!(count(row(&rows, "session, 65536 B")), 20);
    assert_eq!(count(row(&rows, "ceiling: seal+open 256 B")), 500);
    let rt = row(&rows, "round trip");
    assert_eq!(count(rt), 20);
    assert!(rt["latency"].is_object());
    assert!(rows.iter().all(|r| errors(r) == 0), "{rows:?}");
    // Each end reports its own thread's CPU: a figure of zero would mean it was lost.
    let notes = report["notes"].as_array().expect("notes");
    for size in [256, 65536] {
        let prefix = format!("p2p: CPU per {size} B message, both ends: ");
        let us: f64 = notes
            .iter()
            .filter_map(|n| n.as_str()?.strip_prefix(prefix.as_str()))
            .find_map(|rest| rest.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("no CPU note for {size} B: {notes:?}"));
        assert!(us > 0.0, "CPU per {size} B message: {us}");
    }
}

#[test]
fn relay() {
    let report = bench(&[
        "relay",
        "--small-count",
        "300",
        "--large-count",
        "10",
        "--round-trips",
        "20",
        "--idle-relays",
        "5",
    ]);
    let rows = rows(&report, "relay");
    assert_eq!(rows.len(), 9);
    assert_eq!(count(row(&rows, "relayed, 256 B")), 300);
    assert_eq!(count(row(&rows, "relayed, 65536 B")), 10);
    assert_eq!(count(row(&rows, "direct, 256 B")), 300);
    let rt = row(&rows, "relayed round trip");
    assert_eq!(count(rt), 20);
    assert!(rt["latency"].is_object());
    assert_eq!(
        count(row(&rows, "relayed round trip 256 B, two brokers")),
        20
    );
    assert_eq!(count(row(&rows, "idle relay")), 5);
    assert!(rows.iter().all(|r| errors(r) == 0), "{rows:?}");
}

#[test]
fn chat() {
    let report = bench(&["chat", "--messages", "3000", "--opens", "3"]);
    let rows = rows(&report, "chat");
    assert_eq!(rows.len(), 2);
    let open = row(&rows, "open a 3000-message conversation");
    assert_eq!((count(open), errors(open)), (3, 0), "{open}");
    assert!(open["latency"].is_object());
}

#[test]
fn federation() {
    let report = bench(&[
        "federation",
        "--initiates",
        "10",
        "--deposits",
        "200",
        "--senders",
        "4",
    ]);
    let rows = rows(&report, "federation");
    assert_eq!(rows.len(), 4);
    assert_eq!(count(row(&rows, "local INITIATE")), 10);
    assert_eq!(count(row(&rows, "networked INITIATE")), 10);
    let acked = row(&rows, "cross-broker DEPOSIT ack");
    assert_eq!((count(acked), errors(acked)), (200, 0), "{acked}");
    let delivered = row(&rows, "cross-broker deposits delivered");
    assert_eq!(
        count(delivered),
        200,
        "every acked deposit arrives: {delivered}"
    );
}

#[test]
fn idle() {
    let report = bench(&[
        "idle",
        "--counts",
        "20,60",
        "--users",
        "3",
        "--source-addrs",
        "3",
        "--settle-secs",
        "1",
    ]);
    let rows = rows(&report, "idle");
    assert_eq!(rows.len(), 4, "two counts, broker and bare TLS");
    for (r, want) in rows.iter().zip([20, 60, 20, 60]) {
        assert_eq!((count(r), errors(r)), (want, 0), "{r}");
        assert_eq!(r["unit"], "KiB/conn");
    }
}

#[test]
fn bad_input_is_refused_clearly() {
    let out = Command::new(env!("CARGO_BIN_EXE_micromsg-bench"))
        .args(["idle", "--counts", "500,100"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("ascending"), "{stderr}");
    let out = Command::new(env!("CARGO_BIN_EXE_micromsg-bench"))
        .args(["deposits", "--store", "postgres"])
        .env_remove("DATABASE_URL")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("DATABASE_URL"), "{stderr}");
}

#[test]
fn soak() {
    let report = bench(&[
        "soak",
        "--secs",
        "4",
        "--workers",
        "3",
        "--users",
        "3",
        "--deposits",
        "5",
        "--logins",
        "2",
        "--messages",
        "2",
    ]);
    let rows = rows(&report, "soak");
    assert_eq!(rows.len(), 8, "seven kinds and the total");
    let kinds = &rows[..7];
    let total = row(&rows, "all operations");
    // Every kind ran (each worker finishes the round it is in), without errors, and the
    // counts add up.
    for r in kinds {
        assert!(count(r) > 0, "{r}");
        assert_eq!(errors(r), 0, "{r}");
        assert!(r["latency"].is_object(), "{r}");
    }
    assert_eq!(count(total), kinds.iter().map(count).sum::<u64>());
    assert_eq!(errors(total), 0, "{total}");
    assert!(total["target"]["met"].as_bool().unwrap(), "{total}");
    assert!(total["peak_memory_kib"].as_u64().unwrap() > 0);
    let n = |name: &str| count(row(&rows, name));
    assert_eq!(
        n("register"),
        2 * (n("contact") + n("session")),
        "two new users per contact and per session"
    );
    assert_eq!(n("message"), 2 * n("session"), "two messages per session");
    let details = &report["details"];
    assert_eq!(details["passed"], true, "{details}");
    assert_eq!(details["errors"], 0);
    let acked = details["acked_deposits"].as_u64().unwrap();
    assert_eq!(acked, n("deposit"));
    assert_eq!(
        details["drained_messages"].as_u64().unwrap(),
        acked,
        "every acknowledged deposit is drained"
    );
    let samples = details["memory_samples"].as_array().unwrap();
    assert!(samples.len() >= 3, "one sample a second: {details}");
    let rss: Vec<u64> = samples
        .iter()
        .map(|s| s["broker_rss_kib"].as_u64().unwrap())
        .collect();
    let memory = &details["memory"];
    assert!(rss.iter().all(|r| *r > 0));
    assert_eq!(memory["first_kib"].as_u64().unwrap(), rss[0]);
    assert_eq!(memory["last_kib"].as_u64().unwrap(), *rss.last().unwrap());
    assert_eq!(
        memory["max_kib"].as_u64().unwrap(),
        *rss.iter().max().unwrap()
    );
    assert_eq!(memory["judged"], false, "a 4 s run is too short to judge");
    assert!(report.get("failures").is_none(), "{report}");
}
