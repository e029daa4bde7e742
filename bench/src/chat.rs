//! `chat`: how long `micromsg chat` takes from opening a long conversation to its first frame:
//! the newest page read from the end of the history file, the screen state built and drawn
//! (on ratatui's in-memory backend, 80×24). Beside it, reading the whole history, which is
//! what opening cost before the history was paged.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use micromsg_client::chat::model::{Chat, PAGE};
use micromsg_client::chat::view::{self, Theme};
use micromsg_client::profile::Profile;
use micromsg_client::store::{Direction, Entry, Store};
use ratatui::Terminal;
use ratatui::backend::TestBackend;

use crate::report::{Report, Row, Samples};

/// Options of `chat`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Messages in the conversation.
    #[arg(long, default_value_t = 100_000)]
    pub(crate) messages: u64,
    /// Times the conversation is opened (each from a cold start of the screen state).
    #[arg(long, default_value_t = 20)]
    pub(crate) opens: u64,
}

const SCENARIO: &str = "chat";
const PEER: &str = "5550002";

pub(crate) async fn run(args: Args) -> anyhow::Result<Report> {
    if args.messages == 0 || args.opens == 0 {
        bail!("--messages and --opens must be at least 1");
    }
    let dir = tempfile::tempdir().context("temporary directory")?;
    let profile = Profile::new(dir.path());
    let store = Store::new(&profile);
    eprintln!("chat: writing a conversation of {} messages", args.messages);
    let mut batch = Vec::with_capacity(10_000);
    for i in 0..args.messages {
        batch.push(Entry {
            direction: if i % 2 == 0 {
                Direction::In
            } else {
                Direction::Out
            },
            time: 1_700_000_000 + i,
            text: format!("message number {i}, of the ordinary length of a chat line"),
            session: [7; 16],
            counter: i,
            offline: false,
        });
        if batch.len() == 10_000 {
            store.append_history_all(PEER, &batch)?;
            batch.clear();
        }
    }
    store.append_history_all(PEER, &batch)?;

    let mut open = Samples::with_capacity(args.opens as usize);
    let started = Instant::now();
    for _ in 0..args.opens {
        let t = Instant::now();
        let mut chat = Chat::new("5550001".into(), 1);
        chat.add_contact(PEER, Some("Bob".into()), false);
        let _ = chat.start();
        let (entries, older) = store.read_history_page(PEER, None, PAGE)?;
        chat.on_history(PEER, entries, older, true);
        let mut terminal = Terminal::new(TestBackend::new(80, 24))?;
        terminal.draw(|f| view::draw(f, &chat, Theme::colour(), &jiff::tz::TimeZone::UTC))?;
        let last = format!("message number {}", args.messages - 1);
        let shown = terminal
            .backend()
            .buffer()
            .content()
            .iter()
            .map(|c| c.symbol())
            .collect::<String>();
        if !shown.contains(&last) {
            bail!("the first frame does not show the newest message");
        }
        open.push(t.elapsed());
    }
    let time = started.elapsed();
    let p99 = open.percentiles().map_or(f64::NAN, |p| p.p99_ms);
    let mut whole = Samples::with_capacity(3);
    let whole_started = Instant::now();
    for _ in 0..3 {
        let t = Instant::now();
        let all = store.read_history(PEER)?;
        if all.len() as u64 != args.messages {
            bail!("read {} of {} messages", all.len(), args.messages);
        }
        whole.push(t.elapsed());
    }
    let mut report = Report::default();
    report.push(
        Row::new(
            SCENARIO,
            &format!(
                "open a {}-message conversation to the first frame",
                args.messages
            ),
            args.opens,
            0,
            time,
        )
        .unit("opens/s")
        .latency(&mut open)
        .target("≤ 200 ms", p99 <= 200.0),
    );
    report.push(
        Row::new(
            SCENARIO,
            "reading the whole history instead (before paging)",
            3,
            0,
            whole_started.elapsed().max(Duration::from_nanos(1)),
        )
        .unit("reads/s")
        .latency(&mut whole),
    );
    Ok(report)
}
