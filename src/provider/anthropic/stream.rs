//! Anthropic Messages stream → OpenAI `chat.completion.chunk` SSE, event by event.
//!
//! Each event's JSON is read by the hand-written scanner ([`json::members`]), which finds keys
//! by depth whatever their order and padding (Anthropic pads objects with spaces and reorders
//! keys between recordings). Text, thinking and tool-argument fragments are copied as raw JSON
//! string tokens: never unescaped and re-escaped, since both sides use JSON string syntax. The
//! output goes into the body's reused buffer; the chunk prefix (`id`, `created`, `model`) is
//! rendered once at `message_start`. No allocation per event in steady state.
//!
//! Mapping, from <https://docs.anthropic.com/en/api/messages-streaming> to
//! <https://platform.openai.com/docs/api-reference/chat-streaming>: `message_start` → role chunk;
//! `text_delta` → content;
//! `tool_use` start → a `tool_calls` delta whose OpenAI index counts tool blocks only, with id,
//! name and empty arguments; `input_json_delta` → an arguments fragment (empty ones dropped; a
//! tool that got none gets `"{}"` at its stop); `thinking_delta` → `reasoning_content`;
//! `signature_delta`, `ping` and unknown events → nothing; `message_delta` → the finish chunk,
//! then the usage chunk when the client asked for it; `message_stop` → `[DONE]`; `error` → the
//! body's final error event.

use crate::error::{Error, Kind};
use crate::json::{self, fields, unescaped_key, Usage};
use crate::provider::chunk::{self, itoa, Prefix};
use crate::provider::Translate;
use crate::sse::Event;
use bytes::{BufMut, BytesMut};
use std::ops::Range;

/// The longest message id or model name (JSON token, quotes included) copied into chunks; real
/// ones are a few dozen bytes.
const MAX_NAME: usize = 512;

/// Content blocks tracked per message; real messages have a handful.
const MAX_BLOCKS: usize = 1024;

/// What an Anthropic content block is, by its index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Block {
    Text,
    /// A tool_use block: its OpenAI tool index, and whether any argument fragment was sent.
    Tool {
        k: u32,
        args: bool,
    },
    Thinking,
    Other,
}

/// Token counts as Anthropic reports them.
#[derive(Default, Clone, Copy, Debug)]
struct Tokens {
    input: u64,
    cache_read: u64,
    cache_creation: u64,
    output: u64,
    seen: bool,
}

impl Tokens {
    /// Reads a usage object; fields that are absent or null keep their value. `text` is part of
    /// an event already validated, so the only failure is a usage that is not an object (say
    /// `null`): no tokens to read, nothing lost.
    fn read(&mut self, text: &[u8]) {
        let _ = json::members(text, |k, v| {
            let n = json::u64_of(&text[v]);
            if let (Some(k), Some(n)) = (unescaped_key::<32>(k), n) {
                self.seen = true;
                match k.as_slice() {
                    b"input_tokens" => self.input = n,
                    b"output_tokens" => self.output = n,
                    b"cache_read_input_tokens" => self.cache_read = n,
                    b"cache_creation_input_tokens" => self.cache_creation = n,
                    _ => {}
                }
            }
            true
        });
    }

    fn usage(&self) -> Usage {
        // Saturating: the counts are the upstream's, and a hostile one may send u64::MAX.
        let prompt = self.input.saturating_add(self.cache_read).saturating_add(self.cache_creation);
        Usage { prompt, completion: self.output, cached: self.cache_read, cache_write: self.cache_creation }
    }
}

/// The stream translator: one per response.
pub struct Stream {
    include_usage: bool,
    /// `data: {"id":..,"object":"chat.completion.chunk","created":..,"model":..,"choices":[`
    prefix: Prefix,
    blocks: Vec<Block>,
    next_tool: u32,
    tokens: Tokens,
    done: bool,
}

impl Stream {
    /// A translator; `include_usage` is whether the client asked for the usage chunk.
    pub fn new(include_usage: bool) -> Self {
        let mut s = Stream {
            include_usage,
            prefix: Prefix::default(),
            blocks: Vec::new(),
            next_tool: 0,
            tokens: Tokens::default(),
            done: false,
        };
        // A stream that skips `message_start` still gets well-formed chunks (found by fuzzing).
        s.set_prefix(b"\"chatcmpl-lmgate\"", b"\"unknown\"");
        s
    }

