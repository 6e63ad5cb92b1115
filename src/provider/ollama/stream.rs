//! Ollama `/api/chat` NDJSON stream → OpenAI `chat.completion.chunk` SSE, line by line.
//!
//! Each line is one JSON object (<https://github.com/ollama/ollama/blob/main/docs/api.md>,
//! "Generate a chat completion"): `{"model", "created_at", "message": {"role", "content",
//! "thinking"?, "tool_calls"?}, "done": false}`, and a last one with `"done": true`,
//! `done_reason` and the counts (`prompt_eval_count`, `eval_count`, either of which may be
//! absent). A line `{"error": "..."}` reports a failure after the status was sent.
//!
//! As for Anthropic, a line is validated whole by the hand-written scanner and its text copied
//! as raw JSON string tokens, never unescaped; the chunk prefix is rendered once; no allocation
//! per line. Mapping to <https://platform.openai.com/docs/api-reference/chat-streaming>:
//! the first line → the role chunk (`{"role":"assistant","content":""}`); `message.thinking` →
//! `reasoning_content`; `message.content` → `content` (empty ones dropped); each of
//! `message.tool_calls` (arriving whole, arguments as a JSON object) → one `tool_calls` delta
//! with index, id (Ollama's when it sends one), name and the arguments as a JSON string; the
//! `done` line → the finish chunk (`length` stays `length`; `tool_calls` when a tool call was
//! sent; anything else `stop`), the usage chunk when the client asked for it, then `[DONE]`.

use crate::error::{Error, Kind};
use crate::json::{self, fields, Usage};
use crate::provider::chunk::Whole;
use crate::provider::{Framing, Translate};
use crate::sse::Event;
use bytes::BytesMut;
use std::ops::Range;

/// The longest function name (JSON token, quotes included) copied into chunks.
const MAX_NAME: usize = 512;

/// The stream translator: one per response.
pub struct Stream {
    chunks: Whole,
    started: bool,
    usage: Option<Usage>,
    done: bool,
}

impl Stream {
    /// A translator for the response `id` (`chatcmpl-...`; Ollama's lines carry none);
    /// `include_usage` is whether the client asked for the usage chunk.
    pub fn new(include_usage: bool, id: &str) -> Self {
        Stream { chunks: Whole::new(include_usage, id), started: false, usage: None, done: false }
    }

    /// The parts of `message`: reasoning, content, then each tool call.
    fn message(&mut self, m: &[u8], out: &mut BytesMut) -> Result<(), Error> {
        let [content, thinking, calls] = fields(m, &[b"content", b"thinking", b"tool_calls"]);
        let text = |r: Option<Range<usize>>| r.map(|r| &m[r]).filter(|t| t.first() == Some(&b'"') && *t != b"\"\"");
        if let Some(thinking) = text(thinking) {
            self.chunks.delta(out, &[b"{\"reasoning_content\":", thinking, b"}"], None);
        }
        if let Some(content) = text(content) {
            self.chunks.delta(out, &[b"{\"content\":", content, b"}"], None);
        }
        let Some(calls) = calls.map(|r| &m[r]).filter(|c| *c != b"null") else { return Ok(()) };
        if calls.first() != Some(&b'[') {
            return Err(malformed("`message.tool_calls` is not an array"));
        }
        let mut failed = None;
        let _ = json::elements(calls, |r| match self.tool_call(&calls[r], out) {
            Ok(()) => true,
            Err(e) => {
                failed = Some(e);
                false
            }
        });
        failed.map_or(Ok(()), Err)
    }

