//! What a command to the agent answers, typed: an [`Answer`] is `Ok(Output)` with what the
//! command did, or `Err(CommandError)` with why it did not. The agent's parts only ever make
//! these; the JSON line of the control socket ([`Reply`]) is made from them at the edge, where
//! the answer leaves the agent, and read back into the typed details ([`Detail`]) by the CLI.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::store::Direction;

/// A command's result.
pub type Answer = Result<Output, CommandError>;

/// What a command did: a line for people and, for some commands, details for programs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    /// What happened, for people.
    pub message: String,
    /// Details for programs.
    pub detail: Option<Detail>,
}

impl Output {
    /// An answer that is only a line for people.
    pub fn said(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            detail: None,
        }
    }

    /// Adds the details.
    pub fn with(mut self, detail: impl Into<Detail>) -> Self {
        self.detail = Some(detail.into());
        self
    }
}

/// Why a command did not do what it was asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    /// Refused or failed; the message says why and, where there is one, what to do.
    #[error("{0}")]
    Refused(String),
    /// The user cancelled it (Ctrl-C) before it did anything.
    #[error("cancelled: {0}")]
    Cancelled(String),
    /// A group message or change reached some members but not all of them.
    #[error("{message}")]
    GroupIncomplete {
        /// What happened, for people (who was not reached, and what happens to them).
        message: String,
        /// The group's id.
        group: String,
        /// How each member was reached.
        delivered: BTreeMap<String, MemberDelivery>,
    },
}

/// A refusal, for people.
pub(super) fn refused(message: impl Into<String>) -> CommandError {
    CommandError::Refused(message.into())
}

/// The details of an [`Output`], one shape per kind of command (docs/cli.md lists them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Detail {
    /// `send`: how the message went.
    Sent(Delivered),
    /// A group command: the group after it, and how each member was reached.
    Group(GroupReport),
    /// `inbox`: what was fetched.
    Inbox(InboxBatch),
    /// `contact add` (and a `send` that set up a session): the session and its path.
    Session {
        /// The contact.
        peer: String,
        /// `direct` or `relay`.
        path: crate::relay::Path,
    },
    /// `status`: the broker link and the live sessions.
    Status(super::relays::Status),
    /// `contact name`.
    Named {
        /// The contact's number.
        number: String,
        /// Its name now (`None`: cleared).
        name: Option<String>,
    },
    /// `contact remove`.
    Removed {
        /// The number removed.
        removed: String,
    },
    /// `announce-move` (the `move` command): how each contact and group was told.
    Moved(MoveReport),
    /// `outbox cancel`.
    Unqueued {
        /// The id of the queued message taken out.
        cancelled: String,
        /// Whom it was for.
        to: String,
    },
}

/// How a message left this device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "delivered", rename_all = "lowercase")]
pub enum Delivered {
    /// Over the live session with the contact.
    Live,
    /// Deposited at the broker (the broker committed it).
    Deposited {
        /// The deposit id.
        id: String,
        /// When the broker drops it unless fetched (Unix seconds).
        expires: u64,
    },
    /// In this device's outbox, to be deposited when the broker takes it.
    Queued {
        /// The deposit id.
        id: String,
        /// Why it waits, for people.
        reason: String,
    },
}

impl From<Delivered> for Detail {
    fn from(d: Delivered) -> Self {
        Detail::Sent(d)
    }
}

/// How a group frame went to one member; in JSON a string: `live`, `deposited`, `queued: why`
/// or `failed: why`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemberDelivery {
    /// Over the live session.
    Live,
    /// Deposited at the broker.
    Deposited,
    /// In the outbox: why it waits.
    Queued(String),
    /// Not sent: why.
    Failed(String),
}

impl MemberDelivery {
    /// True when the member has it or the broker holds it for them.
    pub fn reached(&self) -> bool {
        matches!(self, Self::Live | Self::Deposited)
    }
}

