//! Ollama `/api/chat` NDJSON → OpenAI translation against hand-written expectations
//! (tests/fixtures/ollama, `*.expected.jsonl`, written from the recorded lines and the mapping in
//! `src/provider/ollama/stream.rs`'s header, not produced by the translator), at whole, one-byte
//! and random chunkings, with and without the usage chunk; a last line without its LF; an
//! error line after the status was sent; and random streams (text with escapes, thinking, whole
//! tool calls) against a naive reference translation built with serde_json.

use crate::anthropic::{openai_events, random_cuts, translate_with, without_usage};
use lmgate::provider::ollama::stream::Stream;
use serde_json::Value;

fn fixture(name: &str) -> Vec<u8> {
    let path = format!("{}/tests/fixtures/ollama/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn translate(input: &[u8], cuts: &[usize], include_usage: bool) -> Vec<Value> {
    openai_events(&translate_with(Box::new(Stream::new(include_usage, "chatcmpl-test")), input, cuts))
}

fn chunkings(len: usize) -> Vec<(String, Vec<usize>)> {
    let mut c = vec![("whole".to_owned(), vec![]), ("1-byte".to_owned(), (1..len).collect())];
    c.extend((0..20).map(|seed| (format!("seed {seed}"), random_cuts(len, seed))));
    c
}

#[test]
fn recorded_chat_stream_translates_to_the_expected_chunks_at_any_chunking() {
    let input = fixture("api-chat-stream.ndjson");
    let want: Vec<Value> = String::from_utf8(fixture("api-chat-stream.expected.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // The same stream with its last line not terminated: EOF completes it.
    let unterminated = input.strip_suffix(b"\n").unwrap().to_vec();
    for input in [input, unterminated] {
        for include_usage in [true, false] {
            let want = if include_usage { want.clone() } else { without_usage(&want) };
            for (label, cuts) in chunkings(input.len()) {
                assert_eq!(translate(&input, &cuts, include_usage), want, "include_usage={include_usage}, {label}");
            }
        }
    }
}

#[test]
fn an_error_line_ends_the_stream_with_the_error_event_and_no_done() {
    let input = fixture("api-generate-stream-midstream-error.doc-example.ndjson");
    for (label, cuts) in chunkings(input.len()) {
        let got = translate(&input, &cuts, false);
        assert_eq!(got.len(), 2, "{label}: the role chunk, then the error: {got:?}");
        assert_eq!(got[0]["choices"][0]["delta"]["role"], "assistant", "{label}");
        assert_eq!(got[1]["error"]["message"], "an error was encountered while running the model", "{label}");
        assert!(!got.contains(&Value::String("[DONE]".into())), "{label}");
    }
}

#[test]
fn a_stream_cut_before_its_done_line_ends_with_an_error() {
    let input = fixture("api-chat-stream.ndjson");
    let cut = &input[..input.len() / 2];
    let cut = &cut[..cut.iter().rposition(|&b| b == b'\n').unwrap() + 1];
    let got = translate(cut, &[], false);
    let last = got.last().unwrap();
    assert!(last["error"]["message"].as_str().unwrap().contains("ended before it was complete"), "{last}");
}

/// A small deterministic generator (xorshift), so a failure names its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// Text with the characters that need care: quotes, backslashes, control characters,
    /// non-ASCII, and sometimes nothing.
    fn text(&mut self) -> String {
        const PIECES: &[&str] = &["a", " token", "\"", "\\", "\n", "\t", "é", "日本", "😀", "{}", "</s>", "\u{1}"];
        (0..self.below(5)).map(|_| PIECES[self.below(PIECES.len() as u64) as usize]).collect()
    }
}

/// A random `/api/chat` stream: lines with text, thinking and whole tool calls, then `done`.
fn random_stream(rng: &mut Rng) -> Vec<Value> {
    let mut lines = Vec::new();
    for _ in 0..rng.below(12) {
        let mut message = serde_json::json!({"role": "assistant", "content": rng.text()});
        if rng.below(4) == 0 {
            message["thinking"] = Value::String(rng.text());
        }
        if rng.below(5) == 0 {
            let calls: Vec<Value> = (0..1 + rng.below(2))
                .map(|_| {
                    let args =
                        serde_json::json!({"q": rng.text(), "n": rng.below(100), "list": [rng.text(), null, true]});
                    serde_json::json!({"function": {"name": format!("tool_{}", rng.below(3)), "arguments": args}})
                })
                .collect();
            message["tool_calls"] = Value::Array(calls);
        }
        lines.push(
            serde_json::json!({"model": "m", "created_at": "2025-01-01T00:00:00Z", "message": message, "done": false}),
        );
    }
    let reason = ["stop", "length", "load"][rng.below(3) as usize];
    let mut done = serde_json::json!({"model": "m", "message": {"role": "assistant", "content": ""}, "done": true, "done_reason": reason});
    if rng.below(2) == 0 {
        done["prompt_eval_count"] = Value::from(rng.below(1000));
    }
    done["eval_count"] = Value::from(rng.below(1000));
    lines.push(done);
    lines
}

/// The naive translation, from parsed lines and the mapping rules (module header of
/// `src/provider/ollama/stream.rs`): what the translator must produce, as JSON values.
fn reference(lines: &[Value], include_usage: bool) -> Vec<Value> {
    let chunk = |delta: Value, finish: Value| {
        let mut c = serde_json::json!({"id": "chatcmpl-test", "object": "chat.completion.chunk", "model": "m",
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]});
        if include_usage {
            c["usage"] = Value::Null;
        }
        c
    };
    let mut out = vec![chunk(serde_json::json!({"role": "assistant", "content": ""}), Value::Null)];
    let mut tools = 0u64;
    for line in lines {
        let m = &line["message"];
        for (key, to) in [("thinking", "reasoning_content"), ("content", "content")] {
            if let Some(t) = m[key].as_str().filter(|t| !t.is_empty()) {
                out.push(chunk(serde_json::json!({ to: t }), Value::Null));
            }
        }
        for call in m["tool_calls"].as_array().into_iter().flatten() {
            let f = &call["function"];
            out.push(chunk(
                serde_json::json!({"tool_calls": [{"index": tools, "id": format!("call_chatcmpl-test_{tools}"), "type": "function",
                    "function": {"name": f["name"], "arguments": f["arguments"].to_string()}}]}),
                Value::Null,
            ));
            tools += 1;
        }
        if line["done"] == true {
            let finish = match line["done_reason"].as_str() {
                Some("length") => "length",
                _ if tools > 0 => "tool_calls",
                _ => "stop",
            };
            out.push(chunk(serde_json::json!({}), Value::String(finish.into())));
            if include_usage {
                let (p, c) =
                    (line["prompt_eval_count"].as_u64().unwrap_or(0), line["eval_count"].as_u64().unwrap_or(0));
                out.push(serde_json::json!({"id": "chatcmpl-test", "object": "chat.completion.chunk", "model": "m", "choices": [],
                    "usage": {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}}));
            }
            out.push(Value::String("[DONE]".into()));
            break;
        }
    }
    out
}

#[test]
fn random_streams_match_the_naive_reference_at_random_chunkings() {
    for seed in 1..=300u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        let lines = random_stream(&mut rng);
        let input: Vec<u8> = lines.iter().flat_map(|l| format!("{l}\n").into_bytes()).collect();
        let include_usage = seed % 2 == 0;
        let cuts = random_cuts(input.len(), seed);
        let got = translate(&input, &cuts, include_usage);
        // Arguments are compared as JSON (the translator keeps the upstream's text).
        let normalise = |events: Vec<Value>| -> Vec<Value> {
            events
                .into_iter()
                .map(|mut e| {
                    if let Some(a) = e.pointer_mut("/choices/0/delta/tool_calls/0/function/arguments") {
                        *a = serde_json::from_str(a.as_str().unwrap()).unwrap();
                    }
                    e
                })
                .collect()
        };
        assert_eq!(normalise(got), normalise(reference(&lines, include_usage)), "seed {seed}: {input:?}");
    }
}
