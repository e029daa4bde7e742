//! A fast decoder for the canonical YAML subset that [`crate::yaml::emit`] writes.
//!
//! Every frame MicroMsg sends is in that subset: block mappings and sequences at two spaces a
//! level, plain keys, plain upper-case words, decimal integers, `true`/`false`/`null`,
//! double-quoted strings and `[]`/`{}`. The general YAML parser costs about 20 µs for a
//! 560-byte inbox message, and a drain decodes 64 KiB pages back to back, so this reader
//! takes frames in that shape directly.
//!
//! It is a filter in front of the general parser, never a second judge of YAML: it answers
//! `Some(node)` only for a document it reads completely within the subset and well inside the
//! [`Limits`], and `None` for anything else (another layout, an escape, a non-ASCII
//! character, a comment, a duplicate key, a limit reached), which then goes to the general
//! parser. So every error, and every document outside the subset, is still the general
//! parser's answer; a test checks on generated and mutated documents that when this reader
//! answers, it answers the same tree.
//!
//! Its own work is bounded: one pass over the bytes, and recursion no deeper than
//! `max_depth` (it gives up at the limit instead of descending).

use std::collections::HashSet;

use crate::limits::Limits;
use crate::yaml::{MAX_TOTAL_SCALAR_BYTES, Node, is_plain_word};

/// The longest key this reader takes.
const MAX_KEY_LEN: usize = 64;

/// Reads `text` if it is a canonical document within `limits`; `None` means "ask the general
/// parser".
pub(crate) fn parse(text: &str, limits: &Limits) -> Option<Node> {
    // The general parser also bounds the scalar bytes of a whole document; a frame that long
    // (possible only with `max_frame_len` raised that far) is left to it.
    if text.len() > MAX_TOTAL_SCALAR_BYTES {
        return None;
    }
    let mut reader = Reader {
        s: text.as_bytes(),
        pos: 0,
        limits,
        // Stream and document start and end, as the general parser counts them.
        events: 4,
    };
    if reader.column()? != 0 || reader.at_item() {
        return None;
    }
    let root = reader.map(0, 0)?;
    (reader.pos == reader.s.len() && reader.events <= limits.max_events).then_some(root)
}

struct Reader<'a> {
    s: &'a [u8],
    pos: usize,
    limits: &'a Limits,
    events: usize,
}

impl<'a> Reader<'a> {
    /// Counts `n` events; `None` once past the limit (the general parser reports it).
    fn count(&mut self, n: usize) -> Option<()> {
        self.events += n;
        (self.events <= self.limits.max_events).then_some(())
    }

    /// The indentation of the line starting at `pos` (spaces only), without consuming it;
    /// `None` at the end of the input.
    fn column(&self) -> Option<usize> {
        if self.pos >= self.s.len() {
            return None;
        }
        Some(
            self.s[self.pos..]
                .iter()
                .take_while(|&&b| b == b' ')
                .count(),
        )
    }

    /// Whether the line at `pos`, after its indentation, starts a sequence item (`- `).
    fn at_item(&self) -> bool {
        let col = self.column().unwrap_or(0);
        self.s[self.pos + col..].starts_with(b"- ")
    }

    fn eat(&mut self, byte: u8) -> Option<()> {
        (self.s.get(self.pos) == Some(&byte)).then(|| self.pos += 1)
    }

    /// A block mapping whose entries start at column `col`, at nesting `depth`; the cursor is
    /// at its first key (already positioned after `- ` for a sequence item's mapping).
    fn map(&mut self, col: usize, depth: usize) -> Option<Node> {
        if depth >= self.limits.max_depth {
            return None;
        }
        self.count(2)?;
        let mut entries: Vec<(String, Node)> = Vec::new();
        loop {
            let key = self.word()?;
            // YAML bounds an implicit key's length (1024 characters); no protocol key comes
            // near [`MAX_KEY_LEN`], so longer ones go to the general parser to judge.
            if key.len() > MAX_KEY_LEN.min(self.limits.max_scalar_len) || !is_plain_word(key) {
                return None;
            }
            let key = key.to_owned();
            self.eat(b':')?;
            self.count(1)?;
            let value = if self.eat(b' ').is_some() {
                let value = self.inline(depth + 1)?;
                self.eat(b'\n')?;
                value
            } else {
                self.eat(b'\n')?;
                // A nested block, two columns in: a mapping or a sequence.
                if self.column()? != col + 2 {
                    return None;
                }
                if self.at_item() {
                    self.seq(col + 2, depth + 1)?
                } else {
                    self.pos += col + 2;
                    self.map(col + 2, depth + 1)?
                }
            };
            entries.push((key, value));
            match self.column() {
                Some(c) if c == col && !self.at_item() => self.pos += col,
                // The end of the document, or of this mapping (a line further out).
                None => break,
                Some(c) if c < col => break,
                // A sequence item at this column, or a line further in: not canonical.
                Some(_) => return None,
            }
        }
        if has_duplicates(&entries) {
            return None;
        }
        Some(Node::Map(entries))
    }

