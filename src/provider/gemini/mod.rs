//! Google Gemini API (<https://ai.google.dev/api/generate-content>). So far its stream
//! translator ([`stream`]) and request translation ([`request`]); the connection type, non-stream
//! answers, errors and embeddings follow.

pub mod request;
pub mod stream;
