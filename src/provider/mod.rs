//! Providers: what each `api_type` does with a routed request.
//!
//! The set of providers is closed, so it is an enum ([`Provider`], one variant per
//! [`ApiType`]), with one file per provider:
//! - [`openai`]: OpenAI and every OpenAI-compatible server. Same dialect as the client, so the
//!   request is passed through with at most the model spliced and usage requested, and the
//!   response is forwarded untouched but for the usage event the gateway itself asked for.
//! - [`azure`]: Azure OpenAI: the OpenAI passthrough, at a deployment's URL with an `api-key`.
//! - [`anthropic`]: Anthropic's Messages API, translated both ways; its stream is rewritten
//!   event by event by a [`Translate`] object.
//! - [`ollama`]: Ollama's native API, translated both ways; its NDJSON stream rewritten line by
//!   line.
//! - [`gemini`]: Google's Gemini API, translated both ways; its SSE stream rewritten event by
//!   event.
//! - [`mock`]: the built-in mock, answering in-process with deterministic, pre-rendered output.
//!
//! Every provider, the mock included, answers the same three questions, and the request flow
//! (`Proxy::forward`) never matches on a provider to do something special:
//! - [`Provider::prepare`]: the upstream request for one attempt, from the parsed client request
//!   ([`Call`]) and a [`Target`]. The URI, the credential and the body are built per attempt, so
//!   a model in the path, a query string or a per-request signature fit; the client's body is
//!   shared `Bytes`, never copied again, so preparing a retry is cheap.
//! - [`Provider::classify`]: from the upstream's response head, a [`Verdict`] before anything is
//!   committed to the client: success, or a failure with its [`Error`] (whose kind says whether
//!   another attempt may help, and whose `retry_after` says when). A non-2xx answer may be read
//!   (at most [`ERROR_BODY_LIMIT`] bytes) where the provider puts the facts in the body.
//! - [`Provider::respond`]: the client's response from the upstream's: passthrough, translation,
//!   or the mock's own body.
//!
//! [`Translate`] is the one trait for stream rewriting: one object per response holds the
//! provider-specific state (ids, tool-call index map, usage) and appends OpenAI SSE bytes, written
//! with [`chunk`], to the body's reused buffer. It names its upstream [`Framing`] (SSE, or NDJSON
//! lines) so the body drives the matching decoder, and gets an end-of-stream hook for providers
//! whose streams end at EOF. A new provider is one file implementing the three questions (and a
//! translator) plus its fixtures.

pub mod anthropic;
pub mod azure;
pub mod chat;
pub mod chunk;
pub mod gemini;
pub mod mock;
pub mod ollama;
pub mod openai;

use crate::body::{Body, Upstream};
use crate::config::{ConfigError, Connection, RawConnection};
use crate::error::{Error, Kind};
use crate::json::{RequestFields, Usage};
use crate::router::Target;
use crate::sse::Event;
pub use crate::sse::Framing;
use bytes::Bytes;
use bytes::BytesMut;
use http::header::{HeaderMap, HeaderName, HeaderValue, ACCEPT_ENCODING, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Limited};
use serde::Deserialize;
use std::time::{Duration, Instant};

/// The protocol a connection speaks (`api_type` in the config).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ApiType {
    /// OpenAI and every OpenAI-compatible server (vLLM, TGI, Groq, Mistral, llama.cpp, ...).
    #[serde(alias = "open_ai")]
    Openai,
    /// Anthropic's Messages API: OpenAI chat requests and responses are translated.
    Anthropic,
    /// Azure OpenAI: the OpenAI dialect at a deployment's URL, keyed by `api-key`.
    Azure,
    /// Ollama's native API: OpenAI chat and embeddings translated to `/api/chat` and `/api/embed`.
    Ollama,
    /// Google's Gemini API: OpenAI chat and embeddings translated both ways.
    Gemini,
    /// The built-in mock: answers in-process, no network hop.
    Mock,
}

