//! The control socket: one-shot CLI commands ([`Command`]) reach a running agent as JSON lines,
//! and its answer goes back the same way, as a [`Reply`] line made from the typed [`Answer`];
//! [`Agent::on_command`] dispatches them.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use micromsg_wire::Hex16;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};

use crate::account::AccountError;
use crate::inbox::Arrived;
use crate::profile::Profile;

use crate::link::LinkError;
use crate::outbox::Outbox;
use crate::store::Store;

use super::group_chat::Edit;
use super::reply::{
    Answer, CommandError, Detail, InboxBatch, InboxMessage, Output, Reply, refused,
};
use super::{Agent, AgentError};

/// A command for a running agent (one JSON object per line on the control socket).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Command {
    /// Ask `number` to become a contact; answers once the session is up.
    ContactAdd {
        /// The number.
        number: String,
        /// Seconds to wait for the answer (default: the agent's `answer_timeout`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        wait_secs: Option<u64>,
    },
    /// Send `text` to `number` (setting up a session first if needed).
    Send {
        /// The contact.
        number: String,
        /// The message.
        text: String,
    },
    /// Block `number` at the broker and locally.
    Block {
        /// The number.
        number: String,
    },
    /// Unblock `number`.
    Unblock {
        /// The number.
        number: String,
    },
    /// Answer a pending contact request (ask mode).
    Answer {
        /// The request id from the notice.
        request: String,
        /// Accept or reject.
        accept: bool,
    },
    /// Fetch the inbox now; the reply's `data.messages` lists what arrived.
    Inbox,
    /// The broker link and the live sessions, each with its path (`direct` or `relay`).
    Status,
    /// Control socket only: from now on, every notice the agent reports is written on this
    /// connection as a JSON line (`listen --json`'s events), until the client closes it. How
    /// `micromsg chat` attaches to a running `listen`.
    Subscribe,
    /// Create a group with these members (contacts of this entity).
    GroupCreate {
        /// The group's name.
        name: String,
        /// The other members' numbers.
        members: Vec<String>,
    },
    /// Add a member to a group.
    GroupAdd {
        /// The group id or an unambiguous prefix.
        group: String,
        /// The new member (a contact).
        number: String,
    },
    /// Remove a member from a group.
    GroupRemove {
        /// The group id or an unambiguous prefix.
        group: String,
        /// The member.
        number: String,
    },
    /// Leave a group.
    GroupLeave {
        /// The group id or an unambiguous prefix.
        group: String,
    },
    /// Rename a group.
    GroupRename {
        /// The group id or an unambiguous prefix.
        group: String,
        /// The new name.
        name: String,
    },
    /// Send a message to a group.
    GroupSend {
        /// The group id or an unambiguous prefix.
        group: String,
        /// The message.
        text: String,
    },
    /// Name a contact (`name: None` clears the name).
    ContactName {
        /// The contact's number.
        number: String,
        /// The name.
        name: Option<String>,
    },
    /// Remove a contact from this device (its session ends; the history stays).
    ContactRemove {
        /// The contact's number.
        number: String,
    },
    /// Take a queued message out of the outbox (it is never sent).
    OutboxCancel {
        /// Its id or an unambiguous prefix of at least 4 digits.
        id: String,
    },
    /// Tell every contact and group that this entity moved (the `move` command): `notice` is
    /// the signed *moved* notice (protocol.md 12.13), hex.
    AnnounceMove {
        /// The notice, hex.
        notice: String,
    },
}

/// The control socket of a profile.
pub fn control_path(profile: &Profile) -> PathBuf {
    profile.path("control.sock")
}

/// Sends `command` to the agent running for `profile`; `None` when no agent runs.
pub async fn send_to_running(profile: &Profile, command: &Command) -> Option<Answer> {
    send_to_running_cancellable(profile, command, std::future::pending()).await
}

/// The line a client sends on the control connection, after its command, to cancel it.
const CANCEL_LINE: &str = "{\"cmd\":\"cancel\"}\n";

