//! The built-in mock upstream (`api_type = "mock"`, and `lmgate mock` standalone).
//!
//! Deterministic, OpenAI-shaped answers for chat (stream and non-stream, with usage), legacy
//! completions and embeddings, so the gateway runs with no API keys and benchmarks have an
//! upstream that is never the bottleneck: chat pieces are fixed strings, and embedding vectors
//! are rendered once per (input, dimensions, format) and then served from a cache bounded in
//! bytes. Requests are bounded like OpenAI's own (at most 2048 embedding inputs, at most 3072
//! `dimensions`), so one request cannot make the mock render gigabytes.
//!
//! Knobs, as request headers: `x-mock-chunks` (content pieces, default 16), `x-mock-delay-us`
//! (pause between stream chunks, default 0), `x-mock-status` (answer with that status and an
//! OpenAI error body).

use super::chunk::{itoa, write_usage, Prefix};
use super::{Api, Call, Plan, Prepared, Provider, Verdict};
use crate::body::{Body, Mode, Upstream};
use crate::config::{ConfigError, RawConnection};
use crate::error::Error;
use crate::json::{self, write_str, Usage};
use crate::router::Target;
use base64::Engine as _;
use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::{header, HeaderMap, Request, Response, StatusCode, Uri};
use http_body_util::BodyExt;
use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// The text pieces of a reply, cycled. They exercise JSON escaping and multi-byte UTF-8.
const PIECES: [&str; 16] = [
    "Hello",
    "!",
    " This",
    " is",
    " the",
    " lmgate",
    " mock",
    ":",
    " a",
    " \"deterministic\"",
    " reply",
    " with",
    " unicode",
    " (é ✓)",
    " and",
    " a newline\n",
];

const DEFAULT_CHUNKS: usize = 16;
const MAX_CHUNKS: usize = 100_000;
/// The longest pause between stream chunks.
const MAX_DELAY: Duration = Duration::from_secs(10);
/// The longest a mock stream may last (chunks × delay): the shipped config serves the mock to
/// anyone who can reach it, and a stream must not hold a connection for hours.
const MAX_STREAM: Duration = Duration::from_secs(300);
const DEFAULT_DIMENSIONS: usize = 1536;
/// OpenAI's largest (text-embedding-3-large). A float vector renders to about 13 bytes per
/// dimension, so the largest response is about 2048 x 3072 x 13 bytes = 80 MiB.
const MAX_DIMENSIONS: usize = 3072;
/// OpenAI's limit on inputs per embeddings request.
const MAX_INPUTS: usize = 2048;
/// Rendered vectors kept, in bytes; the cache is emptied when the next one would not fit.
const VECTOR_CACHE_BYTES: usize = 64 << 20;

/// The mock's state: a counter for ids and the rendered-vector cache.
pub struct Mock {
    next_id: AtomicU64,
    vectors: Mutex<VectorCache>,
    cache_budget: usize,
}

impl Default for Mock {
    fn default() -> Self {
        Mock { next_id: AtomicU64::new(0), vectors: Mutex::default(), cache_budget: VECTOR_CACHE_BYTES }
    }
}

/// Rendered vectors by (seed, dimensions, base64), and their total size.
#[derive(Default)]
struct VectorCache {
    map: HashMap<(u64, usize, bool), Bytes>,
    bytes: usize,
}

/// A mock answer and the usage it reports.
struct Answer {
    response: Response<Body>,
    usage: Usage,
}

/// The knobs the mock reads from request headers (forwarded from the client's request).
const KNOBS: &[&str] = &["x-mock-chunks", "x-mock-delay-us", "x-mock-status"];

/// A mock connection has no keys of its own.
pub fn compile(name: &str, raw: &RawConnection) -> Result<(Provider, Vec<(HeaderName, HeaderValue)>), ConfigError> {
    if raw.api_base.is_some() || raw.api_key.is_some() {
        return Err(ConfigError(format!("connections.{name}: a mock connection has no api_base or api_key")));
    }
    Ok((Provider::Mock, Vec::new()))
}

