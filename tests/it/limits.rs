//! Limits through the whole gateway: the headers a limited group gets (the upstream's replaced),
//! 429s with Retry-After, token reservations settled with the usage of the answer, connection
//! quotas that send a pool's requests elsewhere, and budgets that need prices.

use crate::harness::client::{exchange, post};
use crate::harness::upstream::{response, Step, Upstream};
use crate::harness::{config, Gateway};

/// A completion that used 3 tokens, with the upstream's own rate-limit headers.
fn answered() -> Vec<u8> {
    let body = r#"{"id":"c","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}}"#;
    response(
        200,
        "application/json",
        &[("x-ratelimit-limit-requests", "10000"), ("x-ratelimit-remaining-tokens", "999999")],
        body,
    )
}

async fn upstream() -> Upstream {
    Upstream::start(|_| vec![Step::Write(answered())]).await
}

fn chat(max_tokens: u32) -> String {
    format!(r#"{{"model":"m1","max_tokens":{max_tokens},"messages":[{{"role":"user","content":"hi"}}]}}"#)
}

const KEY: (&str, &str) = ("authorization", "Bearer sk-client");

#[tokio::test]
async fn a_limited_group_gets_its_own_headers_and_a_429_with_retry_after() {
    let up = upstream().await;
    let gw = Gateway::start(&config(up.addr, "", "[groups.g]\napi_keys = [\"sk-client\"]\nrpm = 3\ntpm = 100000\n"));
    for remaining in ["2", "1", "0"] {
        let r = exchange(gw.addr, &post("/v1/chat/completions", &[KEY], &chat(10))).await;
        assert_eq!(r.status(), 200, "{}", r.text());
        assert_eq!(r.head.get("x-ratelimit-limit-requests"), Some("3"));
        assert_eq!(r.head.get("x-ratelimit-remaining-requests"), Some(remaining));
        let reset = r.head.get("x-ratelimit-reset-requests").unwrap();
        assert!(reset.ends_with('s'), "{reset}");
        // The upstream's headers describe the operator's account: replaced, not passed on.
        assert_eq!(r.head.get("x-ratelimit-limit-tokens"), Some("100000"));
        assert_ne!(r.head.get("x-ratelimit-remaining-tokens"), Some("999999"));
    }
    let r = exchange(gw.addr, &post("/v1/chat/completions", &[KEY], &chat(10))).await;
    let e = r.openai_error(429);
    assert_eq!(e["code"], "rate_limit_exceeded");
    let wait: u64 = r.head.get("retry-after").unwrap().parse().unwrap();
    assert!((1..=20).contains(&wait), "{wait}");
    assert_eq!(r.head.get("x-ratelimit-remaining-requests"), Some("0"));
}

#[tokio::test]
async fn reserved_tokens_are_settled_with_the_answer_s_usage() {
    let up = upstream().await;
    // Each request reserves about 60 tokens (max_tokens 50 plus the prompt) and uses 3: without
    // settlement the second would not fit in 100.
    let gw = Gateway::start(&config(up.addr, "", "[groups.g]\napi_keys = [\"sk-client\"]\ntpm = 100\n"));
    for _ in 0..5 {
        let r = exchange(gw.addr, &post("/v1/chat/completions", &[KEY], &chat(50))).await;
        assert_eq!(r.status(), 200, "{}", r.text());
        let left: u64 = r.head.get("x-ratelimit-remaining-tokens").unwrap().parse().unwrap();
        assert!(left < 50, "the reservation is counted while the request runs: {left}");
    }
    // A request that could never fit is a 400 naming max_tokens, not an endless 429.
    let r = exchange(gw.addr, &post("/v1/chat/completions", &[KEY], &chat(500))).await;
    assert_eq!(r.openai_error(400)["param"], "max_tokens");
}

#[tokio::test]
async fn a_connection_over_its_quota_sends_a_pool_s_requests_to_another_target() {
    let (a, b) = (upstream().await, upstream().await);
    let toml = format!(
        "[connections.a]\napi_type = \"openai\"\napi_base = \"http://{}/v1\"\napi_key = \"k\"\nrpm = 2\n\
         [connections.b]\napi_type = \"openai\"\napi_base = \"http://{}/v1\"\napi_key = \"k\"\n\
         [connections.solo]\napi_type = \"openai\"\napi_base = \"http://{}/v1\"\napi_key = \"k\"\nrpm = 1\n\
         [routing]\n\"m1\" = {{ targets = [\"a.m\", \"b.m\"], strategy = \"ordered\" }}\n\"s\" = \"solo.m\"\n\
         [groups.g]\napi_keys = [\"sk-client\"]\n",
        a.addr, b.addr, a.addr
    );
    let gw = Gateway::start(&toml);
    let mut a = a;
    for _ in 0..6 {
        let r = exchange(gw.addr, &post("/v1/chat/completions", &[KEY], &chat(10))).await;
        assert_eq!(r.status(), 200, "{}", r.text());
    }
    let mut at_a = 0;
    while a.try_request().is_some() {
        at_a += 1;
    }
    assert_eq!(at_a, 2, "connection a never gets more than its rpm");
    // A plain route: 429 with Retry-After, the upstream asked nothing.
    let solo = r#"{"model":"s","messages":[{"role":"user","content":"hi"}]}"#;
    assert_eq!(exchange(gw.addr, &post("/v1/chat/completions", &[KEY], solo)).await.status(), 200);
    let r = exchange(gw.addr, &post("/v1/chat/completions", &[KEY], solo)).await;
    assert_eq!(r.openai_error(429)["code"], "rate_limit_exceeded");
    assert!(r.head.get("retry-after").is_some());
    // No group limits: no x-ratelimit headers of the gateway's (and none of the upstream's kept).
    assert_eq!(a.try_request().map(|_| ()), Some(()), "the first solo request reached it");
    assert!(a.try_request().is_none(), "the refused one did not");
}

#[tokio::test]
async fn a_budget_needs_prices_and_refuses_what_it_cannot_cover_without_retries() {
    let up = upstream().await;
    let groups = "[groups.g]\napi_keys = [\"sk-client\"]\nbudget_usd = 0.001\n";
    let gw = Gateway::start(&config(up.addr, "", groups));
    let r = exchange(gw.addr, &post("/v1/chat/completions", &[KEY], &chat(10))).await;
    assert_eq!(r.openai_error(403)["code"], "model_not_priced");

    // $10 per million output tokens: max_tokens 40 reserves about $0.0004.
    let priced = format!("{groups}[prices]\n\"m*\" = {{ input = 1.0, output = 10.0 }}\n");
    let gw = Gateway::start(&config(up.addr, "", &priced));
    let mut ok = 0;
    loop {
        let r = exchange(gw.addr, &post("/v1/chat/completions", &[KEY], &chat(40))).await;
        if r.status() != 200 {
            let e = r.openai_error(429);
            assert_eq!(
                (e["code"].as_str(), e["type"].as_str()),
                (Some("insufficient_quota"), Some("insufficient_quota"))
            );
            assert_eq!(r.head.get("x-should-retry"), Some("false"));
            break;
        }
        ok += 1;
        assert!(ok < 100, "the budget never ran out");
    }
    // Each reserves $0.000408 (8 prompt tokens, 40 output) and settles at $0.000021 (1 in, 2
    // out): admitted while spend + 0.000408 <= 0.001, so 29 (28 × 0.000021 = 0.000588).
    assert_eq!(ok, 29);
}
