//! Errors of decoding and encoding frames.

use std::fmt;

use crate::error_code::ErrorCode;
use crate::frame::FrameError;

/// Why a frame could not be decoded.
///
/// Every variant maps to the wire error code the broker answers with, see
/// [`DecodeError::error_code`]. Texts never contain more than a short, clipped
/// excerpt of the input, so they are safe to send back to the peer.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The length prefix announces more than the receiver's `max_frame_len`.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge {
        /// Announced (or attempted) body length.
        len: usize,
        /// The limit in force.
        max: u32,
    },
    /// The length prefix is zero.
    #[error("frame length is zero")]
    EmptyFrame,
    /// The input ended inside a frame (only from one-shot decoders such as
    /// [`crate::decode_framed`]; a streaming decoder just waits for more).
    #[error("input ends inside a frame")]
    Truncated,
    /// Bytes follow the one frame that a one-shot decoder expected.
    #[error("{extra} bytes follow the frame")]
    TrailingBytes {
        /// How many bytes follow.
        extra: usize,
    },
    /// The frame body is not UTF-8.
    #[error("frame body is not UTF-8 (invalid byte at offset {valid_up_to})")]
    NotUtf8 {
        /// Length of the valid UTF-8 prefix.
        valid_up_to: usize,
    },
    /// The body is not well-formed YAML (the text is the parser's, clipped).
    #[error("YAML syntax error: {0}")]
    Yaml(String),
    /// The body breaks a parser limit (see [`crate::Limits`]).
    #[error("YAML limit exceeded: {which}")]
    LimitExceeded {
        /// Which limit.
        which: Limit,
    },
    /// A mapping has the same key twice.
    #[error("duplicate key {key:?}")]
    DuplicateKey {
        /// The key, clipped.
        key: String,
    },
    /// The top-level node is not a mapping.
    #[error("the top-level node is not a mapping")]
    NotAMapping,
    /// The top-level mapping has none of `Request`, `Response`, `Event`.
    #[error("the frame has no Request, Response or Event key")]
    UnknownKind,
    /// A frame of the wrong kind for the receiver (e.g. an `Event` sent to the
    /// broker).
    #[error("expected a {expected} frame, got a {found} frame")]
    UnexpectedKind {
        /// The kind the receiver accepts.
        expected: &'static str,
        /// The kind received.
        found: &'static str,
    },
    /// `Request` (or `Response`) names no request of the protocol.
    #[error("unknown request {0:?}")]
    UnknownRequest(String),
    /// `Event` names no event of the protocol.
    #[error("unknown event {0:?}")]
    UnknownEvent(String),
    /// A required field is absent.
    #[error("missing field {0}")]
    MissingField(FieldPath),
    /// A field the protocol does not define (fields are never ignored).
    #[error("unknown field {0}")]
    UnknownField(FieldPath),
    /// A field has the wrong YAML type.
    #[error("field {field}: expected {expected}")]
    WrongType {
        /// The field.
        field: FieldPath,
        /// What was expected, e.g. `"string"`.
        expected: &'static str,
    },
    /// A field has the right type but an invalid value.
    #[error("field {field}: {reason}")]
    BadValue {
        /// The field.
        field: FieldPath,
        /// Why the value is invalid.
        reason: &'static str,
    },
}

impl DecodeError {
    /// The error code the broker answers a frame with when it fails with
    /// this error.
    ///
    /// - framing (`EmptyFrame`, `Truncated`, `TrailingBytes`): `BAD-FRAME`;
    /// - `FrameTooLarge`: `FRAME-TOO-LARGE`;
    /// - `UnknownRequest`: `UNKNOWN-REQUEST`;
    /// - a field error inside `Args`: `BAD-ARGS`;
    /// - everything else (not UTF-8, YAML syntax, parser limits, duplicate
    ///   keys, a malformed envelope, unknown events): `BAD-YAML`.
    pub fn error_code(&self) -> ErrorCode {
        match self {
            DecodeError::FrameTooLarge { .. } => ErrorCode::FrameTooLarge,
            DecodeError::EmptyFrame
            | DecodeError::Truncated
            | DecodeError::TrailingBytes { .. } => ErrorCode::BadFrame,
            DecodeError::UnknownRequest(_) => ErrorCode::UnknownRequest,
            DecodeError::MissingField(field)
            | DecodeError::UnknownField(field)
            | DecodeError::WrongType { field, .. }
            | DecodeError::BadValue { field, .. }
                if field.section() == Section::Args =>
            {
                ErrorCode::BadArgs
            }
            _ => ErrorCode::BadYaml,
        }
    }