    /// Renders the chunk prefix for message `id` and `model` (JSON string tokens).
    fn set_prefix(&mut self, id: &[u8], model: &[u8]) {
        self.prefix.set("chat.completion.chunk", id, crate::provider::unix_now(), model);
    }

    /// One chunk with `delta` (a JSON object text) and a finish reason.
    fn chunk(&self, out: &mut BytesMut, delta: &[&[u8]], finish: Option<&str>) {
        chunk::write_delta_chunk(&self.prefix, out, delta, finish, self.include_usage);
    }

    fn message_start(&mut self, data: &[u8], top: &Top, out: &mut BytesMut) -> Result<(), Error> {
        // A message that is not an object leaves the defaults: it carries no content.
        let (mut id, mut model): (&[u8], &[u8]) = (b"\"chatcmpl-lmgate\"", b"\"unknown\"");
        if let Some(m) = top[MESSAGE].clone() {
            let m = &data[m];
            let _ = json::members(m, |k, v| {
                match unescaped_key::<8>(k).as_ref().map(|k| k.as_slice()) {
                    Some(b"id") if m[v.start] == b'"' => id = &m[v],
                    Some(b"model") if m[v.start] == b'"' => model = &m[v],
                    Some(b"usage") => self.tokens.read(&m[v]),
                    _ => {}
                }
                true
            });
        }
        // The id and model are copied into every chunk: an upstream that sent megabytes of them
        // would multiply its every event by that much.
        if id.len() > MAX_NAME || model.len() > MAX_NAME {
            return Err(malformed("message_start", &format!("its id or model is longer than {MAX_NAME} bytes")));
        }
        self.set_prefix(id, model);
        self.chunk(out, &[b"{\"role\":\"assistant\",\"content\":\"\"}"], None);
        Ok(())
    }

    fn block_start(&mut self, data: &[u8], top: &Top, out: &mut BytesMut) -> Result<(), Error> {
        let (Some(index), Some(block)) = (index_of(data, top), top[CONTENT_BLOCK].clone()) else {
            return Err(malformed("content_block_start", "no `index` or `content_block`"));
        };
        // The index comes from the upstream: bounded, so a broken stream cannot make us
        // allocate without limit (found by fuzzing).
        if index >= MAX_BLOCKS {
            return Err(malformed("content_block_start", "a block index past the gateway's bound"));
        }
        let b = &data[block];
        let f = fields(b, &[b"type", b"text", b"id", b"name", b"thinking"]);
        let kind = match f[0].clone().map(|r| &b[r]) {
            Some(t) if str_is(t, b"text") => {
                if let Some(t) = f[1].clone().map(|r| &b[r]).filter(|t| !empty_str(t)) {
                    self.chunk(out, &[b"{\"content\":", t, b"}"], None);
                }
                Block::Text
            }
            Some(t) if str_is(t, b"tool_use") => {
                let k = self.next_tool;
                self.next_tool += 1;
                let id = f[2].clone().map_or(&b"\"\""[..], |r| &b[r]);
                let name = f[3].clone().map_or(&b"\"\""[..], |r| &b[r]);
                self.chunk(
                    out,
                    &[
                        b"{\"tool_calls\":[{\"index\":",
                        itoa(k as u64).as_bytes(),
                        b",\"id\":",
                        id,
                        b",\"type\":\"function\",\"function\":{\"name\":",
                        name,
                        b",\"arguments\":\"\"}}]}",
                    ],
                    None,
                );
                Block::Tool { k, args: false }
            }
            Some(t) if str_is(t, b"thinking") => {
                if let Some(t) = f[4].clone().map(|r| &b[r]).filter(|t| !empty_str(t)) {
                    self.chunk(out, &[b"{\"reasoning_content\":", t, b"}"], None);
                }
                Block::Thinking
            }
            _ => Block::Other,
        };
        if self.blocks.len() <= index {
            self.blocks.resize(index + 1, Block::Other);
        }
        self.blocks[index] = kind;
        Ok(())
    }

