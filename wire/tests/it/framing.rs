//! Length-prefix framing: incomplete input is a normal state, the length is
//! judged from the prefix alone, the limit is inclusive.

use crate::strategies;
use micromsg_wire::frame::{
    self, FrameDecoder, FrameError, PREFIX_LEN, Peek, check, decode_frame, encode_frame, peek,
};
use micromsg_wire::*;
use proptest::prelude::*;

fn framed(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    encode_frame(body, &mut out).unwrap();
    out
}

#[test]
fn every_incomplete_prefix_is_ok_none() {
    let frame = framed(b"Request: PING\nId: 1\n");
    for cut in 0..frame.len() {
        assert_eq!(check(&frame[..cut], 65536), Ok(None), "cut at {cut}");
        let mut decoder = FrameDecoder::new(65536);
        decoder.push(&frame[..cut]);
        assert_eq!(decoder.next_frame(), Ok(None));
        assert_eq!(
            decode_framed(&frame[..cut], &Limits::default()),
            Err(DecodeError::Truncated)
        );
    }
    assert_eq!(check(&frame, 65536), Ok(Some(frame.len())));
}

#[test]
fn peek_knows_the_frame_size_from_the_prefix() {
    let frame = framed(b"Request: PING\nId: 1\n");
    let total = frame.len();
    for cut in 0..PREFIX_LEN {
        assert_eq!(
            peek(&frame[..cut], 65536),
            Ok(Peek::NeedPrefix),
            "cut at {cut}"
        );
    }
    for cut in PREFIX_LEN..total {
        assert_eq!(peek(&frame[..cut], 65536), Ok(Peek::NeedBody { total }));
    }
    assert_eq!(peek(&frame, 65536), Ok(Peek::Complete { total }));
    // Bytes of the next frame do not change the verdict on this one.
    let mut two = frame.clone();
    two.extend_from_slice(&framed(b"x"));
    assert_eq!(peek(&two, 65536), Ok(Peek::Complete { total }));
    assert_eq!(Peek::NeedPrefix.total(), None);
    assert_eq!(Peek::NeedBody { total: 9 }.total(), Some(9));
}

#[test]
fn oversize_length_is_refused_before_the_body_arrives() {
    // Only the prefix has arrived: the decision is already made.
    let prefix = 65537u32.to_be_bytes();
    assert_eq!(
        check(&prefix, 65536),
        Err(FrameError::TooLarge {
            len: 65537,
            max: 65536
        })
    );
    let mut decoder = FrameDecoder::new(65536);
    decoder.push(&prefix);
    assert_eq!(
        decoder.next_frame(),
        Err(FrameError::TooLarge {
            len: 65537,
            max: 65536
        })
    );
    // A failed decoder stays failed: the stream is out of sync.
    decoder.push(&framed(b"Request: PING\nId: 1\n"));
    assert!(decoder.next_frame().is_err());
    assert_eq!(
        check(&u32::MAX.to_be_bytes(), 65536),
        Err(FrameError::TooLarge {
            len: u32::MAX as usize,
            max: 65536
        })
    );
    let error = decode_framed(&prefix, &Limits::default()).unwrap_err();
    assert_eq!(error.error_code(), ErrorCode::FrameTooLarge);
}

#[test]
fn zero_length_is_refused() {
    assert_eq!(check(&[0, 0, 0, 0], 65536), Err(FrameError::Empty));
    let error = decode_framed(&[0, 0, 0, 0], &Limits::default()).unwrap_err();
    assert_eq!(error, DecodeError::EmptyFrame);
    assert_eq!(error.error_code(), ErrorCode::BadFrame);
}

#[test]
fn exact_maximum_is_accepted() {
    // A valid request padded with a comment to exactly the limit.
    let head = b"Request: PING\nId: 1\n#".to_vec();
    for max in [64u32, 1000, 65536] {
        let mut body = head.clone();
        body.resize(max as usize, b'x');
        let frame = framed(&body);
        assert_eq!(check(&frame, max), Ok(Some(frame.len())));
        let limits = Limits {
            max_frame_len: max,
            ..Limits::default()
        };
        assert_eq!(
            decode_framed(&frame, &limits),
            Ok(Message::request(1, Request::Ping))
        );
        body.push(b'x');
        let frame = framed(&body);
        assert_eq!(
            decode_framed(&frame, &limits),
            Err(DecodeError::FrameTooLarge {
                len: max as usize + 1,
                max
            })
        );
    }
}

#[test]
fn trailing_bytes_are_refused_by_the_one_shot_decoder() {
    let mut frame = framed(b"Request: PING\nId: 1\n");
    frame.push(0);
    assert_eq!(
        decode_framed(&frame, &Limits::default()),
        Err(DecodeError::TrailingBytes { extra: 1 })
    );
}

