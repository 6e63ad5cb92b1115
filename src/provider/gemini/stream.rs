//! Gemini `streamGenerateContent?alt=sse` → OpenAI `chat.completion.chunk` SSE, event by event.
//!
//! Each event is a whole `GenerateContentResponse` holding only the new parts
//! (<https://ai.google.dev/api/generate-content#method:-models.streamgeneratecontent>):
//! `{"candidates":[{"content":{"parts":[...],"role":"model"},"finishReason"?}],
//! "usageMetadata":{...},"modelVersion","responseId"}`. There is no end event: the final event
//! carries `finishReason`, and the connection then closes.
//!
//! As for Anthropic and Ollama, an event is validated whole by the hand-written scanner and text
//! is copied as raw JSON string tokens; the chunk prefix is rendered once; no allocation per
//! event. Mapping to <https://platform.openai.com/docs/api-reference/chat-streaming>:
//! the first event → the role chunk; a `text` part → `content`, or `reasoning_content` when the
//! part is a thought (`"thought": true`); empty texts dropped; a `functionCall` part (arriving
//! whole, `args` an object) → one `tool_calls` delta with the arguments as a JSON string and the
//! id `call_{response id}_{k}`, followed by `.{thoughtSignature}` when the part carries one
//! (Gemini 3 requires the signature back with the call on the next turn; the id is what OpenAI
//! clients send back); `finishReason` → the finish chunk (`STOP` → `stop`, or `tool_calls` when a
//! call was sent; `MAX_TOKENS` → `length`; the safety family → `content_filter`; anything else
//! `stop`), the usage chunk when asked for, and `[DONE]`; a prompt blocked outright
//! (`promptFeedback.blockReason`, no candidates) → `content_filter` at once. `usageMetadata` is
//! cumulative: the last one counts, prompt = `promptTokenCount` (cached tokens included),
//! completion = `candidatesTokenCount` + `thoughtsTokenCount`. An `error` object in the stream
//! ends it with the error event; a stream that closes before a `finishReason` ends with an error.

use crate::error::{Error, Kind};
use crate::json::{self, fields, Usage};
use crate::provider::chunk::Whole;
use crate::provider::Translate;
use crate::sse::Event;
use bytes::BytesMut;
use std::ops::Range;

/// The longest function name or thought signature (JSON token, quotes included) copied into
/// chunks. Signatures run to a few KiB.
const MAX_NAME: usize = 64 << 10;

/// The stream translator: one per response.
pub struct Stream {
    chunks: Whole,
    started: bool,
    usage: Option<Usage>,
    done: bool,
}

impl Stream {
    /// A translator for the response `id` (`chatcmpl-...`); `include_usage` is whether the
    /// client asked for the usage chunk.
    pub fn new(include_usage: bool, id: &str) -> Self {
        Stream { chunks: Whole::new(include_usage, id), started: false, usage: None, done: false }
    }

    fn event(&mut self, data: &[u8], out: &mut BytesMut) -> Result<(), Error> {
        // Tokens are copied as they are: bytes that are not UTF-8 would reach the client as
        // broken JSON text.
        if std::str::from_utf8(data).is_err() {
            return Err(Error::upstream_failure(
                Kind::UpstreamMalformed,
                "The upstream sent an event that is not UTF-8.",
            ));
        }
        let top = json::checked_fields(data, &TOP_NAMES).map_err(|e| {
            Error::upstream_failure(
                Kind::UpstreamMalformed,
                format!("The upstream sent a stream event that is not a JSON object: {e}."),
            )
        })?;
        if let Some(e) = top[ERROR].clone() {
            return Err(stream_error(&data[e]));
        }
        if !self.started {
            self.chunks.start(top[MODEL].clone().map(|r| &data[r]), out);
            self.started = true;
        }
        if let Some(u) = top[USAGE].clone() {
            self.read_usage(&data[u]);
        }
        let candidates = top[CANDIDATES].clone().map(|r| &data[r]);
        let Some(candidate) = candidates.and_then(|a| first_element(a).map(|c| &a[c])) else {
            // No candidate: a prompt blocked outright ends the answer; anything else carries
            // nothing (usage only).
            let blocked =
                top[PROMPT_FEEDBACK].clone().is_some_and(|r| fields(&data[r], &[b"blockReason"])[0].is_some());
            if blocked {
                self.finish_with("content_filter", out);
            }
            return Ok(());
        };
        let [content, finish] = fields(candidate, &[b"content", b"finishReason"]);
        let content = content.map(|r| &candidate[r]);
        let parts = content.and_then(|c| fields(c, &[b"parts"])[0].clone().map(|r| &c[r]));
        if let Some(parts) = parts.filter(|p| p.first() == Some(&b'[')) {
            let mut failed = None;
            let _ = json::elements(parts, |r| match self.part(&parts[r], out) {
                Ok(()) => true,
                Err(e) => {
                    failed = Some(e);
                    false
                }
            });
            if let Some(e) = failed {
                return Err(e);
            }
        }
        if let Some(reason) = finish.map(|r| &candidate[r]).filter(|r| r.first() == Some(&b'"')) {
            let reason = finish_reason(&reason[1..reason.len() - 1], self.chunks.tools > 0);
            self.finish_with(reason, out);
        }
        Ok(())
    }