    /// One whole tool call, `{"id"?, "function": {"name", "arguments": {...}}}`, as one delta.
    fn tool_call(&mut self, call: &[u8], out: &mut BytesMut) -> Result<(), Error> {
        let [id, function] = fields(call, &[b"id", b"function"]);
        let function = function.map(|r| &call[r]).ok_or_else(|| malformed("a tool call has no `function`"))?;
        let [name, arguments] = fields(function, &[b"name", b"arguments"]);
        let name = name
            .map(|r| &function[r])
            .filter(|n| n.first() == Some(&b'"') && n.len() > 2 && n.len() <= MAX_NAME)
            .ok_or_else(|| malformed("a tool call has no `function.name`"))?;
        let (id, arguments) = (id.map(|r| &call[r]), arguments.map(|r| &function[r]));
        self.chunks.tool_call(out, id, None, name, arguments).map_err(|what| malformed(&format!("a tool call: {what}")))
    }

    /// The `done` line: finish chunk, usage chunk when asked for, `[DONE]`.
    fn finish_line(&mut self, data: &[u8], top: &Top, out: &mut BytesMut) {
        let count = |i: usize| top[i].clone().and_then(|r| json::u64_of(&data[r])).unwrap_or(0);
        let usage = Usage { prompt: count(PROMPT_EVAL_COUNT), completion: count(EVAL_COUNT), ..Usage::default() };
        self.usage = Some(usage);
        let finish = match top[DONE_REASON].clone().map(|r| &data[r]) {
            Some(b"\"length\"") => "length",
            _ if self.chunks.tools > 0 => "tool_calls",
            _ => "stop",
        };
        self.chunks.end(out, finish, usage);
        self.done = true;
    }
}

impl Translate for Stream {
    fn framing(&self) -> Framing {
        Framing::Ndjson
    }

    fn event(&mut self, ev: &Event<'_>, out: &mut BytesMut) -> Result<(), Error> {
        if self.done {
            return Ok(());
        }
        let handled = self.line(ev.data, out);
        if handled.is_err() {
            self.done = true;
        }
        handled
    }

    fn done(&self) -> bool {
        self.done
    }

    fn usage(&self) -> Option<Usage> {
        self.usage
    }
}

impl Stream {
    fn line(&mut self, data: &[u8], out: &mut BytesMut) -> Result<(), Error> {
        // Tokens are copied as they are: bytes that are not UTF-8 would reach the client as
        // broken JSON text.
        if std::str::from_utf8(data).is_err() {
            return Err(Error::upstream_failure(
                Kind::UpstreamMalformed,
                "The upstream sent a line that is not UTF-8.",
            ));
        }
        // Validated whole, in the pass that finds the members read below: a malformed line ends
        // the stream with an error instead of being skipped with its text.
        let top = top_members(data).map_err(|e| {
            Error::upstream_failure(
                Kind::UpstreamMalformed,
                format!("The upstream sent a stream line that is not a JSON object: {e}."),
            )
        })?;
        if let Some(e) = top[ERROR].clone() {
            let message = json::string_value(&data[e]).filter(|m| !m.is_empty());
            let message = message.unwrap_or_else(|| "The upstream stream failed.".to_owned());
            return Err(Error::in_stream("api_error", crate::error::clip(&message).to_owned()));
        }
        if !self.started {
            self.chunks.start(top[MODEL].clone().map(|r| &data[r]), out);
            self.started = true;
        }
        if let Some(m) = top[MESSAGE].clone() {
            self.message(&data[m], out)?;
        }
        if top[DONE].clone().is_some_and(|r| &data[r] == b"true") {
            self.finish_line(data, &top, out);
        }
        Ok(())
    }
}

/// A line of a kind we map whose shape is wrong: the stream ends with this error.
fn malformed(what: &str) -> Error {
    Error::upstream_failure(Kind::UpstreamMalformed, format!("The upstream sent a malformed stream line: {what}."))
}

type Top = [Option<Range<usize>>; 7];
const TOP_NAMES: [&[u8]; 7] =
    [b"model", b"message", b"done", b"done_reason", b"prompt_eval_count", b"eval_count", b"error"];
