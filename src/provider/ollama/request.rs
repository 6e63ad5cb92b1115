//! OpenAI chat and embeddings requests → Ollama `/api/chat` and `/api/embed` requests.
//!
//! Mapping, from <https://platform.openai.com/docs/api-reference/chat/create> to
//! <https://github.com/ollama/ollama/blob/main/docs/api.md>: messages keep their roles
//! (`developer` → `system`); content parts are joined into the message's `content` text, images
//! given as data: URLs go into `images` as raw base64 (an `http(s)` URL is never fetched by the
//! gateway: 400 naming the part); assistant `tool_calls` keep their shape with the JSON-string
//! `arguments` embedded as an object; a `tool` message gets the `tool_name` of the call its
//! `tool_call_id` answers; `tools` are OpenAI's own shape and go as they are; `max_tokens` /
//! `max_completion_tokens` → `options.num_predict`, and `temperature`, `top_p`, `seed`, `stop`,
//! `presence_penalty`, `frequency_penalty` → `options`; `response_format` → `format` (`"json"`
//! or the JSON schema); `reasoning_effort` → `think`. `stream` is always sent (Ollama streams
//! unless told not to). Parameters Ollama cannot honour are a 400 naming them when their value
//! matters.
//!
//! Requests are parsed once with simd-json on the thread's scratch copy, as for Anthropic;
//! sub-trees that are only carried over (tool schemas, the JSON schema) are embedded as text.

use crate::error::Error;
use crate::json::{self, Raw};
pub use crate::provider::chat::Translated;
use crate::provider::chat::{
    bad, InContent, InMessage, InToolCall, InToolChoice, JsonMode, ResponseFormat, Stop, StreamOptions,
};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

#[derive(Deserialize)]
struct ChatRequest<'a> {
    #[serde(borrow)]
    messages: Vec<InMessage<'a>>,
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    seed: Option<i64>,
    presence_penalty: Option<f64>,
    frequency_penalty: Option<f64>,
    stop: Option<Stop>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    tools: Option<Vec<Raw>>,
    #[serde(borrow)]
    tool_choice: Option<InToolChoice<'a>>,
    response_format: Option<ResponseFormat>,
    reasoning_effort: Option<String>,
    // Parameters that cannot be honoured: checked below.
    n: Option<u64>,
    logprobs: Option<bool>,
    top_logprobs: Option<u64>,
    logit_bias: Option<Raw>,
    audio: Option<Raw>,
    prediction: Option<Raw>,
    functions: Option<Raw>,
    function_call: Option<Raw>,
}

#[derive(Serialize)]
struct ChatOut<'a> {
    model: &'a str,
    messages: Vec<MessageOut>,
    stream: bool,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tools: Vec<Box<RawValue>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    format: Option<Box<RawValue>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    think: Option<Think>,
    #[serde(skip_serializing_if = "Options::is_empty")]
    options: Options,
}

