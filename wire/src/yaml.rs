//! The one place that touches the YAML library.
//!
//! Decoding turns a frame body into a small, fully owned [`Node`] tree under
//! hard [`Limits`]; the typed layer (`crate::codec` and the message modules)
//! only ever sees `Node`s, so the YAML library can be swapped by rewriting
//! this file alone.
//!
//! Encoding does not use the library: [`emit`] writes a fixed, minimal
//! subset of YAML (block mappings and sequences; upper-case protocol words
//! plain, every other string double-quoted with explicit escapes; integers
//! and booleans plain). That output is
//! byte-for-byte deterministic and independent of any library version, which
//! matters because the broker signs the canonical encoding of its `Info`.
//!
//! # How the limits are enforced
//!
//! - The body must be UTF-8 ([`DecodeError::NotUtf8`]) before the parser runs.
//! - The library's streaming budget counts events, nesting depth and
//!   documents as the parser produces them, and refuses any anchor or alias
//!   (budget of zero), so an alias bomb is rejected at its first `&anchor`.
//! - Independently of that budget, the tree builder below counts its own depth
//!   and refuses to descend past `max_depth`, so stack use is bounded by our
//!   code even if the library's accounting were to change. The parser itself is
//!   an iterative state machine; flow nesting is capped there too.
//! - Scalars longer than `max_scalar_len` are refused when they are visited.

use std::cell::Cell;
use std::fmt;
use std::fmt::Write as _;

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde_saphyr::budget::BudgetBreach;

use crate::error::{DecodeError, Limit};
use crate::limits::Limits;

/// A decoded YAML node: the protocol needs nothing richer.
///
/// Mappings keep their entries in document order; keys are always strings
/// (a plain `1:` key arrives as the string `"1"`). Duplicate keys never reach
/// this type: the parser refuses them.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Node {
    Null,
    Bool(bool),
    /// Any YAML integer. Values beyond `i128` saturate; every protocol integer
    /// type is far smaller, so saturation still reads as "out of range".
    Int(i128),
    Float(f64),
    Str(String),
    Seq(Vec<Node>),
    Map(Vec<(String, Node)>),
}

/// The most scalar bytes one document may hold in all (the general parser's budget; a frame
/// is far smaller unless `max_frame_len` is raised past it).
pub(crate) const MAX_TOTAL_SCALAR_BYTES: usize = 64 * 1024 * 1024;

/// Parse one frame body into a [`Node`] under `limits`.
pub(crate) fn parse(body: &[u8], limits: &Limits) -> Result<Node, DecodeError> {
    let text = std::str::from_utf8(body).map_err(|e| DecodeError::NotUtf8 {
        valid_up_to: e.valid_up_to(),
    })?;
    // Frames in the shape this crate writes are read directly; everything else, including
    // every error, is the general parser's (see `canonical`).
    match crate::canonical::parse(text, limits) {
        Some(node) => Ok(node),
        None => parse_general(text, limits),
    }
}

/// Parse `text` with the general YAML parser under `limits`.
pub(crate) fn parse_general(text: &str, limits: &Limits) -> Result<Node, DecodeError> {
    let hit = Cell::new(None);
    let seed = NodeSeed {
        limits,
        hit: &hit,
        depth: 0,
    };
    let result =
        serde_saphyr::with_deserializer_from_str_with_options(text, options(limits), |de| {
            seed.deserialize(de)
        });
    match result {
        Ok(node) => Ok(node),
        // A limit noticed by our own visitor wins over whatever wrapped error
        // the library reports for the aborted visit.
        Err(_) if hit.get().is_some() => Err(DecodeError::LimitExceeded {
            which: hit.get().unwrap_or(Limit::Depth),
        }),
        Err(e) => Err(map_error(e)),
    }
}

