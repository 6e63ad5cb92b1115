//! Arbitrary Gemini `streamGenerateContent` SSE streams through the translator at arbitrary
//! chunkings: never a panic, output independent of chunking, output SSE whose data is JSON or
//! `[DONE]`. See `../checks.rs`.

#![no_main]

#[path = "../checks.rs"]
mod checks;
#[path = "../../tests/it/reference.rs"]
mod reference;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::gemini_stream(data));
