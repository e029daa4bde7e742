//! The async reader and writer (feature `tokio`) against the sans-IO framing
//! they are built on: however a stream arrives in reads, and however often a
//! read is cancelled, `FrameReader` yields what `FrameDecoder` makes of the
//! whole stream at once, and `write_frame` writes what the decoder reads.

use crate::strategies;
use micromsg_wire::frame::{FrameDecoder, FrameError, encode_frame};
use micromsg_wire::io::{FrameReadError, FrameReader, write_frame};
use micromsg_wire::{Limits, decode_framed};
use proptest::collection::vec;
use proptest::prelude::*;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, ReadBuf};

/// How a stream of frames ended, after the frames that were read.
#[derive(Debug, PartialEq, Eq)]
enum End {
    /// End of stream between frames.
    Clean,
    /// End of stream inside a frame.
    Truncated,
    /// A length prefix outside `1..=max`.
    BadLength { len: u32, max: u32 },
}

/// What the sans-IO decoder makes of `stream` pushed in one piece.
fn sans_io(stream: &[u8], max: u32) -> (Vec<Vec<u8>>, End) {
    let mut decoder = FrameDecoder::new(max);
    decoder.push(stream);
    let mut frames = Vec::new();
    loop {
        let end = match decoder.next_frame() {
            Ok(Some(body)) => {
                frames.push(body.to_vec());
                continue;
            }
            Ok(None) => {
                if decoder.buffered() == 0 {
                    End::Clean
                } else {
                    End::Truncated
                }
            }
            Err(FrameError::Empty) => End::BadLength { len: 0, max },
            Err(FrameError::TooLarge { len, max }) => End::BadLength {
                len: u32::try_from(len).unwrap(),
                max,
            },
            Err(other) => panic!("unexpected {other:?}"),
        };
        return (frames, end);
    }
}

/// Hands out `data` in reads of the sizes in `sizes` (cycled). With `stall`,
/// every read is first refused once with `Pending`, which the caller below
/// answers by dropping `next_frame` mid-read.
struct Chunks {
    data: Vec<u8>,
    at: usize,
    sizes: Vec<usize>,
    reads: usize,
    stall: bool,
    stalled: bool,
}

impl Chunks {
    fn new(data: Vec<u8>, sizes: Vec<usize>, stall: bool) -> Self {
        Self {
            data,
            at: 0,
            sizes,
            reads: 0,
            stall,
            stalled: false,
        }
    }
}

impl AsyncRead for Chunks {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if this.stall && !this.stalled {
            this.stalled = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        this.stalled = false;
        let size = this.sizes[this.reads % this.sizes.len()];
        this.reads += 1;
        let n = size.min(buf.remaining()).min(this.data.len() - this.at);
        buf.put_slice(&this.data[this.at..this.at + n]);
        this.at += n;
        Poll::Ready(Ok(()))
    }
}

/// `next_frame`, dropped and called again whenever it does not finish on its
/// first poll: what a `select!` against a timer or a shutdown signal does.
async fn next_frame_cancelled_when_pending(
    reader: &mut FrameReader<Chunks>,
) -> Result<Option<Vec<u8>>, FrameReadError> {
    loop {
        let mut next = std::pin::pin!(reader.next_frame());
        let polled = std::future::poll_fn(|cx| Poll::Ready(next.as_mut().poll(cx))).await;
        if let Poll::Ready(result) = polled {
            return result;
        }
    }
}

/// What the async reader makes of `reader`'s stream, frame by frame.
async fn through_reader(mut reader: FrameReader<Chunks>) -> (Vec<Vec<u8>>, End) {
    let mut frames = Vec::new();
    loop {
        let end = match next_frame_cancelled_when_pending(&mut reader).await {
            Ok(Some(body)) => {
                frames.push(body);
                continue;
            }
            Ok(None) => End::Clean,
            Err(FrameReadError::Truncated) => End::Truncated,
            Err(FrameReadError::BadLength { len, max }) => End::BadLength { len, max },
            Err(other) => panic!("unexpected {other}"),
        };
        return (frames, end);
    }
}

fn framed(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    encode_frame(body, &mut out).unwrap();
    out
}

fn block_on<F: Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(future)
}

/// One piece of a stream: mostly valid frames (up to exactly `max`), now and
/// then a zero or oversize prefix, or stray bytes that desynchronise the rest.
fn piece(max: u32) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        8 => vec(any::<u8>(), 1..=max as usize).prop_map(|body| framed(&body)),
        1 => Just(framed(&vec![b'm'; max as usize])),
        1 => Just(0u32.to_be_bytes().to_vec()),
        1 => (max.saturating_add(1)..=u32::MAX).prop_map(|len| len.to_be_bytes().to_vec()),
        1 => vec(any::<u8>(), 1..6),
    ]
}

/// A frame limit and a stream for it, possibly cut short anywhere. Small
/// limits make many frames per case; large ones reach the reader's buffer
/// policy (frames above its 4096 bytes of kept capacity).
fn stream() -> impl Strategy<Value = (u32, Vec<u8>)> {
    prop_oneof![1u32..=48, 4000u32..=9000].prop_flat_map(|max| {
        let pieces = vec(piece(max), 0..8);
        let cut = proptest::option::weighted(0.3, any::<proptest::sample::Index>());
        (Just(max), pieces, cut).prop_map(|(max, pieces, cut)| {
            let mut stream = pieces.concat();
            if let Some(cut) = cut {
                stream.truncate(cut.index(stream.len() + 1));
            }
            (max, stream)
        })
    })
}

fn read_sizes() -> impl Strategy<Value = Vec<usize>> {
    vec(prop_oneof![1usize..=16, 1usize..=3000], 1..16)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    /// The async reader returns the frames the sans-IO decoder finds in the
    /// whole stream, in order, and then ends the same way: cleanly, truncated
    /// or with the same bad length, whatever the read sizes, the idle
    /// capacity, and cancellations in the middle of reads.
    #[test]
    fn reader_agrees_with_the_sans_io_decoder(
        (max, stream) in stream(),
        sizes in read_sizes(),
        idle in proptest::option::of(0usize..6000),
        stall in any::<bool>(),
    ) {
        let expected = sans_io(&stream, max);
        let mut reader = FrameReader::new(Chunks::new(stream, sizes, stall), max);
        if let Some(idle) = idle {
            reader = reader.idle_capacity(idle);
        }
        let got = block_on(through_reader(reader));
        prop_assert_eq!(got, expected);
    }

    /// `write_frame`'s bytes are what the sans-IO encoder produces and decode
    /// with the sans-IO decoder, frame for frame.
    #[test]
    fn write_frame_output_decodes_with_the_sans_io_decoder(
        bodies in vec(vec(any::<u8>(), 1..300), 0..8),
    ) {
        let mut written = Vec::new();
        block_on(async {
            for body in &bodies {
                write_frame(&mut written, body).await.unwrap();
            }
        });
        let encoded: Vec<u8> = bodies.iter().flat_map(|body| framed(body)).collect();
        prop_assert_eq!(&written, &encoded);
        prop_assert_eq!(sans_io(&written, 300), (bodies, End::Clean));
    }

    /// What the broker does (a message's body through `write_frame`) is a
    /// frame the one-shot decoder reads back as the same message.
    #[test]
    fn written_messages_decode(message in strategies::message()) {
        let limits = Limits::default();
        let mut written = Vec::new();
        block_on(write_frame(&mut written, &message.encode())).unwrap();
        prop_assert_eq!(&written, &message.encode_frame(&limits).unwrap());
        prop_assert_eq!(decode_framed(&written, &limits), Ok(message));
    }
}