#[derive(Serialize)]
#[serde(untagged)]
enum Think {
    On(bool),
    Level(&'static str),
}

#[derive(Serialize, Default)]
struct Options {
    #[serde(skip_serializing_if = "Option::is_none")]
    num_predict: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    seed: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    presence_penalty: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    frequency_penalty: Option<f64>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    stop: Vec<String>,
}

impl Options {
    fn is_empty(&self) -> bool {
        self.num_predict.is_none()
            && self.temperature.is_none()
            && self.top_p.is_none()
            && self.seed.is_none()
            && self.presence_penalty.is_none()
            && self.frequency_penalty.is_none()
            && self.stop.is_empty()
    }
}

#[derive(Serialize)]
struct MessageOut {
    role: &'static str,
    content: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    images: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tool_calls: Vec<ToolCallOut>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_name: Option<String>,
}

#[derive(Serialize)]
struct ToolCallOut {
    function: FunctionOut,
}

#[derive(Serialize)]
struct FunctionOut {
    name: String,
    arguments: Box<RawValue>,
}

fn unsupported(param: &'static str) -> Error {
    bad(param, format!("`{param}` is not supported for Ollama models with this value."))
}

/// Translates an OpenAI chat request body (already validated JSON) for `model`.
pub fn chat(body: &[u8], model: &str) -> Result<Translated, Error> {
    json::with_scratch(body, |scratch| match scratch.parse() {
        Ok(req) => chat_parsed(req, model),
        Err(_) => Err(parse_error(body)),
    })
}

/// Why a request does not have the chat request's shape: simd-json's errors name neither the
/// member nor the type it wanted, so this (rare) path reads the body again with serde_json.
fn parse_error(body: &[u8]) -> Error {
    match serde_json::from_slice::<ChatRequest>(body) {
        Err(e) => Error::invalid_request(format!("Invalid chat completion request: {e}.")),
        Ok(_) => Error::invalid_request("Invalid chat completion request."),
    }
}

fn chat_parsed(req: ChatRequest, model: &str) -> Result<Translated, Error> {
    reject_unsupported(&req)?;
    // Each tool call's name by its id, for the `tool` messages that answer it.
    let mut names: Vec<(String, String)> = Vec::new();
    let mut messages = Vec::with_capacity(req.messages.len());
    for (i, m) in req.messages.into_iter().enumerate() {
        let role = match m.role.as_str() {
            "system" | "developer" => "system",
            "user" => "user",
            "assistant" => "assistant",
            "tool" => "tool",
            other => return Err(bad("messages", format!("messages[{i}]: unknown role `{other}`."))),
        };
        let (content, images) = content(m.content, i, role == "user")?;
        let mut out = MessageOut { role, content, images, tool_calls: Vec::new(), tool_name: None };
        if role == "assistant" {
            for call in m.tool_calls.unwrap_or_default() {
                out.tool_calls.push(tool_call(&call, i)?);
                names.push((call.id, call.function.name));
            }
        }
        if role == "tool" {
            let id = m
                .tool_call_id
                .ok_or_else(|| bad("messages", format!("messages[{i}]: a tool message needs `tool_call_id`.")))?;
            out.tool_name = names.iter().rev().find(|(known, _)| *known == id).map(|(_, name)| name.clone());
        }
        messages.push(out);
    }
    if messages.is_empty() {
        return Err(bad("messages", "`messages` must contain at least one message."));
    }
    let tools_off = matches!(&req.tool_choice, Some(InToolChoice::Mode(m)) if m == "none");
    let tools = if tools_off { Vec::new() } else { req.tools.unwrap_or_default() };
    let tools = tools.into_iter().map(|t| raw_value(t, "tools")).collect::<Result<_, _>>()?;
    let format = match ResponseFormat::json_mode(req.response_format)? {
        None => None,
        Some(JsonMode::Object) => Some(raw_value(Raw(b"\"json\"".to_vec()), "response_format")?),
        Some(JsonMode::Schema(schema)) => Some(schema),
    };
    let think = match req.reasoning_effort.as_deref() {
        None => None,
        Some("none") => Some(Think::On(false)),
        Some("minimal" | "low") => Some(Think::Level("low")),
        Some("medium") => Some(Think::Level("medium")),
        Some("high") => Some(Think::Level("high")),
        Some(other) => return Err(bad("reasoning_effort", format!("Unknown `reasoning_effort` `{other}`."))),
    };
    let options = Options {
        num_predict: req.max_completion_tokens.or(req.max_tokens),
        temperature: req.temperature,
        top_p: req.top_p,
        seed: req.seed,
        presence_penalty: req.presence_penalty,
        frequency_penalty: req.frequency_penalty,
        stop: Stop::sequences(req.stop),
    };
    let stream = req.stream.unwrap_or(false);
    let out = ChatOut { model, messages, stream, tools, format, think, options };
    let body =
        serde_json::to_vec(&out).map_err(|e| Error::invalid_request(format!("Cannot translate the request: {e}.")))?;
    let include_usage = req.stream_options.and_then(|o| o.include_usage).unwrap_or(false);
    Ok(Translated { body: body.into(), stream, include_usage })
}

fn reject_unsupported(r: &ChatRequest) -> Result<(), Error> {
    let present = |v: Option<&Raw>| v.is_some_and(|v| !v.is_empty_object());
    if r.n.is_some_and(|n| n != 1) {
        return Err(bad("n", "`n` other than 1 is not supported for Ollama models."));
    }
    if r.logprobs == Some(true) || r.top_logprobs.is_some_and(|n| n > 0) {
        return Err(unsupported(if r.logprobs == Some(true) { "logprobs" } else { "top_logprobs" }));
    }
    if present(r.logit_bias.as_ref()) {
        return Err(unsupported("logit_bias"));
    }
    if present(r.audio.as_ref()) {
        return Err(unsupported("audio"));
    }
    if present(r.prediction.as_ref()) {
        return Err(unsupported("prediction"));
    }
    if r.functions.as_ref().is_some_and(|f| f.0 != b"[]") {
        return Err(bad(
            "functions",
            "`functions` (the deprecated function-calling API) is not supported; use `tools`.",
        ));
    }
    if r.function_call.as_ref().is_some_and(|c| !matches!(&c.0[..], b"\"auto\"" | b"\"none\"")) {
        return Err(bad(
            "function_call",
            "`function_call` (the deprecated function-calling API) is not supported; use `tool_choice`.",
        ));
    }
    // Ollama lets the model choose: only `auto` and `none` (no tools sent) can be honoured.
    match &r.tool_choice {
        None => Ok(()),
        Some(InToolChoice::Mode(m)) if m == "auto" || m == "none" => Ok(()),
        Some(_) => Err(bad("tool_choice", "Ollama models choose their tools: only `auto` and `none` are supported.")),
    }
}

/// A message's text (parts joined by newlines) and, where allowed, its images as raw base64.
fn content(content: Option<InContent>, i: usize, images_allowed: bool) -> Result<(String, Vec<String>), Error> {
    let parts = match content {
        None => return Ok((String::new(), Vec::new())),
        Some(InContent::Text(t)) => return Ok((t, Vec::new())),
        Some(InContent::Parts(p)) => p,
    };
    let mut text = String::new();
    let mut images = Vec::new();
    for (j, p) in parts.into_iter().enumerate() {
        match (p.kind.as_str(), p.text, p.image_url) {
            ("text", Some(t), _) => {
                if !text.is_empty() {
                    text.push('\n');
                }
                text.push_str(&t);
            }
            ("image_url", _, Some(img)) if images_allowed => {
                images.push(image(img.url(), i, j)?);
            }
            (kind, _, _) => {
                return Err(bad(
                    "messages",
                    format!(
                        "messages[{i}].content[{j}]: content part `{kind}` is not supported here for Ollama models."
                    ),
                ))
            }
        }
    }
    Ok((text, images))
}

/// The raw base64 of a data: URL image. The gateway never fetches a URL for a client.
fn image(url: String, i: usize, j: usize) -> Result<String, Error> {
    let at = format!("messages[{i}].content[{j}]");
    match url.strip_prefix("data:").and_then(|rest| rest.split_once(";base64,")) {
        Some((_, data)) => Ok(data.to_owned()),
        None if url.starts_with("http://") || url.starts_with("https://") => Err(bad(
            "messages",
            format!("{at}: Ollama takes images as data: URLs (`data:image/png;base64,...`); the gateway does not fetch image URLs."),
        )),
        None => Err(bad("messages", format!("{at}: an image must be a base64 data: URL (`data:image/png;base64,...`)."))),
    }
}

fn tool_call(call: &InToolCall, i: usize) -> Result<ToolCallOut, Error> {
    // Ollama wants the arguments as an object.
    let arguments = call.arguments_object(i)?;
    Ok(ToolCallOut { function: FunctionOut { name: call.function.name.clone(), arguments } })
}

/// Rendered JSON embedded as it is; a 400 naming `param` if it cannot be.
fn raw_value(raw: Raw, param: &'static str) -> Result<Box<RawValue>, Error> {
    crate::provider::chat::raw_value(raw).ok_or_else(|| bad(param, format!("Invalid `{param}`.")))
}

#[derive(Serialize)]
struct EmbedOut<'a> {
    model: &'a str,
    input: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    dimensions: Option<u64>,
}

