//! Browsers and open mode: requests from web pages need a listed origin, preflights are answered
//! before authentication, and an open loopback gateway answers only to its own names.

use crate::harness::client::{exchange, post};
use crate::harness::upstream::{json, Step, Upstream};
use crate::harness::{config, Gateway};

const BODY: &str = r#"{"model":"m-1","messages":[{"role":"user","content":"hi"}]}"#;

/// A raw request with an exact `Host` and extra headers.
fn request(method: &str, host: &str, headers: &[(&str, &str)], body: &str) -> Vec<u8> {
    let mut out =
        format!("{method} /v1/chat/completions HTTP/1.1\r\nhost: {host}\r\ncontent-length: {}\r\n", body.len());
    for (n, v) in headers {
        out.push_str(&format!("{n}: {v}\r\n"));
    }
    out.push_str("\r\n");
    out.push_str(body);
    out.into_bytes()
}

async fn upstream() -> Upstream {
    Upstream::start(|_| vec![Step::Write(json(r#"{"ok":true}"#))]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_web_page_of_an_unlisted_origin_is_refused_before_any_upstream() {
    let mut up = upstream().await;
    let gw = Gateway::start(&config(up.addr, "", "[server]\ncors_allowed_origins = [\"https://app.example.com\"]\n"));
    for origin in ["https://evil.example", "null", "https://app.example.com.evil.example"] {
        let resp = exchange(gw.addr, &post("/v1/chat/completions", &[("origin", origin)], BODY)).await;
        let e = resp.openai_error(403);
        assert_eq!(e["code"], "origin_not_allowed", "{origin}");
        assert_eq!(resp.head.get("access-control-allow-origin"), None);
    }
    // A text/plain form post (no preflight in a browser) is refused the same way.
    let resp = exchange(
        gw.addr,
        &post("/v1/chat/completions", &[("origin", "https://evil.example"), ("content-type", "text/plain")], BODY),
    )
    .await;
    assert_eq!(resp.status(), 403);
    // Nothing reached the upstream: the next request it sees is this one, from no browser.
    let resp = exchange(
        gw.addr,
        &post(
            "/v1/chat/completions",
            &[],
            r#"{"model":"m-1","messages":[{"role":"user","content":"hi"}],"user":"marker"}"#,
        ),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.head.get("access-control-allow-origin"), None, "no CORS header without an Origin");
    assert!(up.request().await.body_text().contains("marker"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listed_origin_gets_its_preflight_before_auth_and_readable_answers() {
    let up = upstream().await;
    let gw = Gateway::start(&config(
        up.addr,
        "",
        "[server]\ncors_allowed_origins = [\"https://app.example.com\"]\n[groups.g]\napi_keys = [\"ck\"]\n",
    ));
    let origin = ("origin", "https://app.example.com");
    let asked = ("access-control-request-headers", "authorization, content-type, x-stainless-os");
    let preflight = request("OPTIONS", "localhost", &[origin, ("access-control-request-method", "POST"), asked], "");
    let resp = exchange(gw.addr, &preflight).await;
    assert_eq!(resp.status(), 204, "{}", resp.text());
    assert_eq!(resp.head.get("access-control-allow-origin"), Some("https://app.example.com"));
    assert_eq!(resp.head.get("access-control-allow-headers"), Some("authorization, content-type, x-stainless-os"));
    assert!(resp.head.get("access-control-allow-methods").is_some_and(|m| m.contains("POST")));
    assert_eq!(resp.head.get("vary"), Some("Origin"));
    assert!(resp.head.get("access-control-max-age").is_some());

    // A foreign origin's preflight never gets the header.
    let foreign = request(
        "OPTIONS",
        "localhost",
        &[("origin", "https://evil.example"), ("access-control-request-method", "POST")],
        "",
    );
    let resp = exchange(gw.addr, &foreign).await;
    assert_eq!(resp.status(), 403);
    assert_eq!(resp.head.get("access-control-allow-origin"), None);

    // The real request: with a key it is answered and readable; without, the 401 is readable too.
    let resp = exchange(gw.addr, &post("/v1/chat/completions", &[origin, ("authorization", "Bearer ck")], BODY)).await;
    assert_eq!(resp.status(), 200, "{}", resp.text());
    assert_eq!(resp.head.get("access-control-allow-origin"), Some("https://app.example.com"));
    assert!(resp.head.get("access-control-expose-headers").is_some_and(|h| h.contains("x-request-id")));
    let resp = exchange(gw.addr, &post("/v1/chat/completions", &[origin], BODY)).await;
    assert_eq!(resp.status(), 401);
    assert_eq!(resp.head.get("access-control-allow-origin"), Some("https://app.example.com"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_loopback_gateway_answers_only_to_its_own_names() {
    let up = upstream().await;
    let gw = Gateway::start(&config(up.addr, "", "[server]\nallowed_hosts = [\"gw.internal\"]\n"));
    let port = gw.addr.port();
    for host in ["evil.example", &format!("evil.example:{port}"), "127.0.0.1.evil.example"] {
        let resp = exchange(gw.addr, &request("POST", host, &[], BODY)).await;
        assert_eq!(resp.openai_error(403)["code"], "host_not_allowed", "{host}");
    }
    for host in
        [format!("localhost:{port}"), format!("127.0.0.1:{port}"), format!("[::1]:{port}"), "GW.internal".into()]
    {
        let resp = exchange(gw.addr, &request("POST", &host, &[], BODY)).await;
        assert_eq!(resp.status(), 200, "{host}: {}", resp.text());
    }
    // Health probes are never refused.
    let probe = format!("GET /health/ready HTTP/1.1\r\nhost: 10.0.0.7:{port}\r\n\r\n");
    assert_eq!(exchange(gw.addr, probe.as_bytes()).await.status(), 200);

    // With client keys the key is the protection: any Host is served.
    let keyed = Gateway::start(&config(up.addr, "", "[groups.g]\napi_keys = [\"ck\"]\n"));
    let resp = exchange(keyed.addr, &request("POST", "evil.example", &[("authorization", "Bearer ck")], BODY)).await;
    assert_eq!(resp.status(), 200, "{}", resp.text());
}
