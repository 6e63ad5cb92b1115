//! Upstream failures as the client sees them: before the head an OpenAI error with 502/504;
//! after it one final SSE error event and no `[DONE]`; the provider's rejection of the gateway's
//! key never shows the provider's body; and a client that goes away takes the upstream
//! connection with it.

use crate::harness::client::{exchange, post, Client};
use crate::harness::upstream::{chunk, response, sse_head, Gate, Step, Upstream};
use crate::harness::{config, dead_port, Gateway};

const STREAM_REQUEST: &str = r#"{"model":"m-1","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
const FIRST: &str = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"first\"}}]}\n\n";

fn chat(body: &str) -> Vec<u8> {
    post("/v1/chat/completions", &[], body)
}

/// The single `data:` error event a stream ends with, parsed; panics unless `tail` is exactly
/// one such event.
fn final_error_event(tail: &[u8]) -> serde_json::Value {
    let text = String::from_utf8_lossy(tail);
    let json = text
        .strip_prefix("data: ")
        .and_then(|t| t.strip_suffix("\n\n"))
        .unwrap_or_else(|| panic!("not one data event: {text:?}"));
    assert!(!json.contains('\n'), "more than one event: {text:?}");
    let v: serde_json::Value = serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {text:?}"));
    assert!(v["error"]["message"].is_string() && v["error"]["type"].is_string(), "{v}");
    v["error"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_connection_is_a_502_openai_error() {
    let gw = Gateway::start(&config(dead_port(), "connect_timeout_secs = 2", ""));
    let resp = exchange(gw.addr, &chat(r#"{"model":"m-1","messages":[{"role":"user","content":"hi"}]}"#)).await;
    let e = resp.openai_error(502);
    assert_eq!(e["code"], "upstream_error");
    assert!(!resp.text().contains("sk-up"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_closes_without_answering_is_a_502() {
    let mut up = Upstream::start(|_| vec![Step::Close]).await;
    let gw = Gateway::start(&config(up.addr, "", ""));
    let resp = exchange(gw.addr, &chat(r#"{"model":"m-1","messages":[{"role":"user","content":"hi"}]}"#)).await;
    assert_eq!(resp.openai_error(502)["code"], "upstream_error");
    up.request().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_never_sends_a_head_is_a_504_after_the_header_timeout() {
    let mut up = Upstream::start(|_| vec![Step::Hang]).await;
    let gw = Gateway::start(&config(up.addr, "header_timeout_secs = 0.3", ""));
    let resp = exchange(gw.addr, &chat(STREAM_REQUEST)).await;
    assert_eq!(resp.openai_error(504)["code"], "upstream_timeout");
    // The abandoned upstream request is not left open.
    let req = up.request().await;
    assert_eq!(up.closed().await, req.conn);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_stalled_past_the_idle_timeout_ends_with_one_error_event_and_no_done() {
    // Head and first event in one write, so the first event cannot be late for the timer.
    let mut up =
        Upstream::start(|_| vec![Step::Write([sse_head(&[]), chunk(FIRST.as_bytes())].concat()), Step::Hang]).await;
    let gw = Gateway::start(&config(up.addr, "idle_timeout_secs = 0.3", ""));
    let mut client = Client::connect(gw.addr).await;
    client.send(&chat(STREAM_REQUEST)).await;
    assert_eq!(client.head().await.status, 200);
    let body = client.rest().await.expect("the stream ends properly, with its error event");
    let tail = body.strip_prefix(FIRST.as_bytes()).unwrap_or_else(|| panic!("{:?}", String::from_utf8_lossy(&body)));
    let e = final_error_event(tail);
    assert_eq!(e["code"], "upstream_timeout");
    assert!(!String::from_utf8_lossy(&body).contains("[DONE]"));
    let req = up.request().await;
    assert_eq!(up.closed().await, req.conn, "the stalled upstream connection is closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_reset_by_the_upstream_ends_with_one_error_event_and_no_done() {
    let gate = Gate::new();
    let g = gate.clone();
    let _up = Upstream::start(move |_| {
        vec![Step::Write(sse_head(&[])), Step::Write(chunk(FIRST.as_bytes())), Step::Wait(g.clone()), Step::Reset]
    })
    .await;
    let gw = Gateway::start(&config(_up.addr, "", ""));
    let mut client = Client::connect(gw.addr).await;
    client.send(&chat(STREAM_REQUEST)).await;
    assert_eq!(client.head().await.status, 200);
    assert_eq!(client.until(FIRST.as_bytes()).await, FIRST.as_bytes());
    // Reset only once the first event has reached the client, so no data is lost to the RST.
    gate.open();
    let tail = client.rest().await.expect("the stream ends properly, with its error event");
    let e = final_error_event(&tail);
    assert_eq!(e["code"], "upstream_error");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_cut_by_the_upstream_mid_event_ends_with_one_error_event() {
    // A clean FIN inside the chunked body, with half an event held back: the half must not
    // reach the client glued to the error event.
    let _up = Upstream::start(|_| {
        vec![
            Step::Write(sse_head(&[])),
            Step::Write(chunk(FIRST.as_bytes())),
            Step::Write(chunk(b"data: {\"choices\":[{\"ind")),
            Step::Close,
        ]
    })
    .await;
    let gw = Gateway::start(&config(_up.addr, "", ""));
    let mut client = Client::connect(gw.addr).await;
    client.send(&chat(STREAM_REQUEST)).await;
    assert_eq!(client.head().await.status, 200);
    let body = client.rest().await.expect("the stream ends properly, with its error event");
    let tail = body.strip_prefix(FIRST.as_bytes()).unwrap_or_else(|| panic!("{:?}", String::from_utf8_lossy(&body)));
    assert_eq!(final_error_event(tail)["code"], "upstream_error");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_401_is_a_502_without_the_upstream_body() {
    for status in [401, 403] {
        let body = r#"{"error":{"message":"Incorrect API key provided: sk-up-FAKE1234. You can find your API key at https://platform.openai.com.","type":"invalid_request_error","code":"invalid_api_key"}}"#;
        let _up = Upstream::start(move |_| {
            vec![Step::Write(response(status, "application/json", &[("x-leak", "sk-up-FAKE1234")], body))]
        })
        .await;
        let gw = Gateway::start(&config(_up.addr, "", ""));
        let resp = exchange(gw.addr, &chat(r#"{"model":"m-1","messages":[{"role":"user","content":"hi"}]}"#)).await;
        let e = resp.openai_error(502);
        assert_eq!(e["code"], "upstream_error");
        let all = format!("{:?}{}", resp.head, resp.text());
        assert!(!all.contains("FAKE1234") && !all.contains("sk-up"), "{all}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_429_and_500_bodies_pass_through_with_their_status() {
    let cases = [
        (
            429,
            r#"{"error":{"message":"Rate limit reached for requests","type":"requests","param":null,"code":"rate_limit_exceeded"}}"#,
        ),
        (
            500,
            r#"{"error":{"message":"The server had an error while processing your request.","type":"server_error","param":null,"code":null}}"#,
        ),
    ];
    for (status, body) in cases {
        let _up = Upstream::start(move |_| {
            vec![Step::Write(response(status, "application/json", &[("retry-after", "7")], body))]
        })
        .await;
        let gw = Gateway::start(&config(_up.addr, "", ""));
        for request in [r#"{"model":"m-1","messages":[{"role":"user","content":"hi"}]}"#, STREAM_REQUEST] {
            let resp = exchange(gw.addr, &chat(request)).await;
            assert_eq!(resp.status(), status);
            assert_eq!(resp.text(), body, "{request}");
            assert_eq!(resp.head.get("retry-after"), Some("7"));
            assert_eq!(resp.head.get("content-type"), Some("application/json"));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_mid_stream_closes_the_upstream_connection() {
    let mut up =
        Upstream::start(|_| vec![Step::Write(sse_head(&[])), Step::Write(chunk(FIRST.as_bytes())), Step::Hang]).await;
    let gw = Gateway::start(&config(up.addr, "", ""));
    let mut client = Client::connect(gw.addr).await;
    client.send(&chat(STREAM_REQUEST)).await;
    assert_eq!(client.head().await.status, 200);
    client.until(FIRST.as_bytes()).await;
    let req = up.request().await;
    drop(client);
    assert_eq!(up.closed().await, req.conn);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_while_waiting_for_the_head_closes_the_upstream_connection() {
    let mut up = Upstream::start(|_| vec![Step::Hang]).await;
    let gw = Gateway::start(&config(up.addr, "", ""));
    let mut client = Client::connect(gw.addr).await;
    client.send(&chat(STREAM_REQUEST)).await;
    let req = up.request().await;
    drop(client);
    assert_eq!(up.closed().await, req.conn);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_upstream_that_accepts_tcp_but_never_answers_the_tls_handshake_is_a_502_after_the_connect_timeout() {
    // Accepts connections and holds them open without a byte: TCP connect succeeds, the TLS
    // ClientHello is never answered.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    let (accepted_tx, mut accepted) = tokio::sync::mpsc::unbounded_channel();
    let silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
            let _ = accepted_tx.send(());
        }
    });
    // The header timeout would answer 504; the connect timeout, shorter, must answer first.
    let gw = Gateway::start(&format!(
        "[connections.up]\napi_type = \"openai\"\napi_base = \"https://{addr}/v1\"\napi_key = \"sk-up\"\n\
         connect_timeout_secs = 1\nheader_timeout_secs = 4\n\n[routing]\n\"m*\" = \"up.*\"\n"
    ));
    let resp = exchange(gw.addr, &chat(r#"{"model":"m-1","messages":[{"role":"user","content":"hi"}]}"#)).await;
    let e = resp.openai_error(502);
    assert_eq!(e["code"], "upstream_error");
    let message = e["message"].as_str().unwrap_or_default();
    assert!(message.contains("`up`") && message.contains("within 1s") && message.contains("TLS"), "{message}");
    assert!(accepted.try_recv().is_ok(), "the TCP connection was accepted, so the TLS handshake is what stalled");
    silent.abort();
}
