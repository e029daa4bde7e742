//! What the chat screen shows and how keys and the agent's notices change it. No I/O and no
//! clock: keys, notices and answers come in, [`Effect`]s go out (the runner in `chat/mod.rs`
//! carries them out), and the time is passed in.

use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};

use super::input::Input;
use crate::agent::{Answer, Command, Delivered, Detail, Notice};
use crate::relay::Path;
use crate::store::{Direction, Entry};

/// Messages loaded per page of history.
pub const PAGE: usize = 200;

/// The commands, for help and completion.
pub const COMMANDS: &[(&str, &str)] = &[
    ("/add NUMBER", "ask NUMBER to become a contact"),
    ("/name NAME", "name the contact in view"),
    ("/block", "block the contact in view"),
    ("/unblock", "unblock the contact in view"),
    ("/remove", "remove the contact in view from this device"),
    ("/safety", "show the safety number of the contact in view"),
    ("/devices", "this entity's devices"),
    (
        "/devices add",
        "a secret and transfer key for a new device; its keys follow",
    ),
    ("/devices revoke ID", "remove a device of this entity"),
    (
        "/group create NAME NUMBER…",
        "make a group (NAME one word; /group rename for more)",
    ),
    ("/group add NUMBER", "add a contact to the group in view"),
    (
        "/group remove NUMBER",
        "remove a member from the group in view",
    ),
    ("/group rename NAME", "rename the group in view"),
    ("/group leave", "leave the group in view"),
    ("/outbox", "how many messages wait in the outbox"),
    ("/help", "this help (also ?)"),
    (
        "/quit",
        "leave (also Ctrl-C); queued messages stay in the outbox",
    ),
];

/// How a message is doing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// It came to this device.
    Received,
    /// Handed to the agent, no answer yet.
    Sending,
    /// Over the live session.
    Live,
    /// Deposited at the broker.
    Deposited,
    /// In this device's outbox: why it waits.
    Queued(String),
    /// Not sent: why.
    Failed(String),
}

/// One message in a conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    /// Unix seconds (the sender's clock for received ones).
    pub time: u64,
    /// Sent by this entity.
    pub from_me: bool,
    /// The text.
    pub text: String,
    /// How it is doing.
    pub delivery: Delivery,
    /// The outbox id while it is queued.
    pub queued_id: Option<String>,
    /// In a group: the member who sent it (not this entity).
    pub sender: Option<String>,
}

impl Line {
    fn from_entry(e: Entry) -> Self {
        let from_me = e.direction == Direction::Out;
        Self {
            time: e.time,
            from_me,
            text: e.text,
            delivery: if from_me {
                if e.offline {
                    Delivery::Deposited
                } else {
                    Delivery::Live
                }
            } else {
                Delivery::Received
            },
            queued_id: None,
            sender: None,
        }
    }

    fn from_group_entry(e: crate::groups::GroupEntry, me: &str) -> Self {
        let from_me = e.from == me;
        Self {
            time: e.sent,
            from_me,
            text: e.text,
            delivery: if from_me {
                Delivery::Live
            } else {
                Delivery::Received
            },
            queued_id: None,
            sender: (!from_me).then_some(e.from),
        }
    }
}

/// A conversation with one contact.
#[derive(Debug, Clone, Default)]
pub struct Conversation {
    /// The contact's number.
    pub peer: String,
    /// Its name, if set.
    pub name: Option<String>,
    /// Messages not seen yet.
    pub unread: usize,
    /// The live session's path, when one is up.
    pub live: Option<Path>,
    /// Loaded messages, oldest first.
    pub lines: Vec<Line>,
    /// Where older history starts in the file (`None`: all loaded), once loading began.
    pub older: Option<u64>,
    /// Whether any history was loaded yet.
    pub loaded: bool,
    /// Lines scrolled up from the bottom.
    pub scroll: usize,
    /// The contact's identity key changed: sending needs `/send!` once.
    pub key_changed: bool,
    /// Blocked.
    pub blocked: bool,
    /// A group (`peer` is then its id).
    pub group: bool,
    /// The user compared the safety number of the pinned key and marked it verified.
    pub verified: bool,
}

/// The safety-number view of one contact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SafetyView {
    /// The contact.
    pub peer: String,
    /// The safety number, in groups of digits.
    pub digits: String,
    /// The same as a QR code, one text row per two rows of modules.
    pub qr: Vec<String>,
}

impl Conversation {
    /// The name, or the number.
    pub fn title(&self) -> &str {
        self.name.as_deref().unwrap_or(&self.peer)
    }
}

/// The broker link, as the status bar shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Broker {
    /// Logged in.
    Connected,
    /// Lost; the agent tries again in about this many seconds.
    Reconnecting(u64),
}

/// A contact request waiting for the user's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Who asks.
    pub from: String,
    /// The request id to answer.
    pub request: String,
}