    /// A short, stable name of the variant (`"MissingField"`, ...), for logs,
    /// metrics and test manifests.
    pub fn kind(&self) -> &'static str {
        match self {
            DecodeError::FrameTooLarge { .. } => "FrameTooLarge",
            DecodeError::EmptyFrame => "EmptyFrame",
            DecodeError::Truncated => "Truncated",
            DecodeError::TrailingBytes { .. } => "TrailingBytes",
            DecodeError::NotUtf8 { .. } => "NotUtf8",
            DecodeError::Yaml(_) => "Yaml",
            DecodeError::LimitExceeded { .. } => "LimitExceeded",
            DecodeError::DuplicateKey { .. } => "DuplicateKey",
            DecodeError::NotAMapping => "NotAMapping",
            DecodeError::UnknownKind => "UnknownKind",
            DecodeError::UnexpectedKind { .. } => "UnexpectedKind",
            DecodeError::UnknownRequest(_) => "UnknownRequest",
            DecodeError::UnknownEvent(_) => "UnknownEvent",
            DecodeError::MissingField(_) => "MissingField",
            DecodeError::UnknownField(_) => "UnknownField",
            DecodeError::WrongType { .. } => "WrongType",
            DecodeError::BadValue { .. } => "BadValue",
        }
    }
}

impl From<FrameError> for DecodeError {
    fn from(error: FrameError) -> Self {
        match error {
            FrameError::Empty => DecodeError::EmptyFrame,
            FrameError::TooLarge { len, max } => DecodeError::FrameTooLarge { len, max },
        }
    }
}

/// A parser limit of [`crate::Limits`] (or of the protocol itself).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Limit {
    /// Nesting deeper than `max_depth`.
    Depth,
    /// Any anchor (`&a`) or alias (`*a`): the protocol refuses them all.
    Aliases,
    /// A scalar longer than `max_scalar_len`.
    ScalarLen,
    /// More than `max_events` parser events.
    Events,
    /// More than one YAML document.
    Documents,
}

impl Limit {
    /// Stable lower-case name.
    pub const fn as_str(self) -> &'static str {
        match self {
            Limit::Depth => "depth",
            Limit::Aliases => "aliases",
            Limit::ScalarLen => "scalar-length",
            Limit::Events => "events",
            Limit::Documents => "documents",
        }
    }
}

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The part of a frame a field belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Section {
    /// Top-level keys (`Request`, `Id`, `Status`, ...).
    Envelope,
    /// Inside a request's `Args`.
    Args,
    /// Inside a response's or event's `Data`.
    Data,
    /// Inside an error response's `Error`.
    Error,
}

/// Where a field sits in a frame, e.g. `Args.ENTITY` or
/// `Data.DEVICES[0].NAME`. Key names taken from the input are clipped.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct FieldPath {
    section: Section,
    text: String,
}

impl FieldPath {
    pub(crate) fn new(section: Section, text: String) -> Self {
        Self { section, text }
    }

    /// The section the field belongs to.
    pub fn section(&self) -> Section {
        self.section
    }

    /// The dotted path.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// Longest piece of peer-provided text (a key, a name) kept in an error.
pub(crate) const MAX_ECHO: usize = 64;

/// Clip peer-provided text for inclusion in an error.
pub(crate) fn clip(text: &str) -> String {
    match text.char_indices().nth(MAX_ECHO) {
        Some((at, _)) => format!("{}...", &text[..at]),
        None => text.to_owned(),
    }
}

/// Why a message could not be encoded into a frame the peer accepts.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EncodeError {
    /// The body is longer than the peer's `max_frame_len` (or `u32::MAX`).
    #[error("encoded body of {len} bytes exceeds the frame limit of {max} bytes")]
    FrameTooLarge {
        /// Body length.
        len: usize,
        /// The limit.
        max: u32,
    },
    /// The body would break one of the peer's parser [`crate::Limits`]
    /// (for example too many entries in one INBOX-FETCH answer).
    #[error("encoded body exceeds the peer's {which} limit")]
    LimitExceeded {
        /// Which limit.
        which: Limit,
    },
}