    /// One part: text, a thought, or a whole function call; other kinds carry nothing to map.
    fn part(&mut self, part: &[u8], out: &mut BytesMut) -> Result<(), Error> {
        let [text, thought, call, signature] =
            fields(part, &[b"text", b"thought", b"functionCall", b"thoughtSignature"]);
        if let Some(text) = text.map(|r| &part[r]).filter(|t| t.first() == Some(&b'"') && *t != b"\"\"") {
            let key: &[u8] = if thought.is_some_and(|r| &part[r] == b"true") {
                b"{\"reasoning_content\":"
            } else {
                b"{\"content\":"
            };
            self.chunks.delta(out, &[key, text, b"}"], None);
        }
        let Some(call) = call.map(|r| &part[r]) else { return Ok(()) };
        let [name, args, own_id] = fields(call, &[b"name", b"args", b"id"]);
        let name = name
            .map(|r| &call[r])
            .filter(|n| n.first() == Some(&b'"') && n.len() > 2 && n.len() <= MAX_NAME)
            .ok_or_else(|| malformed("a functionCall has no `name`"))?;
        let signature =
            signature.map(|r| &part[r]).filter(|s| s.first() == Some(&b'"') && s.len() > 2 && s.len() <= MAX_NAME);
        let (own_id, args) = (own_id.map(|r| &call[r]), args.map(|r| &call[r]));
        let suffix = signature.map(|s| &s[1..s.len() - 1]);
        self.chunks
            .tool_call(out, own_id, suffix, name, args)
            .map_err(|what| malformed(&format!("a functionCall: {what}")))
    }

    /// The cumulative `usageMetadata`: the latest counts replace the earlier ones.
    fn read_usage(&mut self, meta: &[u8]) {
        let [prompt, candidates, thoughts, cached] = fields(
            meta,
            &[b"promptTokenCount", b"candidatesTokenCount", b"thoughtsTokenCount", b"cachedContentTokenCount"],
        );
        let n = |r: Option<Range<usize>>| r.and_then(|r| json::u64_of(&meta[r])).unwrap_or(0);
        self.usage = Some(Usage {
            prompt: n(prompt),
            completion: n(candidates).saturating_add(n(thoughts)),
            cached: n(cached),
            cache_write: 0,
        });
    }

    /// The finish chunk, the usage chunk when asked for, `[DONE]`.
    fn finish_with(&mut self, reason: &str, out: &mut BytesMut) {
        self.chunks.end(out, reason, self.usage.unwrap_or_default());
        self.done = true;
    }
}

impl Translate for Stream {
    fn event(&mut self, ev: &Event<'_>, out: &mut BytesMut) -> Result<(), Error> {
        if self.done {
            return Ok(());
        }
        let handled = Stream::event(self, ev.data, out);
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

/// The OpenAI finish_reason for a Gemini `finishReason`
/// (<https://ai.google.dev/api/generate-content#FinishReason>): a stop after a function call is
/// `tool_calls`; the safety family is `content_filter`; anything else stops.
pub fn finish_reason(reason: &[u8], called: bool) -> &'static str {
    match reason {
        b"MAX_TOKENS" => "length",
        b"SAFETY"
        | b"RECITATION"
        | b"BLOCKLIST"
        | b"PROHIBITED_CONTENT"
        | b"SPII"
        | b"IMAGE_SAFETY"
        | b"LANGUAGE"
        | b"OTHER" => "content_filter",
        _ if called => "tool_calls",
        _ => "stop",
    }
}

/// The range of an array's first element, if it has one.
fn first_element(array: &[u8]) -> Option<Range<usize>> {
    let mut first = None;
    let _ = json::elements(array, |r| {
        first = Some(r);
        false
    });
    first
}

/// An in-stream `{"error": {"code", "message", "status"}}` as the final error event.
fn stream_error(e: &[u8]) -> Error {
    let [message] = fields(e, &[b"message"]);
    let message = message.and_then(|r| json::string_value(&e[r])).filter(|m| !m.is_empty());
    let message = message.unwrap_or_else(|| "The upstream stream failed.".to_owned());
    Error::in_stream("api_error", crate::error::clip(&message).to_owned())
}

fn malformed(what: &str) -> Error {
    Error::upstream_failure(Kind::UpstreamMalformed, format!("The upstream sent a malformed stream event: {what}."))
}

const TOP_NAMES: [&[u8]; 5] = [b"candidates", b"usageMetadata", b"modelVersion", b"promptFeedback", b"error"];
const CANDIDATES: usize = 0;
const USAGE: usize = 1;
const MODEL: usize = 2;
const PROMPT_FEEDBACK: usize = 3;
const ERROR: usize = 4;