fn options(limits: &Limits) -> serde_saphyr::Options {
    let mut budget = serde_saphyr::Budget::default();
    budget.max_events = limits.max_events;
    budget.max_aliases = 0;
    budget.max_anchors = 0;
    budget.max_depth = limits.max_depth;
    // One past the depth limit, so a deep flow collection is reported by the
    // budget as `Depth` rather than by the parser as a syntax error.
    budget.flow_nesting_limit = limits.max_depth.saturating_add(1);
    budget.max_documents = 1;
    budget.max_nodes = limits.max_events;
    budget.max_merge_keys = 0;
    budget.max_reader_input_bytes = None;
    // Set here rather than left to the library's default, because the canonical reader gives
    // up at the same figure.
    budget.max_total_scalar_bytes = MAX_TOTAL_SCALAR_BYTES;

    let mut options = serde_saphyr::Options::default();
    options.budget = Some(budget);
    options.duplicate_keys = serde_saphyr::DuplicateKeyPolicy::Error;
    // `<<` is an ordinary (and therefore unknown) key, never a merge.
    options.merge_keys = serde_saphyr::MergeKeyPolicy::AsOrdinary;
    options.alias_limits.max_total_replayed_events = 0;
    options.alias_limits.max_replay_stack_depth = 0;
    options.alias_limits.max_alias_expansions_per_anchor = 0;
    // YAML 1.1 `yes`/`no`/`on`/`off` stay strings.
    options.strict_booleans = true;
    options.legacy_octal_numbers = false;
    options.non_finite_float_policy = serde_saphyr::NonFiniteFloatPolicy::PassThrough;
    options.reject_unsupported_tags = true;
    options.reject_tagged_field_names = true;
    // Errors must not carry copies of the input around.
    options.with_snippet = false;
    options.crop_radius = 0;
    options
}

/// Longest library error text kept in [`DecodeError::Yaml`]: it is sent back to
/// the peer, so keep it short.
const MAX_ERROR_TEXT: usize = 160;

fn map_error(error: serde_saphyr::Error) -> DecodeError {
    use serde_saphyr::Error as E;
    match error.without_snippet() {
        E::Budget { breach, .. } => DecodeError::LimitExceeded {
            which: match breach {
                BudgetBreach::Depth { .. } => Limit::Depth,
                BudgetBreach::Documents { .. } => Limit::Documents,
                BudgetBreach::Aliases { .. }
                | BudgetBreach::Anchors { .. }
                | BudgetBreach::AliasAnchorRatio { .. }
                | BudgetBreach::RecordedAnchorEvents { .. }
                | BudgetBreach::RecordedAnchorBytes { .. }
                | BudgetBreach::MergeKeys { .. } => Limit::Aliases,
                BudgetBreach::ScalarBytes { .. } => Limit::ScalarLen,
                _ => Limit::Events,
            },
        },
        E::MultipleDocuments { .. } => DecodeError::LimitExceeded {
            which: Limit::Documents,
        },
        E::UnknownAnchor { .. }
        | E::AliasError { .. }
        | E::AliasReplayCounterOverflow { .. }
        | E::AliasReplayLimitExceeded { .. }
        | E::AliasExpansionLimitExceeded { .. }
        | E::AliasReplayStackDepthExceeded { .. } => DecodeError::LimitExceeded {
            which: Limit::Aliases,
        },
        E::DuplicateMappingKey { key, .. } => DecodeError::DuplicateKey {
            key: crate::error::clip(key.as_deref().unwrap_or("?")),
        },
        // The scanner caps flow nesting itself (it scans ahead of the
        // events the budget sees), so deep `[[[[` ends here.
        E::ExternalMessage { source, .. }
            if matches!(
                &**source,
                serde_saphyr::ExternalMessageSource::Parser(scan)
                    if *scan.kind() == serde_saphyr::granit_parser::ErrorKind::RecursionLimitExceeded
            ) =>
        {
            DecodeError::LimitExceeded {
                which: Limit::Depth,
            }
        }
        other => DecodeError::Yaml(clip_text(&other.to_string())),
    }
}

fn clip_text(text: &str) -> String {
    match text.char_indices().nth(MAX_ERROR_TEXT) {
        Some((at, _)) => format!("{}...", &text[..at]),
        None => text.to_owned(),
    }
}

/// Builds a [`Node`] while counting depth and scalar sizes itself.
struct NodeSeed<'a> {
    limits: &'a Limits,
    /// Set when our own check fails, so the caller can report the limit
    /// instead of the library's generic "custom error".
    hit: &'a Cell<Option<Limit>>,
    depth: usize,
}

impl NodeSeed<'_> {
    fn child(&self) -> Self {
        NodeSeed {
            limits: self.limits,
            hit: self.hit,
            depth: self.depth + 1,
        }
    }

    fn fail<E: de::Error>(&self, which: Limit) -> E {
        self.hit.set(Some(which));
        E::custom(format_args!("limit exceeded: {which}"))
    }

    fn enter<E: de::Error>(&self) -> Result<(), E> {
        if self.depth >= self.limits.max_depth {
            Err(self.fail(Limit::Depth))
        } else {
            Ok(())
        }
    }

    fn string<E: de::Error>(&self, s: &str) -> Result<String, E> {
        if s.len() > self.limits.max_scalar_len {
            Err(self.fail(Limit::ScalarLen))
        } else {
            Ok(s.to_owned())
        }
    }
}

