//! Google Gemini API (<https://ai.google.dev/api/generate-content>). So far its stream
//! translator ([`stream`]); the request side and the connection type follow.

pub mod stream;
