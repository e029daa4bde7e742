//! The stable error codes a broker answers with.

use std::fmt;
use std::str::FromStr;

macro_rules! error_codes {
    ($( $(#[$doc:meta])* $variant:ident = $text:literal, close = $close:literal; )*) => {
        /// A stable error code, as sent in `Error.Code` of an error response.
        ///
        /// The spelling (`as_str`) is part of the protocol and never changes.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum ErrorCode {
            $( $(#[$doc])* $variant, )*
        }

        impl ErrorCode {
            /// Every code, in the order of the protocol's table.
            pub const ALL: &'static [ErrorCode] = &[$( ErrorCode::$variant, )*];

            /// The code as spelled on the wire, e.g. `"BAD-ARGS"`.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $( ErrorCode::$variant => $text, )*
                }
            }

            /// Whether the broker closes the connection after sending this
            /// code (the frame stream can no longer be trusted).
            pub const fn closes_connection(self) -> bool {
                match self {
                    $( ErrorCode::$variant => $close, )*
                }
            }
        }

        impl FromStr for ErrorCode {
            type Err = UnknownErrorCode;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $( $text => Ok(ErrorCode::$variant), )*
                    _ => Err(UnknownErrorCode),
                }
            }
        }
    };
}

error_codes! {
    /// The byte stream is not a valid frame sequence (zero length, truncated).
    BadFrame = "BAD-FRAME", close = true;
    /// A frame's length prefix exceeds the receiver's `max_frame_len`.
    FrameTooLarge = "FRAME-TOO-LARGE", close = true;
    /// The frame body is not UTF-8, not YAML within the parser limits, or not a
    /// well-formed protocol document (envelope keys and types).
    BadYaml = "BAD-YAML", close = false;
    /// The `Request` name is not one of the protocol's requests.
    UnknownRequest = "UNKNOWN-REQUEST", close = false;
    /// `Args` is missing a field, has an unknown field, or a field has a wrong
    /// type or value.
    BadArgs = "BAD-ARGS", close = false;
    /// The request needs a logged-in connection.
    NotLoggedIn = "NOT-LOGGED-IN", close = false;
    /// LOGIN, REGISTER or DEVICE-JOIN on a connection that is already logged in.
    AlreadyLoggedIn = "ALREADY-LOGGED-IN", close = false;
    /// Login failed: unknown entity, unknown device or bad nonce (one code, so
    /// the answer does not enumerate accounts).
    AuthFailed = "AUTH-FAILED", close = false;
    /// Too many failures; see `RetryAfter`.
    Locked = "LOCKED", close = false;
    /// The broker does not accept registrations.
    RegistrationClosed = "REGISTRATION-CLOSED", close = false;
    /// The registration token is missing, unknown or used.
    BadToken = "BAD-TOKEN", close = false;
    /// Too many requests; see `RetryAfter`.
    RateLimited = "RATE-LIMITED", close = false;
    /// The entity already has the maximum number of devices.
    DeviceLimit = "DEVICE-LIMIT", close = false;
    /// DEVICE-JOIN: the registration secret is unknown, expired or used.
    BadSecret = "BAD-SECRET", close = false;
    /// An inbox or storage quota is full.
    QuotaExceeded = "QUOTA-EXCEEDED", close = false;
    /// The referenced item does not exist.
    NotFound = "NOT-FOUND", close = false;
    /// A version or state precondition failed (e.g. BACKUP-PUT version).
    Conflict = "CONFLICT", close = false;
    /// The target is not reachable through the broker network.
    NotNetworked = "NOT-NETWORKED", close = false;
    /// A peer broker needed for the request is unavailable.
    PeerUnavailable = "PEER-UNAVAILABLE", close = false;
    /// An internal failure; the message never carries details.
    Internal = "INTERNAL", close = false;
    /// The broker is shutting down.
    ShuttingDown = "SHUTTING-DOWN", close = false;
    /// The broker's storage cannot take the request now (disk full, database down or too
    /// slow); see `RetryAfter`.
    Unavailable = "UNAVAILABLE", close = false;
    /// The number was ported to another broker of the network; the message names it.
    Ported = "PORTED", close = false;
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The string is not one of the stable [`ErrorCode`]s.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown error code")]
pub struct UnknownErrorCode;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_through_text() {
        assert_eq!(ErrorCode::ALL.len(), 23);
        for &code in ErrorCode::ALL {
            assert_eq!(code.as_str().parse::<ErrorCode>(), Ok(code));
        }
        assert_eq!("bad-args".parse::<ErrorCode>(), Err(UnknownErrorCode));
    }
}
