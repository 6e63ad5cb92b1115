//! Passthrough handling: the validating model scan and the splice plan, on a 1 KB chat body and a
//! 10 MB embeddings body; and the response side, an OpenAI stream forwarded through the body's
//! poll loop while it is observed for usage (every chunk carries `"usage":null` once usage was
//! asked for, as OpenAI sends it). Run: `cargo bench --bench passthrough`.

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use lmgate::body::{Body, Mode};
use lmgate::json;
use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

fn chat_body() -> Vec<u8> {
    let mut messages = String::new();
    // Eight messages: a body of about 1 KB.
    for i in 0..8 {
        messages.push_str(&format!(
            "{{\"role\":\"user\",\"content\":\"message {i}: explain the \\\"borrow checker\\\" briefly, with an example of a lifetime error.\"}},"
        ));
    }
    messages.pop();
    format!("{{\"model\":\"gpt-4o-mini\",\"messages\":[{messages}],\"temperature\":0.2,\"stream\":true}}").into_bytes()
}

fn embeddings_body(target: usize) -> Vec<u8> {
    let text = "The quick brown fox jumps over the lazy dog. ".repeat(20);
    let mut inputs = Vec::new();
    let mut len = 0;
    while len < target {
        inputs.push(format!("\"{text}\""));
        len += text.len() + 3;
    }
    format!("{{\"input\":[{}],\"model\":\"text-embedding-3-small\",\"encoding_format\":\"base64\"}}", inputs.join(","))
        .into_bytes()
}

/// What the proxy does per request: scan, read the model, and cut the body around the splice.
fn scan_and_splice(body: &Bytes, renamed: &Bytes) -> usize {
    let fields = json::scan_request(body).expect("valid body");
    let range = fields.model.expect("has a model");
    let model = json::string_value(&body[range.clone()]).expect("string model");
    let parts = [body.slice(..range.start), renamed.clone(), body.slice(range.end..)];
    model.len() + parts.iter().map(Bytes::len).sum::<usize>()
}

fn bench(c: &mut Criterion) {
    let renamed = Bytes::from_static(b"\"gpt-4o-mini-2024-07-18\"");
    let mut g = c.benchmark_group("passthrough_request");
    for (name, body) in [("chat_1k", chat_body()), ("embeddings_10m", embeddings_body(10 << 20))] {
        let body = Bytes::from(body);
        g.throughput(Throughput::Bytes(body.len() as u64));
        g.bench_function(name, |b| {
            b.iter_batched(|| body.clone(), |body| scan_and_splice(&body, &renamed), BatchSize::SmallInput)
        });
    }
    g.finish();
}

/// An upstream body that hands out prepared chunks, all ready at once.
struct Chunks(VecDeque<Bytes>);

impl http_body::Body for Chunks {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        Poll::Ready(self.0.pop_front().map(|b| Ok(http_body::Frame::data(b))))
    }
}

const EVENTS: usize = 200;

/// An OpenAI chat stream of [`EVENTS`] content chunks with `"usage":null`, then the usage-only
/// chunk and `[DONE]`.
fn openai_stream() -> Vec<u8> {
    let mut s = String::new();
    for i in 0..EVENTS {
        s.push_str(&format!(
            "data: {{\"id\":\"chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT\",\"object\":\"chat.completion.chunk\",\"created\":1741569952,\"model\":\"gpt-4o-2024-08-06\",\"service_tier\":\"default\",\"system_fingerprint\":\"fp_f9f4fb6dbf\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\" word{i}\"}},\"logprobs\":null,\"finish_reason\":null}}],\"usage\":null}}\n\n"
        ));
    }
    s.push_str("data: {\"id\":\"chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT\",\"object\":\"chat.completion.chunk\",\"created\":1741569952,\"model\":\"gpt-4o-2024-08-06\",\"choices\":[],\"usage\":{\"prompt_tokens\":19,\"completion_tokens\":200,\"total_tokens\":219}}\n\ndata: [DONE]\n\n");
    s.into_bytes()
}

/// Forwards `chunks` through a passthrough body (stripping the usage event, as when only the
/// gateway asked for usage) and returns the bytes that reached the client.
fn forward(rt: &tokio::runtime::Runtime, chunks: VecDeque<Bytes>) -> usize {
    let body = Body::passthrough_from(Chunks(chunks), Mode::sse(true), Duration::from_secs(300), "bench");
    rt.block_on(async {
        use http_body_util::BodyExt;
        body.collect().await.map(|c| c.to_bytes().len()).unwrap_or(0)
    })
}

fn bench_stream(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().expect("runtime");
    let stream = Bytes::from(openai_stream());
    let mut g = c.benchmark_group("passthrough_stream");
    g.throughput(Throughput::Elements(EVENTS as u64 + 2));
    for chunk in [64, 4096] {
        let chunks: VecDeque<Bytes> =
            (0..stream.len()).step_by(chunk).map(|i| stream.slice(i..(i + chunk).min(stream.len()))).collect();
        g.bench_function(format!("openai_usage_null_chunk_{chunk}"), |b| {
            b.iter_batched(|| chunks.clone(), |c| forward(&rt, c), BatchSize::SmallInput)
        });
    }
    g.finish();
}

criterion_group!(benches, bench, bench_stream);
criterion_main!(benches);
