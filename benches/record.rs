//! The cost of recording one finished request: what a [`Record`] does when it is dropped (the
//! metrics: resolved handles, a handful of relaxed atomic adds, the price lookup and two
//! histogram observations; with `[log] requests`, one record queued for the writer thread).
//! Run: `cargo bench --bench record`.

use criterion::{criterion_group, criterion_main, Criterion};
use http::HeaderValue;
use lmgate::config::Config;
use lmgate::json::Usage;
use lmgate::metrics::Metrics;
use lmgate::provider::mock::Mock;
use lmgate::record::{Outcome, Record};
use lmgate::snapshot::Snapshot;
use std::sync::Arc;

fn snapshot(log: Option<&std::path::Path>) -> Arc<Snapshot> {
    let log = log.map_or(String::new(), |p| format!("[log]\nrequests = \"{}\"\n", p.display()));
    let text = format!(
        "[connections.up]\napi_type = \"mock\"\n[connections.other]\napi_type = \"mock\"\n\
         [routing]\n\"gpt-4o\" = \"up.gpt-4o-2024-08-06\"\n\"gpt*\" = \"up.*\"\n\
         [groups.team]\napi_keys = [\"k1\"]\n[groups.other]\napi_keys = [\"k2\"]\n\
         [prices]\n\"gpt-4o*\" = {{ input = 2.5, cached_input = 1.25, output = 10.0 }}\n\
         \"gpt-4.1*\" = {{ input = 2.0, cached_input = 0.5, output = 8.0 }}\n\"o3\" = {{ input = 2.0, output = 8.0 }}\n{log}"
    );
    let config = Config::parse(&text, &|_: &str| None).expect("a valid config");
    let metrics = Arc::new(Metrics::default());
    Arc::new(Snapshot::new(config, &Arc::new(Mock::default()), None, &metrics).expect("a snapshot"))
}

fn record(snap: &Arc<Snapshot>, uri: &http::Uri, id: &HeaderValue, route: usize) -> Record {
    let mut r = Record::new(snap.clone(), http::Method::POST, uri.clone(), "chat", id.clone());
    r.model = Some("gpt-4o".into());
    r.group = Some(0);
    r.route = Some(route);
    r.target = Some((route, 0));
    r.connection = Some(0);
    r.upstream_model = Some("gpt-4o-2024-08-06".into());
    r.attempts = 1;
    r.status = 200;
    r.stream = true;
    r.usage = Some(Usage { prompt: 1200, completion: 340, cached: 1024, cache_write: 0 });
    r.outcome = Outcome::Complete;
    r.bytes_in = 900;
    r.bytes_out = 40_000;
    r
}

fn bench(c: &mut Criterion) {
    let uri: http::Uri = "/v1/chat/completions".parse().unwrap();
    let id = HeaderValue::from_static("0123456789abcdef0123456789abcdef");
    let mut group = c.benchmark_group("record");
    let snap = snapshot(None);
    // Route 0 names its model (price resolved at load); route 1 passes the name through
    // (price looked up per request).
    group.bench_function("metrics, priced at load", |b| b.iter(|| drop(record(&snap, &uri, &id, 0))));
    group.bench_function("metrics, priced per request", |b| b.iter(|| drop(record(&snap, &uri, &id, 1))));
    let dir = std::env::temp_dir().join(format!("lmgate-bench-record-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let logged = snapshot(Some(&dir.join("requests.jsonl")));
    group.bench_function("metrics and request log", |b| b.iter(|| drop(record(&logged, &uri, &id, 0))));
    group.finish();
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(benches, bench);
criterion_main!(benches);
