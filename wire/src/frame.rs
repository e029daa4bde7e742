//! Length-prefixed framing: a u32 big-endian length `N`, then `N` bytes.
//!
//! As in mini-redis, a frame is first *checked* ([`check`]): "not all bytes
//! are here yet" is the normal `Ok(None)`, not an error. The length is
//! validated against `max_frame_len` from the four prefix bytes alone, so an
//! oversize frame is refused before a single byte of its body is buffered.
//!
//! [`peek`] is that check with the incomplete case spelled out: whether the
//! prefix is in yet and, once it is, the size of the whole frame, so a reader
//! can make room for a frame before its body arrives. It is the one place in
//! this crate that reads a length prefix: [`check`], [`FrameDecoder`] and the
//! async `io::FrameReader` (feature `tokio`) all decide through it, and
//! [`encode_frame`] is the one place that writes one (`io::write_frame` too).
//!
//! [`FrameDecoder`] owns the receive buffer of one connection; the I/O code
//! pushes whatever the socket produced and pulls complete frame bodies out.

/// Bytes of the length prefix.
pub const PREFIX_LEN: usize = 4;

/// A framing violation. The stream cannot be resynchronised after one: the
/// receiver answers with an error frame and closes the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The length prefix is zero.
    #[error("frame length is zero")]
    Empty,
    /// The length exceeds the limit.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Announced (or attempted) body length.
        len: usize,
        /// The limit in force.
        max: u32,
    },
}

/// How much of the frame at the front of a buffer has arrived (see [`peek`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Peek {
    /// Fewer than [`PREFIX_LEN`] bytes: the frame's length is not known yet.
    NeedPrefix,
    /// The prefix is in and valid, but not all of the body is.
    NeedBody {
        /// Length of the whole frame, prefix included.
        total: usize,
    },
    /// A complete frame: its body is `buf[PREFIX_LEN..total]`.
    Complete {
        /// Length of the whole frame, prefix included.
        total: usize,
    },
}

impl Peek {
    /// Length of the whole frame, prefix included, once its prefix is in.
    pub fn total(self) -> Option<usize> {
        match self {
            Peek::NeedPrefix => None,
            Peek::NeedBody { total } | Peek::Complete { total } => Some(total),
        }
    }
}

/// Look at the frame at the front of `buf` without consuming anything.
///
/// An error as soon as the prefix is readable and invalid (`0` or
/// `> max_len`), whatever follows it. The verdict only moves forward as bytes
/// are appended: `NeedPrefix`, then `NeedBody` and `Complete` with the same
/// `total`, or the error.
///
/// ```
/// use micromsg_wire::frame::{Peek, peek};
///
/// assert_eq!(peek(&[0, 0], 10), Ok(Peek::NeedPrefix));
/// assert_eq!(peek(&[0, 0, 0, 2, b'a'], 10), Ok(Peek::NeedBody { total: 6 }));
/// assert_eq!(peek(&[0, 0, 0, 2, b'a', b'b'], 10), Ok(Peek::Complete { total: 6 }));
/// assert!(peek(&[0, 0, 0, 11], 10).is_err());
/// ```
pub fn peek(buf: &[u8], max_len: u32) -> Result<Peek, FrameError> {
    let Some(prefix) = buf.first_chunk::<PREFIX_LEN>() else {
        return Ok(Peek::NeedPrefix);
    };
    let total = PREFIX_LEN + body_len(*prefix, max_len)?;
    Ok(if buf.len() >= total {
        Peek::Complete { total }
    } else {
        Peek::NeedBody { total }
    })
}

/// The body length a prefix announces, if it is within `1..=max_len`.
fn body_len(prefix: [u8; PREFIX_LEN], max_len: u32) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(prefix);
    if len == 0 {
        return Err(FrameError::Empty);
    }
    if len > max_len {
        return Err(FrameError::TooLarge {
            len: len as usize,
            max: max_len,
        });
    }
    Ok(len as usize)
}

/// Check whether `buf` starts with a complete frame.
///
/// Returns `Ok(Some(total))` with the length of the whole frame, prefix
/// included; `Ok(None)` if more bytes are needed; an error as soon as the
/// prefix is readable and invalid (`0` or `> max_len`).
pub fn check(buf: &[u8], max_len: u32) -> Result<Option<usize>, FrameError> {
    match peek(buf, max_len)? {
        Peek::Complete { total } => Ok(Some(total)),
        Peek::NeedPrefix | Peek::NeedBody { .. } => Ok(None),
    }
}

/// Remove the first complete frame from the front of `buf` and return its
/// body; `Ok(None)` (and `buf` untouched) if it is not complete yet.
///
/// This drains from the front of a `Vec`, which is fine for tests and simple
/// callers; [`FrameDecoder`] avoids the copy with an offset.
pub fn decode_frame(buf: &mut Vec<u8>, max_len: u32) -> Result<Option<Vec<u8>>, FrameError> {
    match check(buf, max_len)? {
        Some(total) => {
            let body = buf[PREFIX_LEN..total].to_vec();
            buf.drain(..total);
            Ok(Some(body))
        }
        None => Ok(None),
    }
}

