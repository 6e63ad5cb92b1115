//! `[routing]`, `[retries]` and `[cooldown]` → the [`Router`].
//!
//! A routing value is a string (one target: a plain route, today's behaviour), a list of targets
//! (a pool with the `[retries]` and `[cooldown]` defaults), or a table (a pool with its own
//! `strategy`, `fallbacks` and retry values). A target is `"conn.model"` / `"conn.*"`, or in a
//! list or table also `{ to = "conn.model", weight = N }`. Values are read from `toml::Value` by
//! hand, so every mistake is reported with the route, the key and the line.

use super::{err, line_of, ConfigError, Connection};
use crate::pool::{Cooldown, Health, Strategy, MAX_TARGETS};
use crate::router::{Pattern, Pool, Retries, Route, Router, Target};
use indexmap::IndexMap;
use serde::Deserialize;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use toml::{Spanned, Value};

/// `[retries]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRetries {
    attempts: Option<Spanned<i64>>,
    backoff_ms: Option<Spanned<i64>>,
    max_backoff_ms: Option<Spanned<i64>>,
    retry_after_max_secs: Option<Spanned<f64>>,
}

/// `[cooldown]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCooldown {
    failures: Option<Spanned<i64>>,
    secs: Option<Spanned<f64>>,
}

/// The keys a route table may have.
const ROUTE_KEYS: [&str; 7] =
    ["targets", "strategy", "fallbacks", "attempts", "backoff_ms", "max_backoff_ms", "retry_after_max_secs"];

/// A value with what it needs to report an error: its name (`routing."x".attempts`) and line.
struct At<'a> {
    key: String,
    line: &'a str,
}

impl At<'_> {
    fn fail<T>(&self, what: impl std::fmt::Display) -> Result<T, ConfigError> {
        err(format!("{}{}: {what}", self.key, self.line))
    }

    /// A whole number of at least `min`.
    fn whole(&self, v: i64, min: i64) -> Result<u64, ConfigError> {
        if v < min || v > 1 << 40 {
            return self.fail(format!("`{v}` must be a whole number of at least {min}"));
        }
        Ok(v as u64)
    }

    /// A positive number of seconds.
    fn secs(&self, v: f64) -> Result<Duration, ConfigError> {
        if !v.is_finite() || v <= 0.0 || v > 1e9 {
            return self.fail(format!("`{v}` must be a positive number of seconds"));
        }
        Ok(Duration::from_secs_f64(v))
    }

    fn of(&self, v: &Value) -> Result<i64, ConfigError> {
        v.as_integer().map_or_else(|| self.fail(format!("`{v}` must be a whole number")), Ok)
    }
}

