//! Choosing a pool's target: `pool::pick` for pools of 2, 4 and 16 targets with every strategy,
//! with some requests in flight and latencies measured, as a busy gateway sees them. The issue's
//! bar: well under a microsecond for up to 16 targets. Run: `cargo bench --bench pool`.

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion};
use lmgate::config::Config;
use lmgate::pool::{self, Strategy};
use std::time::Duration;

/// A router with one pool of `n` targets (mock connections) using `strategy`.
fn config(n: usize, strategy: Strategy) -> Config {
    let conns: String = (0..n).map(|i| format!("[connections.c{i}]\napi_type = \"mock\"\n")).collect();
    let targets: Vec<String> = (0..n).map(|i| format!("{{ to = \"c{i}.m\", weight = {} }}", i % 3 + 1)).collect();
    let text = format!(
        "{conns}[routing]\n\"pool\" = {{ targets = [{}], strategy = \"{}\" }}\n",
        targets.join(", "),
        strategy.name()
    );
    Config::parse(&text, &|_: &str| None).expect("a valid config")
}

fn pick(c: &mut Criterion) {
    let mut group = c.benchmark_group("pick");
    for n in [2, 4, 16] {
        for (name, strategy) in Strategy::NAMES {
            let cfg = config(n, strategy);
            let targets = &cfg.router.routes()[0].targets;
            // Some load: leases held on every other target, latencies measured on all.
            let _held: Vec<_> = targets.iter().step_by(2).filter_map(|t| t.health.lease(pool::now_ms())).collect();
            for (i, t) in targets.iter().enumerate() {
                if let Some(mut lease) = t.health.lease(pool::now_ms()) {
                    lease.succeeded(Duration::from_micros(500 + 100 * i as u64));
                }
            }
            group.bench_with_input(BenchmarkId::new(name, n), &n, |b, _| {
                b.iter(|| pool::pick(black_box(&targets[..]), strategy, black_box(0), pool::now_ms()))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, pick);
criterion_main!(benches);
