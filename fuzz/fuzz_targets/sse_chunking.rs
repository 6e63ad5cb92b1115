//! Differential chunking: the first two bytes choose split points in the rest; whole and split
//! feeding must agree for `Decoder`, `LineDecoder` and `Splitter`. See `../checks.rs`.

#![no_main]

#[path = "../checks.rs"]
mod checks;
#[path = "../../tests/it/reference.rs"]
mod reference;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::chunking(data));
