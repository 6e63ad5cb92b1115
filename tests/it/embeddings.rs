//! Embeddings split over an upstream's limits and merged back: a scripted upstream that enforces
//! `max_inputs` (refusing more), records every batch, and derives each vector from its input,
//! so a misordered, lost or duplicated vector shows. Random input lists, limits and encodings
//! against what a direct call would return; conversions; a failed part; isolation.

use crate::harness::client::{exchange, post};
use crate::harness::upstream::{response, Gate, Step, Upstream};
use crate::harness::{within, Gateway};
use base64::Engine as _;
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// The vector an input gets: from its text or its token ids, values with no short decimal form.
fn vector(input: &Value) -> Vec<f32> {
    let bytes: Vec<u32> = match input {
        Value::String(s) => s.bytes().map(u32::from).collect(),
        Value::Array(ids) => ids.iter().map(|i| i.as_u64().unwrap() as u32).collect(),
        _ => panic!("not an input: {input}"),
    };
    let sum: u32 = bytes.iter().sum();
    vec![bytes.len() as f32, sum as f32 / 7.0, -(bytes[0] as f32) / 3.0, f32::from_bits(0x0000_0001 + sum)]
}

fn render(v: &[f32], base64: bool) -> Value {
    if base64 {
        Value::String(B64.encode(v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>()))
    } else {
        json!(v)
    }
}

/// An upstream taking at most `max` inputs per request; it answers in the encoding asked unless
/// `only` says it gives one encoding whatever is asked. Each batch's size is recorded.
async fn upstream(max: usize, only: Option<bool>, batches: Arc<Mutex<Vec<usize>>>) -> Upstream {
    Upstream::start(move |r| {
        let req: Value = serde_json::from_slice(&r.body).unwrap();
        let inputs: Vec<Value> = match &req["input"] {
            Value::String(_) => vec![req["input"].clone()],
            Value::Array(a) if a.first().is_some_and(Value::is_u64) => vec![req["input"].clone()],
            Value::Array(a) => a.clone(),
            other => panic!("input {other}"),
        };
        batches.lock().unwrap().push(inputs.len());
        if inputs.len() > max || inputs.iter().any(|i| i.as_str() == Some("fail")) {
            let e = r#"{"error":{"message":"too many inputs","type":"invalid_request_error","param":"input","code":null}}"#;
            return vec![Step::Write(response(400, "application/json", &[], e))];
        }
        let base64 = only.unwrap_or(req["encoding_format"] == "base64");
        let data: Vec<Value> = inputs
            .iter()
            .enumerate()
            .rev() // listed out of order, as some servers do
            .map(|(i, x)| json!({"object": "embedding", "index": i, "embedding": render(&vector(x), base64)}))
            .collect();
        let tokens = inputs.len() * 2;
        let body = json!({"object": "list", "data": data, "model": "emb", "usage": {"prompt_tokens": tokens, "total_tokens": tokens}});
        vec![Step::Write(response(200, "application/json", &[], &body.to_string()))]
    })
    .await
}

fn gateway(up: &Upstream, embeddings: &str) -> Gateway {
    Gateway::start(&format!(
        "[connections.e]\napi_type = \"openai\"\napi_base = \"http://{}/v1\"\napi_key = \"k\"\n\
         [connections.e.embeddings]\n{embeddings}\n[routing]\n\"*\" = \"e.*\"\n",
        up.addr
    ))
}

async fn embed(gw: &Gateway, request: &Value) -> (u16, Value) {
    let r = exchange(gw.addr, &post("/v1/embeddings", &[], &request.to_string())).await;
    let status = r.status();
    (status, r.json())
}

/// The vectors of an answer, by index (each index once), as f32 bits whatever the encoding.
fn bits(answer: &Value) -> Vec<Vec<u32>> {
    let mut data = answer["data"].as_array().unwrap().clone();
    data.sort_by_key(|d| d["index"].as_u64().unwrap());
    data.iter()
        .enumerate()
        .map(|(i, d)| {
            assert_eq!(d["index"], i, "{answer}");
            match &d["embedding"] {
                Value::String(s) => {
                    B64.decode(s).unwrap().chunks(4).map(|c| u32::from_le_bytes(c.try_into().unwrap())).collect()
                }
                Value::Array(a) => a.iter().map(|x| (x.as_f64().unwrap() as f32).to_bits()).collect(),
                other => panic!("embedding {other}"),
            }
        })
        .collect()
}

