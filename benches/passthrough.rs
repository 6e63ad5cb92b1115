//! Passthrough request handling: the validating model scan and the splice plan, on a 1 KB chat
//! body and a 10 MB embeddings body. Run: `cargo bench --bench passthrough`.

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use lmgate::json;

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

criterion_group!(benches, bench);
criterion_main!(benches);