impl ApiType {
    /// The name as written in the config.
    pub fn name(self) -> &'static str {
        match self {
            ApiType::Openai => "openai",
            ApiType::Anthropic => "anthropic",
            ApiType::Azure => "azure",
            ApiType::Ollama => "ollama",
            ApiType::Gemini => "gemini",
            ApiType::Mock => "mock",
        }
    }
}

/// A connection's provider and the settings only it uses.
#[derive(Debug)]
pub enum Provider {
    /// OpenAI-compatible passthrough.
    Openai(openai::Settings),
    /// Anthropic Messages, translated.
    Anthropic(anthropic::Settings),
    /// Azure OpenAI: the passthrough at a deployment's URL.
    Azure(azure::Settings),
    /// Ollama's native API, translated.
    Ollama(ollama::Settings),
    /// Google's Gemini API, translated.
    Gemini(gemini::Settings),
    /// The built-in mock.
    Mock,
}

/// The client's request as the flow parsed it; shared by every attempt.
#[derive(Clone, Copy)]
pub struct Call<'a> {
    /// The endpoint.
    pub api: Api,
    /// The whole body, validated JSON.
    pub body: &'a Bytes,
    /// Where `model`, `stream` and `stream_options` are in it.
    pub fields: &'a RequestFields,
    /// The model as requested (a fallback's name, when a fallback route is tried).
    pub model: &'a str,
    /// `model` is a fallback's name, not the one in the body: a `conn.*` target must be sent
    /// this name.
    pub fallback: bool,
    /// Whether the client asked for a stream.
    pub stream: bool,
    /// The client's headers (forwarded only through allow-lists).
    pub headers: &'a HeaderMap,
}

/// An upstream request for one attempt, and what the response side needs to know of it.
pub struct Prepared {
    /// The request to send.
    pub request: Request<Body>,
    /// How to read the answer.
    pub plan: Plan,
}

/// How an attempt's answer is to be read.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The client gets a stream.
    pub stream: bool,
    /// The gateway asked for stream usage on the client's behalf: passthrough removes the
    /// usage-only event.
    pub strip_usage: bool,
    /// The client asked for the usage chunk (read by translators, which emit it).
    pub include_usage: bool,
    /// What a translating provider makes of a successful answer.
    pub reply: Reply,
    /// When the whole answer must have arrived, for answers read whole (non-stream bodies,
    /// error bodies), and when the response head must have arrived, for every answer: the
    /// attempt's start plus the connection's `header_timeout`.
    pub deadline: Instant,
}

/// What a translating provider turns a successful answer into (passthrough providers forward
/// what comes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// A chat completion, or its stream.
    Chat,
    /// An embeddings list, its vectors as base64 or as floats.
    Embeddings {
        /// `encoding_format: "base64"`.
        base64: bool,
        /// The upstream model asked, named in the list.
        model: Box<str>,
    },
}

/// The upstream's answer to one attempt, judged before anything reaches the client.
pub enum Verdict {
    /// A usable answer: respond with it.
    Success(Response<Upstream>),
    /// A failure. `error` says what it was and whether another attempt may help; `relay` is the
    /// upstream's own answer, passed to the client when no other attempt follows (same-dialect
    /// providers relay error bodies as they are; others render `error`).
    Failure {
        /// What went wrong.
        error: Error,
        /// The upstream's answer to pass through instead of rendering `error`.
        relay: Option<Response<Upstream>>,
    },
}

/// The largest upstream error body read to classify a failure.
pub const ERROR_BODY_LIMIT: usize = 64 << 10;

impl Provider {
    /// Compiles the provider-specific keys of a connection; returns the provider and the headers
    /// that carry its credential.
    pub fn compile(
        api_type: ApiType,
        name: &str,
        raw: &RawConnection,
        secrets: &mut crate::config::Secrets<'_>,
    ) -> Result<(Provider, Vec<(HeaderName, HeaderValue)>), ConfigError> {
        match api_type {
            ApiType::Openai => openai::Settings::compile(name, raw, secrets),
            ApiType::Anthropic => anthropic::Settings::compile(name, raw, secrets),
            ApiType::Azure => azure::Settings::compile(name, raw, secrets),
            ApiType::Ollama => ollama::Settings::compile(name, raw, secrets),
            ApiType::Gemini => gemini::Settings::compile(name, raw, secrets),
            ApiType::Mock => mock::compile(name, raw),
        }
    }