#[tokio::test]
async fn random_requests_split_over_max_inputs_equal_a_direct_call() {
    let mut rng = fastrand::Rng::with_seed(3);
    for round in 0..12 {
        let max = rng.usize(1..5);
        let only = [None, Some(false), Some(true)][round % 3];
        let batches = Arc::new(Mutex::new(Vec::new()));
        let up = upstream(max, only, batches.clone()).await;
        let encodings = match only {
            None => "",
            Some(false) => "encodings = [\"float\"]",
            Some(true) => "encodings = [\"base64\"]",
        };
        let gw = gateway(&up, &format!("max_inputs = {max}\nparallel = {}\n{encodings}", rng.usize(1..4)));
        for _ in 0..5 {
            let n = rng.usize(1..15);
            let inputs: Vec<Value> = (0..n)
                .map(|_| {
                    if rng.bool() {
                        Value::String((0..rng.usize(1..12)).map(|_| rng.alphanumeric()).collect())
                    } else {
                        json!((0..rng.usize(1..6)).map(|_| rng.u32(1..50_000)).collect::<Vec<_>>())
                    }
                })
                .collect();
            let base64 = rng.bool();
            let mut req = json!({"model": "emb", "input": inputs});
            if base64 {
                req["encoding_format"] = json!("base64");
            }
            batches.lock().unwrap().clear();
            let (status, answer) = embed(&gw, &req).await;
            assert_eq!(status, 200, "{answer}");
            let want: Vec<Vec<u32>> = inputs.iter().map(|x| vector(x).iter().map(|f| f.to_bits()).collect()).collect();
            assert_eq!(bits(&answer), want, "max {max}, {n} inputs, base64 {base64}, upstream {only:?}");
            assert_eq!(answer["data"][0]["embedding"].is_string(), base64, "the encoding the client asked for");
            assert_eq!(answer["usage"]["prompt_tokens"], n * 2);
            let sent = batches.lock().unwrap().clone();
            assert!(sent.iter().all(|&b| b <= max), "{sent:?}");
            assert_eq!(sent.iter().sum::<usize>(), n);
        }
    }
}

#[tokio::test]
async fn a_failed_part_fails_the_whole_request_and_a_fitting_one_passes_through() {
    let batches = Arc::new(Mutex::new(Vec::new()));
    let up = upstream(2, None, batches.clone()).await;
    let gw = gateway(&up, "max_inputs = 2");
    let (status, answer) = embed(&gw, &json!({"model": "emb", "input": ["a", "b", "fail", "c"]})).await;
    assert_eq!(status, 400, "{answer}");
    assert!(answer.get("data").is_none(), "never a list with holes: {answer}");
    // Within the limit: the upstream's own body, passed through (its order kept).
    let (status, answer) = embed(&gw, &json!({"model": "emb", "input": ["a", "b"]})).await;
    assert_eq!(status, 200);
    assert_eq!(answer["data"][0]["index"], 1, "passed through as the upstream wrote it");
    let (status, answer) = embed(&gw, &json!({"model": "emb", "input": ["a", ""]})).await;
    assert_eq!((status, answer["error"]["param"].as_str()), (400, Some("input")));
}

