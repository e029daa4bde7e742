//! The typed layer between [`Node`] trees and protocol structs.
//!
//! Every protocol type implements [`WireValue`]. Structs are declared with
//! [`wire_struct!`](crate::wire_struct), which generates a strict decoder
//! (unknown fields refused first, then each field in declaration order, so
//! the first error reported is deterministic) and an encoder that writes the
//! fields in declaration order.

use crate::error::{DecodeError, FieldPath, Section, clip};
use crate::yaml::Node;

/// Conversion between a protocol type and a [`Node`].
pub(crate) trait WireValue: Sized {
    fn decode(node: Node, path: &Path<'_>) -> Result<Self, DecodeError>;
    fn encode(&self) -> Node;
}

/// Where a node sits, as a chain of borrowed segments: building a path costs
/// nothing; it is rendered only when an error is reported.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Path<'a> {
    parent: Option<&'a Path<'a>>,
    segment: Segment<'a>,
}

#[derive(Clone, Copy, Debug)]
enum Segment<'a> {
    Root,
    Key(&'a str),
    Index(usize),
}

impl<'a> Path<'a> {
    pub(crate) const ROOT: Path<'static> = Path {
        parent: None,
        segment: Segment::Root,
    };

    pub(crate) fn key(&'a self, key: &'a str) -> Path<'a> {
        Path {
            parent: Some(self),
            segment: Segment::Key(key),
        }
    }

    pub(crate) fn index(&'a self, index: usize) -> Path<'a> {
        Path {
            parent: Some(self),
            segment: Segment::Index(index),
        }
    }

    pub(crate) fn render(&self) -> FieldPath {
        let mut segments = Vec::new();
        let mut cursor = Some(self);
        while let Some(path) = cursor {
            segments.push(path.segment);
            cursor = path.parent;
        }
        segments.reverse();
        let mut text = String::new();
        let mut section = Section::Envelope;
        let mut first = true;
        for segment in segments {
            match segment {
                Segment::Root => {}
                Segment::Key(key) => {
                    if first {
                        section = match key {
                            "Args" => Section::Args,
                            "Data" => Section::Data,
                            "Error" => Section::Error,
                            _ => Section::Envelope,
                        };
                    } else {
                        text.push('.');
                    }
                    text.push_str(&clip(key));
                    first = false;
                }
                Segment::Index(index) => {
                    text.push_str(&format!("[{index}]"));
                    first = false;
                }
            }
        }
        FieldPath::new(section, text)
    }
}

pub(crate) fn wrong_type(path: &Path<'_>, expected: &'static str) -> DecodeError {
    DecodeError::WrongType {
        field: path.render(),
        expected,
    }
}

pub(crate) fn bad_value(path: &Path<'_>, reason: &'static str) -> DecodeError {
    DecodeError::BadValue {
        field: path.render(),
        reason,
    }
}

// ---------------------------------------------------------------------------
// Primitive impls

impl WireValue for String {
    fn decode(node: Node, path: &Path<'_>) -> Result<Self, DecodeError> {
        match node {
            Node::Str(s) => Ok(s),
            _ => Err(wrong_type(path, "string")),
        }
    }
    fn encode(&self) -> Node {
        Node::Str(self.clone())
    }
}

impl WireValue for bool {
    fn decode(node: Node, path: &Path<'_>) -> Result<Self, DecodeError> {
        match node {
            Node::Bool(b) => Ok(b),
            _ => Err(wrong_type(path, "boolean")),
        }
    }
    fn encode(&self) -> Node {
        Node::Bool(*self)
    }
}

macro_rules! unsigned {
    ($ty:ty, $expected:literal) => {
        impl WireValue for $ty {
            fn decode(node: Node, path: &Path<'_>) -> Result<Self, DecodeError> {
                match node {
                    Node::Int(i) => <$ty>::try_from(i)
                        .map_err(|_| bad_value(path, concat!("out of range for ", $expected))),
                    _ => Err(wrong_type(path, $expected)),
                }
            }
            fn encode(&self) -> Node {
                Node::Int(i128::from(*self))
            }
        }
    };
}

