//! Ollama's native API (`api_type = "ollama"`,
//! <https://github.com/ollama/ollama/blob/main/docs/api.md>): OpenAI chat and embeddings in,
//! OpenAI out.
//!
//! - [`request`]: OpenAI chat and embeddings requests as `/api/chat` and `/api/embed` requests.
//! - [`stream`]: the `/api/chat` NDJSON stream rewritten into OpenAI chunks, line by line.
//! - here: the upstream request, non-stream answers (the `/api/chat` object → `chat.completion`,
//!   `/api/embed` → an embeddings list with float or base64 vectors as the client asked), and
//!   error statuses (`{"error": "..."}` → OpenAI error).
//!
//! `/v1/completions` (legacy) is not served for Ollama connections: 400 naming `model`.

pub mod request;
pub mod stream;

use super::{Api, Call, Plan, Prepared, Reply};
use crate::config::{ConfigError, Connection, RawConnection, Secrets};
use crate::error::Error;
use crate::json::{self, Raw, Usage};
use crate::router::Target;
use http::header::{self, HeaderName, HeaderValue};
use http::{StatusCode, Uri};
use serde::Deserialize;
use std::time::Instant;

/// Largest non-stream body read whole (an embeddings answer for many long vectors is large).
pub const MAX_BODY: usize = 64 << 20;

/// Client headers forwarded to Ollama.
const REQUEST_HEADERS: &[&str] = &["user-agent", "x-request-id"];

/// Ollama's default address.
const DEFAULT_BASE: &str = "http://127.0.0.1:11434";

/// An Ollama connection's own settings.
#[derive(Debug)]
pub struct Settings {
    /// The base URL as configured (for summaries).
    pub base: String,
    chat: Uri,
    embed: Uri,
}

impl Settings {
    /// Compiles `api_base` (without `/api`) and `api_key` (optional, sent as
    /// `Authorization: Bearer` for an Ollama behind an authenticating proxy).
    pub fn compile(
        name: &str,
        raw: &RawConnection,
        secrets: &mut Secrets<'_>,
    ) -> Result<(super::Provider, Vec<(HeaderName, HeaderValue)>), ConfigError> {
        let key = |k: &str| format!("connections.{name}.{k}");
        let base = secrets.base(raw, DEFAULT_BASE);
        let headers = secrets.key_header(raw, header::AUTHORIZATION, "Bearer ")?.into_iter().collect();
        let url = |path: &str| crate::config::endpoint_url(&key("api_base"), &base, path);
        let (chat, embed) = (url("/api/chat")?, url("/api/embed")?);
        Ok((super::Provider::Ollama(Settings { base, chat, embed }), headers))
    }

    /// The `/api/chat` or `/api/embed` request for a call.
    pub fn prepare(
        &self,
        conn: &Connection,
        call: &Call<'_>,
        target: &Target,
        deadline: Instant,
    ) -> Result<Prepared, Error> {
        let model = target.upstream_model(call.model);
        let (uri, body, plan) = match call.api {
            Api::Chat => {
                let t = request::chat(call.body, model)?;
                let plan = Plan {
                    stream: t.stream,
                    strip_usage: false,
                    include_usage: t.include_usage,
                    reply: Reply::Chat,
                    deadline,
                };
                (&self.chat, t.body, plan)
            }
            Api::Embeddings => {
                let (body, base64) = request::embed(call.body, model)?;
                let reply = Reply::Embeddings { base64, model: model.into() };
                let plan = Plan { stream: false, strip_usage: false, include_usage: false, reply, deadline };
                (&self.embed, body, plan)
            }
            Api::Completions => {
                return Err(Error::invalid_request(format!(
                    "Model `{}` is served by an Ollama connection, which has no /v1/completions endpoint; use /v1/chat/completions.",
                    call.model
                ))
                .param("model"))
            }
        };
        let request = super::upstream_post(conn, uri, vec![body], REQUEST_HEADERS, call.headers)?;
        Ok(Prepared { request, plan })
    }
}

#[derive(Deserialize)]
struct ErrorBody {
    error: String,
}

/// An Ollama error status and body as the client's OpenAI error. 401/403 (a proxy in front of
/// Ollama refused the gateway's key): 502, the body dropped. 400 and 404 (an unknown model) are
/// the client's to fix and keep their status; 429 and 503 (Ollama's queue is full) keep theirs so
/// clients back off; 408/504 are timeouts; anything else is the upstream failing: 502.
pub fn error_of(connection: &str, status: StatusCode, body: &[u8]) -> Error {
    let said = serde_json::from_slice::<ErrorBody>(body).ok().map(|e| e.error);
    super::said_error(connection, status, said)
}

