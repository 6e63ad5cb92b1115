//! Azure OpenAI over real sockets: the deployment's URL and `api-version`, the `api-key` header
//! instead of a Bearer one, the v1 API, deployment names that cannot leave their path segment,
//! and Azure's recorded stream (a first chunk with empty `choices` and `prompt_filter_results`,
//! content-filter annotations on every chunk) forwarded byte for byte but for the usage event
//! the client did not ask for.

use crate::harness::client::{exchange, post};
use crate::harness::upstream::{json, response, Step, Upstream};
use crate::harness::Gateway;
use std::net::SocketAddr;

/// A gateway in front of `up` as Azure resource with `api_version`, routing `prod-gpt-4o` to
/// a named deployment and `az-*` by the requested name.
fn gateway(up: SocketAddr, api_version: &str) -> Gateway {
    Gateway::start(&format!(
        "[connections.azure]\napi_type = \"azure\"\napi_base = \"http://{up}/\"\napi_key = \"az-secret\"\n\
         api_version = \"{api_version}\"\n[routing]\n\"prod-gpt-4o\" = \"azure.gpt4o-deployment\"\n\
         \"*\" = \"azure.*\"\n[groups.g]\napi_keys = [\"gw-key\"]\n"
    ))
}

const CLIENT: &[(&str, &str)] = &[("authorization", "Bearer gw-key"), ("api-key", "client-key")];

/// The fields besides `model` of a valid request to `path`.
fn fields(path: &str) -> &'static str {
    match path {
        "/v1/embeddings" => r#""input":"x""#,
        "/v1/completions" => r#""prompt":"p""#,
        _ => r#""messages":[{"role":"user","content":"hi"}]"#,
    }
}

