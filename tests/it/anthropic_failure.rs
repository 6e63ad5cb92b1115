//! The translating body over real sockets: an Anthropic stream that fails after the head went
//! out ends with one OpenAI error event and no `[DONE]` (cut before `message_stop`, the
//! connection closed or reset mid-body, a malformed event), and a client that goes away closes
//! the upstream connection. The upstream is the scripted raw-TCP one; the client is raw too.

use crate::harness::client::{post, Client};
use crate::harness::upstream::{chunk, sse_head, Gate, Step, Upstream, LAST_CHUNK};
use crate::harness::Gateway;
use serde_json::Value;
use std::net::SocketAddr;

const REQUEST: &str = r#"{"model":"claude-x","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;

/// The upstream's first events: the message starts and a text block says "Hello".
const OPENING: &str = "event: message_start\n\
data: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"type\":\"message\",\"role\":\"assistant\",\"model\":\"claude-x\",\"content\":[],\"usage\":{\"input_tokens\":5,\"output_tokens\":1}}}\n\n\
event: content_block_start\n\
data: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n\
event: content_block_delta\n\
data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hello\"}}\n\n";

/// The client-side bytes that show "Hello" went out.
const HELLO: &[u8] = b"\"content\":\"Hello\"";

fn config(upstream: SocketAddr) -> String {
    format!(
        "[connections.claude]\napi_type = \"anthropic\"\napi_base = \"http://{upstream}\"\napi_key = \"sk-ant-test\"\n\n\
         [routing]\n\"claude*\" = \"claude.*\"\n"
    )
}

fn chat() -> Vec<u8> {
    post("/v1/chat/completions", &[], REQUEST)
}

/// The `data:` payloads of an OpenAI stream, parsed (`[DONE]` as a string).
fn events(body: &[u8]) -> Vec<Value> {
    let text = String::from_utf8_lossy(body);
    text.split_terminator("\n\n")
        .map(|e| {
            let data = e.strip_prefix("data: ").unwrap_or_else(|| panic!("not a data event: {e:?} in {text:?}"));
            if data == "[DONE]" {
                Value::String(data.into())
            } else {
                serde_json::from_str(data).unwrap_or_else(|err| panic!("{err}: {data:?}"))
            }
        })
        .collect()
}

/// Asserts a stream that carried "Hello" and then ended with exactly one error event (with the
/// given `code`) and no `[DONE]`.
fn assert_hello_then_error(body: &[u8], code: &str) {
    let events = events(body);
    let (last, before) = events.split_last().expect("some events");
    let texts: Vec<&str> =
        before.iter().filter_map(|e| e.pointer("/choices/0/delta/content").and_then(Value::as_str)).collect();
    assert_eq!(texts, ["", "Hello"], "role chunk then the text: {events:?}");
    assert!(before.iter().all(|e| e.get("error").is_none() && e != "[DONE]"), "{events:?}");
    let e = &last["error"];
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{last}");
    assert_eq!(e["code"], code, "{last}");
}