/// What the runner should do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Run `command` in the agent; its answer comes back through [`Chat::on_answer`] with
    /// `tag`.
    Agent {
        /// The command.
        command: Command,
        /// What the answer is for.
        tag: Tag,
    },
    /// Load the page of history before `before` for `peer` (for a group, all of it).
    LoadOlder {
        /// The contact, or the group's id.
        peer: String,
        /// Where the loaded history starts (`None`: from the end).
        before: Option<u64>,
        /// `peer` is a group.
        group: bool,
    },
    /// Ring the terminal bell (and run the notification command, if one is set).
    Notify {
        /// The contact.
        from: String,
    },
    /// Show the safety number of `peer` (read from the profile).
    ShowSafety {
        /// The contact.
        peer: String,
    },
    /// Devices of this entity: list, add, revoke.
    Devices(DevicesAction),
    /// Mark the contact's pinned key verified.
    MarkVerified {
        /// The contact.
        peer: String,
    },
    /// Leave.
    Quit,
}

/// What `/devices` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DevicesAction {
    /// List them.
    List,
    /// Make a registration secret and transfer key, then send the keys to the new device.
    Add,
    /// Revoke this device id.
    Revoke(u32),
}

/// What an agent answer belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tag {
    /// A message sent to `peer`, at `index` in its conversation.
    Sent {
        /// The contact.
        peer: String,
        /// The line.
        index: usize,
    },
    /// Any other command: its answer goes to the status line.
    Status,
}

/// The whole screen's state.
#[derive(Debug, Clone)]
pub struct Chat {
    /// This entity's number.
    pub number: String,
    /// This device.
    pub device: u32,
    /// Conversations, in list order.
    pub conversations: Vec<Conversation>,
    /// The one in view.
    pub selected: usize,
    /// The input line.
    pub input: Input,
    /// The broker link.
    pub broker: Broker,
    /// Messages waiting in the outbox.
    pub outbox: usize,
    /// Contact requests waiting for an answer, oldest first.
    pub requests: Vec<Request>,
    /// The key help is open.
    pub help: bool,
    /// The last thing to tell the user (answers, warnings).
    pub status: Option<String>,
    /// The current Unix time, set by the runner before it passes keys in.
    pub now: u64,
    /// Contacts' names, by number (for the senders in groups).
    pub names: std::collections::HashMap<String, String>,
    /// The key bindings (`chat.toml`).
    pub keys: super::settings::Keys,
    /// The safety-number view, when open.
    pub safety: Option<SafetyView>,
    /// A window of text (a title and lines) to read, when open (the device list, a new
    /// device's secret); Esc closes it.
    pub info: Option<(String, Vec<String>)>,
}

impl Chat {
    /// An empty screen for this device.
    pub fn new(number: String, device: u32) -> Self {
        Self {
            number,
            device,
            conversations: Vec::new(),
            selected: 0,
            input: Input::default(),
            broker: Broker::Connected,
            outbox: 0,
            requests: Vec::new(),
            help: false,
            status: None,
            now: 0,
            names: std::collections::HashMap::new(),
            keys: super::settings::Keys::default(),
            safety: None,
            info: None,
        }
    }

    /// Adds (or updates the name of) the conversation with `peer`.
    pub fn add_contact(&mut self, peer: &str, name: Option<String>, blocked: bool) {
        self.add_contact_verified(peer, name, blocked, false);
    }

    /// [`Self::add_contact`], with whether its safety number was verified.
    pub fn add_contact_verified(
        &mut self,
        peer: &str,
        name: Option<String>,
        blocked: bool,
        verified: bool,
    ) {
        if let Some(name) = &name {
            self.names.insert(peer.to_owned(), name.clone());
        }
        let i = self.conversation(peer);
        self.conversations[i].name = name;
        self.conversations[i].blocked = blocked;
        self.conversations[i].verified = verified;
    }

    /// Adds (or renames) the group `id`.
    pub fn add_group(&mut self, id: &str, name: &str) {
        let i = self.conversation(id);
        let c = &mut self.conversations[i];
        c.group = true;
        c.name = Some(name.to_owned());
    }

    /// A sender's name, or its number.
    pub fn name_of<'a>(&'a self, number: &'a str) -> &'a str {
        self.names.get(number).map_or(number, String::as_str)
    }

    /// The whole history of group `id` arrived (groups are not paged).
    pub fn on_group_history(&mut self, id: &str, entries: Vec<crate::groups::GroupEntry>) {
        let me = self.number.clone();
        let i = self.conversation(id);
        let c = &mut self.conversations[i];
        let page: Vec<Line> = entries
            .into_iter()
            .map(|e| Line::from_group_entry(e, &me))
            .collect();
        let arrived = std::mem::replace(&mut c.lines, page);
        for line in arrived {
            if !c
                .lines
                .iter()
                .rev()
                .take(PAGE)
                .any(|h| h.text == line.text && h.time == line.time)
            {
                c.lines.push(line);
            }
        }
        c.older = None;
    }

