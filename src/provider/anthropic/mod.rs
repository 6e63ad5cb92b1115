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

use super::Translate;
use crate::body::{Body, Mode};
use crate::config::Connection;
use crate::error::Error;
use crate::json::{self, Raw, Usage};
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde::Deserialize;

/// Largest non-stream or error body read whole.
const MAX_BODY: usize = 64 << 20;

/// Client headers forwarded to Anthropic.
const REQUEST_HEADERS: &[&str] = &["user-agent", "anthropic-beta", "x-request-id"];

/// Builds the upstream Messages request.
pub fn upstream_request(
    conn: &Connection,
    translated: &request::Translated,
    client_headers: &HeaderMap,
) -> Result<Request<Body>, Error> {
    let urls = conn.urls.as_ref().ok_or_else(|| Error::unavailable("connection has no URL"))?;
    super::upstream_post(conn, &urls.chat, vec![translated.body.clone()], REQUEST_HEADERS, client_headers)
}

/// Turns the Messages response into the client's: a translated stream, a translated message,
/// or a mapped error.
pub async fn response(
    conn: &Connection,
    resp: Response<Incoming>,
    translated: &request::Translated,
) -> Result<(Response<Body>, Option<Usage>), Error> {
    let status = resp.status();
    if !status.is_success() {
        let body = read(conn, resp.into_body()).await.unwrap_or_default();
        return Err(error_of(&conn.name, status, &body));
    }
    let is_sse =
        resp.headers().get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    if translated.stream && is_sse {
        let translator: Box<dyn Translate> = Box::new(stream::Stream::new(translated.include_usage));
        let body = Body::passthrough(resp.into_body(), Mode::translate(translator), conn.timeouts.idle, &conn.name);
        let mut r = Response::new(body);
        r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
        r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        return Ok((r, None));
    }
    let body = read(conn, resp.into_body()).await?;
    let (out, usage) = message(&body).ok_or_else(|| {
        Error::bad_gateway(format!("Connection `{}`: the upstream answered with an unreadable message.", conn.name))
    })?;
    let mut r = Response::new(Body::full(out));
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok((r, Some(usage)))
}