/// Append `payload` to `out` as one frame.
///
/// Fails for an empty payload or one longer than `u32::MAX`; checking
/// against the *peer's* `max_frame_len` is the caller's business (see
/// `Message::encode_frame`).
pub fn encode_frame(payload: &[u8], out: &mut Vec<u8>) -> Result<(), FrameError> {
    if payload.is_empty() {
        return Err(FrameError::Empty);
    }
    let len = u32::try_from(payload.len()).map_err(|_| FrameError::TooLarge {
        len: payload.len(),
        max: u32::MAX,
    })?;
    out.reserve(PREFIX_LEN + payload.len());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(payload);
    Ok(())
}

/// The receive side of one connection: a byte buffer with a read offset.
///
/// ```
/// use micromsg_wire::frame::{FrameDecoder, encode_frame};
///
/// let mut wire = Vec::new();
/// encode_frame(b"Request: PING\nId: 1\n", &mut wire).unwrap();
///
/// let mut decoder = FrameDecoder::new(65536);
/// decoder.push(&wire[..3]);
/// assert_eq!(decoder.next_frame().unwrap(), None); // incomplete: read more
/// decoder.push(&wire[3..]);
/// assert_eq!(decoder.next_frame().unwrap(), Some(&b"Request: PING\nId: 1\n"[..]));
/// ```
///
/// Memory: the buffer holds at most one partial frame plus whatever the
/// caller pushed beyond it; a caller that pushes only after `next_frame`
/// returned `Ok(None)` keeps it under `max_len + 4 + read size`.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    /// Start of the unconsumed bytes in `buf`.
    start: usize,
    max_len: u32,
    /// A framing error is final: the stream has lost synchronisation.
    failed: Option<FrameError>,
}

impl FrameDecoder {
    /// A decoder refusing frames longer than `max_len` bytes.
    pub fn new(max_len: u32) -> Self {
        Self {
            buf: Vec::new(),
            start: 0,
            max_len,
            failed: None,
        }
    }

    /// The frame limit in force.
    pub fn max_len(&self) -> u32 {
        self.max_len
    }

    /// Append bytes received from the peer.
    pub fn push(&mut self, bytes: &[u8]) {
        // Reclaim the consumed prefix before growing, so the buffer never
        // grows just because frames were consumed.
        if self.start > 0 && (self.start == self.buf.len() || self.start >= self.buf.len() / 2) {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes received but not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// The next complete frame body, `Ok(None)` if more bytes are needed.
    ///
    /// The returned slice borrows the buffer until the next call. After an
    /// error every later call returns the same error.
    pub fn next_frame(&mut self) -> Result<Option<&[u8]>, FrameError> {
        if let Some(error) = self.failed {
            return Err(error);
        }
        let pending = &self.buf[self.start..];
        match check(pending, self.max_len) {
            Ok(Some(total)) => {
                let body = self.start + PREFIX_LEN..self.start + total;
                self.start += total;
                Ok(Some(&self.buf[body]))
            }
            Ok(None) => Ok(None),
            Err(error) => {
                self.failed = Some(error);
                Err(error)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn check_reports_incomplete_prefix_and_body() {
        assert_eq!(check(&[], 10), Ok(None));
        assert_eq!(check(&[0, 0, 0], 10), Ok(None));
        assert_eq!(check(&[0, 0, 0, 2, b'a'], 10), Ok(None));
        assert_eq!(check(&[0, 0, 0, 2, b'a', b'b', b'c'], 10), Ok(Some(6)));
    }

    #[test]
    fn check_refuses_from_the_prefix_alone() {
        assert_eq!(check(&[0, 0, 0, 0], 10), Err(FrameError::Empty));
        assert_eq!(
            check(&[0, 0, 0, 11], 10),
            Err(FrameError::TooLarge { len: 11, max: 10 })
        );
        assert_eq!(check(&[0, 0, 0, 10], 10), Ok(None));
    }

    #[test]
    fn decode_frame_drains_one_frame() {
        let mut buf = vec![0, 0, 0, 1, b'x', 0, 0];
        assert_eq!(decode_frame(&mut buf, 10), Ok(Some(vec![b'x'])));
        assert_eq!(buf, vec![0, 0]);
        assert_eq!(decode_frame(&mut buf, 10), Ok(None));
    }

    #[test]
    fn decoder_compacts_and_stays_failed() {
        let mut decoder = FrameDecoder::new(4);
        for _ in 0..100 {
            decoder.push(&[0, 0, 0, 1, b'z']);
            assert_eq!(decoder.next_frame().unwrap(), Some(&b"z"[..]));
        }
        assert!(decoder.buf.len() <= 10);
        decoder.push(&[0, 0, 0, 5]);
        assert_eq!(
            decoder.next_frame(),
            Err(FrameError::TooLarge { len: 5, max: 4 })
        );
        decoder.push(&[0, 0, 0, 1, b'z']);
        assert!(decoder.next_frame().is_err());
    }

    #[test]
    fn encode_refuses_empty() {
        let mut out = Vec::new();
        assert_eq!(encode_frame(b"", &mut out), Err(FrameError::Empty));
        encode_frame(b"ab", &mut out).unwrap();
        assert_eq!(out, vec![0, 0, 0, 2, b'a', b'b']);
    }
}