    /// The conversation with `peer`, made if new; its index.
    fn conversation(&mut self, peer: &str) -> usize {
        if let Some(i) = self.conversations.iter().position(|c| c.peer == peer) {
            return i;
        }
        self.conversations.push(Conversation {
            peer: peer.to_owned(),
            ..Conversation::default()
        });
        self.conversations.len() - 1
    }

    /// The conversation in view.
    pub fn current(&self) -> Option<&Conversation> {
        self.conversations.get(self.selected)
    }

    fn current_mut(&mut self) -> Option<&mut Conversation> {
        self.conversations.get_mut(self.selected)
    }

    /// Effects to run right after start: the history of the conversation in view.
    pub fn start(&mut self) -> Vec<Effect> {
        self.select(self.selected)
    }

    /// Shows conversation `i`: its unread count is cleared and its history loaded if needed.
    fn select(&mut self, i: usize) -> Vec<Effect> {
        if self.conversations.is_empty() {
            return Vec::new();
        }
        self.selected = i.min(self.conversations.len() - 1);
        let c = &mut self.conversations[self.selected];
        c.unread = 0;
        if c.loaded {
            return Vec::new();
        }
        c.loaded = true;
        vec![Effect::LoadOlder {
            peer: c.peer.clone(),
            before: None,
            group: c.group,
        }]
    }

    /// A page of history arrived: the newest (`first`) or one older than what is loaded.
    pub fn on_history(&mut self, peer: &str, entries: Vec<Entry>, older: Option<u64>, first: bool) {
        let i = self.conversation(peer);
        let c = &mut self.conversations[i];
        let page: Vec<Line> = entries.into_iter().map(Line::from_entry).collect();
        if first {
            // Messages that arrived while the page was read are in it too (the agent stores a
            // message before it reports it): keep only those the page does not have.
            let arrived = std::mem::replace(&mut c.lines, page);
            for line in arrived {
                let stored = c.lines.iter().rev().take(PAGE).any(|h| {
                    h.text == line.text && h.from_me == line.from_me && h.time == line.time
                });
                if !stored {
                    c.lines.push(line);
                }
            }
        } else {
            c.lines.splice(0..0, page);
        }
        c.older = older;
    }

    /// A key.
    pub fn on_key(&mut self, key: KeyEvent) -> Vec<Effect> {
        let ctrl = key.modifiers.contains(KeyModifiers::CONTROL);
        let alt = key.modifiers.contains(KeyModifiers::ALT);
        if ctrl && key.code == KeyCode::Char('c') {
            return vec![Effect::Quit];
        }
        if self.help {
            if matches!(key.code, KeyCode::Esc | KeyCode::Char('?' | 'q')) {
                self.help = false;
            }
            return Vec::new();
        }
        if self.info.is_some() {
            if matches!(key.code, KeyCode::Esc | KeyCode::Char('q') | KeyCode::Enter) {
                self.info = None;
            }
            return Vec::new();
        }
        if let Some(view) = &self.safety {
            return match key.code {
                KeyCode::Char('v') => {
                    let peer = view.peer.clone();
                    self.safety = None;
                    vec![Effect::MarkVerified { peer }]
                }
                KeyCode::Esc | KeyCode::Char('q') => {
                    self.safety = None;
                    Vec::new()
                }
                _ => Vec::new(),
            };
        }
        if let Some(request) = self.requests.first().cloned() {
            return self.answer_request(&request, key.code);
        }
        let keys = self.keys.clone();
        if keys.next.matches(&key) {
            return self.select(self.selected + 1);
        }
        if keys.previous.matches(&key) {
            return self.select(self.selected.saturating_sub(1));
        }
        if keys.scroll_up.matches(&key) {
            return self.scroll_up(10);
        }
        if keys.scroll_down.matches(&key) {
            return self.scroll_down(10);
        }
        if keys.help.matches(&key) {
            self.help = true;
            return Vec::new();
        }
        match key.code {
            KeyCode::Char('?') if self.input.is_empty() => {
                self.help = true;
                Vec::new()
            }
            KeyCode::Enter if alt => {
                self.input.insert('\n');
                Vec::new()
            }
            KeyCode::Enter => self.submit(),
            KeyCode::Up | KeyCode::BackTab => self.select(self.selected.saturating_sub(1)),
            KeyCode::Down => self.select(self.selected + 1),
            KeyCode::Char('p') if ctrl => self.select(self.selected.saturating_sub(1)),
            KeyCode::Char('n') if ctrl => self.select(self.selected + 1),
            KeyCode::Char('k') if alt => self.select(self.selected.saturating_sub(1)),
            KeyCode::Char('j') if alt => self.select(self.selected + 1),
            KeyCode::PageUp => self.scroll_up(10),
            KeyCode::Char('u') if ctrl => self.scroll_up(10),
            KeyCode::PageDown => self.scroll_down(10),
            KeyCode::Char('d') if ctrl => self.scroll_down(10),
            KeyCode::Char('w') if ctrl => {
                self.input.delete_word();
                Vec::new()
            }
            KeyCode::Tab => {
                self.complete();
                Vec::new()
            }
            KeyCode::Left => {
                self.input.left();
                Vec::new()
            }
            KeyCode::Right => {
                self.input.right();
                Vec::new()
            }
            KeyCode::Home => {
                self.input.home();
                Vec::new()
            }
            KeyCode::End => {
                self.input.end();
                Vec::new()
            }
            KeyCode::Backspace => {
                self.input.backspace();
                Vec::new()
            }
            KeyCode::Delete => {
                self.input.delete();
                Vec::new()
            }
            KeyCode::Esc => {
                self.status = None;
                Vec::new()
            }
            KeyCode::Char(c) if !ctrl => {
                self.input.insert(c);
                Vec::new()
            }
            _ => Vec::new(),
        }
    }

