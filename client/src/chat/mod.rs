//! `micromsg chat`: a full-screen chat client in the terminal (ratatui + crossterm).
//!
//! It is the device's online agent with a screen, not a second client: it starts the same
//! agent `listen` runs (broker link with reconnects, peer listener, relay, outbox) and shows
//! what it reports; when a `listen` already runs for the profile, it attaches to that one over
//! its control socket instead (commands as one-shot commands do, notices by subscription),
//! and leaving the screen leaves that `listen` running. [`model`] is the screen's state and its rules (keys, notices, answers in;
//! effects out; no I/O), [`view`] draws it, [`input`] is the input line; this module runs the
//! terminal, the agent and the effects.

pub mod input;
pub mod model;
pub mod settings;
pub mod view;

use std::io::Write as _;
use std::time::Duration;

use anyhow::{Context, bail};
use crossterm::event::{Event, EventStream, KeyEventKind, MouseEventKind};
use crossterm::{execute, terminal};
use futures_util::StreamExt as _;
use jiff::tz::TimeZone;
use ratatui::Terminal;
use ratatui::backend::CrosstermBackend;
use tokio::sync::mpsc;

use crate::account::unix_now;
use crate::agent::{self, AgentConfig, Answer, Commander, Notice};
use crate::profile::Profile;
use crate::store::{Entry, Store};
use model::{Chat, Effect, PAGE, Tag};
use view::Theme;

/// How `chat` runs.
#[derive(Debug, Clone)]
pub struct ChatOptions {
    /// The agent's settings (as `listen`'s).
    pub agent: AgentConfig,
    /// A command run for a message in a conversation that is not in view, with
    /// `MICROMSG_FROM` set to the sender (a desktop notification, say). Default none.
    pub notify_command: Option<String>,
    /// Colours (off when `NO_COLOR` is set, whatever `chat.toml` says).
    pub colour: bool,
}

/// Puts the terminal back however `run` ends (an error or a panic included).
struct TerminalGuard;

impl TerminalGuard {
    fn enter() -> anyhow::Result<Self> {
        terminal::enable_raw_mode().context("switching the terminal to raw mode")?;
        let guard = Self;
        execute!(
            std::io::stdout(),
            terminal::EnterAlternateScreen,
            crossterm::event::EnableMouseCapture
        )
        .context("opening the full screen")?;
        Ok(guard)
    }
}

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        let _ = execute!(
            std::io::stdout(),
            crossterm::event::DisableMouseCapture,
            terminal::LeaveAlternateScreen,
            crossterm::cursor::Show
        );
        let _ = terminal::disable_raw_mode();
    }
}

/// What a background task hands back to the loop.
enum Done {
    Answer(Tag, Answer),
    History(String, Vec<Entry>, Option<u64>, bool),
    GroupHistory(String, Vec<crate::groups::GroupEntry>),
    /// A window of text to show.
    Info(String, Vec<String>),
    /// A line for the status bar.
    Status(String),
}