    /// The `api_type` it was configured with.
    pub fn api_type(&self) -> ApiType {
        match self {
            Provider::Openai(_) => ApiType::Openai,
            Provider::Anthropic(_) => ApiType::Anthropic,
            Provider::Azure(_) => ApiType::Azure,
            Provider::Ollama(_) => ApiType::Ollama,
            Provider::Gemini(_) => ApiType::Gemini,
            Provider::Mock => ApiType::Mock,
        }
    }

    /// The base URL requests go to, for summaries; `None` for in-process providers.
    pub fn base_url(&self) -> Option<&str> {
        match self {
            Provider::Openai(s) => Some(&s.base),
            Provider::Anthropic(s) => Some(&s.base),
            Provider::Azure(s) => Some(&s.base),
            Provider::Ollama(s) => Some(&s.base),
            Provider::Gemini(s) => Some(&s.base),
            Provider::Mock => None,
        }
    }

    /// Whether `model`, written in a route's target, can be sent to this provider; the reason
    /// when not (checked when the config loads).
    pub fn check_model(&self, model: &str) -> Result<(), String> {
        match self {
            Provider::Azure(s) => s.check_model(model),
            Provider::Gemini(s) => s.check_model(model),
            _ => Ok(()),
        }
    }

    /// Whether the upstream speaks OpenAI's API itself (passthrough): embeddings are split and
    /// converted for it by [`crate::embed`].
    pub fn speaks_openai(&self) -> bool {
        matches!(self, Provider::Openai(_) | Provider::Azure(_) | Provider::Mock)
    }

    /// The upstream request for one attempt at `target`.
    pub fn prepare(&self, conn: &Connection, call: &Call<'_>, target: &Target) -> Result<Prepared, Error> {
        let deadline = Instant::now() + conn.timeouts.header;
        match self {
            Provider::Openai(s) => s.prepare(conn, call, target, deadline),
            Provider::Anthropic(s) => s.prepare(conn, call, target, deadline),
            Provider::Azure(s) => s.prepare(conn, call, target, deadline),
            Provider::Ollama(s) => s.prepare(conn, call, target, deadline),
            Provider::Gemini(s) => s.prepare(conn, call, target, deadline),
            Provider::Mock => mock::prepare(call, target, deadline),
        }
    }

    /// Judges the upstream's response head (reading a bounded error body where needed).
    pub async fn classify(&self, conn: &Connection, head: Response<Upstream>, plan: &Plan) -> Verdict {
        match self {
            Provider::Openai(_) | Provider::Azure(_) => openai::classify(conn, head),
            Provider::Anthropic(_) => classify_by_body(conn, head, plan, anthropic::error_of).await,
            Provider::Ollama(_) => classify_by_body(conn, head, plan, ollama::error_of).await,
            Provider::Gemini(_) => classify_by_body(conn, head, plan, gemini::error_of).await,
            Provider::Mock => mock::classify(head),
        }
    }

    /// The client's response from a successful (or relayed) upstream answer, and the usage
    /// already known (non-stream bodies read whole); streams record their usage as they go.
    pub async fn respond(
        &self,
        conn: &Connection,
        head: Response<Upstream>,
        plan: &Plan,
    ) -> Result<(Response<Body>, Option<Usage>), Error> {
        match self {
            Provider::Openai(_) | Provider::Azure(_) => openai::respond(conn, head, plan).map(|r| (r, None)),
            Provider::Anthropic(_) => anthropic::respond(conn, head, plan).await,
            Provider::Ollama(_) => respond_translated(conn, head, plan, ollama::MAX_BODY, &ollama::READERS).await,
            Provider::Gemini(_) => respond_translated(conn, head, plan, gemini::MAX_BODY, &gemini::READERS).await,
            Provider::Mock => Ok(mock::respond(head)),
        }
    }
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