/// [`send_to_running`], cancelled when `cancel` completes (Ctrl-C): the agent is told, and
/// its reply (which says whether anything had already left) is still awaited.
pub async fn send_to_running_cancellable(
    profile: &Profile,
    command: &Command,
    cancel: impl std::future::Future<Output = ()>,
) -> Option<Answer> {
    let stream = UnixStream::connect(control_path(profile)).await.ok()?;
    let (read, mut write) = stream.into_split();
    let mut line = serde_json::to_string(command).ok()?;
    line.push('\n');
    write.write_all(line.as_bytes()).await.ok()?;
    let mut lines = BufReader::new(read).lines();
    let closed = || Err(refused("the running agent closed the control connection"));
    tokio::pin!(cancel);
    let answer = tokio::select! {
        answer = lines.next_line() => answer,
        () = &mut cancel => {
            let _ = write.write_all(CANCEL_LINE.as_bytes()).await;
            lines.next_line().await
        }
    };
    match answer {
        Ok(Some(line)) => {
            Some(serde_json::from_str::<Reply>(&line).map_or_else(|_| closed(), Answer::from))
        }
        _ => Some(closed()),
    }
}

/// A command with its reply channel.
#[derive(Debug)]
pub struct ControlRequest {
    pub(super) command: Command,
    pub(super) reply: Waiter,
}

/// Set when the user cancelled a command (Ctrl-C) while it waited.
pub type Cancel = Arc<AtomicBool>;

/// Who waits for a command's reply, and whether they gave up: a message that has not left
/// when its `send` is cancelled never leaves.
#[derive(Debug)]
pub(super) struct Waiter {
    reply: oneshot::Sender<Answer>,
    cancel: Cancel,
}

impl Waiter {
    /// A waiter for `reply`, cancelled through `cancel`.
    pub(super) fn new(reply: oneshot::Sender<Answer>, cancel: Cancel) -> Self {
        Self { reply, cancel }
    }

    /// A waiter nobody can cancel, whose reply nobody reads (work the agent starts itself).
    pub(super) fn detached() -> Self {
        Self::new(oneshot::channel().0, Cancel::default())
    }

    /// True when the user cancelled, or nobody waits any more.
    pub(super) fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed) || self.reply.is_closed()
    }

    /// Answers; false when nobody waits for the answer any more.
    pub(super) fn send(self, reply: Answer) -> bool {
        self.reply.send(reply).is_ok()
    }
}

/// The reply to a cancelled command that had not done anything yet.
pub(super) fn cancelled_reply(what: &str) -> Answer {
    Err(CommandError::Cancelled(what.to_owned()))
}

pub(super) async fn bind_control(profile: &Profile) -> Result<UnixListener, AgentError> {
    let path = control_path(profile);
    if UnixStream::connect(&path).await.is_ok() {
        return Err(AgentError::AlreadyRunning(path));
    }
    // A socket file with nobody behind it is left over from an agent that died.
    let _ = std::fs::remove_file(&path);
    if !profile.exists() {
        return Err(AccountError::Profile(crate::profile::ProfileError::Missing(
            profile.dir().to_owned(),
        ))
        .into());
    }
    UnixListener::bind(&path).map_err(|source| AgentError::Io {
        what: format!("opening the control socket {}", path.display()),
        source,
    })
}

