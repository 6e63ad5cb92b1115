//! Graceful shutdown: new connections are refused at once (or, with `drain_delay_secs`, once
//! readiness has answered 503 for that long while everything is still served), in-flight streams
//! run to their end within the grace period, and whatever outlives it is cut so `serve` returns.

use crate::harness::client::{exchange, get, post, Client};
use crate::harness::upstream::{chunk, json, sse_head, Gate, Step, Upstream, LAST_CHUNK};
use crate::harness::{config, within, Gateway};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::TcpStream;

const FIRST: &str = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"first\"}}]}\n\n";
const REST: &str = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"second\"}}]}\n\ndata: [DONE]\n\n";
const STREAM_REQUEST: &str = r#"{"model":"m-1","messages":[{"role":"user","content":"hi"}],"stream":true,"stream_options":{"include_usage":true}}"#;

/// Waits (bounded) until a connection to `addr` is refused. The listener closes as soon as the
/// serve loop sees the shutdown signal, which nothing reports, so this retries: a connect that
/// still succeeds is dropped and tried again.
async fn refused(addr: SocketAddr) {
    within("new connections to be refused", async {
        loop {
            match TcpStream::connect(addr).await {
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return,
                // A connect racing the listener's close can be reset instead: try again.
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
                Err(e) => panic!("connect failed with {e}, not refused"),
                Ok(s) => drop(s),
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_refuses_new_connections_and_lets_the_stream_in_flight_finish() {
    let gate = Gate::new();
    let g = gate.clone();
    let mut up = Upstream::start(move |_| {
        vec![
            Step::Write(sse_head(&[])),
            Step::Write(chunk(FIRST.as_bytes())),
            Step::Wait(g.clone()),
            Step::Write(chunk(REST.as_bytes())),
            Step::Write(LAST_CHUNK.to_vec()),
        ]
    })
    .await;
    let mut gw = Gateway::start(&config(up.addr, "", "[server]\nshutdown_grace_secs = 30\n"));
    let mut client = Client::connect(gw.addr).await;
    client.send(&post("/v1/chat/completions", &[], STREAM_REQUEST)).await;
    assert_eq!(client.head().await.status, 200);
    client.until(FIRST.as_bytes()).await;
    up.request().await;

    gw.shutdown();
    refused(gw.addr).await;

    gate.open();
    let rest = client.rest().await.expect("the in-flight stream completes");
    assert_eq!(String::from_utf8_lossy(&rest), REST);
    assert!(rest.ends_with(b"data: [DONE]\n\n"));
    // The connection is not kept alive past its last response, and serve returns long before
    // the 30 s grace period is over.
    client.closed().await;
    gw.stopped().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_outliving_the_grace_period_is_cut_and_serve_returns() {
    let mut up =
        Upstream::start(|_| vec![Step::Write(sse_head(&[])), Step::Write(chunk(FIRST.as_bytes())), Step::Hang]).await;
    let mut gw = Gateway::start(&config(up.addr, "", "[server]\nshutdown_grace_secs = 0.3\n"));
    let mut client = Client::connect(gw.addr).await;
    client.send(&post("/v1/chat/completions", &[], STREAM_REQUEST)).await;
    assert_eq!(client.head().await.status, 200);
    client.until(FIRST.as_bytes()).await;
    let req = up.request().await;

    gw.shutdown();
    let cut = client.rest().await.expect_err("the stream must be cut, not completed");
    assert!(!String::from_utf8_lossy(&cut).contains("[DONE]"));
    gw.stopped().await;
    assert_eq!(up.closed().await, req.conn, "the upstream connection is closed too");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_with_nothing_in_flight_returns_at_once() {
    let up = Upstream::start(|_| vec![Step::Close]).await;
    let mut gw = Gateway::start(&config(up.addr, "", "[server]\nshutdown_grace_secs = 30\n"));
    // An idle keep-alive connection does not hold shutdown up.
    let mut idle = Client::connect(gw.addr).await;
    idle.send(b"GET /health/live HTTP/1.1\r\nhost: gw\r\n\r\n").await;
    assert_eq!(idle.response().await.status(), 200);
    gw.shutdown();
    gw.stopped().await;
    idle.closed().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_never_sent_a_request_does_not_hold_shutdown_up() {
    let up = Upstream::start(|_| vec![Step::Close]).await;
    let mut gw = Gateway::start(&config(up.addr, "", "[server]\nshutdown_grace_secs = 30\n"));
    let mut fresh = Client::connect(gw.addr).await;
    // Connections are accepted in order: once a later one is answered, `fresh` was accepted.
    let mut later = Client::connect(gw.addr).await;
    later.send(b"GET /health/live HTTP/1.1\r\nhost: gw\r\n\r\n").await;
    assert_eq!(later.response().await.status(), 200);
    gw.shutdown();
    gw.stopped().await;
    fresh.closed().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn during_the_drain_delay_readiness_is_503_while_new_and_kept_connections_are_still_served() {
    let mut up = Upstream::start(|_| vec![Step::Write(json(r#"{"ok":true}"#))]).await;
    let mut gw = Gateway::start(&config(up.addr, "", "[server]\ndrain_delay_secs = 3\nshutdown_grace_secs = 30\n"));
    let ready = get("/health/ready", &[]);
    let mut kept = Client::connect(gw.addr).await;
    kept.send(&ready).await;
    assert_eq!(kept.response().await.status(), 200);

    gw.shutdown();
    // Each probe is a new connection: seeing the 503 on one proves the listener still accepts.
    within("readiness to turn 503", async {
        loop {
            match exchange(gw.addr, &ready).await.status() {
                503 => break,
                status => assert_eq!(status, 200),
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    let resp = exchange(
        gw.addr,
        &post("/v1/chat/completions", &[], r#"{"model":"m-1","messages":[{"role":"user","content":"hi"}]}"#),
    )
    .await;
    assert_eq!(resp.status(), 200, "{}", resp.text());
    up.request().await;
    kept.send(&ready).await;
    assert_eq!(kept.response().await.status(), 503, "a kept-alive connection is still served");

    // After the delay the listener closes, the idle connection is let go and serve returns.
    refused(gw.addr).await;
    kept.closed().await;
    gw.stopped().await;
}