const MODEL: usize = 0;
const MESSAGE: usize = 1;
const DONE: usize = 2;
const DONE_REASON: usize = 3;
const PROMPT_EVAL_COUNT: usize = 4;
const EVAL_COUNT: usize = 5;
const ERROR: usize = 6;

/// Validates a line's JSON whole and finds its [`Top`] members, in one pass.
fn top_members(data: &[u8]) -> Result<Top, json::ScanError> {
    json::checked_fields(data, &TOP_NAMES)
}

#[cfg(test)]
mod tests {
    //! Single mappings on synthetic lines; every expectation is written by hand from Ollama's
    //! lines (<https://github.com/ollama/ollama/blob/main/docs/api.md>) and OpenAI's chunks
    //! (<https://platform.openai.com/docs/api-reference/chat-streaming>).

    use super::*;
    use serde_json::{json, Value};

    /// Feeds each line; returns the output events (`created` and `id` dropped, `[DONE]` as a
    /// string), the error that ended the stream, and the translator.
    fn run(lines: &[Value], include_usage: bool) -> (Vec<Value>, Option<Error>, Stream) {
        let mut s = Stream::new(include_usage, "chatcmpl-7");
        let mut out = BytesMut::new();
        let mut err = None;
        for l in lines {
            let data = l.to_string();
            if let Err(e) = s.event(&Event { event: b"", data: data.as_bytes(), id: b"" }, &mut out) {
                err = Some(e);
                break;
            }
        }
        let text = std::str::from_utf8(&out).unwrap();
        let events = text
            .split_terminator("\n\n")
            .map(|e| {
                let d = e.strip_prefix("data: ").unwrap();
                let mut v: Value = if d == "[DONE]" { json!(d) } else { serde_json::from_str(d).unwrap() };
                if let Some(o) = v.as_object_mut() {
                    assert_eq!(o.remove("id"), Some(json!("chatcmpl-7")));
                    assert_eq!(o.remove("object"), Some(json!("chat.completion.chunk")));
                    assert!(o.remove("created").unwrap().is_u64());
                }
                v
            })
            .collect();
        (events, err, s)
    }

    fn delta(d: Value, finish: Value) -> Value {
        json!({"model":"qwen3","choices":[{"index":0,"delta":d,"logprobs":null,"finish_reason":finish}]})
    }

    fn line(message: Value) -> Value {
        json!({"model":"qwen3","created_at":"2025-01-01T00:00:00Z","message":message,"done":false})
    }

