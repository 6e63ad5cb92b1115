//! Anthropic Messages API (`api_type = "anthropic"`): OpenAI chat in, OpenAI chat out.
//!
//! - [`request`]: the OpenAI chat request translated to a Messages request.
//! - [`stream`]: the Messages event stream rewritten into OpenAI chunks, event by event.
//! - here: the upstream request (`x-api-key`, `anthropic-version`), non-stream responses
//!   (message → `chat.completion`), and error statuses (Anthropic error JSON → OpenAI error).
//!
//! Thinking output is exposed as `reasoning_content` (as DeepSeek and LiteLLM do); signatures
//! are not sent to the client.

pub mod request;
pub mod stream;

use super::{Api, Call, Plan, Prepared, Reply};
use crate::body::{Body, Upstream};
use crate::config::{ConfigError, Connection, RawConnection, Secrets};
use crate::error::{Error, Kind};
use crate::json::{self, Raw, Usage};
use crate::router::Target;
use http::header::{HeaderName, HeaderValue};
use http::{Response, StatusCode, Uri};
use serde::Deserialize;
use std::time::Instant;

/// Largest non-stream body read whole.
const MAX_BODY: usize = 64 << 20;

/// Client headers forwarded to Anthropic. Not `anthropic-beta`: a beta changes what the operator's
/// account is asked to run (and bill), so it goes upstream only where a connection lists it in
/// `forward_headers`.
const REQUEST_HEADERS: &[&str] = &["user-agent", "x-request-id"];

/// The Anthropic API's base URL, as the Anthropic SDKs' `base_url` (without `/v1`).
const DEFAULT_BASE: &str = "https://api.anthropic.com";
/// The `anthropic-version` header value (<https://docs.anthropic.com/en/api/versioning>).
const DEFAULT_VERSION: &str = "2023-06-01";

/// An Anthropic connection's own settings.
#[derive(Debug)]
pub struct Settings {
    /// The base URL as configured (for summaries).
    pub base: String,
    /// `{base}/v1/messages`.
    pub messages: Uri,
}

impl Settings {
    /// Compiles `api_base`, `api_key` (sent as `x-api-key`) and `anthropic_version`.
    pub fn compile(
        name: &str,
        raw: &RawConnection,
        secrets: &mut Secrets<'_>,
    ) -> Result<(super::Provider, Vec<(HeaderName, HeaderValue)>), ConfigError> {
        let key = |k: &str| format!("connections.{name}.{k}");
        let base = secrets.base(raw, DEFAULT_BASE);
        let mut headers = Vec::new();
        if raw.api_key.is_none() {
            return Err(ConfigError(format!("{}: an anthropic connection needs a key", key("api_key"))));
        }
        headers.extend(secrets.key_header(raw, HeaderName::from_static("x-api-key"), "")?);
        let version = raw.anthropic_version.as_deref().unwrap_or(DEFAULT_VERSION);
        headers.push((
            HeaderName::from_static("anthropic-version"),
            crate::config::header_value(&key("anthropic_version"), version)?,
        ));
        let messages = crate::config::endpoint_url(&key("api_base"), &base, "/v1/messages")?;
        Ok((super::Provider::Anthropic(Settings { base, messages }), headers))
    }

    /// The Messages request for a chat call.
    pub fn prepare(
        &self,
        conn: &Connection,
        call: &Call<'_>,
        target: &Target,
        deadline: Instant,
    ) -> Result<Prepared, Error> {
        if call.api != Api::Chat {
            return Err(Error::invalid_request(format!(
                "Model `{}` is served by an Anthropic connection, which has no /v1/{} endpoint.",
                call.model,
                call.api.name()
            ))
            .param("model"));
        }
        // The Messages API requires `max_tokens`: the connection's default when the client gives none.
        let translated = request::translate(call.body, target.upstream_model(call.model), conn.default_max_tokens)?;
        let request = super::upstream_post(conn, &self.messages, vec![translated.body], REQUEST_HEADERS, call.headers)?;
        let plan = Plan {
            stream: translated.stream,
            strip_usage: false,
            include_usage: translated.include_usage,
            reply: Reply::Chat,
            deadline,
        };
        Ok(Prepared { request, plan })
    }
}

/// The client's response: a translated stream, or a translated message and its usage.
pub async fn respond(
    conn: &Connection,
    head: Response<Upstream>,
    plan: &Plan,
) -> Result<(Response<Body>, Option<Usage>), Error> {
    if plan.stream && super::is_event_stream(head.headers()) {
        let translator = Box::new(stream::Stream::new(plan.include_usage));
        return Ok((super::translated_stream(conn, head.into_body(), translator), None));
    }
    let body = super::read_body(conn, head.into_body(), MAX_BODY, plan.deadline).await?;
    let (out, usage) = message(&body).ok_or_else(|| {
        Error::upstream_failure(
            Kind::UpstreamMalformed,
            format!("Connection `{}`: the upstream answered with an unreadable message.", conn.name),
        )
    })?;
    Ok((super::json_response(out), Some(usage)))
}

