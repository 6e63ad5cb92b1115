//! The parts of OpenAI requests that every translating provider reads the same way: chat
//! messages, their content and tool calls, `tools`, `tool_choice`, `response_format`, `stop`,
//! `stream_options` (<https://platform.openai.com/docs/api-reference/chat/create>); the
//! embeddings input and the embeddings list written back
//! (<https://platform.openai.com/docs/api-reference/embeddings>); and the checks they share.
//! Each provider's `request.rs` holds its own top-level request type (the parameters it maps or
//! refuses) around these.

use crate::error::Error;
use crate::json::{self, Raw};
use serde::de::IgnoredAny;
use serde::Deserialize;
use serde_json::value::RawValue;
use std::borrow::Cow;

/// A translated request and what reading its answer needs.
pub struct Translated {
    /// The provider's request body.
    pub body: bytes::Bytes,
    /// `stream: true`.
    pub stream: bool,
    /// The client asked for `stream_options.include_usage`.
    pub include_usage: bool,
}

/// A `tools` entry.
#[derive(Deserialize)]
pub(crate) struct InTool<'a> {
    #[serde(rename = "type", borrow)]
    pub kind: Cow<'a, str>,
    pub function: Option<InFunction>,
}

#[derive(Deserialize)]
pub(crate) struct InFunction {
    pub name: String,
    pub description: Option<String>,
    pub parameters: Option<Raw>,
}

/// `tool_choice`; anything else is kept apart so that it is a 400 naming `tool_choice` rather
/// than a failure of the whole request's parse.
#[derive(Deserialize)]
#[serde(untagged)]
pub(crate) enum InToolChoice<'a> {
    #[serde(borrow)]
    Mode(Cow<'a, str>),
    Named {
        function: NamedFunction,
    },
    Other(IgnoredAny),
}

#[derive(Deserialize)]
pub(crate) struct NamedFunction {
    pub name: String,
}

/// `response_format`.
#[derive(Deserialize)]
pub(crate) struct ResponseFormat {
    #[serde(rename = "type")]
    pub kind: String,
    pub json_schema: Option<JsonSchema>,
}

#[derive(Deserialize)]
pub(crate) struct JsonSchema {
    pub schema: Option<Raw>,
}

/// What a `response_format` asks for of a provider with a JSON mode.
pub(crate) enum JsonMode {
    /// Any JSON object (`json_object`).
    Object,
    /// JSON following this schema (`json_schema`).
    Schema(Box<RawValue>),
}

impl ResponseFormat {
    /// `text` (or none) → `None`; `json_object`, `json_schema` with a `schema`; else a 400.
    pub fn json_mode(format: Option<ResponseFormat>) -> Result<Option<JsonMode>, Error> {
        let Some(f) = format else { return Ok(None) };
        match (f.kind.as_str(), f.json_schema.and_then(|s| s.schema)) {
            ("text", _) => Ok(None),
            ("json_object", _) => Ok(Some(JsonMode::Object)),
            ("json_schema", Some(schema)) => raw_value(schema)
                .map(|s| Some(JsonMode::Schema(s)))
                .ok_or_else(|| bad("response_format", "Invalid `response_format` schema.")),
            _ => Err(bad(
                "response_format",
                "`response_format` must be text, json_object or json_schema with a `schema`.",
            )),
        }
    }
}

#[derive(Deserialize)]
pub(crate) struct StreamOptions {
    pub include_usage: Option<bool>,
}

/// `stop`: one sequence or several.
#[derive(Deserialize)]
#[serde(untagged)]
pub(crate) enum Stop {
    One(String),
    Many(Vec<String>),
}

impl Stop {
    /// The non-empty sequences.
    pub fn sequences(stop: Option<Stop>) -> Vec<String> {
        let all = match stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s],
            Some(Stop::Many(v)) => v,
        };
        all.into_iter().filter(|s| !s.is_empty()).collect()
    }
}

#[derive(Deserialize)]
pub(crate) struct InMessage<'a> {
    pub role: String,
    #[serde(default)]
    pub content: Option<InContent>,
    #[serde(borrow, default)]
    pub tool_calls: Option<Vec<InToolCall<'a>>>,
    pub tool_call_id: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
pub(crate) enum InContent {
    Text(String),
    Parts(Vec<InPart>),
}

#[derive(Deserialize)]
pub(crate) struct InPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
    pub image_url: Option<ImageUrl>,
}

/// `image_url`: `{"url": ...}`, or the URL alone.
#[derive(Deserialize)]
#[serde(untagged)]
pub(crate) enum ImageUrl {
    Object { url: String },
    Url(String),
}

impl ImageUrl {
    pub fn url(self) -> String {
        match self {
            ImageUrl::Object { url } | ImageUrl::Url(url) => url,
        }
    }
}

#[derive(Deserialize)]
pub(crate) struct InToolCall<'a> {
    pub id: String,
    #[serde(borrow)]
    pub function: InCall<'a>,
}

#[derive(Deserialize)]
pub(crate) struct InCall<'a> {
    pub name: String,
    #[serde(borrow)]
    pub arguments: Option<Cow<'a, str>>,
}

