use super::*;
use crate::config::Config;

fn config(text: &str) -> Config {
    Config::parse(&format!("[connections.m]\napi_type = \"mock\"\n[routing]\n\"*\" = \"m.*\"\n{text}"), &|_: &str| None)
        .unwrap()
}

fn setup(text: &str) -> (Limits, Bound, Config) {
    let cfg = config(text);
    let limits = Limits::new(&cfg).unwrap();
    let bound = limits.bind(&cfg);
    (limits, bound, cfg)
}

fn caller(cfg: &Config, key: &str) -> Caller {
    let mut h = http::HeaderMap::new();
    h.insert("authorization", format!("Bearer {key}").parse().unwrap());
    crate::auth::check(&cfg.keys, cfg.open_group, &h).unwrap()
}

fn block<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(f)
}

const ONE: Ask = Ask { tokens: 1, cost: 0.0 };

#[test]
fn rpm_admits_exactly_n_of_a_burst_and_the_rest_get_the_wait() {
    let (limits, bound, cfg) = setup("[groups.g]\napi_keys = [\"k\"]\nrpm = 10\n");
    let c = caller(&cfg, "k");
    block(async {
        let mut held = Vec::new();
        let mut denied = 0;
        for _ in 0..30 {
            match limits.admit(&bound, c, ONE).await {
                Ok((a, q)) => {
                    let w = q.requests.unwrap();
                    assert_eq!((w.limit, w.remaining), (10, 10 - 1 - held.len() as u64));
                    held.push(a);
                }
                Err(d) => {
                    denied += 1;
                    let e = d.error();
                    assert_eq!((e.status.as_u16(), e.code), (429, Some("rate_limit_exceeded")));
                    // One request refills every 6 s.
                    let wait = e.retry_after.unwrap().as_secs_f64();
                    assert!(wait > 5.0 && wait <= 6.0, "{wait}");
                }
            }
        }
        assert_eq!((held.len(), denied), (10, 20));
    });
}

#[test]
fn a_burst_from_many_threads_is_admitted_exactly() {
    let (limits, bound, cfg) = setup("[groups.g]\napi_keys = [\"k\"]\nrpm = 100\n");
    let c = caller(&cfg, "k");
    let (limits, bound) = (Arc::new(limits), Arc::new(bound));
    let admitted = AtomicU64::new(0);
    std::thread::scope(|s| {
        for _ in 0..6 {
            s.spawn(|| {
                block(async {
                    for _ in 0..50 {
                        if let Ok((a, _)) = limits.admit(&bound, c, ONE).await {
                            admitted.fetch_add(1, Ordering::Relaxed);
                            std::mem::forget(a);
                        }
                    }
                })
            });
        }
    });
    assert_eq!(admitted.load(Ordering::Relaxed), 100);
}

#[test]
fn all_or_nothing_a_key_over_its_limit_takes_nothing_from_its_group() {
    let (limits, bound, cfg) = setup("[groups.g]\napi_keys = [\"k1\", \"k2\"]\nrpm = 4\nkey_rpm = 2\n");
    let (k1, k2) = (caller(&cfg, "k1"), caller(&cfg, "k2"));
    block(async {
        let mut admitted = Vec::new();
        for c in [k1, k1, k1, k1, k1] {
            if let Ok((a, _)) = limits.admit(&bound, c, ONE).await {
                admitted.push(a);
            }
        }
        assert_eq!(admitted.len(), 2, "k1 is held to its key_rpm");
        // The three refusals of k1 took nothing from the group: k2 gets the other two.
        for _ in 0..3 {
            if let Ok((a, _)) = limits.admit(&bound, k2, ONE).await {
                admitted.push(a);
            }
        }
        assert_eq!(admitted.len(), 4);
    });
}