/// The request the in-process mock serves: the client's body with the model spliced, to the
/// endpoint's path, with the `x-mock-*` knobs.
pub fn prepare(call: &Call<'_>, target: &Target, deadline: std::time::Instant) -> Result<Prepared, Error> {
    let (parts, _) = super::openai::splice(call, target, false)?;
    let uri = Uri::from_static(match call.api {
        Api::Chat => "/v1/chat/completions",
        Api::Completions => "/v1/completions",
        Api::Embeddings => "/v1/embeddings",
    });
    let mut request = Request::post(uri)
        .body(Body::chunks(parts, Duration::ZERO))
        .map_err(|_| Error::invalid_request("bad request"))?;
    for name in KNOBS {
        if let Some(v) = call.headers.get(*name) {
            request.headers_mut().insert(*name, v.clone());
        }
    }
    Ok(Prepared {
        request,
        plan: Plan {
            stream: call.stream,
            strip_usage: false,
            include_usage: false,
            reply: super::Reply::Chat,
            deadline,
        },
    })
}

/// The mock's error statuses (`x-mock-status`, invalid knobs) are failures relayed as they are.
pub fn classify(head: Response<Upstream>) -> Verdict {
    let status = head.status();
    if status.is_success() {
        return Verdict::Success(head);
    }
    let r#type = if status.is_client_error() { "invalid_request_error" } else { "api_error" };
    let error = Error::upstream_status(status, r#type, format!("The mock answered with status {}.", status.as_u16()));
    Verdict::Failure { error, relay: Some(head) }
}

/// The mock's own body, and the usage it attached.
pub fn respond(mut head: Response<Upstream>) -> (Response<Body>, Option<Usage>) {
    let usage = head.extensions_mut().remove::<Usage>();
    let response = head.map(|body| match body {
        Upstream::Local(b) => b,
        other => Body::passthrough(other, Mode::Opaque, Duration::from_secs(300), "mock"),
    });
    (response, usage)
}

fn header_num(headers: &HeaderMap, name: &str) -> Result<Option<u64>, Error> {
    match headers.get(name) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .map(Some)
            .ok_or_else(|| Error::invalid_request(format!("Header `{name}` must be a non-negative integer."))),
    }
}

impl Mock {
    /// Serves one request as an OpenAI-compatible server would: the answer, or an OpenAI error
    /// with its status; the usage goes in the response's extensions.
    pub async fn serve(&self, request: Request<Body>) -> Response<Body> {
        let api = match request.uri().path() {
            "/v1/chat/completions" => Some(Api::Chat),
            "/v1/completions" => Some(Api::Completions),
            "/v1/embeddings" => Some(Api::Embeddings),
            _ => None,
        };
        let (parts, body) = request.into_parts();
        let answer = match (api, body.collect().await) {
            (Some(api), Ok(body)) => self.answer(api, &body.to_bytes(), &parts.headers),
            _ => Err(Error::invalid_request(
                "The mock serves POST /v1/chat/completions, /v1/completions and /v1/embeddings.",
            )),
        };
        match answer {
            Ok(Answer { mut response, usage }) => {
                response.extensions_mut().insert(usage);
                response
            }
            Err(e) => json_response(e.status, vec![Bytes::from(e.to_json())]),
        }
    }

    /// Answers a request with `body` (validated JSON).
    fn answer(&self, api: Api, body: &[u8], headers: &HeaderMap) -> Result<Answer, Error> {
        if let Some(status) = header_num(headers, "x-mock-status")? {
            return error_answer(status);
        }
        let chunks = header_num(headers, "x-mock-chunks")?.map_or(DEFAULT_CHUNKS, |n| n as usize);
        if chunks == 0 || chunks > MAX_CHUNKS {
            return Err(Error::invalid_request(format!("`x-mock-chunks` must be 1 to {MAX_CHUNKS}.")));
        }
        let delay = Duration::from_micros(header_num(headers, "x-mock-delay-us")?.unwrap_or(0));
        if delay > MAX_DELAY || delay.saturating_mul(chunks as u32) > MAX_STREAM {
            return Err(Error::invalid_request(format!(
                "`x-mock-delay-us` must be at most {} and `x-mock-chunks` x `x-mock-delay-us` at most {} s.",
                MAX_DELAY.as_micros(),
                MAX_STREAM.as_secs()
            ))
            .param("x-mock-delay-us"));
        }
        let req = MockRequest::read(body)?;
        let model = req.model.as_deref().unwrap_or("mock");
        let prompt = (body.len() as u64 / 4).max(1);
        match api {
            Api::Embeddings => self.embeddings(&req, body, model),
            _ => {
                let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                let reply = Reply {
                    api,
                    model,
                    id,
                    created: super::unix_now(),
                    chunks,
                    usage: Usage { prompt, completion: chunks as u64, ..Usage::default() },
                };
                let response = if req.stream {
                    sse_response(reply.stream(req.include_usage), delay)
                } else {
                    json_response(StatusCode::OK, vec![Bytes::from(reply.whole())])
                };
                Ok(Answer { response, usage: reply.usage })
            }
        }
    }

