//! OpenAI and OpenAI-compatible upstreams: the zero-copy passthrough.
//!
//! Request: the client's body bytes go upstream as they are, sent as a few slices of the
//! client's own buffer, except for two splices: the `model` value when routing renames it, and
//! for streams `stream_options.include_usage = true` (inserted when `stream_options` is absent,
//! null or has no `include_usage`; flipped when false) so usage is always recorded. When the
//! gateway asked for usage and the client did not, the response's usage-only event is removed
//! (see `body.rs`). Headers go through an allow-list in both directions: never cookies, the
//! client's credentials or hop-by-hop headers; the connection's own key is set instead.
//!
//! Response: 2xx bodies are forwarded frame by frame and observed for usage; 4xx/5xx pass
//! through with their status, except 401/403, which mean the provider rejected the gateway's
//! key: those become 502 naming the connection, and the upstream body (which may echo key
//! fragments) is dropped.

use super::Api;
use crate::body::{Body, Mode};
use crate::config::Connection;
use crate::error::Error;
use crate::json::{self, RequestFields};
use crate::router::Target;
use bytes::Bytes;
use http::header::{self, HeaderMap};
use http::{Request, Response, StatusCode};
use std::ops::Range;

/// Client request headers forwarded upstream (besides `content-type`, always set).
const REQUEST_HEADERS: &[&str] =
    &["accept", "user-agent", "openai-beta", "idempotency-key", "x-request-id", "x-client-request-id"];

/// Upstream response headers forwarded to the client (besides `content-type`, and
/// `content-length`/`content-encoding` when the body is not rewritten). Request ids for support
/// tickets, and the rate-limit family: SDKs back off on `retry-after-ms` / `retry-after`, and
/// clients pace themselves on `x-ratelimit-*`. Never `set-cookie` or anything not listed, and
/// not `openai-organization` / `openai-project`: they name the operator's account, which is none
/// of the client's business.
const RESPONSE_HEADERS: &[&str] = &[
    "x-request-id",
    "request-id",
    "openai-processing-ms",
    "openai-version",
    "retry-after",
    "retry-after-ms",
    "cache-control",
];

/// Prefix of OpenAI's rate-limit headers (`x-ratelimit-limit-requests`,
/// `x-ratelimit-remaining-tokens`, `x-ratelimit-reset-requests`, ...), forwarded as a family.
const RATE_LIMIT_PREFIX: &str = "x-ratelimit-";

/// An upstream request built from a client request, and whether the usage-only event must be
/// removed from the response stream.
pub struct Upstream {
    /// The request to send.
    pub request: Request<Body>,
    /// The gateway asked for stream usage on the client's behalf.
    pub strip_usage: bool,
}

/// Builds the upstream request: splices the model and, for streams, `include_usage`.
pub fn request(
    conn: &Connection,
    api: Api,
    body: Bytes,
    fields: &RequestFields,
    stream: bool,
    target: &Target,
    client_headers: &HeaderMap,
) -> Result<Upstream, Error> {
    let mut edits: Vec<(Range<usize>, Bytes)> = Vec::with_capacity(2);
    if let (Some(m), Some(range)) = (&target.model, &fields.model) {
        edits.push((range.clone(), m.json.clone()));
    }
    let mut strip_usage = false;
    if stream && api.streams() && conn.stream_usage {
        if let Some(edit) = usage_edit(&body, fields.stream_options.clone())? {
            edits.push(edit);
            strip_usage = true;
        }
    }
    edits.sort_by_key(|(r, _)| r.start);

    let mut parts = Vec::with_capacity(edits.len() * 2 + 1);
    let mut at = 0;
    for (range, text) in edits {
        if range.start > at {
            parts.push(body.slice(at..range.start));
        }
        parts.push(text);
        at = range.end;
    }
    if at < body.len() {
        parts.push(body.slice(at..));
    }
    let urls = conn.urls.as_ref().ok_or_else(|| Error::unavailable("connection has no URL"))?;
    let uri = match api {
        Api::Chat => Some(&urls.chat),
        Api::Completions => urls.completions.as_ref(),
        Api::Embeddings => urls.embeddings.as_ref(),
    }
    .ok_or_else(|| Error::unavailable(format!("Connection `{}` does not serve this endpoint.", conn.name)))?;
    let req = super::upstream_post(conn, uri, parts, REQUEST_HEADERS, client_headers)?;
    Ok(Upstream { request: req, strip_usage })
}