/// How this provider's answers are read.
pub const READERS: super::Readers =
    super::Readers { stream: |usage, id| Box::new(stream::Stream::new(usage, id)), completion, embeddings };

#[derive(Deserialize)]
struct ChatAnswer<'a> {
    model: &'a str,
    #[serde(borrow)]
    message: Option<AnswerMessage<'a>>,
    done_reason: Option<&'a str>,
    prompt_eval_count: Option<u64>,
    eval_count: Option<u64>,
}

#[derive(Deserialize)]
struct AnswerMessage<'a> {
    #[serde(borrow)]
    content: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow)]
    thinking: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow)]
    tool_calls: Option<Vec<AnswerCall<'a>>>,
}

#[derive(Deserialize)]
struct AnswerCall<'a> {
    #[serde(borrow)]
    id: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow)]
    function: AnswerFunction<'a>,
}

#[derive(Deserialize)]
struct AnswerFunction<'a> {
    #[serde(borrow)]
    name: std::borrow::Cow<'a, str>,
    arguments: Option<Raw>,
}

/// An `/api/chat` answer (`"stream": false`) as an OpenAI `chat.completion`, and its usage;
/// parsed whole with simd-json on the thread's scratch copy.
pub fn completion(body: &[u8], id: &str) -> Option<(Vec<u8>, Usage)> {
    json::with_scratch(body, |scratch| render_completion(scratch.parse().ok()?, id, body.len()))
}

fn render_completion(a: ChatAnswer, id: &str, size: usize) -> Option<(Vec<u8>, Usage)> {
    let m = a.message?;
    let text = m.content.unwrap_or_default();
    let calls: Vec<_> = m
        .tool_calls
        .iter()
        .flatten()
        .enumerate()
        .map(|(k, c)| {
            let call_id =
                c.id.as_deref().filter(|i| !i.is_empty()).map_or_else(|| format!("call_{id}_{k}"), str::to_owned);
            (call_id, &*c.function.name, c.function.arguments.as_ref().map(|r| &r.0[..]))
        })
        .collect();
    let finish = match a.done_reason {
        Some("length") => "length",
        _ if !calls.is_empty() => "tool_calls",
        _ => "stop",
    };
    let usage =
        Usage { prompt: a.prompt_eval_count.unwrap_or(0), completion: a.eval_count.unwrap_or(0), ..Usage::default() };
    let thinking = m.thinking.unwrap_or_default();
    let completion = super::chunk::Completion {
        id,
        model: a.model,
        text: &text,
        thinking: &thinking,
        calls,
        finish,
        usage,
        cached: None,
    };
    Some((completion.render(size)?, usage))
}

#[derive(Deserialize)]
struct EmbedAnswer {
    embeddings: Vec<Vec<f32>>,
    prompt_eval_count: Option<u64>,
}

/// An `/api/embed` answer as an OpenAI embeddings list for `model` (floats, or base64 when
/// `base64`), and its usage.
pub fn embeddings(body: &[u8], model: &str, base64: bool) -> Option<(Vec<u8>, Usage)> {
    json::with_scratch(body, |scratch| {
        let a: EmbedAnswer = scratch.parse().ok()?;
        let prompt = a.prompt_eval_count.unwrap_or(0);
        let out = super::chat::embeddings_list(&a.embeddings, model, prompt, base64)?;
        Some((out, Usage { prompt, ..Usage::default() }))
    })
}

#[cfg(test)]
mod tests {
    //! Non-stream mappings; expectations written by hand from Ollama's answers
    //! (<https://github.com/ollama/ollama/blob/main/docs/api.md>) and OpenAI's objects
    //! (<https://platform.openai.com/docs/api-reference/chat/object>,
    //! <https://platform.openai.com/docs/api-reference/embeddings/object>).

    use super::*;
    use serde_json::{json, Value};

    fn chat(answer: Value) -> (Value, Usage) {
        let (out, usage) = completion(answer.to_string().as_bytes(), "chatcmpl-9").expect("readable");
        let mut v: Value = serde_json::from_slice(&out).unwrap();
        assert!(v.as_object_mut().unwrap().remove("created").is_some_and(|c| c.is_u64()));
        (v, usage)
    }

    #[test]
    fn a_chat_answer_becomes_a_chat_completion() {
        let (v, usage) = chat(json!({"model":"qwen3","created_at":"2025-01-01T00:00:00Z",
            "message":{"role":"assistant","content":"Paris.","thinking":"Capital of \"France\"."},
            "done":true,"done_reason":"stop","total_duration":1,"prompt_eval_count":11,"eval_count":3}));
        assert_eq!(
            v,
            json!({"id":"chatcmpl-9","object":"chat.completion","model":"qwen3","choices":[{"index":0,
                "message":{"role":"assistant","content":"Paris.","reasoning_content":"Capital of \"France\"."},
                "logprobs":null,"finish_reason":"stop"}],
                "usage":{"prompt_tokens":11,"completion_tokens":3,"total_tokens":14}})
        );
        assert_eq!((usage.prompt, usage.completion), (11, 3));
    }