/// Runs the chat until the user leaves.
pub async fn run(profile: Profile, options: ChatOptions) -> anyhow::Result<()> {
    let running = agent::send_to_running(&profile, &agent::Command::Status).await;
    let info = profile.info()?;
    let store = Store::new(&profile);
    let mut chat = Chat::new(info.number.clone(), info.device);
    let (settings, warning) = match std::fs::read_to_string(profile.path(settings::FILE)) {
        Ok(text) => settings::parse(&text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => (settings::Settings::default(), None),
        Err(e) => (
            settings::Settings::default(),
            Some(format!("{}: {e}; using the defaults", settings::FILE)),
        ),
    };
    chat.status = warning;
    chat.keys = settings.keys.clone();
    // What an earlier run left in the outbox (the agent sends it; the bar counts it down).
    chat.outbox = crate::outbox::Outbox::new(&profile)
        .load()
        .map(|q| q.iter().filter(|q| q.pending()).count())
        .unwrap_or(0);
    for (number, contact) in store.contacts()? {
        let verified = contact.is_verified();
        chat.add_contact_verified(&number, contact.name, contact.blocked, verified);
    }
    for id in store.group_ids()? {
        if let Ok(Some(group)) = store.load_group(&id)
            && group.state.is_member(&info.number)
        {
            chat.add_group(&id, &group.state.name);
        }
    }
    let (notice_tx, mut notices) = mpsc::channel::<Notice>(1024);
    let (handle, commander) = match running {
        None => {
            let config = AgentConfig {
                wait_for_broker: true,
                ..options.agent.clone()
            };
            let handle = agent::start(profile.clone(), config, notice_tx).await?;
            let commander = Agent::Own(handle.commander());
            (Some(handle), commander)
        }
        Some(status) => {
            attach(&profile, &mut chat, status, notice_tx).await?;
            (None, Agent::Attached(profile.clone()))
        }
    };
    let theme = if options.colour && settings.colour {
        Theme::colour()
    } else {
        Theme::plain()
    };
    let tz = TimeZone::system();

    let guard = TerminalGuard::enter()?;
    let mut terminal = Terminal::new(CrosstermBackend::new(std::io::stdout()))?;
    let mut events = EventStream::new();
    let (done_tx, mut done) = mpsc::channel::<Done>(256);
    let runner = Runner {
        commander,
        store: store.clone(),
        profile: profile.clone(),
        done: done_tx,
        notify_command: options.notify_command.clone().or(settings.notify.clone()),
        bell: settings.bell,
    };
    let mut pending = chat.start();
    let mut outcome = Ok(());
    'run: loop {
        for effect in std::mem::take(&mut pending) {
            if runner.run(effect, &mut chat) {
                break 'run;
            }
        }
        if let Err(e) = terminal.draw(|f| view::draw(f, &chat, theme, &tz)) {
            outcome = Err(e.into());
            break;
        }
        chat.now = unix_now();
        tokio::select! {
            event = events.next() => match event {
                Some(Ok(Event::Key(key))) if key.kind == KeyEventKind::Press => {
                    pending = chat.on_key(key);
                }
                Some(Ok(Event::Mouse(m))) => match m.kind {
                    MouseEventKind::ScrollUp => pending = chat.on_wheel(true),
                    MouseEventKind::ScrollDown => pending = chat.on_wheel(false),
                    _ => {}
                },
                // A resize just redraws (the loop draws every turn).
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    outcome = Err(anyhow::anyhow!("reading the terminal: {e}"));
                    break;
                }
                None => break,
            },
            Some(notice) = notices.recv() => pending = chat.on_notice(&notice, unix_now()),
            Some(finished) = done.recv() => match finished {
                Done::Answer(tag, answer) => chat.on_answer(tag, answer),
                Done::History(peer, entries, older, first) => {
                    chat.on_history(&peer, entries, older, first);
                }
                Done::GroupHistory(group, entries) => chat.on_group_history(&group, entries),
                Done::Info(title, lines) => chat.info = Some((title, lines)),
                Done::Status(line) => chat.status = Some(line),
            },
            // Count the reconnect wait down.
            () = tokio::time::sleep(Duration::from_secs(1)) => {
                if let model::Broker::Reconnecting(secs) = &mut chat.broker {
                    *secs = secs.saturating_sub(1);
                }
            }
        }
    }
    drop(terminal);
    drop(guard);
    // Say goodbye to the peers; what waits in the outbox stays there. An attached screen
    // leaves its `listen` running.
    if let Some(handle) = handle {
        handle.stop().await?;
    }
    outcome
}

/// The agent the screen talks to: its own, or a running `listen`'s.
#[derive(Debug, Clone)]
enum Agent {
    Own(Commander),
    Attached(Profile),
}

impl Agent {
    async fn command(&self, command: agent::Command) -> Answer {
        match self {
            Agent::Own(commander) => commander.command(command).await,
            Agent::Attached(profile) => agent::send_to_running(profile, &command)
                .await
                .unwrap_or_else(|| {
                    Err(agent::CommandError::Refused(
                        "the `listen` this screen is attached to has stopped".into(),
                    ))
                }),
        }
    }
}

