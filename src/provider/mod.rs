//! Providers: what each `api_type` does with a routed request.
//!
//! The set of providers is closed, so it is an enum ([`crate::config::ApiType`]) matched in
//! `Proxy::handle`, with one file per provider:
//! - [`openai`]: OpenAI and every OpenAI-compatible server. Same dialect as the client, so the
//!   request is passed through with at most the model spliced and usage requested, and the
//!   response is forwarded untouched but for the usage event the gateway itself asked for.
//! - [`mock`]: the built-in mock, answering in-process with deterministic, pre-rendered output.

pub mod mock;
pub mod openai;

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