/// The OpenAI error `type` for an Anthropic one, as a static string.
pub fn known_error_type(kind: &str) -> &'static str {
    match kind {
        "invalid_request_error" => "invalid_request_error",
        "authentication_error" => "authentication_error",
        "permission_error" => "permission_error",
        "not_found_error" => "not_found_error",
        "request_too_large" => "request_too_large",
        "rate_limit_error" => "rate_limit_error",
        "overloaded_error" => "overloaded_error",
        _ => "api_error",
    }
}

#[derive(Deserialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Deserialize)]
struct ErrorDetail {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    message: String,
}

/// An Anthropic error status and body as the client's OpenAI error. 401/403 mean the provider
/// rejected the gateway's key: 502, and the body (which may echo key fragments) is dropped. A
/// known Anthropic error type decides the status; a body that is not Anthropic's error JSON (a
/// proxy's HTML page, an empty body) or a type without a mapping falls back on the status.
pub fn error_of(connection: &str, status: StatusCode, body: &[u8]) -> Error {
    if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
        return Error::upstream_auth(connection, status);
    }
    let Ok(ErrorBody { error }) = serde_json::from_slice::<ErrorBody>(body) else {
        return error_of_status(connection, status, None);
    };
    let message = error.message;
    match error.kind.as_str() {
        "invalid_request_error" => Error::upstream_status(StatusCode::BAD_REQUEST, "invalid_request_error", message),
        "not_found_error" => Error::upstream_status(StatusCode::NOT_FOUND, "invalid_request_error", message),
        "request_too_large" => Error::upstream_status(StatusCode::PAYLOAD_TOO_LARGE, "invalid_request_error", message),
        "rate_limit_error" => Error::upstream_status(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", message),
        "overloaded_error" => Error::upstream_status(
            StatusCode::SERVICE_UNAVAILABLE,
            "api_error",
            format!("Anthropic is overloaded: {message}"),
        ),
        "authentication_error" | "permission_error" => Error::upstream_auth(connection, status),
        // `api_error` (Anthropic's internal error) and types added later.
        _ => error_of_status(connection, status, Some(message).filter(|m| !m.is_empty())),
    }
}

/// The error for an upstream status alone, keeping the upstream's message when it gave one:
/// 529 (Anthropic's overload) is a 503 and 429 stays 429, so clients back off and retry; a
/// timeout is a 504; 400, 413 and 422 refused the request itself and keep their status; any
/// other status (a 404 or 405 from a wrong `api_base`, a 5xx) is the upstream failing: 502.
fn error_of_status(connection: &str, status: StatusCode, message: Option<String>) -> Error {
    let code = status.as_u16();
    let said = |fallback: String| message.unwrap_or(fallback);
    match code {
        529 => Error::upstream_status(
            StatusCode::SERVICE_UNAVAILABLE,
            "api_error",
            format!(
                "Anthropic is overloaded: {}",
                said(format!("connection `{connection}` answered with status 529."))
            ),
        ),
        429 => Error::upstream_status(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            said(format!("Connection `{connection}` is rate limited by the upstream (status 429).")),
        ),
        408 | 504 => Error::upstream_failure(
            Kind::UpstreamTimeout,
            said(format!("Connection `{connection}` timed out upstream (status {code}).")),
        ),
        400 | 413 | 422 => Error::upstream_status(
            status,
            "invalid_request_error",
            said(format!("Connection `{connection}` refused the request (status {code}).")),
        ),
        _ => Error::upstream_status(
            StatusCode::BAD_GATEWAY,
            "api_error",
            said(format!("Connection `{connection}` answered with status {code}.")),
        )
        .code("upstream_error"),
    }
}

#[derive(Deserialize)]
struct Message<'a> {
    id: &'a str,
    model: &'a str,
    #[serde(borrow, default)]
    content: Vec<ContentBlock<'a>>,
    stop_reason: Option<&'a str>,
    usage: Option<UsageJson>,
}

/// A content block, flat: every kind's fields are optional, and kinds we do not map (server
/// tools, redacted thinking, future ones) are skipped without failing the message.
#[derive(Deserialize)]
struct ContentBlock<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    text: Option<&'a str>,
    thinking: Option<&'a str>,
    id: Option<&'a str>,
    name: Option<&'a str>,
    input: Option<Raw>,
}