/// An embeddings request for `/api/embed`, and whether the client wants base64 vectors.
pub fn embed(body: &[u8], model: &str) -> Result<(bytes::Bytes, bool), Error> {
    let e = crate::provider::chat::embed_input(body, "Ollama")?;
    let out = EmbedOut { model, input: e.input, dimensions: e.dimensions };
    let body =
        serde_json::to_vec(&out).map_err(|e| Error::invalid_request(format!("Cannot translate the request: {e}.")))?;
    Ok((body.into(), e.base64))
}

#[cfg(test)]
mod tests {
    //! Expectations written by hand from the two API references named in the module header.

    use super::*;
    use serde_json::{json, Value};

    fn tr(req: Value) -> (Value, Translated) {
        let t = chat(req.to_string().as_bytes(), "llama3.2").unwrap();
        (serde_json::from_slice(&t.body).unwrap(), t)
    }

    fn err(req: Value) -> Error {
        chat(req.to_string().as_bytes(), "llama3.2").err().unwrap()
    }

    #[test]
    fn messages_options_and_stream_map() {
        let (out, t) = tr(json!({"model":"m","stream":true,"stream_options":{"include_usage":true},
            "messages":[
                {"role":"developer","content":"be brief"},
                {"role":"user","content":[{"type":"text","text":"what is"},{"type":"text","text":"this?"},
                    {"type":"image_url","image_url":{"url":"data:image/png;base64,iVBORw0KGgo="}}]},
            ],
            "max_completion_tokens":50,"temperature":0.2,"top_p":0.9,"seed":7,"stop":"END",
            "frequency_penalty":0.5,"user":"u1","parallel_tool_calls":true}));
        assert_eq!(
            out,
            json!({"model":"llama3.2","stream":true,"messages":[
                {"role":"system","content":"be brief"},
                {"role":"user","content":"what is\nthis?","images":["iVBORw0KGgo="]}],
                "options":{"num_predict":50,"temperature":0.2,"top_p":0.9,"seed":7,"frequency_penalty":0.5,"stop":["END"]}})
        );
        assert!(t.stream && t.include_usage);
        // Ollama streams unless told not to: a non-stream request says so.
        let (out, t) = tr(json!({"messages":[{"role":"user","content":"hi"}],"max_tokens":3}));
        assert_eq!(
            out,
            json!({"model":"llama3.2","stream":false,"messages":[{"role":"user","content":"hi"}],
            "options":{"num_predict":3}})
        );
        assert!(!t.stream && !t.include_usage);
    }