unsigned!(u32, "u32");
unsigned!(u64, "u64");

impl<T: WireValue> WireValue for Vec<T> {
    fn decode(node: Node, path: &Path<'_>) -> Result<Self, DecodeError> {
        match node {
            Node::Seq(items) => items
                .into_iter()
                .enumerate()
                .map(|(i, item)| T::decode(item, &path.index(i)))
                .collect(),
            _ => Err(wrong_type(path, "sequence")),
        }
    }
    fn encode(&self) -> Node {
        Node::Seq(self.iter().map(WireValue::encode).collect())
    }
}

/// `null` is `None`. (An absent field is handled by [`Fields::optional`].)
impl<T: WireValue> WireValue for Option<T> {
    fn decode(node: Node, path: &Path<'_>) -> Result<Self, DecodeError> {
        match node {
            Node::Null => Ok(None),
            node => T::decode(node, path).map(Some),
        }
    }
    fn encode(&self) -> Node {
        match self {
            Some(value) => value.encode(),
            None => Node::Null,
        }
    }
}

// ---------------------------------------------------------------------------
// Mappings

/// The entries of one mapping being decoded into a struct.
pub(crate) struct Fields<'p> {
    entries: Vec<(String, Node)>,
    path: &'p Path<'p>,
}

impl<'p> Fields<'p> {
    /// `node` must be a mapping; with `null_is_empty`, `null` is read as `{}`.
    pub(crate) fn new(
        node: Node,
        path: &'p Path<'p>,
        null_is_empty: bool,
    ) -> Result<Self, DecodeError> {
        match node {
            Node::Map(entries) => Ok(Self { entries, path }),
            Node::Null if null_is_empty => Ok(Self {
                entries: Vec::new(),
                path,
            }),
            _ => Err(wrong_type(path, "mapping")),
        }
    }

    /// Refuse the first key (in document order) that is not in `known`.
    pub(crate) fn deny_unknown(&self, known: &[&str]) -> Result<(), DecodeError> {
        match self
            .entries
            .iter()
            .find(|(key, _)| !known.contains(&key.as_str()))
        {
            Some((key, _)) => Err(DecodeError::UnknownField(self.path.key(key).render())),
            None => Ok(()),
        }
    }

    pub(crate) fn take(&mut self, key: &str) -> Option<Node> {
        let at = self.entries.iter().position(|(k, _)| k == key)?;
        Some(self.entries.swap_remove(at).1)
    }

    pub(crate) fn required<T: WireValue>(&mut self, key: &str) -> Result<T, DecodeError> {
        let path = self.path.key(key);
        match self.take(key) {
            Some(node) => T::decode(node, &path),
            None => Err(DecodeError::MissingField(path.render())),
        }
    }

    /// Absent and `null` are both `None`.
    pub(crate) fn optional<T: WireValue>(&mut self, key: &str) -> Result<Option<T>, DecodeError> {
        match self.take(key) {
            Some(node) => Option::<T>::decode(node, &self.path.key(key)),
            None => Ok(None),
        }
    }
}

/// Builds a mapping node in field order.
#[derive(Default)]
pub(crate) struct MapBuilder(Vec<(String, Node)>);

impl MapBuilder {
    pub(crate) fn field<T: WireValue>(&mut self, key: &str, value: &T) {
        self.0.push((key.to_owned(), value.encode()));
    }

    /// Omitted when `None`.
    pub(crate) fn optional<T: WireValue>(&mut self, key: &str, value: &Option<T>) {
        if let Some(value) = value {
            self.field(key, value);
        }
    }

    pub(crate) fn node(&mut self, key: &str, node: Node) {
        self.0.push((key.to_owned(), node));
    }

    pub(crate) fn finish(self) -> Node {
        Node::Map(self.0)
    }
}