    /// The upstream stream ended (EOF), after every event was handed to [`Translate::event`]. A
    /// provider whose streams end at EOF with no end event (Gemini) writes its last chunks and
    /// `[DONE]` here; the default says a stream that is not [`Translate::done`] was cut short.
    fn finish(&mut self, _out: &mut BytesMut) -> Result<(), Error> {
        if self.done() {
            return Ok(());
        }
        Err(Error::upstream_failure(Kind::UpstreamBroken, "the upstream stream ended before it was complete"))
    }

    /// Whether the stream is complete (`[DONE]` written, or an error returned).
    fn done(&self) -> bool;

    /// Token usage seen so far.
    fn usage(&self) -> Option<Usage>;
}

/// Client request headers that never go upstream, whatever a connection's `forward_headers`
/// patterns match (`"x-*"` would otherwise send the client's `x-api-key`): the client's
/// credentials and cookies, the headers that choose the operator's account (OpenAI's
/// organization and project: a client must not bill another one), the headers the gateway sets
/// itself for the body it sends (framing, type, encoding, host), and the hop-by-hop headers of
/// RFC 9110 §7.6.1.
const NEVER_FORWARDED: &[&str] = &[
    "authorization",
    "openai-organization",
    "openai-project",
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
/// own headers (its credential first).
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
        .map_err(|_| Error::upstream_failure(Kind::UpstreamUnreachable, "could not build the upstream request"))?;
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

/// Judges a head for a provider whose error facts are in its body: 2xx is a success; anything
/// else has its body read (at most [`ERROR_BODY_LIMIT`] bytes) and mapped by `error_of`
/// (connection name, status, body), with the upstream's `Retry-After` when it sent one; never
/// relayed.
pub async fn classify_by_body(
    conn: &Connection,
    head: Response<Upstream>,
    plan: &Plan,
    error_of: fn(&str, StatusCode, &[u8]) -> Error,
) -> Verdict {
    let status = head.status();
    if status.is_success() {
        return Verdict::Success(head);
    }
    let (parts, body) = head.into_parts();
    let body = read_body(conn, body, ERROR_BODY_LIMIT, plan.deadline).await.unwrap_or_default();
    let mut error = error_of(&conn.name, status, &body);
    // A Retry-After header wins over what the body said (Gemini's `RetryInfo`).
    error.retry_after = retry_after(&parts.headers).or(error.retry_after);
    Verdict::Failure { error, relay: None }
}

/// How a translating provider reads a successful answer: its stream translator for a response
/// id, and its renderers of a whole chat answer (for a response id) and of an embeddings answer
/// (for a model, base64 or not), each giving the OpenAI body and its usage.
pub struct Readers {
    /// A stream translator: `include_usage`, response id.
    pub stream: fn(bool, &str) -> Box<dyn Translate>,
    /// A whole chat answer → `chat.completion`.
    pub completion: fn(&[u8], &str) -> Rendered,
    /// An embeddings answer → an embeddings list.
    pub embeddings: fn(&[u8], &str, bool) -> Rendered,
}

/// A rendered OpenAI body and the usage it reports; `None` when the answer was unreadable.
pub type Rendered = Option<(Vec<u8>, Usage)>;

/// The client's response for a translating provider: a translated stream, or the whole answer
/// (at most `max_body` bytes, by the plan's deadline) rendered, with its usage.
pub async fn respond_translated(
    conn: &Connection,
    head: Response<Upstream>,
    plan: &Plan,
    max_body: usize,
    readers: &Readers,
) -> Result<(Response<Body>, Option<Usage>), Error> {
    let id = response_id();
    if plan.stream && plan.reply == Reply::Chat {
        let translator = (readers.stream)(plan.include_usage, &id);
        return Ok((translated_stream(conn, head.into_body(), translator), None));
    }
    let body = read_body(conn, head.into_body(), max_body, plan.deadline).await?;
    let rendered = match &plan.reply {
        Reply::Chat => (readers.completion)(&body, &id),
        Reply::Embeddings { base64, model } => (readers.embeddings)(&body, model, *base64),
    };
    let (out, usage) = rendered.ok_or_else(|| {
        Error::upstream_failure(
            Kind::UpstreamMalformed,
            format!("Connection `{}`: the upstream answered with an unreadable body.", conn.name),
        )
    })?;
    Ok((json_response(out), Some(usage)))
}

/// The client's response for a translated stream: the upstream body through `translator`.
pub fn translated_stream(conn: &Connection, upstream: Upstream, translator: Box<dyn Translate>) -> Response<Body> {
    let body = Body::passthrough(upstream, crate::body::Mode::translate(translator), conn.timeouts.idle, &conn.name);
    let mut r = Response::new(body);
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    r.headers_mut().insert(http::header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

/// The client's response for a translated JSON answer.
pub fn json_response(out: Vec<u8>) -> Response<Body> {
    let mut r = Response::new(Body::full(out));
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// Reads a whole upstream body of at most `limit` bytes by `deadline`.
pub async fn read_body(conn: &Connection, body: Upstream, limit: usize, deadline: Instant) -> Result<Bytes, Error> {
    let collect = Limited::new(body, limit).collect();
    match tokio::time::timeout_at(deadline.into(), collect).await {
        Ok(Ok(b)) => Ok(b.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(Error::upstream_failure(
            Kind::UpstreamMalformed,
            format!("Connection `{}`: the upstream body is larger than {limit} bytes.", conn.name),
        )),
        Ok(Err(_)) => Err(Error::upstream_failure(
            Kind::UpstreamBroken,
            format!("Connection `{}`: the upstream connection failed while sending its body.", conn.name),
        )),
        Err(_) => Err(Error::upstream_failure(
            Kind::UpstreamTimeout,
            format!("Connection `{}`: the upstream body did not arrive within {:?}.", conn.name, conn.timeouts.header),
        )),
    }
}

/// The delay an upstream asked for before a retry: `retry-after-ms` (OpenAI's, milliseconds),
/// else `retry-after` as seconds or as an HTTP date (RFC 9110 §10.2.3; a date in the past is
/// no delay).
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let text = |name: &str| headers.get(name)?.to_str().ok().map(str::trim);
    let number = |name: &str| text(name)?.parse::<f64>().ok();
    let ms = number("retry-after-ms").map(|ms| ms / 1e3);
    let secs = ms.or_else(|| number("retry-after"));
    let secs = secs.or_else(|| {
        let at = httpdate::parse_http_date(text("retry-after")?).ok()?;
        Some(at.duration_since(std::time::SystemTime::now()).map_or(0.0, |d| d.as_secs_f64()))
    });
    secs.filter(|s| s.is_finite() && *s >= 0.0 && *s < 1e7).map(Duration::from_secs_f64)
}

/// Whether a response head says its body is SSE.
pub fn is_event_stream(headers: &HeaderMap) -> bool {
    headers.get(CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"))
}

/// The error for a non-2xx answer of an OpenAI-dialect upstream, from its status alone (OpenAI
/// puts retry facts in headers, not the body): the status is kept, 401/403 mean the gateway's own
/// key was refused.
pub fn status_error(conn: &Connection, status: StatusCode, headers: &HeaderMap) -> Error {
    if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
        return Error::upstream_auth(&conn.name, status);
    }
    let r#type = match status.as_u16() {
        429 => "rate_limit_error",
        400..=499 => "invalid_request_error",
        _ => "api_error",
    };
    let mut e = Error::upstream_status(
        status,
        r#type,
        format!("Connection `{}` answered with status {}.", conn.name, status.as_u16()),
    );
    e.retry_after = retry_after(headers);
    e
}

/// The error for a translating provider's failure status, with the upstream's own message when
/// its body gave one: 401/403 mean the gateway's key was refused (502, the message dropped: it
/// may echo the key); 400, 404 (an unknown model), 413 and 422 are the client's to fix and keep
/// their status, as do 429 and 503 so clients back off; 408/504 are timeouts; anything else is
/// the upstream failing: 502.
pub fn said_error(connection: &str, status: StatusCode, said: Option<String>) -> Error {
    if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
        return Error::upstream_auth(connection, status);
    }
    let code = status.as_u16();
    let message = said
        .filter(|m| !m.is_empty())
        .unwrap_or_else(|| format!("Connection `{connection}` answered with status {code}."));
    match code {
        400 | 404 | 413 | 422 => Error::upstream_status(status, "invalid_request_error", message),
        429 => Error::upstream_status(status, "rate_limit_error", message),
        503 => Error::upstream_status(status, "api_error", message),
        408 | 504 => Error::upstream_failure(Kind::UpstreamTimeout, message),
        _ => Error::upstream_status(StatusCode::BAD_GATEWAY, "api_error", message).code("upstream_error"),
    }
}

/// `Ok` when `name` may be spliced into an upstream URL path ([`is_path_segment`]); else why
/// not, `what` saying what it should have been (say, "a Gemini model").
pub fn check_path_segment(name: &str, what: &str) -> Result<(), String> {
    if is_path_segment(name) {
        return Ok(());
    }
    Err(format!(
        "`{}` is not {what} name (letters, digits, `.`, `-`, `_` and `:`, starting with a letter or digit, at most \
         {MAX_PATH_SEGMENT} characters).",
        crate::error::clip(name),
    ))
}

/// The longest model or deployment name spliced into an upstream URL path.
pub const MAX_PATH_SEGMENT: usize = 128;

/// Whether `name` (a model or deployment name, possibly from the client) may be spliced into an
/// upstream URL path as one segment: ASCII letters, digits, `.`, `-`, `_` and `:`, starting with
/// a letter or digit (so never `.` or `..`), at most [`MAX_PATH_SEGMENT`] bytes. Nothing else a
/// client sends can add a path segment, a query, a fragment or another host.
pub fn is_path_segment(name: &str) -> bool {
    name.len() <= MAX_PATH_SEGMENT
        && name.as_bytes().first().is_some_and(u8::is_ascii_alphanumeric)
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b':'))
}