/// The splice that makes a stream request ask for usage, or `None` when the client already
/// asked for it.
fn usage_edit(body: &[u8], options: Option<Range<usize>>) -> Result<Option<(Range<usize>, Bytes)>, Error> {
    const OPTIONS: &[u8] = b"{\"include_usage\":true}";
    let Some(range) = options else {
        // Insert a member before the object's closing brace.
        let close = body.iter().rposition(|&c| c == b'}').unwrap_or(body.len());
        let empty = body[..close].trim_ascii_end().ends_with(b"{");
        let text: &'static [u8] = if empty {
            b"\"stream_options\":{\"include_usage\":true}"
        } else {
            b",\"stream_options\":{\"include_usage\":true}"
        };
        return Ok(Some((close..close, Bytes::from_static(text))));
    };
    let value = &body[range.clone()];
    if value == b"null" {
        return Ok(Some((range, Bytes::from_static(OPTIONS))));
    }
    if value.first() != Some(&b'{') {
        return Err(Error::invalid_request("`stream_options` must be an object or null.").param("stream_options"));
    }
    let mut include = None;
    let mut count = 0;
    let _ = json::members(value, |key, v| {
        count += 1;
        if json::unescaped_key::<16>(key).is_some_and(|k| k.as_slice() == b"include_usage") {
            include = Some(v);
        }
        true
    });
    Ok(match include {
        Some(v) if &value[v.clone()] == b"true" => None,
        Some(v) => {
            let at = range.start + v.start..range.start + v.end;
            Some((at, Bytes::from_static(b"true")))
        }
        None if count == 0 => Some((range, Bytes::from_static(OPTIONS))),
        None => {
            let at = range.start + 1;
            Some((at..at, Bytes::from_static(b"\"include_usage\":true,")))
        }
    })
}

/// Turns the upstream response into the client's response.
pub fn response(
    conn: &Connection,
    resp: Response<hyper::body::Incoming>,
    stream: bool,
    strip_usage: bool,
) -> Result<Response<Body>, Error> {
    let status = resp.status();
    if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
        return Err(Error::bad_gateway(format!(
            "Connection `{}` rejected the gateway's credentials (upstream status {}). \
             Check the connection's api_key.",
            conn.name,
            status.as_u16()
        )));
    }
    let (parts, incoming) = resp.into_parts();
    let content_type = parts.headers.get(header::CONTENT_TYPE);
    let is_sse = content_type.is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    let encoded = parts.headers.get(header::CONTENT_ENCODING).is_some_and(|v| v != "identity");
    let mode = match () {
        _ if !status.is_success() || encoded => Mode::Opaque,
        _ if is_sse && stream => Mode::sse(strip_usage),
        _ if is_sse => Mode::Opaque,
        _ => Mode::json(),
    };
    let keeps_length = !matches!(mode, Mode::Sse(_));
    let mut out = Response::builder().status(status);
    let h = out.headers_mut().expect("builder has no error yet");
    for (name, value) in &parts.headers {
        let n = name.as_str();
        if n == "content-type"
            || RESPONSE_HEADERS.contains(&n)
            || n.starts_with(RATE_LIMIT_PREFIX)
            || (n == "content-length" && keeps_length)
            || (n == "content-encoding" && encoded)
        {
            h.append(name.clone(), value.clone());
        }
    }
    let body = Body::passthrough(incoming, mode, conn.timeouts.idle, &conn.name);
    out.body(body).map_err(|_| Error::bad_gateway("could not build the response"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn apply(body: &str) -> (String, bool) {
        let fields = json::scan_request(body.as_bytes()).unwrap();
        match usage_edit(body.as_bytes(), fields.stream_options).unwrap() {
            None => (body.to_owned(), false),
            Some((r, text)) => {
                let mut s = body.as_bytes()[..r.start].to_vec();
                s.extend_from_slice(&text);
                s.extend_from_slice(&body.as_bytes()[r.end..]);
                (String::from_utf8(s).unwrap(), true)
            }
        }
    }

    #[test]
    fn include_usage_is_inserted_or_flipped_in_every_case() {
        let cases = [
            (
                r#"{"model":"m","stream":true}"#,
                r#"{"model":"m","stream":true,"stream_options":{"include_usage":true}}"#,
                true,
            ),
            (
                r#"{"model":"m","stream":true }  "#,
                r#"{"model":"m","stream":true ,"stream_options":{"include_usage":true}}  "#,
                true,
            ),
            (
                r#"{"model":"m","stream_options":null}"#,
                r#"{"model":"m","stream_options":{"include_usage":true}}"#,
                true,
            ),
            (r#"{"model":"m","stream_options":{ }}"#, r#"{"model":"m","stream_options":{"include_usage":true}}"#, true),
            (
                r#"{"model":"m","stream_options":{"include_usage":false}}"#,
                r#"{"model":"m","stream_options":{"include_usage":true}}"#,
                true,
            ),
            (
                r#"{"model":"m","stream_options":{"x":1}}"#,
                r#"{"model":"m","stream_options":{"include_usage":true,"x":1}}"#,
                true,
            ),
            (
                r#"{"model":"m","stream_options":{"include_usage":true}}"#,
                r#"{"model":"m","stream_options":{"include_usage":true}}"#,
                false,
            ),
        ];
        for (input, want, strip) in cases {
            let (got, stripped) = apply(input);
            assert_eq!(got, want);
            assert_eq!(stripped, strip, "{input}");
            assert!(json::scan_request(got.as_bytes()).is_ok());
        }
    }

    #[test]
    fn non_object_stream_options_are_rejected() {
        let body = br#"{"model":"m","stream_options":"yes"}"#;
        let f = json::scan_request(body).unwrap();
        assert_eq!(usage_edit(body, f.stream_options).unwrap_err().param, Some("stream_options"));
    }
}
