//! Pools over real sockets: several scripted upstreams behind one route. Weighted shares,
//! `least_busy` and `latency` choices, cooldowns (a dead target costs one attempt per period),
//! `Retry-After`, first-token failover, no retry after the first byte, OpenAI → Anthropic
//! failover, fallbacks under group rules, and a client that leaves during a wait.

use crate::harness::client::{exchange, post, Client, Response};
use crate::harness::upstream::{chunk, json, response, sse_head, Step, Upstream, LAST_CHUNK};
use crate::harness::{within, Gateway};
use serde_json::Value;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const CHAT: &str = r#"{"model":"pool","messages":[{"role":"user","content":"hi"}]}"#;
const STREAM: &str = r#"{"model":"pool","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;

/// An OpenAI connection named `name` at `up`, plus `extra` lines for it.
fn conn(name: &str, up: &Upstream, extra: &str) -> String {
    format!(
        "[connections.{name}]\napi_type = \"openai\"\napi_base = \"http://{}/v1\"\napi_key = \"sk-{name}\"\n{extra}\n",
        up.addr
    )
}

/// A chat completion whose content names the upstream that answered.
fn completion(tag: &str) -> String {
    format!(
        r#"{{"id":"c","object":"chat.completion","created":1,"model":"m","choices":[{{"index":0,"message":{{"role":"assistant","content":"from {tag}"}},"finish_reason":"stop"}}],"usage":{{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}}}}"#
    )
}

/// A whole OpenAI stream from `tag`: a role chunk, one content chunk, `[DONE]`.
fn stream(tag: &str) -> Vec<u8> {
    let mut out = sse_head(&[]);
    out.extend(chunk(role_chunk().as_bytes()));
    out.extend(chunk(format!("data: {{\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"from {tag}\"}},\"finish_reason\":null}}]}}\n\n").as_bytes()));
    out.extend(chunk(b"data: [DONE]\n\n"));
    out.extend_from_slice(LAST_CHUNK);
    out
}

fn role_chunk() -> String {
    "data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":null}]}\n\n".into()
}

/// An upstream that answers every request as `tag` (a stream when asked for one).
async fn healthy(tag: &'static str) -> Upstream {
    Upstream::start(move |r| {
        if r.body_text().contains("\"stream\":true") {
            vec![Step::Write(stream(tag))]
        } else {
            vec![Step::Write(json(&completion(tag)))]
        }
    })
    .await
}

