//! Zero heap allocations per event in steady state on the translate path, counted by the
//! binary's counting allocator (main.rs): decoder + Anthropic translator + the body's feed step
//! over synthetic streams and over every recorded stream fixture, and the response body's whole
//! poll loop (`Body::passthrough_from` with a scripted upstream body) over the fixtures.
//! Counting is per thread, so tests running beside these do not disturb them.

use crate::anthropic::{sse_bytes, STREAMS};
use crate::counting;
use bytes::{Bytes, BytesMut};
use http_body::{Body as _, Frame};
use lmgate::body::{Body, Mode, Translating};
use lmgate::provider::anthropic::stream::Stream;
use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

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
fn feed(t: &mut Translating, bytes: &[u8], chunk: usize, out: &mut BytesMut) {
    for piece in bytes.chunks(chunk) {
        t.feed(piece, "test", out).unwrap();
        drop(out.split().freeze());
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
                let mut out = BytesMut::new();
                let warm: String = deltas[..500].concat();
                let measured: String = deltas[500..].concat();
                feed(&mut t, head.as_bytes(), chunk, &mut out);
                feed(&mut t, warm.as_bytes(), chunk, &mut out);
                let allocations = counting::count(|| feed(&mut t, measured.as_bytes(), chunk, &mut out));
                feed(&mut t, tail.as_bytes(), chunk, &mut out);
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

/// A recorded stream cut into what can repeat: `head` (up to `message_start`), `middle` (the
/// content blocks, pings included) and `tail` (`message_delta`, `message_stop`, `error`).
struct Recorded {
    head: Vec<u8>,
    middle: Vec<u8>,
    tail: Vec<u8>,
}

fn recorded(name: &str) -> Recorded {
    let bytes = sse_bytes(name);
    let text = String::from_utf8(bytes).unwrap();
    let mut r = Recorded { head: Vec::new(), middle: Vec::new(), tail: Vec::new() };
    for event in text.split_inclusive("\n\n") {
        let data = event.lines().find_map(|l| l.strip_prefix("data:")).unwrap_or_else(|| panic!("{name}: {event:?}"));
        let v: serde_json::Value = serde_json::from_str(data.trim()).unwrap();
        let part = match v["type"].as_str() {
            Some("message_start") => &mut r.head,
            Some("message_delta" | "message_stop" | "error") => &mut r.tail,
            _ => &mut r.middle,
        };
        part.extend_from_slice(event.as_bytes());
    }
    r
}

/// Output events (blank-line ends) in `b`, counted without allocating.
fn events_in(b: &[u8]) -> usize {
    b.windows(2).filter(|w| w == b"\n\n").count()
}

/// Repetitions of a fixture's middle measured, after as many for warm-up: the warm-up must see
/// upstream chunks as large as the measured ones, since buffers are sized by the largest chunk.
const MEASURED: usize = 20;
const WARM: usize = MEASURED;

/// The fixtures whose content blocks can repeat; the rest (an in-band error alone) have no
/// steady state: their one event ends the stream.
fn repeatable() -> Vec<(&'static str, Recorded)> {
    let all: Vec<_> = STREAMS.iter().map(|&n| (n, recorded(n))).collect();
    let (with, without): (Vec<_>, Vec<_>) = all.into_iter().partition(|(_, r)| !r.middle.is_empty());
    let skipped: Vec<&str> = without.iter().map(|(n, _)| *n).collect();
    assert_eq!(skipped, ["stream-error-overloaded.sse"], "only the error-only fixture has nothing to repeat");
    with
}

#[test]
fn every_recorded_stream_translates_without_allocating_once_warm() {
    for (name, r) in repeatable() {
        let warm = r.middle.repeat(WARM);
        let measured = r.middle.repeat(MEASURED);
        let mut per_chunking = Vec::new();
        for chunk in [1, 7, 64, 4096, usize::MAX] {
            let mut t = Translating::new(Box::new(Stream::new(true)));
            let mut out = BytesMut::new();
            feed(&mut t, &r.head, chunk, &mut out);
            feed(&mut t, &warm, chunk, &mut out);
            let mut out_events = 0;
            let allocations = counting::count(|| {
                for piece in measured.chunks(chunk) {
                    t.feed(piece, "test", &mut out).unwrap();
                    let frame = out.split().freeze();
                    out_events += events_in(&frame);
                }
            });
            feed(&mut t, &r.tail, chunk, &mut out);
            assert!(t.done(), "{name}: the stream completes");
            assert_eq!(allocations, 0, "{name}, chunk {chunk}: {allocations} allocations over {MEASURED} repetitions");
            per_chunking.push(out_events);
        }
        assert!(per_chunking[0] >= MEASURED, "{name}: the measured part produced output ({per_chunking:?})");
        assert!(per_chunking.windows(2).all(|w| w[0] == w[1]), "{name}: output events by chunking {per_chunking:?}");
    }
}

/// An upstream body handing out prepared frames, `Pending` (woken at once) before each one as a
/// socket would be between reads (unless `burst`: every frame ready at once), and counting how
/// many it has handed out.
struct Scripted {
    frames: VecDeque<Bytes>,
    ready: bool,
    burst: bool,
    served: Arc<AtomicUsize>,
}

impl http_body::Body for Scripted {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if !this.ready && !this.burst {
            this.ready = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        this.ready = false;
        let frame = this.frames.pop_front();
        if frame.is_some() {
            this.served.fetch_add(1, Ordering::Relaxed);
        }
        Poll::Ready(frame.map(|f| Ok(Frame::data(f))))
    }

    fn is_end_stream(&self) -> bool {
        self.frames.is_empty()
    }
}

/// Frames of at most `size` bytes, sliced from one buffer (slicing `Bytes` never allocates).
fn frames(bytes: &[u8], size: usize) -> VecDeque<Bytes> {
    let all = Bytes::copy_from_slice(bytes);
    (0..bytes.len()).step_by(size).map(|at| all.slice(at..(at + size).min(bytes.len()))).collect()
}

/// One poll of the response body as hyper makes it: the output frame is written and dropped.
/// Returns the output bytes' event count, or `None` at the end.
fn poll_once(body: &mut Body, cx: &mut Context<'_>) -> Option<usize> {
    match Pin::new(body).poll_frame(cx) {
        Poll::Ready(Some(Ok(frame))) => Some(frame.data_ref().map_or(0, |d| events_in(d))),
        Poll::Ready(Some(Err(e))) => panic!("the body failed: {e}"),
        Poll::Ready(None) => None,
        Poll::Pending => Some(0),
    }
}

#[tokio::test(flavor = "current_thread")]
async fn the_response_body_poll_loop_allocates_nothing_per_event_once_warm() {
    let mut cx = Context::from_waker(Waker::noop());
    for (name, r) in repeatable() {
        for size in [1, 64, 4096] {
            let warm = [&r.head[..], &r.middle.repeat(WARM)].concat();
            let measured = r.middle.repeat(MEASURED);
            let (warm_frames, measured_frames) = (frames(&warm, size), frames(&measured, size));
            let (n_warm, n_measured) = (warm_frames.len(), measured_frames.len());
            let served = Arc::new(AtomicUsize::new(0));
            let upstream = Scripted {
                frames: warm_frames.into_iter().chain(measured_frames).chain(frames(&r.tail, size)).collect(),
                ready: false,
                burst: false,
                served: served.clone(),
            };
            let translate = Mode::translate(Box::new(Stream::new(true)));
            let mut body = Body::passthrough_from(upstream, translate, Duration::from_secs(60), "test");

            while served.load(Ordering::Relaxed) < n_warm {
                poll_once(&mut body, &mut cx).expect("the stream goes on");
            }
            let mut out_events = 0;
            let allocations = counting::count(|| {
                while served.load(Ordering::Relaxed) < n_warm + n_measured {
                    out_events += poll_once(&mut body, &mut cx).expect("the stream goes on");
                }
            });
            let mut rest = Vec::new();
            loop {
                match Pin::new(&mut body).poll_frame(&mut cx) {
                    Poll::Ready(Some(Ok(f))) => rest.extend_from_slice(f.data_ref().map_or(&[][..], |d| &d[..])),
                    Poll::Ready(None) => break,
                    Poll::Pending => {}
                    Poll::Ready(Some(Err(e))) => panic!("{name}: {e}"),
                }
            }
            assert!(rest.ends_with(b"data: [DONE]\n\n"), "{name}: {}", String::from_utf8_lossy(&rest));
            assert!(out_events >= MEASURED, "{name}, frames of {size}: the measured part produced output");
            assert_eq!(
                allocations, 0,
                "{name}, frames of {size}: {allocations} allocations over {MEASURED} repetitions ({out_events} events out)"
            );
        }
    }
}

#[tokio::test(flavor = "current_thread")]
async fn the_passthrough_allocates_nothing_per_event_once_warm_paced_or_in_bursts() {
    let mut cx = Context::from_waker(Waker::noop());
    let event = |i: usize| {
        format!(
            "data: {{\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\
             \"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"token {i:05}\"}},\"finish_reason\":null}}],\"usage\":null}}\n\n"
        )
    };
    let (warm, measured) = (2000, 3000);
    for burst in [false, true] {
        // Reads of one event each, and reads that cut events (a partial held to the next read).
        for size in [0, 100, 4096] {
            let stream: String = (0..warm + measured).map(event).collect();
            let reads: VecDeque<Bytes> = if size == 0 {
                (0..warm + measured).map(|i| Bytes::from(event(i))).collect()
            } else {
                frames(stream.as_bytes(), size)
            };
            let n_warm = reads.len() * warm / (warm + measured);
            let served = Arc::new(AtomicUsize::new(0));
            let upstream = Scripted { frames: reads, ready: false, burst, served: served.clone() };
            let mut body = Body::passthrough_from(upstream, Mode::sse(true), Duration::from_secs(60), "test");
            let mut warm_events = 0;
            while served.load(Ordering::Relaxed) < n_warm {
                warm_events += poll_once(&mut body, &mut cx).expect("the stream goes on");
            }
            let mut out_events = 0;
            let allocations = counting::count(|| {
                while let Some(events) = poll_once(&mut body, &mut cx) {
                    out_events += events;
                }
            });
            assert_eq!(warm_events + out_events, warm + measured, "burst {burst}, reads of {size}: every event out");
            assert!(out_events >= measured / 2, "burst {burst}, reads of {size}: {out_events} events measured");
            assert_eq!(
                allocations, 0,
                "burst {burst}, reads of {size}: {allocations} allocations for {out_events} events"
            );
        }
    }
}

/// Ollama lines that repeat: text, thinking and a whole tool call with nested arguments (its
/// arguments are escaped into a string through the translator's reused buffer).
const OLLAMA_MIDDLE: &str = concat!(
    r#"{"model":"qwen3","created_at":"2025-02-11T15:33:28.0907887Z","message":{"role":"assistant","content":"","thinking":"Let me think."},"done":false}"#,
    "\n",
    r#"{"model":"qwen3","created_at":"2025-02-11T15:33:28.1702247Z","message":{"role":"assistant","content":"Hello \"there\"\n"},"done":false}"#,
    "\n",
    r#"{"model":"qwen3","created_at":"2025-02-11T15:33:28.2608251Z","message":{"role":"assistant","content":"","tool_calls":[{"function":{"name":"get_weather","arguments":{"city":"Paris","opts":{"unit":"c","days":[1,2]}}}}]},"done":false}"#,
    "\n",
);

#[test]
fn ollama_lines_translate_without_allocating_once_warm() {
    use lmgate::provider::ollama::stream::Stream as Ollama;
    let recorded =
        std::fs::read(format!("{}/tests/fixtures/ollama/api-chat-stream.ndjson", env!("CARGO_MANIFEST_DIR"))).unwrap();
    let text = String::from_utf8(recorded).unwrap();
    let (content, done) = text.trim_end().rsplit_once('\n').unwrap();
    let middle = format!("{content}\n{OLLAMA_MIDDLE}");
    let events = steady_state("ollama", || Box::new(Ollama::new(true, "chatcmpl-test")), &middle, &format!("{done}\n"));
    assert!(events >= MEASURED * 35, "the measured part produced output ({events})");
}

/// Feeds `middle` `WARM` times, then counts allocations over `MEASURED` more repetitions at
/// several chunk sizes, then `tail`, which must complete the stream; returns the output events
/// of the measured part (the same at every chunk size).
fn steady_state(
    name: &str,
    make: impl Fn() -> Box<dyn lmgate::provider::Translate>,
    middle: &str,
    tail: &str,
) -> usize {
    let (warm, measured) = (middle.repeat(WARM), middle.repeat(MEASURED));
    let mut per_chunking = Vec::new();
    for chunk in [1, 7, 64, 4096, usize::MAX] {
        let mut t = Translating::new(make());
        let mut out = BytesMut::new();
        feed(&mut t, warm.as_bytes(), chunk, &mut out);
        let mut out_events = 0;
        let allocations = counting::count(|| {
            for piece in measured.as_bytes().chunks(chunk) {
                t.feed(piece, "test", &mut out).unwrap();
                let frame = out.split().freeze();
                out_events += events_in(&frame);
            }
        });
        feed(&mut t, tail.as_bytes(), chunk, &mut out);
        assert!(t.done(), "{name}: the stream completes");
        assert_eq!(allocations, 0, "{name}, chunk {chunk}: {allocations} allocations over {MEASURED} repetitions");
        per_chunking.push(out_events);
    }
    assert!(per_chunking[0] >= MEASURED, "{name}: the measured part produced output ({per_chunking:?})");
    assert!(per_chunking.windows(2).all(|w| w[0] == w[1]), "{name}: output events by chunking {per_chunking:?}");
    per_chunking[0]
}

/// Azure's recorded stream through the passthrough (usage asked for on the client's behalf, so
/// every event is inspected): its prompt-filter chunk and content-filter chunks, repeated, cost
/// no allocation once warm, and every byte but the usage event reaches the client.
#[tokio::test]
async fn azure_recorded_stream_passes_through_without_allocating_once_warm() {
    let mut cx = Context::from_waker(Waker::noop());
    let text = std::fs::read_to_string(format!(
        "{}/tests/fixtures/azure/chat-stream-model-router.ndjson",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    let events: Vec<String> = text.lines().filter(|l| !l.is_empty()).map(|l| format!("data: {l}\n\n")).collect();
    let (usage, middle) = events.split_last().unwrap();
    let middle = middle.concat();
    let (warm, measured) = (200, 300);
    for size in [64, 4096] {
        let stream = middle.repeat(warm + measured) + usage + "data: [DONE]\n\n";
        let reads = frames(stream.as_bytes(), size);
        let n_warm = reads.len() * warm / (warm + measured);
        let served = Arc::new(AtomicUsize::new(0));
        let upstream = Scripted { frames: reads, ready: false, burst: false, served: served.clone() };
        let mut body = Body::passthrough_from(upstream, Mode::sse(true), Duration::from_secs(60), "test");
        let mut warm_events = 0;
        while served.load(Ordering::Relaxed) < n_warm {
            warm_events += poll_once(&mut body, &mut cx).expect("the stream goes on");
        }
        let mut out_events = 0;
        let allocations = counting::count(|| {
            while let Some(events) = poll_once(&mut body, &mut cx) {
                out_events += events;
            }
        });
        let per_round = events.len() - 1;
        assert_eq!(
            warm_events + out_events,
            per_round * (warm + measured) + 1,
            "reads of {size}: all but the usage event"
        );
        assert_eq!(allocations, 0, "reads of {size}: {allocations} allocations for {out_events} events");
    }
}

/// Gemini's recorded streams: the events before the `finishReason` one repeat (text, and a whole
/// function call with its multi-KiB thought signature carried into the id), then the last one.
#[test]
fn gemini_events_translate_without_allocating_once_warm() {
    use lmgate::provider::gemini::stream::Stream as Gemini;
    for name in ["stream-text.sse", "stream-function-call.sse"] {
        let text =
            std::fs::read_to_string(format!("{}/tests/fixtures/gemini/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap();
        let events: Vec<&str> = text.split_inclusive("\r\n\r\n").collect();
        let (last, middle) = events.split_last().unwrap();
        steady_state(name, || Box::new(Gemini::new(true, "chatcmpl-test")), &middle.concat(), last);
    }
}
