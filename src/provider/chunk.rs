//! OpenAI stream chunks and usage objects, written as bytes: the one writer shared by every
//! translator and the mock.
//!
//! A chunk is `data: {"id":..,"object":..,"created":..,"model":..,"choices":[...]}` followed by a
//! blank line (<https://platform.openai.com/docs/api-reference/chat-streaming>). Everything up to
//! `"choices":[` is the same for every chunk of a response, so it is rendered once ([`Prefix`])
//! and copied per chunk; a chunk then costs a few slice copies and no allocation. When the client
//! asked for `stream_options.include_usage`, every chunk carries `"usage":null` and one last chunk
//! with empty `choices` carries the usage.

use crate::json::Usage;
use bytes::BufMut;

/// The rendered head of every chunk of one response, up to and including `"choices":[`.
#[derive(Debug, Clone, Default)]
pub struct Prefix {
    bytes: Vec<u8>,
}

impl Prefix {
    /// Renders the head for `object` (`chat.completion.chunk`, `text_completion`) with `id` and
    /// `model` given as JSON string tokens (quotes included) and `created` in Unix seconds. Reuses
    /// the allocation of a previous head.
    pub fn set(&mut self, object: &str, id: &[u8], created: u64, model: &[u8]) {
        let b = &mut self.bytes;
        b.clear();
        b.extend_from_slice(b"data: {\"id\":");
        b.extend_from_slice(id);
        b.extend_from_slice(b",\"object\":\"");
        b.extend_from_slice(object.as_bytes());
        b.extend_from_slice(b"\",\"created\":");
        b.extend_from_slice(itoa(created).as_bytes());
        b.extend_from_slice(b",\"model\":");
        b.extend_from_slice(model);
        b.extend_from_slice(b",\"choices\":[");
    }

    /// One chunk whose `choices` list holds `choice` (the concatenated parts of one choice
    /// object; none for an empty list), with `"usage":null` when `usage_null`.
    pub fn chunk<'a>(&self, out: &mut impl BufMut, choice: impl IntoIterator<Item = &'a [u8]>, usage_null: bool) {
        out.put_slice(&self.bytes);
        for part in choice {
            out.put_slice(part);
        }
        out.put_u8(b']');
        if usage_null {
            out.put_slice(b",\"usage\":null");
        }
        out.put_slice(b"}\n\n");
    }

    /// The usage chunk: empty `choices` and the usage object ([`write_usage`]).
    pub fn usage_chunk(&self, out: &mut impl BufMut, usage: Usage, cached: Option<u64>) {
        out.put_slice(&self.bytes);
        out.put_slice(b"],\"usage\":");
        write_usage(out, usage, cached);
        out.put_slice(b"}\n\n");
    }
}

/// The chat choice of a stream chunk: `{"index":0,"delta":DELTA,"logprobs":null,"finish_reason":..}`
/// as parts for [`Prefix::chunk`], `delta` being the parts of a JSON object text.
pub fn write_delta_chunk(
    prefix: &Prefix,
    out: &mut impl BufMut,
    delta: &[&[u8]],
    finish: Option<&str>,
    usage_null: bool,
) {
    let finish: &[&[u8]] = match finish {
        Some(f) => &[b",\"logprobs\":null,\"finish_reason\":\"", f.as_bytes(), b"\"}"],
        None => &[b",\"logprobs\":null,\"finish_reason\":null}"],
    };
    let head: &[u8] = b"{\"index\":0,\"delta\":";
    let parts = std::iter::once(head).chain(delta.iter().copied()).chain(finish.iter().copied());
    prefix.chunk(out, parts, usage_null);
}

