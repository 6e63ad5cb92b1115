//! Gemini → OpenAI stream translation against hand-written expectations (tests/fixtures/gemini,
//! `*.expected.jsonl`, written from the recorded events and the mapping in
//! `src/provider/gemini/stream.rs`'s header, not produced by the translator), at whole,
//! one-byte and random chunkings, with and without the usage chunk; a stream closed before its
//! `finishReason`; a blocked prompt; an in-stream error; and random streams (text with escapes,
//! thoughts, whole function calls with and without signatures) against a naive reference
//! translation built with serde_json.

use crate::anthropic::{openai_events, random_cuts, translate_with, without_usage};
use lmgate::provider::gemini::stream::Stream;
use serde_json::{json, Value};

fn fixture(name: &str) -> Vec<u8> {
    let path = format!("{}/tests/fixtures/gemini/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The SSE bytes of a fixture: `.sse` as recorded, `.ndjson` framed as Gemini frames its events.
fn sse_bytes(name: &str) -> Vec<u8> {
    if name.ends_with(".sse") {
        return fixture(name);
    }
    let text = String::from_utf8(fixture(name)).unwrap();
    text.lines().filter(|l| !l.trim().is_empty()).flat_map(|l| format!("data: {l}\r\n\r\n").into_bytes()).collect()
}

/// Output events with each tool call's arguments parsed (the translator keeps Gemini's text).
fn translate(input: &[u8], cuts: &[usize], include_usage: bool) -> Vec<Value> {
    let out = translate_with(Box::new(Stream::new(include_usage, "chatcmpl-test")), input, cuts);
    normalise(openai_events(&out))
}

fn normalise(events: Vec<Value>) -> Vec<Value> {
    events
        .into_iter()
        .map(|mut e| {
            if let Some(a) = e.pointer_mut("/choices/0/delta/tool_calls/0/function/arguments") {
                *a = serde_json::from_str(a.as_str().unwrap()).unwrap();
            }
            e
        })
        .collect()
}

#[test]
fn recorded_streams_translate_to_the_expected_chunks_at_any_chunking() {
    for (name, expected) in [
        ("stream-text.sse", "stream-text.expected.jsonl"),
        ("stream-function-call.sse", "stream-function-call.expected.jsonl"),
        ("stream-function-call.ndjson", "stream-function-call-ndjson.expected.jsonl"),
    ] {
        let input = sse_bytes(name);
        let want: Vec<Value> = normalise(
            String::from_utf8(fixture(expected)).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect(),
        );
        for include_usage in [true, false] {
            let want = if include_usage { want.clone() } else { without_usage(&want) };
            let mut chunkings = vec![("whole".to_owned(), vec![]), ("1-byte".to_owned(), (1..input.len()).collect())];
            chunkings.extend((0..20).map(|seed| (format!("seed {seed}"), random_cuts(input.len(), seed))));
            for (label, cuts) in chunkings {
                assert_eq!(
                    translate(&input, &cuts, include_usage),
                    want,
                    "{name}, include_usage={include_usage}, {label}"
                );
            }
        }
    }
}

#[test]
fn the_thought_signature_rides_on_the_tool_call_id() {
    let got = translate(&sse_bytes("stream-function-call.sse"), &[], false);
    let id = got[1].pointer("/choices/0/delta/tool_calls/0/id").unwrap().as_str().unwrap();
    let (call, signature) = id.split_once('.').unwrap();
    assert_eq!(call, "call_chatcmpl-test_0");
    assert!(signature.starts_with("EpwICpkIAXLI2nxlU6gs") && signature.len() > 1000, "{signature}");
}

fn events(list: &[Value]) -> Vec<u8> {
    list.iter().flat_map(|e| format!("data: {e}\r\n\r\n").into_bytes()).collect()
}

#[test]
fn a_stream_closed_before_its_finish_reason_ends_with_an_error() {
    let input =
        events(&[json!({"candidates":[{"content":{"parts":[{"text":"Hel"}],"role":"model"}}],"modelVersion":"g"})]);
    let got = translate(&input, &[], false);
    assert_eq!(got[1]["choices"][0]["delta"]["content"], "Hel");
    assert!(got[2]["error"]["message"].as_str().unwrap().contains("ended before it was complete"), "{got:?}");
}

#[test]
fn a_blocked_prompt_is_a_content_filter_finish_and_errors_end_the_stream() {
    let input = events(&[json!({"promptFeedback":{"blockReason":"SAFETY"},
        "usageMetadata":{"promptTokenCount":7,"totalTokenCount":7},"modelVersion":"g"})]);
    let got = translate(&input, &[], true);
    assert_eq!(got[1]["choices"][0]["finish_reason"], "content_filter");
    assert_eq!(got[2]["usage"], json!({"prompt_tokens":7,"completion_tokens":0,"total_tokens":7}));
    assert_eq!(got[3], "[DONE]");

    let input = events(&[
        json!({"candidates":[{"content":{"parts":[{"text":"a","thought":true},{"text":"b"}]}}],"modelVersion":"g"}),
        json!({"error":{"code":500,"message":"Internal error encountered.","status":"INTERNAL"}}),
    ]);
    let got = translate(&input, &[], false);
    assert_eq!(got[1]["choices"][0]["delta"], json!({"reasoning_content":"a"}));
    assert_eq!(got[2]["choices"][0]["delta"], json!({"content":"b"}));
    assert_eq!(got[3]["error"]["message"], "Internal error encountered.");
    assert_eq!(got.len(), 4);
}

#[test]
fn finish_reasons_and_usage_with_thoughts_and_cache() {
    for (reason, called, want) in [
        ("STOP", false, "stop"),
        ("STOP", true, "tool_calls"),
        ("MAX_TOKENS", true, "length"),
        ("SAFETY", false, "content_filter"),
        ("RECITATION", false, "content_filter"),
        ("MALFORMED_FUNCTION_CALL", false, "stop"),
        ("FINISH_REASON_UNSPECIFIED", false, "stop"),
    ] {
        let mut parts = vec![json!({"text":"x"})];
        if called {
            parts.push(json!({"functionCall":{"name":"f","args":{"a":[1,"\"q\""]}}}));
        }
        let input = events(&[json!({"candidates":[{"content":{"parts":parts},"finishReason":reason}],
            "usageMetadata":{"promptTokenCount":10,"candidatesTokenCount":3,"thoughtsTokenCount":5,"cachedContentTokenCount":4}})]);
        let got = translate(&input, &[], true);
        let finish = got.iter().find_map(|e| e.pointer("/choices/0/finish_reason").and_then(Value::as_str)).unwrap();
        assert_eq!(finish, want, "{reason}");
        let usage = got.iter().find(|e| e["choices"] == json!([])).unwrap();
        assert_eq!(
            usage["usage"],
            json!({"prompt_tokens":10,"completion_tokens":8,"total_tokens":18,"prompt_tokens_details":{"cached_tokens":4}})
        );
    }
}

/// A small deterministic generator (xorshift), so a failure names its seed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }

    /// Text with the characters that need care.
    fn text(&mut self) -> String {
        const PIECES: &[&str] = &["a", " token", "\"", "\\", "\n", "\r\n", "é", "日本", "😀", "data: x", "\u{1}"];
        (0..self.below(5)).map(|_| PIECES[self.below(PIECES.len() as u64) as usize]).collect()
    }
}

/// A random Gemini stream: events with text, thoughts and whole function calls (some with a
/// signature), cumulative usage, the last with a finish reason.
fn random_stream(rng: &mut Rng) -> Vec<Value> {
    let n = 1 + rng.below(10);
    let mut prompt_tokens = 5;
    (0..n)
        .map(|i| {
            let parts: Vec<Value> = (0..1 + rng.below(3))
                .map(|_| match rng.below(4) {
                    0 => json!({"text": rng.text(), "thought": true}),
                    1 => {
                        let mut p = json!({"functionCall": {"name": format!("f{}", rng.below(3)),
                            "args": {"q": rng.text(), "n": rng.below(9), "l": [null, true, rng.text()]}}});
                        if rng.below(2) == 0 {
                            p["thoughtSignature"] = Value::String(format!("U2ln{}", rng.below(1000)));
                        }
                        p
                    }
                    _ => json!({"text": rng.text()}),
                })
                .collect();
            prompt_tokens += rng.below(3);
            let mut candidate = json!({"content": {"parts": parts, "role": "model"}, "index": 0});
            if i + 1 == n {
                candidate["finishReason"] = json!(["STOP", "MAX_TOKENS", "SAFETY", "OTHER", "MALFORMED_FUNCTION_CALL"][rng.below(5) as usize]);
            }
            json!({"candidates": [candidate], "modelVersion": "gemini-x", "responseId": "r",
                "usageMetadata": {"promptTokenCount": prompt_tokens, "candidatesTokenCount": i, "thoughtsTokenCount": 2 * i}})
        })
        .collect()
}

/// The naive translation, from parsed events and the mapping rules in the translator's header.
fn reference(events: &[Value], include_usage: bool) -> Vec<Value> {
    let chunk = |delta: Value, finish: Value| {
        let mut c = json!({"id": "chatcmpl-test", "object": "chat.completion.chunk", "model": "gemini-x",
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]});
        if include_usage {
            c["usage"] = Value::Null;
        }
        c
    };
    let mut out = vec![chunk(json!({"role": "assistant", "content": ""}), Value::Null)];
    let mut tools = 0u64;
    for e in events {
        let c = &e["candidates"][0];
        for p in c["content"]["parts"].as_array().unwrap() {
            if let Some(t) = p["text"].as_str().filter(|t| !t.is_empty()) {
                let key = if p["thought"] == true { "reasoning_content" } else { "content" };
                out.push(chunk(json!({ key: t }), Value::Null));
            }
            if let Some(f) = p.get("functionCall") {
                let mut id = format!("call_chatcmpl-test_{tools}");
                if let Some(s) = p["thoughtSignature"].as_str() {
                    id = format!("{id}.{s}");
                }
                out.push(chunk(
                    json!({"tool_calls": [{"index": tools, "id": id, "type": "function",
                        "function": {"name": f["name"], "arguments": f["args"]}}]}),
                    Value::Null,
                ));
                tools += 1;
            }
        }
        if let Some(reason) = c["finishReason"].as_str() {
            let finish = match reason {
                "MAX_TOKENS" => "length",
                "SAFETY" | "OTHER" => "content_filter",
                _ if tools > 0 => "tool_calls",
                _ => "stop",
            };
            out.push(chunk(json!({}), json!(finish)));
            if include_usage {
                let u = &e["usageMetadata"];
                let p = u["promptTokenCount"].as_u64().unwrap();
                let c = u["candidatesTokenCount"].as_u64().unwrap() + u["thoughtsTokenCount"].as_u64().unwrap();
                out.push(
                    json!({"id": "chatcmpl-test", "object": "chat.completion.chunk", "model": "gemini-x", "choices": [],
                    "usage": {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}}),
                );
            }
            out.push(json!("[DONE]"));
        }
    }
    out
}

#[test]
fn random_streams_match_the_naive_reference_at_random_chunkings() {
    for seed in 1..=300u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        let stream = random_stream(&mut rng);
        let input = events(&stream);
        let include_usage = seed % 2 == 1;
        let got = translate(&input, &random_cuts(input.len(), seed), include_usage);
        assert_eq!(got, reference(&stream, include_usage), "seed {seed}: {}", String::from_utf8_lossy(&input));
    }
}