pub(super) async fn serve_control(
    listener: UnixListener,
    control: mpsc::Sender<ControlRequest>,
    subscribers: tokio::sync::broadcast::Sender<super::Notice>,
) {
    while let Ok((stream, _)) = listener.accept().await {
        let control = control.clone();
        let subscribers = subscribers.clone();
        tokio::spawn(async move {
            let (read, mut write) = stream.into_split();
            let mut lines = BufReader::new(read).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if matches!(
                    serde_json::from_str::<Command>(&line),
                    Ok(Command::Subscribe)
                ) {
                    stream_notices(subscribers.subscribe(), lines, write).await;
                    return;
                }
                let reply = match serde_json::from_str::<Command>(&line) {
                    Ok(command) => {
                        let (tx, mut rx) = oneshot::channel();
                        let cancel = Cancel::default();
                        let request = ControlRequest {
                            command,
                            reply: Waiter::new(tx, Arc::clone(&cancel)),
                        };
                        if control.send(request).await.is_err() {
                            Err(refused("the agent is stopping"))
                        } else {
                            // While the command runs, the client may cancel it (a cancel line)
                            // or go away (end of stream): either way it is cancelled, and the
                            // reply says whether anything had already left.
                            let answer = tokio::select! {
                                answer = &mut rx => answer,
                                _ = lines.next_line() => {
                                    cancel.store(true, Ordering::Relaxed);
                                    rx.await
                                }
                            };
                            answer.unwrap_or_else(|_| {
                                Err(refused("the agent stopped before answering"))
                            })
                        }
                    }
                    Err(e) => Err(refused(format!("bad command: {e}"))),
                };
                // The edge: the typed answer becomes its JSON line here.
                let mut out = serde_json::to_string(&Reply::from(reply)).unwrap_or_default();
                out.push('\n');
                if write.write_all(out.as_bytes()).await.is_err() {
                    break;
                }
            }
        });
    }
}

