//! Google's Gemini API (`api_type = "gemini"`, <https://ai.google.dev/api>): OpenAI chat and
//! embeddings in, OpenAI out.
//!
//! - [`request`]: the OpenAI chat request as a `generateContent` request.
//! - [`stream`]: the `streamGenerateContent?alt=sse` stream rewritten into OpenAI chunks.
//! - here: the upstream request (`{api_base}/v1beta/models/{model}:generateContent`,
//!   `:streamGenerateContent?alt=sse`, `:batchEmbedContents`, the key in `x-goog-api-key`, never
//!   in the URL), non-stream answers (→ `chat.completion`), embeddings (float or base64 as the
//!   client asked), and errors (Google's error JSON → OpenAI error, `RetryInfo` → Retry-After).
//!
//! The model is a path segment: it reaches the URL only when it is a plain name
//! ([`super::is_path_segment`]), else a 400 naming `model`. `/v1/completions` (legacy) is not
//! served for Gemini connections.

pub mod request;
pub mod stream;

use super::{Api, Call, Plan, Prepared, Reply};
use crate::config::{ConfigError, Connection, RawConnection, Secrets};
use crate::error::{Error, Kind};
use crate::json::{self, Raw, Usage};
use crate::router::Target;
use http::header::{HeaderName, HeaderValue};
use http::{StatusCode, Uri};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::time::{Duration, Instant};

/// Largest non-stream body read whole.
pub const MAX_BODY: usize = 64 << 20;

/// Inputs per `batchEmbedContents` call (the API's limit).
const MAX_EMBED_INPUTS: usize = 100;

/// Client headers forwarded to Gemini.
const REQUEST_HEADERS: &[&str] = &["user-agent", "x-request-id"];

/// The Gemini API's base URL (the Google GenAI SDKs' default), without the version.
const DEFAULT_BASE: &str = "https://generativelanguage.googleapis.com";

/// A Gemini connection's own settings.
#[derive(Debug)]
pub struct Settings {
    /// The base URL as configured (for summaries).
    pub base: String,
    /// `{base}/v1beta/models/`.
    models: String,
}

impl Settings {
    /// Compiles `api_base` (without `/v1beta`) and `api_key` (required; sent as
    /// `x-goog-api-key`).
    pub fn compile(
        name: &str,
        raw: &RawConnection,
        secrets: &mut Secrets<'_>,
    ) -> Result<(super::Provider, Vec<(HeaderName, HeaderValue)>), ConfigError> {
        let key = |k: &str| format!("connections.{name}.{k}");
        if raw.api_key.is_none() {
            return Err(ConfigError(format!("{}: a gemini connection needs a key", key("api_key"))));
        }
        let base = secrets.base(raw, DEFAULT_BASE);
        // Checks the URL (scheme, host, no credentials, no query) once.
        let models = crate::config::endpoint_url(&key("api_base"), &base, "/v1beta/models/")?.to_string();
        let headers = secrets.key_header(raw, HeaderName::from_static("x-goog-api-key"), "")?.into_iter().collect();
        Ok((super::Provider::Gemini(Settings { base, models }), headers))
    }

    /// Whether `model` can be spliced into the URL path.
    pub fn check_model(&self, model: &str) -> Result<(), String> {
        super::check_path_segment(model, "a Gemini model")
    }

    /// The `generateContent`, `streamGenerateContent` or `batchEmbedContents` request for a call.
    pub fn prepare(
        &self,
        conn: &Connection,
        call: &Call<'_>,
        target: &Target,
        deadline: Instant,
    ) -> Result<Prepared, Error> {
        let model = target.upstream_model(call.model);
        self.check_model(model).map_err(|why| Error::invalid_request(why).param("model"))?;
        let (method, body, plan) = match call.api {
            Api::Chat => {
                let t = request::chat(call.body)?;
                let method = if t.stream { ":streamGenerateContent?alt=sse" } else { ":generateContent" };
                let plan =
                    Plan { stream: t.stream, strip_usage: false, include_usage: t.include_usage, reply: Reply::Chat, deadline };
                (method, t.body, plan)
            }
            Api::Embeddings => {
                let (body, base64) = embed_request(call.body, model)?;
                let reply = Reply::Embeddings { base64, model: model.into() };
                (":batchEmbedContents", body, Plan { stream: false, strip_usage: false, include_usage: false, reply, deadline })
            }
            Api::Completions => {
                return Err(Error::invalid_request(format!(
                    "Model `{}` is served by a Gemini connection, which has no /v1/completions endpoint; use /v1/chat/completions.",
                    call.model
                ))
                .param("model"))
            }
        };
        let uri: Uri = format!("{}{model}{method}", self.models)
            .parse()
            .map_err(|_| Error::upstream_failure(Kind::UpstreamUnreachable, "could not build the upstream URL"))?;
        let request = super::upstream_post(conn, &uri, vec![body], REQUEST_HEADERS, call.headers)?;
        Ok(Prepared { request, plan })
    }
}

