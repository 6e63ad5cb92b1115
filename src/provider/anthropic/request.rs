//! OpenAI chat request → Anthropic Messages request.
//!
//! Mapping, from <https://platform.openai.com/docs/api-reference/chat/create> to
//! <https://docs.anthropic.com/en/api/messages>: `system` and `developer` messages become the
//! top-level `system` blocks, in order; user and assistant content (strings or parts) becomes
//! content blocks (text; `image_url` data: URLs → base64 sources, http(s) URLs → url sources);
//! assistant `tool_calls` → `tool_use` blocks, their JSON-string `arguments` embedded as the
//! `input` object without a re-serialisation; `tool` messages → `tool_result` blocks in a user
//! turn; consecutive same-role turns are merged (Anthropic requires alternation); `max_tokens` /
//! `max_completion_tokens`, else the connection's default (Anthropic requires one); `stop` →
//! `stop_sequences`; `user` → `metadata.user_id`; tools → `input_schema`; `tool_choice` and
//! `parallel_tool_calls` → `tool_choice`. Parameters Anthropic cannot honour are a 400 naming
//! the parameter when their value matters, and are accepted when their value is a no-op. The
//! deprecated `functions` / `function_call` are such parameters (use `tools` / `tool_choice`):
//! translated, they would come back as `tool_calls`, not the `function_call` their client reads.
//!
//! Requests are parsed fully here, with simd-json on a reused scratch copy
//! ([`json::with_scratch`]): translation needs the whole tree anyway, and a request is parsed
//! once while its response may be thousands of events. Strings borrow from the copy; schemas
//! and similar sub-trees that are only carried over are read as [`json::Raw`] text (key order
//! kept) and embedded in the output without another tree. The output is written by serde_json.

use crate::error::Error;
use crate::json::{self, Raw};
pub use crate::provider::chat::Translated;
use crate::provider::chat::{
    bad, raw_value, InContent, InMessage, InTool, InToolCall, InToolChoice, ResponseFormat, Stop, StreamOptions,
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
    stop: Option<Stop>,
    #[serde(default)]
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    #[serde(borrow)]
    tools: Option<Vec<InTool<'a>>>,
    #[serde(borrow)]
    tool_choice: Option<InToolChoice<'a>>,
    parallel_tool_calls: Option<bool>,
    user: Option<String>,
    // Parameters that cannot be honoured: checked below.
    n: Option<u64>,
    logprobs: Option<bool>,
    top_logprobs: Option<u64>,
    presence_penalty: Option<f64>,
    frequency_penalty: Option<f64>,
    logit_bias: Option<Raw>,
    response_format: Option<ResponseFormat>,
    seed: Option<i64>,
    audio: Option<Raw>,
    modalities: Option<Vec<String>>,
    prediction: Option<Raw>,
    reasoning_effort: Option<String>,
    // The legacy function-calling API: refused rather than translated, since its answer shape
    // (`message.function_call`) is not what a translated tool call comes back as.
    functions: Option<Raw>,
    function_call: Option<Raw>,
}

#[derive(Serialize)]
struct MessagesRequest<'a> {
    model: &'a str,
    max_tokens: u64,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    system: Vec<Block>,
    messages: Vec<Turn>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f64>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    stop_sequences: Vec<String>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    stream: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    metadata: Option<Metadata>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tools: Vec<ToolOut>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_choice: Option<ToolChoiceOut>,
}

#[derive(Serialize)]
struct Metadata {
    user_id: String,
}