/// An OpenAI usage object: `{"prompt_tokens":P,"completion_tokens":C,"total_tokens":P+C}`, with
/// `"prompt_tokens_details":{"cached_tokens":N}` when the provider reports cache reads.
pub fn write_usage(out: &mut impl BufMut, usage: Usage, cached: Option<u64>) {
    out.put_slice(b"{\"prompt_tokens\":");
    out.put_slice(itoa(usage.prompt).as_bytes());
    out.put_slice(b",\"completion_tokens\":");
    out.put_slice(itoa(usage.completion).as_bytes());
    out.put_slice(b",\"total_tokens\":");
    // Saturating: counts come from the upstream, and a hostile one may send u64::MAX.
    out.put_slice(itoa(usage.prompt.saturating_add(usage.completion)).as_bytes());
    if let Some(n) = cached {
        out.put_slice(b",\"prompt_tokens_details\":{\"cached_tokens\":");
        out.put_slice(itoa(n).as_bytes());
        out.put_u8(b'}');
    }
    out.put_u8(b'}');
}

/// A whole (non-stream) answer, rendered as an OpenAI `chat.completion`
/// (<https://platform.openai.com/docs/api-reference/chat/object>) by [`Completion::render`].
pub struct Completion<'a> {
    /// The response id.
    pub id: &'a str,
    /// The model that answered.
    pub model: &'a str,
    /// The text (`content`; `null` when empty and there are tool calls).
    pub text: &'a str,
    /// Reasoning, as `reasoning_content` when not empty.
    pub thinking: &'a str,
    /// Tool calls: id, function name, arguments as a JSON object text (none: `{}`).
    pub calls: Vec<(String, &'a str, Option<&'a [u8]>)>,
    /// The finish reason.
    pub finish: &'a str,
    /// Token usage, and the cached part to report.
    pub usage: Usage,
    /// `prompt_tokens_details.cached_tokens`, when reported.
    pub cached: Option<u64>,
}

impl Completion<'_> {
    /// The JSON body; `None` when arguments are not UTF-8. `size` hints the capacity.
    pub fn render(&self, size: usize) -> Option<Vec<u8>> {
        use crate::json::write_str;
        let mut out = Vec::with_capacity(size + 256);
        out.extend_from_slice(b"{\"id\":");
        write_str(&mut out, self.id);
        out.extend_from_slice(b",\"object\":\"chat.completion\",\"created\":");
        out.extend_from_slice(itoa(crate::provider::unix_now()).as_bytes());
        out.extend_from_slice(b",\"model\":");
        write_str(&mut out, self.model);
        out.extend_from_slice(b",\"choices\":[{\"index\":0,\"message\":{\"role\":\"assistant\",\"content\":");
        if self.text.is_empty() && !self.calls.is_empty() {
            out.extend_from_slice(b"null");
        } else {
            write_str(&mut out, self.text);
        }
        if !self.thinking.is_empty() {
            out.extend_from_slice(b",\"reasoning_content\":");
            write_str(&mut out, self.thinking);
        }
        if !self.calls.is_empty() {
            out.extend_from_slice(b",\"tool_calls\":[");
            for (k, (id, name, args)) in self.calls.iter().enumerate() {
                if k > 0 {
                    out.push(b',');
                }
                out.extend_from_slice(b"{\"id\":");
                write_str(&mut out, id);
                out.extend_from_slice(b",\"type\":\"function\",\"function\":{\"name\":");
                write_str(&mut out, name);
                out.extend_from_slice(b",\"arguments\":");
                // The arguments object, rendered compactly in its key order, as a string.
                let args = args.filter(|a| *a != b"null").unwrap_or(b"{}");
                write_str(&mut out, std::str::from_utf8(args).ok()?);
                out.extend_from_slice(b"}}");
            }
            out.push(b']');
        }
        out.extend_from_slice(b"},\"logprobs\":null,\"finish_reason\":\"");
        out.extend_from_slice(self.finish.as_bytes());
        out.extend_from_slice(b"\"}],\"usage\":");
        write_usage(&mut out, self.usage, self.cached);
        out.push(b'}');
        Some(out)
    }
}