    /// A block sequence whose `- ` items start at column `col`; the cursor is at the start of
    /// its first item's line.
    fn seq(&mut self, col: usize, depth: usize) -> Option<Node> {
        if depth >= self.limits.max_depth {
            return None;
        }
        self.count(2)?;
        let mut items = Vec::new();
        while self.column() == Some(col) && self.at_item() {
            self.pos += col + 2;
            let start = self.pos;
            // `- KEY: …` starts a mapping; anything else is one inline value.
            let word = self.word();
            let is_key = word.is_some() && self.s.get(self.pos) == Some(&b':');
            self.pos = start;
            if is_key {
                items.push(self.map(col + 2, depth + 1)?);
            } else {
                items.push(self.inline(depth + 1)?);
                self.eat(b'\n')?;
            }
        }
        match self.column() {
            None => {}
            Some(c) if c < col => {}
            Some(_) => return None,
        }
        Some(Node::Seq(items))
    }

    /// Consumes ASCII letters, digits and `-` from the cursor and returns them (`None` when
    /// there are none).
    fn word(&mut self) -> Option<&'a str> {
        let start = self.pos;
        while self
            .s
            .get(self.pos)
            .is_some_and(|b| b.is_ascii_alphanumeric() || *b == b'-')
        {
            self.pos += 1;
        }
        if self.pos == start {
            return None;
        }
        // ASCII only, so this cannot fail.
        std::str::from_utf8(&self.s[start..self.pos]).ok()
    }

    /// A value on the rest of the line, at nesting `depth`: a quoted string without escapes,
    /// an empty collection, `true`/`false`/`null`, a decimal integer or a plain upper-case
    /// word.
    fn inline(&mut self, depth: usize) -> Option<Node> {
        self.count(1)?;
        match *self.s.get(self.pos)? {
            b'"' => {
                self.pos += 1;
                let start = self.pos;
                // Printable ASCII only: an escape, a control or a non-ASCII character goes to
                // the general parser.
                let len = self.s[start..]
                    .iter()
                    .take_while(|&&b| (0x20..=0x7e).contains(&b) && b != b'"' && b != b'\\')
                    .count();
                self.pos += len;
                self.eat(b'"')?;
                if len > self.limits.max_scalar_len {
                    return None;
                }
                let text = std::str::from_utf8(&self.s[start..start + len]).ok()?;
                Some(Node::Str(text.to_owned()))
            }
            // An empty collection is a collection: it counts for the depth.
            b'[' if depth < self.limits.max_depth => {
                self.pos += 1;
                self.eat(b']')?;
                // The sequence's start and end, not one scalar.
                self.count(1)?;
                Some(Node::Seq(Vec::new()))
            }
            b'{' if depth < self.limits.max_depth => {
                self.pos += 1;
                self.eat(b'}')?;
                self.count(1)?;
                Some(Node::Map(Vec::new()))
            }
            b'-' | b'0'..=b'9' => {
                let negative = self.eat(b'-').is_some();
                let start = self.pos;
                let digits = self.s[start..]
                    .iter()
                    .take_while(|b| b.is_ascii_digit())
                    .count();
                self.pos += digits;
                let text = std::str::from_utf8(&self.s[start..self.pos]).ok()?;
                // No leading zeros, no `-0`, and small enough that every reader agrees.
                if digits == 0 || digits > 18 || (text.starts_with('0') && (digits > 1 || negative))
                {
                    return None;
                }
                let value = i128::from(text.parse::<i64>().ok()?);
                Some(Node::Int(if negative { -value } else { value }))
            }
            b'a'..=b'z' | b'A'..=b'Z' => {
                let word = self.word()?;
                match word {
                    "true" => Some(Node::Bool(true)),
                    "false" => Some(Node::Bool(false)),
                    "null" => Some(Node::Null),
                    w if w.len() <= self.limits.max_scalar_len
                        && is_plain_word(w)
                        && !w.bytes().any(|b| b.is_ascii_lowercase()) =>
                    {
                        Some(Node::Str(w.to_owned()))
                    }
                    _ => None,
                }
            }
            _ => None,
        }
    }
}

