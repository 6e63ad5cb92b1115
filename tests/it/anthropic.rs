//! Anthropic → OpenAI translation against hand-written expectations (tests/fixtures/anthropic,
//! `*.expected.*`, written from the fixtures and the mapping rules before the translator
//! existed), at whole, one-byte and random chunkings; plus checks that need no expectation:
//! the text deltas add up to the provider's text, and each tool call's arguments are JSON-equal
//! to the provider's tool input.

use bytes::BytesMut;
use lmgate::body::Translating;
use lmgate::provider::anthropic::{self, stream::Stream};
use lmgate::provider::Translate;
use serde_json::Value;
use std::collections::BTreeMap;

/// Every Anthropic stream fixture.
pub(crate) const STREAMS: &[&str] = &[
    "stream-text.ndjson",
    "stream-thinking.sse",
    "stream-thinking-signature.ndjson",
    "stream-tool-use.ndjson",
    "stream-tool-no-args.ndjson",
    "stream-error-overloaded.sse",
];

pub(crate) fn fixture(name: &str) -> Vec<u8> {
    let path = format!("{}/tests/fixtures/anthropic/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The provider's event payloads, in order, read without the code under test.
fn provider_events(name: &str) -> Vec<Value> {
    let text = String::from_utf8(fixture(name)).unwrap();
    let lines: Vec<&str> = if name.ends_with(".ndjson") {
        text.lines().filter(|l| !l.trim().is_empty()).collect()
    } else {
        text.lines().filter_map(|l| l.strip_prefix("data:")).map(str::trim).collect()
    };
    lines.iter().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// The raw SSE bytes of a stream fixture: `.sse` as recorded; `.ndjson` payloads framed the way
/// Anthropic frames them (`event: <type>` then `data: <json>`).
pub(crate) fn sse_bytes(name: &str) -> Vec<u8> {
    if name.ends_with(".sse") {
        return fixture(name);
    }
    let mut out = Vec::new();
    for line in String::from_utf8(fixture(name)).unwrap().lines().filter(|l| !l.trim().is_empty()) {
        let v: Value = serde_json::from_str(line).unwrap();
        out.extend_from_slice(format!("event: {}\ndata: {line}\n\n", v["type"].as_str().unwrap()).as_bytes());
    }
    out
}

/// Deterministic split points (xorshift), so a failure names its seed.
pub(crate) fn random_cuts(len: usize, seed: u64) -> Vec<usize> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut cuts: Vec<usize> = (0..(len / 40).max(1))
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s % len as u64) as usize
        })
        .collect();
    cuts.sort_unstable();
    cuts.dedup();
    cuts
}

/// Translates `input` cut at `cuts`, as the body does: output buffers, then the final error
/// event if the translator failed.
fn translate(input: &[u8], cuts: &[usize], include_usage: bool) -> Vec<u8> {
    translate_with(Box::new(Stream::new(include_usage)), input, cuts)
}

/// Feeds `input` cut at `cuts` to `translator` as the body does, then the end of the stream;
/// the output, with the final error event if the translator failed.
pub(crate) fn translate_with(translator: Box<dyn Translate>, input: &[u8], cuts: &[usize]) -> Vec<u8> {
    let mut t = Translating::new(translator);
    let mut out = BytesMut::new();
    let mut at = 0;
    for &end in cuts.iter().chain(std::iter::once(&input.len())) {
        if let Err(e) = t.feed(&input[at..end], "test", &mut out) {
            out.extend_from_slice(&e.to_sse());
            return out.to_vec();
        }
        at = end;
        if t.done() {
            return out.to_vec();
        }
    }
    if let Err(e) = t.finish("test", &mut out) {
        out.extend_from_slice(&e.to_sse());
    }
    out.to_vec()
}

/// The OpenAI events of an output: `data` payloads as JSON (`[DONE]` as a string), with
/// `created` checked (one integer for the whole stream) and removed.
pub(crate) fn openai_events(out: &[u8]) -> Vec<Value> {
    let mut dec = lmgate::sse::Decoder::new(1 << 20);
    let mut events = Vec::new();
    dec.feed(out, |e| {
        assert!(e.event.is_empty(), "OpenAI streams carry no event names");
        let data = std::str::from_utf8(e.data).unwrap();
        events.push(if data == "[DONE]" {
            Value::String(data.into())
        } else {
            serde_json::from_str(data).unwrap_or_else(|err| panic!("not JSON: {data}: {err}"))
        });
    })
    .unwrap();
    let mut created = None;
    for e in &mut events {
        if let Some(obj) = e.as_object_mut() {
            if let Some(c) = obj.remove("created") {
                assert!(c.is_u64(), "created must be an integer");
                assert_eq!(*created.get_or_insert(c.clone()), c, "created changes within a stream");
            }
        }
    }
    events
}