    #[test]
    fn tool_calls_become_objects_and_results_are_named_after_their_call() {
        let tool = json!({"type":"function","function":{"name":"get_weather","parameters":{"type":"object",
            "properties":{"city":{"type":"string"}}}}});
        let (out, _) = tr(json!({"tools":[tool.clone()],"tool_choice":"auto","messages":[
            {"role":"user","content":"weather?"},
            {"role":"assistant","content":null,"tool_calls":[
                {"id":"call_1","type":"function","function":{"name":"get_weather","arguments":"{\"city\": \"Paris\"}"}},
                {"id":"call_2","type":"function","function":{"name":"now","arguments":""}}]},
            {"role":"tool","tool_call_id":"call_2","content":"noon"},
            {"role":"tool","tool_call_id":"call_1","content":[{"type":"text","text":"12C"}]},
            {"role":"tool","tool_call_id":"call_unknown","content":"?"}]}));
        assert_eq!(out["tools"], json!([tool]));
        assert_eq!(
            out["messages"],
            json!([
                {"role":"user","content":"weather?"},
                {"role":"assistant","content":"","tool_calls":[
                    {"function":{"name":"get_weather","arguments":{"city":"Paris"}}},
                    {"function":{"name":"now","arguments":{}}}]},
                {"role":"tool","content":"noon","tool_name":"now"},
                {"role":"tool","content":"12C","tool_name":"get_weather"},
                {"role":"tool","content":"?"}
            ])
        );
        // `none`: no tools are offered.
        let (out, _) = tr(json!({"tools":[tool],"tool_choice":"none","messages":[{"role":"user","content":"x"}]}));
        assert!(out.get("tools").is_none());
    }