/// A fresh `chatcmpl-` id, for providers whose answers carry none of OpenAI's shape.
pub fn response_id() -> String {
    format!("chatcmpl-{:024x}", fastrand::u128(..) >> 32)
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

    /// The wire dialect of the endpoint (errors render in it).
    pub fn dialect(self) -> crate::error::Dialect {
        crate::error::Dialect::Openai
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs.iter().map(|(k, v)| (HeaderName::from_static(k), HeaderValue::from_static(v))).collect()
    }

    #[test]
    fn retry_after_reads_milliseconds_first_then_seconds() {
        assert_eq!(
            retry_after(&headers(&[("retry-after-ms", "1500"), ("retry-after", "9")])),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(retry_after(&headers(&[("retry-after", " 2 ")])), Some(Duration::from_secs(2)));
        assert_eq!(retry_after(&headers(&[("retry-after", "0.25")])), Some(Duration::from_millis(250)));
        for bad in ["Wed, 21 Oct 2015 07:28", "-1", "NaN", "1e12", ""] {
            assert_eq!(retry_after(&headers(&[("retry-after", bad)])), None, "{bad}");
        }
        // An HTTP date: the time left until it; one in the past is no wait.
        let at = httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(30));
        let mut h = HeaderMap::new();
        h.insert("retry-after", HeaderValue::from_str(&at).unwrap());
        let left = retry_after(&h).expect("a date");
        assert!(left > Duration::from_secs(28) && left <= Duration::from_secs(30), "{left:?}");
        assert_eq!(retry_after(&headers(&[("retry-after", "Wed, 21 Oct 2015 07:28:00 GMT")])), Some(Duration::ZERO));
        assert_eq!(retry_after(&headers(&[])), None);
    }
}