    fn embeddings(&self, req: &MockRequest, body: &[u8], model: &str) -> Result<Answer, Error> {
        let dims = match req.dimensions.clone().map(|r| &body[r]) {
            None | Some(b"null") => DEFAULT_DIMENSIONS,
            Some(v) => {
                json::u64_of(v).map(|d| d as usize).filter(|d| (1..=MAX_DIMENSIONS).contains(d)).ok_or_else(|| {
                    Error::invalid_request(format!("`dimensions` must be an integer from 1 to {MAX_DIMENSIONS}."))
                        .param("dimensions")
                })?
            }
        };
        let base64 = match req.encoding_format.clone().map(|r| &body[r]) {
            None | Some(b"null" | b"\"float\"") => false,
            Some(b"\"base64\"") => true,
            Some(_) => {
                return Err(Error::invalid_request("`encoding_format` must be \"float\" or \"base64\".")
                    .param("encoding_format"))
            }
        };
        let inputs = embedding_inputs(req.input.clone().map(|r| &body[r]))?;
        let prompt: u64 = inputs.iter().map(|s| (s.len() as u64 / 4).max(1)).sum();
        let mut parts = Vec::with_capacity(inputs.len() * 2 + 2);
        let mut head = b"{\"object\":\"list\",\"data\":[".to_vec();
        for (i, input) in inputs.iter().enumerate() {
            if i > 0 {
                head.push(b',');
            }
            head.extend_from_slice(format!("{{\"object\":\"embedding\",\"index\":{i},\"embedding\":").as_bytes());
            parts.push(Bytes::from(std::mem::take(&mut head)));
            parts.push(self.vector(fnv1a(input), dims, base64));
            head.push(b'}');
        }
        head.extend_from_slice(b"],\"model\":");
        write_str(&mut head, model);
        head.extend_from_slice(
            format!(",\"usage\":{{\"prompt_tokens\":{prompt},\"total_tokens\":{prompt}}}}}").as_bytes(),
        );
        parts.push(Bytes::from(head));
        Ok(Answer {
            response: json_response(StatusCode::OK, parts),
            usage: Usage { prompt, completion: 0, ..Usage::default() },
        })
    }

