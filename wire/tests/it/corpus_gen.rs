//! The generator of the malformed-input corpus.
//!
//! Each case is a complete raw input (u32be length prefix included, so
//! framing errors are covered too) and the error it must produce: the
//! `DecodeError::kind()` name and the wire `ErrorCode`. The expectations are
//! written here from the protocol rules, not recorded from the decoder.
//!
//! Regenerate the committed files after changing this file with
//! `MICROMSG_REGENERATE_CORPUS=1 cargo test -p micromsg-wire --test it corpus_files_match`;
//! `corpus_files_match_the_generator` fails until you do.

use micromsg_wire::message::request::{SEALED_ADDRESS_MAX, SEALED_ADDRESS_MIN};
use micromsg_wire::{Blob, ErrorCode};

/// One malformed input.
pub(crate) struct Case {
    /// File name under `tests/corpus/malformed/`.
    pub(crate) name: String,
    /// The raw input.
    pub(crate) bytes: Vec<u8>,
    /// Expected `DecodeError::kind()`.
    pub(crate) kind: &'static str,
    /// Expected `DecodeError::error_code()`.
    pub(crate) code: ErrorCode,
}

use ErrorCode::{BadArgs, BadFrame, BadYaml, FrameTooLarge, UnknownRequest};

const HEX16: &str = "00112233445566778899aabbccddeeff";
const HEX32: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
const HEX64: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff\
                     00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

