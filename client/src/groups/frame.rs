//! The group frame format (docs/groups.md 2): a frame's JSON, its control ops with their
//! checks, and the ids and numbers they carry.

use micromsg_crypto::hex;
use micromsg_crypto::identity::{IdentityPublicKey, SIGNATURE_LEN, Signature};
use micromsg_wire::Number;
use serde::{Deserialize, Serialize};

use super::{FORMAT, MAX_MEMBERS, MAX_NAME_LEN, MAX_OPS, UNSIGNED_FORMAT, signing};

/// Why a frame was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// A frame of the unsigned format 1, made before control ops were signed.
    #[error(
        "an unsigned group frame (format 1, from a MicroMsg before signed groups): refused; \
         its group must be created again"
    )]
    Unsigned,
    /// Malformed, or a field missing or out of range.
    #[error("bad group frame: {0}")]
    Bad(String),
}

fn bad<T>(what: impl Into<String>) -> Result<T, FrameError> {
    Err(FrameError::Bad(what.into()))
}

/// A new random 16-byte id, lowercase hex (op and message ids; a group id is derived,
/// [`signing::group_id`]).
pub fn new_id() -> String {
    use rand_core::RngCore;
    let mut id = [0u8; 16];
    rand_core::OsRng.fill_bytes(&mut id);
    hex::encode(&id)
}

fn valid_id(id: &str) -> bool {
    id.len() == 32
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn valid_number(n: &str) -> bool {
    Number::new(n.to_owned()).is_ok()
}

/// A member as a `create` or an `add` names it: its number and the identity key its author
/// holds for it (pinned at the author's first session with it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// The number.
    pub number: String,
    /// Its identity key, which verifies the ops it signs.
    pub key: IdentityPublicKey,
}

/// What a control op changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Creates the group.
    Create {
        /// Its name.
        name: String,
        /// The initial members, in order, the author among them.
        members: Vec<Member>,
    },
    /// Adds a member.
    Add(Member),
    /// Removes a member.
    Remove(String),
    /// The author leaves.
    Leave,
    /// Renames the group.
    Rename(String),
    /// The author moved to this new number (protocol.md 12.13): same place in the member
    /// list, same key.
    Move(String),
}

impl Change {
    /// The keys this change brings into the state.
    pub fn carried_keys(&self) -> &[Member] {
        match self {
            Change::Create { members, .. } => members,
            Change::Add(m) => std::slice::from_ref(m),
            _ => &[],
        }
    }
}

/// One control op: self-contained, signed by its author, stored verbatim in every member's
/// log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "Raw", into = "Raw")]
pub struct Op {
    /// Names this op (16 random bytes, hex).
    pub id: String,
    /// The author's Lamport clock.
    pub lamport: u64,
    /// Who made the change.
    pub author: String,
    /// The change.
    pub change: Change,
    /// The author's Ed25519 signature over [`signing::signed_bytes`].
    pub sig: Signature,
}

impl Op {
    /// The total order of docs/groups.md section 2: (lamport, author bytewise, id).
    pub(super) fn key(&self) -> (u64, &[u8], &[u8]) {
        (self.lamport, self.author.as_bytes(), self.id.as_bytes())
    }

    /// The op's name (`create`, `add`, ...).
    pub fn name(&self) -> &'static str {
        signing::op_name(&self.change)
    }
}

/// The wire form of frames and ops: every field optional, checked by the typed conversions.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Raw {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    v: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    group: Option<String>,
    op: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    lamport: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    author: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    members: Option<Vec<RawMember>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    member: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sig: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    text: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sent: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ops: Option<Vec<Raw>>,
}

/// A member in a `create`: `{"number": ..., "key": 64 hex}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct RawMember {
    number: String,
    key: String,
}

fn check_name(name: Option<String>) -> Result<String, FrameError> {
    match name {
        Some(n) if n.len() <= MAX_NAME_LEN => Ok(n),
        Some(_) => bad(format!("name longer than {MAX_NAME_LEN} bytes")),
        None => bad("missing name"),
    }
}

fn check_number(member: Option<String>) -> Result<String, FrameError> {
    match member {
        Some(m) if valid_number(&m) => Ok(m),
        _ => bad("missing or invalid member"),
    }
}

fn check_key(key: Option<&str>) -> Result<IdentityPublicKey, FrameError> {
    match key.map(IdentityPublicKey::from_hex) {
        Some(Ok(k)) => Ok(k),
        Some(Err(e)) => bad(format!("invalid member key: {e}")),
        None => bad("missing member key"),
    }
}

fn check_member(number: Option<String>, key: Option<&str>) -> Result<Member, FrameError> {
    Ok(Member {
        number: check_number(number)?,
        key: check_key(key)?,
    })
}

impl TryFrom<Raw> for Op {
    type Error = FrameError;