/// Sends the streamed request and checks the head: 200, SSE.
async fn start(gw: &Gateway) -> Client {
    let mut client = Client::connect(gw.addr).await;
    client.send(&chat()).await;
    let head = client.head().await;
    assert_eq!(head.status, 200);
    assert_eq!(head.get("content-type"), Some("text/event-stream"));
    client
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_anthropic_stream_that_ends_without_message_stop_ends_with_an_error_event_and_no_done() {
    // A clean end of the chunked body: the upstream said it was done, but the message was not.
    let mut up = Upstream::start(|_| {
        vec![Step::Write(sse_head(&[])), Step::Write(chunk(OPENING.as_bytes())), Step::Write(LAST_CHUNK.to_vec())]
    })
    .await;
    let gw = Gateway::start(&config(up.addr));
    let mut client = start(&gw).await;
    let body = client.rest().await.expect("the stream ends properly, with its error event");
    assert_hello_then_error(&body, "upstream_error");
    let req = up.request().await;
    assert_eq!(req.path, "/v1/messages");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_anthropic_stream_whose_connection_closes_mid_body_ends_with_an_error_event() {
    // FIN inside the chunked body, half an event held back.
    let _up = Upstream::start(|_| {
        vec![
            Step::Write(sse_head(&[])),
            Step::Write(chunk(OPENING.as_bytes())),
            Step::Write(chunk(b"event: content_block_delta\ndata: {\"type\":\"content_block_del")),
            Step::Close,
        ]
    })
    .await;
    let gw = Gateway::start(&config(_up.addr));
    let mut client = start(&gw).await;
    let body = client.rest().await.expect("the stream ends properly, with its error event");
    assert_hello_then_error(&body, "upstream_error");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_anthropic_stream_reset_by_the_upstream_ends_with_an_error_event() {
    let gate = Gate::new();
    let g = gate.clone();
    let _up = Upstream::start(move |_| {
        vec![Step::Write(sse_head(&[])), Step::Write(chunk(OPENING.as_bytes())), Step::Wait(g.clone()), Step::Reset]
    })
    .await;
    let gw = Gateway::start(&config(_up.addr));
    let mut client = start(&gw).await;
    let mut body = client.until(HELLO).await;
    // Reset only once "Hello" has reached the client, so no data is lost to the RST.
    gate.open();
    body.extend(client.rest().await.expect("the stream ends properly, with its error event"));
    assert_hello_then_error(&body, "upstream_error");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_anthropic_event_ends_the_stream_with_an_error_event() {
    let broken = "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"lost\"\n\n\
event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\" after\"}}\n\n\
event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";
    let _up = Upstream::start(move |_| {
        vec![
            Step::Write(sse_head(&[])),
            Step::Write(chunk(OPENING.as_bytes())),
            Step::Write(chunk(broken.as_bytes())),
            Step::Write(LAST_CHUNK.to_vec()),
        ]
    })
    .await;
    let gw = Gateway::start(&config(_up.addr));
    let mut client = start(&gw).await;
    let body = client.rest().await.expect("the stream ends properly, with its error event");
    assert_hello_then_error(&body, "upstream_error");
    assert!(!String::from_utf8_lossy(&body).contains("after"), "nothing after the malformed event");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_mid_anthropic_stream_closes_the_upstream_connection() {
    let mut up =
        Upstream::start(|_| vec![Step::Write(sse_head(&[])), Step::Write(chunk(OPENING.as_bytes())), Step::Hang]).await;
    let gw = Gateway::start(&config(up.addr));
    let mut client = start(&gw).await;
    client.until(HELLO).await;
    let req = up.request().await;
    drop(client);
    assert_eq!(up.closed().await, req.conn);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_beta_goes_upstream_only_where_a_connection_opts_in() {
    let message = r#"{"id":"msg_1","type":"message","role":"assistant","model":"claude-x","content":[{"type":"text","text":"hi"}],"stop_reason":"end_turn","usage":{"input_tokens":1,"output_tokens":1}}"#;
    let mut up = Upstream::start(move |_| vec![Step::Write(crate::harness::upstream::json(message))]).await;
    let request = r#"{"model":"claude-x","messages":[{"role":"user","content":"hi"}]}"#;
    let beta = [("anthropic-beta", "tools-2099")];
    for (opt_in, forwarded) in [("", false), ("forward_headers = [\"anthropic-beta\"]\n", true)] {
        let toml =
            config(up.addr).replace("api_key = \"sk-ant-test\"\n", &format!("api_key = \"sk-ant-test\"\n{opt_in}"));
        let gw = Gateway::start(&toml);
        let resp = crate::harness::client::exchange(gw.addr, &post("/v1/chat/completions", &beta, request)).await;
        assert_eq!(resp.status(), 200, "{}", resp.text());
        let got = up.request().await.all("anthropic-beta");
        assert_eq!(got.is_empty(), !forwarded, "opt-in {opt_in:?}: {got:?}");
    }
}