/// Declare a protocol struct, its wire field names and its codec.
///
/// Field modes: `req` (required), `opt` (optional: absent or `null` decode
/// to `None`; omitted when `None`), `null` (nullable: absent or `null`
/// decode to `None`; written as `null` when `None`). An optional
/// `validate(value, path) { ... }` block checks cross-field rules after the
/// fields decoded.
macro_rules! wire_struct {
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            $(
                $(#[$fmeta:meta])*
                $mode:ident $key:literal $field:ident : $ty:ty,
            )*
        }
        $( validate($this:ident, $vpath:ident) $check:block )?
    ) => {
        $(#[$meta])*
        #[derive(Clone, Debug, PartialEq, Eq)]
        pub struct $name {
            $(
                $(#[$fmeta])*
                #[doc = concat!("\n\nWire key: `", $key, "`.")]
                pub $field: $ty,
            )*
        }

        impl $name {
            /// Wire keys, in encoding order.
            #[allow(dead_code)]
            pub(crate) const KEYS: &'static [&'static str] = &[$($key),*];
        }

        impl $crate::codec::WireValue for $name {
            #[allow(unused_mut)]
            fn decode(
                node: $crate::yaml::Node,
                path: &$crate::codec::Path<'_>,
            ) -> Result<Self, $crate::error::DecodeError> {
                let mut fields = $crate::codec::Fields::new(node, path, false)?;
                fields.deny_unknown(Self::KEYS)?;
                let value = Self {
                    $( $field: $crate::codec::wire_struct!(@take $mode fields $key), )*
                };
                $(
                    {
                        let $this = &value;
                        let $vpath = path;
                        let checked: Result<(), $crate::error::DecodeError> = $check;
                        checked?;
                    }
                )?
                Ok(value)
            }

            #[allow(unused_mut)]
            fn encode(&self) -> $crate::yaml::Node {
                let mut map = $crate::codec::MapBuilder::default();
                $( $crate::codec::wire_struct!(@put $mode map $key &self.$field); )*
                map.finish()
            }
        }
    };
    (@take req $fields:ident $key:literal) => { $fields.required($key)? };
    (@take opt $fields:ident $key:literal) => { $fields.optional($key)? };
    (@take null $fields:ident $key:literal) => { $fields.optional($key)? };
    (@put req $map:ident $key:literal $value:expr) => { $map.field($key, $value) };
    (@put opt $map:ident $key:literal $value:expr) => { $map.optional($key, $value) };
    (@put null $map:ident $key:literal $value:expr) => { $map.field($key, $value) };
}

/// Declare a closed set of string values (an upper-case protocol enum).
macro_rules! wire_enum {
    (
        $(#[$meta:meta])*
        pub enum $name:ident {
            $( $(#[$vmeta:meta])* $variant:ident = $text:literal, )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum $name {
            $(
                $(#[$vmeta])*
                #[doc = concat!("\n\nOn the wire: `", $text, "`.")]
                $variant,
            )*
        }

        impl $name {
            /// Every value.
            pub const ALL: &'static [$name] = &[$( $name::$variant, )*];

            /// The wire spelling.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $( $name::$variant => $text, )*
                }
            }
        }

        impl ::std::str::FromStr for $name {
            type Err = $crate::value::ValueError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $( $text => Ok($name::$variant), )*
                    _ => Err($crate::value::ValueError(
                        concat!("not one of:" $(, " ", $text)*),
                    )),
                }
            }
        }

        impl ::std::fmt::Display for $name {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl $crate::codec::WireValue for $name {
            fn decode(
                node: $crate::yaml::Node,
                path: &$crate::codec::Path<'_>,
            ) -> Result<Self, $crate::error::DecodeError> {
                match node {
                    $crate::yaml::Node::Str(s) => s
                        .parse()
                        .map_err(|$crate::value::ValueError(reason)| {
                            $crate::codec::bad_value(path, reason)
                        }),
                    _ => Err($crate::codec::wrong_type(path, "string")),
                }
            }
            fn encode(&self) -> $crate::yaml::Node {
                $crate::yaml::Node::Str(self.as_str().to_owned())
            }
        }
    };
}

pub(crate) use {wire_enum, wire_struct};