impl Agent {
    pub(super) async fn on_command(&mut self, command: Command, reply: Waiter) {
        let too_long = match &command {
            Command::Send { text, .. } => {
                self.broker_limits.check(text, false, &self.config.session)
            }
            Command::GroupSend { text, .. } => {
                self.broker_limits.check(text, true, &self.config.session)
            }
            _ => Ok(()),
        };
        if let Err(message) = too_long {
            let _ = reply.send(Err(refused(message)));
            return;
        }
        match command {
            Command::ContactAdd { number, wait_secs } => {
                let wait = wait_secs.map(std::time::Duration::from_secs);
                self.initiate(number, None, reply, false, wait).await;
            }
            Command::Send { number, text } => self.deliver(number, text, reply).await,
            Command::ContactName { number, name } => {
                let r = self
                    .on_disk(move |s| name_contact(s, &number, name.as_deref()))
                    .await;
                let _ = reply.send(r);
            }
            Command::ContactRemove { number } => {
                self.paths.remove(&number);
                if let Some((sender, _)) = self.sessions.remove(&number) {
                    let _ = sender.close("removed as a contact").await;
                }
                self.outbox.retain(|q| q.to != number);
                let r = match self.persist_outbox().await {
                    Ok(()) => {
                        let profile = self.profile.clone();
                        self.on_disk(move |s| remove_contact(&profile, s, &number))
                            .await
                    }
                    Err(e) => Err(refused(e)),
                };
                let _ = reply.send(r);
            }
            Command::Subscribe => {
                let _ = reply.send(Err(refused(
                    "subscribe is served by the control socket, not by a command",
                )));
            }
            Command::OutboxCancel { id } => {
                let list = self.profile.command("outbox");
                let r = match super::queue::cancel(&mut self.outbox, &id, &list) {
                    Ok(item) => match self.persist_outbox().await {
                        Ok(()) => cancelled(&item),
                        Err(e) => {
                            self.outbox = self.outbox_file.load().unwrap_or_default();
                            Err(refused(e))
                        }
                    },
                    Err(message) => Err(refused(message)),
                };
                let _ = reply.send(r);
            }
            Command::AnnounceMove { notice } => {
                let r = self.announce_move(&notice).await;
                let _ = reply.send(r);
            }
            Command::Status => {
                let status = self.status();
                let lines: Vec<String> = status
                    .sessions
                    .iter()
                    .map(|s| format!("  {} ({})", s.peer, s.path.as_str()))
                    .collect();
                let message = format!(
                    "number {}, device {}; broker {}; {} in the outbox; {} live session(s){}{}",
                    status.number,
                    status.device,
                    status.broker,
                    status.outbox,
                    status.sessions.len(),
                    if lines.is_empty() { "" } else { ":\n" },
                    lines.join("\n")
                );
                let _ = reply.send(Ok(Output::said(message).with(Detail::Status(status))));
            }
            Command::Inbox if self.link.is_none() => {
                let _ = reply.send(Err(refused(LinkError::Offline.to_string())));
            }
            Command::Inbox => {
                let arrived = self.fetch_inbox().await;
                let messages: Vec<InboxMessage> = arrived
                    .into_iter()
                    .filter_map(|a| match a {
                        Arrived::Message {
                            peer,
                            direction,
                            from_device,
                            text,
                            time,
                        } => Some(InboxMessage {
                            peer,
                            direction,
                            device: from_device,
                            text,
                            time,
                        }),
                        _ => None,
                    })
                    .collect();
                let message = match messages.len() {
                    0 => "no new messages".to_owned(),
                    1 => "1 new message".to_owned(),
                    n => format!("{n} new messages"),
                };
                let pending = self.delivery.pending();
                let message = if pending > 0 {
                    format!("{message} ({pending} waiting for session keys from another device)")
                } else {
                    message
                };
                let _ = reply.send(Ok(
                    Output::said(message).with(InboxBatch { messages, pending })
                ));
            }
            Command::GroupCreate { name, members } => {
                let r = self.group_create(name, members).await;
                let _ = reply.send(r);
            }
            Command::GroupAdd { group, number } => {
                let r = self.group_change(&group, Edit::Add(number)).await;
                let _ = reply.send(r);
            }
            Command::GroupRemove { group, number } => {
                let r = self.group_change(&group, Edit::Remove(number)).await;
                let _ = reply.send(r);
            }
            Command::GroupLeave { group } => {
                let r = self.group_change(&group, Edit::Leave).await;
                let _ = reply.send(r);
            }
            Command::GroupRename { group, name } => {
                let r = self.group_change(&group, Edit::Rename(name)).await;
                let _ = reply.send(r);
            }
            Command::GroupSend { group, text } => {
                let r = self.group_send(&group, text).await;
                let _ = reply.send(r);
            }
            Command::Block { number } => {
                let r = self.block(&number, true).await;
                let _ = reply.send(r);
            }
            Command::Unblock { number } => {
                let r = self.block(&number, false).await;
                let _ = reply.send(r);
            }
            Command::Answer { request, accept } => {
                let asked = micromsg_crypto::hex::decode_array::<16>(&request)
                    .ok()
                    .and_then(|id| Some((id, self.asked.remove(&id)?)));
                let r = match asked {
                    Some((id, asked)) => {
                        let request = Hex16::from_bytes(id);
                        match self.answer(request, accept, asked.caller_key).await {
                            Ok(()) if accept => Ok(Output::said(
                                "accepted; the session starts when they connect",
                            )),
                            Ok(()) => {
                                self.record_rejected(&asked.from).await;
                                Ok(Output::said(format!(
                                    "rejected {} (and blocked: `{}` lists it; `{}` undoes it)",
                                    asked.from,
                                    self.profile.command("contact list"),
                                    self.profile
                                        .command(&format!("contact unblock {}", asked.from))
                                )))
                            }
                            Err(e) => Err(refused(e.to_string())),
                        }
                    }
                    None => Err(refused("no such pending contact request")),
                };
                let _ = reply.send(r);
            }
        }
    }
}

fn cancelled(item: &crate::outbox::Queued) -> Answer {
    Ok(Output::said(format!(
        "cancelled: the message to {} queued at {} will not be sent",
        item.to,
        crate::when::local_time(item.queued_at)
    ))
    .with(Detail::Unqueued {
        cancelled: item.id.clone(),
        to: item.to.clone(),
    }))
}

