//! The three frame kinds and their envelopes.
//!
//! Decoding runs in two stages: the body becomes a `Node` tree (see
//! `crate::yaml`), then the envelope is read key by key (`Request`/`Id`/`Args`,
//! `Response`/`Id`/`Status`/`Data`/`Error`, `Event`/`Data`) and `Args` or
//! `Data` is decoded into the struct for the name found. That makes the
//! error precise: an unknown name is `UnknownRequest`, a bad argument is a
//! field error under `Args` (and so `BAD-ARGS`).

pub mod event;
pub mod request;
pub mod response;

use crate::codec::{Fields, Path, WireValue, bad_value};
use crate::error::{DecodeError, EncodeError, clip};
use crate::frame;
use crate::limits::Limits;
use crate::value::RequestId;
use crate::yaml::{self, Node};

use event::{Event, EventKind};
use request::{Request, RequestKind};
use response::{ERROR_NAME, ErrorBody, ErrorResponse, Info, Response, ResponseData, Status};

/// One frame: a request (client to broker), a response or an event (broker
/// to client).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// `Request: NAME`, `Id`, `Args`.
    Request {
        /// Chosen by the client, echoed in the response.
        id: RequestId,
        /// The request.
        request: Request,
    },
    /// `Response: NAME`, `Id`, `Status`, `Data` or `Error`.
    Response(Response),
    /// `Event: NAME`, `Data`.
    Event(Event),
}

impl From<Response> for Message {
    fn from(response: Response) -> Self {
        Message::Response(response)
    }
}

impl From<Event> for Message {
    fn from(event: Event) -> Self {
        Message::Event(event)
    }
}

/// The top-level key that decides the frame kind.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Request,
    Response,
    Event,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Request => "Request",
            Kind::Response => "Response",
            Kind::Event => "Event",
        }
    }

    /// The first of `Request`, `Response`, `Event` present (a frame holding
    /// two of them then fails on the other as an unknown field).
    fn of(entries: &[(String, Node)]) -> Result<Kind, DecodeError> {
        let has = |key: &str| entries.iter().any(|(k, _)| k == key);
        if has("Request") {
            Ok(Kind::Request)
        } else if has("Response") {
            Ok(Kind::Response)
        } else if has("Event") {
            Ok(Kind::Event)
        } else {
            Err(DecodeError::UnknownKind)
        }
    }
}

impl Message {
    /// A request frame.
    pub fn request(id: RequestId, request: Request) -> Self {
        Message::Request { id, request }
    }

    /// Decode one frame body (the bytes after the length prefix).
    pub fn decode(body: &[u8], limits: &Limits) -> Result<Message, DecodeError> {
        let entries = top_level(body, limits)?;
        match Kind::of(&entries)? {
            Kind::Request => decode_request_entries(entries)
                .map(|(id, request)| Message::Request { id, request })
                .map_err(|e| e.error),
            Kind::Response => decode_response_entries(entries).map(Message::Response),
            Kind::Event => decode_event_entries(entries).map(Message::Event),
        }
    }

    /// The YAML body (no length prefix). Deterministic: the same message
    /// always encodes to the same bytes.
    pub fn encode(&self) -> Vec<u8> {
        yaml::emit(&self.to_node())
    }

    /// The complete frame (length prefix and body), checked against the
    /// peer's `limits` so the peer will accept it.
    pub fn encode_frame(&self, limits: &Limits) -> Result<Vec<u8>, EncodeError> {
        frame_node(&self.to_node(), limits)
    }

    fn to_node(&self) -> Node {
        match self {
            Message::Request { id, request } => request_node(*id, request),
            Message::Response(response) => response_node(response),
            Message::Event(event) => event_node(event),
        }
    }
}

impl Request {
    /// The YAML body of this request with `id`.
    pub fn encode(&self, id: RequestId) -> Vec<u8> {
        yaml::emit(&request_node(id, self))
    }

    /// The complete frame of this request with `id`, checked against the
    /// broker's `limits`.
    pub fn encode_frame(&self, id: RequestId, limits: &Limits) -> Result<Vec<u8>, EncodeError> {
        frame_node(&request_node(id, self), limits)
    }
}

impl Response {
    /// The YAML body.
    pub fn encode(&self) -> Vec<u8> {
        yaml::emit(&response_node(self))
    }

    /// The complete frame, checked against the client's `limits`.
    pub fn encode_frame(&self, limits: &Limits) -> Result<Vec<u8>, EncodeError> {
        frame_node(&response_node(self), limits)
    }
}

impl Event {
    /// The YAML body.
    pub fn encode(&self) -> Vec<u8> {
        yaml::emit(&event_node(self))
    }