impl From<Result<Delivered, String>> for MemberDelivery {
    fn from(r: Result<Delivered, String>) -> Self {
        match r {
            Ok(Delivered::Live) => Self::Live,
            Ok(Delivered::Deposited { .. }) => Self::Deposited,
            Ok(Delivered::Queued { reason, .. }) => Self::Queued(reason),
            Err(why) => Self::Failed(why),
        }
    }
}

impl fmt::Display for MemberDelivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Live => f.write_str("live"),
            Self::Deposited => f.write_str("deposited"),
            Self::Queued(why) => write!(f, "queued: {why}"),
            Self::Failed(why) => write!(f, "failed: {why}"),
        }
    }
}

impl Serialize for MemberDelivery {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MemberDelivery {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Ok(match text.as_str() {
            "live" => Self::Live,
            "deposited" => Self::Deposited,
            _ => match text.split_once(": ") {
                Some(("queued", why)) => Self::Queued(why.to_owned()),
                Some((_, why)) => Self::Failed(why.to_owned()),
                None => Self::Failed(text),
            },
        })
    }
}

/// A group after a command, and how each member it concerned was reached.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupReport {
    /// The group's id.
    pub group: String,
    /// Its name.
    pub name: String,
    /// Its members.
    pub members: Vec<String>,
    /// Its version.
    pub version: u64,
    /// How each member was reached.
    pub delivered: BTreeMap<String, MemberDelivery>,
}

impl From<GroupReport> for Detail {
    fn from(g: GroupReport) -> Self {
        Detail::Group(g)
    }
}

/// What `inbox` fetched.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InboxBatch {
    /// The messages, oldest first.
    pub messages: Vec<InboxMessage>,
    /// How many wait for session keys from another device.
    pub pending: usize,
}

impl From<InboxBatch> for Detail {
    fn from(b: InboxBatch) -> Self {
        Detail::Inbox(b)
    }
}

/// One message fetched from the inbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InboxMessage {
    /// The contact of the conversation.
    pub peer: String,
    /// `in` from the contact; `out` a copy of what another device of this entity sent.
    pub direction: Direction,
    /// The sending device.
    pub device: u32,
    /// The text.
    pub text: String,
    /// The sender's clock when sealing (Unix seconds).
    pub time: u64,
}

/// The JSON line an answer is on the control socket, and what `--json` prints for it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Reply {
    /// Whether the command succeeded.
    pub ok: bool,
    /// What happened, for people.
    pub message: String,
    /// Details for programs: a [`Detail`], or on a refusal `{"cancelled": true}` or the
    /// group delivery of [`CommandError::GroupIncomplete`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<serde_json::Value>,
}

impl From<Answer> for Reply {
    fn from(answer: Answer) -> Self {
        match answer {
            Ok(Output { message, detail }) => Reply {
                ok: true,
                message,
                data: detail.and_then(|d| serde_json::to_value(d).ok()),
            },
            Err(e) => {
                let data = match &e {
                    CommandError::Refused(_) => None,
                    CommandError::Cancelled(_) => Some(serde_json::json!({"cancelled": true})),
                    CommandError::GroupIncomplete {
                        group, delivered, ..
                    } => Some(serde_json::json!({"group": group, "delivered": delivered})),
                };
                Reply {
                    ok: false,
                    message: e.to_string(),
                    data,
                }
            }
        }
    }
}