#[test]
fn tokens_are_reserved_then_settled_with_the_real_usage() {
    let (limits, bound, cfg) = setup("[groups.g]\napi_keys = [\"k\"]\ntpm = 1000\n");
    let c = caller(&cfg, "k");
    block(async {
        let ask = Ask { tokens: 600, cost: 0.0 };
        let (a, q) = limits.admit(&bound, c, ask).await.ok().unwrap();
        assert_eq!(q.tokens.unwrap().remaining, 400);
        // A second reservation of 600 does not fit until the first settles.
        assert!(limits.admit(&bound, c, ask).await.is_err());
        a.unwrap().settle(Some(100), None);
        let (b, q) = limits.admit(&bound, c, ask).await.ok().unwrap();
        assert_eq!(q.tokens.unwrap().remaining, 300);
        // Used more than reserved: charged.
        b.unwrap().settle(Some(900), None);
        let e = limits.admit(&bound, c, Ask { tokens: 1, cost: 0.0 }).await.err().unwrap().error();
        assert_eq!(e.status, 429);
        // Unsettled (a failed attempt): refunded whole.
        drop(limits.admit(&bound, c, Ask { tokens: 0, cost: 0.0 }).await.ok());
    });
}

#[test]
fn a_reservation_over_the_limit_is_a_400_naming_max_tokens() {
    let (limits, bound, cfg) = setup("[groups.g]\napi_keys = [\"k\"]\ntpm = 1000\n");
    let c = caller(&cfg, "k");
    let e = block(limits.admit(&bound, c, Ask { tokens: 1001, cost: 0.0 })).err().unwrap().error();
    assert_eq!((e.status.as_u16(), e.param), (400, Some("max_tokens")));
    assert!(e.message.contains("1001") && e.message.contains("1000"), "{}", e.message);
}

#[test]
fn concurrency_holds_a_slot_until_the_request_is_settled() {
    let (limits, bound, cfg) = setup("[groups.g]\napi_keys = [\"k\"]\nmax_concurrent = 2\n");
    let c = caller(&cfg, "k");
    block(async {
        let a = limits.admit(&bound, c, ONE).await.ok().unwrap().0;
        let b = limits.admit(&bound, c, ONE).await.ok().unwrap().0;
        let e = limits.admit(&bound, c, ONE).await.err().unwrap().error();
        assert_eq!(e.retry_after, Some(Duration::from_secs(1)));
        a.unwrap().settle(Some(5), None);
        let c2 = limits.admit(&bound, c, ONE).await.ok().unwrap().0;
        assert!(limits.admit(&bound, c, ONE).await.is_err());
        drop((b, c2));
        assert!(limits.admit(&bound, c, ONE).await.is_ok());
    });
}

#[test]
fn a_budget_admits_while_reservations_fit_and_refuses_as_insufficient_quota() {
    let (limits, bound, cfg) = setup("[groups.g]\napi_keys = [\"k\"]\nbudget_usd = 1.0\nbudget_period = \"day\"\n");
    let c = caller(&cfg, "k");
    block(async {
        let ask = Ask { tokens: 10, cost: 0.4 };
        let a = limits.admit(&bound, c, ask).await.ok().unwrap().0.unwrap();
        let b = limits.admit(&bound, c, ask).await.ok().unwrap().0.unwrap();
        // 0.8 reserved: a third 0.4 would overspend.
        let e = limits.admit(&bound, c, ask).await.err().unwrap().error();
        assert_eq!((e.status.as_u16(), e.code, e.r#type), (429, Some("insufficient_quota"), "insufficient_quota"));
        let wait = e.retry_after.unwrap();
        assert!(wait <= Duration::from_secs(86_400) && wait >= Duration::from_secs(1));
        // Settled at their real cost: 0.1 each, so 0.8 is left.
        a.settle(Some(10), Some(0.1));
        b.settle(Some(10), Some(0.1));
        let mut n = 0;
        while let Ok((Some(x), _)) = limits.admit(&bound, c, ask).await {
            std::mem::forget(x);
            n += 1;
        }
        assert_eq!(n, 2);
        let e = block_never(&limits, &bound, c);
        assert_eq!(e.param, Some("max_tokens"));
    });
}

fn block_never(limits: &Limits, bound: &Bound, c: Caller) -> Error {
    let f = limits.admit(bound, c, Ask { tokens: 1, cost: 1.5 });
    let r = futures_now(f);
    r.err().unwrap().error()
}

/// Polls a future that never waits (the memory backend) once.
fn futures_now<F: std::future::Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match f.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(v) => v,
        std::task::Poll::Pending => panic!("the memory backend never waits"),
    }
}