    /// The complete frame, checked against the client's `limits`.
    pub fn encode_frame(&self, limits: &Limits) -> Result<Vec<u8>, EncodeError> {
        frame_node(&event_node(self), limits)
    }
}

/// The canonical YAML of a broker's [`Info`]: the exact bytes the broker
/// signs and a client verifies `BROKER-INFO`'s `Signature` against.
///
/// Keys in struct order, two-space block style, strings double-quoted, a
/// final newline, no `---`. A client re-encodes the `Info` it decoded; since
/// decoding is strict (no unknown fields, one spelling per value) that
/// reproduces the broker's bytes exactly.
pub fn encode_info_canonical(info: &Info) -> Vec<u8> {
    yaml::emit(&info.encode())
}

/// Decode input that must be exactly one complete frame (length prefix and
/// body), as in the malformed-input corpus and the fuzz target.
pub fn decode_framed(input: &[u8], limits: &Limits) -> Result<Message, DecodeError> {
    match frame::check(input, limits.max_frame_len)? {
        None => Err(DecodeError::Truncated),
        Some(total) if total < input.len() => Err(DecodeError::TrailingBytes {
            extra: input.len() - total,
        }),
        Some(_) => Message::decode(&input[frame::PREFIX_LEN..], limits),
    }
}

/// A request frame the broker could not decode, with whatever it could read
/// of the `Id` and the request name, so the answer can be addressed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("bad request (Id {id}): {error}")]
pub struct RequestError {
    /// The `Id`, or 0 if it was not readable.
    pub id: RequestId,
    /// The request name, if it was readable and known.
    pub request: Option<RequestKind>,
    /// What went wrong.
    pub error: DecodeError,
}

impl RequestError {
    /// A framing violation (the caller closes the connection after answering).
    pub fn from_frame_error(error: frame::FrameError) -> Self {
        Self {
            id: 0,
            request: None,
            error: error.into(),
        }
    }

    /// The error response to send: `Response: <NAME>` (or `ERROR`), the
    /// `Id` (or 0), the code of [`DecodeError::error_code`] and the error
    /// text as `Message`.
    pub fn to_response(&self) -> Response {
        Response::error(
            self.id,
            self.request,
            ErrorBody::new(self.error.error_code(), self.error.to_string()),
        )
    }

    /// Whether the connection must be closed after answering.
    pub fn closes_connection(&self) -> bool {
        self.error.error_code().closes_connection()
    }
}

/// Decode a frame body that must be a request (the broker's side).
///
/// On failure the error carries the `Id` and the request name when they
/// were readable, so [`RequestError::to_response`] answers as the protocol
/// asks.
pub fn decode_request(body: &[u8], limits: &Limits) -> Result<(RequestId, Request), RequestError> {
    let unaddressed = |error| RequestError {
        id: 0,
        request: None,
        error,
    };
    let entries = top_level(body, limits).map_err(unaddressed)?;
    match Kind::of(&entries).map_err(unaddressed)? {
        Kind::Request => decode_request_entries(entries),
        found => Err(unaddressed(DecodeError::UnexpectedKind {
            expected: Kind::Request.as_str(),
            found: found.as_str(),
        })),
    }
}

// ---------------------------------------------------------------------------

fn top_level(body: &[u8], limits: &Limits) -> Result<Vec<(String, Node)>, DecodeError> {
    match yaml::parse(body, limits)? {
        Node::Map(entries) => Ok(entries),
        _ => Err(DecodeError::NotAMapping),
    }
}

fn decode_request_entries(
    entries: Vec<(String, Node)>,
) -> Result<(RequestId, Request), RequestError> {
    // Read what can address the answer before anything can fail.
    let id_hint = entries
        .iter()
        .find(|(key, _)| key == "Id")
        .and_then(|(_, value)| match value {
            Node::Int(i) => u32::try_from(*i).ok(),
            _ => None,
        })
        .unwrap_or(0);
    let kind_hint = entries
        .iter()
        .find(|(key, _)| key == "Request")
        .and_then(|(_, value)| match value {
            Node::Str(name) => name.parse::<RequestKind>().ok(),
            _ => None,
        });
    let fail = |error| RequestError {
        id: id_hint,
        request: kind_hint,
        error,
    };

    let root = Path::ROOT;
    let mut fields = Fields::new(Node::Map(entries), &root, false).map_err(fail)?;
    fields
        .deny_unknown(&["Request", "Id", "Args"])
        .map_err(fail)?;
    let name: String = fields.required("Request").map_err(fail)?;
    let kind: RequestKind = name
        .parse()
        .map_err(|_| fail(DecodeError::UnknownRequest(clip(&name))))?;
    let id: RequestId = fields.required("Id").map_err(fail)?;
    let args = fields.take("Args").unwrap_or(Node::Null);
    let request = Request::decode_args(kind, args, &root.key("Args")).map_err(fail)?;
    Ok((id, request))
}