    /// A unit vector derived from `seed`, rendered as a JSON array or a base64 string token.
    fn vector(&self, seed: u64, dims: usize, base64: bool) -> Bytes {
        let key = (seed, dims, base64);
        if let Some(v) = self.vectors.lock().ok().and_then(|c| c.map.get(&key).cloned()) {
            return v;
        }
        let mut state = seed ^ (dims as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut v: Vec<f32> = (0..dims)
            .map(|_| {
                // xorshift64*: cheap, deterministic, well spread.
                state ^= state >> 12;
                state ^= state << 25;
                state ^= state >> 27;
                let x = state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40;
                (x as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect();
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(f32::MIN_POSITIVE);
        v.iter_mut().for_each(|x| *x /= norm);
        let rendered = if base64 {
            let raw: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            let mut out = Vec::with_capacity(raw.len() * 4 / 3 + 4);
            out.push(b'"');
            out.extend_from_slice(base64::engine::general_purpose::STANDARD.encode(raw).as_bytes());
            out.push(b'"');
            out
        } else {
            let mut out = Vec::with_capacity(dims * 12);
            let mut fmt = ryu::Buffer::new();
            out.push(b'[');
            for (i, x) in v.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.extend_from_slice(fmt.format_finite(*x).as_bytes());
            }
            out.push(b']');
            out
        };
        let rendered = Bytes::from(rendered);
        if let Ok(mut cache) = self.vectors.lock() {
            if cache.bytes + rendered.len() > self.cache_budget {
                cache.map.clear();
                cache.bytes = 0;
            }
            if rendered.len() <= self.cache_budget {
                cache.bytes += rendered.len();
                if let Some(old) = cache.map.insert(key, rendered.clone()) {
                    cache.bytes -= old.len();
                }
            }
        }
        rendered
    }
}

/// What the mock reads of a request, found by the gateway's scanner: top-level members only, no
/// tree built, so a large body costs one pass and no memory beyond a few ranges.
struct MockRequest {
    model: Option<String>,
    stream: bool,
    include_usage: bool,
    dimensions: Option<Range<usize>>,
    encoding_format: Option<Range<usize>>,
    input: Option<Range<usize>>,
}

impl MockRequest {
    fn read(body: &[u8]) -> Result<Self, Error> {
        let mut r = MockRequest {
            model: None,
            stream: false,
            include_usage: false,
            dimensions: None,
            encoding_format: None,
            input: None,
        };
        let bad_json = |e: json::ScanError| Error::invalid_request(format!("The request body is not valid JSON: {e}."));
        let mut options = None;
        json::members(body, |key, value| {
            match json::unescaped_key::<16>(key).as_ref().map(json::ShortKey::as_slice) {
                Some(b"model") => r.model = json::string_value(&body[value]),
                Some(b"stream") => r.stream = &body[value] == b"true",
                Some(b"stream_options") => options = Some(value),
                Some(b"dimensions") => r.dimensions = Some(value),
                Some(b"encoding_format") => r.encoding_format = Some(value),
                Some(b"input") => r.input = Some(value),
                _ => {}
            }
            true
        })
        .map_err(bad_json)?;
        if let Some(o) = options.map(|o| &body[o]).filter(|o| o.starts_with(b"{")) {
            json::members(o, |key, value| {
                if json::unescaped_key::<16>(key).as_ref().map(json::ShortKey::as_slice) == Some(b"include_usage") {
                    r.include_usage = &o[value] == b"true";
                }
                true
            })
            .map_err(bad_json)?;
        }
        Ok(r)
    }
}

/// The inputs of an embeddings request (the `input` value's bytes): a string, a list of strings,
/// a token list, or a list of token lists (at most [`MAX_INPUTS`]). Each becomes the bytes its
/// vector is derived from: a string's text, a token list written compactly (`[1,2,3]`).
fn embedding_inputs(input: Option<&[u8]>) -> Result<Vec<Vec<u8>>, Error> {
    let bad = || {
        Error::invalid_request("`input` must be a non-empty string, array of strings, or array of token arrays.")
            .param("input")
    };
    let input = input.ok_or_else(bad)?;
    let string = |token: &[u8]| json::string_value(token).map(String::into_bytes).ok_or_else(bad);
    match input.first() {
        Some(b'"') => return Ok(vec![string(input)?]),
        Some(b'[') => {}
        _ => return Err(bad()),
    }
    let mut tokens = Vec::new();
    let mut items = Vec::new();
    let mut failed = None;
    json::elements(input, |item| {
        let item = &input[item];
        let next = match item.first() {
            Some(b'0'..=b'9') => token_list(&mut tokens, item),
            Some(b'"') => string(item).map(|s| items.push(s)),
            Some(b'[') => {
                let mut list = Vec::new();
                let mut ok = true;
                let scanned = json::elements(item, |t| {
                    ok = token_list(&mut list, &item[t]).is_ok();
                    ok
                });
                if scanned.is_ok() && ok && !list.is_empty() {
                    items.push(close_list(list));
                    Ok(())
                } else {
                    Err(bad())
                }
            }
            _ => Err(bad()),
        };
        if let Err(e) = next {
            failed = Some(e);
        } else if items.len() > MAX_INPUTS {
            failed =
                Some(Error::invalid_request(format!("`input` may have at most {MAX_INPUTS} items.")).param("input"));
        }
        failed.is_none()
    })
    .map_err(|_| bad())?;
    if let Some(e) = failed {
        return Err(e);
    }
    match (tokens.is_empty(), items.is_empty()) {
        (false, true) => Ok(vec![close_list(tokens)]),
        (true, false) => Ok(items),
        _ => Err(bad()),
    }
}

/// Appends a token (a non-negative integer) to a list being written as `[1,2,3]`.
fn token_list(list: &mut Vec<u8>, token: &[u8]) -> Result<(), Error> {
    let n = json::u64_of(token)
        .ok_or_else(|| Error::invalid_request("`input` token arrays hold non-negative integers.").param("input"))?;
    list.push(if list.is_empty() { b'[' } else { b',' });
    list.extend_from_slice(itoa(n).as_bytes());
    Ok(())
}

fn close_list(mut list: Vec<u8>) -> Vec<u8> {
    if list.is_empty() {
        list.push(b'[');
    }
    list.push(b']');
    list
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3))
}

fn error_answer(status: u64) -> Result<Answer, Error> {
    let status = u16::try_from(status)
        .ok()
        .and_then(|s| StatusCode::from_u16(s).ok())
        .filter(|s| s.as_u16() >= 400)
        .ok_or_else(|| Error::invalid_request("`x-mock-status` must be an HTTP error status (400-599)."))?;
    let body = format!(
        "{{\"error\":{{\"message\":\"Mock error: status {} requested by x-mock-status.\",\"type\":\"{}\",\"param\":null,\"code\":\"mock_status\"}}}}",
        status.as_u16(),
        if status.is_client_error() { "invalid_request_error" } else { "api_error" }
    );
    Ok(Answer { response: json_response(status, vec![Bytes::from(body)]), usage: Usage::default() })
}

fn json_response(status: StatusCode, parts: Vec<Bytes>) -> Response<Body> {
    let mut r = Response::new(Body::chunks(parts, Duration::ZERO));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn sse_response(events: Vec<Bytes>, delay: Duration) -> Response<Body> {
    let mut r = Response::new(Body::chunks(events, delay));
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

/// One deterministic reply, rendered whole or as a stream.
struct Reply<'a> {
    api: Api,
    model: &'a str,
    id: u64,
    created: u64,
    chunks: usize,
    usage: Usage,
}

impl Reply<'_> {
    fn piece(i: usize) -> &'static str {
        PIECES[i % PIECES.len()]
    }

