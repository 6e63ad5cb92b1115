//! What reaches the client, byte for byte: a passthrough stream is the upstream's bytes minus
//! only the usage-only event the gateway asked for on the client's behalf; a JSON body is the
//! upstream's; each frame is forwarded as it arrives, not when the upstream finishes; and the
//! response headers are exactly the allow-listed ones (rate limits and request ids, never cookies).

use crate::harness::client::{exchange, post, Client, Head};
use crate::harness::upstream::{chunk, response, sse_head, Gate, Step, Upstream, LAST_CHUNK};
use crate::harness::{config, Gateway};
use std::time::Duration;

/// An OpenAI chat stream with line ends `nl`, as its events: the usage-only event is
/// `events[USAGE]`.
fn stream_events(nl: &str) -> Vec<String> {
    let ev = |data: &str| format!("data: {data}{nl}{nl}");
    vec![
        ev(
            r#"{"id":"c1","object":"chat.completion.chunk","created":1,"model":"m-1","choices":[{"index":0,"delta":{"role":"assistant","content":"Hel"},"finish_reason":null}],"usage":null}"#,
        ),
        format!(": keep-alive{nl}{nl}"),
        ev(
            r#"{"id":"c1","object":"chat.completion.chunk","created":1,"model":"m-1","choices":[{"index":0,"delta":{"content":"lo \"usage\" \u00e9"},"finish_reason":null}],"usage":null}"#,
        ),
        ev(
            r#"{"id":"c1","object":"chat.completion.chunk","created":1,"model":"m-1","choices":[{"index":0,"delta":{},"finish_reason":"stop"}],"usage":null}"#,
        ),
        ev(
            r#"{"id":"c1","object":"chat.completion.chunk","created":1,"model":"m-1","choices":[],"usage":{"prompt_tokens":9,"completion_tokens":2,"total_tokens":11}}"#,
        ),
        ev("[DONE]"),
    ]
}
const USAGE: usize = 4;