#[derive(Serialize)]
struct EmbedRequests<'a> {
    requests: Vec<EmbedOne<'a>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct EmbedOne<'a> {
    model: &'a str,
    content: EmbedContent,
    #[serde(skip_serializing_if = "Option::is_none")]
    output_dimensionality: Option<u64>,
}

#[derive(Serialize)]
struct EmbedContent {
    parts: [EmbedText; 1],
}

#[derive(Serialize)]
struct EmbedText {
    text: String,
}

/// A `batchEmbedContents` request, and whether the client wants base64 vectors.
fn embed_request(body: &[u8], model: &str) -> Result<(bytes::Bytes, bool), Error> {
    let e = super::chat::embed_input(body, "Gemini")?;
    if e.input.len() > MAX_EMBED_INPUTS {
        return Err(Error::invalid_request(format!(
            "Gemini embeds at most {MAX_EMBED_INPUTS} inputs per request; this one has {}.",
            e.input.len()
        ))
        .param("input"));
    }
    let name = format!("models/{model}");
    let requests = e
        .input
        .into_iter()
        .map(|text| EmbedOne {
            model: &name,
            content: EmbedContent { parts: [EmbedText { text }] },
            output_dimensionality: e.dimensions,
        })
        .collect();
    let body = serde_json::to_vec(&EmbedRequests { requests })
        .map_err(|e| Error::invalid_request(format!("Cannot translate the request: {e}.")))?;
    Ok((body.into(), e.base64))
}

#[derive(Deserialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Deserialize)]
struct ErrorDetail {
    #[serde(default)]
    message: String,
    #[serde(default)]
    details: Vec<ErrorInfo>,
}

#[derive(Deserialize)]
struct ErrorInfo {
    #[serde(rename = "@type", default)]
    kind: String,
    #[serde(rename = "retryDelay")]
    retry_delay: Option<String>,
}

/// A Gemini error status and body (`{"error": {"code", "message", "status", "details"}}`,
/// <https://ai.google.dev/gemini-api/docs/troubleshooting>) as the client's OpenAI error, with
/// `RetryInfo.retryDelay` as its Retry-After. 401/403 (the gateway's key refused): 502, the body
/// dropped. 400 and 404 (an unknown model) keep their status, as do 429 and 503 so clients back
/// off; 504 is a timeout; anything else is the upstream failing: 502.
pub fn error_of(connection: &str, status: StatusCode, body: &[u8]) -> Error {
    let parsed = serde_json::from_slice::<ErrorBody>(body).ok().map(|b| b.error);
    let retry = parsed.as_ref().and_then(|e| {
        e.details
            .iter()
            .find(|d| d.kind.ends_with("google.rpc.RetryInfo"))
            .and_then(|d| d.retry_delay.as_deref().and_then(seconds))
    });
    let mut e = super::said_error(connection, status, parsed.map(|e| e.message));
    e.retry_after = retry;
    e
}

/// A protobuf Duration as JSON (`"34.4s"`).
fn seconds(text: &str) -> Option<Duration> {
    let s: f64 = text.strip_suffix('s')?.parse().ok()?;
    (s.is_finite() && (0.0..1e7).contains(&s)).then(|| Duration::from_secs_f64(s))
}

