//! Loopback end to end in one process: a client sends over real loopback sockets to the gateway,
//! which forwards through an `openai` connection to a standalone mock upstream (the same server
//! `lmgate mock` runs). Non-stream chat and a streamed chat of 16 content chunks, each measured
//! direct to the mock and through the gateway, so the difference is the hop's cost in this
//! process. Run: `cargo bench --bench loopback`.
//!
//! All three share one Tokio runtime (two workers) and the machine's cores, so the figures are a
//! regression signal for the whole request path, not the overhead users see: `lmgate bench
//! --compare` against separate processes pinned to cores measures that (README, Performance).

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use lmgate::config::Config;
use lmgate::proxy::Proxy;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::runtime::Runtime;

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// Starts a server for `config` (with `listen` on port 0) on the runtime; returns its address.
fn start(rt: &Runtime, config: &str) -> SocketAddr {
    let config = Config::parse(config, &|_| None).expect("bench config is valid");
    let proxy = Arc::new(Proxy::new(config).expect("bench proxy starts"));
    rt.block_on(async {
        let listener = lmgate::server::bind("127.0.0.1:0".parse().expect("address")).expect("bind loopback");
        let addr = listener.local_addr().expect("local address");
        tokio::spawn(lmgate::server::serve(listener, proxy, std::future::pending()));
        addr
    })
}

fn chat(addr: SocketAddr, stream: bool) -> http::Request<Full<Bytes>> {
    let body = format!(
        "{{\"model\":\"mock-1\",\"stream\":{stream},\"messages\":[{{\"role\":\"user\",\"content\":\"Say hello.\"}}]}}"
    );
    http::Request::post(format!("http://{addr}/v1/chat/completions"))
        .header("content-type", "application/json")
        .header("x-mock-chunks", "16")
        .body(Full::new(Bytes::from(body)))
        .expect("valid request")
}

/// Sends `iters` requests one after another and returns the time they took; every response must
/// be a 200 with a body (a failure aborts the bench rather than timing errors).
async fn run(client: &HttpClient, addr: SocketAddr, stream: bool, iters: u64) -> Duration {
    let start = Instant::now();
    for _ in 0..iters {
        let resp = client.request(chat(addr, stream)).await.expect("request sent");
        assert_eq!(resp.status(), 200, "bench request failed");
        let body = resp.into_body().collect().await.expect("whole body").to_bytes();
        assert!(!body.is_empty());
    }
    start.elapsed()
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let mock = start(
        &rt,
        "[server]\nlisten = \"127.0.0.1:0\"\n[connections.mock]\napi_type = \"mock\"\n[routing]\n\"*\" = \"mock.*\"\n",
    );
    let gateway = start(
        &rt,
        &format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[connections.up]\napi_type = \"openai\"\n\
             api_base = \"http://{mock}/v1\"\nforward_headers = [\"x-mock-*\"]\n[routing]\n\"*\" = \"up.*\"\n"
        ),
    );
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: HttpClient = Client::builder(TokioExecutor::new()).build(connector);

    let mut group = c.benchmark_group("loopback");
    for (name, stream) in [("chat", false), ("chat_stream16", true)] {
        for (arm, addr) in [("direct", mock), ("gateway", gateway)] {
            group.bench_function(format!("{name}/{arm}"), |b| {
                b.iter_custom(|iters| rt.block_on(run(&client, addr, stream, iters)))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
