//! Reading and writing length-prefixed frames on a tokio stream (feature `tokio`).
//!
//! The one piece of this crate that does I/O, kept behind a feature so the protocol core stays
//! sans-IO; the broker and the client both pump their sockets with it.
//!
//! This module owns the buffer and the reads, not the framing rules: every decision about a
//! length prefix is [`frame::peek`]'s and every prefix written is [`frame::encode_frame`]'s,
//! the same code the fuzz target and the property tests drive, so production runs no framing
//! logic of its own.
//!
//! The reader keeps one buffer per connection and reads into it with `read_buf`, which is
//! cancel-safe: a `select!` that drops a pending read loses no bytes. The length prefix is
//! checked against the configured maximum before the body is waited for, so an oversize frame
//! costs four bytes of reading, not a megabyte of memory.
//!
//! A frame whose body is larger than the buffer keeps (4 KiB) is read straight into
//! a vector of its own, which is then handed out as it is: its bytes are copied once (from the
//! socket), not twice (into the buffer, then out of it), and the shared buffer never grows to
//! the size of the largest frame.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::frame::{self, FrameError, Peek};

/// Why no frame could be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FrameReadError {
    /// The length prefix exceeds the maximum (or is zero).
    #[error("frame length {len} outside 1..={max}")]
    BadLength {
        /// The announced length.
        len: u32,
        /// The configured maximum.
        max: u32,
    },
    /// The peer closed the stream in the middle of a frame.
    #[error("connection closed inside a frame")]
    Truncated,
    /// The stream failed.
    #[error(transparent)]
    Io(#[from] io::Error),
}

impl FrameReadError {
    /// The reader's form of a framing error: both cases are a prefix outside `1..=max`.
    fn bad_length(error: FrameError, max: u32) -> Self {
        let len = match error {
            FrameError::Empty => 0,
            // `peek` read this length from a u32 prefix, so it always fits.
            FrameError::TooLarge { len, .. } => u32::try_from(len).unwrap_or(u32::MAX),
        };
        FrameReadError::BadLength { len, max }
    }
}

/// Buffers bytes from `R` and yields whole frame bodies.
#[derive(Debug)]
pub struct FrameReader<R> {
    inner: R,
    buf: Vec<u8>,
    /// Bytes of `buf` already handed out as frames; compacted lazily.
    start: usize,
    max_len: u32,
    /// Capacity kept while no frame is pending.
    idle_capacity: usize,
    /// The body of a large frame being read straight into its own vector, and the body's
    /// length (the prefix is already consumed from `buf`).
    large: Option<(Vec<u8>, usize)>,
}

