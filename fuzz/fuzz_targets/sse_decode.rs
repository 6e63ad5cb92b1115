//! Arbitrary bytes through `sse::Decoder` (64 KiB limit) and `sse::LineDecoder`: never a panic,
//! state bounded by the limit, and the reference decoder's events. See `../checks.rs`.

#![no_main]

#[path = "../checks.rs"]
mod checks;
#[path = "../../tests/it/reference.rs"]
mod reference;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::decode(data));