fn frame(body: &[u8]) -> Vec<u8> {
    let mut out = (body.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(body);
    out
}

struct Cases(Vec<Case>);

impl Cases {
    fn raw(
        &mut self,
        name: impl Into<String>,
        bytes: Vec<u8>,
        kind: &'static str,
        code: ErrorCode,
    ) {
        let name = format!("{}.bin", name.into());
        assert!(
            !self.0.iter().any(|c| c.name == name),
            "duplicate corpus name {name}"
        );
        self.0.push(Case {
            name,
            bytes,
            kind,
            code,
        });
    }

    /// A well-framed body.
    fn body(
        &mut self,
        name: impl Into<String>,
        body: impl AsRef<[u8]>,
        kind: &'static str,
        code: ErrorCode,
    ) {
        self.raw(name, frame(body.as_ref()), kind, code);
    }
}

/// Field types of the request table, with valid, wrongly typed and invalid
/// spellings.
#[derive(Clone, Copy)]
enum Ty {
    Number,
    Hex16,
    Hex32,
    Hex64,
    Device,
    Bool,
    U64,
    Text,
    Blob,
    Address,
    DeviceName,
    Hex16List,
    Limit,
}

impl Ty {
    fn valid(self) -> String {
        match self {
            Ty::Number => "\"5550001234\"".into(),
            Ty::Hex16 => format!("\"{HEX16}\""),
            Ty::Hex32 => format!("\"{HEX32}\""),
            Ty::Hex64 => format!("\"{HEX64}\""),
            Ty::Device => "1".into(),
            Ty::Bool => "true".into(),
            Ty::U64 => "5".into(),
            Ty::Text => "\"token\"".into(),
            Ty::Blob => "\"aGk=\"".into(),
            Ty::Address => "\"127.0.0.1:7000\"".into(),
            Ty::DeviceName => "\"phone\"".into(),
            Ty::Hex16List => format!("[\"{HEX16}\"]"),
            Ty::Limit => "10".into(),
        }
    }

    /// (label, YAML) of values of another YAML type: `WrongType`.
    fn wrong_types(self) -> Vec<(&'static str, String)> {
        let v = |l: &'static str, y: &str| (l, y.to_owned());
        match self {
            Ty::Number => vec![v("int", "5550001234"), v("seq", "[\"5550001234\"]")],
            Ty::Hex16 | Ty::Hex32 | Ty::Hex64 => vec![v("int", "12"), v("map", "{}")],
            Ty::Device => vec![v("string", "\"1\""), v("float", "1.5"), v("bool", "true")],
            Ty::Bool => vec![v("string", "\"true\""), v("yes", "yes"), v("int", "1")],
            Ty::U64 | Ty::Limit => vec![v("string", "\"5\""), v("float", "5.5"), v("seq", "[5]")],
            Ty::Text | Ty::DeviceName => vec![v("int", "12"), v("seq", "[x]"), v("bool", "false")],
            Ty::Blob => vec![v("int", "12"), v("map", "{a: b}")],
            Ty::Address => vec![v("int", "7000"), v("seq", "[a]")],
            Ty::Hex16List => vec![v("string", "\"x\""), v("map", "{}"), v("item-int", "[12]")],
        }
    }

    /// (label, YAML) of well-typed but invalid values: `BadValue`.
    fn bad_values(self) -> Vec<(&'static str, String)> {
        let v = |l: &'static str, y: String| (l, y);
        match self {
            Ty::Number => vec![
                v("letters", "\"555000123a\"".into()),
                v("too-short", "\"123\"".into()),
                v("too-long", "\"1234567890123456\"".into()),
                v("empty", "\"\"".into()),
                v("plus", "\"+5550001234\"".into()),
                v("space", "\" 5550001234\"".into()),
                v("fullwidth", "\"５５５０００１２３４\"".into()),
            ],
            Ty::Hex16 | Ty::Hex32 | Ty::Hex64 => {
                let good = match self {
                    Ty::Hex16 => HEX16,
                    Ty::Hex32 => HEX32,
                    _ => HEX64,
                };
                vec![
                    v("short", format!("\"{}\"", &good[1..])),
                    v("long", format!("\"{good}0\"")),
                    v("upper", format!("\"{}\"", good.to_uppercase())),
                    v("nonhex", format!("\"g{}\"", &good[1..])),
                    v("0x", format!("\"0x{}\"", &good[2..])),
                    v("empty", "\"\"".into()),
                ]
            }
            Ty::Device => vec![
                v("zero", "0".into()),
                v("negative", "-1".into()),
                v("overflow", "4294967296".into()),
            ],
            Ty::U64 => vec![v("negative", "-1".into())],
            Ty::Limit => vec![
                v("zero", "0".into()),
                v("over-max", "1001".into()),
                v("negative", "-1".into()),
                v("overflow", "4294967296".into()),
            ],
            Ty::Bool | Ty::Text => vec![],
            Ty::Blob => vec![
                v("unpadded", "\"aGk\"".into()),
                v("space", "\"aG k=\"".into()),
                v("alphabet", "\"!!!!\"".into()),
                v("noncanonical", "\"aGl=\"".into()),
                v("urlsafe", "\"-_-_\"".into()),
                v("newline", "\"aGk=\\n\"".into()),
            ],
            Ty::Address => vec![
                v("no-port", "\"host\"".into()),
                v("port-zero", "\"host:0\"".into()),
                v("port-big", "\"host:65536\"".into()),
                v("bad-ipv6", "\"[::1:80\"".into()),
                v("bare-ipv6", "\"::1:80\"".into()),
                v("space", "\"a b:80\"".into()),
                v("too-long", format!("\"{}:1\"", "a".repeat(260))),
            ],
            Ty::DeviceName => vec![v("too-long", format!("\"{}\"", "n".repeat(65)))],
            Ty::Hex16List => vec![
                v("item-upper", format!("[\"{}\"]", HEX16.to_uppercase())),
                v(
                    "too-many",
                    format!("[{}]", vec![format!("\"{HEX16}\""); 1001].join(",")),
                ),
            ],
        }
    }
}

struct Field {
    key: &'static str,
    ty: Ty,
    required: bool,
}

const fn req(key: &'static str, ty: Ty) -> Field {
    Field {
        key,
        ty,
        required: true,
    }
}

const fn opt(key: &'static str, ty: Ty) -> Field {
    Field {
        key,
        ty,
        required: false,
    }
}

/// Every request with arguments.
fn request_table() -> Vec<(&'static str, Vec<Field>)> {
    vec![
        (
            "REGISTER",
            vec![opt("TOKEN", Ty::Text), req("SERVER-SECRET", Ty::Hex32)],
        ),
        (
            "DEVICE-JOIN",
            vec![
                req("ENTITY", Ty::Number),
                req("SECRET", Ty::Hex32),
                req("SERVER-SECRET", Ty::Hex32),
            ],
        ),
        (
            "LOGIN",
            vec![
                req("ENTITY", Ty::Number),
                req("DEVICE", Ty::Device),
                req("SECRET", Ty::Hex32),
            ],
        ),
        ("ADD-DEVICE", vec![opt("NAME", Ty::DeviceName)]),
        ("DEVICE-REVOKE", vec![req("DEVICE", Ty::Device)]),
        ("IS-NETWORKED", vec![req("TARGET", Ty::Number)]),
        (
            "INITIATE-NEW",
            vec![req("TARGET", Ty::Number), opt("ADDRESS", Ty::Address)],
        ),
        ("INITIATE-EXISTING", vec![req("TARGET", Ty::Number)]),
        (
            "INITIATE-NEW-NETWORKED",
            vec![req("TARGET", Ty::Number), req("PUBKEY", Ty::Hex32)],
        ),
        (
            "INITIATE-EXISTING-NETWORKED",
            vec![req("TARGET", Ty::Number), req("PUBKEY", Ty::Hex32)],
        ),
        // All five fields together are no valid answer, but each field's own error is
        // reported before the combination is judged (see `contact_answer_shape_cases`).
        (
            "CONTACT-ANSWER",
            vec![
                req("REQUEST", Ty::Hex16),
                req("ACCEPT", Ty::Bool),
                opt("ADDRESS", Ty::Address),
                opt("PUBKEY", Ty::Hex32),
                opt("SEALED-ADDRESS", Ty::Blob),
            ],
        ),
        ("CONTACT-POLICY", vec![req("AUTO-EXISTING", Ty::Bool)]),
        ("BLOCK", vec![req("TARGET", Ty::Number)]),
        ("UNBLOCK", vec![req("TARGET", Ty::Number)]),
        (
            "DEPOSIT",
            vec![
                req("TARGET", Ty::Number),
                req("ID", Ty::Hex16),
                req("BODY", Ty::Blob),
            ],
        ),
        (
            "INBOX-FETCH",
            vec![opt("LIMIT", Ty::Limit), opt("AFTER", Ty::Hex16)],
        ),
        ("INBOX-ACK", vec![req("IDS", Ty::Hex16List)]),
        (
            "BACKUP-PUT",
            vec![req("BLOB", Ty::Blob), req("VERSION", Ty::U64)],
        ),
        (
            "SYNC-COPY",
            vec![
                req("ID", Ty::Hex16),
                req("BODY", Ty::Blob),
                req("PEER", Ty::Number),
            ],
        ),
        (
            "PORT-OUT",
            vec![req("TO", Ty::Text), req("IDENTITY-KEY", Ty::Hex32)],
        ),
        (
            "PORT-IN",
            vec![
                req("NUMBER", Ty::Number),
                req("FROM", Ty::Text),
                req("TOKEN", Ty::Hex32),
                req("IDENTITY-KEY", Ty::Hex32),
                req("TIME", Ty::U64),
                req("SIGNATURE", Ty::Hex64),
                req("SERVER-SECRET", Ty::Hex32),
            ],
        ),
        ("ACCOUNT-DELETE", vec![req("CONFIRM", Ty::Number)]),
        (
            "FORWARD",
            vec![req("NOTICE", Ty::Blob), req("DAYS", Ty::U64)],
        ),
    ]
}

/// A request with block-style `Args` from `(key, value)` pairs.
fn request(name: &str, args: &[(String, String)]) -> String {
    let mut text = format!("Request: {name}\nId: 1\n");
    if !args.is_empty() {
        text.push_str("Args:\n");
        for (key, value) in args {
            text.push_str(&format!("  {key}: {value}\n"));
        }
    }
    text
}

fn slug(s: &str) -> String {
    s.to_ascii_lowercase()
}

/// Per-request field errors: missing, unknown, wrongly typed, bad values.
fn args_cases(cases: &mut Cases) {
    for (name, fields) in request_table() {
        let valid: Vec<(String, String)> = fields
            .iter()
            .map(|f| (f.key.to_owned(), f.ty.valid()))
            .collect();
        let with = |key: &str, value: &str| -> String {
            let args: Vec<_> = valid
                .iter()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        if k == key {
                            value.to_owned()
                        } else {
                            v.clone()
                        },
                    )
                })
                .collect();
            request(name, &args)
        };
        let n = slug(name);

        let mut extra = valid.clone();
        extra.push(("EXTRA".into(), "1".into()));
        cases.body(
            format!("args-{n}-unknown-field"),
            request(name, &extra),
            "UnknownField",
            BadArgs,
        );
        let mut lower = valid.clone();
        lower[0].0 = fields[0].key.to_ascii_lowercase();
        cases.body(
            format!("args-{n}-lowercase-key"),
            request(name, &lower),
            "UnknownField",
            BadArgs,
        );

        for field in &fields {
            let k = slug(field.key);
            if field.required {
                let without: Vec<_> = valid
                    .iter()
                    .filter(|(key, _)| key != field.key)
                    .cloned()
                    .collect();
                cases.body(
                    format!("args-{n}-missing-{k}"),
                    request(name, &without),
                    "MissingField",
                    BadArgs,
                );
                cases.body(
                    format!("args-{n}-null-{k}"),
                    with(field.key, "null"),
                    "WrongType",
                    BadArgs,
                );
            }
            for (label, value) in field.ty.wrong_types() {
                cases.body(
                    format!("args-{n}-{k}-type-{label}"),
                    with(field.key, &value),
                    "WrongType",
                    BadArgs,
                );
            }
            for (label, value) in field.ty.bad_values() {
                cases.body(
                    format!("args-{n}-{k}-bad-{label}"),
                    with(field.key, &value),
                    "BadValue",
                    BadArgs,
                );
            }
        }
    }

    // Args itself of the wrong type, and args given to requests without any.
    for (label, args) in [
        ("seq", "[1]"),
        ("string", "\"x\""),
        ("int", "1"),
        ("bool", "true"),
    ] {
        cases.body(
            format!("args-login-args-{label}"),
            format!("Request: LOGIN\nId: 1\nArgs: {args}\n"),
            "WrongType",
            BadArgs,
        );
    }
    for name in [
        "BROKER-INFO",
        "PING",
        "LOGOUT",
        "DEVICE-LIST",
        "BLOCK-LIST",
        "BACKUP-GET",
    ] {
        cases.body(
            format!("args-{}-unexpected-arg", slug(name)),
            format!("Request: {name}\nId: 1\nArgs: {{TARGET: \"5550001234\"}}\n"),
            "UnknownField",
            BadArgs,
        );
    }
    // A login with no Args at all: the first required field is missing.
    cases.body(
        "args-login-no-args",
        "Request: LOGIN\nId: 1\n",
        "MissingField",
        BadArgs,
    );
    // Cross-field rule.
    cases.body(
        "args-contact-answer-accept-without-address",
        format!("Request: CONTACT-ANSWER\nId: 1\nArgs:\n  REQUEST: \"{HEX16}\"\n  ACCEPT: true\n"),
        "BadValue",
        BadArgs,
    );
    contact_answer_shape_cases(cases);
    cases.body(
        "args-duplicate-key",
        "Request: BLOCK\nId: 1\nArgs:\n  TARGET: \"5550001234\"\n  TARGET: \"5550001235\"\n",
        "DuplicateKey",
        BadYaml,
    );
}