#[test]
fn budget_periods_follow_the_utc_calendar() {
    let at = |y, m, d, secs: u64| {
        SystemTime::UNIX_EPOCH + Duration::from_secs(crate::log::days(y, m, d) as u64 * 86_400 + secs)
    };
    // 2026-12-06 is a Sunday: its week ends at Monday 00:00, its month at 2027-01-01.
    let t = at(2026, 12, 6, 3600);
    assert_eq!(period(Period::Day, t).1, Some(Duration::from_secs(23 * 3600)));
    assert_eq!(period(Period::Week, t).1, Some(Duration::from_secs(23 * 3600)));
    assert_eq!(period(Period::Month, t).1, Some(Duration::from_secs((25 * 24 + 23) * 3600)));
    assert_eq!(period(Period::Total, t), (0, None));
    assert_ne!(period(Period::Week, t).0, period(Period::Week, at(2026, 12, 7, 0)).0);
    assert_eq!(period(Period::Week, at(2026, 12, 7, 0)).0, period(Period::Week, at(2026, 12, 13, 86_399)).0);
    assert_ne!(period(Period::Month, at(2026, 12, 31, 86_399)).0, period(Period::Month, at(2027, 1, 1, 0)).0);
    assert_eq!(period(Period::Month, at(2024, 2, 1, 0)).0, period(Period::Month, at(2024, 2, 29, 0)).0);
    for d in [-1000, 0, 59, 60, 365, 20_000, 100_000] {
        let (y, m, dd) = crate::log::civil(d);
        assert_eq!(crate::log::days(y, m, dd), d);
    }
}

#[test]
fn reset_durations_read_as_openai_writes_them() {
    assert_eq!(reset_text(Duration::from_millis(20)), "20ms");
    assert_eq!(reset_text(Duration::from_millis(1500)), "1.5s");
    assert_eq!(reset_text(Duration::from_secs(1)), "1s");
    assert_eq!(reset_text(Duration::from_secs(360)), "6m0s");
    assert_eq!(reset_text(Duration::from_secs(3723)), "1h2m3s");
}