/// Buffers above this size are released after use, so one large frame does not pin memory
/// for the life of an idle connection.
const KEEP_CAPACITY: usize = 4096;

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// A reader that refuses frames longer than `max_len` bytes.
    pub fn new(inner: R, max_len: u32) -> Self {
        Self {
            inner,
            buf: Vec::new(),
            start: 0,
            max_len,
            idle_capacity: KEEP_CAPACITY,
            large: None,
        }
    }

    /// Keeps at most `bytes` of buffer while no frame is pending (default 4096), releasing
    /// the rest: for a server holding many mostly idle connections, where memory per
    /// connection matters more than an allocation per burst of frames.
    pub fn idle_capacity(mut self, bytes: usize) -> Self {
        self.idle_capacity = bytes.max(16);
        self
    }

    /// The underlying reader, to read past the frames (for example to drain what a peer
    /// still sends after a closing error). Bytes already buffered here ([`Self::buffered`])
    /// are not in it.
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }

    /// The underlying reader and the bytes already read from it but not handed out as frames,
    /// for a stream that stops carrying frames (a broker relay after its `RELAY` answer).
    pub fn into_parts(self) -> (R, Vec<u8>) {
        let mut rest = Vec::new();
        if let Some((body, len)) = &self.large {
            // A large frame's prefix was consumed when its body got a vector of its own; put it
            // back in front. `take_frame` checked `len` against `max_len`, a `u32`.
            rest.extend_from_slice(&u32::try_from(*len).unwrap_or(u32::MAX).to_be_bytes());
            rest.extend_from_slice(body);
        }
        rest.extend_from_slice(&self.buf[self.start..]);
        (self.inner, rest)
    }

    /// Bytes read from the underlying reader and not yet handed out as frames (a refused
    /// frame's length prefix included).
    pub fn buffered(&self) -> usize {
        let large = self
            .large
            .as_ref()
            .map_or(0, |(body, _)| frame::PREFIX_LEN + body.len());
        large + self.buf.len() - self.start
    }

    /// The next frame body, or `None` on a clean end of stream between frames.
    /// Cancel-safe.
    pub async fn next_frame(&mut self) -> Result<Option<Vec<u8>>, FrameReadError> {
        loop {
            if let Some(frame) = self.take_frame()? {
                return Ok(Some(frame));
            }
            let n = if let Some((body, len)) = &mut self.large {
                // At most the rest of this frame: what follows it belongs in `buf`. `body` has
                // room for all of it, so the read does not reallocate.
                let missing = (*len - body.len()) as u64;
                (&mut self.inner).take(missing).read_buf(body).await?
            } else {
                self.make_room();
                self.inner.read_buf(&mut self.buf).await?
            };
            if n == 0 {
                return if self.buffered() == 0 {
                    Ok(None)
                } else {
                    Err(FrameReadError::Truncated)
                };
            }
        }
    }

    /// Hands out the frame at the front of the buffer, or the large frame read into its own
    /// vector, if it is complete. If only a prefix is in, reserves room for the rest of the
    /// frame: in the buffer for a small one, in a vector of its own for a large one.
    fn take_frame(&mut self) -> Result<Option<Vec<u8>>, FrameReadError> {
        if let Some((body, len)) = &self.large {
            if body.len() < *len {
                return Ok(None);
            }
            return Ok(self.large.take().map(|(body, _)| body));
        }
        let pending = &self.buf[self.start..];
        let peeked = frame::peek(pending, self.max_len)
            .map_err(|error| FrameReadError::bad_length(error, self.max_len))?;
        match peeked {
            Peek::NeedPrefix => Ok(None),
            Peek::NeedBody { total } if total - frame::PREFIX_LEN > KEEP_CAPACITY => {
                let len = total - frame::PREFIX_LEN;
                let mut body = Vec::with_capacity(len);
                body.extend_from_slice(&pending[frame::PREFIX_LEN..]);
                // Everything buffered was this frame's (it is not complete), so the buffer
                // is empty now.
                self.buf.clear();
                self.start = 0;
                self.large = Some((body, len));
                Ok(None)
            }
            Peek::NeedBody { total } => {
                // Reserve once for the whole frame instead of growing in steps.
                let missing = total - pending.len();
                self.buf.reserve(missing);
                Ok(None)
            }
            Peek::Complete { total } => Ok(Some(self.consume(total))),
        }
    }

    /// Takes the complete frame of `total` bytes off the front of the buffer and returns its
    /// body.
    fn consume(&mut self, total: usize) -> Vec<u8> {
        let at = self.start;
        let frame = self.buf[at + frame::PREFIX_LEN..at + total].to_vec();
        self.start += total;
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
        frame
    }

    /// Before a read: drops the consumed bytes, applies the capacity policy and makes sure the
    /// read has somewhere to go.
    fn make_room(&mut self) {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        if self.buf.is_empty() && self.buf.capacity() > self.idle_capacity {
            self.buf = Vec::new();
        } else if self.buf.capacity() > KEEP_CAPACITY
            && self.buf.len() < KEEP_CAPACITY
            && self.pending_total() <= KEEP_CAPACITY
        {
            // Not while a large frame is arriving: `take_frame` reserved its whole length,
            // and shrinking here would reallocate on every partial read of it.
            self.buf.shrink_to(KEEP_CAPACITY);
        }
        if self.buf.capacity() == self.buf.len() {
            self.buf.reserve(self.idle_capacity.min(1024));
        }
    }

    /// Prefix and body length of the frame at the front of the buffer, once its prefix is in
    /// (0 before). Only asked after `take_frame` accepted that prefix.
    fn pending_total(&self) -> usize {
        frame::peek(&self.buf[self.start..], self.max_len)
            .ok()
            .and_then(Peek::total)
            .unwrap_or(0)
    }
}