    fn text(&self) -> String {
        (0..self.chunks).map(Self::piece).collect()
    }

    fn chat(&self) -> bool {
        self.api == Api::Chat
    }

    /// The id as a JSON string token.
    fn id_token(&self) -> Vec<u8> {
        let prefix = if self.chat() { "chatcmpl" } else { "cmpl" };
        format!("\"{prefix}-mock-{}\"", self.id).into_bytes()
    }

    fn whole(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(512);
        let text = self.text();
        out.extend_from_slice(b"{\"id\":");
        out.extend_from_slice(&self.id_token());
        out.extend_from_slice(if self.chat() {
            b",\"object\":\"chat.completion\""
        } else {
            b",\"object\":\"text_completion\""
        });
        out.extend_from_slice(b",\"created\":");
        out.extend_from_slice(itoa(self.created).as_bytes());
        out.extend_from_slice(b",\"model\":");
        write_str(&mut out, self.model);
        if self.chat() {
            out.extend_from_slice(b",\"choices\":[{\"index\":0,\"message\":{\"role\":\"assistant\",\"content\":");
            write_str(&mut out, &text);
            out.extend_from_slice(b",\"refusal\":null},\"logprobs\":null,\"finish_reason\":\"stop\"}],\"usage\":");
        } else {
            out.extend_from_slice(b",\"choices\":[{\"text\":");
            write_str(&mut out, &text);
            out.extend_from_slice(b",\"index\":0,\"logprobs\":null,\"finish_reason\":\"stop\"}],\"usage\":");
        }
        write_usage(&mut out, self.usage, None);
        out.push(b'}');
        out
    }

    fn stream(&self, include_usage: bool) -> Vec<Bytes> {
        let mut events = Vec::with_capacity(self.chunks + 4);
        let chat = self.chat();
        let mut prefix = Prefix::default();
        let mut model = Vec::with_capacity(self.model.len() + 2);
        write_str(&mut model, self.model);
        let object = if chat { "chat.completion.chunk" } else { "text_completion" };
        prefix.set(object, &self.id_token(), self.created, &model);
        let mut event = |choice: &[&[u8]]| {
            let mut out = Vec::with_capacity(192);
            prefix.chunk(&mut out, choice.iter().copied(), include_usage);
            events.push(Bytes::from(out));
        };
        if chat {
            event(&[b"{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\",\"refusal\":null},\"logprobs\":null,\"finish_reason\":null}"]);
        }
        let mut piece = Vec::with_capacity(32);
        for i in 0..self.chunks {
            piece.clear();
            write_str(&mut piece, Self::piece(i));
            if chat {
                event(&[
                    b"{\"index\":0,\"delta\":{\"content\":",
                    &piece,
                    b"},\"logprobs\":null,\"finish_reason\":null}",
                ]);
            } else {
                event(&[b"{\"text\":", &piece, b",\"index\":0,\"logprobs\":null,\"finish_reason\":null}"]);
            }
        }
        if chat {
            event(&[b"{\"index\":0,\"delta\":{},\"logprobs\":null,\"finish_reason\":\"stop\"}"]);
        } else {
            event(&[b"{\"text\":\"\",\"index\":0,\"logprobs\":null,\"finish_reason\":\"stop\"}"]);
        }
        if include_usage {
            let mut out = Vec::with_capacity(192);
            prefix.usage_chunk(&mut out, self.usage, None);
            events.push(Bytes::from(out));
        }
        events.push(Bytes::from_static(b"data: [DONE]\n\n"));
        events
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn reply(api: Api, chunks: usize) -> Reply<'static> {
        Reply {
            api,
            model: "m",
            id: 1,
            created: 2,
            chunks,
            usage: Usage { prompt: 3, completion: chunks as u64, ..Usage::default() },
        }
    }