/// Whether two entries share a key (the general parser refuses that, with its own error).
fn has_duplicates(entries: &[(String, Node)]) -> bool {
    if entries.len() <= 16 {
        entries
            .iter()
            .enumerate()
            .any(|(i, (k, _))| entries[..i].iter().any(|(other, _)| other == k))
    } else {
        let mut seen = HashSet::with_capacity(entries.len());
        !entries.iter().all(|(k, _)| seen.insert(k.as_str()))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use proptest::prelude::*;

    use super::*;
    use crate::yaml::{emit, parse_general};

    fn fast(text: &str) -> Option<Node> {
        parse(text, &Limits::default())
    }

    /// What the general parser reads, which the fast reader must match whenever it answers.
    fn general(text: &str, limits: &Limits) -> Option<Node> {
        parse_general(text, limits).ok()
    }

    #[test]
    fn reads_what_the_protocol_sends() {
        let page = "Response: INBOX-FETCH\nId: 19\nStatus: OK\nData:\n  MESSAGES:\n    \
                    - ID: \"ab530a13e45914982b79f9b7e3fba994\"\n      FROM: \"5550001234\"\n      \
                    FROM-DEVICE: 1\n      TIME: 1700000000\n      EXPIRES: 1702592000\n      \
                    BODY: \"TU1PMb1zM3v+/A==\"\n    - ID: \"00\"\n      FROM: \"5550001\"\n      \
                    FROM-DEVICE: 2\n      TIME: 0\n      EXPIRES: -1\n      BODY: \"\"\n  \
                    MORE: false\n";
        let node = fast(page).expect("canonical");
        assert_eq!(Some(node), general(page, &Limits::default()));
        for text in [
            "Request: PING\nId: 1\n",
            "Request: INBOX-ACK\nId: 2\nArgs:\n  IDS: []\n",
            "Response: X\nId: 0\nStatus: OK\nData: {}\n",
            "A:\n  - LOGIN\n  - 5\n  - \"x\"\n  - null\n  - true\n  - []\n  - {}\nB: 1\n",
            "A:\n  B:\n    C:\n      - D: 1\n        E:\n          - F\n      - G: 2\nH: null\n",
        ] {
            let node = fast(text).unwrap_or_else(|| panic!("canonical: {text:?}"));
            assert_eq!(Some(node), general(text, &Limits::default()), "{text:?}");
        }
    }

    #[test]
    fn leaves_everything_else_to_the_general_parser() {
        for text in [
            "",
            "---\nA: 1\n",
            "A: 1",
            "A: 1 # note\n",
            "A: 1\r\n",
            "A:\t1\n",
            "A:  1\n",
            "A: 1 \n",
            "A: \"\\n\"\n",
            "A: \"ü\"\n",
            "A: \"\u{7f}\"\n",
            "A: 'x'\n",
            "A: x\n",
            "A: Ok\n",
            "A: NULL\n",
            "A: TRUE\n",
            "A: YES\n",
            "A: 012\n",
            "A: -0\n",
            "A: +1\n",
            "A: 1.5\n",
            "A: 1e3\n",
            "A: 0x1F\n",
            "A: 1234567890123456789\n",
            "A: [1]\n",
            "A: {B: 1}\n",
            "A: &x 1\n",
            "A: *x\n",
            "A: !!str 1\n",
            "A: |\n  x\n",
            "A: B: C\n",
            "A: WORD\n  MORE\n",
            "A:\n- 1\n",
            "A:\n   B: 1\n",
            "A:\n",
            "A: 1\nA: 2\n",
            "A: 1\n\nB: 2\n",
            " A: 1\n",
            "- 1\n",
            "\"A\": 1\n",
            "y: 1\n",
            "1: 1\n",
            "A: 1\n  B: 2\n",
            "A:\n  - 1\n   - 2\n",
            "A:\n  -\n    - 1\n",
            &format!("{}: 1\n", "K".repeat(MAX_KEY_LEN + 1)),
        ] {
            assert_eq!(fast(text), None, "{text:?}");
        }
        assert!(fast(&format!("{}: 1\n", "K".repeat(MAX_KEY_LEN))).is_some());
    }

    #[test]
    fn gives_up_at_the_limits_so_the_general_parser_reports_them() {
        let text = "A:\n  B:\n    C: []\n";
        assert!(fast(text).is_some());
        for limits in [
            Limits {
                max_depth: 3,
                ..Limits::default()
            },
            Limits {
                max_events: 14,
                ..Limits::default()
            },
        ] {
            assert_eq!(parse(text, &limits), None, "{limits:?}");
            assert!(parse_general(text, &limits).is_err(), "{limits:?}");
        }
        let exact = Limits {
            max_depth: 4,
            max_events: 15,
            ..Limits::default()
        };
        assert_eq!(parse(text, &exact), general(text, &exact));
        assert!(parse(text, &exact).is_some());
        let short = Limits {
            max_scalar_len: 2,
            ..Limits::default()
        };
        for text in [
            "A: \"abc\"\n",
            "ABC: 1\n",
            "A: ABC\n",
            "A:\n  - ABC\n",
            "A:\n  - \"abc\"\n",
        ] {
            assert_eq!(parse(text, &short), None, "{text:?}");
            assert!(parse_general(text, &short).is_err(), "{text:?}");
        }
        assert!(parse("AB: \"ab\"\n", &short).is_some());
        assert!(parse("AB: AB\n", &short).is_some());
        // A document past the general parser's total of scalar bytes (only possible with a
        // frame limit raised that far) is left to it, whatever its shape.
        let huge = format!("A: \"{}\"\n", "x".repeat(MAX_TOTAL_SCALAR_BYTES));
        let no_scalar_limit = Limits {
            max_scalar_len: usize::MAX,
            ..Limits::default()
        };
        assert_eq!(parse(&huge, &no_scalar_limit), None);
    }

    /// A tree of the protocol's shape: string keys, the scalars the protocol uses, nesting.
    fn tree() -> impl Strategy<Value = Node> {
        let key = prop_oneof!["[A-Z][A-Z0-9-]{0,8}", "[A-Za-z][a-zA-Z0-9-]{0,8}", ".{0,4}",];
        let scalar = prop_oneof![
            Just(Node::Null),
            any::<bool>().prop_map(Node::Bool),
            any::<i64>().prop_map(|i| Node::Int(i.into())),
            "[ -~]{0,12}".prop_map(Node::Str),
            "[A-Z][A-Z0-9-]{0,6}".prop_map(Node::Str),
            ".{0,6}".prop_map(Node::Str),
        ];
        scalar.prop_recursive(5, 48, 6, move |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..5).prop_map(Node::Seq),
                prop::collection::vec((key.clone(), inner), 0..5).prop_map(Node::Map),
            ]
        })
    }

    fn document() -> impl Strategy<Value = Node> {
        prop::collection::vec(("[A-Z][a-zA-Z0-9-]{0,8}", tree()), 1..5).prop_map(Node::Map)
    }

    /// Bytes that change YAML's meaning, for mutations.
    const TRICKY: &[u8] = b" \n-:\"#\\aA0[]{}\t&*!|>',?%@`.~";

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Whatever the emitter writes, the fast reader reads as the general parser does, or
        /// leaves to it.
        #[test]
        fn agrees_with_the_general_parser_on_emitted_documents(node in document()) {
            let text = String::from_utf8(emit(&node)).unwrap();
            if let Some(fast) = fast(&text) {
                prop_assert_eq!(Some(fast), general(&text, &Limits::default()));
            }
        }

        /// A document of printable-ASCII strings is always read by the fast reader.
        #[test]
        fn reads_every_emitted_document_of_plain_ascii(
            entries in prop::collection::vec(
                ("[A-Z][A-Z0-9-]{0,8}", prop_oneof![
                    "[ -~]{0,20}".prop_map(Node::Str),
                    any::<i32>().prop_map(|i| Node::Int(i.into())),
                    prop::collection::vec("[A-Za-z0-9+/=]{0,30}".prop_map(Node::Str), 0..4)
                        .prop_map(Node::Seq),
                ]),
                1..6,
            )
        ) {
            let mut seen = HashSet::new();
            let entries: Vec<_> = entries.into_iter().filter(|(k, _)| seen.insert(k.clone()))
                .filter(|(k, _)| is_plain_word(k)).collect();
            prop_assume!(!entries.is_empty());
            let node = Node::Map(entries);
            let text = String::from_utf8(emit(&node)).unwrap();
            let escaped = text.contains('\\');
            let read = fast(&text);
            prop_assert!(read.is_some() || escaped, "{text:?}");
            if let Some(read) = read {
                prop_assert_eq!(read, node);
            }
        }

        /// Damaged documents: whenever the fast reader still answers, the general parser
        /// answers the same tree.
        #[test]
        fn agrees_with_the_general_parser_on_damaged_documents(
            node in document(),
            edits in prop::collection::vec((any::<prop::sample::Index>(), 0..3u8,
                prop::sample::select(TRICKY)), 1..4),
            max_depth in 1usize..6,
            max_events in 4usize..60,
            max_scalar_len in 0usize..8,
        ) {
            let mut bytes = emit(&node);
            for (at, op, byte) in edits {
                let i = at.index(bytes.len() + 1);
                match op {
                    0 => bytes.insert(i, byte),
                    1 if i < bytes.len() => { bytes.remove(i); }
                    _ if i < bytes.len() => bytes[i] = byte,
                    _ => bytes.push(byte),
                }
            }
            let Ok(text) = String::from_utf8(bytes) else { return Ok(()); };
            let tight = Limits { max_depth, max_events, max_scalar_len, ..Limits::default() };
            for limits in [Limits::default(), tight] {
                if let Some(fast) = parse(&text, &limits) {
                    prop_assert_eq!(Some(fast), general(&text, &limits), "{:?}", text);
                }
            }
        }
    }
}