/// Compiles the routing table. `connections` are the compiled connections (a target names one).
pub fn compile(
    routing: &IndexMap<String, Spanned<Value>>,
    retries: &RawRetries,
    cooldown: &RawCooldown,
    connections: &[Connection],
    source: Option<&str>,
) -> Result<Router, ConfigError> {
    let defaults = default_retries(retries, source)?;
    let cooldown = compile_cooldown(cooldown, source)?;
    let mut health: HashMap<String, Arc<Health>> = HashMap::new();
    let mut routes = Vec::with_capacity(routing.len());
    for (pattern, value) in routing {
        let line = line_of(source, value.span());
        let at = |key: &str| At { key: format!("routing.\"{pattern}\"{key}"), line: &line };
        let mut target = |v: &str, at: &At<'_>| -> Result<Target, ConfigError> {
            let mut t = target(v, at, connections)?;
            t.health = health.entry(t.label.to_string()).or_default().clone();
            Ok(t)
        };
        let route = match value.get_ref() {
            Value::String(s) => Route::plain(pattern, target(s, &at(""))?),
            Value::Array(list) => {
                let targets = targets(list, &at(""), &mut target)?;
                let pool = Pool {
                    strategy: Strategy::Weighted,
                    retries: defaults,
                    cooldown,
                    fallbacks: vec![],
                    chain: vec![],
                };
                Route { id: 0, pattern: Pattern::new(pattern), targets, pool: Some(Box::new(pool)) }
            }
            Value::Table(t) => {
                if let Some(k) = t.keys().find(|k| !ROUTE_KEYS.contains(&k.as_str())) {
                    return at("").fail(format!("unknown key `{k}` (known: {})", ROUTE_KEYS.join(", ")));
                }
                let list = match t.get("targets") {
                    Some(Value::Array(list)) => list.clone(),
                    Some(one @ Value::String(_)) => vec![one.clone()],
                    Some(other) => return at(".targets").fail(format!("`{other}` must be a list of targets")),
                    None => return at("").fail("a route table needs `targets`"),
                };
                let targets = targets(&list, &at(".targets"), &mut target)?;
                let strategy = match t.get("strategy") {
                    None => Strategy::Weighted,
                    Some(v) => {
                        let name = v.as_str().unwrap_or_default();
                        match Strategy::NAMES.iter().find(|(n, _)| *n == name) {
                            Some((_, s)) => *s,
                            None => {
                                let known: Vec<&str> = Strategy::NAMES.iter().map(|(n, _)| *n).collect();
                                return at(".strategy")
                                    .fail(format!("unknown strategy `{v}` (known: {})", known.join(", ")));
                            }
                        }
                    }
                };
                let fallbacks = match t.get("fallbacks") {
                    None => vec![],
                    Some(Value::Array(list)) => list
                        .iter()
                        .map(|f| f.as_str().map(str::to_owned))
                        .collect::<Option<Vec<_>>>()
                        .map_or_else(|| at(".fallbacks").fail("must be a list of route names"), Ok)?,
                    Some(_) => return at(".fallbacks").fail("must be a list of route names"),
                };
                let mut r = defaults;
                if let Some(v) = t.get("attempts") {
                    let a = at(".attempts");
                    r.attempts = a.whole(a.of(v)?, 1)?.min(u32::MAX as u64) as u32;
                }
                if let Some(v) = t.get("backoff_ms") {
                    let a = at(".backoff_ms");
                    r.backoff = Duration::from_millis(a.whole(a.of(v)?, 1)?);
                }
                if let Some(v) = t.get("max_backoff_ms") {
                    let a = at(".max_backoff_ms");
                    r.max_backoff = Duration::from_millis(a.whole(a.of(v)?, 1)?);
                }
                if let Some(v) = t.get("retry_after_max_secs") {
                    let a = at(".retry_after_max_secs");
                    let n = v.as_float().or_else(|| v.as_integer().map(|i| i as f64));
                    r.retry_after_max = a.secs(n.map_or_else(|| a.fail(format!("`{v}` must be a number")), Ok)?)?;
                }
                if r.backoff > r.max_backoff {
                    return at(".backoff_ms").fail(format!(
                        "{} ms is above max_backoff_ms ({} ms)",
                        r.backoff.as_millis(),
                        r.max_backoff.as_millis()
                    ));
                }
                let pool = Pool { strategy, retries: r, cooldown, fallbacks, chain: vec![] };
                Route { id: 0, pattern: Pattern::new(pattern), targets, pool: Some(Box::new(pool)) }
            }
            other => {
                return at("").fail(format!("`{other}` must be \"connection.model\", a list of targets or a table"))
            }
        };
        routes.push(route);
    }
    let mut router = Router::new(routes);
    chain_fallbacks(&mut router, routing, source)?;
    Ok(router)
}