/// A Messages response as an OpenAI `chat.completion`, and its usage. Parsed whole with
/// simd-json on the thread's scratch copy ([`json::with_scratch`]).
pub fn message(body: &[u8]) -> Option<(Vec<u8>, Usage)> {
    json::with_scratch(body, |scratch| render_message(scratch.parse().ok()?, body.len()))
}

fn render_message(m: Message, size: usize) -> Option<(Vec<u8>, Usage)> {
    let mut text = String::new();
    let mut thinking = String::new();
    let mut calls = Vec::new();
    for b in &m.content {
        match b.kind {
            "text" => text.push_str(b.text.unwrap_or_default()),
            "thinking" => thinking.push_str(b.thinking.unwrap_or_default()),
            "tool_use" => calls.push((
                b.id.unwrap_or_default().to_owned(),
                b.name.unwrap_or_default(),
                b.input.as_ref().map(|r| &r.0[..]),
            )),
            _ => {}
        }
    }
    let tokens = m.usage.unwrap_or_default();
    let usage = tokens.usage();
    let completion = super::chunk::Completion {
        id: m.id,
        model: m.model,
        text: &text,
        thinking: &thinking,
        calls,
        finish: m.stop_reason.map_or("stop", |r| stream::finish_reason(r.as_bytes())),
        usage,
        cached: Some(tokens.cache_read_input_tokens.unwrap_or(0)),
    };
    Some((completion.render(size)?, usage))
}

#[derive(Deserialize, Default)]
struct UsageJson {
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    cache_read_input_tokens: Option<u64>,
    cache_creation_input_tokens: Option<u64>,
}

impl UsageJson {
    fn usage(&self) -> Usage {
        let n = |v: Option<u64>| v.unwrap_or(0);
        Usage {
            prompt: n(self.input_tokens)
                .saturating_add(n(self.cache_read_input_tokens))
                .saturating_add(n(self.cache_creation_input_tokens)),
            completion: n(self.output_tokens),
            cached: n(self.cache_read_input_tokens),
            cache_write: n(self.cache_creation_input_tokens),
        }
    }
}

#[cfg(test)]
mod tests {
    //! Non-stream mappings on synthetic messages; expectations written by hand from
    //! the Anthropic message (<https://docs.anthropic.com/en/api/messages>) and the OpenAI chat
    //! completion (<https://platform.openai.com/docs/api-reference/chat/object>).

    use super::*;
    use serde_json::{json, Value};

    /// The chat.completion for `msg` (`created` checked and removed), and the usage recorded.
    fn completion(msg: Value) -> (Value, Usage) {
        completion_of(&msg.to_string())
    }

    fn completion_of(body: &str) -> (Value, Usage) {
        let (out, usage) = message(body.as_bytes()).expect("a readable message");
        let mut v: Value = serde_json::from_slice(&out).unwrap();
        assert!(v.as_object_mut().unwrap().remove("created").is_some_and(|c| c.is_u64()));
        (v, usage)
    }

    fn msg(content: Value, stop_reason: &str, usage: Value) -> Value {
        json!({"id":"msg_1","type":"message","role":"assistant","model":"claude-x","content":content,
            "stop_reason":stop_reason,"stop_sequence":null,"usage":usage})
    }

    #[test]
    fn thinking_becomes_reasoning_content_without_its_signature() {
        let m = msg(
            json!([{"type":"thinking","thinking":"First, \"why\"?\n","signature":"EqQBsecret"},
                   {"type":"redacted_thinking","data":"opaque"},
                   {"type":"text","text":"Because."}]),
            "end_turn",
            json!({"input_tokens":7,"output_tokens":11}),
        );
        let (got, usage) = completion(m);
        assert_eq!(
            got,
            json!({"id":"msg_1","object":"chat.completion","model":"claude-x",
                "choices":[{"index":0,"message":{"role":"assistant","content":"Because.",
                    "reasoning_content":"First, \"why\"?\n"},"logprobs":null,"finish_reason":"stop"}],
                "usage":{"prompt_tokens":7,"completion_tokens":11,"total_tokens":18,
                    "prompt_tokens_details":{"cached_tokens":0}}})
        );
        assert_eq!(usage, Usage { prompt: 7, completion: 11, ..Usage::default() });
        assert!(!got.to_string().contains("EqQBsecret") && !got.to_string().contains("opaque"));
    }

    #[test]
    fn stop_reasons_map_to_finish_reasons() {
        for (stop_reason, finish) in [
            ("max_tokens", "length"),
            ("stop_sequence", "stop"),
            ("refusal", "content_filter"),
            ("tool_use", "tool_calls"),
        ] {
            let (got, _) = completion(msg(json!([{"type":"text","text":"x"}]), stop_reason, json!({})));
            assert_eq!(got["choices"][0]["finish_reason"], finish, "{stop_reason}");
        }
    }

