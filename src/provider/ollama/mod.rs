//! Ollama's native API (<https://github.com/ollama/ollama/blob/main/docs/api.md>): `/api/chat`
//! streams NDJSON, one JSON object per line, which [`stream`] rewrites into OpenAI chunks.

pub mod stream;
