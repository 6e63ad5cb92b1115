//! Client connections: the deadlines every connection is held to (first head, a started HTTP/1
//! head, idle keep-alive, h2 idle GOAWAY, a client that stops reading), `max_connections`, and
//! request heads too large (431 on HTTP/1 and h2).

use crate::harness::client::{post, Client};
use crate::harness::upstream::{chunk, sse_head, Step, Upstream};
use crate::harness::{config, within, Gateway};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const CHAT: &str = r#"{"model":"m-1","messages":[{"role":"user","content":"hi"}]}"#;

fn mock(server: &str) -> String {
    format!("[server]\n{server}\n[connections.mock]\napi_type = \"mock\"\n[routing]\n\"*\" = \"mock.*\"\n")
}

/// Reads until the gateway closes the connection (EOF or reset), bounded; returns what came.
async fn closed_by_gateway(stream: &mut TcpStream, what: &str) -> Vec<u8> {
    let mut got = Vec::new();
    within(what, async {
        let mut buf = [0u8; 65536];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    got
}

#[tokio::test]
async fn a_connection_that_sends_no_head_is_closed_after_the_header_read_timeout() {
    let gw = Gateway::start(&mock("header_read_timeout_secs = 0.4\nidle_timeout_secs = 60"));
    // Nothing at all; half an HTTP/1 request line; half of the h2 preface.
    for sent in [&b""[..], b"POST /v1/chat/compl", b"PRI * HTTP/2.0\r\n"] {
        let started = Instant::now();
        let mut s = TcpStream::connect(gw.addr).await.unwrap();
        s.write_all(sent).await.unwrap();
        closed_by_gateway(&mut s, "the gateway to close a connection without a head").await;
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(350), "closed after {took:?}, before the timeout ({sent:?})");
    }
}

#[tokio::test]
async fn an_idle_keep_alive_connection_lives_for_idle_timeout_and_a_started_head_for_header_read_timeout() {
    // A keep-alive connection idles longer than the head timeout and is still served.
    let gw = Gateway::start(&mock("header_read_timeout_secs = 0.3\nidle_timeout_secs = 30"));
    let mut c = Client::connect(gw.addr).await;
    c.send(&post("/v1/chat/completions", &[], CHAT)).await;
    assert_eq!(c.response().await.status(), 200);
    tokio::time::sleep(Duration::from_millis(800)).await;
    c.send(&post("/v1/chat/completions", &[], CHAT)).await;
    assert_eq!(c.response().await.status(), 200, "an idle connection is served within idle_timeout");
    // The next head starts and stalls: closed a head-read timeout after its first byte.
    let started = Instant::now();
    c.send(b"POST /v1/chat/completions HTTP/1.1\r\nhost: localhost\r\n").await;
    c.closed().await;
    assert!(started.elapsed() < Duration::from_secs(3), "a stalled head holds the connection");

    // With a short idle timeout, an idle keep-alive connection is closed.
    let gw = Gateway::start(&mock("header_read_timeout_secs = 30\nidle_timeout_secs = 0.3"));
    let mut c = Client::connect(gw.addr).await;
    c.send(&post("/v1/chat/completions", &[], CHAT)).await;
    assert_eq!(c.response().await.status(), 200);
    let started = Instant::now();
    c.closed().await;
    assert!(started.elapsed() >= Duration::from_millis(250), "closed before idle_timeout");
}

/// An h2 (prior knowledge) client connection: the sender and the connection task's handle.
async fn h2(addr: SocketAddr) -> (hyper::client::conn::http2::SendRequest<Empty<Bytes>>, tokio::task::JoinHandle<()>) {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await.expect("h2 handshake");
    let task = tokio::spawn(async move {
        let _ = conn.await;
    });
    (send, task)
}

fn h2_get(path: &str, headers: &[(&str, String)]) -> http::Request<Empty<Bytes>> {
    let mut r = http::Request::get(format!("http://localhost{path}"));
    for (n, v) in headers {
        r = r.header(*n, v.as_str());
    }
    r.body(Empty::new()).unwrap()
}

#[tokio::test]
async fn an_idle_h2_connection_gets_a_goaway_after_idle_timeout() {
    let gw = Gateway::start(&mock("idle_timeout_secs = 0.3"));
    let (mut send, conn) = h2(gw.addr).await;
    let r = send.send_request(h2_get("/health/live", &[])).await.expect("h2 request");
    assert_eq!(r.status(), 200);
    r.into_body().collect().await.unwrap();
    let started = Instant::now();
    within("the gateway to end the idle h2 connection", conn).await.unwrap();
    assert!(started.elapsed() >= Duration::from_millis(250), "ended before idle_timeout");
}

#[tokio::test]
async fn an_h2_client_that_does_not_answer_pings_is_closed_and_one_that_does_is_kept() {
    let gw = Gateway::start(&mock("h2_keepalive_secs = 0.3\nidle_timeout_secs = 60\nheader_read_timeout_secs = 60"));
    // A raw h2 client: the preface, empty SETTINGS, an ACK of the server's; then silence, so
    // the server's PINGs go unanswered.
    let started = Instant::now();
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    hello.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]); // SETTINGS
    hello.extend_from_slice(&[0, 0, 0, 4, 1, 0, 0, 0, 0]); // SETTINGS ACK
    s.write_all(&hello).await.unwrap();
    let got = closed_by_gateway(&mut s, "the gateway to close an h2 connection that ignores PINGs").await;
    // Frame type 6 (PING) came first: after the 9-byte frame headers, type is byte 3.
    let mut at = 0;
    let mut pinged = false;
    while at + 9 <= got.len() {
        let len = u32::from_be_bytes([0, got[at], got[at + 1], got[at + 2]]) as usize;
        pinged |= got[at + 3] == 6;
        at += 9 + len;
    }
    assert!(pinged, "no PING before the close");
    assert!(started.elapsed() >= Duration::from_millis(500), "closed after {:?}", started.elapsed());

    // hyper's client answers PINGs: its connection outlives several intervals.
    let (mut send, conn) = h2(gw.addr).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!conn.is_finished(), "a client answering PINGs was closed");
    let r = send.send_request(h2_get("/health/live", &[])).await.expect("h2 request");
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn request_heads_over_max_request_head_bytes_get_431_on_http1_and_h2() {
    let gw = Gateway::start(&mock("max_request_head_bytes = 65536"));
    let big = "x".repeat(100 << 10);
    let fits = "x".repeat(40 << 10);

    let mut c = Client::connect(gw.addr).await;
    c.send(&post("/v1/chat/completions", &[("x-big", &big)], CHAT)).await;
    assert_eq!(c.response().await.status(), 431);
    let mut c = Client::connect(gw.addr).await;
    c.send(&post("/v1/chat/completions", &[("x-fits", &fits)], CHAT)).await;
    assert_eq!(c.response().await.status(), 200, "a 40 KiB header is within 64 KiB");
    let many: Vec<(String, String)> = (0..150).map(|i| (format!("x-h{i}"), "v".to_owned())).collect();
    let many: Vec<(&str, &str)> = many.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
    let mut c = Client::connect(gw.addr).await;
    c.send(&post("/v1/chat/completions", &many, CHAT)).await;
    assert_eq!(c.response().await.status(), 431, "more than 100 headers");

    let (mut send, _conn) = h2(gw.addr).await;
    let r = send.send_request(h2_get("/health/live", &[("x-fits", fits)])).await.expect("h2 request");
    assert_eq!(r.status(), 200, "h2: a 40 KiB header list is within 64 KiB");
    let r = send.send_request(h2_get("/health/live", &[("x-big", big)])).await.expect("h2 request");
    assert_eq!(r.status(), 431);
}