    fn block_delta(&mut self, data: &[u8], top: &Top, out: &mut BytesMut) -> Result<(), Error> {
        const EVENT: &str = "content_block_delta";
        let (Some(index), Some(delta)) = (index_of(data, top), top[DELTA].clone()) else {
            return Err(malformed(EVENT, "no `index` or `delta`"));
        };
        let d = &data[delta];
        let f = fields(d, &[b"type", b"text", b"partial_json", b"thinking"]);
        let Some(kind) = f[0].clone().map(|r| &d[r]) else {
            return Err(malformed(EVENT, "a delta without a `type`"));
        };
        // The fragment of a delta kind we map must be a string: anything else would lose the
        // fragment or hand the client a chunk of the wrong shape.
        let value = |i: usize, name: &'static str| match f[i].clone().map(|r| &d[r]) {
            Some(t) if t.first() == Some(&b'"') => Ok((!empty_str(t)).then_some(t)),
            _ => Err(malformed(EVENT, name)),
        };
        if str_is(kind, b"text_delta") {
            if let Some(t) = value(1, "a text_delta without a string `text`")? {
                self.chunk(out, &[b"{\"content\":", t, b"}"], None);
            }
        } else if str_is(kind, b"input_json_delta") {
            let t = value(2, "an input_json_delta without a string `partial_json`")?;
            let Some(Block::Tool { k, args }) = self.blocks.get_mut(index) else {
                return Err(malformed(EVENT, "an input_json_delta for a block that is not a tool_use"));
            };
            if let Some(t) = t {
                *args = true;
                let k = *k;
                self.chunk(
                    out,
                    &[
                        b"{\"tool_calls\":[{\"index\":",
                        itoa(k as u64).as_bytes(),
                        b",\"function\":{\"arguments\":",
                        t,
                        b"}}]}",
                    ],
                    None,
                );
            }
        } else if str_is(kind, b"thinking_delta") {
            if let Some(t) = value(3, "a thinking_delta without a string `thinking`")? {
                self.chunk(out, &[b"{\"reasoning_content\":", t, b"}"], None);
            }
        }
        // signature_delta, citations_delta and future kinds: nothing for an OpenAI client.
        Ok(())
    }

    fn block_stop(&mut self, data: &[u8], top: &Top, out: &mut BytesMut) {
        let Some(index) = index_of(data, top) else { return };
        if let Some(Block::Tool { k, args: false }) = self.blocks.get(index).copied() {
            self.chunk(
                out,
                &[
                    b"{\"tool_calls\":[{\"index\":",
                    itoa(k as u64).as_bytes(),
                    b",\"function\":{\"arguments\":\"{}\"}}]}",
                ],
                None,
            );
        }
    }

    fn message_delta(&mut self, data: &[u8], top: &Top, out: &mut BytesMut) {
        let mut finish = "stop";
        if let Some(d) = top[DELTA].clone() {
            let d = &data[d];
            if let Some(r) = fields(d, &[b"stop_reason"])[0].clone() {
                if let Some(reason) = unescaped_key::<40>(&d[r]) {
                    finish = finish_reason(reason.as_slice());
                }
            }
        }
        if let Some(u) = top[USAGE].clone() {
            self.tokens.read(&data[u]);
        }
        self.chunk(out, &[b"{}"], Some(finish));
        if self.include_usage {
            self.prefix.usage_chunk(out, self.tokens.usage(), Some(self.tokens.cache_read));
        }
    }
}

