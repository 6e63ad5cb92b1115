//! `lmgate bench` through the library API against the in-process gateway with the built-in mock
//! as its upstream. Counts and orderings only: nothing here asserts on speed.

use crate::harness::{within, Gateway};
use lmgate::bench::{run_load, Kind, Load, Report, Shape};
use std::time::Duration;

const MOCK: &str = "[connections.mock]\napi_type = \"mock\"\n[routing]\n\"*\" = \"mock.*\"\n";

fn load(gw: &Gateway, kind: Kind) -> Load {
    let mut load = Load::new(format!("http://{}/v1", gw.addr), kind);
    load.shape = Shape::Closed { concurrency: 4 };
    load.requests = Some(50);
    load.timeout = Duration::from_secs(5);
    load
}

async fn bench(load: &Load) -> Report {
    within("the bench run", run_load(load)).await.unwrap_or_else(|e| panic!("bench: {e}"))
}

fn assert_clean(r: &Report, n: u64) {
    let s = r.summary();
    assert_eq!(s.requests, n, "{}", s.table());
    assert_eq!(s.ok, n, "{}", s.table());
    assert_eq!(r.errors(), 0, "{}", s.table());
    let p = s.latency_us;
    assert!(p.p50 > 0 && p.p50 <= p.p99 && p.p99 <= p.max, "{p:?}");
    assert_eq!(p.count, n);
    assert!(s.bytes > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_bench_counts_every_request_without_errors() {
    let gw = Gateway::start(MOCK);
    let r = bench(&load(&gw, Kind::Chat)).await;
    assert_clean(&r, 50);
    assert!(r.ttft.is_empty() && r.gap.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_stream_bench_measures_time_to_first_token_and_gaps() {
    let gw = Gateway::start(MOCK);
    let mut l = load(&gw, Kind::ChatStream);
    l.chunks = Some(8);
    let r = bench(&l).await;
    assert_clean(&r, 50);
    let s = r.summary();
    let ttft = s.ttft_us.unwrap_or_else(|| panic!("no ttft: {}", s.table()));
    assert_eq!(ttft.count, 50);
    assert!(ttft.p50 <= ttft.p99 && ttft.p99 <= ttft.max);
    assert!(ttft.max <= s.latency_us.max, "ttft {ttft:?} latency {:?}", s.latency_us);
    assert!(ttft.p50 <= s.latency_us.p50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_bench_in_both_formats_counts_every_request() {
    let gw = Gateway::start(MOCK);
    for base64 in [false, true] {
        let mut l = load(&gw, Kind::Embeddings);
        l.inputs = 4;
        l.dims = Some(64);
        l.base64 = base64;
        let r = bench(&l).await;
        assert_clean(&r, 50);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_loop_bench_sends_the_requested_count_after_warm_up() {
    let gw = Gateway::start(MOCK);
    let mut l = load(&gw, Kind::Chat);
    l.shape = Shape::Open { rate: 500.0, max_in_flight: 64 };
    l.requests = Some(40);
    l.warmup = Duration::from_millis(50);
    let r = bench(&l).await;
    // On a slow machine some sends may miss their slot; every slot is accounted for either way.
    assert_eq!(r.requests() + r.missed, 40, "{}", r.summary().table());
    assert_eq!(r.summary().errors_by_status.len(), 0);
    assert_eq!(r.transport_errors, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duration_bound_run_stops_and_reports_throughput() {
    let gw = Gateway::start(MOCK);
    let mut l = load(&gw, Kind::Chat);
    l.requests = None;
    l.duration = Some(Duration::from_millis(200));
    let r = bench(&l).await;
    assert!(r.ok > 0);
    assert!(r.summary().requests_per_s > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_statuses_are_counted_by_status() {
    let gw = Gateway::start(MOCK);
    let mut l = load(&gw, Kind::Chat);
    l.requests = Some(20);
    l.headers = vec!["x-mock-status: 422".into()];
    let r = bench(&l).await;
    assert_eq!(r.ok, 0);
    assert_eq!(r.status_errors.get(&422), Some(&20), "{}", r.summary().table());
    assert_eq!(r.summary().errors_by_status.get("422"), Some(&20));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_upstream_counts_transport_errors() {
    let mut l = Load::new(format!("http://{}/v1", crate::harness::dead_port()), Kind::Chat);
    l.requests = Some(5);
    l.timeout = Duration::from_secs(2);
    let r = bench(&l).await;
    assert_eq!(r.transport_errors, 5);
    assert_eq!(r.ok, 0);
}