/// Reads a whole upstream body, bounded in size and by the idle timeout.
async fn read(conn: &Connection, body: Incoming) -> Result<Bytes, Error> {
    let collect = Limited::new(body, MAX_BODY).collect();
    match tokio::time::timeout(conn.timeouts.idle, collect).await {
        Ok(Ok(b)) => Ok(b.to_bytes()),
        Ok(Err(_)) => {
            Err(Error::bad_gateway(format!("Connection `{}`: the upstream body failed or was too large.", conn.name)))
        }
        Err(_) => Err(Error::timeout(format!("Connection `{}`: the upstream body stalled.", conn.name))),
    }
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
        return Error::bad_gateway(format!(
            "Connection `{connection}` rejected the gateway's credentials (upstream status {}). Check the connection's api_key.",
            status.as_u16()
        ));
    }
    let Ok(ErrorBody { error }) = serde_json::from_slice::<ErrorBody>(body) else {
        return error_of_status(connection, status, None);
    };
    let message = error.message;
    match error.kind.as_str() {
        "invalid_request_error" => Error::upstream(StatusCode::BAD_REQUEST, "invalid_request_error", message),
        "not_found_error" => Error::upstream(StatusCode::NOT_FOUND, "invalid_request_error", message),
        "request_too_large" => Error::upstream(StatusCode::PAYLOAD_TOO_LARGE, "invalid_request_error", message),
        "rate_limit_error" => Error::upstream(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", message),
        "overloaded_error" => {
            Error::upstream(StatusCode::SERVICE_UNAVAILABLE, "api_error", format!("Anthropic is overloaded: {message}"))
        }
        "authentication_error" | "permission_error" => Error::bad_gateway(format!(
            "Connection `{connection}` rejected the gateway's credentials. Check the connection's api_key."
        )),
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
        529 => Error::upstream(
            StatusCode::SERVICE_UNAVAILABLE,
            "api_error",
            format!(
                "Anthropic is overloaded: {}",
                said(format!("connection `{connection}` answered with status 529."))
            ),
        ),
        429 => Error::upstream(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            said(format!("Connection `{connection}` is rate limited by the upstream (status 429).")),
        ),
        408 | 504 => Error::timeout(said(format!("Connection `{connection}` timed out upstream (status {code})."))),
        400 | 413 | 422 => Error::upstream(
            status,
            "invalid_request_error",
            said(format!("Connection `{connection}` refused the request (status {code}).")),
        ),
        _ => Error::bad_gateway(said(format!("Connection `{connection}` answered with status {code}."))),
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
            "tool_use" => calls.push(b),
            _ => {}
        }
    }
    let mut out = Vec::with_capacity(size + 256);
    out.extend_from_slice(b"{\"id\":");
    json::write_str(&mut out, m.id);
    out.extend_from_slice(b",\"object\":\"chat.completion\",\"created\":");
    out.extend_from_slice(super::unix_now().to_string().as_bytes());
    out.extend_from_slice(b",\"model\":");
    json::write_str(&mut out, m.model);
    out.extend_from_slice(b",\"choices\":[{\"index\":0,\"message\":{\"role\":\"assistant\",\"content\":");
    if text.is_empty() && !calls.is_empty() {
        out.extend_from_slice(b"null");
    } else {
        json::write_str(&mut out, &text);
    }
    if !thinking.is_empty() {
        out.extend_from_slice(b",\"reasoning_content\":");
        json::write_str(&mut out, &thinking);
    }
    if !calls.is_empty() {
        out.extend_from_slice(b",\"tool_calls\":[");
        for (i, c) in calls.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(b"{\"id\":");
            json::write_str(&mut out, c.id.unwrap_or_default());
            out.extend_from_slice(b",\"type\":\"function\",\"function\":{\"name\":");
            json::write_str(&mut out, c.name.unwrap_or_default());
            out.extend_from_slice(b",\"arguments\":");
            // The input object, rendered compactly in its key order, becomes the arguments string.
            let input = c.input.as_ref().map_or(&b"{}"[..], |r| &r.0);
            json::write_str(&mut out, std::str::from_utf8(input).ok()?);
            out.extend_from_slice(b"}}");
        }
        out.push(b']');
    }
    let finish = m.stop_reason.map_or("stop", |r| stream::finish_reason(r.as_bytes()));
    out.extend_from_slice(b"},\"logprobs\":null,\"finish_reason\":\"");
    out.extend_from_slice(finish.as_bytes());
    out.extend_from_slice(b"\"}],\"usage\":");
    let tokens = m.usage.unwrap_or_default();
    let usage = tokens.usage();
    out.extend_from_slice(
        format!(
            "{{\"prompt_tokens\":{},\"completion_tokens\":{},\"total_tokens\":{},\"prompt_tokens_details\":{{\"cached_tokens\":{}}}}}}}",
            usage.prompt,
            usage.completion,
            usage.prompt + usage.completion,
            tokens.cache_read_input_tokens.unwrap_or(0)
        )
        .as_bytes(),
    );
    Some((out, usage))
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
            prompt: n(self.input_tokens) + n(self.cache_read_input_tokens) + n(self.cache_creation_input_tokens),
            completion: n(self.output_tokens),
        }
    }
}

#[cfg(test)]
mod tests {
    //! Non-stream mappings on synthetic messages; expectations written by hand from
    //! WIRE-FORMATS.md §4.2, §9.1 and §9.2.

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
        assert_eq!(usage, Usage { prompt: 7, completion: 11 });
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
        assert_eq!(recorded, Usage { prompt: 3210, completion: 42 });
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
            assert_eq!((e.status.as_u16(), e.kind), (want_status, want_type), "{case}");
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
