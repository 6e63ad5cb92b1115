//! OpenAI chat request → Gemini `generateContent` request.
//!
//! Mapping, from <https://platform.openai.com/docs/api-reference/chat/create> to
//! <https://ai.google.dev/api/generate-content#request-body>: `system` and `developer` messages →
//! `systemInstruction`; user and assistant turns → `contents` with roles `user` / `model`
//! (consecutive same-role turns merged); text parts → `text`; images as data: URLs →
//! `inlineData` (an `http(s)` URL is never fetched by the gateway: 400 naming the part); assistant
//! `tool_calls` → `functionCall` parts with `args` objects and, when the call's id carries one (see
//! [`super::stream`]), its `thoughtSignature`; `tool` messages → `functionResponse` parts in a
//! user turn (consecutive ones merged), named after the call their `tool_call_id` answers, the
//! result an object (`{"content": text}` unless the text is a JSON object); `tools` →
//! `functionDeclarations` (`parametersJsonSchema`: JSON Schema as written); `tool_choice` →
//! `toolConfig.functionCallingConfig` (`auto` → AUTO, `none` → NONE, `required` → ANY, a named
//! function → ANY with `allowedFunctionNames`); `max_tokens` / `max_completion_tokens`,
//! `temperature`, `top_p`, `stop`, `seed`, `presence_penalty`, `frequency_penalty` →
//! `generationConfig`; `response_format` → `responseMimeType` and `responseJsonSchema`.
//! Parameters Gemini cannot honour are a 400 naming them when their value matters.

