//! Providers: what each `api_type` does with a routed request.
//!
//! The set of providers is closed, so it is an enum ([`crate::config::ApiType`]) matched in
//! `Proxy::handle`, with one file per provider:
//! - [`openai`]: OpenAI and every OpenAI-compatible server. Same dialect as the client, so the
//!   request is passed through with at most the model spliced and usage requested, and the
//!   response is forwarded untouched but for the usage event the gateway itself asked for.
//! - [`anthropic`]: Anthropic's Messages API, translated both ways; its stream is rewritten
//!   event by event by a [`Translate`] object.
//! - [`mock`]: the built-in mock, answering in-process with deterministic, pre-rendered output.
//!
//! [`Translate`] is the one trait for stream rewriting: one object per response holds the
//! provider-specific state (ids, tool-call index map, usage) and appends OpenAI SSE bytes to the
//! body's reused buffer. A new provider is one file implementing it plus its fixtures.

pub mod anthropic;
pub mod mock;
pub mod openai;

use crate::error::Error;
use crate::json::Usage;
use crate::sse::Event;
use bytes::BytesMut;

/// Rewrites one provider response stream into OpenAI `chat.completion.chunk` SSE.
pub trait Translate: Send {
    /// Translates one decoded upstream event, appending OpenAI SSE bytes to `out`. An error the
    /// upstream reported in the stream comes back as `Err`; the body sends it as the final
    /// event. Events after the end are ignored.
    fn event(&mut self, event: &Event<'_>, out: &mut BytesMut) -> Result<(), Error>;

    /// Whether the stream is complete (`[DONE]` written, or an error returned).
    fn done(&self) -> bool;

    /// Token usage seen so far.
    fn usage(&self) -> Option<Usage>;
}

/// Seconds since the Unix epoch, for `created` fields.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The OpenAI API endpoints the gateway serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// POST /v1/chat/completions
    Chat,
    /// POST /v1/completions (legacy)
    Completions,
    /// POST /v1/embeddings
    Embeddings,
}

impl Api {
    /// A short name for logs.
    pub fn name(self) -> &'static str {
        match self {
            Api::Chat => "chat",
            Api::Completions => "completions",
            Api::Embeddings => "embeddings",
        }
    }

    /// Whether the endpoint can stream.
    pub fn streams(self) -> bool {
        !matches!(self, Api::Embeddings)
    }
}