/// One target: `"conn.model"` or `"conn.*"`.
fn target(value: &str, at: &At<'_>, connections: &[Connection]) -> Result<Target, ConfigError> {
    let Some((conn, model)) = value.split_once('.') else {
        return at.fail(format!("`{value}` must be \"connection.model\" or \"connection.*\""));
    };
    let Some(id) = connections.iter().position(|c| c.name == conn) else {
        let known: Vec<&str> = connections.iter().map(|c| c.name.as_str()).collect();
        let known = if known.is_empty() { "none".to_owned() } else { known.join(", ") };
        return at.fail(format!("no connection named `{conn}` (known: {known})"));
    };
    if model.is_empty() {
        return at.fail(format!("the model after `{conn}.` is empty"));
    }
    if model != "*" {
        if let Err(why) = connections[id].provider.check_model(model) {
            return at.fail(why);
        }
    }
    Ok(Target { disabled: connections[id].disabled.is_some(), ..Target::new(id, conn, model) })
}

/// A pool's targets: strings or `{ to, weight }` tables; at least one, at most
/// [`MAX_TARGETS`], none twice.
fn targets(
    list: &[Value],
    at: &At<'_>,
    target: &mut impl FnMut(&str, &At<'_>) -> Result<Target, ConfigError>,
) -> Result<Vec<Target>, ConfigError> {
    if list.is_empty() || list.len() > MAX_TARGETS {
        return at.fail(format!("a pool has 1 to {MAX_TARGETS} targets, not {}", list.len()));
    }
    let mut out: Vec<Target> = Vec::with_capacity(list.len());
    for (i, v) in list.iter().enumerate() {
        let sub = At { key: format!("{}[{i}]", at.key), line: at.line };
        let t = match v {
            Value::String(s) => target(s, &sub)?,
            Value::Table(t) => {
                if let Some(k) = t.keys().find(|k| *k != "to" && *k != "weight") {
                    return sub.fail(format!("unknown key `{k}` (known: to, weight)"));
                }
                let to = t.get("to").and_then(Value::as_str);
                let mut tg = target(to.map_or_else(|| sub.fail("needs `to = \"connection.model\"`"), Ok)?, &sub)?;
                if let Some(w) = t.get("weight") {
                    let a = At { key: format!("{}.weight", sub.key), line: at.line };
                    tg.weight = a.whole(a.of(w)?, 1)?.min(1_000_000) as u32;
                }
                tg
            }
            other => return at.fail(format!("`{other}` must be \"connection.model\" or {{ to = ..., weight = ... }}")),
        };
        if out.iter().any(|o| o.label == t.label) {
            return at.fail(format!("`{}` is listed twice", t.label));
        }
        out.push(t);
    }
    Ok(out)
}

/// Resolves every pool's fallbacks to routes, refuses names that route nowhere and cycles, and
/// flattens each pool's chain.
fn chain_fallbacks(
    router: &mut Router,
    routing: &IndexMap<String, Spanned<Value>>,
    source: Option<&str>,
) -> Result<(), ConfigError> {
    let routes = router.routes();
    let mut edges: Vec<Vec<(usize, Arc<str>)>> = vec![vec![]; routes.len()];
    for (i, route) in routes.iter().enumerate() {
        let Some(pool) = &route.pool else { continue };
        let line = routing.get_index(i).map_or(String::new(), |(_, v)| line_of(source, v.span()));
        for name in &pool.fallbacks {
            let Some(to) = router.route(name) else {
                let known: Vec<&str> = routes.iter().map(|r| r.pattern.as_str()).collect();
                return err(format!(
                    "routing.\"{}\".fallbacks{line}: `{name}` routes nowhere (routes: {})",
                    route.pattern.as_str(),
                    known.join(", ")
                ));
            };
            edges[i].push((to.id, Arc::from(name.as_str())));
        }
    }
    // A cycle: a walk from a route that comes back to a route still on its path. Routes whose
    // every walk is known to end (`done`) are not walked again, so this is linear in the edges.
    fn walk(
        at: usize,
        edges: &[Vec<(usize, Arc<str>)>],
        path: &mut Vec<usize>,
        done: &mut [bool],
    ) -> Option<Vec<usize>> {
        if let Some(start) = path.iter().position(|&p| p == at) {
            let mut cycle = path[start..].to_vec();
            cycle.push(at);
            return Some(cycle);
        }
        if done[at] {
            return None;
        }
        path.push(at);
        let found = edges[at].iter().find_map(|(to, _)| walk(*to, edges, path, done));
        path.pop();
        done[at] = found.is_none();
        found
    }
    let mut done = vec![false; routes.len()];
    for i in 0..routes.len() {
        if let Some(cycle) = walk(i, &edges, &mut Vec::new(), &mut done) {
            let names: Vec<String> = cycle.iter().map(|&r| format!("\"{}\"", routes[r].pattern.as_str())).collect();
            let line = routing.get_index(cycle[0]).map_or(String::new(), |(_, v)| line_of(source, v.span()));
            return err(format!(
                "routing.\"{}\".fallbacks{line}: the fallbacks form a cycle ({})",
                routes[cycle[0]].pattern.as_str(),
                names.join(" -> ")
            ));
        }
    }
    // Depth first, each route once, never the route itself.
    let chains: Vec<Vec<(usize, Arc<str>)>> = (0..routes.len())
        .map(|i| {
            let mut chain = Vec::new();
            let mut stack: Vec<(usize, Arc<str>)> = edges[i].iter().rev().cloned().collect();
            while let Some((r, name)) = stack.pop() {
                if r == i || chain.iter().any(|(c, _)| *c == r) {
                    continue;
                }
                stack.extend(edges[r].iter().rev().cloned());
                chain.push((r, name));
            }
            chain
        })
        .collect();
    router.set_chains(chains);
    Ok(())
}

fn default_retries(raw: &RawRetries, source: Option<&str>) -> Result<Retries, ConfigError> {
    let line = |s: std::ops::Range<usize>| line_of(source, s);
    let whole = |key: &str, v: &Option<Spanned<i64>>, default: u64| -> Result<u64, ConfigError> {
        v.as_ref()
            .map_or(Ok(default), |v| At { key: format!("retries.{key}"), line: &line(v.span()) }.whole(*v.get_ref(), 1))
    };
    let attempts = whole("attempts", &raw.attempts, 3)?.min(u32::MAX as u64) as u32;
    let backoff = Duration::from_millis(whole("backoff_ms", &raw.backoff_ms, 50)?);
    let max_backoff = Duration::from_millis(whole("max_backoff_ms", &raw.max_backoff_ms, 2_000)?);
    let retry_after_max = match &raw.retry_after_max_secs {
        None => Duration::from_secs(10),
        Some(v) => At { key: "retries.retry_after_max_secs".into(), line: &line(v.span()) }.secs(*v.get_ref())?,
    };
    if backoff > max_backoff {
        let span = raw.backoff_ms.as_ref().or(raw.max_backoff_ms.as_ref()).map_or(0..0, |v| v.span());
        return err(format!(
            "retries.backoff_ms{}: {} ms is above retries.max_backoff_ms ({} ms)",
            line(span),
            backoff.as_millis(),
            max_backoff.as_millis()
        ));
    }
    Ok(Retries { attempts, backoff, max_backoff, retry_after_max })
}

fn compile_cooldown(raw: &RawCooldown, source: Option<&str>) -> Result<Cooldown, ConfigError> {
    let failures = match &raw.failures {
        None => 3,
        Some(v) => At { key: "cooldown.failures".into(), line: &line_of(source, v.span()) }.whole(*v.get_ref(), 1)?,
    };
    let period = match &raw.secs {
        None => Duration::from_secs(30),
        Some(v) => At { key: "cooldown.secs".into(), line: &line_of(source, v.span()) }.secs(*v.get_ref())?,
    };
    Ok(Cooldown { failures: failures.min(u32::MAX as u64) as u32, period })
}

#[cfg(test)]
mod tests {
    use crate::config::{Config, ConfigError};
    use crate::pool::Strategy;
    use std::time::Duration;

    const CONNS: &str = "[connections.a]\napi_type = \"mock\"\n[connections.b]\napi_type = \"mock\"\n";

    fn parse(rest: &str) -> Result<Config, ConfigError> {
        Config::parse(&format!("{CONNS}{rest}"), &|_: &str| None)
    }

    fn error(rest: &str) -> String {
        match parse(rest) {
            Ok(_) => panic!("accepted: {rest}"),
            Err(e) => e.0,
        }
    }

    #[test]
    fn strings_lists_and_tables_make_plain_routes_and_pools() {
        let cfg = parse(
            "[retries]\nattempts = 5\n[cooldown]\nsecs = 9\n[routing]\n\"one\" = \"a.x\"\n\"list\" = [\"a.x\", \"b.*\"]\n\
             \"table\" = { targets = [{ to = \"a.x\", weight = 3 }, \"b.y\"], strategy = \"least_busy\", attempts = 2, \
             backoff_ms = 10, max_backoff_ms = 100, retry_after_max_secs = 0.5, fallbacks = [\"one\"] }\n",
        )
        .unwrap();
        let routes = cfg.router.routes();
        assert!(routes[0].pool.is_none() && routes[0].targets.len() == 1);
        let list = routes[1].pool.as_ref().unwrap();
        assert_eq!(
            (list.strategy, list.retries.attempts, list.cooldown.period),
            (Strategy::Weighted, 5, Duration::from_secs(9))
        );
        let table = routes[2].pool.as_ref().unwrap();
        assert_eq!((table.strategy, table.retries.attempts), (Strategy::LeastBusy, 2));
        assert_eq!(
            (table.retries.backoff, table.retries.max_backoff),
            (Duration::from_millis(10), Duration::from_millis(100))
        );
        assert_eq!(table.retries.retry_after_max, Duration::from_millis(500));
        assert_eq!(routes[2].targets.iter().map(|t| t.weight).collect::<Vec<_>>(), [3, 1]);
        assert_eq!(table.chain.iter().map(|(r, n)| (*r, &**n)).collect::<Vec<_>>(), [(0, "one")]);
        // The same target in two routes shares one health.
        assert!(std::sync::Arc::ptr_eq(&routes[1].targets[0].health, &routes[2].targets[0].health));
        let summary = cfg.summary();
        assert!(summary.contains("table -> pool [a.x, b.y], least_busy, attempts 2, backoff 10..100 ms"), "{summary}");
        assert!(summary.contains("list -> pool [a.x (weight 1), b.* (weight 1)], weighted, attempts 5"), "{summary}");
        assert!(summary.contains("cooldown after 3 failure(s) for 9s"), "{summary}");
        assert!(summary.contains("fallbacks: one") && summary.contains("one -> a.x"), "{summary}");
    }

    #[test]
    fn bad_pools_are_errors_naming_the_route_key_and_line() {
        let cases = [
            ("\"m\" = [\"a.x\", \"c.x\"]", "routing.\"m\"[1] (line 6): no connection named `c`"),
            (
                "\"m\" = { targets = [\"a.x\"], fallbacks = [\"nope\"] }",
                "routing.\"m\".fallbacks (line 6): `nope` routes nowhere",
            ),
            (
                "\"m\" = { targets = [{ to = \"a.x\", weight = 0 }] }",
                "routing.\"m\".targets[0].weight (line 6): `0` must be",
            ),
            ("\"m\" = { targets = [{ to = \"a.x\", weight = -2 }] }", "weight (line 6): `-2` must be"),
            ("\"m\" = { targets = [{ to = \"a.x\", weight = 1.5 }] }", "weight (line 6): `1.5` must be a whole number"),
            ("\"m\" = { targets = [\"a.x\"], attempts = 0 }", "routing.\"m\".attempts (line 6): `0` must be"),
            (
                "\"m\" = { targets = [\"a.x\"], backoff_ms = 500, max_backoff_ms = 100 }",
                "routing.\"m\".backoff_ms (line 6): 500 ms is above",
            ),
            (
                "\"m\" = { targets = [\"a.x\"], strategy = \"fastest\" }",
                "routing.\"m\".strategy (line 6): unknown strategy `\"fastest\"`",
            ),
            ("\"m\" = { targets = [\"a.x\"], stratgy = \"ordered\" }", "routing.\"m\" (line 6): unknown key `stratgy`"),
            ("\"m\" = { targets = [] }", "routing.\"m\".targets (line 6): a pool has 1 to 64 targets, not 0"),
            ("\"m\" = [\"a.x\", \"a.x\"]", "routing.\"m\" (line 6): `a.x` is listed twice"),
            ("\"m\" = { strategy = \"ordered\" }", "a route table needs `targets`"),
            ("\"m\" = 3", "routing.\"m\" (line 6): `3` must be"),
        ];
        for (route, want) in cases {
            let e = error(&format!("[routing]\n{route}\n"));
            assert!(e.contains(want), "{route}\n  got: {e}\n want: {want}");
        }
    }

    #[test]
    fn a_fallback_cycle_is_an_error_naming_it() {
        let e = error(
            "[routing]\n\"a\" = { targets = [\"a.x\"], fallbacks = [\"b\"] }\n\"b\" = { targets = [\"b.x\"], fallbacks = [\"a\"] }\n",
        );
        assert!(
            e.contains("routing.\"a\".fallbacks (line 6): the fallbacks form a cycle (\"a\" -> \"b\" -> \"a\")"),
            "{e}"
        );
        let e = error("[routing]\n\"s*\" = { targets = [\"a.x\"], fallbacks = [\"self\"] }\n");
        assert!(e.contains("cycle (\"s*\" -> \"s*\")"), "{e}");
    }

    #[test]
    fn many_routes_falling_back_to_the_next_two_are_checked_at_once() {
        // A ladder of 60 routes, each falling back to the next two: no cycle, 2^60 paths.
        let routes: String = (0..60)
            .map(|i| {
                let next: Vec<String> = (i + 1..=(i + 2).min(59)).map(|j| format!("\"r{j}\"")).collect();
                format!("\"r{i}\" = {{ targets = [\"a.x\"], fallbacks = [{}] }}\n", next.join(", "))
            })
            .collect();
        let cfg = parse(&format!("[routing]\n{routes}")).unwrap();
        assert_eq!(cfg.router.routes()[0].pool.as_ref().unwrap().chain.len(), 59);
    }

    #[test]
    fn retries_and_cooldown_values_are_validated_with_their_line() {
        let cases = [
            ("[retries]\nattempts = 0\n", "retries.attempts (line 6): `0` must be a whole number of at least 1"),
            ("[retries]\nbackoff_ms = -5\n", "retries.backoff_ms (line 6)"),
            (
                "[retries]\nbackoff_ms = 3000\n",
                "retries.backoff_ms (line 6): 3000 ms is above retries.max_backoff_ms (2000 ms)",
            ),
            ("[retries]\nretry_after_max_secs = 0\n", "retries.retry_after_max_secs (line 6): `0` must be a positive"),
            ("[cooldown]\nfailures = 0\n", "cooldown.failures (line 6)"),
            ("[cooldown]\nsecs = -1\n", "cooldown.secs (line 6)"),
            ("[cooldown]\nsecondz = 1\n", "unknown field `secondz`"),
            (
                "[connections.c]\napi_type = \"mock\"\nfirst_token_timeout_secs = 0\n",
                "connections.c.first_token_timeout_secs (line 7)",
            ),
        ];
        for (text, want) in cases {
            let e = error(text);
            assert!(e.contains(want), "{text}\n  got: {e}\n want: {want}");
        }
    }
}
