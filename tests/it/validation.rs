//! Requests the gateway answers itself: malformed bodies (400), oversized bodies (413), keys
//! (401, one body for every failure), group policy (403), unknown models and paths (404), and
//! the per-group model list. None of them reaches the upstream.

use crate::harness::client::{exchange, get, post, Client};
use crate::harness::upstream::{chunk, json, Step, Upstream};
use crate::harness::Gateway;
use std::net::SocketAddr;

const LIMIT: usize = 1024;

fn gateway_config(up: SocketAddr) -> String {
    format!(
        "[server]\nmax_request_bytes = {LIMIT}\n\n\
         [connections.up]\napi_type = \"openai\"\napi_base = \"http://{up}/v1\"\napi_key = \"sk-up\"\n\n\
         [connections.mk]\napi_type = \"mock\"\n\n\
         [routing]\n\"alias\" = \"up.real\"\n\"mock-*\" = \"mk.*\"\n\"m*\" = \"up.*\"\n\n\
         [groups.g]\napi_keys = [\"gk\"]\n\n\
         [groups.narrow]\napi_keys = [\"nk\"]\nallowed_connections = [\"mk\"]\n"
    )
}

async fn setup() -> (Upstream, Gateway) {
    let up = Upstream::start(|_| vec![Step::Write(json(r#"{"ok":true}"#))]).await;
    let gw = Gateway::start(&gateway_config(up.addr));
    (up, gw)
}

const GK: (&str, &str) = ("authorization", "Bearer gk");
const NK: (&str, &str) = ("authorization", "Bearer nk");

/// Proves nothing reached the upstream so far: the next request it sees is a marked one.
async fn upstream_saw_nothing_before(up: &mut Upstream, gw: &Gateway) {
    let marker = r#"{"model":"m-1","messages":[{"role":"user","content":"hi"}],"user":"marker"}"#;
    assert_eq!(exchange(gw.addr, &post("/v1/chat/completions", &[GK], marker)).await.status(), 200);
    assert_eq!(up.request().await.body_text(), marker, "an earlier request reached the upstream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_a_400_and_never_reach_the_upstream() {
    let (mut up, gw) = setup().await;
    let cases: &[(&str, Option<&str>)] = &[
        (r#"{"model":"m-1","messages":[{"role":"user","content":"hi"}],"model":"m-2"}"#, Some("model")),
        (r#"{"model":"m-1","messages":[{"role":"user","content":"hi"}],"mod\u0065l":"alias"}"#, Some("model")),
        (r#"{"mod\u0065l":"mock-1","messages":[],"model":"m-1"}"#, Some("model")),
        (r#"{"model":"m-1","messages":[{"role":"user","content":"hi"}],"stream":true,"stream":false}"#, Some("stream")),
        (r#"{"model":"m-1","messages":[{"role":"user","content":"hi"}],"#, None),
        (r#"{"model":"m-1","messages":[{"role":"user","content":"hi"}]} trailing"#, None),
        (r#"["model","m-1"]"#, None),
        ("", None),
        (r#"{"messages":[{"role":"user","content":"hi","model":"m-1"}]}"#, Some("model")),
        (r#"{"model":"","messages":[{"role":"user","content":"hi"}]}"#, Some("model")),
        (r#"{"model":42}"#, Some("model")),
        (r#"{"model":"m-1","messages":[{"role":"user","content":"hi"}],"stream":"yes"}"#, Some("stream")),
        (r#"{"model":"m-1","messages":[{"role":"user","content":"hi"}],"stream":1}"#, Some("stream")),
        (
            r#"{"model":"m-1","messages":[{"role":"user","content":"hi"}],"stream":true,"stream_options":"yes"}"#,
            Some("stream_options"),
        ),
    ];
    for (body, param) in cases {
        let resp = exchange(gw.addr, &post("/v1/chat/completions", &[GK], body)).await;
        let e = resp.openai_error(400);
        assert_eq!(e["type"], "invalid_request_error", "{body}");
        assert_eq!(e["param"].as_str(), *param, "{body}: {e}");
    }
    // Invalid UTF-8 is malformed too.
    let mut raw =
        post("/v1/chat/completions", &[GK], r#"{"model":"m-1","messages":[{"role":"user","content":"hi"}],"x":"??"}"#);
    let n = raw.len();
    raw[n - 4..n - 2].copy_from_slice(&[0xff, 0xfe]);
    exchange(gw.addr, &raw).await.openai_error(400);
    upstream_saw_nothing_before(&mut up, &gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_missing_their_endpoints_required_member_get_a_400_naming_it() {
    let (mut up, gw) = setup().await;
    let cases: &[(&str, &str, &str)] = &[
        ("/v1/chat/completions", r#"{"model":"m-1"}"#, "messages"),
        ("/v1/chat/completions", r#"{"model":"m-1","messages":[]}"#, "messages"),
        ("/v1/chat/completions", r#"{"model":"m-1","messages":[ ]}"#, "messages"),
        ("/v1/chat/completions", r#"{"model":"m-1","messages":null}"#, "messages"),
        ("/v1/chat/completions", r#"{"model":"m-1","messages":"hi"}"#, "messages"),
        // Nested members of the same name do not count.
        ("/v1/chat/completions", r#"{"model":"m-1","metadata":{"messages":[1]}}"#, "messages"),
        ("/v1/completions", r#"{"model":"m-1"}"#, "prompt"),
        ("/v1/completions", r#"{"model":"m-1","prompt":null}"#, "prompt"),
        ("/v1/embeddings", r#"{"model":"m-1"}"#, "input"),
        ("/v1/embeddings", r#"{"model":"m-1","input":""}"#, "input"),
        ("/v1/embeddings", r#"{"model":"m-1","input":[]}"#, "input"),
        ("/v1/embeddings", r#"{"model":"m-1","input":null}"#, "input"),
    ];
    for (path, body, param) in cases {
        let e = exchange(gw.addr, &post(path, &[GK], body)).await.openai_error(400);
        assert_eq!(e["param"].as_str(), Some(*param), "{body}: {e}");
        assert!(e["message"].as_str().unwrap().contains(param), "{e}");
    }
    upstream_saw_nothing_before(&mut up, &gw).await;
    // Present and usable: forwarded.
    for (path, body) in [
        ("/v1/completions", r#"{"model":"m-1","prompt":""}"#),
        ("/v1/embeddings", r#"{"model":"m-1","input":[1,2,3]}"#),
        ("/v1/embeddings", r#"{"model":"m-1","input":" "}"#),
    ] {
        assert_eq!(exchange(gw.addr, &post(path, &[GK], body)).await.status(), 200, "{body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_never_finishes_arriving_gets_a_408_and_never_reaches_the_upstream() {
    let mut up = Upstream::start(|_| vec![Step::Write(json(r#"{"ok":true}"#))]).await;
    let gw = Gateway::start(&gateway_config(up.addr).replace("[server]\n", "[server]\nbody_timeout_secs = 0.2\n"));
    let head = "POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\nauthorization: Bearer gk\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n";
    let mut client = Client::connect(gw.addr).await;
    client.send(head.as_bytes()).await;
    client.send(br#"{"model":"m-1","messages":[{"role":"user","content":"hi"}],"#).await; // then nothing more
    assert_eq!(client.response().await.openai_error(408)["code"], "request_timeout");
    upstream_saw_nothing_before(&mut up, &gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_still_writing_an_oversized_body_reads_the_413_not_a_reset() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (_up, gw) = setup().await;
    // 16 MiB declared and sent while the answer is read, as urllib and `requests` do: more than
    // the sockets hold, so a gateway that closes without reading the rest resets the connection
    // before the client has read the 413.
    const SIZE: usize = 16 << 20;
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\nauthorization: Bearer gk\r\ncontent-type: application/json\r\ncontent-length: {SIZE}\r\n\r\n"
    );
    let stream = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let (mut read, mut write) = stream.into_split();
    let writer = tokio::spawn(async move {
        write.write_all(head.as_bytes()).await?;
        let block = vec![b'x'; 64 << 10];
        for _ in 0..SIZE / block.len() {
            write.write_all(&block).await?;
        }
        Ok::<_, std::io::Error>(write)
    });
    let mut got = Vec::new();
    crate::harness::within("the 413", async {
        let mut buf = [0u8; 4096];
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            match read.read(&mut buf).await {
                Ok(0) => panic!("closed before a response head"),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) => panic!("{e} before a response head"),
            }
        }
    })
    .await;
    assert!(got.starts_with(b"HTTP/1.1 413 "), "{}", String::from_utf8_lossy(&got));
    let written = crate::harness::within("the body to be sent", writer).await.unwrap();
    assert!(written.is_ok(), "the body could not be sent: {:?}", written.err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_over_max_request_bytes_gets_a_413_with_content_length_or_chunked() {
    let (mut up, gw) = setup().await;

    // Declared too large: refused from the head alone, before any body byte is sent.
    let head = format!("POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\nauthorization: Bearer gk\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n", LIMIT + 1);
    let mut client = Client::connect(gw.addr).await;
    client.send(head.as_bytes()).await;
    assert_eq!(client.response().await.openai_error(413)["code"], "request_too_large");

    // Chunked: refused once more than the limit has arrived (the body has not even ended).
    let head = "POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\nauthorization: Bearer gk\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n";
    let mut client = Client::connect(gw.addr).await;
    client.send(head.as_bytes()).await;
    client
        .send(&chunk(
            format!(
                "{{\"model\":\"m-1\",\"messages\":[{{\"role\":\"user\",\"content\":\"hi\"}}],\"pad\":\"{}",
                "x".repeat(LIMIT)
            )
            .as_bytes(),
        ))
        .await;
    assert_eq!(client.response().await.openai_error(413)["code"], "request_too_large");

    // As SDKs send it: head and the whole oversized body at once, then read the answer.
    let big = format!(
        "{{\"model\":\"m-1\",\"messages\":[{{\"role\":\"user\",\"content\":\"hi\"}}],\"pad\":\"{}\"}}",
        "z".repeat(4 * LIMIT)
    );
    let resp = exchange(gw.addr, &post("/v1/chat/completions", &[GK], &big)).await;
    assert_eq!(resp.openai_error(413)["code"], "request_too_large");

    // Exactly the limit is accepted, whichever the framing.
    let prefix = r#"{"model":"m-1","messages":[{"role":"user","content":"hi"}],"pad":""#;
    let body = format!("{prefix}{}\"}}", "y".repeat(LIMIT - prefix.len() - 2));
    assert_eq!(body.len(), LIMIT);
    assert_eq!(exchange(gw.addr, &post("/v1/chat/completions", &[GK], &body)).await.status(), 200);
    assert_eq!(up.request().await.body_text(), body);
    let mut client = Client::connect(gw.addr).await;
    client.send(head.as_bytes()).await;
    for piece in body.as_bytes().chunks(300) {
        client.send(&chunk(piece)).await;
    }
    client.send(b"0\r\n\r\n").await;
    assert_eq!(client.response().await.status(), 200);
    assert_eq!(up.request().await.body_text(), body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_and_unknown_keys_get_identical_401s() {
    let (mut up, gw) = setup().await;
    let body = r#"{"model":"m-1","messages":[{"role":"user","content":"hi"}]}"#;
    let attempts: &[&[(&str, &str)]] = &[
        &[],
        &[("authorization", "Bearer wrong")],
        &[("authorization", "Bearer gk2")],
        &[("authorization", "Basic gk")],
        &[("authorization", "gk")],
        &[("x-api-key", "wrong")],
        &[("api-key", "")],
    ];
    let mut bodies = Vec::new();
    for headers in attempts {
        let resp = exchange(gw.addr, &post("/v1/chat/completions", headers, body)).await;
        assert_eq!(resp.openai_error(401)["code"], "invalid_api_key", "{headers:?}");
        bodies.push(resp.body);
    }
    assert!(bodies.windows(2).all(|w| w[0] == w[1]), "401 bodies differ");
    // Every accepted header form works with the right key.
    for h in [("x-api-key", "gk"), ("api-key", "gk"), ("authorization", "bearer gk")] {
        assert_eq!(exchange(gw.addr, &post("/v1/chat/completions", &[h], body)).await.status(), 200, "{h:?}");
        up.request().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_gets_403_for_a_connection_it_may_not_use() {
    let (mut up, gw) = setup().await;
    for model in ["m-1", "alias"] {
        let resp = exchange(
            gw.addr,
            &post(
                "/v1/chat/completions",
                &[NK],
                &format!(r#"{{"model":"{model}","messages":[{{"role":"user","content":"hi"}}]}}"#),
            ),
        )
        .await;
        assert_eq!(resp.openai_error(403)["code"], "model_not_allowed");
    }
    // The same key may use its own connection.
    let resp = exchange(
        gw.addr,
        &post("/v1/chat/completions", &[NK], r#"{"model":"mock-1","messages":[{"role":"user","content":"hi"}]}"#),
    )
    .await;
    assert_eq!(resp.status(), 200, "{}", resp.text());
    upstream_saw_nothing_before(&mut up, &gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_models_and_paths_get_404() {
    let (mut up, gw) = setup().await;
    let resp = exchange(
        gw.addr,
        &post("/v1/chat/completions", &[GK], r#"{"model":"zzz-unrouted","messages":[{"role":"user","content":"hi"}]}"#),
    )
    .await;
    let e = resp.openai_error(404);
    assert_eq!((e["code"].as_str(), e["param"].as_str()), (Some("model_not_found"), Some("model")));
    for path in ["/v1/nothing", "/v2/chat/completions", "/v1/chat/completions/x"] {
        let resp =
            exchange(gw.addr, &post(path, &[GK], r#"{"model":"m-1","messages":[{"role":"user","content":"hi"}]}"#))
                .await;
        assert_eq!(resp.openai_error(404)["code"], "unknown_url", "{path}");
    }
    exchange(gw.addr, &get("/v1/chat/completions", &[GK])).await.openai_error(405);
    upstream_saw_nothing_before(&mut up, &gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_are_listed_per_group() {
    let (_up, gw) = setup().await;
    let ids = |v: serde_json::Value| -> Vec<String> {
        assert_eq!(v["object"], "list");
        v["data"].as_array().expect("data").iter().map(|m| m["id"].as_str().expect("id").to_owned()).collect()
    };
    let resp = exchange(gw.addr, &get("/v1/models", &[GK])).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(ids(resp.json()), ["alias", "mock-*", "m*"]);
    let resp = exchange(gw.addr, &get("/v1/models", &[NK])).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(ids(resp.json()), ["mock-*"]);
    exchange(gw.addr, &get("/v1/models", &[])).await.openai_error(401);

    let resp = exchange(gw.addr, &get("/v1/models/alias", &[GK])).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.json()["id"], "alias");
    assert_eq!(resp.json()["owned_by"], "up");
    exchange(gw.addr, &get("/v1/models/alias", &[NK])).await.openai_error(404);
    assert_eq!(exchange(gw.addr, &get("/v1/models/mock-7", &[NK])).await.json()["owned_by"], "mk");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_whose_key_variable_is_missing_answers_503_naming_the_variable() {
    let up = Upstream::start(|_| vec![Step::Write(json("{}"))]).await;
    let gw = Gateway::start(&format!(
        "[connections.up]\napi_type = \"openai\"\napi_base = \"http://{}/v1\"\napi_key = \"env:LMGATE_IT_UNSET_KEY\"\n\n[routing]\n\"m*\" = \"up.*\"\n",
        up.addr
    ));
    let resp = exchange(
        gw.addr,
        &post("/v1/chat/completions", &[], r#"{"model":"m-1","messages":[{"role":"user","content":"hi"}]}"#),
    )
    .await;
    let e = resp.openai_error(503);
    assert_eq!(e["code"], "connection_unavailable");
    assert!(e["message"].as_str().is_some_and(|m| m.contains("LMGATE_IT_UNSET_KEY")), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_hide_routes_to_disabled_connections_and_decode_escaped_ids() {
    // `off` has no key (its variable is unset): it is disabled and never dialled.
    let gw = Gateway::start(
        "[connections.mk]\napi_type = \"mock\"\n\n\
         [connections.off]\napi_type = \"openai\"\napi_base = \"http://127.0.0.1:9/v1\"\napi_key = \"env:LMGATE_IT_UNSET_KEY\"\n\n\
         [routing]\n\"org/model\" = \"mk.real\"\n\"off-exact\" = \"off.x\"\n\"off-*\" = \"off.*\"\n\"mock-*\" = \"mk.*\"\n",
    );
    let resp = exchange(gw.addr, &get("/v1/models", &[])).await;
    assert_eq!(resp.status(), 200);
    let ids: Vec<String> = resp.json()["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(|m| m["id"].as_str().expect("id").to_owned())
        .collect();
    assert_eq!(ids, ["org/model", "mock-*"]);

    for path in ["/v1/models/org%2Fmodel", "/v1/models/org%2fmodel", "/v1/models/org/model"] {
        let resp = exchange(gw.addr, &get(path, &[])).await;
        assert_eq!(resp.status(), 200, "{path}: {}", resp.text());
        assert_eq!((resp.json()["id"].as_str(), resp.json()["owned_by"].as_str()), (Some("org/model"), Some("mk")));
    }
    for path in ["/v1/models/off-exact", "/v1/models/off-1", "/v1/models/org%2", "/v1/models/org%zzmodel"] {
        let e = exchange(gw.addr, &get(path, &[])).await.openai_error(404);
        assert_eq!(e["code"], "model_not_found", "{path}");
    }
    // Hidden from the list, but a request still learns why the model cannot be served.
    let resp = exchange(
        gw.addr,
        &post("/v1/chat/completions", &[], r#"{"model":"off-1","messages":[{"role":"user","content":"hi"}]}"#),
    )
    .await;
    assert_eq!(resp.openai_error(503)["code"], "connection_unavailable");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_models_limit_a_group_and_ignore_wildcards_hides_patterns_from_the_list() {
    let gw = Gateway::start(
        "[server]\nmodel_listing_mode = \"ignore_wildcards\"\n\n\
         [connections.mk]\napi_type = \"mock\"\n\n\
         [routing]\n\"mock-exact\" = \"mk.mock-exact\"\n\"mock-*\" = \"mk.*\"\n\n\
         [groups.small]\napi_keys = [\"sk\"]\nallowed_models = [\"mock-mini*\"]\n\n\
         [groups.all]\napi_keys = [\"ak\"]\n",
    );
    let chat = |model: &str| format!(r#"{{"model":"{model}","messages":[{{"role":"user","content":"hi"}}]}}"#);
    let (sk, ak) = (("authorization", "Bearer sk"), ("authorization", "Bearer ak"));
    // The pattern route serves both models; the small group may only use the one it names.
    let resp = exchange(gw.addr, &post("/v1/chat/completions", &[sk], &chat("mock-mini-1"))).await;
    assert_eq!(resp.status(), 200, "{}", resp.text());
    for model in ["mock-large", "mock-exact"] {
        let resp = exchange(gw.addr, &post("/v1/chat/completions", &[sk], &chat(model))).await;
        assert_eq!(resp.openai_error(403)["code"], "model_not_allowed", "{model}");
        let resp = exchange(gw.addr, &post("/v1/chat/completions", &[ak], &chat(model))).await;
        assert_eq!(resp.status(), 200, "{model}: {}", resp.text());
    }
    // Exact names only; the small group sees none of them.
    let ids = |key| async move {
        let v = exchange(gw.addr, &get("/v1/models", &[key])).await.json();
        v["data"].as_array().expect("data").iter().map(|m| m["id"].as_str().expect("id").to_owned()).collect::<Vec<_>>()
    };
    assert_eq!(ids(ak).await, ["mock-exact"]);
    assert!(ids(sk).await.is_empty());
}
