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