    /// The mouse wheel: up (`true`) or down.
    pub fn on_wheel(&mut self, up: bool) -> Vec<Effect> {
        if up {
            self.scroll_up(3)
        } else {
            self.scroll_down(3)
        }
    }

    fn scroll_up(&mut self, by: usize) -> Vec<Effect> {
        let Some(c) = self.current_mut() else {
            return Vec::new();
        };
        c.scroll = (c.scroll + by).min(c.lines.len());
        // Near the top of what is loaded: the next page, in good time.
        if c.lines.len().saturating_sub(c.scroll) < PAGE / 2
            && let Some(before) = c.older.take()
        {
            return vec![Effect::LoadOlder {
                peer: c.peer.clone(),
                before: Some(before),
                group: c.group,
            }];
        }
        Vec::new()
    }

    fn scroll_down(&mut self, by: usize) -> Vec<Effect> {
        if let Some(c) = self.current_mut() {
            c.scroll = c.scroll.saturating_sub(by);
        }
        Vec::new()
    }

    fn complete(&mut self) {
        let text = self.input.text();
        if !text.starts_with('/') || text.contains(' ') {
            return;
        }
        let mut matches: Vec<&str> = COMMANDS
            .iter()
            .map(|(c, _)| c.split(' ').next().unwrap_or(c))
            .filter(|c| c.starts_with(&text))
            .collect();
        matches.dedup();
        match matches.as_slice() {
            [one] => self.input.set(&format!("{one} ")),
            [] => self.status = Some(format!("no command starts with {text}")),
            many => self.status = Some(many.join("  ")),
        }
    }

    fn answer_request(&mut self, request: &Request, key: KeyCode) -> Vec<Effect> {
        let accept = match key {
            KeyCode::Char('a') => true,
            KeyCode::Char('r' | 'b') => false,
            _ => return Vec::new(),
        };
        self.requests.remove(0);
        let mut effects = vec![Effect::Agent {
            command: Command::Answer {
                request: request.request.clone(),
                accept,
            },
            tag: Tag::Status,
        }];
        if key == KeyCode::Char('b') {
            effects.push(Effect::Agent {
                command: Command::Block {
                    number: request.from.clone(),
                },
                tag: Tag::Status,
            });
        }
        if accept {
            let i = self.conversation(&request.from);
            effects.extend(self.select(i));
        }
        effects
    }

    /// Enter: a command, or a message to the contact in view.
    fn submit(&mut self) -> Vec<Effect> {
        let text = self.input.text();
        if text.trim().is_empty() {
            return Vec::new();
        }
        if let Some(command) = text.strip_prefix('/') {
            self.input.take();
            return self.command(command.trim());
        }
        let Some(c) = self.current() else {
            self.status = Some("no conversation yet: /add NUMBER asks someone".into());
            return Vec::new();
        };
        if c.key_changed {
            self.status = Some(format!(
                "{}'s identity key CHANGED: compare safety numbers (/safety) before you send; \
                 /send! sends this once anyway",
                c.title()
            ));
            return Vec::new();
        }
        self.input.take();
        self.send(text, false)
    }

    fn send(&mut self, text: String, confirmed: bool) -> Vec<Effect> {
        let now = self.now;
        let Some(c) = self.current_mut() else {
            return Vec::new();
        };
        if confirmed {
            c.key_changed = false;
        }
        c.scroll = 0;
        c.lines.push(Line {
            time: now,
            from_me: true,
            text: text.clone(),
            delivery: Delivery::Sending,
            queued_id: None,
            sender: None,
        });
        let (peer, index) = (c.peer.clone(), c.lines.len() - 1);
        let command = if c.group {
            Command::GroupSend {
                group: peer.clone(),
                text,
            }
        } else {
            Command::Send {
                number: peer.clone(),
                text,
            }
        };
        vec![Effect::Agent {
            command,
            tag: Tag::Sent { peer, index },
        }]
    }

