//! Ollama `/api/chat` NDJSON → OpenAI translation against hand-written expectations
//! (tests/fixtures/ollama, `*.expected.jsonl`, written from the recorded lines and the mapping in
//! `src/provider/ollama/stream.rs`'s header, not produced by the translator), at whole, one-byte
//! and random chunkings, with and without the usage chunk; a last line without its LF; an
//! error line after the status was sent.

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