/// Azure's recorded stream, as the SSE it arrives in.
fn recorded_stream() -> (String, Vec<String>) {
    let path = format!("{}/tests/fixtures/azure/chat-stream-model-router.ndjson", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(path).expect("fixture");
    let events: Vec<String> = text.lines().filter(|l| !l.is_empty()).map(|l| format!("data: {l}\n\n")).collect();
    (events.concat() + "data: [DONE]\n\n", events)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dated_api_puts_the_deployment_in_the_path_and_the_key_in_api_key() {
    let mut up = Upstream::start(|_| vec![Step::Write(json(r#"{"ok":true}"#))]).await;
    let gw = gateway(up.addr, "2024-10-21");
    let cases = [
        ("/v1/chat/completions", "prod-gpt-4o", "gpt4o-deployment/chat/completions"),
        ("/v1/chat/completions", "team:gpt-4o.v2", "team:gpt-4o.v2/chat/completions"),
        ("/v1/embeddings", "emb-large", "emb-large/embeddings"),
        ("/v1/completions", "instruct_1", "instruct_1/completions"),
    ];
    for (path, model, upstream_path) in cases {
        let body = format!(r#"{{"model":"{model}",{}}}"#, fields(path));
        let resp = exchange(gw.addr, &post(path, CLIENT, &body)).await;
        assert_eq!(resp.status(), 200, "{model}: {}", resp.text());
        let req = up.request().await;
        assert_eq!(req.path, format!("/openai/deployments/{upstream_path}?api-version=2024-10-21"));
        assert_eq!(req.header("api-key"), "az-secret", "the connection's key, not the client's");
        assert!(req.all("authorization").is_empty(), "no Bearer header: {:?}", req.headers);
        let sent_model = if model == "prod-gpt-4o" { "gpt4o-deployment" } else { model };
        assert!(req.body_text().contains(&format!(r#""model":"{sent_model}""#)), "{}", req.body_text());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_model_spelling_reaches_another_path_or_host() {
    let mut up = Upstream::start(|_| vec![Step::Write(json(r#"{"ok":true}"#))]).await;
    let gw = gateway(up.addr, "2024-10-21");
    for model in [
        "../x",
        "..",
        "a/b",
        "a?b",
        "a#b",
        "%2e%2e",
        "a%2Fb",
        "a\\r\\nHost: evil",
        "@evil.example",
        "a@evil",
        "a b",
        "-x",
    ] {
        let body = format!(r#"{{"model":"{model}",{}}}"#, fields("/v1/chat/completions"));
        let resp = exchange(gw.addr, &post("/v1/chat/completions", CLIENT, &body)).await;
        let e = resp.openai_error(400);
        assert_eq!(e["param"], "model", "{model}");
        assert!(e["message"].as_str().unwrap().contains("deployment name"), "{model}: {e}");
    }
    // Nothing was sent for any of them: the next request the upstream sees is this one.
    let resp = exchange(
        gw.addr,
        &post("/v1/chat/completions", CLIENT, r#"{"model":"ok-1","messages":[{"role":"user","content":"hi"}]}"#),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(up.request().await.path, "/openai/deployments/ok-1/chat/completions?api-version=2024-10-21");
    assert!(up.try_request().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_api_is_the_openai_passthrough_at_openai_v1() {
    let mut up = Upstream::start(|_| vec![Step::Write(json(r#"{"ok":true}"#))]).await;
    let gw = gateway(up.addr, "v1");
    for (path, upstream_path) in
        [("/v1/chat/completions", "/openai/v1/chat/completions"), ("/v1/embeddings", "/openai/v1/embeddings")]
    {
        let resp =
            exchange(gw.addr, &post(path, CLIENT, &format!(r#"{{"model":"prod-gpt-4o",{}}}"#, fields(path)))).await;
        assert_eq!(resp.status(), 200, "{}", resp.text());
        let req = up.request().await;
        assert_eq!(req.path, upstream_path, "no api-version query on the v1 API");
        assert_eq!(req.header("api-key"), "az-secret");
        assert!(req.all("authorization").is_empty());
        assert_eq!(
            req.body_text(),
            format!(r#"{{"model":"gpt4o-deployment",{}}}"#, fields(path)),
            "the deployment as the body's model"
        );
    }
    // On the v1 API the model is not a path segment: any name goes, in the body.
    let resp = exchange(
        gw.addr,
        &post("/v1/chat/completions", CLIENT, r#"{"model":"a/b","messages":[{"role":"user","content":"hi"}]}"#),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert!(up.request().await.body_text().starts_with(r#"{"model":"a/b","#));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recorded_stream_passes_through_with_its_filter_chunks() {
    let (sse, events) = recorded_stream();
    assert!(events[0].contains(r#""choices":[]"#) && events[0].contains("prompt_filter_results"));
    assert!(events.last().unwrap().contains(r#""usage":{"#));
    let mut up = Upstream::start(move |_| vec![Step::Write(response(200, "text/event-stream", &[], &sse))]).await;
    let gw = gateway(up.addr, "2024-10-21");

    // The client did not ask for usage: the gateway asked for it and removes only the usage-only
    // event; the prompt-filter chunk, which also has empty `choices`, reaches the client.
    let body = r#"{"model":"prod-gpt-4o","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    let resp = exchange(gw.addr, &post("/v1/chat/completions", CLIENT, body)).await;
    assert_eq!(resp.status(), 200);
    let want = events[..events.len() - 1].concat() + "data: [DONE]\n\n";
    assert_eq!(resp.text(), want);
    let req = up.request().await;
    assert!(req.body_text().contains(r#""stream_options":{"include_usage":true}"#), "{}", req.body_text());

    // Asked for: every byte, the usage event included.
    let body = r#"{"model":"prod-gpt-4o","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"hi"}]}"#;
    let resp = exchange(gw.addr, &post("/v1/chat/completions", CLIENT, body)).await;
    assert_eq!(resp.text(), events.concat() + "data: [DONE]\n\n");
    up.request().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_errors_keep_their_status_and_a_refused_key_is_a_502() {
    let mut up = Upstream::start(|req| {
        let (status, body) = if req.path.contains("/busy/") {
            (429, r#"{"error":{"code":"429","message":"Requests to the ChatCompletions_Create Operation have exceeded call rate limit."}}"#)
        } else {
            (401, r#"{"error":{"code":"401","message":"Access denied due to invalid subscription key az-secret."}}"#)
        };
        vec![Step::Write(response(status, "application/json", &[("retry-after", "7")], body))]
    })
    .await;
    let gw = gateway(up.addr, "2024-10-21");
    let resp = exchange(
        gw.addr,
        &post("/v1/chat/completions", CLIENT, r#"{"model":"busy","messages":[{"role":"user","content":"hi"}]}"#),
    )
    .await;
    assert_eq!(resp.status(), 429, "{}", resp.text());
    assert_eq!(resp.head.get("retry-after"), Some("7"));
    up.request().await;
    let resp = exchange(
        gw.addr,
        &post("/v1/chat/completions", CLIENT, r#"{"model":"dep","messages":[{"role":"user","content":"hi"}]}"#),
    )
    .await;
    let e = resp.openai_error(502);
    assert!(!resp.text().contains("az-secret"), "{e}");
    assert!(e["message"].as_str().unwrap().contains("azure"), "{e}");
}
