//! How precisely `lmgate bench` keeps an open-loop schedule: against an in-process HTTP server
//! that answers at once, the open-loop p50 at 200 and 2,000 req/s beside the closed-loop p50
//! (concurrency 1), and how late the sends left. The two should be within 50 µs: an open loop
//! counts latency from the intended send time, so any lateness of the generator itself would
//! show up as latency. Run: `cargo bench --bench open_loop` (about 20 s).
//!
//! This prints rather than asserts: on a shared machine one run can be disturbed by anything
//! else running, and a benchmark target belongs in a benchmark, not in a timed test. Each shape
//! runs three times, alternating, and the medians are printed with every run's value, so one
//! disturbed run is visible as such.

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use lmgate::bench::{run_load, Kind, Load, Shape};
use std::convert::Infallible;
use std::time::Duration;

const ANSWER: &str = r#"{"id":"x","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}]}"#;

/// Serves every request with `ANSWER` at once, on 127.0.0.1; returns the base URL.
async fn server() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let _ = tcp.set_nodelay(true);
            tokio::spawn(async move {
                let service = service_fn(|_req| async {
                    let mut r = hyper::Response::new(Full::new(Bytes::from_static(ANSWER.as_bytes())));
                    r.headers_mut().insert("content-type", http::HeaderValue::from_static("application/json"));
                    Ok::<_, Infallible>(r)
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), service).await;
            });
        }
    });
    format!("http://{addr}/v1")
}

fn median(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v[v.len() / 2]
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let url = server().await;
        let shapes = [
            ("closed loop, concurrency 1", Shape::Closed { concurrency: 1 }),
            ("open loop, 200 req/s", Shape::Open { rate: 200.0, max_in_flight: 100 }),
            ("open loop, 2000 req/s", Shape::Open { rate: 2000.0, max_in_flight: 100 }),
        ];
        let mut p50 = vec![Vec::new(); shapes.len()];
        let mut late = vec![Vec::new(); shapes.len()];
        for _round in 0..3 {
            for (k, (_, shape)) in shapes.iter().enumerate() {
                let mut load = Load::new(url.clone(), Kind::Chat);
                load.shape = *shape;
                load.requests = None;
                load.duration = Some(Duration::from_secs(2));
                load.warmup = Duration::from_millis(300);
                let s = run_load(&load).await.expect("a run").summary();
                assert!(s.ok > 0 && s.requests == s.ok, "every request must succeed: {s:?}");
                p50[k].push(s.latency_us.p50);
                if let Some(l) = s.lateness_us {
                    late[k].push(l.p99);
                }
            }
        }
        let closed = median(p50[0].clone());
        println!("{:<28}{:>12}{:>16}{:>22}  runs (p50 µs)", "shape", "p50 µs", "minus closed", "send lateness p99 µs");
        for (k, (name, _)) in shapes.iter().enumerate() {
            let m = median(p50[k].clone());
            let l = if late[k].is_empty() { "-".to_string() } else { median(late[k].clone()).to_string() };
            println!("{name:<28}{m:>12}{:>+16}{l:>22}  {:?}", m as i64 - closed as i64, p50[k]);
        }
    });
}