fn decode_response_entries(entries: Vec<(String, Node)>) -> Result<Response, DecodeError> {
    let root = Path::ROOT;
    let mut fields = Fields::new(Node::Map(entries), &root, false)?;
    fields.deny_unknown(&["Response", "Id", "Status", "Data", "Error"])?;
    let name: String = fields.required("Response")?;
    let kind = if name == ERROR_NAME {
        None
    } else {
        Some(
            name.parse::<RequestKind>()
                .map_err(|_| DecodeError::UnknownRequest(clip(&name)))?,
        )
    };
    let id: RequestId = fields.required("Id")?;
    let status: Status = fields.required("Status")?;
    let data = fields.take("Data");
    let error = fields.take("Error");
    match status {
        Status::Ok => {
            if error.is_some() {
                return Err(bad_value(
                    &root.key("Error"),
                    "Error is only allowed with Status: ERROR",
                ));
            }
            let Some(kind) = kind else {
                return Err(bad_value(
                    &root.key("Status"),
                    "Response: ERROR needs Status: ERROR",
                ));
            };
            let data_path = root.key("Data");
            let data = data.ok_or_else(|| DecodeError::MissingField(data_path.render()))?;
            let data = ResponseData::decode(kind, data, &data_path)?;
            Ok(Response::ok(id, data))
        }
        Status::Error => {
            if data.is_some() {
                return Err(bad_value(
                    &root.key("Data"),
                    "Data is only allowed with Status: OK",
                ));
            }
            let error_path = root.key("Error");
            let error = error.ok_or_else(|| DecodeError::MissingField(error_path.render()))?;
            let error = ErrorBody::decode(error, &error_path)?;
            Ok(Response {
                id,
                result: Err(ErrorResponse {
                    request: kind,
                    error,
                }),
            })
        }
    }
}

fn decode_event_entries(entries: Vec<(String, Node)>) -> Result<Event, DecodeError> {
    let root = Path::ROOT;
    let mut fields = Fields::new(Node::Map(entries), &root, false)?;
    fields.deny_unknown(&["Event", "Data"])?;
    let name: String = fields.required("Event")?;
    let kind: EventKind = name
        .parse()
        .map_err(|_| DecodeError::UnknownEvent(clip(&name)))?;
    let data_path = root.key("Data");
    let data = fields
        .take("Data")
        .ok_or_else(|| DecodeError::MissingField(data_path.render()))?;
    Event::decode(kind, data, &data_path)
}

fn request_node(id: RequestId, request: &Request) -> Node {
    let mut map = crate::codec::MapBuilder::default();
    map.node("Request", Node::Str(request.kind().as_str().to_owned()));
    map.field("Id", &id);
    // "Args: omitted or {} when the request has no args": omitted.
    match request.encode_args() {
        Node::Map(args) if args.is_empty() => {}
        args => map.node("Args", args),
    }
    map.finish()
}

fn response_node(response: &Response) -> Node {
    let mut map = crate::codec::MapBuilder::default();
    map.node("Response", Node::Str(response.name().to_owned()));
    map.field("Id", &response.id);
    match &response.result {
        Ok(data) => {
            map.field("Status", &Status::Ok);
            map.node("Data", data.encode());
        }
        Err(error) => {
            map.field("Status", &Status::Error);
            map.field("Error", &error.error);
        }
    }
    map.finish()
}

fn event_node(event: &Event) -> Node {
    let mut map = crate::codec::MapBuilder::default();
    map.node("Event", Node::Str(event.kind().as_str().to_owned()));
    map.node("Data", event.encode_data());
    map.finish()
}

fn frame_node(node: &Node, limits: &Limits) -> Result<Vec<u8>, EncodeError> {
    yaml::check_limits(node, limits).map_err(|which| EncodeError::LimitExceeded { which })?;
    let body = yaml::emit(node);
    let too_large = EncodeError::FrameTooLarge {
        len: body.len(),
        max: limits.max_frame_len,
    };
    if body.len() > limits.max_frame_len as usize {
        return Err(too_large);
    }
    let mut out = Vec::with_capacity(frame::PREFIX_LEN + body.len());
    frame::encode_frame(&body, &mut out).map_err(|_| too_large)?;
    Ok(out)
}