fn expected(name: &str) -> Vec<Value> {
    let stem = name.rsplit_once('.').unwrap().0;
    String::from_utf8(fixture(&format!("{stem}.expected.jsonl")))
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The expectation for a client that did not ask for usage: no `usage` keys, no usage chunk.
pub(crate) fn without_usage(events: &[Value]) -> Vec<Value> {
    events
        .iter()
        .filter(|e| e.get("choices").and_then(Value::as_array).is_none_or(|c| !c.is_empty()))
        .map(|e| {
            let mut e = e.clone();
            if let Some(o) = e.as_object_mut() {
                o.remove("usage");
            }
            e
        })
        .collect()
}

#[test]
fn anthropic_streams_translate_to_the_expected_openai_chunks_at_any_chunking() {
    for name in STREAMS {
        let input = sse_bytes(name);
        let want = expected(name);
        for include_usage in [true, false] {
            let want = if include_usage { want.clone() } else { without_usage(&want) };
            let mut chunkings: Vec<(String, Vec<usize>)> =
                vec![("whole".into(), vec![]), ("1-byte".into(), (1..input.len()).collect())];
            chunkings.extend((0..20).map(|seed| (format!("seed {seed}"), random_cuts(input.len(), seed))));
            for (label, cuts) in chunkings {
                let got = openai_events(&translate(&input, &cuts, include_usage));
                assert_eq!(got, want, "{name}, include_usage={include_usage}, chunking {label}");
            }
        }
    }
}

#[test]
fn streamed_text_and_tool_arguments_match_the_provider_independently() {
    for name in STREAMS {
        let provider = provider_events(name);
        let mut text = String::new();
        let mut tool_args: BTreeMap<u64, String> = BTreeMap::new(); // by Anthropic block index
        let mut tool_blocks = Vec::new();
        for e in &provider {
            match e["type"].as_str() {
                Some("content_block_start") if e["content_block"]["type"] == "tool_use" => {
                    tool_blocks.push(e["index"].as_u64().unwrap());
                }
                Some("content_block_delta") => {
                    let d = &e["delta"];
                    match d["type"].as_str() {
                        Some("text_delta") => text.push_str(d["text"].as_str().unwrap()),
                        Some("input_json_delta") => tool_args
                            .entry(e["index"].as_u64().unwrap())
                            .or_default()
                            .push_str(d["partial_json"].as_str().unwrap()),
                        _ => {}
                    }
                }
                _ => {}
            }
        }
        let out = openai_events(&translate(&sse_bytes(name), &[], false));
        let mut got_text = String::new();
        let mut got_args: BTreeMap<u64, String> = BTreeMap::new(); // by OpenAI tool index
        for e in &out {
            let Some(delta) = e.pointer("/choices/0/delta") else { continue };
            if let Some(c) = delta.get("content").and_then(Value::as_str) {
                got_text.push_str(c);
            }
            for call in delta.get("tool_calls").and_then(Value::as_array).into_iter().flatten() {
                let k = call["index"].as_u64().unwrap();
                let piece = call.pointer("/function/arguments").and_then(Value::as_str).unwrap_or("");
                got_args.entry(k).or_default().push_str(piece);
            }
        }
        assert_eq!(got_text, text, "{name}: text");
        assert_eq!(got_args.len(), tool_blocks.len(), "{name}: one OpenAI tool call per tool_use block");
        for (k, block) in tool_blocks.iter().enumerate() {
            let provider_args = tool_args.get(block).map_or("", String::as_str);
            let provider_input: Value =
                serde_json::from_str(if provider_args.is_empty() { "{}" } else { provider_args }).unwrap();
            let ours: Value = serde_json::from_str(&got_args[&(k as u64)]).unwrap();
            assert_eq!(ours, provider_input, "{name}: tool {k} arguments");
        }
    }
}

#[test]
fn anthropic_messages_translate_to_the_expected_chat_completion() {
    for name in ["messages-text.json", "messages-tool-use.json", "messages-text-and-tool-use.json"] {
        let (out, usage) = anthropic::message(&fixture(name)).expect("translates");
        let mut got: Value = serde_json::from_slice(&out).unwrap();
        assert!(got["created"].is_u64());
        got.as_object_mut().unwrap().remove("created");
        let mut want: Value = serde_json::from_slice(&fixture(&name.replace(".json", ".expected.json"))).unwrap();
        // Arguments are JSON strings: compare what they encode.
        for v in [&mut got, &mut want] {
            if let Some(calls) = v.pointer_mut("/choices/0/message/tool_calls").and_then(Value::as_array_mut) {
                for c in calls {
                    let args = c["function"]["arguments"].as_str().unwrap().to_owned();
                    c["function"]["arguments"] = serde_json::from_str(&args).unwrap();
                }
            }
        }
        assert_eq!(got, want, "{name}");
        assert_eq!(usage.prompt, want["usage"]["prompt_tokens"].as_u64().unwrap(), "{name}");
        assert_eq!(usage.completion, want["usage"]["completion_tokens"].as_u64().unwrap(), "{name}");
    }
}

#[test]
fn anthropic_error_statuses_map_to_openai_errors() {
    for (name, upstream_status) in
        [("error-not-found.json", 404), ("error-invalid-request.json", 400), ("error-overloaded-529.json", 529)]
    {
        let status = http::StatusCode::from_u16(upstream_status).unwrap();
        let e = anthropic::error_of("anthropic", status, &fixture(name));
        let want: Value = serde_json::from_slice(&fixture(&name.replace(".json", ".expected.json"))).unwrap();
        assert_eq!(e.status.as_u16() as u64, want["status"].as_u64().unwrap(), "{name}");
        let body: Value = serde_json::from_slice(&e.to_json()).unwrap();
        assert_eq!(body, want["body"], "{name}");
    }
    // The gateway's own key rejected: 502, and nothing of the upstream body is echoed.
    let e = anthropic::error_of(
        "anthropic",
        http::StatusCode::UNAUTHORIZED,
        br#"{"type":"error","error":{"type":"authentication_error","message":"invalid x-api-key sk-ant-abc"}}"#,
    );
    assert_eq!(e.status, 502);
    assert!(!e.message.contains("sk-ant"));
}