    fn command(&mut self, line: &str) -> Vec<Effect> {
        let (name, rest) = line.split_once(' ').unwrap_or((line, ""));
        let rest = rest.trim();
        let peer = self.current().map(|c| c.peer.clone());
        let on_peer = |make: fn(String) -> Command| match &peer {
            Some(p) => vec![Effect::Agent {
                command: make(p.clone()),
                tag: Tag::Status,
            }],
            None => Vec::new(),
        };
        match name {
            "quit" | "q" => vec![Effect::Quit],
            "help" => {
                self.help = true;
                Vec::new()
            }
            "add" if !rest.is_empty() => {
                let i = self.conversation(rest);
                let mut effects = self.select(i);
                effects.push(Effect::Agent {
                    command: Command::ContactAdd {
                        number: rest.to_owned(),
                        wait_secs: None,
                    },
                    tag: Tag::Status,
                });
                self.status = Some(format!("asking {rest}…"));
                effects
            }
            "name" if !rest.is_empty() => {
                let name = rest.to_owned();
                if let Some(c) = self.current_mut() {
                    c.name = Some(name.clone());
                }
                match peer {
                    Some(number) => {
                        // Everywhere the contact is named (its group messages, the safety
                        // view), not only in the list.
                        self.names.insert(number.clone(), name.clone());
                        vec![Effect::Agent {
                            command: Command::ContactName {
                                number,
                                name: Some(name),
                            },
                            tag: Tag::Status,
                        }]
                    }
                    None => Vec::new(),
                }
            }
            "block" => on_peer(|number| Command::Block { number }),
            "unblock" => on_peer(|number| Command::Unblock { number }),
            "remove" => on_peer(|number| Command::ContactRemove { number }),
            "outbox" => {
                self.status = Some(format!("{} message(s) wait in the outbox", self.outbox));
                Vec::new()
            }
            "safety" => peer
                .map(|peer| vec![Effect::ShowSafety { peer }])
                .unwrap_or_default(),
            "send!" if !rest.is_empty() => self.send(rest.to_owned(), true),
            "group" => self.group_command(rest),
            "devices" => match rest.split_whitespace().collect::<Vec<_>>().as_slice() {
                [] | ["list"] => vec![Effect::Devices(DevicesAction::List)],
                ["add"] => vec![Effect::Devices(DevicesAction::Add)],
                ["revoke", id] => match id.parse() {
                    Ok(id) => vec![Effect::Devices(DevicesAction::Revoke(id))],
                    Err(_) => self.usage("/devices revoke ID (a number from /devices)"),
                },
                _ => self.usage("/devices [add | revoke ID]"),
            },
            _ => {
                self.status = Some(format!("unknown command /{line}; /help lists them"));
                Vec::new()
            }
        }
    }

    fn group_command(&mut self, line: &str) -> Vec<Effect> {
        let mut words = line.split_whitespace();
        let verb = words.next().unwrap_or_default();
        let in_view = self.current().filter(|c| c.group).map(|c| c.peer.clone());
        let command = match (verb, in_view) {
            ("create", _) => {
                let Some(name) = words.next() else {
                    return self.usage("/group create NAME NUMBER…");
                };
                Command::GroupCreate {
                    name: name.to_owned(),
                    members: words.map(str::to_owned).collect(),
                }
            }
            ("add" | "remove" | "rename" | "leave", None) => {
                self.status = Some(format!(
                    "/group {verb} works on the group in view; select one"
                ));
                return Vec::new();
            }
            ("add", Some(group)) => match words.next() {
                Some(number) => Command::GroupAdd {
                    group,
                    number: number.to_owned(),
                },
                None => return self.usage("/group add NUMBER"),
            },
            ("remove", Some(group)) => match words.next() {
                Some(number) => Command::GroupRemove {
                    group,
                    number: number.to_owned(),
                },
                None => return self.usage("/group remove NUMBER"),
            },
            ("rename", Some(group)) => {
                let name = words.collect::<Vec<_>>().join(" ");
                if name.is_empty() {
                    return self.usage("/group rename NAME");
                }
                Command::GroupRename { group, name }
            }
            ("leave", Some(group)) => Command::GroupLeave { group },
            _ => return self.usage("/group create|add|remove|rename|leave …"),
        };
        vec![Effect::Agent {
            command,
            tag: Tag::Status,
        }]
    }

    fn usage(&mut self, usage: &str) -> Vec<Effect> {
        self.status = Some(format!("usage: {usage}"));
        Vec::new()
    }

    /// The contact's key was marked verified.
    pub fn on_verified(&mut self, peer: &str) {
        let i = self.conversation(peer);
        self.conversations[i].verified = true;
        self.status = Some(format!(
            "{} is marked verified",
            self.conversations[i].title()
        ));
    }

