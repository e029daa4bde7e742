//! Output for people: local times instead of Unix seconds, contacts by name where they have
//! one, one line per notice of a running agent. (JSON output keeps numbers and Unix seconds.)

use std::collections::BTreeMap;

use crate::agent::Notice;
use crate::profile::Profile;
use crate::store::{Contact, Store};
use crate::when::local_time;

/// The local time of day now, `21:30:05`, for the start of a line.
fn clock_now() -> String {
    jiff::Zoned::now().strftime("%H:%M:%S").to_string()
}

/// How numbers are shown: `Name (number)` for a contact with a name, the number otherwise.
pub(super) struct Names(BTreeMap<String, Contact>);

impl Names {
    /// The names of `profile`'s contacts (none when they cannot be read).
    pub(super) fn of(profile: &Profile) -> Self {
        Self(Store::new(profile).contacts().unwrap_or_default())
    }

    /// `number` as people see it.
    pub(super) fn show(&self, number: &str) -> String {
        match self.0.get(number).and_then(|c| c.name.as_deref()) {
            Some(name) => format!("{name} ({number})"),
            None => number.to_owned(),
        }
    }
}

/// Prints a notice of a running agent: one JSON object, or one line for people that starts
/// with the local time and shows contacts by name.
pub(super) fn notice(notice: &Notice, json: bool, profile: &Profile) {
    use std::io::Write;
    let line = if json {
        serde_json::to_string(notice).unwrap_or_default()
    } else {
        // A message's further lines start under its first one's text, past the time.
        format!("{} {}", clock_now(), notice_text(notice, profile)).replace('\n', "\n         ")
    };
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{}", crate::terminal::terminal_safe(&line));
    let _ = out.flush();
}

/// A notice as a line for people (without the time).
fn notice_text(notice: &Notice, profile: &Profile) -> String {
    let names = Names::of(profile);
    let who = |number: &str| names.show(number);
    match notice {
        Notice::Listening {
            number,
            device,
            peer_address,
        } => format!("listening as {number} (device {device}); peers connect to {peer_address}"),
        Notice::ContactRequest {
            from,
            request,
            kind,
        } => format!(
            "contact request ({kind}) from {}: answer with `{}` or `{}`",
            who(from),
            profile.command(&format!("contact accept {request}")),
            profile.command(&format!("contact reject {request}"))
        ),
        Notice::ContactRefused { from } => {
            format!("refused a contact request from {} (blocked)", who(from))
        }
        Notice::SessionStarted {
            peer,
            first_contact: true,
            safety_number,
            path,
        } => format!(
            "session with {} started, {} (new contact; identity key pinned; safety number \
             {safety_number})",
            who(peer),
            path_text(*path)
        ),
        Notice::SessionStarted { peer, path, .. } => {
            format!("session with {} started, {}", who(peer), path_text(*path))
        }
        Notice::ContactMoved {
            old,
            new,
            name,
            broker,
        } => format!(
            "{} moved to the number {new} at {broker} (notice signed with the pinned key): \
             same contact, same safety number, history kept",
            name.as_deref()
                .map_or_else(|| old.clone(), |n| format!("{n} ({old})"))
        ),
        Notice::NumberForwarded { old, new, broker } => format!(
            "{old} moved to {new} at {broker}, says its old broker (not verified: no key is \
             pinned for {old}); to reach it: micromsg contact add {new}"
        ),
        Notice::MoveRefused { from, reason } => format!(
            "WARNING: a moved notice from {} was REFUSED, nothing changed: {reason}",
            who(from)
        ),
        Notice::IdentityChanged {
            peer,
            pinned,
            presented,
        } => format!(
            "WARNING: the identity key of {} CHANGED (pinned {pinned}, presented {presented}). \
             The session was refused. Verify the safety number with {peer} out of band.",
            who(peer)
        ),
        Notice::Message {
            from,
            text,
            time,
            offline: true,
        } => format!(
            "[{}] {text} (offline, sent {})",
            who(from),
            local_time(*time)
        ),
        Notice::Message { from, text, .. } => format!("[{}] {text}", who(from)),
        Notice::SentElsewhere {
            to,
            device,
            text,
            time,
        } => format!(
            "[me → {}, from device {device}, {}] {text}",
            who(to),
            local_time(*time)
        ),
        Notice::KeysSynced { peer, device } => {
            format!("device {device} shared its session keys with {}", who(peer))
        }
        Notice::SessionEnded { peer, reason } => {
            format!("session with {} ended: {reason}", who(peer))
        }
        Notice::GroupMessage {
            group,
            name,
            from,
            text,
            offline,
            time,
        } => {
            let how = if *offline {
                format!(" (offline, sent {})", local_time(*time))
            } else {
                String::new()
            };
            format!(
                "[group {name} {}] [{}] {text}{how}",
                short_id(group),
                who(from)
            )
        }
        Notice::GroupChanged {
            group,
            name,
            by,
            change,
            members,
            version,
        } => format!(
            "[group {name} {}] {} {change}; members {} (version {version})",
            short_id(group),
            who(by),
            members
                .iter()
                .map(|m| who(m))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Notice::GroupOpRefused {
            group,
            name,
            relayed_by,
            author,
            op,
            reason,
        } => format!(
            "warning: [group {name} {}] refused a `{op}` said to be by {}, relayed by {}: \
             {reason}; it was not applied",
            short_id(group),
            who(author),
            who(relayed_by)
        ),
        Notice::Warning { message } => format!("warning: {message}"),
        Notice::BrokerLost {
            reason,
            retry_in_secs,
        } => format!(
            "broker unreachable ({reason}); live sessions go on; trying again in \
             {retry_in_secs} s, then with a growing wait"
        ),
        Notice::BrokerBack { offline_secs } => {
            format!("broker back after {offline_secs} s offline; logged in again")
        }
        Notice::QueuedSent { to, id, queued_at } => format!(
            "a message to {} queued at {} went out: the broker has it now (id {})",
            who(to),
            local_time(*queued_at),
            &id[..id.len().min(8)]
        ),
    }
}

/// The first 8 digits of a group id.
pub(super) fn short_id(id: &str) -> &str {
    id.get(..8).unwrap_or(id)
}

/// How a session reaches its peer, for people.
fn path_text(path: crate::relay::Path) -> &'static str {
    match path {
        crate::relay::Path::Direct => "direct",
        crate::relay::Path::Relay => "relayed through the brokers",
    }
}