/// How this provider's answers are read.
pub const READERS: super::Readers =
    super::Readers { stream: |usage, id| Box::new(stream::Stream::new(usage, id)), completion, embeddings };

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Answer<'a> {
    #[serde(borrow, default)]
    candidates: Vec<Candidate<'a>>,
    usage_metadata: Option<UsageMetadata>,
    #[serde(borrow)]
    model_version: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Candidate<'a> {
    #[serde(borrow)]
    content: Option<AnswerContent<'a>>,
    #[serde(borrow)]
    finish_reason: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct AnswerContent<'a> {
    #[serde(borrow, default)]
    parts: Vec<AnswerPart<'a>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AnswerPart<'a> {
    #[serde(borrow)]
    text: Option<Cow<'a, str>>,
    #[serde(default)]
    thought: bool,
    #[serde(borrow)]
    function_call: Option<FunctionCall<'a>>,
    #[serde(borrow)]
    thought_signature: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct FunctionCall<'a> {
    #[serde(borrow)]
    id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    name: Cow<'a, str>,
    args: Option<Raw>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct UsageMetadata {
    prompt_token_count: Option<u64>,
    candidates_token_count: Option<u64>,
    thoughts_token_count: Option<u64>,
    cached_content_token_count: Option<u64>,
}

/// A `generateContent` answer as an OpenAI `chat.completion`, and its usage; parsed whole with
/// simd-json on the thread's scratch copy. No candidate (a prompt blocked outright) is a
/// `content_filter` finish with an empty message.
pub fn completion(body: &[u8], id: &str) -> Option<(Vec<u8>, Usage)> {
    json::with_scratch(body, |scratch| render_completion(scratch.parse().ok()?, id, body.len()))
}

fn render_completion(a: Answer, id: &str, size: usize) -> Option<(Vec<u8>, Usage)> {
    let candidate = a.candidates.into_iter().next();
    let (mut text, mut thinking, mut calls) = (String::new(), String::new(), Vec::new());
    let parts = candidate.as_ref().and_then(|c| c.content.as_ref()).map_or(&[][..], |c| &c.parts[..]);
    for p in parts {
        match (&p.text, &p.function_call) {
            (Some(t), _) if p.thought => thinking.push_str(t),
            (Some(t), _) => text.push_str(t),
            (None, Some(call)) => {
                // As in streams: Gemini's id or `call_{id}_{k}`, then `.{thoughtSignature}`.
                let k = calls.len();
                let mut call_id = call
                    .id
                    .as_deref()
                    .filter(|i| !i.is_empty())
                    .map_or_else(|| format!("call_{id}_{k}"), str::to_owned);
                if let Some(sig) = p.thought_signature.as_deref().filter(|s| !s.is_empty()) {
                    call_id.push('.');
                    call_id.push_str(sig);
                }
                calls.push((call_id, &*call.name, call.args.as_ref().map(|r| &r.0[..])));
            }
            _ => {}
        }
    }
    let finish = match candidate.as_ref().map(|c| c.finish_reason.as_deref()) {
        None => "content_filter",
        Some(reason) => stream::finish_reason(reason.unwrap_or_default().as_bytes(), !calls.is_empty()),
    };
    let m = a.usage_metadata.unwrap_or_default();
    let n = |v: Option<u64>| v.unwrap_or(0);
    let usage = Usage {
        prompt: n(m.prompt_token_count),
        completion: n(m.candidates_token_count).saturating_add(n(m.thoughts_token_count)),
        cached: n(m.cached_content_token_count),
        cache_write: 0,
    };
    let completion = super::chunk::Completion {
        id,
        model: a.model_version.as_deref().unwrap_or("unknown"),
        text: &text,
        thinking: &thinking,
        calls,
        finish,
        usage,
        cached: (usage.cached > 0).then_some(usage.cached),
    };
    Some((completion.render(size)?, usage))
}

#[derive(Deserialize)]
struct EmbedAnswer {
    embeddings: Vec<EmbedValues>,
}

#[derive(Deserialize)]
struct EmbedValues {
    values: Vec<f32>,
}

/// A `batchEmbedContents` answer as an OpenAI embeddings list for `model` (Gemini reports no
/// token count for it: usage 0).
pub fn embeddings(body: &[u8], model: &str, base64: bool) -> Option<(Vec<u8>, Usage)> {
    json::with_scratch(body, |scratch| {
        let a: EmbedAnswer = scratch.parse().ok()?;
        let vectors: Vec<Vec<f32>> = a.embeddings.into_iter().map(|e| e.values).collect();
        Some((super::chat::embeddings_list(&vectors, model, 0, base64)?, Usage::default()))
    })
}

#[cfg(test)]
mod tests {
    //! Non-stream mappings and errors; expectations written by hand from Google's reference
    //! (<https://ai.google.dev/api/generate-content#generatecontentresponse>) and OpenAI's objects.

    use super::*;
    use serde_json::{json, Value};

    fn chat(answer: Value) -> (Value, Usage) {
        let (out, usage) = completion(answer.to_string().as_bytes(), "chatcmpl-9").expect("readable");
        let mut v: Value = serde_json::from_slice(&out).unwrap();
        assert!(v.as_object_mut().unwrap().remove("created").is_some_and(|c| c.is_u64()));
        (v, usage)
    }

    #[test]
    fn text_thoughts_and_usage_with_thinking_tokens() {
        let (v, usage) = chat(json!({"candidates":[{"content":{"parts":[
                {"text":"Counting the r's.","thought":true},
                {"text":"There are **3** r's.","thoughtSignature":"EtoFCtcF"}],"role":"model"},
                "finishReason":"STOP","index":0}],
            "usageMetadata":{"promptTokenCount":9,"candidatesTokenCount":28,"totalTokenCount":281,"thoughtsTokenCount":244,
                "cachedContentTokenCount":4},
            "modelVersion":"gemini-3-pro-preview","responseId":"Un6L"}));
        assert_eq!(
            v,
            json!({"id":"chatcmpl-9","object":"chat.completion","model":"gemini-3-pro-preview","choices":[{"index":0,
                "message":{"role":"assistant","content":"There are **3** r's.","reasoning_content":"Counting the r's."},
                "logprobs":null,"finish_reason":"stop"}],
                "usage":{"prompt_tokens":9,"completion_tokens":272,"total_tokens":281,"prompt_tokens_details":{"cached_tokens":4}}})
        );
        assert_eq!((usage.prompt, usage.completion, usage.cached), (9, 272, 4));
    }

    #[test]
    fn function_calls_carry_their_signature_and_a_blocked_prompt_is_filtered() {
        let (v, _) = chat(json!({"candidates":[{"content":{"parts":[
                {"functionCall":{"name":"get_weather","args":{"city":"Paris"}},"thoughtSignature":"Sig1"},
                {"functionCall":{"name":"now"}}],"role":"model"},"finishReason":"STOP"}],"modelVersion":"g"}));
        let m = &v["choices"][0]["message"];
        assert_eq!(m["content"], Value::Null);
        assert_eq!(m["tool_calls"][0]["id"], "call_chatcmpl-9_0.Sig1");
        assert_eq!(m["tool_calls"][0]["function"], json!({"name":"get_weather","arguments":"{\"city\":\"Paris\"}"}));
        assert_eq!(m["tool_calls"][1]["id"], "call_chatcmpl-9_1");
        assert_eq!(m["tool_calls"][1]["function"]["arguments"], "{}");
        assert_eq!(v["choices"][0]["finish_reason"], "tool_calls");
        let (v, _) = chat(json!({"promptFeedback":{"blockReason":"SAFETY"},"usageMetadata":{"promptTokenCount":5}}));
        assert_eq!(v["choices"][0]["finish_reason"], "content_filter");
        assert_eq!(v["choices"][0]["message"]["content"], "");
        let (v, _) = chat(json!({"candidates":[{"content":{"parts":[{"text":"cut"}]},"finishReason":"MAX_TOKENS"}]}));
        assert_eq!(v["choices"][0]["finish_reason"], "length");
    }

    #[test]
    fn errors_map_with_retry_info() {
        let body = br#"{"error":{"code":429,"message":"You exceeded your current quota, please check your plan.","status":"RESOURCE_EXHAUSTED","details":[{"@type":"type.googleapis.com/google.rpc.QuotaFailure","violations":[]},{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"34.4s"}]}}"#;
        let e = error_of("google", StatusCode::TOO_MANY_REQUESTS, body);
        assert_eq!((e.status, e.r#type), (StatusCode::TOO_MANY_REQUESTS, "rate_limit_error"));
        assert_eq!(e.retry_after, Some(Duration::from_millis(34_400)));
        assert_eq!(e.message, "You exceeded your current quota, please check your plan.");
        let e = error_of(
            "google",
            StatusCode::NOT_FOUND,
            br#"{"error":{"code":404,"message":"models/gemini-9 is not found","status":"NOT_FOUND"}}"#,
        );
        assert_eq!(e.status, StatusCode::NOT_FOUND);
        let e = error_of("google", StatusCode::INTERNAL_SERVER_ERROR, b"oops");
        assert_eq!(e.status, StatusCode::BAD_GATEWAY);
        let e = error_of("google", StatusCode::FORBIDDEN, br#"{"error":{"message":"API key AIza-secret not valid"}}"#);
        assert!(!e.message.contains("AIza"));
        for bad in ["-1s", "1e9s", "3", "NaNs", ""] {
            assert_eq!(seconds(bad), None, "{bad}");
        }
    }

    #[test]
    fn embeddings_requests_and_answers() {
        let (body, base64) = embed_request(
            br#"{"model":"m","input":["a","b"],"dimensions":3,"encoding_format":"base64"}"#,
            "gemini-embedding-001",
        )
        .unwrap();
        assert!(base64);
        assert_eq!(
            serde_json::from_slice::<Value>(&body).unwrap(),
            json!({"requests":[
                {"model":"models/gemini-embedding-001","content":{"parts":[{"text":"a"}]},"outputDimensionality":3},
                {"model":"models/gemini-embedding-001","content":{"parts":[{"text":"b"}]},"outputDimensionality":3}]})
        );
        let many = serde_json::to_vec(&json!({"input": vec!["x"; 101]})).unwrap();
        assert_eq!(embed_request(&many, "m").unwrap_err().param, Some("input"));
        assert_eq!(embed_request(br#"{"input":[[1,2]]}"#, "m").unwrap_err().param, Some("input"));
        let (out, _) = embeddings(
            br#"{"embeddings":[{"values":[0.5,-0.25]},{"values":[1.0,2.0]}]}"#,
            "gemini-embedding-001",
            false,
        )
        .unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["data"][1], json!({"object":"embedding","index":1,"embedding":[1.0,2.0]}));
        assert_eq!(v["model"], "gemini-embedding-001");
    }
}