/// The stream as chunks cut at awkward places: inside `data:`, after each byte of the first
/// event's terminator (so a CR and its LF arrive apart), inside the usage event, inside the end.
fn awkward_chunks(stream: &[u8]) -> Vec<Vec<u8>> {
    let find = |needle: &[u8]| stream.windows(needle.len()).position(|w| w == needle).expect("needle in stream");
    let first_json_end = find(b"\"usage\":null}") + 13;
    let usage = find(b"\"choices\":[]");
    let mut cuts: Vec<usize> = vec![3, usage + 5, stream.len() - 3];
    cuts.extend((1..=3).map(|i| first_json_end + i));
    cuts.sort();
    cuts.dedup();
    let mut out = Vec::new();
    let mut at = 0;
    for c in cuts {
        out.push(stream[at..c].to_vec());
        at = c;
    }
    out.push(stream[at..].to_vec());
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_reaches_the_client_byte_for_byte_minus_only_the_usage_event_it_did_not_ask_for() {
    for nl in ["\n", "\r\n"] {
        let events = stream_events(nl);
        let stream = events.concat().into_bytes();
        let chunks = awkward_chunks(&stream);
        let mut up = Upstream::start(move |_| {
            let mut script = vec![Step::Write(sse_head(&[
                ("x-request-id", "req-7"),
                ("set-cookie", "up=1"),
                ("x-upstream-secret", "zzz"),
            ]))];
            // Short pauses between the pieces so the gateway likely reads them apart; the
            // expected bytes are the same however they are cut.
            for c in &chunks {
                script.push(Step::Write(chunk(c)));
                script.push(Step::Pause(Duration::from_millis(3)));
            }
            script.push(Step::Write(LAST_CHUNK.to_vec()));
            script
        })
        .await;
        let gw = Gateway::start(&config(up.addr, "", ""));

        // The client did not ask for usage: the gateway did, so it removes that one event.
        let resp = exchange(
            gw.addr,
            &post(
                "/v1/chat/completions",
                &[],
                r#"{"model":"m-1","stream":true,"messages":[{"role":"user","content":"hi"}]}"#,
            ),
        )
        .await;
        assert_eq!(resp.status(), 200, "{}", resp.text());
        let mut want = events.clone();
        want.remove(USAGE);
        assert_eq!(resp.text(), want.concat(), "line ends {nl:?}");
        assert_eq!(resp.head.get("content-type"), Some("text/event-stream"));
        assert_eq!(resp.head.get("x-upstream-request-id"), Some("req-7"));
        assert_eq!(resp.head.get("x-request-id").map(str::len), Some(32), "the gateway's id");
        assert_eq!(resp.head.get("set-cookie"), None);
        assert_eq!(resp.head.get("x-upstream-secret"), None);
        assert!(up.request().await.body_text().contains("\"include_usage\":true"));

        // The client asked for usage: every byte as the upstream sent it.
        let resp = exchange(
            gw.addr,
            &post(
                "/v1/chat/completions",
                &[],
                r#"{"model":"m-1","messages":[{"role":"user","content":"hi"}],"stream":true,"stream_options":{"include_usage":true}}"#,
            ),
        )
        .await;
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.body, stream, "line ends {nl:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_json_body_reaches_the_client_byte_for_byte() {
    let body = "{\n  \"id\": \"chatcmpl-1\",\n  \"object\": \"chat.completion\",\n  \"choices\": [{\"index\": 0, \"message\": {\"role\": \"assistant\", \"content\": \"caf\\u00e9 \\\"usage\\\"\"}, \"finish_reason\": \"stop\"}],\n  \"usage\": {\"prompt_tokens\": 5, \"completion_tokens\": 7, \"total_tokens\": 12}\n}\n";
    let mut up =
        Upstream::start(move |_| vec![Step::Write(response(200, "application/json", UPSTREAM_HEADERS, body))]).await;
    let gw = Gateway::start(&config(up.addr, "", ""));
    let resp = exchange(
        gw.addr,
        &post("/v1/chat/completions", &[], r#"{"model":"m-1","messages":[{"role":"user","content":"hi"}]}"#),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text(), body);
    let length = body.len().to_string();
    let mut want = vec![("content-type", "application/json"), ("content-length", length.as_str())];
    want.extend(FORWARDED_HEADERS);
    assert_eq!(headers_but_date(&resp.head), want);
    up.request().await;
}

/// What OpenAI sends with a response, and then some that must not reach the client.
const UPSTREAM_HEADERS: &[(&str, &str)] = &[
    ("date", "Tue, 01 Jan 2030 00:00:00 GMT"),
    ("x-ratelimit-limit-requests", "10000"),
    ("x-ratelimit-limit-tokens", "30000000"),
    ("x-ratelimit-remaining-requests", "9999"),
    ("x-ratelimit-remaining-tokens", "29999990"),
    ("x-ratelimit-reset-requests", "6ms"),
    ("x-ratelimit-reset-tokens", "0s"),
    ("openai-organization", "org-example"),
    ("openai-project", "proj_example"),
    ("openai-processing-ms", "12"),
    ("openai-version", "2020-10-01"),
    ("x-request-id", "req_0123456789abcdef"),
    ("retry-after-ms", "250"),
    ("retry-after", "1"),
    ("set-cookie", "__cf_bm=secret-session; path=/; HttpOnly"),
    ("set-cookie", "_cfuvid=another; path=/"),
    ("cf-ray", "8f0000000000abcd-AMS"),
    ("strict-transport-security", "max-age=31536000"),
    ("alt-svc", "h3=\":443\"; ma=86400"),
    ("connection", "keep-alive"),
    ("server", "cloudflare"),
];

/// [`UPSTREAM_HEADERS`] as the client must see them: the allow-listed ones, in upstream order.
const FORWARDED_HEADERS: &[(&str, &str)] = &[
    ("x-ratelimit-limit-requests", "10000"),
    ("x-ratelimit-limit-tokens", "30000000"),
    ("x-ratelimit-remaining-requests", "9999"),
    ("x-ratelimit-remaining-tokens", "29999990"),
    ("x-ratelimit-reset-requests", "6ms"),
    ("x-ratelimit-reset-tokens", "0s"),
    ("openai-processing-ms", "12"),
    ("openai-version", "2020-10-01"),
    // The gateway's request id (the client sent none) where the upstream's was; the upstream's
    // own kept beside it.
    ("x-request-id", GENERATED),
    ("retry-after-ms", "250"),
    ("retry-after", "1"),
    ("x-upstream-request-id", "req_0123456789abcdef"),
];

/// Stands for a request id the gateway generated (32 hex digits).
const GENERATED: &str = "(generated)";

/// The response's headers in order, without the one `date` the gateway's server adds, and
/// with a generated request id as [`GENERATED`].
fn headers_but_date(head: &Head) -> Vec<(&str, &str)> {
    assert_eq!(head.headers.iter().filter(|(n, _)| n == "date").count(), 1, "{:?}", head.headers);
    let generated = |v: &str| v.len() == 32 && v.bytes().all(|b| b.is_ascii_hexdigit());
    head.headers
        .iter()
        .filter(|(n, _)| n != "date")
        .map(|(n, v)| (n.as_str(), if n == "x-request-id" && generated(v) { GENERATED } else { v.as_str() }))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_and_an_error_carry_the_same_allow_listed_headers() {
    let stream = "data: {\"choices\":[]}\n\ndata: [DONE]\n\n";
    let error =
        r#"{"error":{"message":"Rate limit reached","type":"requests","param":null,"code":"rate_limit_exceeded"}}"#;
    let mut up = Upstream::start(move |req| {
        if req.body_text().contains("\"stream\":true") {
            vec![
                Step::Write(sse_head(UPSTREAM_HEADERS)),
                Step::Write(chunk(stream.as_bytes())),
                Step::Write(LAST_CHUNK.to_vec()),
            ]
        } else {
            vec![Step::Write(response(429, "application/json", UPSTREAM_HEADERS, error))]
        }
    })
    .await;
    let gw = Gateway::start(&config(up.addr, "", ""));

    let resp = exchange(
        gw.addr,
        &post(
            "/v1/chat/completions",
            &[],
            r#"{"model":"m-1","messages":[{"role":"user","content":"hi"}],"stream":true}"#,
        ),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let mut want = vec![("content-type", "text/event-stream")];
    want.extend(FORWARDED_HEADERS);
    want.push(("transfer-encoding", "chunked"));
    assert_eq!(headers_but_date(&resp.head), want);

    let resp = exchange(
        gw.addr,
        &post("/v1/chat/completions", &[], r#"{"model":"m-1","messages":[{"role":"user","content":"hi"}]}"#),
    )
    .await;
    assert_eq!(resp.status(), 429);
    assert_eq!(resp.text(), error);
    let length = error.len().to_string();
    let mut want = vec![("content-type", "application/json"), ("content-length", length.as_str())];
    want.extend(FORWARDED_HEADERS);
    assert_eq!(headers_but_date(&resp.head), want);
    up.request().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_reaches_the_client_before_the_upstream_finishes() {
    let first = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"first\"}}]}\n\n";
    let rest = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"second\"}}]}\n\ndata: [DONE]\n\n";
    let gate = Gate::new();
    let g = gate.clone();
    let mut up = Upstream::start(move |_| {
        vec![
            Step::Write(sse_head(&[])),
            Step::Write(chunk(first.as_bytes())),
            Step::Wait(g.clone()),
            Step::Write(chunk(rest.as_bytes())),
            Step::Write(LAST_CHUNK.to_vec()),
        ]
    })
    .await;
    let gw = Gateway::start(&config(up.addr, "", ""));
    // Whether or not the gateway filters the stream for the usage event, and on one keep-alive
    // connection.
    let mut client = Client::connect(gw.addr).await;
    for body in [
        r#"{"model":"m-1","messages":[{"role":"user","content":"hi"}],"stream":true,"stream_options":{"include_usage":true}}"#,
        r#"{"model":"m-1","messages":[{"role":"user","content":"hi"}],"stream":true}"#,
    ] {
        client.send(&post("/v1/chat/completions", &[], body)).await;
        let head = client.head().await;
        assert_eq!(head.status, 200);
        // The upstream holds the rest back until the gate opens: the first event must come now.
        let got = client.until(first.as_bytes()).await;
        assert_eq!(got, first.as_bytes());
        gate.open();
        let got = client.rest().await.expect("the stream completes");
        assert_eq!(String::from_utf8_lossy(&got), rest);
        assert!(up.request().await.body_text().contains("\"include_usage\":true"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_json_body_stalled_past_the_idle_timeout_is_a_504_not_a_complete_answer() {
    let body = r#"{"id":"chatcmpl-1","choices":[{"index":0,"message":{"role":"assistant","content":"partial"}}]}"#;
    let mut up = Upstream::start(move |_| {
        let full = response(200, "application/json", &[], body);
        vec![Step::Write(full[..full.len() - 10].to_vec()), Step::Hang]
    })
    .await;
    let gw = Gateway::start(&config(up.addr, "idle_timeout_secs = 0.3", ""));
    let mut client = Client::connect(gw.addr).await;
    client
        .send(&post("/v1/chat/completions", &[], r#"{"model":"m-1","messages":[{"role":"user","content":"hi"}]}"#))
        .await;
    // A small JSON body is read whole before its head goes out (its head carries the cost):
    // one that stalls is a failed attempt, answered with an error, never half a document.
    let head = client.head().await;
    assert_eq!(head.status, 504);
    let got = client.rest().await.expect("the error is whole");
    let got = String::from_utf8_lossy(&got);
    assert!(got.contains("\"type\"") && got.contains("no data from the upstream"), "{got}");
    let req = up.request().await;
    assert_eq!(up.closed().await, req.conn);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_content_length_sent_together_with_chunked_framing_is_not_forwarded() {
    // RFC 9112 §6.1: with Transfer-Encoding, Content-Length is ignored; forwarding it would frame
    // the client's body by a length the upstream never honoured.
    let body = r#"{"id":"x","usage":{"prompt_tokens":1,"completion_tokens":2}}"#;
    let up = Upstream::start(move |_| {
        let head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n";
        let mut out = head.as_bytes().to_vec();
        out.extend_from_slice(&chunk(body.as_bytes()));
        out.extend_from_slice(LAST_CHUNK);
        vec![Step::Write(out)]
    })
    .await;
    let gw = Gateway::start(&config(up.addr, "", ""));
    let resp = exchange(
        gw.addr,
        &post("/v1/chat/completions", &[], r#"{"model":"m-1","messages":[{"role":"user","content":"hi"}]}"#),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_ne!(resp.head.get("content-length"), Some("5"));
    assert_eq!(resp.text(), body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_encoded_success_body_is_a_clear_502_not_an_unobservable_relay() {
    let up = Upstream::start(|_| {
        vec![Step::Write(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-encoding: gzip\r\ncontent-length: 4\r\n\r\n\x1f\x8b\x08\x00"
                .to_vec(),
        )]
    })
    .await;
    let gw = Gateway::start(&config(up.addr, "", ""));
    let resp = exchange(
        gw.addr,
        &post("/v1/chat/completions", &[], r#"{"model":"m-1","messages":[{"role":"user","content":"hi"}]}"#),
    )
    .await;
    let e = resp.openai_error(502);
    assert!(e["message"].as_str().unwrap().contains("content-encoding `gzip`"), "{e}");
}
