//! `lmgate bench` through the library API against the in-process gateway with the built-in mock
//! as its upstream. Counts and orderings only: nothing here asserts on speed.

use crate::harness::{within, Gateway};
use lmgate::bench::{execute, run_load, Args, Kind, Load, Outcome, Report, Shape};
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
    // First byte comes no later than the first token; eight content events make seven gaps each.
    let ttfb = s.ttfb_us.unwrap_or_else(|| panic!("no ttfb: {}", s.table()));
    assert_eq!(ttfb.count, 50);
    assert!(ttfb.p50 <= ttft.p50 && ttfb.max <= ttft.max, "ttfb {ttfb:?} ttft {ttft:?}");
    let gap = s.gap_us.unwrap_or_else(|| panic!("no gaps: {}", s.table()));
    assert_eq!(gap.count, 50 * 7);
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
    assert!(r.summary().ok_per_s > 0.0);
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

/// `lmgate bench` options as the command line would give them.
fn args(url: String, extra: &[&str]) -> Args {
    use clap::Parser;
    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }
    let mut argv = vec!["bench", "--url", &url];
    argv.extend_from_slice(extra);
    Cli::try_parse_from(argv).unwrap_or_else(|e| panic!("{e}")).args
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compare_runs_interleaved_rounds_and_reports_every_percentile() {
    let gw = Gateway::start(MOCK);
    let url = format!("http://{}/v1", gw.addr);
    // A/A: the same URL as both arms, the noise-floor mode.
    let a = args(url.clone(), &["--compare", &url, "--rounds", "5", "--requests", "10", "--warmup", "0"]);
    let Outcome::Compare { comparison: c, direct, gateway } =
        within("the comparison", execute(&a)).await.unwrap_or_else(|e| panic!("{e}"))
    else {
        panic!("not a comparison")
    };
    assert_eq!(c.rounds, 5);
    assert_eq!((c.direct.len(), c.gateway.len()), (5, 5));
    assert!(c.direct.iter().chain(&c.gateway).all(|s| s.ok == 10), "{}", c.table());
    assert_eq!((direct.ok, gateway.ok), (50, 50));
    let percentiles: Vec<&str> = c.latency.iter().map(|a| a.percentile.as_str()).collect();
    assert_eq!(percentiles, ["p50", "p90", "p99", "p99.9", "max"]);
    assert!(c.latency.iter().all(|a| a.noise_us.is_some()));
    assert!(c.throughput_ratio.is_some());
    assert_eq!(c.empty_rounds(), 0);
    assert!(c.table().contains("direct 50 ok, 0 failed or missed"), "{}", c.table());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compare_refuses_fewer_than_five_rounds() {
    let gw = Gateway::start(MOCK);
    let url = format!("http://{}/v1", gw.addr);
    let a = args(url.clone(), &["--compare", &url, "--rounds", "4", "--requests", "1"]);
    let e = within("the refusal", execute(&a)).await.expect_err("four rounds accepted");
    assert!(e.contains("at least 5"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_that_only_fails_is_never_reported_as_a_clean_comparison() {
    // Fast errors must not read as "the gateway is faster than direct": the rounds without a
    // success are counted and the table says the figures mean nothing.
    let direct = Gateway::start(MOCK);
    let gw = Gateway::start("[connections.mock]\napi_type = \"mock\"\n[routing]\n\"other-*\" = \"mock.*\"\n");
    let a = args(
        format!("http://{}/v1", gw.addr),
        &["--compare", &format!("http://{}/v1", direct.addr), "--rounds", "5", "--requests", "5", "--warmup", "0"],
    );
    let Outcome::Compare { comparison: c, .. } =
        within("the comparison", execute(&a)).await.unwrap_or_else(|e| panic!("{e}"))
    else {
        panic!("not a comparison")
    };
    assert_eq!(c.empty_rounds(), 5, "{}", c.table());
    assert!(c.gateway.iter().all(|s| s.errors_by_status.get("404") == Some(&5)));
    assert!(c.table().contains("without one success"), "{}", c.table());
}

#[test]
fn rates_and_durations_out_of_range_are_refused_before_sending() {
    for extra in ["--rate=0", "--rate=1e12", "--rate=NaN", "--duration=-1", "--duration=99999", "--timeout=inf"] {
        let argv = ["--requests", "1", extra];
        let a = args("http://127.0.0.1:9/v1".into(), &argv);
        assert!(a.load(&a.url).is_err(), "{extra:?} accepted");
    }
}

/// An upstream that holds every response until `stall` has passed since it started, then
/// answers at once: a server stall.
async fn stalling_upstream(stall: Duration) -> std::net::SocketAddr {
    use hyper::service::service_fn;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    let until = tokio::time::Instant::now() + stall;
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = service_fn(move |_req| async move {
                    tokio::time::sleep_until(until).await;
                    let body = http_body_util::Full::new(bytes::Bytes::from_static(b"{}"));
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(body))
                });
                let io = hyper_util::rt::TokioIo::new(sock);
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, svc).await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_loop_keeps_to_its_schedule_through_a_stall_so_the_stall_shows_in_many_latencies() {
    // 100 req/s for 40 requests against a server that stalls its first 300 ms: the open loop
    // keeps sending on schedule and measures from each intended send time, so about 30 requests
    // wait 0..300 ms for the stall's end. A closed loop (coordinated omission) would send one
    // request during the stall and show a single slow sample. Only lower bounds are asserted,
    // which a slow machine can only make larger.
    let addr = stalling_upstream(Duration::from_millis(300)).await;
    let mut l = Load::new(format!("http://{addr}/v1"), Kind::Chat);
    l.shape = Shape::Open { rate: 100.0, max_in_flight: 100 };
    l.requests = Some(40);
    l.timeout = Duration::from_secs(5);
    let r = bench(&l).await;
    assert_eq!(r.ok, 40, "{}", r.summary().table());
    let slow =
        r.latency.iter_recorded().filter(|v| v.value_iterated_to() >= 100_000).map(|v| v.count_at_value()).sum::<u64>();
    assert!(slow >= 15, "only {slow} requests at or over 100 ms: {}", r.summary().table());
    assert!(r.summary().latency_us.max >= 250_000, "{}", r.summary().table());
}