    /// The agent answered a command.
    pub fn on_answer(&mut self, tag: Tag, answer: Answer) {
        match tag {
            Tag::Sent { peer, index } => {
                let Some(c) = self.conversations.iter_mut().find(|c| c.peer == peer) else {
                    return;
                };
                let Some(line) = c.lines.get_mut(index) else {
                    return;
                };
                line.delivery = match answer {
                    Ok(out) => match out.detail {
                        Some(Detail::Sent(Delivered::Live)) => Delivery::Live,
                        Some(Detail::Sent(Delivered::Deposited { .. })) => Delivery::Deposited,
                        Some(Detail::Sent(Delivered::Queued { id, reason })) => {
                            line.queued_id = Some(id);
                            self.outbox += 1;
                            Delivery::Queued(reason)
                        }
                        _ => Delivery::Live,
                    },
                    Err(e) => Delivery::Failed(e.to_string()),
                };
            }
            Tag::Status => {
                self.status = Some(match answer {
                    Ok(out) => out.message,
                    Err(e) => e.to_string(),
                });
            }
        }
    }

    /// Something the agent reports; `now` is the current Unix time.
    pub fn on_notice(&mut self, notice: &Notice, now: u64) -> Vec<Effect> {
        match notice {
            Notice::Message {
                from, text, time, ..
            } => {
                let i = self.conversation(from);
                let in_view = i == self.selected && !self.conversations.is_empty();
                let c = &mut self.conversations[i];
                c.lines.push(Line {
                    time: if *time == 0 { now } else { *time },
                    from_me: false,
                    text: text.clone(),
                    delivery: Delivery::Received,
                    queued_id: None,
                    sender: None,
                });
                if in_view && c.scroll == 0 {
                    return Vec::new();
                }
                c.unread += 1;
                return vec![Effect::Notify { from: from.clone() }];
            }
            Notice::GroupMessage {
                group,
                name,
                from,
                text,
                time,
                ..
            } => {
                let i = self.conversation(group);
                let in_view = i == self.selected;
                let from_me = *from == self.number;
                let c = &mut self.conversations[i];
                c.group = true;
                c.name = Some(name.clone());
                c.lines.push(Line {
                    time: if *time == 0 { now } else { *time },
                    from_me,
                    text: text.clone(),
                    delivery: if from_me {
                        Delivery::Live
                    } else {
                        Delivery::Received
                    },
                    queued_id: None,
                    sender: (!from_me).then(|| from.clone()),
                });
                if from_me || (in_view && c.scroll == 0) {
                    return Vec::new();
                }
                c.unread += 1;
                return vec![Effect::Notify { from: from.clone() }];
            }
            Notice::GroupChanged {
                group,
                name,
                by,
                change,
                ..
            } => {
                self.add_group(group, name);
                self.status = Some(format!("{name}: {change} (by {})", self.name_of(by)));
            }
            Notice::SentElsewhere { to, text, time, .. } => {
                let i = self.conversation(to);
                self.conversations[i].lines.push(Line {
                    time: *time,
                    from_me: true,
                    text: text.clone(),
                    delivery: Delivery::Live,
                    queued_id: None,
                    sender: None,
                });
            }
            Notice::SessionStarted { peer, path, .. } => {
                let i = self.conversation(peer);
                self.conversations[i].live = Some(*path);
            }
            Notice::SessionEnded { peer, .. } => {
                let i = self.conversation(peer);
                self.conversations[i].live = None;
            }
            Notice::IdentityChanged { peer, .. } => {
                let i = self.conversation(peer);
                self.conversations[i].key_changed = true;
                self.conversations[i].verified = false;
            }
            Notice::ContactRequest { from, request, .. } => {
                self.requests.push(Request {
                    from: from.clone(),
                    request: request.clone(),
                });
                return vec![Effect::Notify { from: from.clone() }];
            }
            Notice::BrokerLost { retry_in_secs, .. } => {
                self.broker = Broker::Reconnecting(*retry_in_secs);
            }
            Notice::BrokerBack { .. } => self.broker = Broker::Connected,
            Notice::QueuedSent { id, .. } => {
                // One item left the outbox, shown here or queued by an earlier run.
                self.outbox = self.outbox.saturating_sub(1);
                for c in &mut self.conversations {
                    for line in &mut c.lines {
                        if line.queued_id.as_deref() == Some(id.as_str()) {
                            line.delivery = Delivery::Deposited;
                            line.queued_id = None;
                        }
                    }
                }
            }
            Notice::ContactMoved { old, new, .. } => {
                // The same conversation under the new number (protocol 12.13); its history
                // moved with it, and the session with the old number is over.
                let shown = self.name_of(old).to_owned();
                if let Some(name) = self.names.remove(old) {
                    self.names.insert(new.clone(), name);
                }
                if let Some(c) = self.conversations.iter_mut().find(|c| c.peer == *old) {
                    c.peer.clone_from(new);
                    c.live = None;
                }
                self.status = Some(format!("{shown} moved to the number {new}"));
            }
            Notice::MoveRefused { from, reason } => {
                self.status = Some(format!(
                    "a moved notice from {} was REFUSED: {reason}",
                    self.name_of(from)
                ));
            }
            Notice::Warning { message } => self.status = Some(message.clone()),
            _ => {}
        }
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn key(code: KeyCode) -> KeyEvent {
        KeyEvent::new(code, KeyModifiers::NONE)
    }

    fn typed(chat: &mut Chat, text: &str) -> Vec<Effect> {
        for c in text.chars() {
            chat.on_key(key(KeyCode::Char(c)));
        }
        chat.on_key(key(KeyCode::Enter))
    }

    fn chat_with(peers: &[&str]) -> Chat {
        let mut chat = Chat::new("5550001".into(), 1);
        for p in peers {
            chat.add_contact(p, None, false);
        }
        chat
    }

    #[test]
    fn a_name_given_in_the_chat_is_used_everywhere_at_once() {
        let mut chat = chat_with(&["5550002"]);
        let effects = typed(&mut chat, "/name Bob");
        assert!(matches!(
            &effects[..],
            [Effect::Agent { command: Command::ContactName { number, name: Some(name) }, .. }]
                if number == "5550002" && name == "Bob"
        ));
        assert_eq!(chat.conversations[0].title(), "Bob");
        assert_eq!(chat.name_of("5550002"), "Bob");
    }

    #[test]
    fn a_contact_that_moved_keeps_its_conversation_and_name_under_the_new_number() {
        let mut chat = Chat::new("5550001".into(), 1);
        chat.add_contact("5550002", Some("Bob".into()), false);
        chat.on_notice(
            &Notice::SessionStarted {
                peer: "5550002".into(),
                first_contact: false,
                safety_number: String::new(),
                path: Path::Direct,
            },
            0,
        );
        chat.on_notice(
            &Notice::ContactMoved {
                old: "5550002".into(),
                new: "5560009".into(),
                name: Some("Bob".into()),
                broker: "y:7400".into(),
            },
            0,
        );
        let c = chat
            .conversations
            .iter()
            .find(|c| c.peer == "5560009")
            .unwrap();
        assert_eq!((c.live, chat.name_of("5560009")), (None, "Bob"));
        assert!(!chat.conversations.iter().any(|c| c.peer == "5550002"));
        assert!(chat.status.as_deref().unwrap().contains("Bob moved"));
        chat.on_notice(
            &Notice::MoveRefused {
                from: "5560009".into(),
                reason: "bad signature".into(),
            },
            0,
        );
        assert!(chat.status.as_deref().unwrap().contains("REFUSED"));
    }

    #[test]
    fn a_typed_line_is_sent_to_the_contact_in_view_and_its_answer_sets_its_state() {
        let mut chat = chat_with(&["5550002", "5550003"]);
        chat.on_key(key(KeyCode::Down));
        let effects = typed(&mut chat, "hello");
        assert_eq!(
            effects,
            vec![Effect::Agent {
                command: Command::Send {
                    number: "5550003".into(),
                    text: "hello".into()
                },
                tag: Tag::Sent {
                    peer: "5550003".into(),
                    index: 0
                }
            }]
        );
        assert_eq!(chat.conversations[1].lines[0].delivery, Delivery::Sending);
        chat.on_answer(
            Tag::Sent {
                peer: "5550003".into(),
                index: 0,
            },
            Err(crate::agent::CommandError::Refused("broker gone".into())),
        );
        assert_eq!(
            chat.conversations[1].lines[0].delivery,
            Delivery::Failed("broker gone".into())
        );
        assert!(chat.input.is_empty());
    }

    #[test]
    fn a_message_for_another_conversation_counts_as_unread_until_it_is_viewed() {
        let mut chat = chat_with(&["5550002", "5550003"]);
        let notice = Notice::Message {
            from: "5550003".into(),
            text: "psst".into(),
            time: 7,
            offline: false,
        };
        assert_eq!(
            chat.on_notice(&notice, 9),
            vec![Effect::Notify {
                from: "5550003".into()
            }]
        );
        assert_eq!(chat.conversations[1].unread, 1);
        chat.on_key(key(KeyCode::Down));
        assert_eq!(chat.conversations[1].unread, 0);
        // In view: no unread, no notification.
        assert!(chat.on_notice(&notice, 10).is_empty());
    }

    #[test]
    fn commands_complete_and_run_on_the_contact_in_view() {
        let mut chat = chat_with(&["5550002"]);
        for c in "/bl".chars() {
            chat.on_key(key(KeyCode::Char(c)));
        }
        chat.on_key(key(KeyCode::Tab));
        assert_eq!(chat.input.text(), "/block ");
        let effects = chat.on_key(key(KeyCode::Enter));
        assert!(matches!(
            &effects[..],
            [Effect::Agent { command: Command::Block { number }, .. }] if number == "5550002"
        ));
        assert_eq!(typed(&mut chat, "/quit"), vec![Effect::Quit]);
        typed(&mut chat, "/frobnicate");
        assert!(chat.status.as_deref().unwrap().contains("unknown command"));
    }

    #[test]
    fn a_changed_key_holds_sending_until_confirmed() {
        let mut chat = chat_with(&["5550002"]);
        chat.on_notice(
            &Notice::IdentityChanged {
                peer: "5550002".into(),
                pinned: "aa".into(),
                presented: "bb".into(),
            },
            0,
        );
        assert!(typed(&mut chat, "hi").is_empty());
        assert!(chat.status.as_deref().unwrap().contains("CHANGED"));
        chat.input.take();
        let effects = typed(&mut chat, "/send! hi anyway");
        assert!(matches!(
            &effects[..],
            [Effect::Agent {
                command: Command::Send { .. },
                ..
            }]
        ));
        assert!(!chat.conversations[0].key_changed);
    }

    #[test]
    fn a_contact_request_is_answered_with_one_key() {
        let mut chat = chat_with(&[]);
        chat.on_notice(
            &Notice::ContactRequest {
                from: "5550009".into(),
                request: "ab".into(),
                kind: "NEW".into(),
            },
            0,
        );
        assert!(chat.on_key(key(KeyCode::Char('x'))).is_empty());
        let effects = chat.on_key(key(KeyCode::Char('b')));
        assert_eq!(effects.len(), 2, "{effects:?}");
        assert!(chat.requests.is_empty());
    }

    #[test]
    fn in_a_group_a_line_goes_to_the_group_and_group_commands_name_it() {
        let mut chat = chat_with(&["5550002"]);
        chat.add_group("ab12", "friends");
        chat.on_key(key(KeyCode::Down));
        let effects = typed(&mut chat, "hi all");
        assert!(matches!(
            &effects[..],
            [Effect::Agent { command: Command::GroupSend { group, text }, .. }]
                if group == "ab12" && text == "hi all"
        ));
        let effects = typed(&mut chat, "/group add 5550002");
        assert!(matches!(
            &effects[..],
            [Effect::Agent { command: Command::GroupAdd { group, number }, .. }]
                if group == "ab12" && number == "5550002"
        ));
        let effects = typed(&mut chat, "/group create book club 5550002");
        assert!(matches!(
            &effects[..],
            [Effect::Agent { command: Command::GroupCreate { name, members }, .. }]
                if name == "book" && members == &["club", "5550002"]
        ));
        chat.on_key(key(KeyCode::Up));
        assert!(typed(&mut chat, "/group leave").is_empty());
        assert!(chat.status.as_deref().unwrap().contains("group in view"));
    }

    #[test]
    fn the_safety_view_marks_the_contact_verified_with_v() {
        let mut chat = chat_with(&["5550002"]);
        assert_eq!(
            typed(&mut chat, "/safety"),
            vec![Effect::ShowSafety {
                peer: "5550002".into()
            }]
        );
        chat.safety = Some(SafetyView {
            peer: "5550002".into(),
            digits: "1".into(),
            qr: vec![],
        });
        assert_eq!(
            chat.on_key(key(KeyCode::Char('v'))),
            vec![Effect::MarkVerified {
                peer: "5550002".into()
            }]
        );
        assert!(chat.safety.is_none());
    }

    #[test]
    fn devices_commands_and_the_info_window() {
        let mut chat = chat_with(&[]);
        assert_eq!(
            typed(&mut chat, "/devices"),
            vec![Effect::Devices(DevicesAction::List)]
        );
        assert_eq!(
            typed(&mut chat, "/devices revoke 3"),
            vec![Effect::Devices(DevicesAction::Revoke(3))]
        );
        assert!(typed(&mut chat, "/devices revoke three").is_empty());
        chat.info = Some(("Devices".into(), vec!["1 phone".into()]));
        assert!(chat.on_key(key(KeyCode::Char('x'))).is_empty());
        assert!(chat.info.is_some(), "typing does not close it");
        chat.on_key(key(KeyCode::Esc));
        assert!(chat.info.is_none());
    }

    #[test]
    fn scrolling_up_asks_for_the_older_page_once() {
        let mut chat = chat_with(&["5550002"]);
        assert_eq!(chat.start().len(), 1);
        chat.on_history("5550002", vec![], Some(4096), true);
        let effects = chat.on_key(key(KeyCode::PageUp));
        assert_eq!(
            effects,
            vec![Effect::LoadOlder {
                peer: "5550002".into(),
                before: Some(4096),
                group: false,
            }]
        );
        assert!(chat.on_key(key(KeyCode::PageUp)).is_empty());
    }
}
