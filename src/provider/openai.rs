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

use super::{Api, Call, Plan, Prepared, Provider, Reply, Verdict};
use crate::body::{Body, Mode, Upstream};
use crate::config::{ConfigError, Connection, RawConnection, Secrets};
use crate::error::{Error, Kind};
use crate::json;
use crate::router::Target;
use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Response, Uri};
use std::ops::Range;
use std::time::Instant;

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

/// OpenAI's API base URL, as the OpenAI SDKs' `base_url` (with `/v1`).
const DEFAULT_BASE: &str = "https://api.openai.com/v1";

/// An OpenAI-compatible connection's own settings.
#[derive(Debug)]
pub struct Settings {
    /// The base URL as configured (for summaries).
    pub base: String,
    chat: Uri,
    completions: Uri,
    embeddings: Uri,
    /// Ask streams for `stream_options.include_usage` (off for servers that reject it).
    pub stream_usage: bool,
}

impl Settings {
    /// Compiles `api_base`, `api_key` (sent as `Authorization: Bearer`) and `stream_usage`.
    pub fn compile(
        name: &str,
        raw: &RawConnection,
        secrets: &mut Secrets<'_>,
    ) -> Result<(Provider, Vec<(HeaderName, HeaderValue)>), ConfigError> {
        let key = |k: &str| format!("connections.{name}.{k}");
        let base = secrets.base(raw, DEFAULT_BASE);
        let headers = secrets.key_header(raw, header::AUTHORIZATION, "Bearer ")?.into_iter().collect();
        let settings = Settings::at(&key("api_base"), base, raw.stream_usage.unwrap_or(true))?;
        Ok((Provider::Openai(settings), headers))
    }

    /// The passthrough to the OpenAI-dialect API at `base` (errors name config key `key`).
    pub fn at(key: &str, base: String, stream_usage: bool) -> Result<Settings, ConfigError> {
        let url = |path: &str| crate::config::endpoint_url(key, &base, path);
        Ok(Settings {
            chat: url("/chat/completions")?,
            completions: url("/completions")?,
            embeddings: url("/embeddings")?,
            base,
            stream_usage,
        })
    }

    /// The upstream URL of an endpoint: `{api_base}/chat/completions`, `/completions`,
    /// `/embeddings`.
    pub fn uri(&self, api: Api) -> &Uri {
        match api {
            Api::Chat => &self.chat,
            Api::Completions => &self.completions,
            Api::Embeddings => &self.embeddings,
        }
    }

    /// The upstream request: the client's body with the model spliced and, for streams,
    /// `include_usage` asked for.
    pub fn prepare(
        &self,
        conn: &Connection,
        call: &Call<'_>,
        target: &Target,
        deadline: Instant,
    ) -> Result<Prepared, Error> {
        prepare_at(conn, call, target, self.uri(call.api), call.stream && self.stream_usage, deadline)
    }
}

/// The passthrough's upstream request to `uri`: the client's body with the model spliced and,
/// when `ask_usage`, `include_usage` asked for.
pub fn prepare_at(
    conn: &Connection,
    call: &Call<'_>,
    target: &Target,
    uri: &Uri,
    ask_usage: bool,
    deadline: Instant,
) -> Result<Prepared, Error> {
    let (parts, strip_usage) = splice(call, target, ask_usage)?;
    let request = super::upstream_post(conn, uri, parts, REQUEST_HEADERS, call.headers)?;
    // Passthrough forwards the usage chunk the client asked for as it comes: `include_usage` is
    // for translators.
    Ok(Prepared {
        request,
        plan: Plan { stream: call.stream, strip_usage, include_usage: false, reply: Reply::Chat, deadline },
    })
}

/// The client's body as slices of its own buffer with the model (when routing renames it, or a
/// fallback route is asked for by its name) and,
/// when `ask_usage`, `include_usage` spliced in; and whether the gateway asked for usage on the
/// client's behalf (so the usage-only event must be removed from the stream).
pub fn splice(call: &Call<'_>, target: &Target, ask_usage: bool) -> Result<(Vec<Bytes>, bool), Error> {
    let body = call.body;
    let mut edits: Vec<(Range<usize>, Bytes)> = Vec::with_capacity(2);
    if let (Some(m), Some(range)) = (&target.model, &call.fields.model) {
        edits.push((range.clone(), m.json.clone()));
    } else if let (true, Some(range)) = (call.fallback, &call.fields.model) {
        // A fallback route asked for by its own name.
        let mut name = Vec::with_capacity(call.model.len() + 2);
        crate::json::write_str(&mut name, call.model);
        edits.push((range.clone(), name.into()));
    }
    let mut strip_usage = false;
    if ask_usage && call.api.streams() {
        if let Some(edit) = usage_edit(body, call.fields.stream_options.clone())? {
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
    Ok((parts, strip_usage))
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

/// 2xx is a success; any other status a failure whose body is relayed as it is (it is already
/// an OpenAI error) when no other attempt follows; 401/403 mean the provider rejected the
/// gateway's key: those are never relayed (the body may echo key fragments).
pub fn classify(conn: &Connection, head: Response<Upstream>) -> Verdict {
    let status = head.status();
    if status.is_success() {
        // The gateway asked for `accept-encoding: identity`; an encoded body could be neither
        // observed for usage nor cut at events.
        let Some(encoding) = head.headers().get(header::CONTENT_ENCODING).filter(|v| *v != "identity") else {
            return Verdict::Success(head);
        };
        let error = Error::upstream_failure(
            Kind::UpstreamMalformed,
            format!(
                "Connection `{}` answered with content-encoding `{}` although the gateway asked for identity.",
                conn.name,
                crate::error::clip(encoding.to_str().unwrap_or("?"))
            ),
        );
        return Verdict::Failure { error, relay: None };
    }
    let error = super::status_error(conn, status, head.headers());
    let relay = (error.kind != Kind::UpstreamAuth).then_some(head);
    Verdict::Failure { error, relay }
}

/// The client's response: the upstream's status, allow-listed headers and body, forwarded as
/// it arrives and observed for usage.
pub fn respond(conn: &Connection, head: Response<Upstream>, plan: &Plan) -> Result<Response<Body>, Error> {
    let status = head.status();
    let (parts, upstream) = head.into_parts();
    let is_sse = super::is_event_stream(&parts.headers);
    let encoded = parts.headers.get(header::CONTENT_ENCODING).is_some_and(|v| v != "identity");
    let mode = match () {
        _ if !status.is_success() || encoded => Mode::Opaque,
        _ if is_sse && plan.stream => Mode::sse(plan.strip_usage),
        _ if is_sse => Mode::Opaque,
        _ => Mode::json(),
    };
    // RFC 9112 §6.1: a Content-Length sent with Transfer-Encoding is not the body's length.
    let keeps_length = !matches!(mode, Mode::Sse(_)) && !parts.headers.contains_key(header::TRANSFER_ENCODING);
    let mut out = Response::builder().status(status);
    if let Some(h) = out.headers_mut() {
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
    }
    let body = Body::passthrough(upstream, mode, conn.timeouts.idle, &conn.name);
    out.body(body).map_err(|_| Error::upstream_failure(Kind::UpstreamMalformed, "could not build the response"))
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
