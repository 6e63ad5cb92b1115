//! Provider stream → OpenAI translation, per translator: cost per event and heap allocations per
//! event (a counting allocator). Anthropic: a long text stream and the recorded thinking stream;
//! Ollama: a long NDJSON text stream, and one with a whole tool call per line; Gemini: a long
//! SSE text stream.
//! Run: `cargo bench --bench translate`. Target: ≤ 1 µs per text event.

use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use lmgate::body::Translating;
use lmgate::provider::anthropic::stream::Stream;
use lmgate::provider::gemini::stream::Stream as Gemini;
use lmgate::provider::ollama::stream::Stream as Ollama;
use lmgate::provider::Translate;
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};

struct Counting;
static ALLOCS: AtomicU64 = AtomicU64::new(0);

// SAFETY: forwards every call unchanged to the system allocator; the counter is an atomic.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static A: Counting = Counting;

const TEXT_EVENTS: usize = 1000;

fn text_stream() -> Vec<u8> {
    let mut s = String::from(
        "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_01XFDUDYJgAACzvnptvVoYEL\",\"type\":\"message\",\"role\":\"assistant\",\"model\":\"claude-sonnet-4-5-20250929\",\"content\":[],\"usage\":{\"input_tokens\":25,\"output_tokens\":1}}}\n\n\
         event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n",
    );
    for i in 0..TEXT_EVENTS {
        s.push_str(&format!(
            "event: content_block_delta\ndata: {{\"type\":\"content_block_delta\",\"index\":0,\"delta\":{{\"type\":\"text_delta\",\"text\":\" token {i:04} of a \\\"quoted\\\" answer\"}}}}\n\n"
        ));
    }
    s.push_str("event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n\
                event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\",\"stop_sequence\":null},\"usage\":{\"output_tokens\":1000}}\n\n\
                event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n");
    s.into_bytes()
}

