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
use crate::json::{write_str, Usage};
use crate::router::Target;
use base64::Engine as _;
use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::{header, HeaderMap, Request, Response, StatusCode, Uri};
use http_body_util::BodyExt;
use serde_json::Value;
use std::collections::HashMap;
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
    Ok(Prepared { request, plan: Plan { stream: call.stream, strip_usage: false, include_usage: false, deadline } })
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
        let req: Value = serde_json::from_slice(body).map_err(|e| Error::invalid_request(e.to_string()))?;
        let model = req.get("model").and_then(Value::as_str).unwrap_or("mock");
        let prompt = (body.len() as u64 / 4).max(1);
        match api {
            Api::Embeddings => self.embeddings(&req, model),
            _ => {
                let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                let reply = Reply {
                    api,
                    model,
                    id,
                    created: super::unix_now(),
                    chunks,
                    usage: Usage { prompt, completion: chunks as u64 },
                };
                let stream = req.get("stream").and_then(Value::as_bool).unwrap_or(false);
                let response = if stream {
                    let include_usage =
                        req.pointer("/stream_options/include_usage").and_then(Value::as_bool) == Some(true);
                    sse_response(reply.stream(include_usage), delay)
                } else {
                    json_response(StatusCode::OK, vec![Bytes::from(reply.whole())])
                };
                Ok(Answer { response, usage: reply.usage })
            }
        }
    }

    fn embeddings(&self, req: &Value, model: &str) -> Result<Answer, Error> {
        let dims = match req.get("dimensions") {
            None | Some(Value::Null) => DEFAULT_DIMENSIONS,
            Some(v) => {
                v.as_u64().map(|d| d as usize).filter(|d| (1..=MAX_DIMENSIONS).contains(d)).ok_or_else(|| {
                    Error::invalid_request(format!("`dimensions` must be an integer from 1 to {MAX_DIMENSIONS}."))
                        .param("dimensions")
                })?
            }
        };
        let base64 = match req.get("encoding_format").and_then(Value::as_str) {
            None | Some("float") => false,
            Some("base64") => true,
            Some(_) => {
                return Err(Error::invalid_request("`encoding_format` must be \"float\" or \"base64\".")
                    .param("encoding_format"))
            }
        };
        let inputs = embedding_inputs(req.get("input"))?;
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
        Ok(Answer { response: json_response(StatusCode::OK, parts), usage: Usage { prompt, completion: 0 } })
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

/// The inputs of an embeddings request: a string, a list of strings, a token list, or a list of
/// token lists (at most [`MAX_INPUTS`]). Each becomes the bytes its vector is derived from.
fn embedding_inputs(input: Option<&Value>) -> Result<Vec<Vec<u8>>, Error> {
    let bad = || {
        Error::invalid_request("`input` must be a non-empty string, array of strings, or array of token arrays.")
            .param("input")
    };
    if let Some(Value::Array(items)) = input {
        if items.len() > MAX_INPUTS && !items.iter().all(Value::is_u64) {
            return Err(Error::invalid_request(format!(
                "`input` may have at most {MAX_INPUTS} items; this request has {}.",
                items.len()
            ))
            .param("input"));
        }
    }
    let out: Vec<Vec<u8>> = match input {
        Some(Value::String(s)) => vec![s.as_bytes().to_vec()],
        Some(Value::Array(items)) if items.iter().all(Value::is_u64) => {
            vec![Value::Array(items.clone()).to_string().into_bytes()]
        }
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.as_bytes().to_vec()),
                Value::Array(t) if t.iter().all(Value::is_u64) => Ok(v.to_string().into_bytes()),
                _ => Err(bad()),
            })
            .collect::<Result<_, _>>()?,
        _ => return Err(bad()),
    };
    if out.is_empty() {
        return Err(bad());
    }
    Ok(out)
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

    fn reply(api: Api, chunks: usize) -> Reply<'static> {
        Reply { api, model: "m", id: 1, created: 2, chunks, usage: Usage { prompt: 3, completion: chunks as u64 } }
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
        assert!(e.message.contains("2048") && e.message.contains("2049"), "{}", e.message);
        // One long token list is one input, however many tokens it has.
        let tokens: Vec<u64> = (0..5000).collect();
        assert!(embed(&mock, &serde_json::json!({"input": tokens, "dimensions": 4})).is_ok());
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