/// Attaches the screen to the `listen` running for `profile`: its state now (`status`), then
/// every notice it reports.
async fn attach(
    profile: &Profile,
    chat: &mut Chat,
    status: Answer,
    notices: mpsc::Sender<Notice>,
) -> anyhow::Result<()> {
    let Some(mut subscription) = agent::subscribe_to_running(profile).await else {
        bail!("the `listen` running for this profile did not take a subscription");
    };
    if let Ok(agent::Output {
        detail: Some(agent::Detail::Status(status)),
        ..
    }) = status
    {
        if status.broker != "connected" {
            chat.broker = model::Broker::Reconnecting(0);
        }
        chat.outbox = status.outbox;
        for live in status.sessions {
            chat.on_notice(
                &Notice::SessionStarted {
                    peer: live.peer,
                    first_contact: false,
                    safety_number: String::new(),
                    path: live.path,
                },
                0,
            );
        }
    }
    chat.status =
        Some("attached to the running `listen` (leaving this screen keeps it running)".into());
    tokio::spawn(async move {
        while let Some(notice) = subscription.next().await {
            if notices.send(notice).await.is_err() {
                return;
            }
        }
        let _ = notices
            .send(Notice::Warning {
                message: "the `listen` this screen was attached to has stopped; start chat \
                          again"
                    .into(),
            })
            .await;
    });
    Ok(())
}

/// Carries out effects.
struct Runner {
    commander: Agent,
    store: Store,
    profile: Profile,
    done: mpsc::Sender<Done>,
    notify_command: Option<String>,
    bell: bool,
}

impl Runner {
    /// Starts `effect`; true when the user leaves.
    fn run(&self, effect: Effect, chat: &mut Chat) -> bool {
        match effect {
            Effect::Quit => return true,
            Effect::Agent { command, tag } => {
                let (commander, done) = (self.commander.clone(), self.done.clone());
                tokio::spawn(async move {
                    let answer = commander.command(command).await;
                    let _ = done.send(Done::Answer(tag, answer)).await;
                });
            }
            Effect::LoadOlder {
                peer, group: true, ..
            } => {
                let (store, done) = (self.store.clone(), self.done.clone());
                tokio::spawn(async move {
                    let owned = peer.clone();
                    let history =
                        tokio::task::spawn_blocking(move || store.read_group_history(&owned)).await;
                    if let Ok(Ok(entries)) = history {
                        let _ = done.send(Done::GroupHistory(peer, entries)).await;
                    }
                });
            }
            Effect::LoadOlder { peer, before, .. } => {
                let (store, done) = (self.store.clone(), self.done.clone());
                tokio::spawn(async move {
                    let owned = peer.clone();
                    let page = tokio::task::spawn_blocking(move || {
                        store.read_history_page(&owned, before, PAGE)
                    })
                    .await;
                    if let Ok(Ok((entries, older))) = page {
                        let first = before.is_none();
                        let _ = done.send(Done::History(peer, entries, older, first)).await;
                    }
                });
            }
            Effect::Notify { from } => {
                if self.bell {
                    let _ = std::io::stdout().write_all(b"\x07");
                    let _ = std::io::stdout().flush();
                }
                if let Some(command) = &self.notify_command {
                    let _ = std::process::Command::new("sh")
                        .args(["-c", command])
                        .env("MICROMSG_FROM", from)
                        .stdin(std::process::Stdio::null())
                        .stdout(std::process::Stdio::null())
                        .stderr(std::process::Stdio::null())
                        .spawn();
                }
            }
            Effect::ShowSafety { peer } => match self.safety(&peer) {
                Ok(digits) => {
                    let qr = qr_rows(&digits);
                    chat.safety = Some(model::SafetyView { peer, digits, qr });
                }
                Err(why) => chat.status = Some(why),
            },
            Effect::Devices(action) => {
                let (profile, done) = (self.profile.clone(), self.done.clone());
                tokio::spawn(async move {
                    if let Err(e) = devices(&profile, action, &done).await {
                        let _ = done.send(Done::Status(format!("devices: {e}"))).await;
                    }
                });
            }
            Effect::MarkVerified { peer } => match self.store.set_verified(&peer, unix_now()) {
                Ok(_) => chat.on_verified(&peer),
                Err(e) => chat.status = Some(format!("marking {peer} verified failed: {e}")),
            },
        }
        false
    }

