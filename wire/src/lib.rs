//! Sans-IO framing and typed messages of the MicroMsg client-broker protocol.
//!
//! This crate turns bytes into typed protocol messages and back. It owns no
//! socket, no clock and no task: the broker's and the client's tokio code
//! push received bytes into a [`FrameDecoder`], decode each frame body, and
//! write the bytes this crate encodes.
//!
//! # Layout
//!
//! - [`frame`]: the u32be length prefix; `check` before parse, incomplete is
//!   `Ok(None)`, the length is refused against `max_frame_len` before the body
//!   is read. `frame::peek` is the crate's only code that judges a prefix,
//!   `frame::encode_frame` its only code that writes one.
//! - `io` (feature `tokio`): `FrameReader` and `write_frame` for tokio
//!   streams, a buffer and reads around `frame::peek` and
//!   `frame::encode_frame`, with no framing rules of their own.
//! - `yaml` (private): the only module that touches the YAML library. It
//!   parses under hard [`Limits`] (depth, no anchors or aliases, scalar length,
//!   events, one document) into a small owned tree, and emits the canonical
//!   YAML subset this crate writes.
//! - `canonical` (private): reads a frame in exactly that subset in one pass, in front of the
//!   YAML library; anything else, every error included, goes to the library.
//! - `codec` (private): the strict mapping between that tree and the
//!   protocol structs (unknown fields refused, precise field paths in errors).
//! - [`value`]: validated value types ([`Number`], [`DeviceId`], [`Hex16`],
//!   [`Hex32`], [`Hex64`], [`Blob`], [`Address`], ...).
//! - [`message`]: [`Message`] = request | response | event, with
//!   [`Request`], [`ResponseData`] and [`Event`] holding one typed struct per
//!   protocol name.
//! - [`DecodeError`] and [`ErrorCode`]: what failed, and which stable code the
//!   broker answers with.
//!
//! # Broker side
//!
//! ```
//! use micromsg_wire::{FrameDecoder, Limits, Request, Response, ResponseData, decode_request};
//! use micromsg_wire::message::response::PingData;
//!
//! let limits = Limits::default();
//! let mut decoder = FrameDecoder::new(limits.max_frame_len);
//! decoder.push(&Request::Ping.encode_frame(7, &limits).unwrap()); // bytes from the socket
//!
//! while let Some(body) = decoder.next_frame().unwrap() {
//!     let reply = match decode_request(body, &limits) {
//!         Ok((id, Request::Ping)) => Response::ok(id, ResponseData::Ping(PingData { time: 0 })),
//!         Ok((_id, _other)) => unimplemented!(),
//!         Err(bad) => bad.to_response(), // close afterwards if bad.closes_connection()
//!     };
//!     let bytes = reply.encode_frame(&limits).unwrap(); // write to the socket
//!     assert!(bytes.len() > 4);
//! }
//! ```
//!
//! # Client side
//!
//! ```
//! use micromsg_wire::{Limits, Message, Number, DeviceId, Hex32, Request, ResponseData};
//! use micromsg_wire::message::request::LoginArgs;
//!
//! let limits = Limits::default();
//! let login = Request::Login(LoginArgs {
//!     entity: Number::new("5550001234").unwrap(),
//!     device: DeviceId::FIRST,
//!     secret: Hex32::from_bytes([0; 32]),
//! });
//! let frame = login.encode_frame(7, &limits).unwrap(); // write to the socket
//! # let _ = frame;
//!
//! let body = b"Response: PING\nId: 8\nStatus: OK\nData:\n  TIME: 1700000000\n";
//! match Message::decode(body, &limits).unwrap() {
//!     Message::Response(response) => match response.result {
//!         Ok(ResponseData::Ping(data)) => assert_eq!(data.time, 1_700_000_000),
//!         other => panic!("{other:?}"),
//!     },
//!     Message::Event(_event) => {}
//!     Message::Request { .. } => {} // a broker never sends these
//! }
//! ```
#![forbid(unsafe_code)]

mod canonical;
mod codec;
mod error;
mod error_code;
pub mod frame;
#[cfg(feature = "tokio")]
pub mod io;
mod limits;
pub mod message;
pub mod port;
pub mod value;
mod yaml;

pub use error::{DecodeError, EncodeError, FieldPath, Limit, Section};
pub use error_code::{ErrorCode, UnknownErrorCode};
pub use frame::{FrameDecoder, FrameError};
pub use limits::{
    DEFAULT_MAX_DEPTH, DEFAULT_MAX_EVENTS, DEFAULT_MAX_FRAME_LEN, DEFAULT_MAX_SCALAR_LEN, Limits,
};
pub use message::event::{Event, EventKind};
pub use message::request::{Request, RequestKind};
pub use message::response::{ErrorBody, ErrorResponse, Info, Response, ResponseData};
pub use message::{Message, RequestError, decode_framed, decode_request, encode_info_canonical};
pub use port::{port_statement, ported_entry_bytes};
pub use value::{
    Address, Blob, DeviceId, DeviceName, Hex16, Hex32, Hex64, Number, NumberPrefix, RequestId,
    ValueError,
};