#[test]
fn decode_frame_on_a_vec() {
    let mut buf = framed(b"a");
    buf.extend_from_slice(&framed(b"bc"));
    buf.extend_from_slice(&[0, 0]);
    assert_eq!(decode_frame(&mut buf, 10), Ok(Some(b"a".to_vec())));
    assert_eq!(decode_frame(&mut buf, 10), Ok(Some(b"bc".to_vec())));
    assert_eq!(decode_frame(&mut buf, 10), Ok(None));
    assert_eq!(buf, vec![0, 0]);
}

#[test]
fn encoder_checks_the_peers_limits() {
    use micromsg_wire::message::request::InboxAckArgs;
    let ids = (0..300u16)
        .map(|i| {
            let mut b = [0u8; 16];
            b[..2].copy_from_slice(&i.to_be_bytes());
            Hex16::from_bytes(b)
        })
        .collect();
    let request = Request::InboxAck(InboxAckArgs { ids });
    let small = Limits {
        max_frame_len: 1000,
        ..Limits::default()
    };
    assert!(matches!(
        request.encode_frame(1, &small),
        Err(EncodeError::FrameTooLarge { max: 1000, .. })
    ));
    let few_events = Limits {
        max_events: 100,
        ..Limits::default()
    };
    assert_eq!(
        request.encode_frame(1, &few_events),
        Err(EncodeError::LimitExceeded {
            which: Limit::Events
        })
    );
    assert!(request.encode_frame(1, &Limits::default()).is_ok());
}

/// A buffer that starts with a length prefix which is often valid for `max`, sometimes zero
/// or too large, and a few bytes after it.
fn prefixed_bytes(max: u32) -> impl Strategy<Value = Vec<u8>> {
    let len = prop_oneof![
        4 => 1..=max,
        1 => Just(0),
        1 => max..=max.saturating_add(2),
        1 => any::<u32>(),
    ];
    let rest = proptest::collection::vec(any::<u8>(), 0..80);
    (len, rest).prop_map(|(len, rest)| {
        let mut buf = len.to_be_bytes().to_vec();
        buf.extend(rest);
        buf
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, failure_persistence: None, ..ProptestConfig::default() })]

    /// What an incremental reader relies on: on any prefix of a stream, `peek` gives the
    /// verdict it gives on the whole stream, or the one before it (prefix not in yet, body not
    /// in yet with the same total). So the size it reserves for, and any error it reports,
    /// cannot change as more bytes arrive. `check` says the same.
    #[test]
    fn peek_verdicts_only_move_forward(
        (max, buf) in (1u32..100).prop_flat_map(|max| (Just(max), prefixed_bytes(max))),
        cut in any::<proptest::sample::Index>(),
    ) {
        let announced = u32::from_be_bytes(buf[..PREFIX_LEN].try_into().unwrap());
        let whole = peek(&buf, max);
        let expected_whole = if announced == 0 {
            Err(FrameError::Empty)
        } else if announced > max {
            Err(FrameError::TooLarge { len: announced as usize, max })
        } else if buf.len() >= PREFIX_LEN + announced as usize {
            Ok(Peek::Complete { total: PREFIX_LEN + announced as usize })
        } else {
            Ok(Peek::NeedBody { total: PREFIX_LEN + announced as usize })
        };
        prop_assert_eq!(whole, expected_whole);

        let part = &buf[..cut.index(buf.len() + 1)];
        let expected_part = match whole {
            _ if part.len() < PREFIX_LEN => Ok(Peek::NeedPrefix),
            Err(error) => Err(error),
            Ok(peeked) => {
                let total = peeked.total().unwrap();
                Ok(if part.len() >= total {
                    Peek::Complete { total }
                } else {
                    Peek::NeedBody { total }
                })
            }
        };
        prop_assert_eq!(peek(part, max), expected_part);
        let expected_check = expected_part.map(|peeked| match peeked {
            Peek::Complete { total } => Some(total),
            Peek::NeedPrefix | Peek::NeedBody { .. } => None,
        });
        prop_assert_eq!(check(part, max), expected_check);
    }

    /// However the byte stream is split into reads, the same frames come out.
    #[test]
    fn frames_survive_any_split(
        messages in proptest::collection::vec(strategies::message(), 1..6),
        cuts in proptest::collection::vec(1usize..64, 0..40),
    ) {
        let limits = Limits::default();
        let mut stream = Vec::new();
        for message in &messages {
            stream.extend_from_slice(&message.encode_frame(&limits).unwrap());
        }
        let mut decoder = FrameDecoder::new(limits.max_frame_len);
        let mut decoded = Vec::new();
        let mut rest = &stream[..];
        let mut cuts = cuts.into_iter();
        while !rest.is_empty() {
            let n = cuts.next().unwrap_or(rest.len()).min(rest.len());
            decoder.push(&rest[..n]);
            rest = &rest[n..];
            while let Some(body) = decoder.next_frame().unwrap() {
                decoded.push(Message::decode(body, &limits).unwrap());
            }
        }
        prop_assert_eq!(decoded, messages);
        prop_assert_eq!(decoder.buffered(), 0);
        prop_assert_eq!(frame::PREFIX_LEN, 4);
    }
}