    /// The safety number with `peer`, or why there is none.
    fn safety(&self, peer: &str) -> Result<String, String> {
        let Ok(Some(contact)) = self.store.contact(peer) else {
            return Err(format!("{peer} is not a contact"));
        };
        let Some(theirs) = contact.identity else {
            return Err(format!(
                "no identity key of {peer} yet: it is pinned at the first session"
            ));
        };
        let secrets = self
            .profile
            .secrets()
            .map_err(|e| format!("this profile's keys cannot be read: {e}"))?;
        let info = self
            .profile
            .info()
            .map_err(|e| format!("this profile cannot be read: {e}"))?;
        let mine = micromsg_crypto::IdentityKey::from_seed(&secrets.identity_seed).public_key();
        crate::store::safety_number_with(&info.number, &mine, peer, &theirs, Some(&contact))
            .map_err(|e| format!("safety number: {e}"))
    }
}

/// `/devices`: on a connection of its own, like the `device` commands.
async fn devices(
    profile: &Profile,
    action: model::DevicesAction,
    done: &mpsc::Sender<Done>,
) -> anyhow::Result<()> {
    use micromsg_wire::message::request::{AddDeviceArgs, DeviceRevokeArgs};
    use micromsg_wire::{DeviceId, Request, ResponseData};
    let mut session = crate::account::connect(profile).await?;
    match action {
        model::DevicesAction::List => {
            let ResponseData::DeviceList(list) = session.link.call(Request::DeviceList).await?
            else {
                bail!("the broker answered DEVICE-LIST with something else");
            };
            let tz = TimeZone::system();
            let when = |t: u64| {
                i64::try_from(t)
                    .ok()
                    .and_then(|t| jiff::Timestamp::from_second(t).ok())
                    .map_or_else(
                        || "-".into(),
                        |t| {
                            t.to_zoned(tz.clone())
                                .strftime("%Y-%m-%d %H:%M")
                                .to_string()
                        },
                    )
            };
            let lines = list
                .devices
                .iter()
                .map(|d| {
                    format!(
                        "{:>3}  {:<16} created {}  last seen {}{}",
                        d.id.get(),
                        d.name.as_ref().map_or("-", |n| n.as_str()),
                        when(d.created),
                        d.last_seen.map_or("-".to_owned(), when),
                        if d.current { "  (this device)" } else { "" }
                    )
                })
                .collect();
            let _ = done
                .send(Done::Info("Devices (Esc closes)".into(), lines))
                .await;
        }
        model::DevicesAction::Revoke(id) => {
            let device = DeviceId::new(id).map_err(|e| anyhow::anyhow!("device id: {e}"))?;
            session
                .link
                .call(Request::DeviceRevoke(DeviceRevokeArgs { device }))
                .await?;
            let _ = done
                .send(Done::Status(format!("device {id} revoked")))
                .await;
        }
        model::DevicesAction::Add => {
            let known_highest = crate::devices::highest_device(&mut session).await?;
            let ResponseData::AddDevice(data) = session
                .link
                .call(Request::AddDevice(AddDeviceArgs { name: None }))
                .await?
            else {
                bail!("the broker answered ADD-DEVICE with something else");
            };
            let transfer = crate::devices::new_transfer_key();
            let lines = vec![
                "On the new device, within 10 minutes, run:".to_owned(),
                String::new(),
                format!(
                    "micromsg --profile NEW_DIR device join --broker {} --ca CA_FILE \\",
                    session.info.broker
                ),
                format!(
                    "  --number {} --secret {} \\",
                    session.info.number,
                    data.secret.to_hex()
                ),
                format!("  --transfer-key {}", transfer.to_hex().as_str()),
                String::new(),
                "This device sends it its keys once it has joined (Esc closes this).".to_owned(),
            ];
            let _ = done.send(Done::Info("New device".into(), lines)).await;
            let sent = crate::devices::send_link_transfer(
                &mut session,
                profile,
                &transfer,
                known_highest,
                Duration::from_secs(600),
            )
            .await?;
            let _ = done
                .send(Done::Status(format!(
                    "sent this device's keys to device {sent}"
                )))
                .await;
        }
    }
    Ok(())
}

/// `text` as a QR code in text rows (two rows of modules per row: ▀ ▄ █ and space).
pub fn qr_rows(text: &str) -> Vec<String> {
    match qrcode::QrCode::new(text.as_bytes()) {
        Ok(code) => code
            .render::<qrcode::render::unicode::Dense1x2>()
            .quiet_zone(true)
            .build()
            .lines()
            .map(str::to_owned)
            .collect(),
        Err(_) => Vec::new(),
    }
}