    #[test]
    fn stream_text_equals_whole_text() {
        let r = reply(Api::Chat, 20);
        let whole: Value = serde_json::from_slice(&r.whole()).unwrap();
        let mut text = String::new();
        for ev in r.stream(true) {
            let data = std::str::from_utf8(&ev).unwrap().strip_prefix("data: ").unwrap().trim_end();
            if data == "[DONE]" {
                continue;
            }
            let v: Value = serde_json::from_str(data).unwrap();
            if let Some(c) = v.pointer("/choices/0/delta/content").and_then(Value::as_str) {
                text.push_str(c);
            }
        }
        assert_eq!(text, whole["choices"][0]["message"]["content"].as_str().unwrap());
        assert_eq!(whole["usage"]["total_tokens"], 23);
    }

    #[test]
    fn embeddings_are_deterministic_unit_vectors_in_both_formats() {
        let mock = Mock::default();
        let f: Vec<f32> = serde_json::from_slice(&mock.vector(7, 64, false)).unwrap();
        assert_eq!(f.len(), 64);
        let norm: f32 = f.iter().map(|x| x * x).sum();
        assert!((norm - 1.0).abs() < 1e-4);
        let b: String = serde_json::from_slice(&mock.vector(7, 64, true)).unwrap();
        let raw = base64::engine::general_purpose::STANDARD.decode(b).unwrap();
        let g: Vec<f32> = raw.chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
        assert_eq!(f, g);
        assert_ne!(f, serde_json::from_slice::<Vec<f32>>(&mock.vector(8, 64, false)).unwrap());
    }

    fn embed(mock: &Mock, body: &Value) -> Result<Answer, Error> {
        mock.answer(Api::Embeddings, body.to_string().as_bytes(), &HeaderMap::new())
    }

    #[test]
    fn embeddings_take_at_most_2048_inputs_and_name_the_parameter_past_that() {
        let mock = Mock::default();
        let inputs = |n: usize| Value::from((0..n).map(|i| format!("in{}", i % 3)).collect::<Vec<_>>());
        assert!(embed(&mock, &serde_json::json!({"input": inputs(2048), "dimensions": 4})).is_ok());
        let e = embed(&mock, &serde_json::json!({"input": inputs(2049), "dimensions": 4})).err().unwrap();
        assert_eq!((e.status.as_u16(), e.param), (400, Some("input")));
        assert!(e.message.contains("2048"), "{}", e.message);
        // One long token list is one input, however many tokens it has.
        let tokens: Vec<u64> = (0..5000).collect();
        assert!(embed(&mock, &serde_json::json!({"input": tokens, "dimensions": 4})).is_ok());
    }

    /// The vectors of an embeddings answer, by index.
    async fn vectors(a: Answer) -> Vec<Value> {
        let bytes = a.response.into_body().collect().await.unwrap().to_bytes();
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        v["data"].as_array().unwrap().iter().map(|d| d["embedding"].clone()).collect()
    }