#[tokio::test]
async fn past_max_connections_new_connections_wait_until_one_closes() {
    let gw = Gateway::start(&mock("max_connections = 2"));
    let mut first = Client::connect(gw.addr).await;
    let mut second = Client::connect(gw.addr).await;
    for c in [&mut first, &mut second] {
        c.send(&post("/v1/chat/completions", &[], CHAT)).await;
        assert_eq!(c.response().await.status(), 200);
    }
    // The third connection is in the backlog: its request is not served...
    let mut third = Client::connect(gw.addr).await;
    third.send(&post("/v1/chat/completions", &[], CHAT)).await;
    assert!(
        tokio::time::timeout(Duration::from_millis(400), third.response()).await.is_err(),
        "a connection past max_connections was served"
    );
    // ...until a slot frees.
    drop(first);
    assert_eq!(within("the waiting connection to be served", third.response()).await.status(), 200);
}

/// A log sink for the current thread's subscriber.
#[derive(Clone, Default)]
struct Sink(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

// Current-thread runtime: the gateway's tasks run on this thread, under its log subscriber.
#[tokio::test]
async fn a_client_that_stops_reading_is_cut_after_send_timeout_and_the_upstream_cancelled() {
    let sink = Sink::default();
    let writer = sink.clone();
    let subscriber = tracing_subscriber::fmt().with_writer(move || writer.clone()).with_ansi(false).finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    // 40 events of 100 KiB each, 4 MiB in all: more than the sockets between gateway and client
    // hold, so the gateway's writes block once the client stops reading.
    let event =
        format!("data: {{\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{}\"}}}}]}}\n\n", "y".repeat(100 << 10));
    let mut up = Upstream::start(move |_| {
        let mut steps = vec![Step::Write(sse_head(&[]))];
        steps.extend((0..40).map(|_| Step::Write(chunk(event.as_bytes()))));
        steps.push(Step::Hang);
        steps
    })
    .await;
    let gw = Gateway::start(&config(up.addr, "", "[server]\nsend_timeout_secs = 0.5\n"));
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = socket.connect(gw.addr).await.unwrap();
    let body = r#"{"model":"m-1","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    stream.write_all(&post("/v1/chat/completions", &[], body)).await.unwrap();
    up.request().await;
    // Read nothing: the upstream connection is closed by the gateway.
    within("the gateway to cancel the upstream", up.closed()).await;
    let got = closed_by_gateway(&mut stream, "the gateway to close the client connection").await;
    assert!(got.len() < 4 << 20, "the client was sent the whole stream");
    let logs = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
    assert!(logs.contains("outcome=\"client_stalled\"") || logs.contains("outcome=client_stalled"), "{logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_bodies_past_max_buffered_request_mb_wait_for_room_then_get_503() {
    use crate::harness::upstream::{json, Gate};
    // The first request's upstream holds its answer until the gate opens, so its 700 KB body
    // stays held; the budget is 1 MiB.
    let gate = Gate::new();
    let g = gate.clone();
    let first = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let mut up = Upstream::start(move |_| {
        let mut steps = Vec::new();
        if first.swap(false, std::sync::atomic::Ordering::SeqCst) {
            steps.push(Step::Wait(g.clone()));
        }
        steps.push(Step::Write(json(r#"{"ok":true}"#)));
        steps
    })
    .await;
    let server = "[server]\nmax_request_bytes = 1048576\nmax_buffered_request_mb = 1\nbody_timeout_secs = 0.5\n";
    let gw = Gateway::start(&config(up.addr, "", server));
    let body = format!(r#"{{"model":"m-1","messages":[{{"role":"user","content":"{}"}}]}}"#, "x".repeat(700_000));
    let mut holder = Client::connect(gw.addr).await;
    holder.send(&post("/v1/chat/completions", &[], &body)).await;
    up.request().await;

    // No room: the second waits its body timeout, then 503 with Retry-After; never upstream.
    let started = Instant::now();
    let mut second = Client::connect(gw.addr).await;
    second.send(&post("/v1/chat/completions", &[], &body)).await;
    let r = second.response().await;
    assert_eq!(r.openai_error(503)["code"], "gateway_busy");
    assert_eq!(r.head.get("retry-after"), Some("1"));
    assert!(started.elapsed() >= Duration::from_millis(400), "answered before the body timeout");
    assert!(up.try_request().is_none(), "a refused request reached the upstream");

    // A request waiting for room gets it when the first is done.
    let mut third = Client::connect(gw.addr).await;
    third.send(&post("/v1/chat/completions", &[], &body)).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    gate.open();
    assert_eq!(holder.response().await.status(), 200);
    assert_eq!(third.response().await.status(), 200);
}