/// The chunks of one translated chat stream whose provider sends tool calls whole (Ollama,
/// Gemini): the role chunk, deltas, one complete `tool_calls` delta per call, and the end (finish
/// chunk, usage chunk when asked for, `[DONE]`). Allocates at construction and while its
/// scratch buffer grows to the largest tool call, never per chunk after that.
pub struct Whole {
    include_usage: bool,
    /// The response id as a JSON string token; tool calls without an id of their own are named
    /// after it.
    id: Vec<u8>,
    prefix: Prefix,
    created: u64,
    /// Tool calls sent so far.
    pub tools: u32,
    /// Reused for one tool call's id and arguments.
    scratch: Vec<u8>,
}

impl Whole {
    /// Chunks of response `id` (`chatcmpl-...`); `include_usage` is whether the client asked for
    /// the usage chunk. The model is `"unknown"` until [`Whole::start`] names it.
    pub fn new(include_usage: bool, id: &str) -> Self {
        let mut token = Vec::with_capacity(id.len() + 2);
        crate::json::write_str(&mut token, id);
        let mut w = Whole {
            include_usage,
            id: token,
            prefix: Prefix::default(),
            created: crate::provider::unix_now(),
            tools: 0,
            scratch: Vec::new(),
        };
        w.prefix.set("chat.completion.chunk", &w.id, w.created, b"\"unknown\"");
        w
    }

    /// The role chunk, after naming the model when `model` is a string token of sane length.
    pub fn start(&mut self, model: Option<&[u8]>, out: &mut impl BufMut) {
        if let Some(model) = model.filter(|m| m.first() == Some(&b'"') && m.len() <= 512) {
            self.prefix.set("chat.completion.chunk", &self.id, self.created, model);
        }
        self.delta(out, &[b"{\"role\":\"assistant\",\"content\":\"\"}"], None);
    }

    /// One chunk with `delta` (the parts of a JSON object text) and a finish reason.
    pub fn delta(&self, out: &mut impl BufMut, delta: &[&[u8]], finish: Option<&str>) {
        write_delta_chunk(&self.prefix, out, delta, finish, self.include_usage);
    }

    /// One whole tool call as one delta: `name` a JSON string token, `args` the arguments as a
    /// JSON object text (or already a string token; none: `{}`), the id the provider's own
    /// (`own_id`, a string token) or `call_{response id}_{k}`, followed by `.` and `suffix`
    /// (text safe inside a JSON string) when given. The error says what is malformed.
    pub fn tool_call(
        &mut self,
        out: &mut impl BufMut,
        own_id: Option<&[u8]>,
        suffix: Option<&[u8]>,
        name: &[u8],
        args: Option<&[u8]>,
    ) -> Result<(), &'static str> {
        let k = itoa(u64::from(self.tools));
        let s = &mut self.scratch;
        s.clear();
        match own_id.filter(|t| t.first() == Some(&b'"') && t.len() > 2 && t.len() <= 512) {
            Some(id) => s.extend_from_slice(&id[..id.len() - 1]),
            None => {
                s.extend_from_slice(b"\"call_");
                s.extend_from_slice(&self.id[1..self.id.len() - 1]);
                s.push(b'_');
                s.extend_from_slice(k.as_bytes());
            }
        }
        if let Some(suffix) = suffix {
            s.push(b'.');
            s.extend_from_slice(suffix);
        }
        s.push(b'"');
        let id_end = s.len();
        match args {
            Some(a) if a.first() == Some(&b'"') => s.extend_from_slice(a),
            Some(a) if a.first() == Some(&b'{') => write_as_string(s, a),
            None | Some(b"null") => s.extend_from_slice(b"\"{}\""),
            Some(_) => return Err("the arguments are not an object"),
        }
        self.tools += 1;
        let (id, args) = self.scratch.split_at(id_end);
        let delta: [&[u8]; 9] = [
            b"{\"tool_calls\":[{\"index\":",
            k.as_bytes(),
            b",\"id\":",
            id,
            b",\"type\":\"function\",\"function\":{\"name\":",
            name,
            b",\"arguments\":",
            args,
            b"}}]}",
        ];
        self.delta(out, &delta, None);
        Ok(())
    }

    /// The end: the finish chunk, the usage chunk when asked for, `[DONE]`.
    pub fn end(&self, out: &mut impl BufMut, finish: &str, usage: Usage) {
        self.delta(out, &[b"{}"], Some(finish));
        if self.include_usage {
            self.prefix.usage_chunk(out, usage, (usage.cached > 0).then_some(usage.cached));
        }
        out.put_slice(b"data: [DONE]\n\n");
    }
}

