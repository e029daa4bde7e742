//! `p2p`: one end-to-end session on loopback through the client's p2p module, beside sealing and
//! opening the same frames with no I/O.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use micromsg_client::p2p::{self, PeerEvent, SessionConfig, SessionHandle};
use micromsg_crypto::message::{DirectionKeys, Kind, Sender};
use micromsg_crypto::{IdentityKey, Secret32};
use tokio::net::TcpListener;

use crate::child;
use crate::report::{Report, Row, Samples};

/// Options of `p2p`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Messages of --small bytes sent one way.
    #[arg(long, default_value_t = 2_000_000)]
    pub(crate) small_count: u64,
    /// Size of the small messages.
    #[arg(long, default_value_t = 256)]
    pub(crate) small: usize,
    /// Messages of --large bytes sent one way.
    #[arg(long, default_value_t = 30_000)]
    pub(crate) large_count: u64,
    /// Size of the large messages (at most the session's max TEXT, about 1 MiB).
    #[arg(long, default_value_t = 65_536)]
    pub(crate) large: usize,
    /// Round trips (send, echo back) for the latency figures.
    #[arg(long, default_value_t = 20_000)]
    pub(crate) round_trips: u64,
    /// Time limit of each measured phase, in seconds.
    #[arg(long, default_value_t = 60)]
    pub(crate) max_secs: u64,
}

const SCENARIO: &str = "p2p";

pub(crate) async fn run(args: Args) -> anyhow::Result<Report> {
    if args.small_count == 0 || args.large_count == 0 || args.round_trips == 0 {
        bail!("--small-count, --large-count and --round-trips must be at least 1");
    }
    let max_text = SessionConfig::default().max_text_len();
    if args.small == 0 || args.large == 0 || args.small.max(args.large) > max_text {
        bail!("message sizes must be 1 to {max_text} bytes");
    }
    let limit = Duration::from_secs(args.max_secs);
    let mut report = Report::default();

    for (size, count, unit) in [
        (args.small, args.small_count, "msg/s"),
        (args.large, args.large_count, "MB/s"),
    ] {
        eprintln!("p2p: ceiling, seal+open of {count} × {size} bytes on one core");
        let (c_done, c_time) = aead_ceiling(size, count, limit)?;
        eprintln!("p2p: session, {count} × {size} bytes one way");
        let cpu_before = child::cpu_of("self");
        let (done, errors, time) = one_way(session_pair().await?, size, count, limit).await?;
        if let (Some(before), Some(after)) = (cpu_before, child::cpu_of("self")) {
            // Both ends run in this process: this is the whole session's CPU, both tasks and
            // their I/O, which compares two builds on a busy machine where the rate does not.
            let us = after.saturating_sub(before).as_secs_f64() * 1e6 / done.max(1) as f64;
            report.note(format!(
                "p2p: CPU per {size} B message, both ends: {us:.2} µs (this process, from /proc)"
            ));
        }
        let to_unit = |n: u64, t: Duration| {
            let per_sec = n as f64 / t.as_secs_f64().max(1e-9);
            if unit == "MB/s" {
                per_sec * size as f64 / 1e6
            } else {
                per_sec
            }
        };
        let ceiling = Row::new(
            SCENARIO,
            &format!("ceiling: seal+open {size} B, one core, no I/O"),
            c_done,
            0,
            c_time,
        )
        .unit(unit)
        .rate(to_unit(c_done, c_time));
        let mut row = Row::new(
            SCENARIO,
            &format!("session, {size} B one way"),
            done,
            errors,
            time,
        )
        .unit(unit)
        .rate(to_unit(done, time))
        .ceiling(ceiling.rate);
        row = if unit == "MB/s" {
            let met = row.rate >= 1000.0;
            row.target("≥ 1 GB/s", met)
        } else {
            let met = row.rate >= 200_000.0;
            row.target("≥ 200,000 msg/s", met)
        };
        report.push(ceiling);
        report.push(row);
    }

    eprintln!(
        "p2p: {} round trips of {} bytes",
        args.round_trips, args.small
    );
    let (done, time, mut lat) =
        round_trips(session_pair().await?, args.small, args.round_trips, limit).await?;
    let memory = child::memory_of("self");
    report.push(
        Row::new(
            SCENARIO,
            &format!("round trip {} B (send + echo)", args.small),
            done,
            0,
            time,
        )
        .unit("round trips/s")
        .latency(&mut lat)
        .memory(
            memory.map(|m| m.peak_kib),
            "this process's VmHWM (both clients run in process; there is no broker)",
        ),
    );
    report.note(
        "p2p: the ceiling seals and opens on one core; the session seals on one task and opens \
         on another, so with 2 cores it may exceed 100%",
    );
    Ok(report)
}

pub(crate) fn identity() -> IdentityKey {
    IdentityKey::generate(&mut rand_core::OsRng)
}