impl InToolCall<'_> {
    /// The JSON-string `arguments` as the object they must hold (empty: `{}`), embedded as
    /// written; a 400 naming `messages[i]` otherwise.
    pub fn arguments_object(&self, i: usize) -> Result<Box<RawValue>, Error> {
        let args = self.function.arguments.as_deref().unwrap_or("").trim();
        let args = if args.is_empty() { "{}" } else { args };
        if json::members(args.as_bytes(), |_, _| true).is_err() {
            return Err(bad(
                "messages",
                format!(
                    "messages[{i}]: tool call `{}` has arguments that are not a JSON object.",
                    crate::error::clip(&self.id)
                ),
            ));
        }
        RawValue::from_string(args.to_owned())
            .map_err(|_| bad("messages", format!("messages[{i}]: invalid tool call arguments.")))
    }
}

/// A 400 naming `param`.
pub(crate) fn bad(param: &'static str, message: impl Into<String>) -> Error {
    Error::invalid_request(message).param(param)
}

/// Rendered JSON as a value serde_json embeds as it is.
pub(crate) fn raw_value(raw: Raw) -> Option<Box<RawValue>> {
    RawValue::from_string(String::from_utf8(raw.0).ok()?).ok()
}

/// The parts of an OpenAI embeddings request a translating provider sends on.
pub(crate) struct EmbedInput {
    /// The texts, in order.
    pub input: Vec<String>,
    /// `dimensions`.
    pub dimensions: Option<u64>,
    /// `encoding_format: "base64"`.
    pub base64: bool,
}

#[derive(Deserialize)]
struct EmbedRequest {
    input: Input,
    dimensions: Option<u64>,
    encoding_format: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Input {
    One(String),
    Many(Vec<String>),
    Other(IgnoredAny),
}

/// Reads an embeddings request for `provider`, which takes text only: token arrays are a 400
/// naming `input`, as are an empty input, `dimensions` 0 and an unknown `encoding_format`.
pub(crate) fn embed_input(body: &[u8], provider: &str) -> Result<EmbedInput, Error> {
    let parsed: Option<EmbedRequest> = json::with_scratch(body, |scratch| scratch.parse().ok());
    // The rare malformed request is read again with serde_json, whose errors say what is wrong.
    let req = match parsed {
        Some(req) => req,
        None => serde_json::from_slice(body).map_err(|e| {
            if serde_json::from_slice::<serde_json::Value>(body).is_ok_and(|v| v.get("input").is_none()) {
                bad("input", "`input` is required.")
            } else {
                Error::invalid_request(format!("Invalid embeddings request: {e}."))
            }
        })?,
    };
    let input = match req.input {
        Input::One(s) => vec![s],
        Input::Many(v) if !v.is_empty() => v,
        Input::Many(_) => return Err(bad("input", "`input` must not be empty.")),
        Input::Other(_) => {
            return Err(bad(
                "input",
                format!("`input` must be a string or an array of strings: {provider} does not take token arrays."),
            ))
        }
    };
    if req.dimensions == Some(0) {
        return Err(bad("dimensions", "`dimensions` must be at least 1."));
    }
    let base64 = match req.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(_) => return Err(bad("encoding_format", "`encoding_format` must be \"float\" or \"base64\".")),
    };
    Ok(EmbedInput { input, dimensions: req.dimensions, base64 })
}

/// An OpenAI embeddings list (<https://platform.openai.com/docs/api-reference/embeddings/object>)
/// of `vectors` for `model`: floats, or base64 of their little-endian float32 bytes (what
/// `encoding_format: "base64"` returns), written by the one converter ([`crate::embed::encode`]);
/// usage counts `prompt` tokens. `None` when a vector holds what JSON cannot carry (an infinity
/// from a number beyond f32's range).
pub(crate) fn embeddings_list(vectors: &[Vec<f32>], model: &str, prompt: u64, base64: bool) -> Option<Vec<u8>> {
    use crate::embed::Encoding;
    let to = if base64 { Encoding::Base64 } else { Encoding::Float };
    let dims: usize = vectors.iter().map(Vec::len).sum();
    let mut out = Vec::with_capacity(dims * if base64 { 6 } else { 12 } + 256);
    out.extend_from_slice(b"{\"object\":\"list\",\"data\":[");
    let mut bytes = Vec::new();
    for (i, v) in vectors.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"object\":\"embedding\",\"index\":");
        out.extend_from_slice(super::chunk::itoa(i as u64).as_bytes());
        out.extend_from_slice(b",\"embedding\":");
        bytes.clear();
        bytes.extend(v.iter().flat_map(|x| x.to_le_bytes()));
        crate::embed::encode(&bytes, to, &mut out).ok()?;
        out.push(b'}');
    }
    out.extend_from_slice(b"],\"model\":");
    json::write_str(&mut out, model);
    out.extend_from_slice(b",\"usage\":{\"prompt_tokens\":");
    out.extend_from_slice(super::chunk::itoa(prompt).as_bytes());
    out.extend_from_slice(b",\"total_tokens\":");
    out.extend_from_slice(super::chunk::itoa(prompt).as_bytes());
    out.extend_from_slice(b"}}");
    Some(out)
}