/// `value`, a JSON text validated by the scanner, as a JSON string token: quotes and
/// backslashes escaped, and the whitespace allowed between tokens (`\n`, `\r`, `\t`) too, since
/// a string may not hold them raw. Control characters cannot occur elsewhere in valid JSON text.
pub fn write_as_string(out: &mut Vec<u8>, value: &[u8]) {
    out.push(b'"');
    let mut from = 0;
    for (i, &b) in value.iter().enumerate() {
        let escaped: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            _ => continue,
        };
        out.extend_from_slice(&value[from..i]);
        out.extend_from_slice(escaped);
        from = i + 1;
    }
    out.extend_from_slice(&value[from..]);
    out.push(b'"');
}

/// Decimal digits of a number in a stack buffer.
pub struct Digits {
    buf: [u8; 20],
    start: usize,
}

impl Digits {
    /// The digits.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[self.start..]
    }
}

/// The decimal digits of `n`, without allocating.
pub fn itoa(mut n: u64) -> Digits {
    let mut d = Digits { buf: [0; 20], start: 20 };
    loop {
        d.start -= 1;
        d.buf[d.start] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return d;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn events(out: &[u8]) -> Vec<Value> {
        let text = std::str::from_utf8(out).unwrap();
        assert!(text.ends_with("\n\n"));
        text.split_terminator("\n\n")
            .map(|e| serde_json::from_str(e.strip_prefix("data: ").unwrap()).unwrap())
            .collect()
    }

    #[test]
    fn chunks_delta_chunks_and_the_usage_chunk_are_openai_chunks() {
        let mut p = Prefix::default();
        p.set("chat.completion.chunk", b"\"chatcmpl-1\"", 7, b"\"m\\\"x\"");
        let mut out = Vec::new();
        p.chunk(&mut out, [&b"{\"index\":0,\"delta\":{\"role\":\"assistant\"}"[..], b",\"finish_reason\":null}"], true);
        write_delta_chunk(&p, &mut out, &[b"{\"content\":", b"\"hi\"", b"}"], None, false);
        write_delta_chunk(&p, &mut out, &[b"{}"], Some("stop"), true);
        p.usage_chunk(&mut out, Usage { prompt: 3, completion: 4, ..Usage::default() }, Some(1));
        p.usage_chunk(
            &mut out,
            Usage { prompt: 0, completion: 18_446_744_073_709_551_615 - 1, ..Usage::default() },
            None,
        );
        let head = json!({"id":"chatcmpl-1","object":"chat.completion.chunk","created":7,"model":"m\"x"});
        let with = |extra: Value| {
            let mut v = head.clone();
            v.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
            v
        };
        assert_eq!(
            events(&out),
            vec![
                with(json!({"choices":[{"index":0,"delta":{"role":"assistant"},"finish_reason":null}],"usage":null})),
                with(json!({"choices":[{"index":0,"delta":{"content":"hi"},"logprobs":null,"finish_reason":null}]})),
                with(json!({"choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}],"usage":null})),
                with(json!({"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7,
                    "prompt_tokens_details":{"cached_tokens":1}}})),
                with(json!({"choices":[],"usage":{"prompt_tokens":0,"completion_tokens":18_446_744_073_709_551_614u64,
                    "total_tokens":18_446_744_073_709_551_614u64}})),
            ]
        );
    }

    #[test]
    fn digits_are_decimal() {
        for n in [0, 7, 10, 99, 1234567890, u64::MAX] {
            assert_eq!(itoa(n).as_bytes(), n.to_string().as_bytes());
        }
    }
}
