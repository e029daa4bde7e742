//! Any byte string through the full decoder: as one framed input, and as a
//! stream of frames through `FrameDecoder`, whose length checks
//! (`frame::peek`) are the ones the async `io::FrameReader` makes.
#![no_main]

use micromsg_wire::{FrameDecoder, Limits, Message, decode_framed};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let limits = Limits::default();
    drop(decode_framed(data, &limits));
    let mut decoder = FrameDecoder::new(limits.max_frame_len);
    decoder.push(data);
    while let Ok(Some(body)) = decoder.next_frame() {
        drop(Message::decode(body, &limits));
    }
});
