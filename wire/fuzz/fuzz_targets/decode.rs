//! Any byte string, as one framed input, through the full decoder.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| drop(micromsg_wire::decode_framed(
    data,
    &micromsg_wire::Limits::default()
)));
