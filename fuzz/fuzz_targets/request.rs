//! Arbitrary client request bodies through the request scanner and the Anthropic request
//! translation: never a panic, and the scanner agrees with serde_json. See `../checks.rs`.

#![no_main]

#[path = "../checks.rs"]
mod checks;
#[path = "../../tests/it/reference.rs"]
mod reference;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::request(data));