    #[test]
    fn tool_calls_get_ids_and_string_arguments_and_counts_may_be_absent() {
        let (v, usage) = chat(json!({"model":"llama3.2","message":{"role":"assistant","content":"",
            "tool_calls":[{"function":{"name":"get_weather","arguments":{"city":"Paris","days":[1,2]}}},
                          {"id":"call_own","function":{"name":"now","arguments":{}}}]},
            "done":true,"done_reason":"stop"}));
        let calls = &v["choices"][0]["message"]["tool_calls"];
        assert_eq!(v["choices"][0]["message"]["content"], Value::Null);
        assert_eq!(v["choices"][0]["finish_reason"], "tool_calls");
        assert_eq!(calls[0]["id"], "call_chatcmpl-9_0");
        assert_eq!(calls[1]["id"], "call_own");
        let args: Value = serde_json::from_str(calls[0]["function"]["arguments"].as_str().unwrap()).unwrap();
        assert_eq!(args, json!({"city":"Paris","days":[1,2]}));
        assert_eq!(calls[1]["function"], json!({"name":"now","arguments":"{}"}));
        assert_eq!((usage.prompt, usage.completion), (0, 0));
        let (v, _) = chat(
            json!({"model":"m","message":{"role":"assistant","content":"cut"},"done":true,"done_reason":"length"}),
        );
        assert_eq!(v["choices"][0]["finish_reason"], "length");
        assert!(completion(br#"{"model":"m","done":true}"#, "x").is_none(), "no message: unreadable");
        assert!(completion(b"not json", "x").is_none());
    }

    #[test]
    fn embeddings_come_back_as_floats_or_base64_of_float32() {
        let answer = json!({"model":"nomic-embed-text","embeddings":[[0.5,-0.25,1e-7],[0.125,2.0,-3.5]],
            "total_duration":14143917,"load_duration":1019500,"prompt_eval_count":8});
        let body = answer.to_string();
        let (out, usage) = embeddings(body.as_bytes(), "nomic-embed-text", false).unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            v,
            json!({"object":"list","data":[
                {"object":"embedding","index":0,"embedding":[0.5,-0.25,1e-7]},
                {"object":"embedding","index":1,"embedding":[0.125,2.0,-3.5]}],
                "model":"nomic-embed-text","usage":{"prompt_tokens":8,"total_tokens":8}})
        );
        assert_eq!(usage.prompt, 8);
        let (out, _) = embeddings(body.as_bytes(), "nomic-embed-text", true).unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        let decode = |s: &Value| -> Vec<f32> {
            use base64::Engine as _;
            let b = base64::engine::general_purpose::STANDARD.decode(s.as_str().unwrap()).unwrap();
            b.chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
        };
        assert_eq!(decode(&v["data"][0]["embedding"]), [0.5, -0.25, 1e-7_f32]);
        assert_eq!(decode(&v["data"][1]["embedding"]), [0.125, 2.0, -3.5]);
        assert!(embeddings(br#"{"model":"m","embeddings":[["x"]]}"#, "m", false).is_none());
    }

    #[test]
    fn error_statuses_map_with_ollamas_message() {
        let e = error_of(
            "local",
            StatusCode::NOT_FOUND,
            br#"{"error":"model \"llama9\" not found, try pulling it first"}"#,
        );
        assert_eq!((e.status, e.r#type), (StatusCode::NOT_FOUND, "invalid_request_error"));
        assert_eq!(e.message, "model \"llama9\" not found, try pulling it first");
        let e = error_of(
            "local",
            StatusCode::SERVICE_UNAVAILABLE,
            br#"{"error":"server busy, please try again.  maximum pending requests exceeded"}"#,
        );
        assert_eq!(e.status, StatusCode::SERVICE_UNAVAILABLE);
        let e = error_of("local", StatusCode::INTERNAL_SERVER_ERROR, b"<html>oops</html>");
        assert_eq!(e.status, StatusCode::BAD_GATEWAY);
        assert!(e.message.contains("`local` answered with status 500"), "{}", e.message);
        let e = error_of("local", StatusCode::UNAUTHORIZED, br#"{"error":"key sk-123 refused"}"#);
        assert!(!e.message.contains("sk-123"));
        assert_eq!(e.kind, crate::error::Kind::UpstreamAuth);
    }
}
