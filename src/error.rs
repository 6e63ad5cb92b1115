//! Errors that know their kind.
//!
//! Every failure the gateway reports is an [`Error`] of one [`Kind`] from a small closed set. The
//! kind decides whose fault it is ([`Side`]), whether another attempt may help ([`Retry`]), the
//! default HTTP status and the OpenAI error `type`; nothing in the flow has to guess from a status
//! code. Kinds and sides are the bounded labels that logs and metrics use.
//!
//! An error renders in the client's dialect ([`Dialect`]): for OpenAI, the error JSON
//! `{"error":{"message","type","param","code"}}` (what every OpenAI SDK parses into its exception
//! classes, <https://platform.openai.com/docs/guides/error-codes>) or, once a stream has started
//! and the status is gone, one final SSE `data:` event with the same object. Constructing an
//! error has no side effects: the request's record logs it once. Messages never contain secret
//! values: they name connections and variables only. The source error (a hyper or I/O error) is
//! kept for the log line, never shown to the client.

use bytes::Bytes;
use http::StatusCode;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// What went wrong: a closed set, each with its side, retry safety, status and OpenAI type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// The request body or a parameter is invalid (400).
    InvalidRequest,
    /// No key, or an unknown one (401).
    Unauthenticated,
    /// The caller's group may not use what it asked for (403).
    Forbidden,
    /// No such model or path (404).
    NotFound,
    /// The path exists, not with this method (405).
    MethodNotAllowed,
    /// The client did not send its body in time (408).
    ClientTimeout,
    /// The request body is over the limit (413).
    TooLarge,
    /// A rate, concurrency or budget limit of the gateway's (429).
    Limited,
    /// The upstream could not be reached: refused, unresolvable, no TLS handshake (502).
    UpstreamUnreachable,
    /// The request was sent and the upstream closed the connection before answering (502).
    UpstreamClosed,
    /// The upstream failed after its answer had started (502; in a stream, the final event).
    UpstreamBroken,
    /// The upstream did not answer, or stalled, within its timeout (504).
    UpstreamTimeout,
    /// The upstream answered with an error status (the status is mapped per provider).
    UpstreamStatus,
    /// The upstream's answer could not be read: malformed, oversized, not the protocol (502).
    UpstreamMalformed,
    /// The upstream rejected the gateway's own credentials (502: the operator must act).
    UpstreamAuth,
    /// The route exists but cannot be used now (a disabled connection) (503).
    Unavailable,
}

/// Who caused a failure: decides the log level and whether a retry elsewhere may help.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Side {
    /// The request was wrong (bad JSON, unknown model, missing key).
    Client,
    /// The upstream provider failed or could not be reached.
    Upstream,
    /// The gateway itself (configuration, shutdown).
    Gateway,
}

/// Whether the same request may be tried again, on this target or another.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Retry {
    /// Nothing reached the upstream, or the upstream said it did not do the work (a 429, a 503):
    /// another attempt cannot duplicate anything.
    Safe,
    /// The request was sent and no answer came: the upstream may have done (and billed) the work.
    Unsure,
    /// Another attempt gets the same answer, or the failure is the client's.
    Never,
}

/// The wire dialect of the client's endpoint: decides how errors render.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dialect {
    /// OpenAI's API shape (`/v1/chat/completions`, `/v1/completions`, `/v1/embeddings`).
    Openai,
}

impl Kind {
    /// Whose fault it is.
    pub fn side(self) -> Side {
        match self {
            Kind::InvalidRequest
            | Kind::Unauthenticated
            | Kind::Forbidden
            | Kind::NotFound
            | Kind::MethodNotAllowed
            | Kind::ClientTimeout
            | Kind::TooLarge
            | Kind::Limited => Side::Client,
            Kind::UpstreamUnreachable
            | Kind::UpstreamClosed
            | Kind::UpstreamBroken
            | Kind::UpstreamTimeout
            | Kind::UpstreamStatus
            | Kind::UpstreamMalformed => Side::Upstream,
            Kind::UpstreamAuth | Kind::Unavailable => Side::Gateway,
        }
    }

