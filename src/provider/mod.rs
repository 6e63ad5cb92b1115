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
//! body's reused buffer, and says how its upstream frames events ([`Framing`]: SSE, or NDJSON
//! lines for Ollama-style streams), so the body drives the right decoder. A new provider is one
//! file implementing it plus its fixtures.

pub mod anthropic;
pub mod mock;
pub mod openai;

use crate::body::Body;
use crate::config::Connection;
use crate::error::Error;
use crate::json::Usage;
use crate::sse::Event;
use bytes::Bytes;
use bytes::BytesMut;
use http::header::{HeaderMap, HeaderName, HeaderValue, ACCEPT_ENCODING, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE};
use http::{Request, Uri};
use std::time::Duration;

/// How a provider frames the events of its stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// Server-sent events (Anthropic, OpenAI, Gemini's `alt=sse`, Cohere v2).
    Sse,
    /// One JSON document per line (Ollama): each non-blank line reaches
    /// [`Translate::event`] as an event with that line as its `data` and empty `event` and `id`.
    Ndjson,
}

/// Rewrites one provider response stream into OpenAI `chat.completion.chunk` SSE.
pub trait Translate: Send {
    /// How the upstream stream is framed; the body picks its decoder by it.
    fn framing(&self) -> Framing {
        Framing::Sse
    }

    /// Translates one decoded upstream event, appending OpenAI SSE bytes to `out`. An error the
    /// upstream reported in the stream comes back as `Err`; the body sends it as the final
    /// event. Events after the end are ignored.
    fn event(&mut self, event: &Event<'_>, out: &mut BytesMut) -> Result<(), Error>;

    /// Whether the stream is complete (`[DONE]` written, or an error returned).
    fn done(&self) -> bool;

    /// Token usage seen so far.
    fn usage(&self) -> Option<Usage>;
}

/// Client request headers that never go upstream, whatever a connection's `forward_headers`
/// patterns match (`"x-*"` would otherwise send the client's `x-api-key`): the client's
/// credentials and cookies, the headers the gateway sets itself for the body it sends
/// (framing, type, encoding, host), and the hop-by-hop headers of RFC 9110 §7.6.1.
const NEVER_FORWARDED: &[&str] = &[
    "authorization",
    "proxy-authorization",
    "x-api-key",
    "api-key",
    "cookie",
    "host",
    "content-length",
    "content-type",
    "content-encoding",
    "accept-encoding",
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Whether client header `name` goes upstream: it is on the provider's allow-list `allowed` or
/// matches the connection's `forward_headers`, and it is neither a credential, framing or
/// hop-by-hop header (`NEVER_FORWARDED`) nor named as hop-by-hop by the client's `Connection`
/// header.
pub fn forwarded(name: &HeaderName, allowed: &[&str], conn: &Connection, client_headers: &HeaderMap) -> bool {
    let n = name.as_str();
    (allowed.contains(&n) || conn.forward_headers.iter().any(|p| p.matches(n)))
        && !NEVER_FORWARDED.contains(&n)
        && !client_headers
            .get_all(CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|token| token.trim().eq_ignore_ascii_case(n))
}

/// A JSON POST to `uri` carrying `parts` (sent as they are, one frame each): `content-type`,
/// `content-length`, `accept-encoding: identity` (so usage can be read, and the client gets what
/// it would get uncompressed), the client headers [`forwarded`] allows, then the connection's
/// own headers (its key first).
pub fn upstream_post(
    conn: &Connection,
    uri: &Uri,
    parts: Vec<Bytes>,
    allowed: &[&str],
    client_headers: &HeaderMap,
) -> Result<Request<Body>, Error> {
    let len: usize = parts.iter().map(Bytes::len).sum();
    let mut req = Request::post(uri.clone())
        .body(Body::chunks(parts, Duration::ZERO))
        .map_err(|_| Error::bad_gateway("could not build the upstream request"))?;
    let h = req.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    h.insert(CONTENT_LENGTH, HeaderValue::from(len));
    h.insert(ACCEPT_ENCODING, HeaderValue::from_static("identity"));
    for (name, value) in client_headers {
        if forwarded(name, allowed, conn, client_headers) {
            h.append(name.clone(), value.clone());
        }
    }
    for (name, value) in &conn.headers {
        h.insert(name.clone(), value.clone());
    }
    Ok(req)
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