/// `outbox cancel ID` with no agent running: the outbox file is changed directly.
pub fn cancel_queued(profile: &Profile, id: &str) -> Answer {
    let file = Outbox::new(profile);
    let mut items = match file.load() {
        Ok(items) => items,
        Err(e) => return Err(refused(format!("reading the outbox: {e}"))),
    };
    match super::queue::cancel(&mut items, id, &profile.command("outbox")) {
        Ok(item) => match file.save(&items) {
            Ok(()) => cancelled(&item),
            Err(e) => Err(refused(format!("writing the outbox: {e}"))),
        },
        Err(message) => Err(refused(message)),
    }
}

/// `contact name NUMBER NAME` (in the agent, or here when none runs).
pub fn name_contact(store: &Store, number: &str, name: Option<&str>) -> Answer {
    if !matches!(store.contact(number), Ok(Some(_))) {
        return Err(refused(format!("{number} is not in your contacts")));
    }
    match store.set_name(number, name, crate::account::unix_now()) {
        Ok(c) => {
            let said = match &c.name {
                Some(n) => format!("{number} is now shown as {n}"),
                None => format!("{number} has no name now"),
            };
            Ok(Output::said(said).with(Detail::Named {
                number: number.to_owned(),
                name: c.name,
            }))
        }
        Err(e) => Err(refused(e.to_string())),
    }
}

/// `contact remove NUMBER` when no agent runs (the agent also ends a live session and drops
/// queued messages to it first).
pub fn remove_contact(profile: &Profile, store: &Store, number: &str) -> Answer {
    match store.remove_contact(number) {
        Ok(true) => Ok(Output::said(format!(
            "removed {number} from this device (the history stays; `{}` asks them again)",
            profile.command(&format!("contact add {number}"))
        ))
        .with(Detail::Removed {
            removed: number.to_owned(),
        })),
        Ok(false) => Err(refused(format!("{number} is not in your contacts"))),
        Err(e) => Err(refused(e.to_string())),
    }
}

/// A subscriber: every notice as a JSON line until the client closes the connection (or
/// stops reading: a write that fails ends it).
async fn stream_notices(
    mut notices: tokio::sync::broadcast::Receiver<super::Notice>,
    mut lines: tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>,
    mut write: tokio::net::unix::OwnedWriteHalf,
) {
    use tokio::sync::broadcast::error::RecvError;
    loop {
        let notice = tokio::select! {
            notice = notices.recv() => notice,
            // Anything from the client, or its end, ends the subscription.
            _ = lines.next_line() => return,
        };
        let notice = match notice {
            Ok(notice) => notice,
            Err(RecvError::Lagged(missed)) => super::Notice::Warning {
                message: format!("{missed} notices were skipped (this screen read too slowly)"),
            },
            Err(RecvError::Closed) => return,
        };
        let mut out = serde_json::to_string(&notice).unwrap_or_default();
        out.push('\n');
        if write.write_all(out.as_bytes()).await.is_err() {
            return;
        }
    }
}

/// The notices of a running agent, read from its control socket.
#[derive(Debug)]
pub struct Subscription {
    lines: tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>,
    /// Kept open: closing it ends the subscription.
    _write: tokio::net::unix::OwnedWriteHalf,
}

impl Subscription {
    /// The next notice; `None` when the agent stopped.
    pub async fn next(&mut self) -> Option<super::Notice> {
        loop {
            let line = self.lines.next_line().await.ok()??;
            if let Ok(notice) = serde_json::from_str(&line) {
                return Some(notice);
            }
        }
    }
}

/// Subscribes to the notices of the agent running for `profile` (`None` when none runs).
pub async fn subscribe_to_running(profile: &Profile) -> Option<Subscription> {
    let stream = UnixStream::connect(control_path(profile)).await.ok()?;
    let (read, mut write) = stream.into_split();
    let mut line = serde_json::to_string(&Command::Subscribe).ok()?;
    line.push('\n');
    write.write_all(line.as_bytes()).await.ok()?;
    Some(Subscription {
        lines: BufReader::new(read).lines(),
        _write: write,
    })
}
