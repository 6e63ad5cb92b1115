//! What reaches the upstream, byte for byte: the path, the gateway's own credential instead of
//! the client's, `accept-encoding: identity`, allow-listed headers only, and the client's body
//! untouched but for the two splices (the routed model name, and `include_usage` on streams).

use crate::harness::client::{exchange, post};
use crate::harness::upstream::{json, response, Step, Upstream};
use crate::harness::{config, Gateway};

/// An upstream that answers every request with a small complete response.
async fn answering_upstream() -> Upstream {
    Upstream::start(|req| {
        if req.body_text().contains("\"stream\":true") {
            vec![Step::Write(response(200, "text/event-stream", &[], "data: [DONE]\n\n"))]
        } else {
            vec![Step::Write(json(r#"{"ok":true}"#))]
        }
    })
    .await
}

const CLIENT_HEADERS: &[(&str, &str)] = &[
    ("authorization", "Bearer gw-key"),
    ("x-api-key", "gw-key"),
    ("api-key", "gw-key"),
    ("cookie", "session=s3cret-cookie"),
    ("user-agent", "it-client/1.0"),
    ("openai-beta", "assistants=v2"),
    ("idempotency-key", "idem-42"),
    ("accept", "application/json"),
    ("x-trace-id", "trace-1"),
    ("x-custom", "drop-me"),
    ("openai-organization", "org-client"),
    ("accept-encoding", "gzip, br"),
    ("proxy-authorization", "Basic cHJveHk="),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_gets_the_clients_body_and_allowed_headers_with_only_the_gateways_key() {
    let mut up = answering_upstream().await;
    let gw =
        Gateway::start(&config(up.addr, "forward_headers = [\"x-trace-*\"]", "[groups.g]\napi_keys = [\"gw-key\"]\n"));
    let cases = [
        (
            "/v1/chat/completions",
            "{ \"model\" : \"m-1\" ,\n\t\"messages\":[{\"role\":\"user\",\"content\":\"caf\\u00e9 \\\"q\\\"\"}] }",
        ),
        ("/v1/embeddings", r#"{"model":"m-emb","input":["a","b"],"encoding_format":"float"}"#),
        ("/v1/completions", r#"{"model":"m-1","prompt":"Say this is a test","max_tokens":7}"#),
    ];
    for (path, body) in cases {
        let resp = exchange(gw.addr, &post(path, CLIENT_HEADERS, body)).await;
        assert_eq!(resp.status(), 200, "{path}: {}", resp.text());
        assert_eq!(resp.body, br#"{"ok":true}"#);

        let req = up.request().await;
        let head = String::from_utf8_lossy(&req.raw[..req.raw.len() - req.body.len()]).into_owned();
        assert_eq!(req.method, "POST", "{head}");
        assert_eq!(req.path, path, "{head}");
        assert_eq!(req.version, 1, "{head}");
        assert_eq!(req.body_text(), body, "{path}: the body must be byte-identical");
        assert_eq!(req.header("authorization"), "Bearer sk-up");
        assert_eq!(req.header("accept-encoding"), "identity");
        assert_eq!(req.header("content-type"), "application/json");
        assert_eq!(req.header("content-length"), body.len().to_string());
        assert_eq!(req.header("host"), up.addr.to_string());
        assert_eq!(req.header("user-agent"), "it-client/1.0");
        assert_eq!(req.header("openai-beta"), "assistants=v2");
        assert_eq!(req.header("idempotency-key"), "idem-42");
        assert_eq!(req.header("accept"), "application/json");
        assert_eq!(req.header("x-trace-id"), "trace-1", "forward_headers pattern");
        let id = req.header("x-request-id");
        assert!(id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()), "a generated request id: {id}");
        assert_eq!(
            req.header_names(),
            [
                "accept",
                "accept-encoding",
                "authorization",
                "content-length",
                "content-type",
                "host",
                "idempotency-key",
                "openai-beta",
                "user-agent",
                "x-request-id",
                "x-trace-id"
            ],
            "{head}"
        );
        for secret in ["gw-key", "s3cret-cookie", "org-client", "drop-me", "cHJveHk="] {
            assert!(!head.contains(secret), "`{secret}` leaked upstream:\n{head}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renamed_route_changes_only_the_top_level_model_value() {
    let mut up = answering_upstream().await;
    let gw = Gateway::start(&config(up.addr, "", ""));
    let cases = [
        // Odd white space, and `model` keys and values nested in messages that must stay.
        (
            "{ \"messages\" : [ {\"role\":\"user\",\"content\":\"the \\\"model\\\": \\\"alias\\\" text\",\"model\":\"alias\"} ] ,\n\t\"model\"  :  \"alias\"  , \"n\":1 }",
            "{ \"messages\" : [ {\"role\":\"user\",\"content\":\"the \\\"model\\\": \\\"alias\\\" text\",\"model\":\"alias\"} ] ,\n\t\"model\"  :  \"real\"  , \"n\":1 }",
        ),
        // The model value written with an escape.
        (r#"{"model":"al\u0069as","messages":[{"role":"user","content":"x"}],"user":"mod\"el"}"#, r#"{"model":"real","messages":[{"role":"user","content":"x"}],"user":"mod\"el"}"#),
        // The key written with an escape.
        ("{\"metadata\":{\"model\":\"alias\"},\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],\r\n\"mod\\u0065l\"\r\n:\r\n\"alias\"}", "{\"metadata\":{\"model\":\"alias\"},\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],\r\n\"mod\\u0065l\"\r\n:\r\n\"real\"}"),
        // A stream: the rename and the usage splice together.
        (r#"{"model":"alias","stream":true,"messages":[{"role":"user","content":"hi"}]}"#, r#"{"model":"real","stream":true,"messages":[{"role":"user","content":"hi"}],"stream_options":{"include_usage":true}}"#),
    ];
    for (sent, want) in cases {
        let resp = exchange(gw.addr, &post("/v1/chat/completions", &[], sent)).await;
        assert_eq!(resp.status(), 200, "{sent}: {}", resp.text());
        let req = up.request().await;
        assert_eq!(req.body_text(), want);
        assert_eq!(req.header("content-length"), want.len().to_string());
    }
}

/// (client body, body the upstream must get) for stream requests, `stream_usage` on.
const USAGE_CASES: &[(&str, &str)] = &[
    // Absent: inserted before the closing brace.
    (
        r#"{"model":"m-1","stream":true,"messages":[{"role":"user","content":"hi"}]}"#,
        r#"{"model":"m-1","stream":true,"messages":[{"role":"user","content":"hi"}],"stream_options":{"include_usage":true}}"#,
    ),
    // Absent, with white space around the closing brace.
    (
        "{\"model\":\"m-1\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],\"stream\":true }\n",
        "{\"model\":\"m-1\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],\"stream\":true ,\"stream_options\":{\"include_usage\":true}}\n",
    ),
    // null: replaced.
    (
        r#"{"model":"m-1","messages":[{"role":"user","content":"hi"}],"stream":true,"stream_options":null}"#,
        r#"{"model":"m-1","messages":[{"role":"user","content":"hi"}],"stream":true,"stream_options":{"include_usage":true}}"#,
    ),
    // Empty object: replaced.
    (
        r#"{"model":"m-1","messages":[{"role":"user","content":"hi"}],"stream":true,"stream_options":{ }}"#,
        r#"{"model":"m-1","messages":[{"role":"user","content":"hi"}],"stream":true,"stream_options":{"include_usage":true}}"#,
    ),
    // false: flipped in place.
    (
        r#"{"stream_options":{"include_usage":false},"model":"m-1","messages":[{"role":"user","content":"hi"}],"stream":true}"#,
        r#"{"stream_options":{"include_usage":true},"model":"m-1","messages":[{"role":"user","content":"hi"}],"stream":true}"#,
    ),
    // Other keys only: the member is added, the others kept.
    (
        r#"{"model":"m-1","messages":[{"role":"user","content":"hi"}],"stream":true,"stream_options":{"continuous_usage_stats":true}}"#,
        r#"{"model":"m-1","messages":[{"role":"user","content":"hi"}],"stream":true,"stream_options":{"include_usage":true,"continuous_usage_stats":true}}"#,
    ),
    // Already true: untouched.
    (
        r#"{"model":"m-1","messages":[{"role":"user","content":"hi"}],"stream":true,"stream_options":{"include_usage" : true}}"#,
        r#"{"model":"m-1","messages":[{"role":"user","content":"hi"}],"stream":true,"stream_options":{"include_usage" : true}}"#,
    ),
    // Not a stream: untouched.
    (r#"{"model":"m-1","messages":[{"role":"user","content":"hi"}],"stream":false}"#, r#"{"model":"m-1","messages":[{"role":"user","content":"hi"}],"stream":false}"#),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_ask_the_upstream_for_usage_in_every_form_of_stream_options() {
    let mut up = answering_upstream().await;
    let gw = Gateway::start(&config(up.addr, "", ""));
    for (sent, want) in USAGE_CASES {
        let resp = exchange(gw.addr, &post("/v1/chat/completions", &[], sent)).await;
        assert_eq!(resp.status(), 200, "{sent}: {}", resp.text());
        let req = up.request().await;
        assert_eq!(req.body_text(), *want, "sent {sent}");
        assert_eq!(req.header("content-length"), want.len().to_string());
        // Whatever the splice, the upstream gets valid JSON.
        let _: serde_json::Value = serde_json::from_slice(&req.body).unwrap_or_else(|e| panic!("{e}: {want}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_usage_off_leaves_stream_bodies_untouched() {
    let mut up = answering_upstream().await;
    let gw = Gateway::start(&config(up.addr, "stream_usage = false", ""));
    for (sent, _) in USAGE_CASES {
        let resp = exchange(gw.addr, &post("/v1/chat/completions", &[], sent)).await;
        assert_eq!(resp.status(), 200, "{sent}: {}", resp.text());
        assert_eq!(up.request().await.body_text(), *sent);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_headers_patterns_never_forward_credentials_framing_or_hop_by_hop_headers() {
    let mut up = answering_upstream().await;
    // An operator's broad patterns: every `x-` header, or everything.
    for patterns in [r#"["x-*"]"#, r#"["*"]"#] {
        let gw = Gateway::start(&config(
            up.addr,
            &format!("forward_headers = {patterns}"),
            "[groups.g]\napi_keys = [\"gw-key\"]\n",
        ));
        let body = r#"{"model":"alias","messages":[{"role":"user","content":"hi"}]}"#;
        let headers = [
            ("x-api-key", "gw-key"),
            ("api-key", "gw-key"),
            ("cookie", "session=s3cret-cookie"),
            ("proxy-authorization", "Basic cHJveHk="),
            ("accept-encoding", "gzip"),
            ("te", "trailers"),
            ("connection", "keep-alive, x-hop"),
            ("keep-alive", "timeout=5"),
            ("x-hop", "hop"),
            ("x-trace-id", "trace-1"),
            ("openai-organization", "org-client"),
            ("openai-project", "proj-client"),
            ("anthropic-beta", "tools-2099"),
        ];
        let resp = exchange(gw.addr, &post("/v1/chat/completions", &headers, body)).await;
        assert_eq!(resp.status(), 200, "{patterns}: {}", resp.text());
        let req = up.request().await;
        let head = String::from_utf8_lossy(&req.raw[..req.raw.len() - req.body.len()]).into_owned();
        let want = r#"{"model":"real","messages":[{"role":"user","content":"hi"}]}"#;
        assert_eq!(req.body_text(), want);
        assert_eq!(req.all("content-length"), [want.len().to_string()], "{patterns}:\n{head}");
        assert_eq!(req.all("host"), [up.addr.to_string()], "{patterns}:\n{head}");
        assert_eq!(req.all("authorization"), ["Bearer sk-up"], "{patterns}:\n{head}");
        assert_eq!(req.all("accept-encoding"), ["identity"], "{patterns}:\n{head}");
        assert_eq!(req.all("content-type"), ["application/json"], "{patterns}:\n{head}");
        assert_eq!(req.header("x-trace-id"), "trace-1");
        for name in [
            "x-api-key",
            "api-key",
            "cookie",
            "proxy-authorization",
            "te",
            "connection",
            "keep-alive",
            "x-hop",
            "transfer-encoding",
            // They name the operator's account: a client must not choose it.
            "openai-organization",
            "openai-project",
        ] {
            assert!(req.all(name).is_empty(), "{patterns}: `{name}` went upstream:\n{head}");
        }
        assert!(!head.contains("gw-key") && !head.contains("s3cret"), "{patterns}:\n{head}");
    }
}