    #[test]
    fn cache_reads_and_writes_count_as_prompt_tokens_and_reads_as_cached() {
        let usage = json!({"input_tokens":10,"cache_creation_input_tokens":200,"cache_read_input_tokens":3000,
            "cache_creation":{"ephemeral_5m_input_tokens":200,"ephemeral_1h_input_tokens":0},
            "output_tokens":42,"service_tier":"standard"});
        let (got, recorded) = completion(msg(json!([{"type":"text","text":"x"}]), "end_turn", usage));
        assert_eq!(
            got["usage"],
            json!({"prompt_tokens":3210,"completion_tokens":42,"total_tokens":3252,
                "prompt_tokens_details":{"cached_tokens":3000}})
        );
        assert_eq!(recorded, Usage { prompt: 3210, completion: 42, cached: 3000, cache_write: 200 });
    }

    #[test]
    fn error_bodies_that_are_not_anthropic_errors_are_mapped_by_their_status() {
        let html = "<html><body>secret-proxy-page</body></html>";
        for (status, body, want_status, want_type) in [
            (529, html, 503, "api_error"),
            (529, "", 503, "api_error"),
            (429, html, 429, "rate_limit_error"),
            (500, html, 502, "api_error"),
            (503, "", 502, "api_error"),
            (504, "", 504, "api_error"),
            (408, "", 504, "api_error"),
            (400, html, 400, "invalid_request_error"),
            (413, "", 413, "invalid_request_error"),
            (404, html, 502, "api_error"),
            (405, "", 502, "api_error"),
            (529, r#"{"type":"error","error":{"type":"added_later_error","message":"Busy"}}"#, 503, "api_error"),
            (
                429,
                r#"{"type":"error","error":{"type":"added_later_error","message":"Slow down"}}"#,
                429,
                "rate_limit_error",
            ),
            (
                500,
                r#"{"type":"error","error":{"type":"api_error","message":"Internal server error"}}"#,
                502,
                "api_error",
            ),
            (502, r#"{"error":"not Anthropic's shape"}"#, 502, "api_error"),
        ] {
            let e = error_of("anthropic", StatusCode::from_u16(status).unwrap(), body.as_bytes());
            let case = format!("{status} {body}");
            assert_eq!((e.status.as_u16(), e.r#type), (want_status, want_type), "{case}");
            assert!(!e.message.is_empty() && !e.message.contains("secret-proxy-page"), "{case}: {}", e.message);
        }
    }

    #[test]
    fn an_unknown_error_type_keeps_the_upstream_message() {
        let overloaded = br#"{"type":"error","error":{"type":"added_later_error","message":"Busy"}}"#;
        let e = error_of("anthropic", StatusCode::from_u16(529).unwrap(), overloaded);
        assert_eq!(e.message, "Anthropic is overloaded: Busy");
        let internal = br#"{"type":"error","error":{"type":"api_error","message":"Internal server error"}}"#;
        assert_eq!(error_of("anthropic", StatusCode::INTERNAL_SERVER_ERROR, internal).message, "Internal server error");
        let e = error_of("anthropic", StatusCode::from_u16(529).unwrap(), b"");
        assert_eq!(e.message, "Anthropic is overloaded: connection `anthropic` answered with status 529.");
    }

    #[test]
    fn token_counts_at_the_top_of_u64_saturate_instead_of_overflowing() {
        let max = u64::MAX;
        let usage = json!({"input_tokens":max,"cache_read_input_tokens":max,"cache_creation_input_tokens":1,"output_tokens":max});
        let (got, recorded) = completion(msg(json!([{"type":"text","text":"x"}]), "end_turn", usage));
        assert_eq!(recorded, Usage { prompt: max, completion: max, cached: max, cache_write: 1 });
        assert_eq!(got["usage"]["total_tokens"], max);
    }

    #[test]
    fn tool_input_becomes_the_arguments_string_in_its_key_order() {
        // Written out, not built with `json!`, whose objects sort their keys.
        let (got, _) = completion_of(
            r#"{"id":"msg_1","type":"message","role":"assistant","model":"claude-x","stop_reason":"tool_use",
            "content":[{"type":"tool_use","id":"toolu_1","name":"f","input": { "z" : 1, "a":{"b":[true, null,"\u00e9\n"]}}}],
            "usage":{}}"#,
        );
        let call = &got["choices"][0]["message"]["tool_calls"][0];
        assert_eq!(call["id"], "toolu_1");
        assert_eq!(call["function"]["name"], "f");
        assert_eq!(call["function"]["arguments"], "{\"z\":1,\"a\":{\"b\":[true,null,\"é\\n\"]}}");
        assert_eq!(got["choices"][0]["message"]["content"], Value::Null);
    }
}