#[test]
fn spend_survives_a_restart_through_the_state_file() {
    let dir = std::env::temp_dir().join(format!("lmgate-limits-{}", fastrand::u64(..)));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("state.json");
    let text =
        format!("[limits]\nstate_file = \"{}\"\n[groups.g]\napi_keys = [\"k\"]\nbudget_usd = 1.0\n", file.display());
    let ask = Ask { tokens: 1, cost: 0.3 };
    {
        let (limits, bound, cfg) = setup(&text);
        let c = caller(&cfg, "k");
        for _ in 0..2 {
            futures_now(limits.admit(&bound, c, ask)).ok().unwrap().0.unwrap().settle(Some(1), Some(0.3));
        }
        limits.inner.save();
    }
    let (limits, bound, cfg) = setup(&text);
    let c = caller(&cfg, "k");
    // 0.6 spent before the restart: one more 0.3 fits, a second does not.
    std::mem::forget(futures_now(limits.admit(&bound, c, ask)).ok().unwrap());
    assert!(futures_now(limits.admit(&bound, c, ask)).is_err());
    std::fs::write(&file, "{not json").unwrap();
    let e = Limits::new(&config(&text)).err().unwrap();
    assert!(e.contains("limits.state_file") && e.contains("not a state file"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_reload_keeps_the_counters_by_name() {
    let (limits, bound, cfg) = setup("[groups.g]\napi_keys = [\"k\"]\nrpm = 2\n");
    let c = caller(&cfg, "k");
    assert!(futures_now(limits.admit(&bound, c, ONE)).is_ok());
    assert!(futures_now(limits.admit(&bound, c, ONE)).is_ok());
    let again = limits.bind(&config("[groups.g]\napi_keys = [\"k\"]\nrpm = 2\n"));
    assert!(futures_now(limits.admit(&again, c, ONE)).is_err());
}

#[test]
fn bad_limit_keys_are_errors_naming_the_key_and_line() {
    let e = |t: &str| Config::parse(t, &|_: &str| None).err().unwrap().0;
    assert_eq!(
        e("[groups.g]\napi_keys = [\"k\"]\nrpm = 0\n"),
        "groups.g.rpm (line 3): `0` must be a whole number of at least 1"
    );
    assert!(e("[groups.g]\napi_keys = [\"k\"]\nkey_tpm = -5\n").starts_with("groups.g.key_tpm (line 3)"));
    assert!(e("[groups.g]\napi_keys = [\"k\"]\nbudget_period = \"day\"\n")
        .starts_with("groups.g.budget_period (line 3): a budget period without `budget_usd`"));
    assert!(e("[groups.g]\napi_keys = [\"k\"]\nbudget_usd = -1.0\n").starts_with("groups.g.budget_usd (line 3)"));
    assert!(e("[groups.g]\napi_keys = [\"k\"]\nbudget_usd = 1.0\nbudget_period = \"year\"\n")
        .starts_with("groups.g.budget_period (line 4)"));
    assert!(e("[limits]\nbackend = \"redis\"\n")
        .starts_with("limits.backend (line 2): `backend = \"redis\"` needs `redis_url`"));
    assert!(e("[limits]\nbackend = \"memcached\"\n").starts_with("limits.backend (line 2)"));
    assert!(e("[limits]\nredis_timeout_ms = 0\nbackend = \"redis\"\nredis_url = \"redis://x\"\n")
        .starts_with("limits.redis_timeout_ms (line 2)"));
    assert!(e("[limits]\nredis_url = \"redis://x\"\n").starts_with("limits.redis_url: only used with"));
    assert!(e("[limits]\non_backend_error = \"maybe\"\n").starts_with("limits.on_backend_error (line 2)"));
    let secret = e("[limits]\nbackend = \"redis\"\nredis_url = \"http://user:hunter2@x\"\n");
    assert!(!secret.contains("hunter2"), "{secret}");
    assert!(e("[connections.c]\napi_type = \"mock\"\nmax_concurrent = 0\n")
        .starts_with("connections.c.max_concurrent (line 3)"));
    assert!(e("[connections.c]\napi_type = \"mock\"\ndefault_max_tokens = 0\n")
        .starts_with("connections.c.default_max_tokens (line 3)"));
}

#[test]
fn connection_quotas_admit_every_attempt() {
    let (limits, bound, _) = setup("[connections.q]\napi_type = \"mock\"\nrpm = 3\n");
    let id = 1;
    assert!(bound.connection_limited(id) && !bound.connection_limited(0));
    let admitted = (0..5).filter(|_| futures_now(limits.admit_connection(&bound, id, ONE)).is_ok()).count();
    assert_eq!(admitted, 3);
}

// ---- Redis: the machine's Redis on 127.0.0.1:6379 (CI starts one; elsewhere, skipped loudly).

fn redis_up() -> bool {
    let up =
        std::net::TcpStream::connect_timeout(&"127.0.0.1:6379".parse().unwrap(), Duration::from_millis(200)).is_ok();
    if !up {
        assert!(std::env::var_os("CI").is_none(), "CI must have Redis on 127.0.0.1:6379");
        eprintln!("SKIPPED: no Redis on 127.0.0.1:6379; the Redis limit tests did not run");
    }
    up
}

fn redis_setup(group: &str, limits: &str, backend: &str) -> (Limits, Bound, Config) {
    setup(&format!(
        "[limits]\nbackend = \"redis\"\nredis_url = \"{backend}\"\nredis_timeout_ms = 500\n[groups.{group}]\napi_keys = [\"k-{group}\"]\n{limits}"
    ))
}

#[test]
fn redis_two_replicas_admit_exactly_n_between_them() {
    if !redis_up() {
        return;
    }
    let group = format!("t{}", fastrand::u64(..));
    let url = "redis://127.0.0.1:6379/0";
    let (a, ba, cfg) = redis_setup(&group, "rpm = 7\n", url);
    let (b, bb, _) = redis_setup(&group, "rpm = 7\n", url);
    let c = caller(&cfg, &format!("k-{group}"));
    let replicas = [Arc::new((a, ba)), Arc::new((b, bb))];
    let admitted = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap().block_on(async {
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..21 {
            let r = replicas[i % 2].clone();
            tasks.spawn(async move { r.0.admit(&r.1, c, ONE).await.map(std::mem::forget).is_ok() });
        }
        tasks.join_all().await.into_iter().filter(|ok| *ok).count()
    });
    assert_eq!(admitted, 7);
}

#[test]
fn redis_concurrency_leases_budget_and_settlement() {
    if !redis_up() {
        return;
    }
    let group = format!("t{}", fastrand::u64(..));
    let (l, b, cfg) =
        redis_setup(&group, "max_concurrent = 2\ntpm = 1000\nbudget_usd = 1.0\n", "redis://127.0.0.1:6379/0");
    let c = caller(&cfg, &format!("k-{group}"));
    tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap().block_on(async {
        let ask = Ask { tokens: 300, cost: 0.3 };
        let (x, q) = l.admit(&b, c, ask).await.ok().unwrap();
        assert_eq!(q.tokens.unwrap().remaining, 700);
        let x = x.unwrap();
        assert!(x.lease_member().is_some());
        let y = l.admit(&b, c, ask).await.ok().unwrap().0.unwrap();
        let e = l.admit(&b, c, ask).await.err().unwrap().error();
        assert_eq!((e.status.as_u16(), e.code), (429, Some("rate_limit_exceeded")));
        // Settled: the slot, the unused tokens and the unspent dollars come back.
        x.settle(Some(100), Some(0.05));
        y.settle(Some(100), Some(0.05));
        l.flush(Duration::from_secs(2)).await;
        let (z, q) = l.admit(&b, c, ask).await.ok().unwrap();
        assert_eq!(q.tokens.unwrap().remaining, 500);
        std::mem::forget(z);
        // 0.1 spent + 0.3 reserved: one more 0.3 fits (0.7), then 1.0, then no more.
        let w = l.admit(&b, c, Ask { tokens: 1, cost: 0.3 }).await.ok().unwrap().0;
        let e = l.admit(&b, c, Ask { tokens: 1, cost: 0.35 }).await.err().unwrap().error();
        assert_eq!(e.code, Some("insufficient_quota"), "{}", e.message);
        drop(w);
    });
}

#[test]
fn redis_that_never_answers_gets_the_policy_in_time() {
    // A listener that accepts and never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("redis://{}/0", silent.local_addr().unwrap());
    for (policy, admitted) in [("deny", false), ("allow", true)] {
        let (l, b, cfg) = setup(&format!(
            "[limits]\nbackend = \"redis\"\nredis_url = \"{url}\"\nredis_timeout_ms = 50\non_backend_error = \"{policy}\"\n[groups.g]\napi_keys = [\"k\"]\nrpm = 5\n"
        ));
        let c = caller(&cfg, "k");
        let started = Instant::now();
        let r = block(l.admit(&b, c, ONE));
        assert!(started.elapsed() < Duration::from_millis(500), "{:?}", started.elapsed());
        assert_eq!(r.is_ok(), admitted);
        if let Err(d) = r {
            assert_eq!(d.error().status.as_u16(), 503);
        }
    }
}