use crate::error::Error;
use crate::json::{self, Raw};
pub use crate::provider::chat::Translated;
use crate::provider::chat::{
    bad, raw_value, InContent, InMessage, InTool, InToolChoice, JsonMode, ResponseFormat, Stop, StreamOptions,
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
    #[serde(borrow)]
    tools: Option<Vec<InTool<'a>>>,
    #[serde(borrow)]
    tool_choice: Option<InToolChoice<'a>>,
    response_format: Option<ResponseFormat>,
    // Parameters that cannot be honoured: checked below.
    n: Option<u64>,
    logprobs: Option<bool>,
    top_logprobs: Option<u64>,
    logit_bias: Option<Raw>,
    audio: Option<Raw>,
    prediction: Option<Raw>,
    reasoning_effort: Option<String>,
    functions: Option<Raw>,
    function_call: Option<Raw>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct GenerateRequest {
    contents: Vec<Content>,
    #[serde(skip_serializing_if = "Option::is_none")]
    system_instruction: Option<Content>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tools: Vec<Tools>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_config: Option<ToolConfig>,
    #[serde(skip_serializing_if = "GenerationConfig::is_empty")]
    generation_config: GenerationConfig,
}

#[derive(Serialize)]
struct Content {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    parts: Vec<Part>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
enum PartData {
    Text(String),
    InlineData {
        #[serde(rename = "mimeType")]
        mime_type: String,
        data: String,
    },
    FunctionCall {
        name: String,
        args: Box<RawValue>,
    },
    FunctionResponse {
        name: String,
        response: Box<RawValue>,
    },
}

#[derive(Serialize)]
struct Part {
    #[serde(flatten)]
    data: PartData,
    #[serde(rename = "thoughtSignature", skip_serializing_if = "Option::is_none")]
    thought_signature: Option<String>,
}

impl Part {
    fn of(data: PartData) -> Part {
        Part { data, thought_signature: None }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Tools {
    function_declarations: Vec<Declaration>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Declaration {
    name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    description: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    parameters_json_schema: Option<Box<RawValue>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ToolConfig {
    function_calling_config: FunctionCallingConfig,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct FunctionCallingConfig {
    mode: &'static str,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    allowed_function_names: Vec<String>,
}

#[derive(Serialize, Default)]
#[serde(rename_all = "camelCase")]
struct GenerationConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    max_output_tokens: Option<u64>,
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
    stop_sequences: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    response_mime_type: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    response_json_schema: Option<Box<RawValue>>,
}

impl GenerationConfig {
    fn is_empty(&self) -> bool {
        self.max_output_tokens.is_none()
            && self.temperature.is_none()
            && self.top_p.is_none()
            && self.seed.is_none()
            && self.presence_penalty.is_none()
            && self.frequency_penalty.is_none()
            && self.stop_sequences.is_empty()
            && self.response_mime_type.is_none()
    }
}

fn unsupported(param: &'static str) -> Error {
    bad(param, format!("`{param}` is not supported for Gemini models with this value."))
}

/// Translates an OpenAI chat request body (already validated JSON).
pub fn chat(body: &[u8]) -> Result<Translated, Error> {
    json::with_scratch(body, |scratch| match scratch.parse() {
        Ok(req) => chat_parsed(req),
        Err(_) => Err(match serde_json::from_slice::<ChatRequest>(body) {
            Err(e) => Error::invalid_request(format!("Invalid chat completion request: {e}.")),
            Ok(_) => Error::invalid_request("Invalid chat completion request."),
        }),
    })
}

fn chat_parsed(req: ChatRequest) -> Result<Translated, Error> {
    reject_unsupported(&req)?;
    let mut system = Vec::new();
    let mut contents: Vec<Content> = Vec::with_capacity(req.messages.len());
    // Each tool call's function name by its id, for the `tool` messages that answer it.
    let mut names: Vec<(String, String)> = Vec::new();
    for (i, m) in req.messages.into_iter().enumerate() {
        let (role, parts) = match m.role.as_str() {
            "system" | "developer" => {
                system.extend(parts(m.content, i, false)?);
                continue;
            }
            "user" => ("user", parts(m.content, i, true)?),
            "assistant" => {
                let mut parts = parts(m.content, i, false)?;
                for call in m.tool_calls.unwrap_or_default() {
                    let args = call.arguments_object(i)?;
                    // The id this gateway gave the call: `call_..._k`, then `.signature` when
                    // Gemini sent one.
                    let signature =
                        call.id.strip_prefix("call_").and_then(|r| r.split_once('.')).map(|(_, s)| s.to_owned());
                    let signature = signature.filter(|s| !s.is_empty());
                    parts.push(Part {
                        data: PartData::FunctionCall { name: call.function.name.clone(), args },
                        thought_signature: signature,
                    });
                    names.push((call.id, call.function.name));
                }
                ("model", parts)
            }
            "tool" => {
                let id = m
                    .tool_call_id
                    .ok_or_else(|| bad("messages", format!("messages[{i}]: a tool message needs `tool_call_id`.")))?;
                let name =
                    names.iter().rev().find(|(known, _)| *known == id).map(|(_, n)| n.clone()).ok_or_else(|| {
                        bad(
                            "messages",
                            format!(
                                "messages[{i}]: `tool_call_id` `{}` answers no earlier assistant tool call.",
                                crate::error::clip(&id)
                            ),
                        )
                    })?;
                let text = text_of(m.content, i)?;
                let response = if json::members(text.as_bytes(), |_, _| true).is_ok() {
                    RawValue::from_string(text)
                } else {
                    let mut object = b"{\"content\":".to_vec();
                    json::write_str(&mut object, &text);
                    object.push(b'}');
                    RawValue::from_string(String::from_utf8(object).unwrap_or_default())
                }
                .map_err(|_| bad("messages", format!("messages[{i}]: invalid tool result.")))?;
                ("user", vec![Part::of(PartData::FunctionResponse { name, response })])
            }
            other => return Err(bad("messages", format!("messages[{i}]: unknown role `{other}`."))),
        };
        if parts.is_empty() {
            continue;
        }
        match contents.last_mut() {
            Some(last) if last.role == Some(role) => last.parts.extend(parts),
            _ => contents.push(Content { role: Some(role), parts }),
        }
    }
    if contents.is_empty() {
        return Err(bad("messages", "`messages` must contain at least one user or assistant message with content."));
    }
    let declarations = req
        .tools
        .unwrap_or_default()
        .into_iter()
        .map(|t| match (&*t.kind, t.function) {
            ("function", Some(f)) => Ok(Declaration {
                name: f.name,
                description: f.description,
                parameters_json_schema: match f.parameters {
                    Some(p) => Some(raw_value(p).ok_or_else(|| bad("tools", "Invalid tool `parameters`."))?),
                    None => None,
                },
            }),
            _ => Err(bad("tools", format!("Tool type `{}` is not supported; use function tools.", t.kind))),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let tools = if declarations.is_empty() { Vec::new() } else { vec![Tools { function_declarations: declarations }] };
    let tool_config = match req.tool_choice {
        None => None,
        Some(InToolChoice::Mode(m)) => {
            let mode = match &*m {
                "auto" => "AUTO",
                "none" => "NONE",
                "required" => "ANY",
                _ => return Err(bad("tool_choice", format!("Unknown `tool_choice` `{m}`."))),
            };
            Some(ToolConfig {
                function_calling_config: FunctionCallingConfig { mode, allowed_function_names: Vec::new() },
            })
        }
        Some(InToolChoice::Named { function }) => Some(ToolConfig {
            function_calling_config: FunctionCallingConfig { mode: "ANY", allowed_function_names: vec![function.name] },
        }),
        Some(InToolChoice::Other(_)) => return Err(bad("tool_choice", "Invalid `tool_choice`.")),
    };
    let (response_mime_type, response_json_schema) = match ResponseFormat::json_mode(req.response_format)? {
        None => (None, None),
        Some(JsonMode::Object) => (Some("application/json"), None),
        Some(JsonMode::Schema(schema)) => (Some("application/json"), Some(schema)),
    };
    let generation_config = GenerationConfig {
        max_output_tokens: req.max_completion_tokens.or(req.max_tokens),
        temperature: req.temperature,
        top_p: req.top_p,
        seed: req.seed,
        presence_penalty: req.presence_penalty,
        frequency_penalty: req.frequency_penalty,
        stop_sequences: Stop::sequences(req.stop),
        response_mime_type,
        response_json_schema,
    };
    let system_instruction = (!system.is_empty()).then_some(Content { role: None, parts: system });
    let out = GenerateRequest { contents, system_instruction, tools, tool_config, generation_config };
    let body =
        serde_json::to_vec(&out).map_err(|e| Error::invalid_request(format!("Cannot translate the request: {e}.")))?;
    let include_usage = req.stream_options.and_then(|o| o.include_usage).unwrap_or(false);
    Ok(Translated { body: body.into(), stream: req.stream.unwrap_or(false), include_usage })
}

fn reject_unsupported(r: &ChatRequest) -> Result<(), Error> {
    let present = |v: Option<&Raw>| v.is_some_and(|v| !v.is_empty_object());
    if r.n.is_some_and(|n| n != 1) {
        return Err(bad("n", "`n` other than 1 is not supported for Gemini models."));
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
    if r.reasoning_effort.is_some() {
        return Err(bad("reasoning_effort", "`reasoning_effort` is not mapped to Gemini thinking yet."));
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
    Ok(())
}

/// A message's parts: texts and, where allowed, images from data: URLs.
fn parts(content: Option<InContent>, i: usize, images: bool) -> Result<Vec<Part>, Error> {
    let list = match content {
        None => return Ok(Vec::new()),
        Some(InContent::Text(t)) if t.is_empty() => return Ok(Vec::new()),
        Some(InContent::Text(t)) => return Ok(vec![Part::of(PartData::Text(t))]),
        Some(InContent::Parts(p)) => p,
    };
    let mut out = Vec::with_capacity(list.len());
    for (j, p) in list.into_iter().enumerate() {
        match (p.kind.as_str(), p.text, p.image_url) {
            ("text", Some(t), _) if t.is_empty() => {}
            ("text", Some(t), _) => out.push(Part::of(PartData::Text(t))),
            ("image_url", _, Some(img)) if images => {
                let url = img.url();
                let at = format!("messages[{i}].content[{j}]");
                let Some((mime, data)) = url.strip_prefix("data:").and_then(|r| r.split_once(";base64,")) else {
                    return Err(bad(
                        "messages",
                        format!("{at}: Gemini takes images as base64 data: URLs (`data:image/png;base64,...`); the gateway does not fetch image URLs."),
                    ));
                };
                out.push(Part::of(PartData::InlineData { mime_type: mime.to_owned(), data: data.to_owned() }));
            }
            (kind, _, _) => {
                return Err(bad(
                    "messages",
                    format!(
                        "messages[{i}].content[{j}]: content part `{kind}` is not supported here for Gemini models."
                    ),
                ))
            }
        }
    }
    Ok(out)
}

/// A tool message's text (parts joined).
fn text_of(content: Option<InContent>, i: usize) -> Result<String, Error> {
    let mut text = String::new();
    for p in parts(content, i, false)? {
        if let PartData::Text(t) = p.data {
            text.push_str(&t);
        }
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    //! Expectations written by hand from the two API references named in the module header.

    use super::*;
    use serde_json::{json, Value};

    fn tr(req: Value) -> (Value, Translated) {
        let t = chat(req.to_string().as_bytes()).unwrap();
        (serde_json::from_slice(&t.body).unwrap(), t)
    }

    fn err(req: Value) -> Error {
        chat(req.to_string().as_bytes()).err().unwrap()
    }

    #[test]
    fn messages_system_images_and_generation_config_map() {
        let (out, t) = tr(json!({"stream":true,"stream_options":{"include_usage":true},"messages":[
            {"role":"system","content":"be brief"},
            {"role":"developer","content":[{"type":"text","text":"and kind"}]},
            {"role":"user","content":[{"type":"text","text":"what is"},
                {"type":"image_url","image_url":{"url":"data:image/png;base64,iVBORw0KGgo="}}]},
            {"role":"user","content":"this?"},
            {"role":"assistant","content":"A cat."}],
            "max_tokens":50,"temperature":0.2,"top_p":0.9,"seed":7,"stop":["END",""],"presence_penalty":0.1,
            "response_format":{"type":"json_schema","json_schema":{"name":"s","schema":{"type":"object"}}}}));
        assert_eq!(
            out,
            json!({
                "contents":[
                    {"role":"user","parts":[{"text":"what is"},{"inlineData":{"mimeType":"image/png","data":"iVBORw0KGgo="}},{"text":"this?"}]},
                    {"role":"model","parts":[{"text":"A cat."}]}],
                "systemInstruction":{"parts":[{"text":"be brief"},{"text":"and kind"}]},
                "generationConfig":{"maxOutputTokens":50,"temperature":0.2,"topP":0.9,"seed":7,"presencePenalty":0.1,
                    "stopSequences":["END"],"responseMimeType":"application/json","responseJsonSchema":{"type":"object"}}
            })
        );
        assert!(t.stream && t.include_usage);
    }

    #[test]
    fn tool_calls_results_and_signatures_round_trip() {
        let tool = json!({"type":"function","function":{"name":"get_weather","description":"Weather.",
            "parameters":{"type":"object","properties":{"city":{"type":"string"}}}}});
        let (out, _) = tr(
            json!({"tools":[tool],"tool_choice":{"type":"function","function":{"name":"get_weather"}},"messages":[
            {"role":"user","content":"weather?"},
            {"role":"assistant","content":null,"tool_calls":[
                {"id":"call_chatcmpl-1_0.EpwICpkIAXLI","type":"function","function":{"name":"get_weather","arguments":"{\"city\":\"Paris\"}"}},
                {"id":"call_chatcmpl-1_1","type":"function","function":{"name":"get_weather","arguments":""}}]},
            {"role":"tool","tool_call_id":"call_chatcmpl-1_1","content":"{\"temp\": 25}"},
            {"role":"tool","tool_call_id":"call_chatcmpl-1_0.EpwICpkIAXLI","content":"12C"}]}),
        );
        assert_eq!(
            out["contents"],
            json!([
                {"role":"user","parts":[{"text":"weather?"}]},
                {"role":"model","parts":[
                    {"functionCall":{"name":"get_weather","args":{"city":"Paris"}},"thoughtSignature":"EpwICpkIAXLI"},
                    {"functionCall":{"name":"get_weather","args":{}}}]},
                {"role":"user","parts":[
                    {"functionResponse":{"name":"get_weather","response":{"temp":25}}},
                    {"functionResponse":{"name":"get_weather","response":{"content":"12C"}}}]}
            ])
        );
        assert_eq!(
            out["tools"],
            json!([{"functionDeclarations":[{"name":"get_weather","description":"Weather.",
                "parametersJsonSchema":{"type":"object","properties":{"city":{"type":"string"}}}}]}])
        );
        assert_eq!(
            out["toolConfig"],
            json!({"functionCallingConfig":{"mode":"ANY","allowedFunctionNames":["get_weather"]}})
        );
        for (choice, mode) in [("auto", "AUTO"), ("none", "NONE"), ("required", "ANY")] {
            let (out, _) = tr(json!({"tool_choice":choice,"messages":[{"role":"user","content":"x"}]}));
            assert_eq!(out["toolConfig"]["functionCallingConfig"], json!({"mode":mode}));
        }
    }

    #[test]
    fn what_cannot_be_honoured_is_a_400_naming_it() {
        let m = json!([{"role":"user","content":"x"}]);
        let url = |u: &str| json!([{"role":"user","content":[{"type":"image_url","image_url":{"url":u}}]}]);
        for (req, param, says) in [
            (json!({"messages":url("https://example.com/cat.png")}), "messages", "messages[0].content[0]"),
            (
                json!({"messages":[{"role":"system","content":[{"type":"image_url","image_url":{"url":"data:image/png;base64,AA"}}]}]}),
                "messages",
                "content[0]",
            ),
            (json!({"messages":m,"n":2}), "n", "`n`"),
            (json!({"messages":m,"logprobs":true}), "logprobs", "logprobs"),
            (json!({"messages":m,"reasoning_effort":"high"}), "reasoning_effort", "not mapped"),
            (json!({"messages":m,"tool_choice":"sometimes"}), "tool_choice", "sometimes"),
            (json!({"messages":m,"tools":[{"type":"code_interpreter"}]}), "tools", "code_interpreter"),
            (
                json!({"messages":[{"role":"tool","tool_call_id":"nope","content":"x"}]}),
                "messages",
                "answers no earlier",
            ),
            (
                json!({"messages":[{"role":"assistant","tool_calls":[{"id":"c","type":"function","function":{"name":"f","arguments":"[1]"}}]}]}),
                "messages",
                "not a JSON object",
            ),
            (json!({"messages":[{"role":"system","content":"only a system prompt"}]}), "messages", "at least one"),
        ] {
            let e = err(req.clone());
            assert_eq!(e.param, Some(param), "{req}: {}", e.message);
            assert!(e.message.contains(says), "{req}: {}", e.message);
        }
    }
}