    /// The status sent when the kind alone decides it.
    pub fn status(self) -> StatusCode {
        match self {
            Kind::InvalidRequest => StatusCode::BAD_REQUEST,
            Kind::Unauthenticated => StatusCode::UNAUTHORIZED,
            Kind::Forbidden => StatusCode::FORBIDDEN,
            Kind::NotFound => StatusCode::NOT_FOUND,
            Kind::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Kind::ClientTimeout => StatusCode::REQUEST_TIMEOUT,
            Kind::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Kind::Limited => StatusCode::TOO_MANY_REQUESTS,
            Kind::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            Kind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Kind::UpstreamUnreachable
            | Kind::UpstreamClosed
            | Kind::UpstreamBroken
            | Kind::UpstreamStatus
            | Kind::UpstreamMalformed
            | Kind::UpstreamAuth => StatusCode::BAD_GATEWAY,
        }
    }

    /// The OpenAI error `type` when the upstream gave none.
    fn openai_type(self) -> &'static str {
        match self {
            Kind::InvalidRequest | Kind::NotFound | Kind::MethodNotAllowed | Kind::ClientTimeout | Kind::TooLarge => {
                "invalid_request_error"
            }
            Kind::Unauthenticated => "authentication_error",
            Kind::Forbidden => "permission_error",
            Kind::Limited => "rate_limit_error",
            _ => "api_error",
        }
    }

    /// A short stable name, for logs and metric labels.
    pub fn name(self) -> &'static str {
        match self {
            Kind::InvalidRequest => "invalid_request",
            Kind::Unauthenticated => "unauthenticated",
            Kind::Forbidden => "forbidden",
            Kind::NotFound => "not_found",
            Kind::MethodNotAllowed => "method_not_allowed",
            Kind::ClientTimeout => "client_timeout",
            Kind::TooLarge => "too_large",
            Kind::Limited => "limited",
            Kind::UpstreamUnreachable => "upstream_unreachable",
            Kind::UpstreamClosed => "upstream_closed",
            Kind::UpstreamBroken => "upstream_broken",
            Kind::UpstreamTimeout => "upstream_timeout",
            Kind::UpstreamStatus => "upstream_status",
            Kind::UpstreamMalformed => "upstream_malformed",
            Kind::UpstreamAuth => "upstream_auth",
            Kind::Unavailable => "unavailable",
        }
    }
}

impl Side {
    /// A short stable name, for logs and metric labels.
    pub fn name(self) -> &'static str {
        match self {
            Side::Client => "client",
            Side::Upstream => "upstream",
            Side::Gateway => "gateway",
        }
    }
}

/// An error with its kind, the status and OpenAI type sent, and a message.
#[derive(Clone, Debug)]
pub struct Error {
    /// What went wrong.
    pub kind: Kind,
    /// HTTP status sent to the client (the kind's, or a provider's mapping of an upstream status).
    pub status: StatusCode,
    /// OpenAI error `type` (`invalid_request_error`, `rate_limit_error`, ...).
    pub r#type: &'static str,
    /// OpenAI error `code` (`model_not_found`, `invalid_api_key`, ...), if any.
    pub code: Option<&'static str>,
    /// The request parameter at fault, if any.
    pub param: Option<&'static str>,
    /// Human-readable message; never contains secrets.
    pub message: String,
    /// How long the upstream asked us to wait before trying again (`Retry-After`), if it said.
    pub retry_after: Option<Duration>,
    /// The underlying error, for the log line only.
    pub source: Option<Arc<dyn std::error::Error + Send + Sync>>,
}

impl Error {
    /// An error of `kind` with the kind's status and type. The message is capped at
    /// [`MAX_MESSAGE`] bytes, whatever client or upstream text it quotes.
    pub fn new(kind: Kind, message: impl Into<String>) -> Self {
        let mut message = message.into();
        if message.len() > MAX_MESSAGE {
            message.truncate(clip_to(&message, MAX_MESSAGE - 3).len());
            message.push_str("...");
        }
        Error {
            kind,
            status: kind.status(),
            r#type: kind.openai_type(),
            code: None,
            param: None,
            message,
            retry_after: None,
            source: None,
        }
    }

    /// Sets the OpenAI `code`.
    pub fn code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    /// Sets the offending request parameter.
    pub fn param(mut self, param: &'static str) -> Self {
        self.param = Some(param);
        self
    }