impl Translate for Stream {
    fn event(&mut self, ev: &Event<'_>, out: &mut BytesMut) -> Result<(), Error> {
        if self.done {
            return Ok(());
        }
        let data = ev.data;
        // Fragments are copied as they are, so bytes that are not UTF-8 would reach the client
        // as broken JSON text (found by fuzzing): the stream ends with an error instead.
        if std::str::from_utf8(data).is_err() {
            self.done = true;
            return Err(Error::upstream_failure(
                Kind::UpstreamMalformed,
                "The upstream sent a stream event that is not UTF-8.",
            ));
        }
        // Every event's data is one JSON object: validated whole here, once, in the same pass
        // that finds the top-level members the handlers read, so their reads of the parts cannot
        // meet broken JSON. A malformed event would otherwise be skipped, and the text in it lost
        // without the client knowing.
        let top = match top_members(data) {
            Ok(top) => top,
            Err(e) => {
                self.done = true;
                return Err(Error::upstream_failure(
                    Kind::UpstreamMalformed,
                    format!("The upstream sent a stream event that is not a JSON object: {e}."),
                ));
            }
        };
        // The event name equals the JSON `type`; fall back to the JSON when a proxy dropped it.
        let name: &[u8] = match (ev.event, top[TYPE].clone()) {
            (name, _) if !name.is_empty() => name,
            (_, Some(r)) if r.len() >= 2 && data[r.start] == b'"' => &data[r.start + 1..r.end - 1],
            _ => b"",
        };
        let handled = match name {
            b"message_start" => self.message_start(data, &top, out),
            b"content_block_start" => self.block_start(data, &top, out),
            b"content_block_delta" => self.block_delta(data, &top, out),
            b"content_block_stop" => {
                self.block_stop(data, &top, out);
                Ok(())
            }
            b"message_delta" => {
                self.message_delta(data, &top, out);
                Ok(())
            }
            b"message_stop" => {
                out.put_slice(b"data: [DONE]\n\n");
                self.done = true;
                Ok(())
            }
            b"error" => Err(stream_error(data, &top)),
            _ => Ok(()), // ping and event types added later
        };
        if handled.is_err() {
            self.done = true;
        }
        handled
    }

    fn done(&self) -> bool {
        self.done
    }

    fn usage(&self) -> Option<Usage> {
        self.tokens.seen.then(|| self.tokens.usage())
    }
}

/// An in-band `error` event as the error the body renders last.
fn stream_error(data: &[u8], top: &Top) -> Error {
    let err = top[ERROR].clone().map(|r| &data[r]);
    let (kind, message) = match err {
        Some(e) => {
            let f = fields(e, &[b"type", b"message"]);
            let kind = f[0].clone().and_then(|r| json::string_value(&e[r])).unwrap_or_default();
            let message = f[1].clone().and_then(|r| json::string_value(&e[r])).unwrap_or_default();
            (kind, message)
        }
        None => (String::new(), String::new()),
    };
    let message = if message.is_empty() { "The upstream stream failed.".to_owned() } else { message };
    Error::in_stream(super::known_error_type(&kind), message)
}

/// An event of a kind we map whose shape is wrong: the stream cannot go on without losing
/// content, so it ends with this error.
fn malformed(event: &str, what: &str) -> Error {
    Error::upstream_failure(Kind::UpstreamMalformed, format!("The upstream sent a malformed `{event}` event: {what}."))
}

/// OpenAI finish_reason for an Anthropic stop_reason; unknown → stop. Values: `stop_reason` in
/// <https://docs.anthropic.com/en/api/messages>, `finish_reason` in
/// <https://platform.openai.com/docs/api-reference/chat/object>; pairs chosen from the mappings
/// of BerriAI/litellm (`_FINISH_REASON_MAP`, `litellm/litellm_core_utils/core_helpers.py`) and
/// vercel/ai (`packages/anthropic/src/map-anthropic-stop-reason.ts`).
pub fn finish_reason(reason: &[u8]) -> &'static str {
    match reason {
        b"max_tokens" | b"model_context_window_exceeded" | b"compaction" => "length",
        b"tool_use" => "tool_calls",
        b"refusal" => "content_filter",
        _ => "stop",
    }
}

fn key_is(raw_key: &[u8], name: &[u8]) -> bool {
    unescaped_key::<24>(raw_key).is_some_and(|k| k.as_slice() == name)
}

/// Whether a JSON token is the string `s`.
fn str_is(token: &[u8], s: &[u8]) -> bool {
    token.first() == Some(&b'"') && key_is(token, s)
}

fn empty_str(token: &[u8]) -> bool {
    token == b"\"\""
}