    #[test]
    fn thinking_text_and_two_tool_calls_then_the_finish() {
        let (events, err, s) = run(
            &[
                line(json!({"role":"assistant","content":"","thinking":"Two cities."})),
                line(json!({"role":"assistant","content":"Checking."})),
                line(json!({"role":"assistant","content":"","tool_calls":[
                    {"function":{"index":0,"name":"weather","arguments":{"city":"Paris \"FR\"","days":[1,2]}}},
                    {"id":"call_abc","function":{"index":1,"name":"weather","arguments":{}}}]})),
                line(json!({"role":"assistant","content":" Done."})),
                json!({"model":"qwen3","message":{"role":"assistant","content":""},"done":true,"done_reason":"stop",
                       "prompt_eval_count":12,"eval_count":30}),
            ],
            false,
        );
        assert!(err.is_none());
        let call = |k: u64, id: &str, args: &str| {
            delta(
                json!({"tool_calls":[{"index":k,"id":id,"type":"function","function":{"name":"weather","arguments":args}}]}),
                Value::Null,
            )
        };
        assert_eq!(
            events,
            vec![
                delta(json!({"role":"assistant","content":""}), Value::Null),
                delta(json!({"reasoning_content":"Two cities."}), Value::Null),
                delta(json!({"content":"Checking."}), Value::Null),
                call(0, "call_chatcmpl-7_0", r#"{"city":"Paris \"FR\"","days":[1,2]}"#),
                call(1, "call_abc", "{}"),
                delta(json!({"content":" Done."}), Value::Null),
                delta(json!({}), json!("tool_calls")),
                json!("[DONE]"),
            ]
        );
        assert_eq!(s.usage(), Some(Usage { prompt: 12, completion: 30, ..Usage::default() }));
    }

    #[test]
    fn length_stays_length_absent_counts_are_zero_and_usage_comes_when_asked() {
        let (events, _, s) = run(
            &[
                line(json!({"role":"assistant","content":"Hi"})),
                json!({"model":"qwen3","done_reason":"length","done":true,"eval_count":1}),
                line(json!({"role":"assistant","content":"after the end: ignored"})),
            ],
            true,
        );
        let with_null = |mut v: Value| {
            v["usage"] = Value::Null;
            v
        };
        assert_eq!(
            events,
            vec![
                with_null(delta(json!({"role":"assistant","content":""}), Value::Null)),
                with_null(delta(json!({"content":"Hi"}), Value::Null)),
                with_null(delta(json!({}), json!("length"))),
                json!({"model":"qwen3","choices":[],"usage":{"prompt_tokens":0,"completion_tokens":1,"total_tokens":1}}),
                json!("[DONE]"),
            ]
        );
        assert!(s.done());
        // `load` / `unload` / none: stop.
        for reason in [json!("load"), json!("unload"), Value::Null] {
            let (events, _, _) = run(&[json!({"model":"m","done":true,"done_reason":reason})], false);
            assert_eq!(events[1]["choices"][0]["finish_reason"], "stop", "{reason}");
        }
    }

    #[test]
    fn arguments_that_are_already_a_string_or_absent() {
        let (events, _, _) = run(
            &[line(json!({"role":"assistant","tool_calls":[
                {"function":{"name":"a","arguments":"{\"x\":1}"}},
                {"function":{"name":"b"}}]}))],
            false,
        );
        assert_eq!(events[1]["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"], "{\"x\":1}");
        assert_eq!(events[2]["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"], "{}");
    }

    #[test]
    fn object_arguments_with_whitespace_and_escapes_become_an_equal_json_string() {
        let raw = "{ \"q\" :\t\"a\\\"b\\\\c\\n\",\r\n \"n\": [1, {\"u\": \"\u{e9}\"}] }";
        let mut s = Vec::new();
        crate::provider::chunk::write_as_string(&mut s, raw.as_bytes());
        let as_string: String = serde_json::from_slice(&s).unwrap();
        assert_eq!(serde_json::from_str::<Value>(&as_string).unwrap(), serde_json::from_str::<Value>(raw).unwrap());
    }

    #[test]
    fn error_lines_and_malformed_lines_end_the_stream() {
        let (events, err, s) = run(&[line(json!({"content":"a"})), json!({"error":"model runner crashed"})], false);
        assert_eq!(events.len(), 2);
        let err = err.unwrap();
        assert_eq!(err.message, "model runner crashed");
        assert!(s.done());
        for bad in [
            json!({"message":{"tool_calls":"x"}}),
            json!({"message":{"tool_calls":[{"function":{"arguments":{}}}]}}),
            json!({"message":{"tool_calls":[{"function":{"name":"f","arguments":7}}]}}),
            json!({"message":{"tool_calls":[{}]}}),
        ] {
            let (_, err, _) = run(std::slice::from_ref(&bad), false);
            assert_eq!(err.map(|e| e.kind), Some(Kind::UpstreamMalformed), "{bad}");
        }
        for raw in [&b"{\"message\":"[..], b"[1]", b"{\"message\":{\"content\":\"\xff\"}}"] {
            let mut s = Stream::new(false, "x");
            let e = s.event(&Event { event: b"", data: raw, id: b"" }, &mut BytesMut::new()).unwrap_err();
            assert_eq!(e.kind, Kind::UpstreamMalformed);
        }
    }
}