    #[tokio::test]
    async fn embedding_inputs_are_read_without_a_tree_and_keep_their_meaning() {
        let mock = Mock::default();
        let one = |body: &str| vectors(mock.answer(Api::Embeddings, body.as_bytes(), &HeaderMap::new()).ok().unwrap());
        // A token list is one input, whatever its spacing; a list of lists is one input each.
        let flat = one(r#"{"input":[1,2,3],"dimensions":8}"#).await;
        assert_eq!(flat.len(), 1);
        assert_eq!(flat, one(r#"{"input":[ 1 , 2,3 ],"dimensions":8}"#).await);
        let lists = one(r#"{"input":[[1,2,3],[4]],"dimensions":8}"#).await;
        assert_eq!((lists.len(), &lists[0]), (2, &flat[0]));
        // Escapes are read: the same text gives the same vector.
        assert_eq!(
            one(r#"{"input":"caf\u00e9","dimensions":8}"#).await,
            one(r#"{"input":"café","dimensions":8}"#).await
        );
        assert_eq!(one(r#"{"input":["a","b"],"dimensions":8}"#).await.len(), 2);
        for bad in [
            r#"{"input":[1,"a"]}"#,
            r#"{"input":[-1]}"#,
            r#"{"input":[1.5]}"#,
            r#"{"input":[[1],[]]}"#,
            r#"{"input":[[1,"x"]]}"#,
            r#"{"input":[]}"#,
            r#"{"input":{}}"#,
            r#"{"input":7}"#,
            r#"{"dimensions":8}"#,
        ] {
            let e = mock.answer(Api::Embeddings, bad.as_bytes(), &HeaderMap::new()).err().unwrap();
            assert_eq!((e.status.as_u16(), e.param), (400, Some("input")), "{bad}");
        }
        let e = mock.answer(Api::Embeddings, br#"{"input":"x","encoding_format":"hex"}"#, &HeaderMap::new());
        assert_eq!(e.err().unwrap().param, Some("encoding_format"));
        let e = mock.answer(Api::Embeddings, br#"{"input":"x",}"#, &HeaderMap::new()).err().unwrap();
        assert_eq!(e.status.as_u16(), 400);
    }

    #[test]
    fn embeddings_take_1_to_3072_dimensions_and_name_the_parameter_otherwise() {
        let mock = Mock::default();
        assert!(embed(&mock, &serde_json::json!({"input": "x", "dimensions": 3072})).is_ok());
        for bad in
            [serde_json::json!(3073), serde_json::json!(0), serde_json::json!(1u64 << 40), serde_json::json!("8")]
        {
            let e = embed(&mock, &serde_json::json!({"input": "x", "dimensions": bad})).err().unwrap();
            assert_eq!((e.status.as_u16(), e.param), (400, Some("dimensions")), "{bad}");
        }
    }

    #[test]
    fn the_vector_cache_stays_within_its_byte_budget() {
        let mock = Mock { cache_budget: 10_000, ..Mock::default() };
        for seed in 0..50 {
            let v = mock.vector(seed, 256, false);
            assert!(v.len() > 1000);
            let cache = mock.vectors.lock().unwrap();
            assert!(cache.bytes <= 10_000, "{} bytes cached", cache.bytes);
            assert_eq!(cache.bytes, cache.map.values().map(Bytes::len).sum::<usize>());
            assert!(cache.map.contains_key(&(seed, 256, false)), "the newest vector is cached");
        }
        // A vector larger than the whole budget is served, not cached.
        assert!(mock.vector(99, 3072, false).len() > 10_000);
        assert!(!mock.vectors.lock().unwrap().map.contains_key(&(99, 3072, false)));
    }

    #[test]
    fn a_mock_stream_lasts_at_most_five_minutes_and_says_which_knob_is_over() {
        let knobs = |chunks: &'static str, delay: &'static str| {
            let mut h = HeaderMap::new();
            h.insert("x-mock-chunks", HeaderValue::from_static(chunks));
            h.insert("x-mock-delay-us", HeaderValue::from_static(delay));
            Mock::default().answer(Api::Chat, br#"{"model":"m","stream":true}"#, &h)
        };
        assert!(knobs("100", "1000").is_ok());
        assert!(knobs("300", "1000000").is_ok(), "exactly five minutes");
        for (chunks, delay) in
            [("301", "1000000"), ("100000", "10000"), ("1", "10000001"), ("1", "18446744073709551615")]
        {
            let e = knobs(chunks, delay).err().unwrap_or_else(|| panic!("{chunks} x {delay} accepted"));
            assert_eq!((e.status.as_u16(), e.param), (400, Some("x-mock-delay-us")), "{chunks} x {delay}");
        }
    }

    #[test]
    fn mock_status_header_gives_an_openai_error() {
        let mut h = HeaderMap::new();
        h.insert("x-mock-status", HeaderValue::from_static("503"));
        let a = Mock::default().answer(Api::Chat, b"{}", &h).ok().unwrap();
        assert_eq!(a.response.status(), 503);
    }
}