#[derive(Serialize)]
struct Turn {
    role: &'static str,
    content: Vec<Block>,
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Block {
    Text { text: String },
    Image { source: ImageSource },
    ToolUse { id: String, name: String, input: Box<RawValue> },
    ToolResult { tool_use_id: String, content: Vec<Block> },
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ImageSource {
    Base64 { media_type: String, data: String },
    Url { url: String },
}

#[derive(Serialize)]
struct ToolOut {
    name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    description: Option<String>,
    input_schema: Box<RawValue>,
}

#[derive(Serialize)]
struct ToolChoiceOut {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    disable_parallel_tool_use: bool,
}

fn unsupported(param: &'static str) -> Error {
    bad(param, format!("`{param}` is not supported for Anthropic models with this value."))
}

/// Translates an OpenAI chat request body (already validated JSON) for `model`.
pub fn translate(body: &[u8], model: &str, default_max_tokens: u64) -> Result<Translated, Error> {
    json::with_scratch(body, |scratch| match scratch.parse() {
        Ok(req) => translate_parsed(req, model, default_max_tokens),
        Err(_) => Err(parse_error(body)),
    })
}

/// Why a request does not have the chat request's shape. simd-json's errors name neither the
/// member nor the type it wanted, so this (rare) path reads the body again with serde_json for
/// a message the client can act on.
fn parse_error(body: &[u8]) -> Error {
    match serde_json::from_slice::<ChatRequest>(body) {
        Err(e) => Error::invalid_request(format!("Invalid chat completion request: {e}.")),
        Ok(_) => Error::invalid_request("Invalid chat completion request."),
    }
}

fn translate_parsed(req: ChatRequest, model: &str, default_max_tokens: u64) -> Result<Translated, Error> {
    reject_unsupported(&req)?;

    let mut system = Vec::new();
    let mut turns: Vec<Turn> = Vec::with_capacity(req.messages.len());
    for (i, m) in req.messages.into_iter().enumerate() {
        let (role, blocks) = match m.role.as_str() {
            "system" | "developer" => {
                system.extend(text_blocks(m.content, i)?);
                continue;
            }
            "user" => ("user", content_blocks(m.content, i)?),
            "assistant" => {
                let mut blocks = text_blocks(m.content, i)?;
                for call in m.tool_calls.unwrap_or_default() {
                    blocks.push(tool_use(call, i)?);
                }
                ("assistant", blocks)
            }
            "tool" => {
                let id = m
                    .tool_call_id
                    .ok_or_else(|| bad("messages", format!("messages[{i}]: a tool message needs `tool_call_id`.")))?;
                ("user", vec![Block::ToolResult { tool_use_id: id, content: text_blocks(m.content, i)? }])
            }
            other => return Err(bad("messages", format!("messages[{i}]: unknown role `{other}`."))),
        };
        if blocks.is_empty() {
            continue;
        }
        match turns.last_mut() {
            Some(last) if last.role == role => last.content.extend(blocks),
            _ => turns.push(Turn { role, content: blocks }),
        }
    }
    if turns.is_empty() {
        return Err(bad("messages", "`messages` must contain at least one user or assistant message with content."));
    }
    // Anthropic rejects a final assistant turn (a prefill) that ends in white space.
    if let Some(Turn { role: "assistant", content }) = turns.last_mut() {
        if let Some(Block::Text { text }) = content.last_mut() {
            text.truncate(text.trim_end().len());
        }
    }

    let tools: Vec<ToolOut> = req
        .tools
        .unwrap_or_default()
        .into_iter()
        .map(|t| match (&*t.kind, t.function) {
            ("function", Some(f)) => Ok(ToolOut {
                name: f.name,
                description: f.description,
                input_schema: match f.parameters {
                    Some(p) => raw_value(p).ok_or_else(|| bad("tools", "Invalid tool `parameters`."))?,
                    None => empty_schema().to_owned(),
                },
            }),
            _ => Err(bad("tools", format!("Tool type `{}` is not supported; use function tools.", t.kind))),
        })
        .collect::<Result<_, _>>()?;
    let tool_choice = tool_choice(req.tool_choice, req.parallel_tool_calls)?;

    let max_tokens = req.max_completion_tokens.or(req.max_tokens).unwrap_or(default_max_tokens);
    let stop_sequences = Stop::sequences(req.stop);
    let stream = req.stream.unwrap_or(false);
    let out = MessagesRequest {
        model,
        max_tokens,
        system,
        messages: turns,
        temperature: req.temperature,
        top_p: req.top_p,
        stop_sequences,
        stream,
        metadata: req.user.map(|user_id| Metadata { user_id }),
        tools,
        tool_choice,
    };
    let body =
        serde_json::to_vec(&out).map_err(|e| Error::invalid_request(format!("Cannot translate the request: {e}.")))?;
    let include_usage = req.stream_options.and_then(|o| o.include_usage).unwrap_or(false);
    Ok(Translated { body: body.into(), stream, include_usage })
}

fn reject_unsupported(r: &ChatRequest) -> Result<(), Error> {
    let nonzero = |v: Option<f64>| v.is_some_and(|x| x != 0.0);
    // `null` reads as `None`; an empty object is as good as absent.
    let present = |v: Option<&Raw>| v.is_some_and(|v| !v.is_empty_object());
    if r.n.is_some_and(|n| n != 1) {
        return Err(bad("n", "`n` other than 1 is not supported for Anthropic models."));
    }
    if r.logprobs == Some(true) || r.top_logprobs.is_some_and(|n| n > 0) {
        return Err(unsupported(if r.logprobs == Some(true) { "logprobs" } else { "top_logprobs" }));
    }
    if nonzero(r.presence_penalty) {
        return Err(unsupported("presence_penalty"));
    }
    if nonzero(r.frequency_penalty) {
        return Err(unsupported("frequency_penalty"));
    }
    if present(r.logit_bias.as_ref()) {
        return Err(unsupported("logit_bias"));
    }
    if r.response_format.as_ref().is_some_and(|f| f.kind != "text") {
        return Err(unsupported("response_format"));
    }
    if r.seed.is_some() {
        return Err(unsupported("seed"));
    }
    if present(r.audio.as_ref()) || r.modalities.as_ref().is_some_and(|m| m.iter().any(|m| m != "text")) {
        return Err(unsupported(if present(r.audio.as_ref()) { "audio" } else { "modalities" }));
    }
    if present(r.prediction.as_ref()) {
        return Err(unsupported("prediction"));
    }
    if r.functions.as_ref().is_some_and(|f| f.0 != b"[]") {
        return Err(bad(
            "functions",
            "`functions` (the deprecated function-calling API) is not supported for Anthropic models; use `tools`.",
        ));
    }
    // Without functions, `auto` and `none` choose nothing; naming a function names one that is not there.
    if r.function_call.as_ref().is_some_and(|c| !matches!(&c.0[..], b"\"auto\"" | b"\"none\"")) {
        return Err(bad(
            "function_call",
            "`function_call` (the deprecated function-calling API) is not supported for Anthropic models; use `tool_choice`.",
        ));
    }
    if r.reasoning_effort.is_some() {
        return Err(bad("reasoning_effort", "`reasoning_effort` is not mapped to Anthropic thinking yet."));
    }
    Ok(())
}

fn empty_schema() -> &'static RawValue {
    static SCHEMA: std::sync::LazyLock<Box<RawValue>> = std::sync::LazyLock::new(|| {
        RawValue::from_string(r#"{"type":"object","properties":{}}"#.to_owned()).expect("valid JSON")
    });
    &SCHEMA
}

/// Text content only (system, assistant and tool messages).
fn text_blocks(content: Option<InContent>, i: usize) -> Result<Vec<Block>, Error> {
    let parts = match content {
        None => return Ok(Vec::new()),
        Some(InContent::Text(t)) => return Ok(non_empty(t).into_iter().collect()),
        Some(InContent::Parts(p)) => p,
    };
    parts
        .into_iter()
        .filter_map(|p| match (p.kind.as_str(), p.text) {
            ("text", Some(t)) => non_empty(t).map(Ok),
            (kind, _) => Some(Err(bad(
                "messages",
                format!("messages[{i}]: content part `{kind}` is not allowed in this message."),
            ))),
        })
        .collect()
}

fn non_empty(text: String) -> Option<Block> {
    // Anthropic rejects empty text blocks.
    (!text.is_empty()).then_some(Block::Text { text })
}

/// User content: text and images.
fn content_blocks(content: Option<InContent>, i: usize) -> Result<Vec<Block>, Error> {
    let parts = match content {
        Some(InContent::Parts(p)) => p,
        other => return text_blocks(other, i),
    };
    let mut out = Vec::with_capacity(parts.len());
    for p in parts {
        match (p.kind.as_str(), p.text, p.image_url) {
            ("text", Some(t), _) => out.extend(non_empty(t)),
            ("image_url", _, Some(img)) => {
                out.push(Block::Image { source: image_source(img.url(), i)? });
            }
            (kind, _, _) => {
                return Err(bad(
                    "messages",
                    format!("messages[{i}]: content part `{kind}` is not supported for Anthropic models."),
                ))
            }
        }
    }
    Ok(out)
}

fn image_source(url: String, i: usize) -> Result<ImageSource, Error> {
    if let Some(rest) = url.strip_prefix("data:") {
        if let Some((media_type, data)) = rest.split_once(";base64,") {
            return Ok(ImageSource::Base64 { media_type: media_type.to_owned(), data: data.to_owned() });
        }
        return Err(bad(
            "messages",
            format!("messages[{i}]: image data URLs must be base64 (`data:<type>;base64,...`)."),
        ));
    }
    if url.starts_with("https://") || url.starts_with("http://") {
        return Ok(ImageSource::Url { url });
    }
    Err(bad("messages", format!("messages[{i}]: an image URL must be https:// or a data: URL.")))
}

fn tool_use(call: InToolCall, i: usize) -> Result<Block, Error> {
    let input = call.arguments_object(i)?;
    Ok(Block::ToolUse { id: call.id, name: call.function.name, input })
}

fn tool_choice(choice: Option<InToolChoice>, parallel: Option<bool>) -> Result<Option<ToolChoiceOut>, Error> {
    let disable_parallel_tool_use = parallel == Some(false);
    let (kind, name) = match choice {
        None if disable_parallel_tool_use => ("auto", None),
        None => return Ok(None),
        Some(InToolChoice::Mode(m)) => match &*m {
            "auto" => ("auto", None),
            "required" => ("any", None),
            "none" => ("none", None),
            _ => return Err(bad("tool_choice", format!("Unknown `tool_choice` `{m}`."))),
        },
        Some(InToolChoice::Named { function }) => ("tool", Some(function.name)),
        Some(InToolChoice::Other(_)) => return Err(bad("tool_choice", "Invalid `tool_choice`.")),
    };
    Ok(Some(ToolChoiceOut { kind, name, disable_parallel_tool_use: disable_parallel_tool_use && kind != "none" }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn tr(req: Value) -> Value {
        let t = translate(req.to_string().as_bytes(), "claude-x", 1024).unwrap();
        serde_json::from_slice(&t.body).unwrap()
    }

    fn err(req: Value) -> Error {
        translate(req.to_string().as_bytes(), "claude-x", 1024).err().unwrap()
    }

    #[test]
    fn system_and_developer_messages_become_top_level_system() {
        let out = tr(json!({"model":"m","messages":[
            {"role":"system","content":"be brief"},
            {"role":"user","content":"hi"},
            {"role":"developer","content":[{"type":"text","text":"and kind"}]}
        ]}));
        assert_eq!(out["system"], json!([{"type":"text","text":"be brief"},{"type":"text","text":"and kind"}]));
        assert_eq!(out["messages"], json!([{"role":"user","content":[{"type":"text","text":"hi"}]}]));
        assert_eq!(out["model"], "claude-x");
        assert_eq!(out["max_tokens"], 1024);
    }

    #[test]
    fn tool_calls_and_results_become_blocks_in_alternating_turns() {
        let out = tr(json!({"model":"m","messages":[
            {"role":"user","content":"weather?"},
            {"role":"assistant","content":"Let me check. ","tool_calls":[
                {"id":"toolu_1","type":"function","function":{"name":"get_weather","arguments":"{\"city\": \"Paris\"}"}},
                {"id":"toolu_2","type":"function","function":{"name":"now","arguments":""}}]},
            {"role":"tool","tool_call_id":"toolu_1","content":"12C"},
            {"role":"tool","tool_call_id":"toolu_2","content":[{"type":"text","text":"noon"}]},
            {"role":"user","content":"thanks"}
        ]}));
        assert_eq!(
            out["messages"],
            json!([
                {"role":"user","content":[{"type":"text","text":"weather?"}]},
                {"role":"assistant","content":[
                    {"type":"text","text":"Let me check. "},
                    {"type":"tool_use","id":"toolu_1","name":"get_weather","input":{"city":"Paris"}},
                    {"type":"tool_use","id":"toolu_2","name":"now","input":{}}]},
                {"role":"user","content":[
                    {"type":"tool_result","tool_use_id":"toolu_1","content":[{"type":"text","text":"12C"}]},
                    {"type":"tool_result","tool_use_id":"toolu_2","content":[{"type":"text","text":"noon"}]},
                    {"type":"text","text":"thanks"}]}
            ])
        );
    }

    #[test]
    fn images_map_to_base64_and_url_sources() {
        let out = tr(json!({"model":"m","messages":[{"role":"user","content":[
            {"type":"text","text":"what is this"},
            {"type":"image_url","image_url":{"url":"data:image/png;base64,iVBORw0KGgo="}},
            {"type":"image_url","image_url":{"url":"https://example.com/cat.jpg","detail":"low"}}
        ]}]}));
        assert_eq!(
            out["messages"][0]["content"][1],
            json!({"type":"image","source":{"type":"base64","media_type":"image/png","data":"iVBORw0KGgo="}})
        );
        assert_eq!(
            out["messages"][0]["content"][2],
            json!({"type":"image","source":{"type":"url","url":"https://example.com/cat.jpg"}})
        );
        assert_eq!(err(json!({"model":"m","messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"ftp://x"}}]}]})).param, Some("messages"));
    }

    #[test]
    fn tools_and_tool_choice_map() {
        let base = json!({"model":"m","messages":[{"role":"user","content":"x"}],
            "tools":[{"type":"function","function":{"name":"f","description":"d","parameters":{"type":"object","properties":{"a":{"type":"string"}}}}},
                     {"type":"function","function":{"name":"g"}}]});
        let out = tr(base.clone());
        assert_eq!(
            out["tools"][0],
            json!({"name":"f","description":"d","input_schema":{"type":"object","properties":{"a":{"type":"string"}}}})
        );
        assert_eq!(out["tools"][1], json!({"name":"g","input_schema":{"type":"object","properties":{}}}));
        assert!(out.get("tool_choice").is_none());
        for (choice, parallel, want) in [
            (json!("auto"), None, json!({"type":"auto"})),
            (json!("required"), None, json!({"type":"any"})),
            (json!("none"), None, json!({"type":"none"})),
            (
                json!({"type":"function","function":{"name":"f"}}),
                Some(false),
                json!({"type":"tool","name":"f","disable_parallel_tool_use":true}),
            ),
            (Value::Null, Some(false), json!({"type":"auto","disable_parallel_tool_use":true})),
        ] {
            let mut req = base.clone();
            req["tool_choice"] = choice;
            if let Some(p) = parallel {
                req["parallel_tool_calls"] = json!(p);
            }
            assert_eq!(tr(req)["tool_choice"], want);
        }
    }

    #[test]
    fn sampling_parameters_map() {
        let out = tr(
            json!({"model":"m","messages":[{"role":"user","content":"x"}],"max_tokens":10,"max_completion_tokens":20,
            "temperature":0.5,"top_p":0.9,"stop":"END","user":"u-1","stream":true,"n":1,"presence_penalty":0,"logprobs":false}),
        );
        assert_eq!(out["max_tokens"], 20);
        assert_eq!(out["temperature"], 0.5);
        assert_eq!(out["top_p"], 0.9);
        assert_eq!(out["stop_sequences"], json!(["END"]));
        assert_eq!(out["metadata"], json!({"user_id":"u-1"}));
        assert_eq!(out["stream"], true);
        assert_eq!(tr(json!({"model":"m","messages":[{"role":"user","content":"x"}],"max_tokens":7}))["max_tokens"], 7);
        assert_eq!(
            tr(json!({"model":"m","messages":[{"role":"user","content":"x"}],"stop":["a",""]}))["stop_sequences"],
            json!(["a"])
        );
    }

    #[test]
    fn parameters_that_cannot_be_honoured_are_400_naming_them() {
        let msgs = json!([{"role":"user","content":"x"}]);
        for (k, v) in [
            ("n", json!(2)),
            ("logprobs", json!(true)),
            ("top_logprobs", json!(3)),
            ("presence_penalty", json!(0.5)),
            ("frequency_penalty", json!(1)),
            ("logit_bias", json!({"50256": -100})),
            ("response_format", json!({"type":"json_object"})),
            ("seed", json!(1)),
            ("reasoning_effort", json!("high")),
            ("functions", json!([{"name":"f","parameters":{"type":"object","properties":{}}}])),
            ("function_call", json!({"name":"f"})),
        ] {
            let mut req = json!({"model":"m","messages":msgs});
            req[k] = v;
            let e = translate(req.to_string().as_bytes(), "c", 10).err().unwrap();
            assert_eq!(
                e.param,
                Some(match k {
                    "top_logprobs" => "top_logprobs",
                    k => Box::leak(k.to_owned().into_boxed_str()),
                }),
                "{k}"
            );
            assert_eq!(e.status, 400);
        }
        let ok = json!({"model":"m","messages":msgs,"n":1,"logprobs":false,"presence_penalty":0.0,"logit_bias":{},"response_format":{"type":"text"},
            "functions":[],"function_call":"auto"});
        assert!(translate(ok.to_string().as_bytes(), "c", 10).is_ok());
    }

    #[test]
    fn trailing_space_of_an_assistant_prefill_is_trimmed() {
        let out = tr(
            json!({"model":"m","messages":[{"role":"user","content":"x"},{"role":"assistant","content":"The answer is "}]}),
        );
        assert_eq!(out["messages"][1]["content"][0]["text"], "The answer is");
    }

    #[test]
    fn bad_messages_are_400() {
        assert_eq!(
            err(json!({"model":"m","messages":[{"role":"system","content":"only system"}]})).param,
            Some("messages")
        );
        assert_eq!(err(json!({"model":"m","messages":[{"role":"wizard","content":"x"}]})).param, Some("messages"));
        let bad_args = json!({"model":"m","messages":[{"role":"user","content":"x"},{"role":"assistant","tool_calls":[{"id":"t","type":"function","function":{"name":"f","arguments":"not json"}}]}]});
        assert_eq!(err(bad_args).param, Some("messages"));
        assert_eq!(err(json!({"model":"m"})).status, 400);
    }

    #[test]
    fn tool_schemas_keep_their_key_order_and_escaped_text_survives_the_in_place_parse() {
        // Property order in a schema is what the model sees; 40 keys is past any small-map
        // backend that would keep order by accident.
        let props: Vec<String> = (0..40).map(|i| format!(r#""p{}":{{"type":"string"}}"#, 40 - i)).collect();
        let body = format!(
            r#"{{"model":"m","messages":[{{"role":"user","content":"caf\u00e9 \"q\"\n"}}],
            "tools":[{{"type":"function","function":{{"name":"f","parameters":{{"type":"object","properties":{{{}}}}}}}}}]}}"#,
            props.join(",")
        );
        let t = translate(body.as_bytes(), "claude-x", 1024).unwrap();
        let text = String::from_utf8(t.body.to_vec()).unwrap();
        let want = format!(r#""input_schema":{{"type":"object","properties":{{{}}}}}"#, props.join(","));
        assert!(text.contains(&want), "{text}");
        let out: Value = serde_json::from_slice(&t.body).unwrap();
        assert_eq!(out["messages"][0]["content"][0]["text"], "café \"q\"\n");
    }

    #[test]
    fn a_tool_choice_of_the_wrong_shape_is_a_400_naming_it() {
        for choice in [json!(7), json!({"type":"function"}), json!(["auto"]), json!("sometimes")] {
            let e = err(json!({"model":"m","messages":[{"role":"user","content":"x"}],"tool_choice":choice}));
            assert_eq!((e.status.as_u16(), e.param), (400, Some("tool_choice")), "{choice}");
        }
    }

    #[test]
    fn a_request_of_the_wrong_shape_is_a_400_that_says_what_is_wrong() {
        for (req, says) in [
            (json!({"model":"m"}), "missing field `messages`"),
            (json!({"model":"m","messages":5}), "expected a sequence"),
            (json!({"model":"m","messages":[{"role":"user","content":"x"}],"temperature":"hot"}), "expected f64"),
        ] {
            let e = err(req);
            assert_eq!(e.status, 400);
            assert!(e.message.contains(says), "{}", e.message);
        }
        let dup = translate(br#"{"messages":[],"messages":[]}"#, "c", 1).err().unwrap();
        assert!(dup.message.contains("duplicate field `messages`"), "{}", dup.message);
    }

    #[test]
    fn include_usage_is_reported() {
        let t = translate(br#"{"model":"m","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"x"}]}"#, "c", 1).unwrap();
        assert!(t.stream && t.include_usage);
    }
}