/// Writes one frame (length prefix and body) and flushes.
///
/// The frame is built by [`frame::encode_frame`] and handed to one `write_all`, not as a
/// prefix and then a body, so a small frame leaves in one write. An empty body or one longer
/// than `u32::MAX` is refused with [`io::ErrorKind::InvalidInput`] (wrapping the
/// [`FrameError`]) and nothing is written: no reader would accept that frame.
pub async fn write_frame<W: AsyncWrite + Unpin>(out: &mut W, body: &[u8]) -> io::Result<()> {
    let mut framed = Vec::new();
    frame::encode_frame(body, &mut framed)
        .map_err(|error| io::Error::new(io::ErrorKind::InvalidInput, error))?;
    out.write_all(&framed).await?;
    out.flush().await
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn frames_split_across_reads_are_reassembled() {
        let (mut a, b) = tokio::io::duplex(8);
        let mut reader = FrameReader::new(b, 64);
        let writer = tokio::spawn(async move {
            write_frame(&mut a, b"hello").await.unwrap();
            write_frame(&mut a, b"second frame").await.unwrap();
        });
        assert_eq!(reader.next_frame().await.unwrap().unwrap(), b"hello");
        assert_eq!(reader.next_frame().await.unwrap().unwrap(), b"second frame");
        writer.await.unwrap();
        assert!(reader.next_frame().await.unwrap().is_none());
    }

    /// Hands out at most `chunk` bytes per read and records the free space it was offered.
    struct Chunked {
        data: Vec<u8>,
        at: usize,
        chunk: usize,
        offered: Vec<usize>,
    }

    impl AsyncRead for Chunked {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            let this = &mut *self;
            this.offered.push(buf.remaining());
            let n = this
                .chunk
                .min(buf.remaining())
                .min(this.data.len() - this.at);
            buf.put_slice(&this.data[this.at..this.at + n]);
            this.at += n;
            std::task::Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn a_large_frame_in_small_reads_is_read_into_one_reservation() {
        const BODY: usize = 65_536;
        let mut data = (BODY as u32).to_be_bytes().to_vec();
        data.extend((0..BODY).map(|i| i as u8));
        let chunked = Chunked {
            data: data.clone(),
            at: 0,
            chunk: 1000,
            offered: Vec::new(),
        };
        let mut reader = FrameReader::new(chunked, BODY as u32);
        assert_eq!(reader.next_frame().await.unwrap().unwrap(), &data[4..]);
        // After the first read has shown the prefix, every read is offered room for the whole
        // rest of the frame: the buffer is not shrunk and regrown between reads.
        let offered = &reader.inner.offered;
        assert!(offered.len() > 60, "{} reads", offered.len());
        for (i, room) in offered.iter().enumerate().skip(1) {
            let rest = data.len() - 1000 * i;
            assert!(
                *room >= rest,
                "read {i}: room {room} for {rest} bytes to come"
            );
        }
    }

    /// A large frame goes into a vector of its own, exactly its size, while the shared buffer
    /// stays small; the small frames around it, split across the same reads, are intact.
    #[tokio::test]
    async fn a_large_frame_is_read_into_its_own_vector() {
        let big: Vec<u8> = (0..50_000u32).map(|i| (i % 251) as u8).collect();
        let mut data = Vec::new();
        for body in [&b"before"[..], &big, b"after", &big[..4097]] {
            frame::encode_frame(body, &mut data).unwrap();
        }
        let chunked = Chunked {
            data,
            at: 0,
            chunk: 3000,
            offered: Vec::new(),
        };
        let mut reader = FrameReader::new(chunked, 1 << 16);
        assert_eq!(reader.next_frame().await.unwrap().unwrap(), b"before");
        let frame = reader.next_frame().await.unwrap().unwrap();
        assert_eq!(frame, big);
        assert_eq!(frame.capacity(), big.len());
        assert!(
            reader.buf.capacity() <= 2 * KEEP_CAPACITY,
            "{}",
            reader.buf.capacity()
        );
        assert_eq!(reader.next_frame().await.unwrap().unwrap(), b"after");
        assert_eq!(reader.next_frame().await.unwrap().unwrap(), &big[..4097]);
        assert!(reader.next_frame().await.unwrap().is_none());
        // No read was offered more room than the rest of the large frame it was filling.
        assert!(reader.inner.offered.iter().all(|&room| room <= big.len()));
    }

    /// Part of a large frame read into its own vector still counts as buffered, and
    /// `into_parts` gives it back with its prefix, followed by nothing else.
    #[tokio::test]
    async fn into_parts_returns_a_partial_large_frame_with_its_prefix() {
        let (mut a, b) = tokio::io::duplex(1 << 16);
        let mut reader = FrameReader::new(b, 1 << 16);
        let mut data = Vec::new();
        frame::encode_frame(&[9u8; 10_000], &mut data).unwrap();
        a.write_all(&data[..6_000]).await.unwrap();
        let pending =
            tokio::time::timeout(std::time::Duration::from_millis(50), reader.next_frame()).await;
        assert!(pending.is_err(), "the frame is not complete yet");
        assert_eq!(reader.buffered(), 6_000);
        let (_, rest) = reader.into_parts();
        assert_eq!(rest, &data[..6_000]);
    }

    #[tokio::test]
    async fn oversize_and_empty_lengths_are_refused_before_the_body() {
        let (mut a, b) = tokio::io::duplex(64);
        let mut reader = FrameReader::new(b, 16);
        a.write_all(&17u32.to_be_bytes()).await.unwrap();
        assert!(matches!(
            reader.next_frame().await,
            Err(FrameReadError::BadLength { len: 17, max: 16 })
        ));
        let (mut a, b) = tokio::io::duplex(64);
        let mut reader = FrameReader::new(b, 16);
        a.write_all(&0u32.to_be_bytes()).await.unwrap();
        assert!(matches!(
            reader.next_frame().await,
            Err(FrameReadError::BadLength { len: 0, .. })
        ));
    }

    #[tokio::test]
    async fn write_frame_refuses_an_empty_body_and_writes_nothing() {
        let mut out = Vec::new();
        let error = write_frame(&mut out, b"").await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidInput);
        assert!(out.is_empty(), "{out:?}");
        write_frame(&mut out, b"x").await.unwrap();
        assert_eq!(out, [0, 0, 0, 1, b'x']);
    }

    #[tokio::test]
    async fn eof_inside_a_frame_is_truncated() {
        let (mut a, b) = tokio::io::duplex(64);
        let mut reader = FrameReader::new(b, 16);
        a.write_all(&[0, 0, 0, 5, b'a']).await.unwrap();
        drop(a);
        assert!(matches!(
            reader.next_frame().await,
            Err(FrameReadError::Truncated)
        ));
    }

    /// After a large frame, an idle reader keeps no more than its idle capacity (it holds that
    /// much while it waits for the next frame).
    ///
    /// On paused time the sleep below ends only once every task waits, the reader task in its
    /// read included: the frame arrives at a waiting reader, every time, without a real delay.
    #[tokio::test(start_paused = true)]
    async fn an_idle_reader_releases_its_buffer() {
        let (mut a, b) = tokio::io::duplex(1 << 16);
        let mut reader = FrameReader::new(b, 1 << 16).idle_capacity(256);
        write_frame(&mut a, &[7u8; 10_000]).await.unwrap();
        assert_eq!(reader.next_frame().await.unwrap().unwrap().len(), 10_000);
        let waiting = tokio::spawn(async move {
            let frame = reader.next_frame().await.unwrap().unwrap();
            (reader, frame)
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        write_frame(&mut a, b"ping").await.unwrap();
        let (reader, frame) = waiting.await.unwrap();
        assert_eq!(frame, b"ping");
        assert!(reader.buf.capacity() <= 256, "{}", reader.buf.capacity());
    }
}