/// The top-level members of an event that the handlers read, by position (first occurrence of
/// each; absent ones `None`).
type Top = [Option<Range<usize>>; 7];
const TOP_NAMES: [&[u8]; 7] = [b"type", b"index", b"content_block", b"delta", b"message", b"usage", b"error"];
const TYPE: usize = 0;
const INDEX: usize = 1;
const CONTENT_BLOCK: usize = 2;
const DELTA: usize = 3;
const MESSAGE: usize = 4;
const USAGE: usize = 5;
const ERROR: usize = 6;

/// Validates an event's JSON whole and finds its [`Top`] members, in one pass.
fn top_members(data: &[u8]) -> Result<Top, json::ScanError> {
    json::checked_fields(data, &TOP_NAMES)
}

/// The event's `index`, as a number.
fn index_of(data: &[u8], top: &Top) -> Option<usize> {
    top[INDEX].clone().and_then(|r| json::u64_of(&data[r])).map(|n| n as usize)
}

#[cfg(test)]
mod tests {
    //! Single mappings through the translator, on synthetic events. Every expectation is written
    //! by hand from the Anthropic events (<https://docs.anthropic.com/en/api/messages-streaming>)
    //! and the OpenAI chunks (<https://platform.openai.com/docs/api-reference/chat-streaming>),
    //! not produced by this code.

    use super::*;
    use serde_json::{json, Value};

    /// Feeds `(event name, data)` pairs; returns the output events (`created` checked and
    /// removed, `[DONE]` as a string) and the error that ended the stream, if any.
    fn run(events: &[(&str, Value)], include_usage: bool) -> (Vec<Value>, Option<Error>, Stream) {
        let raw: Vec<(&str, String)> = events.iter().map(|(n, d)| (*n, d.to_string())).collect();
        run_raw(&raw, include_usage)
    }

    /// [`run`] with the data as text, which need not be JSON.
    fn run_raw(events: &[(&str, String)], include_usage: bool) -> (Vec<Value>, Option<Error>, Stream) {
        let mut s = Stream::new(include_usage);
        let mut out = BytesMut::new();
        let mut failed = None;
        for (name, data) in events {
            let ev = Event { event: name.as_bytes(), data: data.as_bytes(), id: b"" };
            if let Err(e) = s.event(&ev, &mut out) {
                failed = Some(e);
                break;
            }
        }
        let text = String::from_utf8(out.to_vec()).unwrap();
        let events = text
            .split_terminator("\n\n")
            .map(|e| {
                let data = e.strip_prefix("data: ").unwrap_or_else(|| panic!("{e:?}"));
                if data == "[DONE]" {
                    return Value::String(data.into());
                }
                let mut v: Value = serde_json::from_str(data).unwrap_or_else(|err| panic!("{err}: {data}"));
                let created = v.as_object_mut().unwrap().remove("created").expect("created");
                assert!(created.is_u64());
                v
            })
            .collect();
        (events, failed, s)
    }

    fn start(usage: Value) -> (&'static str, Value) {
        (
            "message_start",
            json!({"type":"message_start","message":{"id":"msg_1","type":"message","role":"assistant",
                "model":"claude-x","content":[],"stop_reason":null,"usage":usage}}),
        )
    }

    fn message_delta(stop_reason: &str, usage: Value) -> (&'static str, Value) {
        (
            "message_delta",
            json!({"type":"message_delta","delta":{"stop_reason":stop_reason,"stop_sequence":null},"usage":usage}),
        )
    }

    fn stop() -> (&'static str, Value) {
        ("message_stop", json!({"type":"message_stop"}))
    }

    /// A chunk as a client that did not ask for usage gets it.
    fn chunk(delta: Value, finish: Value) -> Value {
        json!({"id":"msg_1","object":"chat.completion.chunk","model":"claude-x",
            "choices":[{"index":0,"delta":delta,"logprobs":null,"finish_reason":finish}]})
    }

    fn role() -> Value {
        chunk(json!({"role":"assistant","content":""}), Value::Null)
    }