/// An upstream that answers every request with `status` and `headers`.
async fn failing(status: u16, headers: &'static [(&'static str, &'static str)]) -> Upstream {
    Upstream::start(move |_| {
        vec![Step::Write(response(status, "application/json", headers, r#"{"error":{"message":"no","type":"x"}}"#))]
    })
    .await
}

/// Requests the upstream received since the last call.
fn taken(up: &mut Upstream) -> Vec<crate::harness::upstream::Request> {
    std::iter::from_fn(|| up.try_request()).collect()
}

async fn ask(gw: &Gateway, body: &str) -> Response {
    exchange(gw.addr, &post("/v1/chat/completions", &[], body)).await
}

/// Which upstream answered a chat completion.
fn who(r: &Response) -> String {
    assert_eq!(r.status(), 200, "{}", r.text());
    r.json()["choices"][0]["message"]["content"].as_str().unwrap_or_default().trim_start_matches("from ").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_three_to_one_give_three_to_one_over_the_network() {
    let (mut a, mut b) = (healthy("a").await, healthy("b").await);
    let gw = Gateway::start(&format!(
        "{}{}[routing]\n\"pool\" = {{ targets = [{{ to = \"a.m\", weight = 3 }}, {{ to = \"b.m\", weight = 1 }}] }}\n",
        conn("a", &a, ""),
        conn("b", &b, "")
    ));
    // 2,000 requests at p = 0.75: mean 1,500, standard deviation sqrt(n p (1 - p)) ≈ 19.4. The
    // bound ±125 is over 6 standard deviations: a correct weighted draw falls outside it with a
    // probability below 1e-9, and an even split (1,000) or inverted weights (500) cannot meet it.
    let mut to_a = 0;
    for _ in 0..2_000 {
        if who(&ask(&gw, CHAT).await) == "a" {
            to_a += 1;
        }
    }
    assert!((1_375..=1_625).contains(&to_a), "a answered {to_a} of 2000");
    assert_eq!((taken(&mut a).len(), taken(&mut b).len()), (to_a, 2_000 - to_a), "one attempt each");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_busy_sends_new_requests_away_from_a_target_holding_slow_streams() {
    // Both upstreams start streams and never finish them; non-stream requests are answered at
    // once.
    let hanging = |tag: &'static str| {
        move |r: &crate::harness::upstream::Request| {
            if r.body_text().contains("\"stream\":true") {
                vec![Step::Write(sse_head(&[])), Step::Write(chunk(role_chunk().as_bytes())), Step::Hang]
            } else {
                vec![Step::Write(json(&completion(tag)))]
            }
        }
    };
    let mut slow = Upstream::start(hanging("slow")).await;
    let mut fast = Upstream::start(hanging("fast")).await;
    let gw = Gateway::start(&format!(
        "{}{}[routing]\n\"pool\" = {{ targets = [\"slow.m\", \"fast.m\"], strategy = \"least_busy\" }}\n",
        conn("slow", &slow, ""),
        conn("fast", &fast, "")
    ));
    // Four streams: each goes to the target with fewer in flight, so two land on each.
    let (mut on_slow, mut on_fast) = (Vec::new(), Vec::new());
    for _ in 0..4 {
        let mut c = Client::connect(gw.addr).await;
        c.send(&post("/v1/chat/completions", &[], STREAM)).await;
        assert_eq!(c.head().await.status, 200);
        if taken(&mut slow).is_empty() {
            assert_eq!(taken(&mut fast).len(), 1);
            on_fast.push(c);
        } else {
            on_slow.push(c);
        }
    }
    assert_eq!((on_slow.len(), on_fast.len()), (2, 2), "least_busy balances streams in flight");
    // `fast` finishes its streams (their clients leave): `slow` still holds 2 in flight, `fast`
    // at most 1 (the request just answered), so every new request goes to `fast`.
    drop(on_fast);
    fast.closed().await;
    fast.closed().await;
    for _ in 0..30 {
        assert_eq!(who(&ask(&gw, CHAT).await), "fast");
    }
    assert!(taken(&mut slow).is_empty());
    drop(on_slow);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_moves_traffic_to_the_faster_target_and_back_after_it_recovers() {
    let a_slow = Arc::new(AtomicBool::new(true));
    let script = |tag: &'static str, slow_when: bool, flag: Arc<AtomicBool>| {
        move |_: &crate::harness::upstream::Request| {
            let mut steps = Vec::new();
            if flag.load(Ordering::Relaxed) == slow_when {
                steps.push(Step::Pause(Duration::from_millis(40)));
            }
            steps.push(Step::Write(json(&completion(tag))));
            steps
        }
    };
    let a = Upstream::start(script("a", true, a_slow.clone())).await;
    let b = Upstream::start(script("b", false, a_slow.clone())).await;
    let gw = Gateway::start(&format!(
        "{}{}[routing]\n\"pool\" = {{ targets = [\"a.m\", \"b.m\"], strategy = \"latency\" }}\n",
        conn("a", &a, ""),
        conn("b", &b, "")
    ));
    // Each phase: of the last 100 requests, the fast target must take at least 80. Exploration
    // sends about 1 in 40 to the other target (1 in 20 at random, half of them to it), so a
    // correct implementation takes ~97; one that ignores latency takes ~50.
    for (fast, requests) in [("b", 150), ("a", 300)] {
        a_slow.store(fast == "b", Ordering::Relaxed);
        let mut last = Vec::new();
        for i in 0..requests {
            let w = who(&ask(&gw, CHAT).await);
            if i >= requests - 100 {
                last.push(w);
            }
        }
        let n = last.iter().filter(|w| *w == fast).count();
        assert!(n >= 80, "{fast} is faster but answered {n} of the last 100");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_target_costs_one_attempt_per_cooldown_period_not_one_per_request() {
    let mut dead = failing(500, &[]).await;
    let mut good = healthy("good").await;
    let gw = Gateway::start(&format!(
        "{}{}[cooldown]\nfailures = 2\nsecs = 60\n[routing]\n\"pool\" = [\"dead.m\", \"good.m\"]\n",
        conn("dead", &dead, ""),
        conn("good", &good, "")
    ));
    let mut retried = 0;
    for _ in 0..100 {
        let r = ask(&gw, CHAT).await;
        assert_eq!(who(&r), "good");
        if r.head.get("x-lmgate-attempts") == Some("2") {
            retried += 1;
        }
    }
    let dead_seen = taken(&mut dead).len();
    assert!(dead_seen <= 2, "the dead target was tried {dead_seen} times; it cools down after 2 failures");
    assert_eq!(retried, dead_seen, "each failure was retried on the good target within the same request");
    assert_eq!(taken(&mut good).len(), 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_keeps_a_target_out_that_long_then_it_serves_again() {
    let first = Arc::new(AtomicBool::new(true));
    let f = first.clone();
    let mut limited = Upstream::start(move |_| {
        if f.swap(false, Ordering::Relaxed) {
            vec![Step::Write(response(429, "application/json", &[("retry-after", "7")], "{}"))]
        } else {
            vec![Step::Write(json(&completion("limited")))]
        }
    })
    .await;
    let mut other = healthy("other").await;
    let gw = Gateway::start(&format!(
        "{}{}[routing]\n\"pool\" = {{ targets = [\"limited.m\", \"other.m\"], strategy = \"ordered\" }}\n",
        conn("limited", &limited, ""),
        conn("other", &other, "")
    ));
    let r = ask(&gw, CHAT).await;
    let started = Instant::now();
    assert_eq!((who(&r).as_str(), r.head.get("x-lmgate-attempts")), ("other", Some("2")));
    assert_eq!(taken(&mut limited).len(), 1);
    // Ordered: `limited` is the primary, yet nothing reaches it for 7 s.
    while started.elapsed() < Duration::from_millis(6_500) {
        let r = ask(&gw, CHAT).await;
        assert_eq!((who(&r).as_str(), r.head.get("x-lmgate-attempts")), ("other", None));
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(taken(&mut limited).is_empty(), "the target stayed out for its Retry-After");
    tokio::time::sleep(Duration::from_millis(7_100).saturating_sub(started.elapsed())).await;
    assert_eq!(who(&ask(&gw, CHAT).await), "limited", "back after 7 s");
    assert!(taken(&mut other).len() > 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_with_no_other_target_answers_429_with_retry_after_and_a_plain_route_relays_as_before() {
    let mut up = failing(429, &[("retry-after", "7")]).await;
    let gw = Gateway::start(&format!(
        "{}[routing]\n\"pool\" = {{ targets = [\"up.m\"], retry_after_max_secs = 1 }}\n\"plain\" = \"up.m\"\n",
        conn("up", &up, "")
    ));
    for i in 0..2 {
        let r = ask(&gw, CHAT).await;
        let e = r.openai_error(429);
        assert_eq!(e["type"], "rate_limit_error");
        let after: u64 = r.head.get("retry-after").expect("Retry-After").parse().unwrap();
        assert!((6..=7).contains(&after), "{after}");
        assert_eq!(taken(&mut up).len(), 1 - i, "the second request waits on the cooldown, not the upstream");
    }
    // The plain route relays the upstream's own answer every time, with no cooldown.
    for _ in 0..2 {
        let r = ask(&gw, &CHAT.replace("\"pool\"", "\"plain\"")).await;
        assert_eq!((r.status(), r.text().as_str()), (429, r#"{"error":{"message":"no","type":"x"}}"#));
        assert_eq!((r.head.get("retry-after"), r.head.get("x-lmgate-attempts")), (Some("7"), None));
        assert_eq!(taken(&mut up).len(), 1);
    }
}

/// The `data:` payloads of an OpenAI stream.
fn data_events(body: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(body)
        .split_terminator("\n\n")
        .map(|e| e.strip_prefix("data: ").unwrap_or_else(|| panic!("not a data event: {e:?}")).to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_without_a_first_token_in_time_is_served_by_the_next_target_as_one_clean_stream() {
    let mut stalled = Upstream::start(|_| {
        let mut late = stream("stalled");
        let body = late.split_off(sse_head(&[]).len());
        vec![Step::Write(late), Step::Pause(Duration::from_secs(3)), Step::Write(body)]
    })
    .await;
    let mut fine = healthy("fine").await;
    let gw = Gateway::start(&format!(
        "{}{}[routing]\n\"pool\" = {{ targets = [\"stalled.m\", \"fine.m\"], strategy = \"ordered\" }}\n",
        conn("stalled", &stalled, "first_token_timeout_secs = 0.3"),
        conn("fine", &fine, "")
    ));
    let r = ask(&gw, STREAM).await;
    assert_eq!((r.status(), r.head.get("x-lmgate-attempts")), (200, Some("2")));
    let events = data_events(&r.body);
    assert_eq!(events.iter().filter(|e| e.contains("\"role\"")).count(), 1, "{events:?}");
    assert_eq!(events.iter().filter(|e| *e == "[DONE]").count(), 1, "{events:?}");
    assert!(events.iter().any(|e| e.contains("from fine")) && !events.iter().any(|e| e.contains("stalled")));
    assert_eq!((taken(&mut stalled).len(), taken(&mut fine).len()), (1, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_reset_after_the_first_byte_is_never_retried() {
    let mut broken =
        Upstream::start(|_| vec![Step::Write(sse_head(&[])), Step::Write(chunk(role_chunk().as_bytes())), Step::Reset])
            .await;
    let mut fine = healthy("fine").await;
    let gw = Gateway::start(&format!(
        "{}{}[routing]\n\"pool\" = {{ targets = [\"broken.m\", \"fine.m\"], strategy = \"ordered\" }}\n",
        conn("broken", &broken, "first_token_timeout_secs = 1"),
        conn("fine", &fine, "")
    ));
    let mut c = Client::connect(gw.addr).await;
    c.send(&post("/v1/chat/completions", &[], STREAM)).await;
    assert_eq!(c.head().await.status, 200);
    let body = c.rest().await.unwrap_or_else(|b| b);
    let events = data_events(&body);
    assert!(events[0].contains("\"role\""), "{events:?}");
    assert!(events.last().unwrap().contains("\"error\""), "ends with the error event: {events:?}");
    assert_eq!((taken(&mut broken).len(), taken(&mut fine).len()), (1, 0), "the upstream saw one request");
}

/// An Anthropic Messages answer saying "from claude".
const CLAUDE: &str = r#"{"id":"msg_1","type":"message","role":"assistant","model":"claude-x","content":[{"type":"text","text":"from claude"}],"stop_reason":"end_turn","stop_sequence":null,"usage":{"input_tokens":3,"output_tokens":2}}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_openai_target_fails_over_to_a_claude_target_and_the_client_gets_an_openai_answer() {
    let mut openai = failing(503, &[]).await;
    let mut claude = Upstream::start(|_| vec![Step::Write(json(CLAUDE))]).await;
    let gw = Gateway::start(&format!(
        "{}[connections.claude]\napi_type = \"anthropic\"\napi_base = \"http://{}\"\napi_key = \"sk-ant\"\n\
         [routing]\n\"pool\" = {{ targets = [\"openai.gpt-x\", \"claude.claude-x\"], strategy = \"ordered\" }}\n",
        conn("openai", &openai, ""),
        claude.addr
    ));
    let r = ask(&gw, CHAT).await;
    assert_eq!(r.json()["object"], "chat.completion");
    assert_eq!(who(&r), "claude");
    assert_eq!(taken(&mut openai).len(), 1);
    let sent = taken(&mut claude);
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].path, "/v1/messages");
    let body: Value = serde_json::from_slice(&sent[0].body).unwrap();
    assert_eq!(body["model"], "claude-x");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fallbacks_are_asked_by_their_name_and_only_for_groups_that_may_use_them() {
    let mut primary = failing(503, &[]).await;
    let mut backup = healthy("backup").await;
    let gw = Gateway::start(&format!(
        "{}{}[routing]\n\"pool\" = {{ targets = [\"primary.m\"], attempts = 1, fallbacks = [\"backup\"] }}\n\
         \"backup\" = \"backup.*\"\n\
         [groups.narrow]\napi_keys = [\"k-narrow\"]\nallowed_connections = [\"primary\"]\n\
         [groups.wide]\napi_keys = [\"k-wide\"]\n",
        conn("primary", &primary, ""),
        conn("backup", &backup, "")
    ));
    let call = |key: &'static str| {
        let addr = gw.addr;
        async move {
            exchange(addr, &post("/v1/chat/completions", &[("authorization", &format!("Bearer {key}"))], CHAT)).await
        }
    };
    // The narrow group may not use `backup`: the fallback is skipped, the primary's 503 stands.
    let r = call("k-narrow").await;
    assert_eq!(r.status(), 503);
    assert!(taken(&mut backup).is_empty());
    // The wide group gets the fallback, asked for as `backup` (its name), not as `pool`.
    let r = call("k-wide").await;
    assert_eq!((who(&r).as_str(), r.head.get("x-lmgate-attempts")), ("backup", Some("2")));
    let sent = taken(&mut backup);
    let body: Value = serde_json::from_slice(&sent[0].body).unwrap();
    assert_eq!(body["model"], "backup");
    assert_eq!(taken(&mut primary).len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_during_a_wait_gets_no_further_attempt() {
    let mut up = failing(503, &[("retry-after", "1")]).await;
    let gw = Gateway::start(&format!(
        "{}[routing]\n\"pool\" = {{ targets = [\"up.m\"], attempts = 3, retry_after_max_secs = 5 }}\n",
        conn("up", &up, "")
    ));
    let mut c = Client::connect(gw.addr).await;
    c.send(&post("/v1/chat/completions", &[], CHAT)).await;
    up.request().await;
    drop(c);
    // Without the disconnect, the gateway would try again after 1 s.
    tokio::time::sleep(Duration::from_millis(1_800)).await;
    assert!(taken(&mut up).is_empty(), "an attempt was made for a client that had gone");
    // The same wait with the client still there: the second attempt comes after the Retry-After.
    let asked = Instant::now();
    let r = within("the pool to give up", ask(&gw, CHAT)).await;
    assert_eq!(r.status(), 503);
    assert!(asked.elapsed() >= Duration::from_millis(900));
    assert!(taken(&mut up).len() >= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_json_answer_to_a_stream_request_held_for_its_first_bytes_arrives_whole() {
    // An upstream that ignores `stream: true` and answers one JSON document with a length.
    let body = completion("json");
    let answer = json(&body);
    let up = Upstream::start(move |_| vec![Step::Write(answer.clone())]).await;
    let gw =
        Gateway::start(&format!("{}[routing]\n\"pool\" = \"up.m\"\n", conn("up", &up, "first_token_timeout_secs = 2")));
    let r = within("the whole JSON answer", ask(&gw, STREAM)).await;
    assert_eq!((r.status(), r.text()), (200, body));
    assert_eq!(r.head.get("content-length").map(str::to_owned), Some(r.body.len().to_string()));
}