/// Ollama `/api/chat` lines: `TEXT_EVENTS` text lines, or as many whole tool calls, then `done`.
fn ollama_stream(tools: bool) -> Vec<u8> {
    let mut s = String::new();
    for i in 0..TEXT_EVENTS {
        let message = if tools {
            format!(
                r#"{{"role":"assistant","content":"","tool_calls":[{{"function":{{"name":"get_weather","arguments":{{"city":"Paris {i}","unit":"c","days":[1,2,3]}}}}}}]}}"#
            )
        } else {
            format!(r#"{{"role":"assistant","content":" token {i:04} of a \"quoted\" answer"}}"#)
        };
        s.push_str(&format!(
            "{{\"model\":\"llama3.2\",\"created_at\":\"2025-02-11T15:33:28.0907887Z\",\"message\":{message},\"done\":false}}\n"
        ));
    }
    s.push_str("{\"model\":\"llama3.2\",\"created_at\":\"2025-02-11T15:33:30.8884414Z\",\"message\":{\"role\":\"assistant\",\"content\":\"\"},\"done_reason\":\"stop\",\"done\":true,\"prompt_eval_count\":26,\"eval_count\":1000}\n");
    s.into_bytes()
}

/// Gemini SSE events: `TEXT_EVENTS` text events, then the one with `finishReason`.
fn gemini_stream() -> Vec<u8> {
    let mut s = String::new();
    for i in 0..TEXT_EVENTS {
        s.push_str(&format!(
            "data: {{\"candidates\": [{{\"content\": {{\"parts\": [{{\"text\": \" token {i:04} of a \\\"quoted\\\" answer\"}}],\"role\": \"model\"}}}}],\"usageMetadata\": {{\"promptTokenCount\": 15,\"totalTokenCount\": 15}},\"modelVersion\": \"gemini-2.5-flash\",\"responseId\": \"w1peaMz6INOvnvgPgYfPiQY\"}}\r\n\r\n"
        ));
    }
    s.push_str("data: {\"candidates\": [{\"content\": {\"parts\": [{\"text\": \"\"}],\"role\": \"model\"},\"finishReason\": \"STOP\"}],\"usageMetadata\": {\"promptTokenCount\": 15,\"candidatesTokenCount\": 1000,\"totalTokenCount\": 1015}}\r\n\r\n");
    s.into_bytes()
}

/// Translates a whole Anthropic stream fed in `chunk`-sized pieces.
fn run(input: &[u8], chunk: usize) -> usize {
    run_with(Box::new(Stream::new(true)), input, chunk)
}

/// Translates a whole Ollama stream fed in `chunk`-sized pieces.
fn run_ollama(input: &[u8], chunk: usize) -> usize {
    run_with(Box::new(Ollama::new(true, "chatcmpl-bench")), input, chunk)
}

/// Translates a whole stream fed in `chunk`-sized pieces, dropping output as it is produced.
fn run_with(translator: Box<dyn Translate>, input: &[u8], chunk: usize) -> usize {
    let mut t = Translating::new(translator);
    let mut buf = BytesMut::new();
    let mut out = 0;
    for piece in input.chunks(chunk) {
        let _ = t.feed(piece, "bench", &mut buf);
        out += buf.split().freeze().len();
    }
    out
}

fn bench(c: &mut Criterion) {
    let text = text_stream();
    let thinking = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/anthropic/stream-thinking.sse"))
        .expect("fixture");

    // Allocations per event: a whole stream (per-response setup included), then per event.
    for chunk in [64, 4096] {
        let before = ALLOCS.load(Ordering::Relaxed);
        run(&text, chunk);
        let n = ALLOCS.load(Ordering::Relaxed) - before;
        println!(
            "anthropic text stream, chunk {chunk}: {n} allocations for {} events ({:.4} per event, setup included)",
            TEXT_EVENTS + 5,
            n as f64 / (TEXT_EVENTS + 5) as f64
        );
    }

    let mut g = c.benchmark_group("anthropic_translate");
    g.throughput(Throughput::Elements(TEXT_EVENTS as u64));
    g.bench_function("text_events_chunk_4096", |b| b.iter_batched(|| (), |_| run(&text, 4096), BatchSize::SmallInput));
    g.bench_function("text_events_chunk_64", |b| b.iter_batched(|| (), |_| run(&text, 64), BatchSize::SmallInput));
    g.throughput(Throughput::Bytes(thinking.len() as u64));
    g.bench_function("thinking_fixture_whole", |b| b.iter(|| run(&thinking, thinking.len())));
    g.finish();

    let text = ollama_stream(false);
    let tools = ollama_stream(true);
    for (name, input) in [("text", &text), ("tool-call", &tools)] {
        for chunk in [64, 4096] {
            let before = ALLOCS.load(Ordering::Relaxed);
            let bytes = run_ollama(input, chunk);
            let n = ALLOCS.load(Ordering::Relaxed) - before;
            println!(
                "ollama {name} stream, chunk {chunk}: {n} allocations for {} lines ({:.4} per line, setup included), {} bytes out",
                TEXT_EVENTS + 1,
                n as f64 / (TEXT_EVENTS + 1) as f64,
                bytes
            );
        }
    }
    let gemini = gemini_stream();
    let before = ALLOCS.load(Ordering::Relaxed);
    let bytes = run_with(Box::new(Gemini::new(true, "chatcmpl-bench")), &gemini, 4096);
    let n = ALLOCS.load(Ordering::Relaxed) - before;
    println!("gemini text stream, chunk 4096: {n} allocations for {} events, {bytes} bytes out", TEXT_EVENTS + 1);
    let mut g = c.benchmark_group("gemini_translate");
    g.throughput(Throughput::Elements(TEXT_EVENTS as u64));
    for chunk in [4096, 64] {
        g.bench_function(format!("text_events_chunk_{chunk}"), |b| {
            b.iter(|| run_with(Box::new(Gemini::new(true, "chatcmpl-bench")), &gemini, chunk))
        });
    }
    g.finish();

    let mut g = c.benchmark_group("ollama_translate");
    g.throughput(Throughput::Elements(TEXT_EVENTS as u64));
    g.bench_function("text_lines_chunk_4096", |b| b.iter(|| run_ollama(&text, 4096)));
    g.bench_function("text_lines_chunk_64", |b| b.iter(|| run_ollama(&text, 64)));
    g.bench_function("tool_call_lines_chunk_4096", |b| b.iter(|| run_ollama(&tools, 4096)));
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
