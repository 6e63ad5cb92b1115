//! Zero heap allocations per event in steady state on the translate path: decoder + Anthropic
//! translator + the body's feed step, counted by the binary's counting allocator (main.rs).
//! Counting is per thread, so tests running beside this one do not disturb it.

use crate::counting;
use bytes::Bytes;
use lmgate::body::Translating;
use lmgate::provider::anthropic::stream::Stream;
use std::collections::VecDeque;

fn event(kind: &str, json: &str) -> String {
    format!("event: {kind}\ndata: {json}\n\n")
}

/// A long stream of one kind of delta; returns (head, deltas, tail) as SSE text.
fn long_stream(block: &str, delta: impl Fn(usize) -> String, n: usize) -> (String, Vec<String>, String) {
    let head = event(
        "message_start",
        r#"{"type":"message_start","message":{"id":"msg_1","type":"message","role":"assistant","model":"claude-x","content":[],"usage":{"input_tokens":10,"output_tokens":1}}}"#,
    ) + &event(
        "content_block_start",
        &format!(r#"{{"type":"content_block_start","index":0,"content_block":{block}}}"#),
    );
    let deltas = (0..n).map(|i| event("content_block_delta", &delta(i))).collect();
    let tail = event("content_block_stop", r#"{"type":"content_block_stop","index":0}"#)
        + &event(
            "message_delta",
            r#"{"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":99}}"#,
        )
        + &event("message_stop", r#"{"type":"message_stop"}"#);
    (head, deltas, tail)
}

/// Feeds `bytes` in `chunk`-sized pieces, dropping the output as hyper would once written.
fn feed(t: &mut Translating, bytes: &[u8], chunk: usize, queue: &mut VecDeque<Bytes>) {
    for piece in bytes.chunks(chunk) {
        t.feed(piece, "test", queue).unwrap();
        queue.clear();
    }
}

#[test]
fn translating_allocates_nothing_per_event_in_steady_state() {
    let streams = [
        long_stream(
            r#"{"type":"text","text":""}"#,
            |i| {
                format!(
                    r#"{{"type":"content_block_delta","index":0,"delta":{{"type":"text_delta","text":"word {i:05} \"quoted\" \u00e9 "}}}}"#
                )
            },
            3000,
        ),
        long_stream(
            r#"{"type":"tool_use","id":"toolu_1","name":"f","input":{}}"#,
            |i| {
                format!(
                    r#"{{"type":"content_block_delta","index":0,"delta":{{"type":"input_json_delta","partial_json":"{{\"k{i:05}\": "}}}}"#
                )
            },
            3000,
        ),
        long_stream(
            r#"{"type":"thinking","thinking":"","signature":""}"#,
            |i| {
                format!(
                    r#"{{"type":"content_block_delta","index":0,"delta":{{"type":"thinking_delta","thinking":"step {i:05}, "}}}}"#
                )
            },
            3000,
        ),
    ];
    for (head, deltas, tail) in &streams {
        for chunk in [1, 64, 4096] {
            for include_usage in [false, true] {
                let mut t = Translating::new(Box::new(Stream::new(include_usage)));
                let mut queue = VecDeque::with_capacity(8);
                let warm: String = deltas[..500].concat();
                let measured: String = deltas[500..].concat();
                feed(&mut t, head.as_bytes(), chunk, &mut queue);
                feed(&mut t, warm.as_bytes(), chunk, &mut queue);
                let allocations = counting::count(|| feed(&mut t, measured.as_bytes(), chunk, &mut queue));
                feed(&mut t, tail.as_bytes(), chunk, &mut queue);
                assert!(t.done());
                let events = deltas.len() - 500;
                assert_eq!(
                    allocations, 0,
                    "{allocations} allocations over {events} events (chunk {chunk}, include_usage {include_usage}, head {head:.80})"
                );
            }
        }
    }
}

#[test]
fn the_counting_allocator_counts() {
    let n = counting::count(|| drop(std::hint::black_box(vec![1u8; 64])));
    assert_eq!(n, 1);
}