    #[test]
    fn response_format_and_reasoning_effort_map() {
        let schema = json!({"type":"object","properties":{"a":{"type":"integer"}},"required":["a"]});
        let m = json!([{"role":"user","content":"x"}]);
        let (out, _) = tr(
            json!({"messages":m,"response_format":{"type":"json_schema","json_schema":{"name":"s","schema":schema}}}),
        );
        assert_eq!(out["format"], schema);
        let (out, _) = tr(json!({"messages":m,"response_format":{"type":"json_object"},"reasoning_effort":"high"}));
        assert_eq!((out["format"].clone(), out["think"].clone()), (json!("json"), json!("high")));
        let (out, _) = tr(json!({"messages":m,"response_format":{"type":"text"},"reasoning_effort":"none"}));
        assert_eq!((out.get("format"), out["think"].clone()), (None, json!(false)));
    }

    #[test]
    fn what_cannot_be_honoured_is_a_400_naming_it() {
        let m = json!([{"role":"user","content":"x"}]);
        let url = |u: &str| json!([{"role":"user","content":[{"type":"image_url","image_url":{"url":u}}]}]);
        for (req, param, says) in [
            (json!({"messages":url("https://example.com/cat.png")}), "messages", "messages[0].content[0]"),
            (json!({"messages":url("file:///etc/passwd")}), "messages", "data: URL"),
            (
                json!({"messages":[{"role":"system","content":[{"type":"image_url","image_url":{"url":"data:image/png;base64,AA"}}]}]}),
                "messages",
                "content[0]",
            ),
            (
                json!({"messages":[{"role":"user","content":[{"type":"input_audio","input_audio":{}}]}]}),
                "messages",
                "input_audio",
            ),
            (json!({"messages":m,"n":2}), "n", "`n`"),
            (json!({"messages":m,"logprobs":true}), "logprobs", "logprobs"),
            (json!({"messages":m,"logit_bias":{"1":2}}), "logit_bias", "logit_bias"),
            (json!({"messages":m,"tool_choice":"required"}), "tool_choice", "only `auto` and `none`"),
            (
                json!({"messages":m,"tool_choice":{"type":"function","function":{"name":"f"}}}),
                "tool_choice",
                "only `auto`",
            ),
            (json!({"messages":m,"functions":[{"name":"f"}]}), "functions", "tools"),
            (json!({"messages":m,"reasoning_effort":"max"}), "reasoning_effort", "max"),
            (
                json!({"messages":[{"role":"assistant","tool_calls":[{"id":"c","type":"function","function":{"name":"f","arguments":"[1]"}}]}]}),
                "messages",
                "not a JSON object",
            ),
            (json!({"messages":[{"role":"tool","content":"x"}]}), "messages", "tool_call_id"),
            (json!({"messages":[{"role":"robot","content":"x"}]}), "messages", "robot"),
            (json!({"messages":[]}), "messages", "at least one"),
        ] {
            let e = err(req.clone());
            assert_eq!(e.param, Some(param), "{req}: {}", e.message);
            assert!(e.message.contains(says), "{req}: {}", e.message);
        }
        assert!(err(json!({"messages":"x"})).message.starts_with("Invalid chat completion request"));
    }

    #[test]
    fn embeddings_requests_map_and_token_arrays_are_refused() {
        let (body, base64) =
            embed(br#"{"model":"m","input":["a","b"],"dimensions":8,"encoding_format":"base64"}"#, "nomic").unwrap();
        assert_eq!(
            serde_json::from_slice::<Value>(&body).unwrap(),
            json!({"model":"nomic","input":["a","b"],"dimensions":8})
        );
        assert!(base64);
        let (body, base64) = embed(br#"{"model":"m","input":"a"}"#, "nomic").unwrap();
        assert_eq!(serde_json::from_slice::<Value>(&body).unwrap(), json!({"model":"nomic","input":["a"]}));
        assert!(!base64);
        for (req, param) in [
            (&br#"{"model":"m","input":[1,2,3]}"#[..], "input"),
            (br#"{"model":"m","input":[[1,2]]}"#, "input"),
            (br#"{"model":"m","input":[]}"#, "input"),
            (br#"{"model":"m"}"#, "input"),
            (br#"{"model":"m","input":"a","encoding_format":"int8"}"#, "encoding_format"),
            (br#"{"model":"m","input":"a","dimensions":0}"#, "dimensions"),
        ] {
            let e = embed(req, "nomic").err().unwrap();
            assert_eq!(e.param, Some(param), "{}: {}", String::from_utf8_lossy(req), e.message);
        }
    }
}