    fn try_from(raw: Raw) -> Result<Self, FrameError> {
        let id = match raw.id {
            Some(id) if valid_id(&id) => id,
            _ => return bad("missing or invalid id"),
        };
        let lamport = match raw.lamport {
            Some(l) if l >= 1 => l,
            _ => return bad("missing or invalid lamport"),
        };
        let author = match raw.author {
            Some(a) if valid_number(&a) => a,
            _ => return bad("missing or invalid author"),
        };
        let sig = match raw.sig.as_deref().map(hex::decode_array::<SIGNATURE_LEN>) {
            Some(Ok(sig)) => sig,
            Some(Err(_)) => return bad("invalid sig"),
            None => return bad("missing sig (unsigned control ops are refused)"),
        };
        let change = match raw.op.as_str() {
            "create" => {
                let raw_members = raw.members.unwrap_or_default();
                if raw_members.len() > MAX_MEMBERS {
                    return bad("too many members");
                }
                let members = raw_members
                    .into_iter()
                    .map(|m| check_member(Some(m.number), Some(&m.key)))
                    .collect::<Result<Vec<_>, _>>()?;
                if !members.iter().any(|m| m.number == author) {
                    return bad("a create must list its author, with its key");
                }
                Change::Create {
                    name: check_name(raw.name)?,
                    members,
                }
            }
            "add" => Change::Add(check_member(raw.member, raw.key.as_deref())?),
            "remove" => Change::Remove(check_number(raw.member)?),
            "leave" => Change::Leave,
            "rename" => Change::Rename(check_name(raw.name)?),
            "move" => Change::Move(check_number(raw.member)?),
            other => return bad(format!("unknown control op {other:?}")),
        };
        Ok(Self {
            id,
            lamport,
            author,
            change,
            sig,
        })
    }
}

impl From<Op> for Raw {
    fn from(op: Op) -> Self {
        let mut raw = Raw {
            op: op.name().into(),
            id: Some(op.id),
            lamport: Some(op.lamport),
            author: Some(op.author),
            sig: Some(hex::encode(&op.sig)),
            ..Raw::default()
        };
        match op.change {
            Change::Create { name, members } => {
                raw.name = Some(name);
                raw.members = Some(
                    members
                        .into_iter()
                        .map(|m| RawMember {
                            number: m.number,
                            key: m.key.to_hex(),
                        })
                        .collect(),
                );
            }
            Change::Add(m) => {
                raw.member = Some(m.number);
                raw.key = Some(m.key.to_hex());
            }
            Change::Remove(m) => raw.member = Some(m),
            Change::Leave => {}
            Change::Rename(name) => raw.name = Some(name),
            Change::Move(new) => raw.member = Some(new),
        }
        raw
    }
}

/// What a frame carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    /// One control op (boxed: an op with its keys is much larger than a message).
    Op(Box<Op>),
    /// The whole control log (to a new member, or after a change it may have missed).
    State(Vec<Op>),
    /// A group message.
    Message {
        /// Names it (dedup).
        id: String,
        /// The text.
        text: String,
        /// The sender's clock, Unix seconds.
        sent: u64,
    },
}

/// One group frame: the payload of a DATA frame of content kind GROUP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// The group id (32 lowercase hex).
    pub group: String,
    /// What it carries.
    pub payload: Payload,
}

/// Only the version, read first: the rest of a frame of another format may not parse.
#[derive(Deserialize)]
struct Version {
    #[serde(default)]
    v: Option<u64>,
}

impl Frame {
    /// The JSON bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut raw = match &self.payload {
            Payload::Op(op) => Raw::from((**op).clone()),
            Payload::State(ops) => Raw {
                op: "state".into(),
                ops: Some(ops.iter().cloned().map(Raw::from).collect()),
                ..Raw::default()
            },
            Payload::Message { id, text, sent } => Raw {
                op: "message".into(),
                id: Some(id.clone()),
                text: Some(text.clone()),
                sent: Some(*sent),
                ..Raw::default()
            },
        };
        raw.v = Some(FORMAT);
        raw.group = Some(self.group.clone());
        serde_json::to_vec(&raw).unwrap_or_default()
    }

    /// Parses and checks a frame; unknown fields are ignored. Signatures are checked by the
    /// fold, which knows the authors' keys.
    pub fn decode(bytes: &[u8]) -> Result<Self, FrameError> {
        let version: Version =
            serde_json::from_slice(bytes).map_err(|e| FrameError::Bad(e.to_string()))?;
        match version.v {
            Some(FORMAT) => {}
            Some(UNSIGNED_FORMAT) => return Err(FrameError::Unsigned),
            _ => return bad("unsupported version"),
        }
        let raw: Raw = serde_json::from_slice(bytes).map_err(|e| FrameError::Bad(e.to_string()))?;
        let group = match raw.group.clone() {
            Some(g) if valid_id(&g) => g,
            _ => return bad("missing or invalid group"),
        };
        let payload = match raw.op.as_str() {
            "message" => match (raw.id, raw.text) {
                (Some(id), Some(text)) if valid_id(&id) => Payload::Message {
                    id,
                    text,
                    sent: raw.sent.unwrap_or(0),
                },
                _ => return bad("message without id or text"),
            },
            "state" => {
                let ops = raw.ops.unwrap_or_default();
                if ops.len() > MAX_OPS {
                    return bad("too many ops");
                }
                Payload::State(
                    ops.into_iter()
                        .map(Op::try_from)
                        .collect::<Result<_, _>>()?,
                )
            }
            _ => Payload::Op(Box::new(Op::try_from(raw)?)),
        };
        Ok(Self { group, payload })
    }
}