    /// Keeps the underlying error for the log.
    pub fn caused_by(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Arc::new(source));
        self
    }

    /// Whose fault it is.
    pub fn side(&self) -> Side {
        self.kind.side()
    }

    /// Whether the same request may be tried again. For an upstream status it depends on the
    /// status (as mapped into `status`: Anthropic's 529 arrives as 503): 429, 503 and 529 say the
    /// work was not done; 500, 502 and 504 may follow work done; any other status (501, 505, a
    /// 4xx) is the same answer every time.
    pub fn retry(&self) -> Retry {
        match self.kind {
            // Nothing was done upstream; another target (with its own key) may well work.
            Kind::UpstreamUnreachable | Kind::UpstreamAuth | Kind::Unavailable => Retry::Safe,
            Kind::UpstreamClosed | Kind::UpstreamTimeout => Retry::Unsure,
            Kind::UpstreamStatus => match self.status.as_u16() {
                429 | 503 | 529 => Retry::Safe,
                500 | 502 | 504 => Retry::Unsure,
                _ => Retry::Never,
            },
            _ => Retry::Never,
        }
    }

    /// Whether another attempt (here or on another target) may succeed.
    pub fn retryable(&self) -> bool {
        self.retry() != Retry::Never
    }

    /// 400: the request body or a parameter is invalid.
    pub fn invalid_request(message: impl Into<String>) -> Self {
        Self::new(Kind::InvalidRequest, message)
    }

    /// 401: one generic answer for a missing or unknown key, so callers cannot probe keys.
    pub fn unauthorized() -> Self {
        Self::new(Kind::Unauthenticated, "Invalid API key. Send a key of this gateway as `Authorization: Bearer KEY`.")
            .code("invalid_api_key")
    }

    /// 403: the caller's group may not use what it asked for.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(Kind::Forbidden, message).code("model_not_allowed")
    }

    /// 404: no route matches the requested model.
    pub fn model_not_found(model: &str) -> Self {
        Self::new(
            Kind::NotFound,
            format!("The model `{}` does not exist or is not routed by this gateway.", clip(model)),
        )
        .code("model_not_found")
        .param("model")
    }

    /// 404: the path is not an endpoint of this gateway.
    pub fn unknown_route(method: &http::Method, path: &str) -> Self {
        Self::new(Kind::NotFound, format!("Unknown request URL: {method} {}.", clip(path))).code("unknown_url")
    }

    /// 405: the path exists but not with this method.
    pub fn method_not_allowed(method: &http::Method, path: &str) -> Self {
        Self::new(Kind::MethodNotAllowed, format!("Method {method} is not allowed on {}.", clip(path)))
    }

    /// 413: the request body exceeds `max_request_bytes`.
    pub fn too_large(limit: usize) -> Self {
        Self::new(Kind::TooLarge, format!("Request body is larger than this gateway's limit of {limit} bytes."))
            .code("request_too_large")
    }

    /// 408: the client did not send its request body in time.
    pub fn body_timeout(limit: Duration) -> Self {
        Self::new(Kind::ClientTimeout, format!("The request body did not arrive within {limit:?}."))
            .code("request_timeout")
    }

    /// 503: the route exists but its connection is not usable now.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(Kind::Unavailable, message).code("connection_unavailable")
    }

    /// 503: the gateway holds as many request bodies as `max_buffered_request_mb` allows and no
    /// room came free within the body timeout. The client is told to retry in a second.
    pub fn busy() -> Self {
        let mut e =
            Self::new(Kind::Unavailable, "The gateway is holding as many request bodies as it may; retry shortly.")
                .code("gateway_busy");
        e.retry_after = Some(Duration::from_secs(1));
        e
    }

    /// A failure of the upstream of `kind` (unreachable, closed, broken, timeout, malformed),
    /// with the codes clients see for it.
    pub fn upstream_failure(kind: Kind, message: impl Into<String>) -> Self {
        let code = if kind == Kind::UpstreamTimeout { "upstream_timeout" } else { "upstream_error" };
        Self::new(kind, message).code(code)
    }

    /// 502: the upstream refused the gateway's own key; the upstream body is never echoed.
    pub fn upstream_auth(connection: &str, status: StatusCode) -> Self {
        Self::new(
            Kind::UpstreamAuth,
            format!(
                "Connection `{connection}` rejected the gateway's credentials (upstream status {}). \
                 Check the connection's api_key.",
                status.as_u16()
            ),
        )
        .code("upstream_error")
    }

    /// An upstream error status, mapped to `status` and OpenAI `type`, keeping the upstream's
    /// message.
    pub fn upstream_status(status: StatusCode, r#type: &'static str, message: impl Into<String>) -> Self {
        Error { status, r#type, ..Self::new(Kind::UpstreamStatus, message) }
    }

    /// An error the upstream reported inside a stream, with its own type (e.g.
    /// `overloaded_error`); rendered as the stream's final event.
    pub fn in_stream(r#type: &'static str, message: impl Into<String>) -> Self {
        Error { r#type, ..Self::new(Kind::UpstreamStatus, message) }
    }

    /// The error body in `dialect`.
    pub fn render(&self, dialect: Dialect) -> Bytes {
        match dialect {
            Dialect::Openai => Bytes::from(self.to_json()),
        }
    }

    /// The final stream event carrying the error in `dialect`, for failures after a stream has
    /// started.
    pub fn render_event(&self, dialect: Dialect) -> Bytes {
        match dialect {
            Dialect::Openai => self.to_sse(),
        }
    }

    /// The OpenAI error JSON object.
    pub fn to_json(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.message.len() + 96);
        out.extend_from_slice(b"{\"error\":{\"message\":");
        crate::json::write_str(&mut out, &self.message);
        out.extend_from_slice(b",\"type\":");
        crate::json::write_str(&mut out, self.r#type);
        out.extend_from_slice(b",\"param\":");
        match self.param {
            Some(p) => crate::json::write_str(&mut out, p),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"code\":");
        match self.code {
            Some(c) => crate::json::write_str(&mut out, c),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b"}}");
        out
    }

    /// One final SSE event carrying the OpenAI error object. No `[DONE]` follows: the OpenAI
    /// SDKs raise `APIError` on an `error` object in the stream.
    pub fn to_sse(&self) -> Bytes {
        let mut out = b"data: ".to_vec();
        out.extend_from_slice(&self.to_json());
        out.extend_from_slice(b"\n\n");
        Bytes::from(out)
    }
}

/// The longest error message, in bytes.
pub const MAX_MESSAGE: usize = 1024;

/// The most of one client string (a model name, a path) echoed in an error or a log line, in
/// bytes.
pub const MAX_ECHO: usize = 256;

/// Caps echoed client input so an error body or a log line cannot be made arbitrarily large.
pub fn clip(s: &str) -> &str {
    clip_to(s, MAX_ECHO)
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
fn clip_to(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.status.as_u16(), self.message)
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_deref().map(|e| e as _)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn body(e: &Error) -> Value {
        serde_json::from_slice(&e.render(Dialect::Openai)).unwrap()
    }

    #[test]
    fn exactly_429_500_502_503_504_and_529_are_retried_among_upstream_statuses() {
        let retried: Vec<u16> = (400..600)
            .filter(|&s| Error::upstream_status(StatusCode::from_u16(s).unwrap(), "api_error", "x").retryable())
            .collect();
        assert_eq!(retried, [429, 500, 502, 503, 504, 529]);
    }

    #[test]
    fn every_kind_renders_its_status_type_side_and_retry() {
        let cases = [
            (Error::invalid_request("x"), 400, "invalid_request_error", Side::Client, Retry::Never),
            (Error::unauthorized(), 401, "authentication_error", Side::Client, Retry::Never),
            (Error::forbidden("x"), 403, "permission_error", Side::Client, Retry::Never),
            (Error::model_not_found("m"), 404, "invalid_request_error", Side::Client, Retry::Never),
            (
                Error::method_not_allowed(&http::Method::GET, "/p"),
                405,
                "invalid_request_error",
                Side::Client,
                Retry::Never,
            ),
            (Error::body_timeout(Duration::from_secs(1)), 408, "invalid_request_error", Side::Client, Retry::Never),
            (Error::too_large(10), 413, "invalid_request_error", Side::Client, Retry::Never),
            (Error::upstream_failure(Kind::UpstreamUnreachable, "x"), 502, "api_error", Side::Upstream, Retry::Safe),
            (Error::upstream_failure(Kind::UpstreamClosed, "x"), 502, "api_error", Side::Upstream, Retry::Unsure),
            (Error::upstream_failure(Kind::UpstreamTimeout, "x"), 504, "api_error", Side::Upstream, Retry::Unsure),
            (Error::upstream_failure(Kind::UpstreamBroken, "x"), 502, "api_error", Side::Upstream, Retry::Never),
            (Error::upstream_failure(Kind::UpstreamMalformed, "x"), 502, "api_error", Side::Upstream, Retry::Never),
            (Error::upstream_auth("c", StatusCode::UNAUTHORIZED), 502, "api_error", Side::Gateway, Retry::Safe),
            (Error::unavailable("x"), 503, "api_error", Side::Gateway, Retry::Safe),
            (
                Error::upstream_status(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", "slow"),
                429,
                "rate_limit_error",
                Side::Upstream,
                Retry::Safe,
            ),
            (
                Error::upstream_status(StatusCode::SERVICE_UNAVAILABLE, "api_error", "busy"),
                503,
                "api_error",
                Side::Upstream,
                Retry::Safe,
            ),
            (
                Error::upstream_status(StatusCode::BAD_REQUEST, "invalid_request_error", "no"),
                400,
                "invalid_request_error",
                Side::Upstream,
                Retry::Never,
            ),
        ];
        for (e, status, kind, side, retry) in cases {
            let case = format!("{:?}", e.kind);
            assert_eq!(e.status.as_u16(), status, "{case}");
            assert_eq!(body(&e)["error"]["type"], kind, "{case}");
            assert_eq!(body(&e)["error"]["message"], e.message.as_str(), "{case}");
            assert_eq!((e.side(), e.retry()), (side, retry), "{case}");
            assert_eq!(e.retryable(), retry != Retry::Never, "{case}");
        }
    }

    #[test]
    fn renders_openai_error_shape() {
        let e = Error::model_not_found("gpt-\"x\"");
        assert_eq!(
            body(&e),
            json!({"error":{"message":"The model `gpt-\"x\"` does not exist or is not routed by this gateway.",
                "type":"invalid_request_error","param":"model","code":"model_not_found"}})
        );
        assert_eq!(e.status, StatusCode::NOT_FOUND);
        assert_eq!(body(&Error::method_not_allowed(&http::Method::GET, "/x"))["error"]["code"], Value::Null);
    }

    #[test]
    fn sse_rendering_is_one_data_event_with_the_same_object() {
        let e = Error::upstream_failure(Kind::UpstreamTimeout, "slow");
        let s = e.render_event(Dialect::Openai);
        assert!(s.starts_with(b"data: {\"error\":"));
        assert!(s.ends_with(b"}}\n\n"));
        assert_eq!(&s[6..s.len() - 2], &e.render(Dialect::Openai)[..]);
    }

    #[test]
    fn the_source_is_kept_for_the_log_but_never_rendered() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset by peer 10.0.0.1");
        let e = Error::upstream_failure(Kind::UpstreamClosed, "closed").caused_by(io);
        assert!(std::error::Error::source(&e).unwrap().to_string().contains("reset by peer"));
        assert!(!String::from_utf8_lossy(&e.render(Dialect::Openai)).contains("reset"));
    }

    #[test]
    fn long_client_input_is_clipped_in_messages() {
        let e = Error::model_not_found(&"m".repeat(10_000));
        assert_eq!(
            e.message.matches('m').count(),
            MAX_ECHO + "The model `` does not exist or is not routed by this gateway.".matches('m').count()
        );
        // Multi-byte characters are never cut in half.
        let e = Error::model_not_found(&"é".repeat(10_000));
        assert!(e.message.len() < MAX_ECHO + 100, "{}", e.message.len());
        let e = Error::invalid_request(format!("invalid type: string \"{}\"", "✓".repeat(100_000)));
        assert!(e.message.len() <= MAX_MESSAGE && e.message.ends_with("..."), "{}", e.message.len());
    }
}
