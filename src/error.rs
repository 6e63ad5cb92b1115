//! Errors that know whose fault they are.
//!
//! Every failure the gateway reports is an [`Error`]: an HTTP status, the OpenAI error `type`, an
//! optional `code` and `param`, and a message. It renders as the OpenAI error JSON
//! `{"error":{"message","type","param","code"}}` (what every OpenAI SDK parses into its
//! exception classes) or, once a stream has started and the status is gone, as one final SSE
//! `data:` event with the same object. Constructing an error has no side effects: `Proxy::handle`
//! logs once. Messages never contain secret values: they name connections and variables only.

use bytes::Bytes;
use http::StatusCode;
use std::fmt;

/// Who caused a failure: decides the log level and whether a retry elsewhere may help.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The request was wrong (bad JSON, unknown model, missing key).
    Client,
    /// The upstream provider failed or could not be reached.
    Upstream,
    /// The gateway itself (configuration, shutdown).
    Gateway,
}

/// An OpenAI-style error with its HTTP status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Error {
    /// HTTP status sent to the client.
    pub status: StatusCode,
    /// OpenAI error `type` (`invalid_request_error`, `authentication_error`, ...).
    pub kind: &'static str,
    /// OpenAI error `code` (`model_not_found`, `invalid_api_key`, ...), if any.
    pub code: Option<&'static str>,
    /// The request parameter at fault, if any.
    pub param: Option<&'static str>,
    /// Human-readable message; never contains secrets.
    pub message: String,
    /// Whose fault it is.
    pub side: Side,
}

impl Error {
    fn new(status: StatusCode, kind: &'static str, side: Side, message: impl Into<String>) -> Self {
        Error { status, kind, code: None, param: None, message: message.into(), side }
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

    /// 400: the request body or a parameter is invalid.
    pub fn invalid_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", Side::Client, message)
    }

    /// 401: one generic answer for a missing or unknown key, so callers cannot probe keys.
    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            Side::Client,
            "Invalid API key. Send a key of this gateway as `Authorization: Bearer KEY`.",
        )
        .code("invalid_api_key")
    }

    /// 403: the caller's group may not use what it asked for.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "permission_error", Side::Client, message).code("model_not_allowed")
    }

    /// 404: no route matches the requested model.
    pub fn model_not_found(model: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            Side::Client,
            format!("The model `{}` does not exist or is not routed by this gateway.", clip(model)),
        )
        .code("model_not_found")
        .param("model")
    }

    /// 404: the path is not an endpoint of this gateway.
    pub fn unknown_route(method: &http::Method, path: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            Side::Client,
            format!("Unknown request URL: {method} {}.", clip(path)),
        )
        .code("unknown_url")
    }

    /// 405: the path exists but not with this method.
    pub fn method_not_allowed(method: &http::Method, path: &str) -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request_error",
            Side::Client,
            format!("Method {method} is not allowed on {}.", clip(path)),
        )
    }

    /// 413: the request body exceeds `max_request_bytes`.
    pub fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            Side::Client,
            format!("Request body is larger than this gateway's limit of {limit} bytes."),
        )
        .code("request_too_large")
    }

    /// 408: the client did not send its request body in time.
    pub fn body_timeout(limit: std::time::Duration) -> Self {
        Self::new(
            StatusCode::REQUEST_TIMEOUT,
            "invalid_request_error",
            Side::Client,
            format!("The request body did not arrive within {limit:?}."),
        )
        .code("request_timeout")
    }

    /// 502: the upstream could not be reached or answered with something unusable.
    pub fn bad_gateway(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_GATEWAY, "api_error", Side::Upstream, message).code("upstream_error")
    }

    /// 503: the route exists but its connection is not usable now.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "api_error", Side::Gateway, message).code("connection_unavailable")
    }

    /// 504: the upstream did not answer in time.
    pub fn timeout(message: impl Into<String>) -> Self {
        Self::new(StatusCode::GATEWAY_TIMEOUT, "api_error", Side::Upstream, message).code("upstream_timeout")
    }

    /// An error the upstream reported inside a stream, with its own type (e.g.
    /// `overloaded_error`); rendered as the stream's final event.
    pub fn in_stream(kind: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_GATEWAY, kind, Side::Upstream, message)
    }

    /// An upstream error status mapped to ours, keeping the upstream's message.
    pub fn upstream(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self::new(status, kind, Side::Upstream, message)
    }

    /// Whether trying the same request on another candidate may succeed.
    pub fn retryable(&self) -> bool {
        self.side == Side::Upstream
    }

    /// The OpenAI error JSON object.
    pub fn to_json(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.message.len() + 96);
        out.extend_from_slice(b"{\"error\":{\"message\":");
        crate::json::write_str(&mut out, &self.message);
        out.extend_from_slice(b",\"type\":");
        crate::json::write_str(&mut out, self.kind);
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

    /// One final SSE event carrying the error, for failures after a stream has started.
    /// No `[DONE]` follows: the OpenAI SDKs raise `APIError` on an `error` object in the stream.
    pub fn to_sse(&self) -> Bytes {
        let mut out = b"data: ".to_vec();
        out.extend_from_slice(&self.to_json());
        out.extend_from_slice(b"\n\n");
        Bytes::from(out)
    }
}

/// Caps echoed client input so an error body cannot be made arbitrarily large.
fn clip(s: &str) -> &str {
    match s.char_indices().nth(200) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.status.as_u16(), self.message)
    }
}

impl std::error::Error for Error {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_openai_error_shape() {
        let e = Error::model_not_found("gpt-\"x\"");
        let v: serde_json::Value = serde_json::from_slice(&e.to_json()).unwrap();
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["code"], "model_not_found");
        assert_eq!(v["error"]["param"], "model");
        assert!(v["error"]["message"].as_str().unwrap().contains("gpt-\"x\""));
        assert_eq!(e.status, StatusCode::NOT_FOUND);
    }

    #[test]
    fn sse_rendering_is_one_data_event() {
        let s = Error::timeout("slow").to_sse();
        assert!(s.starts_with(b"data: {\"error\":"));
        assert!(s.ends_with(b"}}\n\n"));
    }

    #[test]
    fn long_client_input_is_clipped_in_messages() {
        let e = Error::model_not_found(&"m".repeat(10_000));
        assert!(e.message.len() < 400);
    }
}