    #[test]
    fn stop_reasons_map_to_openai_finish_reasons() {
        for (stop_reason, finish) in [
            ("end_turn", "stop"),
            ("stop_sequence", "stop"),
            ("max_tokens", "length"),
            ("tool_use", "tool_calls"),
            ("refusal", "content_filter"),
            ("pause_turn", "stop"),
            ("model_context_window_exceeded", "length"),
            ("a_reason_added_later", "stop"),
        ] {
            let events = [
                start(json!({"input_tokens":5,"output_tokens":1})),
                message_delta(stop_reason, json!({"output_tokens":9})),
                stop(),
            ];
            let (got, failed, _) = run(&events, false);
            assert!(failed.is_none());
            assert_eq!(got, vec![role(), chunk(json!({}), json!(finish)), json!("[DONE]")], "{stop_reason}");
        }
    }

    #[test]
    fn cache_reads_and_writes_count_as_prompt_tokens_and_reads_as_cached() {
        let events = [
            start(
                json!({"input_tokens":10,"cache_creation_input_tokens":200,"cache_read_input_tokens":3000,"output_tokens":1}),
            ),
            message_delta("end_turn", json!({"output_tokens":42})),
            stop(),
        ];
        let (got, _, s) = run(&events, true);
        let with_usage = |mut c: Value| {
            c["usage"] = Value::Null;
            c
        };
        assert_eq!(
            got,
            vec![
                with_usage(role()),
                with_usage(chunk(json!({}), json!("stop"))),
                json!({"id":"msg_1","object":"chat.completion.chunk","model":"claude-x","choices":[],
                    "usage":{"prompt_tokens":3210,"completion_tokens":42,"total_tokens":3252,
                        "prompt_tokens_details":{"cached_tokens":3000}}}),
                json!("[DONE]"),
            ]
        );
        assert_eq!(s.usage(), Some(Usage { prompt: 3210, completion: 42, cached: 3000, cache_write: 200 }));
    }

    #[test]
    fn token_counts_at_the_top_of_u64_saturate_instead_of_overflowing() {
        let max = u64::MAX;
        let events = [
            start(json!({"input_tokens":max,"cache_creation_input_tokens":max,"cache_read_input_tokens":1})),
            message_delta("end_turn", json!({"output_tokens":max})),
            stop(),
        ];
        let (got, error, s) = run(&events, true);
        assert!(error.is_none());
        assert_eq!(s.usage(), Some(Usage { prompt: max, completion: max, cached: 1, cache_write: max }));
        assert_eq!(got[2]["usage"]["total_tokens"], max);
    }

    #[test]
    fn a_huge_id_or_model_ends_the_stream_instead_of_being_copied_into_every_chunk() {
        for (id, model) in [("x".repeat(1 << 20), "claude-x".to_owned()), ("msg_1".to_owned(), "m".repeat(1 << 20))] {
            let start = (
                "message_start",
                json!({"type":"message_start","message":{"id":id,"type":"message",
                "role":"assistant","model":model,"content":[],"usage":{"input_tokens":1}}}),
            );
            let delta = (
                "content_block_delta",
                json!({"type":"content_block_delta","index":0,
                "delta":{"type":"text_delta","text":"a"}}),
            );
            let (got, error, _) = run(&[start, delta], false);
            assert!(got.is_empty(), "nothing was written: {} events", got.len());
            assert!(error.unwrap().message.contains("longer than 512 bytes"));
        }
        // Ordinary names pass.
        let (got, error, _) = run(&[start(json!({"input_tokens":1})), stop()], false);
        assert!(error.is_none() && got.len() == 2, "{got:?}");
    }

