//! cargo-fuzz entry for `micromsg_fuzz_targets::federation` (its docs say what it drives and checks).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| micromsg_fuzz_targets::federation::run(data));