/// A connected pair of running sessions (initiator, responder), directly on loopback.
pub(crate) async fn session_pair() -> anyhow::Result<(SessionHandle, SessionHandle)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let token = Secret32::generate(&mut rand_core::OsRng);
    let known = token.clone();
    let known_id = micromsg_crypto::handshake::token_id(&known);
    let responder = tokio::spawn(async move {
        let (stream, _) = listener.accept().await?;
        let id = identity();
        let est = p2p::accept(
            stream,
            async |tid| (tid == known_id).then(|| known.clone()),
            &id,
            SessionConfig::default(),
        )
        .await?;
        anyhow::Ok(est)
    });
    let initiator = p2p::connect(addr, &token, &identity(), SessionConfig::default())
        .await
        .context("p2p handshake (initiator)")?;
    let responder = responder
        .await
        .context("responder task")?
        .context("p2p handshake (responder)")?;
    Ok((initiator.start(None), responder.start(None)))
}

/// Sends `count` messages of `size` bytes from one end of `pair`; the other counts them.
/// Returns (received, errors, elapsed until the last arrived).
pub(crate) async fn one_way(
    pair: (SessionHandle, SessionHandle),
    size: usize,
    count: u64,
    limit: Duration,
) -> anyhow::Result<(u64, u64, Duration)> {
    let (a, mut b) = pair;
    let text = "m".repeat(size);
    let sender = a.sender();
    let deadline = Instant::now() + limit;
    let start = Instant::now();
    let send = tokio::spawn(async move {
        let mut sent = 0u64;
        while sent < count && Instant::now() < deadline {
            if sender.send_text(text.clone()).await.is_err() {
                break;
            }
            sent += 1;
        }
        sent
    });
    let mut received = 0u64;
    let mut bad = 0u64;
    let mut last_print = Instant::now();
    while received < count {
        let left = deadline.saturating_duration_since(Instant::now()) + Duration::from_secs(2);
        match tokio::time::timeout(left, b.next_event()).await {
            Ok(Some(PeerEvent::Text { text, .. })) => {
                if text.len() != size {
                    bad += 1;
                }
                received += 1;
            }
            Ok(Some(PeerEvent::Ended(end))) => {
                eprintln!("  session ended early: {}", end.reason);
                break;
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => break,
        }
        if last_print.elapsed() >= Duration::from_secs(1) {
            eprintln!(
                "  p2p: {received}/{count} in {:.0} s",
                start.elapsed().as_secs_f64()
            );
            last_print = Instant::now();
        }
    }
    let elapsed = start.elapsed();
    let sent = send.await.context("sender task")?;
    let _ = a.close("done").await;
    let _ = b.close("done").await;
    Ok((received, bad + sent.saturating_sub(received), elapsed))
}

/// `count` sequential round trips on `pair`: A sends, B echoes, A waits for the echo.
pub(crate) async fn round_trips(
    pair: (SessionHandle, SessionHandle),
    size: usize,
    count: u64,
    limit: Duration,
) -> anyhow::Result<(u64, Duration, Samples)> {
    let (mut a, b) = pair;
    let (b_sender, mut b_events) = b.into_parts();
    let echo = tokio::spawn(async move {
        while let Some(event) = b_events.recv().await {
            let stop = match event {
                PeerEvent::Text { text, .. } => b_sender.send_text(text).await.is_err(),
                PeerEvent::Ended(_) => true,
                _ => false,
            };
            if stop {
                break;
            }
        }
    });
    let text = "r".repeat(size);
    let deadline = Instant::now() + limit;
    let start = Instant::now();
    let mut lat = Samples::with_capacity(count as usize);
    let mut done = 0;
    'outer: while done < count && Instant::now() < deadline {
        let t = Instant::now();
        if a.send_text(text.clone()).await.is_err() {
            break;
        }
        loop {
            match tokio::time::timeout(Duration::from_secs(10), a.next_event()).await {
                Ok(Some(PeerEvent::Text { .. })) => break,
                Ok(Some(PeerEvent::Ended(_)) | None) | Err(_) => break 'outer,
                Ok(Some(_)) => {}
            }
        }
        lat.push(t.elapsed());
        done += 1;
    }
    let elapsed = start.elapsed();
    let _ = a.close("done").await;
    let _ = echo.await;
    Ok((done, elapsed, lat))
}

/// Seals and opens `count` TEXT frames of `size` bytes on this thread: the work the two ends
/// of a session do per message, without the I/O. Returns (messages, elapsed).
fn aead_ceiling(size: usize, count: u64, limit: Duration) -> anyhow::Result<(u64, Duration)> {
    let keys = DirectionKeys {
        ts_key: Secret32::generate(&mut rand_core::OsRng),
        seed: Secret32::generate(&mut rand_core::OsRng),
    };
    let mut sender = Sender::new(keys.clone(), 0);
    // Text, sealed as the session seals it (`seal_str_into`: a `str` is not checked for UTF-8
    // again), and opened as it opens it (checked).
    let payload = "c".repeat(size);
    let mut frame = Vec::with_capacity(size + 128);
    let mut opened = Vec::with_capacity(size);
    let unix = micromsg_client::account::unix_now();
    let start = Instant::now();
    let mut done = 0;
    while done < count {
        frame.clear();
        sender
            .seal_str_into(unix, Kind::Text, &payload, &mut frame)
            .map_err(|e| anyhow::anyhow!("seal: {e}"))?;
        opened.clear();
        keys.open_into(&frame, &mut opened)
            .map_err(|e| anyhow::anyhow!("open: {e}"))?;
        done += 1;
        if done % 4096 == 0 && start.elapsed() >= limit {
            break;
        }
    }
    Ok((done, start.elapsed()))
}