/// CONTACT-ANSWER's combinations that are none of its three shapes (decline with nothing,
/// accept with ADDRESS, accept with PUBKEY and SEALED-ADDRESS; protocol.md 6.15), and
/// SEALED-ADDRESS lengths outside 41..=295 bytes. Every field on its own is valid.
fn contact_answer_shape_cases(cases: &mut Cases) {
    let sealed = |len: usize| format!("\"{}\"", Blob::new(vec![0xa5; len]).to_base64());
    let address = Ty::Address.valid();
    let pubkey = Ty::Hex32.valid();
    let good_sealed = sealed(SEALED_ADDRESS_MIN);
    // (label, ACCEPT, the other fields, expected kind)
    type Shape = (
        &'static str,
        &'static str,
        Vec<(&'static str, String)>,
        &'static str,
    );
    let list: Vec<Shape> = vec![
        (
            "decline-with-address",
            "false",
            vec![("ADDRESS", address.clone())],
            "BadValue",
        ),
        (
            "decline-with-pubkey",
            "false",
            vec![("PUBKEY", pubkey.clone())],
            "BadValue",
        ),
        (
            "decline-with-sealed-address",
            "false",
            vec![("SEALED-ADDRESS", good_sealed.clone())],
            "BadValue",
        ),
        (
            "decline-with-networked-fields",
            "false",
            vec![
                ("PUBKEY", pubkey.clone()),
                ("SEALED-ADDRESS", good_sealed.clone()),
            ],
            "BadValue",
        ),
        (
            "decline-with-all-fields",
            "false",
            vec![
                ("ADDRESS", address.clone()),
                ("PUBKEY", pubkey.clone()),
                ("SEALED-ADDRESS", good_sealed.clone()),
            ],
            "BadValue",
        ),
        (
            "accept-address-and-pubkey",
            "true",
            vec![("ADDRESS", address.clone()), ("PUBKEY", pubkey.clone())],
            "BadValue",
        ),
        (
            "accept-address-and-sealed-address",
            "true",
            vec![
                ("ADDRESS", address.clone()),
                ("SEALED-ADDRESS", good_sealed.clone()),
            ],
            "BadValue",
        ),
        (
            "accept-address-and-networked-fields",
            "true",
            vec![
                ("ADDRESS", address.clone()),
                ("PUBKEY", pubkey.clone()),
                ("SEALED-ADDRESS", good_sealed.clone()),
            ],
            "BadValue",
        ),
        (
            "accept-pubkey-without-sealed-address",
            "true",
            vec![("PUBKEY", pubkey.clone())],
            "MissingField",
        ),
        (
            "accept-sealed-address-without-pubkey",
            "true",
            vec![("SEALED-ADDRESS", good_sealed.clone())],
            "MissingField",
        ),
        (
            "accept-sealed-address-empty",
            "true",
            vec![("PUBKEY", pubkey.clone()), ("SEALED-ADDRESS", sealed(0))],
            "BadValue",
        ),
        (
            "accept-sealed-address-too-short",
            "true",
            vec![
                ("PUBKEY", pubkey.clone()),
                ("SEALED-ADDRESS", sealed(SEALED_ADDRESS_MIN - 1)),
            ],
            "BadValue",
        ),
        (
            "accept-sealed-address-too-long",
            "true",
            vec![
                ("PUBKEY", pubkey.clone()),
                ("SEALED-ADDRESS", sealed(SEALED_ADDRESS_MAX + 1)),
            ],
            "BadValue",
        ),
    ];
    for (label, accept, fields, kind) in list {
        let mut args = vec![
            ("REQUEST".to_owned(), Ty::Hex16.valid()),
            ("ACCEPT".to_owned(), accept.to_owned()),
        ];
        args.extend(fields.into_iter().map(|(k, v)| (k.to_owned(), v)));
        cases.body(
            format!("args-contact-answer-{label}"),
            request("CONTACT-ANSWER", &args),
            kind,
            BadArgs,
        );
    }
}

fn framing_cases(cases: &mut Cases) {
    let ping = frame(b"Request: PING\nId: 1\n");
    for cut in 0..4 {
        cases.raw(
            format!("frame-truncated-prefix-{cut}"),
            ping[..cut].to_vec(),
            "Truncated",
            BadFrame,
        );
    }
    for cut in [4, 5, 10, ping.len() - 1] {
        cases.raw(
            format!("frame-truncated-body-{cut}"),
            ping[..cut].to_vec(),
            "Truncated",
            BadFrame,
        );
    }
    let mut short = 100u32.to_be_bytes().to_vec();
    short.extend_from_slice(&[b'x'; 99]);
    cases.raw("frame-truncated-one-short", short, "Truncated", BadFrame);

    cases.raw(
        "frame-zero-length",
        vec![0, 0, 0, 0],
        "EmptyFrame",
        BadFrame,
    );
    cases.raw(
        "frame-zero-length-then-data",
        b"\0\0\0\0Request: PING\n".to_vec(),
        "EmptyFrame",
        BadFrame,
    );

    for (label, len) in [
        ("max-plus-one", 65_537u32),
        ("1mib", 1 << 20),
        ("i32-max", i32::MAX as u32),
        ("u32-max", u32::MAX),
    ] {
        cases.raw(
            format!("frame-oversize-{label}-prefix-only"),
            len.to_be_bytes().to_vec(),
            "FrameTooLarge",
            FrameTooLarge,
        );
    }
    // Oversize with (part of) a body present: still refused on the prefix.
    let mut partial = 65_537u32.to_be_bytes().to_vec();
    partial.extend_from_slice(b"Request: PING\nId: 1\n");
    cases.raw(
        "frame-oversize-with-partial-body",
        partial,
        "FrameTooLarge",
        FrameTooLarge,
    );
    let mut full = 65_537u32.to_be_bytes().to_vec();
    full.extend_from_slice(b"Request: PING\nId: 1\n#");
    full.resize(4 + 65_537, b'x');
    cases.raw(
        "frame-oversize-with-full-body",
        full,
        "FrameTooLarge",
        FrameTooLarge,
    );
    // Little-endian length by mistake.
    let mut le = (20u32).to_le_bytes().to_vec();
    le.extend_from_slice(b"Request: PING\nId: 1\n");
    cases.raw(
        "frame-little-endian-length",
        le,
        "FrameTooLarge",
        FrameTooLarge,
    );

    let mut trailing = ping.clone();
    trailing.push(b'\n');
    cases.raw("frame-trailing-byte", trailing, "TrailingBytes", BadFrame);
    let mut two = ping.clone();
    two.extend_from_slice(&ping);
    cases.raw("frame-two-frames", two, "TrailingBytes", BadFrame);
    // No length prefix at all: the text itself is read as a huge length.
    cases.raw(
        "frame-missing-prefix",
        b"Request: PING\nId: 1\n".to_vec(),
        "FrameTooLarge",
        FrameTooLarge,
    );
}

fn encoding_cases(cases: &mut Cases) {
    let invalid: [(&str, &[u8]); 10] = [
        ("ff", b"Request: PING\nId: 1\n\xff"),
        ("lone-continuation", b"Request: \x80PING\nId: 1\n"),
        ("overlong-slash", b"Request: \xc0\xafPING\nId: 1\n"),
        ("truncated-two-byte", b"Request: PING\xc3"),
        ("truncated-three-byte", b"Request: PING\nId: 1\n# \xe2\x82"),
        ("surrogate", b"Request: \xed\xa0\x80\nId: 1\n"),
        ("above-max", b"Request: \xf4\x90\x80\x80\nId: 1\n"),
        ("f5", b"Request: \xf5\nId: 1\n"),
        ("utf16le-bom", b"\xff\xfeR\0e\0q\0"),
        (
            "latin1",
            b"Request: PING\nArgs: {NAME: \"caf\xe9\"}\nId: 1\n",
        ),
    ];
    for (label, body) in invalid {
        cases.body(format!("utf8-{label}"), body, "NotUtf8", BadYaml);
    }
}

fn syntax_cases(cases: &mut Cases) {
    let bad: [(&str, &str); 14] = [
        ("unclosed-double-quote", "Request: \"PING\nId: 1\n"),
        ("unclosed-single-quote", "Request: 'PING\nId: 1\n"),
        (
            "unclosed-flow-seq",
            "Request: PING\nId: 1\nArgs: {IDS: [\"a\"}\n",
        ),
        ("unclosed-flow-map", "{Request: PING, Id: 1\n"),
        ("misplaced-bracket", "]\n"),
        ("bad-escape", "Request: \"PI\\qNG\"\nId: 1\n"),
        ("mapping-in-plain", "Request: : PING\nId: 1\n"),
        ("bad-indentation", "Request: PING\n  Id: 1\n"),
        (
            "tab-indentation",
            "Request: BLOCK\nId: 1\nArgs:\n\tTARGET: \"5550001234\"\n",
        ),
        ("nul-character", "Request: PING\0\nId: 1\n"),
        (
            "bom-inside-document",
            "Request: PING\nId: 1\n\u{feff}X: 1\n",
        ),
        ("unsupported-tag", "Request: !cmd PING\nId: 1\n"),
        ("set-tag", "Request: PING\nId: 1\nArgs: !!set {a}\n"),
        ("yaml-version-9", "%YAML 9.9\n---\nRequest: PING\nId: 1\n"),
    ];
    for (label, body) in bad {
        cases.body(format!("yaml-{label}"), body, "Yaml", BadYaml);
    }
    cases.body(
        "yaml-null-key",
        "Request: PING\nId: 1\n~: 1\n",
        "Yaml",
        BadYaml,
    );
    cases.body(
        "yaml-key-longer-than-lookahead",
        format!("Request: PING\nId: 1\n{}: 1\n", "K".repeat(2000)),
        "Yaml",
        BadYaml,
    );
}

fn limit_cases(cases: &mut Cases) {
    let deep = 10_000;
    cases.body(
        "depth-flow-seq-10000",
        "[".repeat(deep),
        "LimitExceeded",
        BadYaml,
    );
    cases.body(
        "depth-flow-seq-10000-closed",
        format!("{}{}", "[".repeat(deep), "]".repeat(deep)),
        "LimitExceeded",
        BadYaml,
    );
    cases.body(
        "depth-flow-map-10000",
        "{a: ".repeat(deep),
        "LimitExceeded",
        BadYaml,
    );
    cases.body(
        "depth-flow-map-bare-10000",
        "{".repeat(deep),
        "LimitExceeded",
        BadYaml,
    );
    cases.body(
        "depth-block-seq-10000",
        format!("{}x\n", "- ".repeat(deep)),
        "LimitExceeded",
        BadYaml,
    );
    let mut indented = String::new();
    for level in 0..300 {
        indented.push_str(&" ".repeat(level));
        indented.push_str("a:\n");
    }
    cases.body(
        "depth-block-map-indent-300",
        indented,
        "LimitExceeded",
        BadYaml,
    );
    let mut seq_map = String::new();
    for level in 0..200 {
        seq_map.push_str(&"  ".repeat(level));
        seq_map.push_str("- a:\n");
    }
    cases.body(
        "depth-block-seq-of-maps-200",
        seq_map,
        "LimitExceeded",
        BadYaml,
    );
    cases.body(
        "depth-inside-args-10000",
        format!("Request: LOGIN\nId: 1\nArgs: {}\n", "[".repeat(deep)),
        "LimitExceeded",
        BadYaml,
    );
    cases.body(
        "depth-inside-data-10000",
        format!(
            "Response: PING\nId: 1\nStatus: OK\nData: {}\n",
            "{a: ".repeat(deep)
        ),
        "LimitExceeded",
        BadYaml,
    );
    // The limit is 16 levels: the top mapping plus 15 is accepted by the
    // parser (and then refused as a wrong type), 16 more is refused.
    cases.body(
        "depth-17",
        format!(
            "Request: LOGIN\nId: 1\nArgs: {}{}\n",
            "[".repeat(16),
            "]".repeat(16)
        ),
        "LimitExceeded",
        BadYaml,
    );
    cases.body(
        "depth-16-is-parsed",
        format!(
            "Request: LOGIN\nId: 1\nArgs: {}{}\n",
            "[".repeat(15),
            "]".repeat(15)
        ),
        "WrongType",
        BadArgs,
    );

    // Anchors and aliases are refused outright.
    let laughs = "a: &a [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
";
    cases.body("alias-billion-laughs", laughs, "LimitExceeded", BadYaml);
    cases.body(
        "alias-billion-laughs-in-args",
        "Request: ADD-DEVICE\nId: 1\nArgs:\n  NAME: &a \"lol\"\n  X: [*a,*a,*a,*a,*a,*a,*a,*a,*a]\n",
        "LimitExceeded",
        BadYaml,
    );
    cases.body(
        "alias-quadratic",
        format!(
            "a: &a \"{}\"\nb: [{}]\n",
            "x".repeat(10_000),
            vec!["*a"; 2000].join(",")
        ),
        "LimitExceeded",
        BadYaml,
    );
    cases.body(
        "alias-anchor-only",
        "Request: &r PING\nId: 1\n",
        "LimitExceeded",
        BadYaml,
    );
    cases.body(
        "alias-anchor-on-key",
        "&k Request: PING\nId: 1\n",
        "LimitExceeded",
        BadYaml,
    );
    cases.body(
        "alias-anchor-on-mapping",
        "Request: PING\nId: 1\nArgs: &m {}\n",
        "LimitExceeded",
        BadYaml,
    );
    cases.body(
        "alias-undefined",
        "Request: *r\nId: 1\n",
        "LimitExceeded",
        BadYaml,
    );
    cases.body(
        "alias-merge-key",
        "base: &b {Id: 1}\nRequest: PING\n<<: *b\n",
        "LimitExceeded",
        BadYaml,
    );
    cases.body(
        "alias-self-reference",
        "Request: PING\nId: 1\nArgs: &a [*a]\n",
        "LimitExceeded",
        BadYaml,
    );

    // Events: far more nodes than 4096 in well under 64 KiB.
    cases.body(
        "events-flow-list-5000",
        format!(
            "Request: INBOX-ACK\nId: 1\nArgs: {{IDS: [{}]}}\n",
            vec!["a"; 5000].join(",")
        ),
        "LimitExceeded",
        BadYaml,
    );
    cases.body(
        "events-many-keys",
        (0..2100).map(|i| format!("K{i}: 1\n")).collect::<String>(),
        "LimitExceeded",
        BadYaml,
    );
    cases.body(
        "events-block-list",
        format!(
            "Request: INBOX-ACK\nId: 1\nArgs:\n  IDS:\n{}",
            "  - a\n".repeat(5000)
        ),
        "LimitExceeded",
        BadYaml,
    );
    cases.body(
        "events-empty-maps",
        format!("[{}]", vec!["{}"; 3000].join(",")),
        "LimitExceeded",
        BadYaml,
    );

    // One document only.
    let multi: [(&str, &str); 5] = [
        ("two", "Request: PING\nId: 1\n---\nRequest: PING\nId: 2\n"),
        (
            "end-marker-then-second",
            "Request: PING\nId: 1\n...\nRequest: PING\nId: 2\n",
        ),
        ("empty-documents", "---\n---\n"),
        ("three", "---\nRequest: PING\nId: 1\n---\nx\n---\ny\n"),
        ("second-is-scalar", "Request: PING\nId: 1\n--- x\n"),
    ];
    for (label, body) in multi {
        cases.body(format!("documents-{label}"), body, "LimitExceeded", BadYaml);
    }
}

fn structure_cases(cases: &mut Cases) {
    let not_mapping: [(&str, &str); 10] = [
        ("newline", "\n"),
        ("whitespace", " \n\n  \n"),
        ("comment-only", "# nothing here\n"),
        ("document-marker-only", "---\n"),
        ("plain-scalar", "hello"),
        ("quoted-scalar", "\"Request: PING\""),
        ("integer", "42"),
        ("null", "null"),
        ("flow-seq", "[Request, PING]"),
        ("block-seq", "- Request: PING\n  Id: 1\n"),
    ];
    for (label, body) in not_mapping {
        cases.body(format!("top-{label}"), body, "NotAMapping", BadYaml);
    }
    cases.body(
        "top-huge-plain-scalar",
        "x".repeat(60_000),
        "NotAMapping",
        BadYaml,
    );

    let unknown_kind: [(&str, &str); 6] = [
        ("empty-mapping", "{}"),
        ("lowercase-request", "request: PING\nId: 1\n"),
        ("upper-request", "REQUEST: PING\nId: 1\n"),
        ("command", "Command: PING\nId: 1\n"),
        ("id-only", "Id: 1\n"),
        ("type-field", "Type: Request\nName: PING\nId: 1\n"),
    ];
    for (label, body) in unknown_kind {
        cases.body(format!("kind-{label}"), body, "UnknownKind", BadYaml);
    }

    let dup: [(&str, &str); 5] = [
        ("request", "Request: PING\nRequest: LOGOUT\nId: 1\n"),
        ("id", "Request: PING\nId: 1\nId: 2\n"),
        ("flow", "{Request: PING, Id: 1, Id: 1}"),
        ("data", "Event: INBOX\nData:\n  COUNT: 1\n  COUNT: 2\n"),
        ("quoted-and-plain", "Request: PING\n\"Id\": 1\nId: 1\n"),
    ];
    for (label, body) in dup {
        cases.body(format!("duplicate-{label}"), body, "DuplicateKey", BadYaml);
    }
}

fn envelope_cases(cases: &mut Cases) {
    let request_envelope: [(&str, &str, &str); 16] = [
        ("missing-id", "Request: PING\n", "MissingField"),
        ("id-string", "Request: PING\nId: \"1\"\n", "WrongType"),
        ("id-null", "Request: PING\nId:\n", "WrongType"),
        ("id-float", "Request: PING\nId: 1.5\n", "WrongType"),
        ("id-seq", "Request: PING\nId: [1]\n", "WrongType"),
        ("id-negative", "Request: PING\nId: -1\n", "BadValue"),
        ("id-overflow", "Request: PING\nId: 4294967296\n", "BadValue"),
        ("id-bool", "Request: PING\nId: true\n", "WrongType"),
        ("name-int", "Request: 12\nId: 1\n", "WrongType"),
        ("name-null", "Request:\nId: 1\n", "WrongType"),
        ("name-seq", "Request: [PING]\nId: 1\n", "WrongType"),
        ("name-map", "Request: {PING: 1}\nId: 1\n", "WrongType"),
        (
            "unknown-top-level-key",
            "Request: PING\nId: 1\nColor: blue\n",
            "UnknownField",
        ),
        (
            "request-and-event",
            "Request: PING\nId: 1\nEvent: INBOX\n",
            "UnknownField",
        ),
        (
            "request-and-response",
            "Request: PING\nId: 1\nResponse: PING\n",
            "UnknownField",
        ),
        (
            "data-in-request",
            "Request: PING\nId: 1\nData: {}\n",
            "UnknownField",
        ),
    ];
    for (label, body, kind) in request_envelope {
        cases.body(format!("envelope-request-{label}"), body, kind, BadYaml);
    }

    let response_envelope: [(&str, String, &str); 14] = [
        ("missing-status", "Response: PING\nId: 1\nData: {TIME: 1}\n".into(), "MissingField"),
        ("status-lowercase", "Response: PING\nId: 1\nStatus: ok\nData: {TIME: 1}\n".into(), "BadValue"),
        ("status-int", "Response: PING\nId: 1\nStatus: 1\nData: {TIME: 1}\n".into(), "WrongType"),
        ("ok-missing-data", "Response: PING\nId: 1\nStatus: OK\n".into(), "MissingField"),
        ("ok-with-error", "Response: PING\nId: 1\nStatus: OK\nData: {TIME: 1}\nError: {Code: INTERNAL, Message: x}\n".into(), "BadValue"),
        ("error-with-data", "Response: PING\nId: 1\nStatus: ERROR\nData: {TIME: 1}\nError: {Code: INTERNAL, Message: x}\n".into(), "BadValue"),
        ("error-missing-error", "Response: PING\nId: 1\nStatus: ERROR\n".into(), "MissingField"),
        ("error-name-with-ok", "Response: ERROR\nId: 0\nStatus: OK\nData: {}\n".into(), "BadValue"),
        ("unknown-error-code", "Response: PING\nId: 1\nStatus: ERROR\nError: {Code: NOPE, Message: x}\n".into(), "BadValue"),
        ("error-code-lowercase", "Response: PING\nId: 1\nStatus: ERROR\nError: {Code: bad-args, Message: x}\n".into(), "BadValue"),
        ("error-missing-message", "Response: PING\nId: 1\nStatus: ERROR\nError: {Code: INTERNAL}\n".into(), "MissingField"),
        ("error-retry-negative", "Response: PING\nId: 1\nStatus: ERROR\nError: {Code: LOCKED, Message: x, RetryAfter: -6}\n".into(), "BadValue"),
        ("error-unknown-field", "Response: PING\nId: 1\nStatus: ERROR\nError: {Code: LOCKED, Message: x, Detail: y}\n".into(), "UnknownField"),
        ("missing-id", "Response: PING\nStatus: OK\nData: {TIME: 1}\n".into(), "MissingField"),
    ];
    for (label, body, kind) in response_envelope {
        cases.body(format!("envelope-response-{label}"), body, kind, BadYaml);
    }

    let event_envelope: [(&str, &str, &str); 5] = [
        (
            "with-id",
            "Event: INBOX\nId: 1\nData: {COUNT: 1}\n",
            "UnknownField",
        ),
        ("missing-data", "Event: INBOX\n", "MissingField"),
        ("data-seq", "Event: INBOX\nData: [1]\n", "WrongType"),
        ("data-null", "Event: INBOX\nData:\n", "WrongType"),
        ("name-int", "Event: 1\nData: {COUNT: 1}\n", "WrongType"),
    ];
    for (label, body, kind) in event_envelope {
        cases.body(format!("envelope-event-{label}"), body, kind, BadYaml);
    }
}

fn name_cases(cases: &mut Cases) {
    let requests: [(&str, String); 10] = [
        ("lowercase", "login".into()),
        ("suffix", "LOGINX".into()),
        ("made-up", "FORMAT-DISK".into()),
        ("empty", "\"\"".into()),
        ("underscore", "BROKER_INFO".into()),
        ("leading-space", "\" LOGIN\"".into()),
        ("event-name", "CONTACT-REQUEST".into()),
        ("response-error-name", "ERROR".into()),
        ("unicode", "\"ЛОГИН\"".into()),
        ("huge", format!("\"{}\"", "L".repeat(60_000))),
    ];
    for (label, name) in requests {
        cases.body(
            format!("unknown-request-{label}"),
            format!("Request: {name}\nId: 1\n"),
            "UnknownRequest",
            UnknownRequest,
        );
    }
    cases.body(
        "unknown-response-name",
        "Response: LOGON\nId: 1\nStatus: OK\nData: {}\n",
        "UnknownRequest",
        UnknownRequest,
    );
    cases.body(
        "unknown-response-lowercase",
        "Response: ping\nId: 1\nStatus: OK\nData: {TIME: 1}\n",
        "UnknownRequest",
        UnknownRequest,
    );
    for (label, name) in [
        ("lowercase", "inbox"),
        ("made-up", "EXPLODE"),
        ("request-name", "LOGIN"),
        ("empty", "\"\""),
        ("suffix", "INBOXES"),
    ] {
        cases.body(
            format!("unknown-event-{label}"),
            format!("Event: {name}\nData: {{COUNT: 1}}\n"),
            "UnknownEvent",
            BadYaml,
        );
    }
}

/// Field errors inside response `Data` and event `Data` (the broker never
/// answers these, so the code is the generic `BAD-YAML`).
fn data_cases(cases: &mut Cases) {
    let ok = |name: &str, data: &str| format!("Response: {name}\nId: 1\nStatus: OK\nData:\n{data}");
    let list: Vec<(&str, String, &str)> = vec![
        (
            "login-missing-proof",
            ok("LOGIN", "  STEP: 1\n  SESSION: {INBOX: 0}\n"),
            "MissingField",
        ),
        (
            "login-session-unknown",
            ok(
                "LOGIN",
                &format!("  PROOF: \"{HEX32}\"\n  STEP: 1\n  SESSION: {{INBOX: 0, OUTBOX: 1}}\n"),
            ),
            "UnknownField",
        ),
        (
            "login-proof-upper",
            ok(
                "LOGIN",
                &format!(
                    "  PROOF: \"{}\"\n  STEP: 1\n  SESSION: {{INBOX: 0}}\n",
                    HEX32.to_uppercase()
                ),
            ),
            "BadValue",
        ),
        (
            "ping-time-string",
            ok("PING", "  TIME: \"1\"\n"),
            "WrongType",
        ),
        ("ping-time-negative", ok("PING", "  TIME: -1\n"), "BadValue"),
        (
            "logout-not-empty",
            ok("LOGOUT", "  BYE: true\n"),
            "UnknownField",
        ),
        (
            "logout-data-null",
            "Response: LOGOUT\nId: 1\nStatus: OK\nData:\n".into(),
            "WrongType",
        ),
        (
            "device-list-item-not-map",
            ok("DEVICE-LIST", "  DEVICES: [1]\n"),
            "WrongType",
        ),
        (
            "device-list-device-zero",
            ok(
                "DEVICE-LIST",
                "  DEVICES:\n    - {ID: 0, NAME: null, CREATED: 1, LAST-SEEN: null, CURRENT: true}\n",
            ),
            "BadValue",
        ),
        (
            "device-list-current-missing",
            ok(
                "DEVICE-LIST",
                "  DEVICES:\n    - {ID: 1, NAME: null, CREATED: 1, LAST-SEEN: null}\n",
            ),
            "MissingField",
        ),
        (
            "is-networked-home-bad",
            ok(
                "IS-NETWORKED",
                "  NETWORKED: true\n  HOME: ELSEWHERE\n  BROKER: null\n",
            ),
            "BadValue",
        ),
        (
            "initiate-request-short",
            ok("INITIATE-NEW", "  REQUEST: \"abc\"\n"),
            "BadValue",
        ),
        (
            "block-list-number-int",
            ok("BLOCK-LIST", "  NUMBERS: [5550001234]\n"),
            "WrongType",
        ),
        (
            "inbox-fetch-body-bad",
            ok(
                "INBOX-FETCH",
                &format!(
                    "  MESSAGES:\n    - {{ID: \"{HEX16}\", FROM: \"5550001234\", FROM-DEVICE: 1, TIME: 1, EXPIRES: 2, BODY: \"%%%\"}}\n  MORE: false\n"
                ),
            ),
            "BadValue",
        ),
        (
            "backup-get-version-missing",
            ok("BACKUP-GET", "  BLOB: null\n"),
            "MissingField",
        ),
        (
            "broker-info-lowercase-key",
            ok("BROKER-INFO", "  info: {}\n"),
            "UnknownField",
        ),
        (
            "broker-info-missing-info",
            ok(
                "BROKER-INFO",
                &format!(
                    "  Signature: \"{}\"\n  IdentityKey: \"{HEX32}\"\n",
                    "ab".repeat(64)
                ),
            ),
            "MissingField",
        ),
        (
            "broker-info-bad-mode",
            ok(
                "BROKER-INFO",
                &format!(
                    "  Info:\n    PROTOCOL: 1\n    BROKER-ID: \"b\"\n    INBOX-MODE: MAILBOX\n    REGISTRATION: OPEN\n    NONCE-STEP: 30\n    NONCE-SKEW: 1\n    NONCE-ALGORITHM: MM-NONCE-1\n    KEY-STORAGE: []\n    NETWORK: {{NAME: null, PEERS: []}}\n    PREFIXES: []\n    LIMITS: {{MAX-FRAME: 1, MAX-DEVICES: 1, INBOX-QUOTA: 1, MESSAGE-MAX: 1, MESSAGE-TTL: 1}}\n    TIME: 1\n  Signature: \"{}\"\n  IdentityKey: \"{HEX32}\"\n",
                    "ab".repeat(64)
                ),
            ),
            "BadValue",
        ),
        (
            "broker-info-short-signature",
            ok(
                "BROKER-INFO",
                &format!(
                    "  Info:\n    PROTOCOL: 1\n    BROKER-ID: \"b\"\n    INBOX-MODE: ENTITY\n    REGISTRATION: OPEN\n    NONCE-STEP: 30\n    NONCE-SKEW: 1\n    NONCE-ALGORITHM: MM-NONCE-1\n    KEY-STORAGE: []\n    NETWORK: {{NAME: null, PEERS: []}}\n    PREFIXES: []\n    LIMITS: {{MAX-FRAME: 1, MAX-DEVICES: 1, INBOX-QUOTA: 1, MESSAGE-MAX: 1, MESSAGE-TTL: 1}}\n    TIME: 1\n  Signature: \"{HEX32}\"\n  IdentityKey: \"{HEX32}\"\n"
                ),
            ),
            "BadValue",
        ),
        (
            "broker-info-prefix-letters",
            ok(
                "BROKER-INFO",
                &format!(
                    "  Info:\n    PROTOCOL: 1\n    BROKER-ID: \"b\"\n    INBOX-MODE: ENTITY\n    REGISTRATION: OPEN\n    NONCE-STEP: 30\n    NONCE-SKEW: 1\n    NONCE-ALGORITHM: MM-NONCE-1\n    KEY-STORAGE: []\n    NETWORK: {{NAME: null, PEERS: []}}\n    PREFIXES: [\"55a\"]\n    LIMITS: {{MAX-FRAME: 1, MAX-DEVICES: 1, INBOX-QUOTA: 1, MESSAGE-MAX: 1, MESSAGE-TTL: 1}}\n    TIME: 1\n  Signature: \"{}\"\n  IdentityKey: \"{HEX32}\"\n",
                    "ab".repeat(64)
                ),
            ),
            "BadValue",
        ),
    ];
    for (label, body, kind) in list {
        cases.body(format!("data-{label}"), body, kind, BadYaml);
    }

    let event = |name: &str, data: &str| format!("Event: {name}\nData:\n{data}");
    let events: Vec<(&str, String, &str)> = vec![
        (
            "contact-request-missing-from",
            event(
                "CONTACT-REQUEST",
                &format!("  REQUEST: \"{HEX16}\"\n  KIND: NEW\n  NETWORKED: false\n"),
            ),
            "MissingField",
        ),
        (
            "contact-request-kind-bad",
            event(
                "CONTACT-REQUEST",
                &format!(
                    "  REQUEST: \"{HEX16}\"\n  FROM: \"5550001234\"\n  KIND: OLD\n  NETWORKED: false\n"
                ),
            ),
            "BadValue",
        ),
        (
            "contact-request-networked-string",
            event(
                "CONTACT-REQUEST",
                &format!(
                    "  REQUEST: \"{HEX16}\"\n  FROM: \"5550001234\"\n  KIND: NEW\n  NETWORKED: \"no\"\n"
                ),
            ),
            "WrongType",
        ),
        (
            "contact-accepted-unknown",
            event(
                "CONTACT-ACCEPTED",
                &format!(
                    "  REQUEST: \"{HEX16}\"\n  TARGET: \"5550001234\"\n  TOKEN: \"{HEX32}\"\n  PORT: 1\n"
                ),
            ),
            "UnknownField",
        ),
        (
            "contact-accepted-bad-address",
            event(
                "CONTACT-ACCEPTED",
                &format!(
                    "  REQUEST: \"{HEX16}\"\n  TARGET: \"5550001234\"\n  ADDRESS: \"nowhere\"\n  TOKEN: \"{HEX32}\"\n"
                ),
            ),
            "BadValue",
        ),
        (
            "contact-connecting-token-short",
            event(
                "CONTACT-CONNECTING",
                &format!("  REQUEST: \"{HEX16}\"\n  FROM: \"5550001234\"\n  TOKEN: \"{HEX16}\"\n"),
            ),
            "BadValue",
        ),
        (
            "pubkey-request-peer-short",
            event(
                "PUBKEY-REQUEST",
                &format!("  REQUEST: \"{HEX16}\"\n  PEER: \"55\"\n"),
            ),
            "BadValue",
        ),
        (
            "inbox-count-negative",
            event("INBOX", "  COUNT: -3\n"),
            "BadValue",
        ),
        (
            "inbox-count-missing",
            event("INBOX", "  {}\n"),
            "MissingField",
        ),
        (
            "device-revoked-zero",
            event("DEVICE-REVOKED", "  DEVICE: 0\n"),
            "BadValue",
        ),
        (
            "shutdown-string",
            event("SHUTDOWN", "  RECONNECT-AFTER: soon\n"),
            "WrongType",
        ),
    ];
    for (label, body, kind) in events {
        cases.body(format!("event-{label}"), body, kind, BadYaml);
    }
}

fn huge_cases(cases: &mut Cases) {
    cases.body(
        "huge-device-name",
        format!(
            "Request: ADD-DEVICE\nId: 1\nArgs:\n  NAME: \"{}\"\n",
            "x".repeat(60_000)
        ),
        "BadValue",
        BadArgs,
    );
    cases.body(
        "huge-number",
        format!(
            "Request: BLOCK\nId: 1\nArgs:\n  TARGET: \"{}\"\n",
            "5".repeat(60_000)
        ),
        "BadValue",
        BadArgs,
    );
    cases.body(
        "huge-hex",
        format!("Request: DEPOSIT\nId: 1\nArgs:\n  TARGET: \"5550001234\"\n  ID: \"{}\"\n  BODY: \"aGk=\"\n", "a".repeat(60_000)),
        "BadValue",
        BadArgs,
    );
    cases.body(
        "huge-block-scalar",
        format!(
            "Request: ADD-DEVICE\nId: 1\nArgs:\n  NAME: |\n{}",
            "    line of text\n".repeat(3000)
        ),
        "BadValue",
        BadArgs,
    );
    cases.body(
        "huge-integer",
        format!("Request: PING\nId: {}\n", "9".repeat(5000)),
        "WrongType",
        BadYaml,
    );
    cases.body(
        "huge-comment-then-garbage",
        format!("#{}\n]\n", "c".repeat(60_000)),
        "Yaml",
        BadYaml,
    );
}

/// Every case, in a stable order.
pub(crate) fn cases() -> Vec<Case> {
    let mut cases = Cases(Vec::new());
    framing_cases(&mut cases);
    encoding_cases(&mut cases);
    syntax_cases(&mut cases);
    limit_cases(&mut cases);
    structure_cases(&mut cases);
    envelope_cases(&mut cases);
    name_cases(&mut cases);
    args_cases(&mut cases);
    data_cases(&mut cases);
    huge_cases(&mut cases);
    cases.0
}