#[tokio::test]
async fn embedding_requests_wait_for_a_slot_then_get_429_and_chat_is_not_held() {
    let gate = Gate::new();
    let held = gate.clone();
    let up = Upstream::start(move |r| {
        if r.path.ends_with("/embeddings") {
            let body = r#"{"object":"list","data":[{"object":"embedding","index":0,"embedding":[1.0]}],"model":"e","usage":{"prompt_tokens":1,"total_tokens":1}}"#;
            vec![Step::Wait(held.clone()), Step::Write(response(200, "application/json", &[], body))]
        } else {
            let body = r#"{"id":"c","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}]}"#;
            vec![Step::Write(response(200, "application/json", &[], body))]
        }
    })
    .await;
    let gw = gateway(&up, "max_concurrent = 1\nqueue_timeout_ms = 100");
    let addr = gw.addr;
    let req = json!({"model": "emb", "input": "x"}).to_string();
    let first = tokio::spawn({
        let req = req.clone();
        async move { exchange(addr, &post("/v1/embeddings", &[], &req)).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let second = exchange(addr, &post("/v1/embeddings", &[], &req)).await;
    let e = second.openai_error(429);
    assert_eq!(e["code"], "rate_limit_exceeded");
    assert!(second.head.get("retry-after").is_some());
    let chat = r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;
    assert_eq!(exchange(addr, &post("/v1/chat/completions", &[], chat)).await.status(), 200);
    gate.open();
    assert_eq!(within("the held request", first).await.unwrap().status(), 200);
}

#[tokio::test]
async fn with_the_cache_hits_and_misses_come_back_in_place_and_only_misses_go_upstream() {
    let mut rng = fastrand::Rng::with_seed(5);
    let batches = Arc::new(Mutex::new(Vec::new()));
    let up = upstream(3, None, batches.clone()).await;
    let gw = Gateway::start(&format!(
        "[connections.e]\napi_type = \"openai\"\napi_base = \"http://{}/v1\"\napi_key = \"k\"\n\
         [connections.e.embeddings]\nmax_inputs = 3\n[routing]\n\"*\" = \"e.*\"\n[embeddings_cache]\nmax_mb = 4\n",
        up.addr
    ));
    let words: Vec<String> = (0..12).map(|i| format!("word-{i}")).collect();
    let mut seen = std::collections::HashSet::new();
    for round in 0..30 {
        let inputs: Vec<Value> = (0..rng.usize(1..9)).map(|_| json!(words[rng.usize(..words.len())])).collect();
        let base64 = rng.bool();
        let mut req = json!({"model": "emb", "input": inputs});
        if base64 {
            req["encoding_format"] = json!("base64");
        }
        batches.lock().unwrap().clear();
        let r = exchange(gw.addr, &post("/v1/embeddings", &[], &req.to_string())).await;
        assert_eq!(r.status(), 200, "{}", r.text());
        let answer = r.json();
        let want: Vec<Vec<u32>> = inputs.iter().map(|x| vector(x).iter().map(|f| f.to_bits()).collect()).collect();
        assert_eq!(bits(&answer), want, "round {round}");
        // Misses: inputs never answered before (a repeat within the request is sent each time).
        let misses = inputs.iter().filter(|x| !seen.contains(&x.to_string())).count();
        let header = r.head.get("x-lmgate-cache").unwrap().to_owned();
        assert_eq!(header, format!("hits={} misses={misses}", inputs.len() - misses), "round {round}");
        assert_eq!(batches.lock().unwrap().iter().sum::<usize>(), misses);
        assert_eq!(answer["usage"]["prompt_tokens"], misses * 2, "usage is what went upstream");
        seen.extend(inputs.iter().map(Value::to_string));
    }
    // `cache-control: no-cache`: everything goes upstream.
    batches.lock().unwrap().clear();
    let req = json!({"model": "emb", "input": ["word-1", "word-2"]}).to_string();
    let r = exchange(gw.addr, &post("/v1/embeddings", &[("cache-control", "no-cache")], &req)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(*batches.lock().unwrap(), [2]);
}

/// `n` concurrent single-input requests; their answers in order.
async fn together(gw: &Gateway, texts: &[String]) -> Vec<(u16, Value)> {
    let addr = gw.addr;
    let tasks: Vec<_> = texts
        .iter()
        .map(|t| {
            let req = json!({"model": "emb", "input": [t]}).to_string();
            tokio::spawn(async move {
                let r = exchange(addr, &post("/v1/embeddings", &[], &req)).await;
                (r.status(), r.json())
            })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(within("a batched request", t).await.unwrap());
    }
    out
}

#[tokio::test]
async fn small_concurrent_requests_share_upstream_requests_and_each_gets_its_own_vectors() {
    let batches = Arc::new(Mutex::new(Vec::new()));
    let up = upstream(100, None, batches.clone()).await;
    let gw = gateway(&up, "batch_window_us = 200000\nbatch_max_inputs = 8");
    let texts: Vec<String> = (0..12).map(|i| format!("text number {i}")).collect();
    let answers = together(&gw, &texts).await;
    let mut prompt = 0;
    for (t, (status, a)) in texts.iter().zip(&answers) {
        assert_eq!(*status, 200, "{a}");
        let want: Vec<u32> = vector(&json!(t)).iter().map(|f| f.to_bits()).collect();
        assert_eq!(bits(a), [want], "each caller gets its own vector");
        prompt += a["usage"]["prompt_tokens"].as_u64().unwrap();
    }
    let sent = batches.lock().unwrap().clone();
    assert!(sent.len() < texts.len() && sent.iter().all(|&b| b <= 8), "coalesced: {sent:?}");
    assert_eq!(sent.iter().sum::<usize>(), 12);
    assert_eq!(prompt, 24, "the callers' usage shares add up to the upstream's");

    // Larger than a batch: not delayed, sent as it is.
    batches.lock().unwrap().clear();
    let big: Vec<String> = (0..9).map(|i| format!("big {i}")).collect();
    let (status, _) = embed(&gw, &json!({"model": "emb", "input": big})).await;
    assert_eq!(status, 200);
    assert_eq!(*batches.lock().unwrap(), [9], "sent alone, as it came");

    // A failed batch fails every caller in it.
    let texts: Vec<String> = ["one", "fail", "three"].map(String::from).to_vec();
    for (status, a) in together(&gw, &texts).await {
        assert_eq!(status, 400, "{a}");
    }
}

#[tokio::test]
async fn random_arrivals_with_batching_the_cache_and_splitting_still_equal_a_direct_call() {
    let mut rng = fastrand::Rng::with_seed(21);
    for round in 0..4 {
        let batches = Arc::new(Mutex::new(Vec::new()));
        let up = upstream(4, None, batches.clone()).await;
        let gw = Gateway::start(&format!(
            "[connections.e]\napi_type = \"openai\"\napi_base = \"http://{}/v1\"\napi_key = \"k\"\n\
             [connections.e.embeddings]\nmax_inputs = 4\nbatch_window_us = {}\nbatch_max_inputs = 4\n\
             [routing]\n\"*\" = \"e.*\"\n{}",
            up.addr,
            rng.u32(500..20_000),
            if round % 2 == 0 { "[embeddings_cache]\nmax_mb = 1\n" } else { "" }
        ));
        let vocabulary: Vec<String> = (0..10).map(|i| format!("v{i}")).collect();
        let addr = gw.addr;
        let mut tasks = Vec::new();
        for _ in 0..24 {
            let inputs: Vec<Value> = (0..rng.usize(1..7)).map(|_| json!(vocabulary[rng.usize(..10)])).collect();
            let base64 = rng.bool();
            let delay = Duration::from_micros(rng.u64(0..30_000));
            tasks.push(tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let mut req = json!({"model": "emb", "input": inputs});
                if base64 {
                    req["encoding_format"] = json!("base64");
                }
                let r = exchange(addr, &post("/v1/embeddings", &[], &req.to_string())).await;
                (inputs, r.status(), r.json())
            }));
        }
        for t in tasks {
            let (inputs, status, answer) = within("a request", t).await.unwrap();
            assert_eq!(status, 200, "{answer}");
            let want: Vec<Vec<u32>> = inputs.iter().map(|x| vector(x).iter().map(|f| f.to_bits()).collect()).collect();
            assert_eq!(bits(&answer), want, "round {round}");
        }
        assert!(batches.lock().unwrap().iter().all(|&b| b <= 4));
    }
}

#[tokio::test]
async fn each_sub_request_counts_against_the_connection_s_quota() {
    let batches = Arc::new(Mutex::new(Vec::new()));
    let up = upstream(2, None, batches.clone()).await;
    let gw = Gateway::start(&format!(
        "[connections.e]\napi_type = \"openai\"\napi_base = \"http://{}/v1\"\napi_key = \"k\"\nrpm = 3\n\
         [connections.e.embeddings]\nmax_inputs = 2\n[routing]\n\"*\" = \"e.*\"\n",
        up.addr
    ));
    let (status, answer) = embed(&gw, &json!({"model": "emb", "input": ["a", "b", "c", "d", "e"]})).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(batches.lock().unwrap().len(), 3);
    let (status, answer) = embed(&gw, &json!({"model": "emb", "input": "f"})).await;
    assert_eq!((status, answer["error"]["code"].as_str()), (429, Some("rate_limit_exceeded")), "{answer}");
    assert_eq!(batches.lock().unwrap().len(), 3, "the upstream was not asked");
}
