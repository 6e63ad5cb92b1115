//! The cost of admitting one request against its limits and settling it, memory backend: a
//! group with rpm, tpm and max_concurrent, a key with its own rpm, and a budget (one mutex per
//! scope, no global lock). Run: `cargo bench --bench limit`.

use criterion::{criterion_group, criterion_main, Criterion};
use lmgate::auth::{self, Caller};
use lmgate::config::Config;
use lmgate::limit::{Ask, Limits};
use std::future::Future;
use std::hint::black_box;
use std::task::{Context, Poll, Waker};

/// The memory backend never waits: its admission is ready on the first poll.
fn now<F: Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => unreachable!("the memory backend never waits"),
    }
}

fn setup(limits: &str) -> (Limits, lmgate::limit::Bound, Caller) {
    let text = format!(
        "[connections.m]\napi_type = \"mock\"\n[routing]\n\"*\" = \"m.*\"\n[groups.team]\napi_keys = [\"k1\"]\n{limits}"
    );
    let cfg = Config::parse(&text, &|_: &str| None).expect("a valid config");
    let limits = Limits::new(&cfg).expect("limits");
    let bound = limits.bind(&cfg);
    let mut h = http::HeaderMap::new();
    h.insert("authorization", "Bearer k1".parse().expect("a header"));
    let caller = auth::check(&cfg.keys, cfg.open_group, &h).expect("a caller");
    (limits, bound, caller)
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("limit");
    let ask = Ask { tokens: 100, cost: 0.0001 };
    for (name, limits) in [
        ("rpm", "rpm = 1000000000\n"),
        (
            "group rpm+tpm+concurrency+budget, key rpm",
            "rpm = 1000000000\ntpm = 1000000000000\nmax_concurrent = 100\nbudget_usd = 1000000000.0\nkey_rpm = 1000000000\n",
        ),
    ] {
        let (limits, bound, caller) = setup(limits);
        g.bench_function(format!("admit and settle: {name}"), |b| {
            b.iter(|| {
                let (admission, quota) = now(limits.admit(&bound, black_box(caller), ask)).ok().expect("admitted");
                admission.expect("limited").settle(Some(80), Some(0.00008));
                black_box(quota)
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