impl<'de> DeserializeSeed<'de> for NodeSeed<'_> {
    type Value = Node;

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<Node, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for NodeSeed<'_> {
    type Value = Node;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a YAML node")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Node, E> {
        Ok(Node::Bool(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Node, E> {
        Ok(Node::Int(i128::from(v)))
    }

    fn visit_i128<E: de::Error>(self, v: i128) -> Result<Node, E> {
        Ok(Node::Int(v))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Node, E> {
        Ok(Node::Int(i128::from(v)))
    }

    fn visit_u128<E: de::Error>(self, v: u128) -> Result<Node, E> {
        Ok(Node::Int(i128::try_from(v).unwrap_or(i128::MAX)))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Node, E> {
        Ok(Node::Float(v))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Node, E> {
        self.string(v).map(Node::Str)
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Node, E> {
        if v.len() > self.limits.max_scalar_len {
            Err(self.fail(Limit::ScalarLen))
        } else {
            Ok(Node::Str(v))
        }
    }

    fn visit_bytes<E: de::Error>(self, _: &[u8]) -> Result<Node, E> {
        // Only reachable through a `!!binary` tag, which the protocol never uses.
        Err(E::custom("binary scalars are not allowed"))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Node, E> {
        Ok(Node::Null)
    }

    fn visit_none<E: de::Error>(self) -> Result<Node, E> {
        Ok(Node::Null)
    }

    fn visit_some<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<Node, D::Error> {
        deserializer.deserialize_any(self)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
        self.enter()?;
        let mut items = Vec::new();
        while let Some(item) = seq.next_element_seed(self.child())? {
            items.push(item);
        }
        Ok(Node::Seq(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
        self.enter()?;
        let mut entries = Vec::new();
        while let Some(key) = map.next_key_seed(KeySeed(&self))? {
            let value = map.next_value_seed(self.child())?;
            entries.push((key, value));
        }
        Ok(Node::Map(entries))
    }
}

/// Mapping keys must be scalars; they are read as strings.
struct KeySeed<'s, 'a>(&'s NodeSeed<'a>);

impl<'de> DeserializeSeed<'de> for KeySeed<'_, '_> {
    type Value = String;

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<String, D::Error> {
        deserializer.deserialize_string(self)
    }
}

impl<'de> Visitor<'de> for KeySeed<'_, '_> {
    type Value = String;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string mapping key")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<String, E> {
        self.0.string(v)
    }
}

// ---------------------------------------------------------------------------
// Emitter

/// Write `node` (which must be a mapping) as a canonical YAML document.
///
/// Layout: block style, two-space indentation, sequences indented under their
/// key, `{}`/`[]` for empty collections, upper-case words plain and every
/// other string double-quoted. The output ends with a newline and never
/// starts with `---`.
pub(crate) fn emit(node: &Node) -> Vec<u8> {
    let mut out = String::with_capacity(256);
    match node {
        Node::Map(entries) if !entries.is_empty() => emit_map_entries(entries, 0, &mut out),
        other => {
            emit_inline(other, &mut out);
            out.push('\n');
        }
    }
    out.into_bytes()
}

fn indent(level: usize, out: &mut String) {
    for _ in 0..level {
        out.push_str("  ");
    }
}

/// Mapping entries, each starting at column `2 * level` (the first one is
/// assumed to be positioned already when called after `- `).
fn emit_map_entries(entries: &[(String, Node)], level: usize, out: &mut String) {
    for (i, (key, value)) in entries.iter().enumerate() {
        if i > 0 {
            indent(level, out);
        }
        emit_key(key, out);
        out.push(':');
        emit_value_after_key(value, level, out);
    }
}

/// What follows `KEY:`: a space and an inline value, or a nested block.
fn emit_value_after_key(value: &Node, level: usize, out: &mut String) {
    match value {
        Node::Map(entries) if !entries.is_empty() => {
            out.push('\n');
            indent(level + 1, out);
            emit_map_entries(entries, level + 1, out);
        }
        Node::Seq(items) if !items.is_empty() => {
            out.push('\n');
            emit_seq_items(items, level + 1, out);
        }
        other => {
            out.push(' ');
            emit_inline(other, out);
            out.push('\n');
        }
    }
}

fn emit_seq_items(items: &[Node], level: usize, out: &mut String) {
    for item in items {
        indent(level, out);
        out.push_str("- ");
        match item {
            Node::Map(entries) if !entries.is_empty() => {
                emit_map_entries(entries, level + 1, out);
            }
            Node::Seq(inner) if !inner.is_empty() => {
                // Compact nested sequences are legal but hard to read;
                // put the inner block on its own lines.
                out.pop();
                out.push('\n');
                emit_seq_items(inner, level + 1, out);
            }
            other => {
                emit_inline(other, out);
                out.push('\n');
            }
        }
    }
}

fn emit_key(key: &str, out: &mut String) {
    // Protocol keys (`Request`, `RetryAfter`, `NONCE-STEP`) are written
    // plain; anything else is quoted so the output is valid whatever the key.
    if is_plain_word(key) {
        out.push_str(key);
    } else {
        emit_quoted(key, out);
    }
}

/// ASCII letters, digits and `-`, starting with a letter, and not a word
/// YAML 1.1 or 1.2 reads as a boolean, null or float: such a plain scalar
/// always reads back as the same string.
pub(crate) fn is_plain_word(s: &str) -> bool {
    s.as_bytes().first().is_some_and(u8::is_ascii_alphabetic)
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && ![
            "y", "n", "yes", "no", "on", "off", "true", "false", "null", "nan", "inf",
        ]
        .iter()
        .any(|word| s.eq_ignore_ascii_case(word))
}

/// Upper-case protocol words (`LOGIN`, `OK`, `AUTH-FAILED`) are written
/// plain, as in the protocol text; every other string is double-quoted, so
/// data (numbers, hex, base64, names) always looks the same.
fn emit_string(s: &str, out: &mut String) {
    if is_plain_word(s) && !s.bytes().any(|b| b.is_ascii_lowercase()) {
        out.push_str(s);
    } else {
        emit_quoted(s, out);
    }
}

/// Scalars and empty collections.
fn emit_inline(node: &Node, out: &mut String) {
    match node {
        Node::Null => out.push_str("null"),
        Node::Bool(true) => out.push_str("true"),
        Node::Bool(false) => out.push_str("false"),
        Node::Int(i) => {
            let _ = write!(out, "{i}");
        }
        Node::Float(f) => {
            // The protocol has no floats; kept only so `Node` is total.
            let _ = write!(out, "{f:?}");
        }
        Node::Str(s) => emit_string(s, out),
        Node::Seq(items) if items.is_empty() => out.push_str("[]"),
        Node::Map(entries) if entries.is_empty() => out.push_str("{}"),
        Node::Seq(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                emit_inline(item, out);
            }
            out.push(']');
        }
        Node::Map(entries) => {
            out.push('{');
            for (i, (key, value)) in entries.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                emit_quoted(key, out);
                out.push_str(": ");
                emit_inline(value, out);
            }
            out.push('}');
        }
    }
}

/// A YAML double-quoted scalar. Only `"` and `\` and characters outside
/// YAML's printable set (plus every line-break character) are escaped.
fn emit_quoted(s: &str, out: &mut String) {
    out.push('"');
    // Most strings (ids, numbers, base64 bodies) are printable ASCII with nothing to escape:
    // copied whole rather than character by character.
    if s.bytes()
        .all(|b| (0x20..=0x7e).contains(&b) && b != b'"' && b != b'\\')
    {
        out.push_str(s);
        out.push('"');
        return;
    }
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\0' => out.push_str("\\0"),
            c if needs_escape(c) => {
                let code = u32::from(c);
                if code <= 0xFF {
                    let _ = write!(out, "\\x{code:02X}");
                } else {
                    let _ = write!(out, "\\u{code:04X}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

fn needs_escape(c: char) -> bool {
    matches!(u32::from(c),
        0x00..=0x1F | 0x7F..=0x9F | 0x2028 | 0x2029 | 0xFEFF | 0xFFFE | 0xFFFF)
}

/// Number of parser events the decoder will count for `node` as a whole
/// document (stream and document start/end included), so an encoder can
/// check a message against the peer's [`Limits::max_events`] before sending.
pub(crate) fn event_count(node: &Node) -> usize {
    fn count(node: &Node) -> usize {
        match node {
            Node::Seq(items) => 2 + items.iter().map(count).sum::<usize>(),
            Node::Map(entries) => {
                2 + entries
                    .iter()
                    .map(|(_, value)| 1 + count(value))
                    .sum::<usize>()
            }
            _ => 1,
        }
    }
    4 + count(node)
}

/// Check an encoded tree against a peer's decoding limits, so a sender
/// never produces a frame the peer must refuse.
pub(crate) fn check_limits(node: &Node, limits: &Limits) -> Result<(), Limit> {
    fn longest_scalar(node: &Node) -> usize {
        match node {
            Node::Str(s) => s.len(),
            Node::Seq(items) => items.iter().map(longest_scalar).max().unwrap_or(0),
            Node::Map(entries) => entries
                .iter()
                .map(|(key, value)| key.len().max(longest_scalar(value)))
                .max()
                .unwrap_or(0),
            _ => 0,
        }
    }
    if depth(node) > limits.max_depth {
        return Err(Limit::Depth);
    }
    if event_count(node) > limits.max_events {
        return Err(Limit::Events);
    }
    if longest_scalar(node) > limits.max_scalar_len {
        return Err(Limit::ScalarLen);
    }
    Ok(())
}

/// Nesting depth as the decoder counts it (a scalar is 0, `{}` is 1).
pub(crate) fn depth(node: &Node) -> usize {
    match node {
        Node::Seq(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
        Node::Map(entries) => 1 + entries.iter().map(|(_, v)| depth(v)).max().unwrap_or(0),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn parse_default(text: &str) -> Result<Node, DecodeError> {
        parse(text.as_bytes(), &Limits::default())
    }

    #[test]
    fn parses_scalars_by_yaml_type() {
        let node = parse_default("A: \"12\"\nB: 12\nC: true\nD: null\nE: yes\nF: 1.5\n").unwrap();
        assert_eq!(
            node,
            Node::Map(vec![
                ("A".into(), Node::Str("12".into())),
                ("B".into(), Node::Int(12)),
                ("C".into(), Node::Bool(true)),
                ("D".into(), Node::Null),
                ("E".into(), Node::Str("yes".into())),
                ("F".into(), Node::Float(1.5)),
            ])
        );
    }

    #[test]
    fn emitted_strings_round_trip() {
        for s in [
            "",
            "plain",
            "12",
            "1e10",
            "null",
            "NULL",
            "Yes",
            "N",
            "NAN",
            "A-1",
            "LOGIN",
            "-A",
            "- x",
            "a: b",
            "#",
            "\"'\\",
            "\n\r\t\0\u{7f}\u{85}\u{2028}\u{feff}\u{fffe}",
            "ünï",
            "  lead",
            "trail  ",
        ] {
            let node = Node::Map(vec![("K".into(), Node::Str(s.into()))]);
            let text = emit(&node);
            assert_eq!(parse(&text, &Limits::default()).unwrap(), node, "{s:?}");
        }
    }

    #[test]
    fn scalar_length_is_limited_for_keys_and_values() {
        let limits = Limits {
            max_scalar_len: 8,
            ..Limits::default()
        };
        let scalar_len = Err(DecodeError::LimitExceeded {
            which: Limit::ScalarLen,
        });
        assert!(parse(b"A: \"12345678\"\n", &limits).is_ok());
        assert_eq!(parse(b"A: \"123456789\"\n", &limits), scalar_len);
        assert_eq!(parse(b"ABCDEFGHI: 1\n", &limits), scalar_len);
        // A scalar that is not a string is bounded by the frame alone (protocol.md 3.2): its
        // value is read, whatever the length of its text.
        let long_float = parse(b"A: 1.0000000000\n", &limits).unwrap();
        assert_eq!(long_float, Node::Map(vec![("A".into(), Node::Float(1.0))]));
    }

    #[test]
    fn own_depth_check_matches_the_budget() {
        for max_depth in [1, 2, 5] {
            let limits = Limits {
                max_depth,
                ..Limits::default()
            };
            let ok = format!("{}{}", "[".repeat(max_depth), "]".repeat(max_depth));
            let deep = format!("[{ok}]");
            assert!(parse(ok.as_bytes(), &limits).is_ok(), "{ok}");
            assert_eq!(
                parse(deep.as_bytes(), &limits),
                Err(DecodeError::LimitExceeded {
                    which: Limit::Depth
                })
            );
        }
    }

    #[test]
    fn event_count_matches_parser() {
        let node = Node::Map(vec![
            ("A".into(), Node::Seq(vec![Node::Int(1), Node::Int(2)])),
            ("B".into(), Node::Map(vec![("C".into(), Node::Null)])),
        ]);
        let events = event_count(&node);
        let text = emit(&node);
        let exact = Limits {
            max_events: events,
            ..Limits::default()
        };
        assert_eq!(parse(&text, &exact).unwrap(), node);
        let short = Limits {
            max_events: events - 1,
            ..Limits::default()
        };
        assert_eq!(
            parse(&text, &short),
            Err(DecodeError::LimitExceeded {
                which: Limit::Events
            })
        );
    }
}