impl From<Reply> for Answer {
    /// Reads a control-socket line back into the typed answer (the CLI's side of the edge).
    fn from(reply: Reply) -> Self {
        if !reply.ok {
            let cancelled = reply
                .data
                .as_ref()
                .is_some_and(|d| d.get("cancelled") == Some(&serde_json::Value::Bool(true)));
            return Err(match reply.message.strip_prefix("cancelled: ") {
                Some(what) if cancelled => CommandError::Cancelled(what.to_owned()),
                _ => CommandError::Refused(reply.message),
            });
        }
        Ok(Output {
            message: reply.message,
            detail: reply.data.and_then(|d| serde_json::from_value(d).ok()),
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn round_trip(answer: Answer) -> Reply {
        let reply = Reply::from(answer.clone());
        let line = serde_json::to_string(&reply).unwrap();
        let back: Reply = serde_json::from_str(&line).unwrap();
        assert_eq!(back, reply);
        if !matches!(answer, Err(CommandError::GroupIncomplete { .. })) {
            assert_eq!(Answer::from(back), answer, "{line}");
        }
        reply
    }

    #[test]
    fn send_outcomes_keep_their_documented_json() {
        let live = round_trip(Ok(Output::said("sent").with(Delivered::Live)));
        assert_eq!(live.data.unwrap(), serde_json::json!({"delivered": "live"}));
        let deposited = round_trip(Ok(Output::said("d").with(Delivered::Deposited {
            id: "ab".into(),
            expires: 7,
        })));
        assert_eq!(
            deposited.data.unwrap(),
            serde_json::json!({"delivered": "deposited", "id": "ab", "expires": 7})
        );
        let queued = round_trip(Ok(Output::said("q").with(Delivered::Queued {
            id: "ab".into(),
            reason: "down".into(),
        })));
        assert_eq!(
            queued.data.unwrap(),
            serde_json::json!({"delivered": "queued", "id": "ab", "reason": "down"})
        );
    }

    #[test]
    fn other_details_and_refusals_keep_their_documented_json() {
        let mut delivered = BTreeMap::new();
        delivered.insert("100".to_owned(), MemberDelivery::Live);
        delivered.insert(
            "101".to_owned(),
            MemberDelivery::Queued("broker down".into()),
        );
        delivered.insert(
            "102".to_owned(),
            MemberDelivery::Failed("no session".into()),
        );
        let group = round_trip(Ok(Output::said("g").with(GroupReport {
            group: "g1".into(),
            name: "team".into(),
            members: vec!["100".into(), "101".into()],
            version: 3,
            delivered: delivered.clone(),
        })));
        assert_eq!(
            group.data.unwrap()["delivered"],
            serde_json::json!({"100": "live", "101": "queued: broker down", "102": "failed: no session"})
        );
        let inbox = round_trip(Ok(Output::said("1 new message").with(InboxBatch {
            messages: vec![InboxMessage {
                peer: "100".into(),
                direction: Direction::Out,
                device: 2,
                text: "hi".into(),
                time: 5,
            }],
            pending: 0,
        })));
        assert_eq!(inbox.data.unwrap()["messages"][0]["direction"], "out");
        for detail in [
            Detail::Named {
                number: "100".into(),
                name: Some("Ann".into()),
            },
            Detail::Removed {
                removed: "100".into(),
            },
            Detail::Unqueued {
                cancelled: "ab".into(),
                to: "100".into(),
            },
        ] {
            round_trip(Ok(Output::said("x").with(detail)));
        }
        let cancelled = round_trip(Err(CommandError::Cancelled("nothing was sent".into())));
        assert_eq!(cancelled.message, "cancelled: nothing was sent");
        assert_eq!(
            cancelled.data.unwrap(),
            serde_json::json!({"cancelled": true})
        );
        assert_eq!(round_trip(Err(refused("no"))).data, None);
        let partial = round_trip(Err(CommandError::GroupIncomplete {
            message: "not yet to 101".into(),
            group: "g1".into(),
            delivered,
        }));
        assert_eq!(
            partial.data.unwrap()["delivered"]["101"],
            "queued: broker down"
        );
    }
}

/// How a move was announced (the `move` command, protocol.md 12.13).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MoveReport {
    /// The new number.
    pub new_number: String,
    /// Each contact told, by number: `live`, `deposited`, `queued: WHY` or `failed: WHY`.
    pub notified: BTreeMap<String, String>,
    /// The groups whose members were told (group ids).
    pub groups: Vec<String>,
}

impl From<MoveReport> for Detail {
    fn from(m: MoveReport) -> Self {
        Detail::Moved(m)
    }
}