    #[test]
    fn two_tool_calls_get_indexes_0_and_1_and_the_text_between_takes_none() {
        let block_start = |i: u64, block: Value| {
            ("content_block_start", json!({"type":"content_block_start","index":i,"content_block":block}))
        };
        let delta =
            |i: u64, d: Value| ("content_block_delta", json!({"type":"content_block_delta","index":i,"delta":d}));
        let block_stop = |i: u64| ("content_block_stop", json!({"type":"content_block_stop","index":i}));
        let events = [
            start(json!({"input_tokens":5,"output_tokens":1})),
            block_start(0, json!({"type":"tool_use","id":"toolu_a","name":"get_weather","input":{}})),
            delta(0, json!({"type":"input_json_delta","partial_json":"{\"city\": "})),
            delta(0, json!({"type":"input_json_delta","partial_json":"\"Paris\"}"})),
            block_stop(0),
            block_start(1, json!({"type":"text","text":""})),
            delta(1, json!({"type":"text_delta","text":"and "})),
            block_stop(1),
            block_start(2, json!({"type":"tool_use","id":"toolu_b","name":"get_time","input":{}})),
            delta(2, json!({"type":"input_json_delta","partial_json":"{\"tz\":\"CET\"}"})),
            block_stop(2),
            message_delta("tool_use", json!({"output_tokens":30})),
            stop(),
        ];
        let (got, _, _) = run(&events, false);
        let call = |k: u64, id: &str, name: &str| json!({"tool_calls":[{"index":k,"id":id,"type":"function","function":{"name":name,"arguments":""}}]});
        let args = |k: u64, a: &str| json!({"tool_calls":[{"index":k,"function":{"arguments":a}}]});
        assert_eq!(
            got,
            vec![
                role(),
                chunk(call(0, "toolu_a", "get_weather"), Value::Null),
                chunk(args(0, "{\"city\": "), Value::Null),
                chunk(args(0, "\"Paris\"}"), Value::Null),
                chunk(json!({"content":"and "}), Value::Null),
                chunk(call(1, "toolu_b", "get_time"), Value::Null),
                chunk(args(1, "{\"tz\":\"CET\"}"), Value::Null),
                chunk(json!({}), json!("tool_calls")),
                json!("[DONE]"),
            ]
        );
    }

    #[test]
    fn a_malformed_event_ends_the_stream_with_an_error_instead_of_being_skipped() {
        let text_block = r#"{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}"#;
        let tool_block = r#"{"type":"content_block_start","index":1,"content_block":{"type":"tool_use","id":"t","name":"f","input":{}}}"#;
        let first = r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"kept"}}"#;
        for (name, bad) in [
            (
                "content_block_delta",
                r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"lost"#,
            ),
            ("content_block_delta", "this is not JSON"),
            ("", r#"["content_block_delta"]"#),
            (
                "content_block_delta",
                r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":5}}"#,
            ),
            ("content_block_delta", r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta"}}"#),
            ("content_block_delta", r#"{"type":"content_block_delta","delta":{"type":"text_delta","text":"lost"}}"#),
            ("content_block_delta", r#"{"type":"content_block_delta","index":0,"delta":"text_delta"}"#),
            (
                "content_block_delta",
                r#"{"type":"content_block_delta","index":0,"delta":{"type":"input_json_delta","partial_json":"{}"}}"#,
            ),
            (
                "content_block_delta",
                r#"{"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":{}}}"#,
            ),
            (
                "content_block_delta",
                r#"{"type":"content_block_delta","index":1,"delta":{"type":"thinking_delta","thinking":null}}"#,
            ),
            ("content_block_start", r#"{"type":"content_block_start","index":2}"#),
            (
                "content_block_start",
                r#"{"type":"content_block_start","index":5000,"content_block":{"type":"text","text":""}}"#,
            ),
        ] {
            let events = [
                ("message_start", start(json!({"input_tokens":5,"output_tokens":1})).1.to_string()),
                ("content_block_start", text_block.to_owned()),
                ("content_block_start", tool_block.to_owned()),
                ("content_block_delta", first.to_owned()),
                (name, bad.to_owned()),
                ("content_block_delta", first.to_owned()),
                ("message_stop", r#"{"type":"message_stop"}"#.to_owned()),
            ];
            let (got, failed, s) = run_raw(&events, false);
            let e = failed.unwrap_or_else(|| panic!("accepted {bad}"));
            assert_eq!((e.status.as_u16(), e.code), (502, Some("upstream_error")), "{bad}");
            assert!(s.done(), "{bad}");
            // What came before the bad event went out; nothing after it, and no [DONE].
            let call =
                json!({"tool_calls":[{"index":0,"id":"t","type":"function","function":{"name":"f","arguments":""}}]});
            assert_eq!(
                got,
                vec![role(), chunk(call, Value::Null), chunk(json!({"content":"kept"}), Value::Null)],
                "{bad}"
            );
        }
    }
}
