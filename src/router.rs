//! Model routing: requested model name → a [`Route`]: the targets (connection and upstream
//! model) the attempt loop may use, and, for a pool, how it uses them ([`Pool`]).
//!
//! `[routing]` maps patterns to targets (`"connection.model"` or `"connection.*"`): one (a
//! plain route, today's behaviour), or a pool (a list or a table; see config.toml). An exact
//! name (no `*`) beats every pattern; patterns are tried in file order and the first match
//! decides, with no fall-through to a later pattern (a pool's `fallbacks` name other routes
//! explicitly). `*` matches any run of characters (including none), anywhere in the pattern.

use crate::pool::{Cooldown, Health, Pickable, Strategy};
use bytes::Bytes;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// A routing key: an exact model name or a `*` wildcard pattern.
#[derive(Debug, Clone)]
pub struct Pattern {
    text: String,
    /// The text split at `*`; one part means an exact name.
    parts: Vec<String>,
}

impl Pattern {
    /// Compiles a pattern.
    pub fn new(text: &str) -> Self {
        Pattern { text: text.to_owned(), parts: text.split('*').map(str::to_owned).collect() }
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether it contains a wildcard.
    pub fn is_wildcard(&self) -> bool {
        self.parts.len() > 1
    }

    /// Whether `name` matches.
    pub fn matches(&self, name: &str) -> bool {
        let (first, rest) = match self.parts.split_first() {
            Some(x) => x,
            None => return name.is_empty(),
        };
        if rest.is_empty() {
            return name == first;
        }
        let Some(mut tail) = name.strip_prefix(first.as_str()) else { return false };
        let (last, middle) = rest.split_last().unwrap_or((first, &[]));
        for part in middle {
            match tail.find(part.as_str()) {
                Some(i) => tail = &tail[i + part.len()..],
                None => return false,
            }
        }
        tail.len() >= last.len() && tail.ends_with(last.as_str())
    }
}

/// Where a route sends requests.
#[derive(Debug, Clone)]
pub struct Target {
    /// Connection id (index into `Config::connections`).
    pub connection: usize,
    /// The upstream model: `None` passes the requested name through (`connection.*`).
    pub model: Option<UpstreamModel>,
    /// The target as written (`conn.model`, `conn.*`): its name in logs and for its health.
    pub label: Box<str>,
    /// Share of a `weighted` pool's traffic (relative to the others).
    pub weight: u32,
    /// Health shared by every route naming this target, kept across reloads. Plain routes
    /// never touch it.
    pub health: Arc<Health>,
    /// Its connection is disabled (a key variable is missing): attempts at it are skipped, so
    /// it never counts as another usable target when deciding a cooldown.
    pub disabled: bool,
}

/// A renamed upstream model, with its JSON string token pre-rendered for splicing.
#[derive(Debug, Clone)]
pub struct UpstreamModel {
    /// The model name.
    pub name: String,
    /// `name` as a JSON string token, quotes included.
    pub json: Bytes,
}

impl Target {
    /// A target on connection `connection` (named `conn_name`) from the part after `conn_name.`
    /// in a routing value; weight 1, fresh health.
    pub fn new(connection: usize, conn_name: &str, model: &str) -> Self {
        let label = format!("{conn_name}.{model}").into();
        let model = (model != "*").then(|| {
            let mut json = Vec::with_capacity(model.len() + 2);
            crate::json::write_str(&mut json, model);
            UpstreamModel { name: model.to_owned(), json: json.into() }
        });
        Target { connection, model, label, weight: 1, health: Arc::default(), disabled: false }
    }

    /// The model to send upstream for a requested name.
    pub fn upstream_model<'a>(&'a self, requested: &'a str) -> &'a str {
        self.model.as_ref().map_or(requested, |m| m.name.as_str())
    }
}

impl Pickable for Target {
    fn health(&self) -> &Health {
        &self.health
    }

    fn weight(&self) -> u32 {
        self.weight
    }
}

/// What a model name routes to.
#[derive(Debug, Clone)]
pub struct Route {
    /// Its index in the router (file order).
    pub id: usize,
    /// The routing key that matched.
    pub pattern: Pattern,
    /// Where requests may go, in order; never empty (at most [`crate::pool::MAX_TARGETS`]).
    pub targets: Vec<Target>,
    /// How a pool uses its targets; `None` for a plain route (one target, one attempt, no
    /// health kept: exactly the hop it always was).
    pub pool: Option<Box<Pool>>,
}

/// A pool's policy: how it chooses, retries, cools down and falls back.
#[derive(Debug, Clone)]
pub struct Pool {
    /// How a target is chosen.
    pub strategy: Strategy,
    /// Attempts and waits.
    pub retries: Retries,
    /// When failing targets are taken out.
    pub cooldown: Cooldown,
    /// The `fallbacks` as written.
    pub fallbacks: Vec<String>,
    /// The routes tried after this one, in order: its fallbacks, each followed by its own
    /// fallbacks (depth first, each route once), with the name each is asked for.
    pub chain: Vec<(usize, Arc<str>)>,
}

/// `[retries]`, or a route's own values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retries {
    /// Attempts per request across the pool (1: never retry).
    pub attempts: u32,
    /// The first backoff before retrying a target already tried; doubles per retry.
    pub backoff: Duration,
    /// The cap on one backoff.
    pub max_backoff: Duration,
    /// The longest upstream `Retry-After` (or cooldown) the gateway waits out for a request.
    pub retry_after_max: Duration,
}

impl Route {
    /// A plain route to one target.
    pub fn plain(pattern: &str, target: Target) -> Self {
        Route { id: 0, pattern: Pattern::new(pattern), targets: vec![target], pool: None }
    }
}

/// The compiled routing table.
#[derive(Debug, Default)]
pub struct Router {
    routes: Vec<Route>,
    exact: HashMap<String, usize>,
    wildcards: Vec<usize>,
}

impl Router {
    /// Builds a router from routes in file order (their ids are set to their positions).
    pub fn new(mut routes: Vec<Route>) -> Self {
        let mut exact = HashMap::new();
        let mut wildcards = Vec::new();
        for (i, r) in routes.iter_mut().enumerate() {
            r.id = i;
            if r.pattern.is_wildcard() {
                wildcards.push(i);
            } else {
                exact.entry(r.pattern.as_str().to_owned()).or_insert(i);
            }
        }
        Router { routes, exact, wildcards }
    }

    /// The route for `model`: an exact entry, else the first matching pattern in file order.
    pub fn route(&self, model: &str) -> Option<&Route> {
        let i = match self.exact.get(model) {
            Some(&i) => i,
            None => *self.wildcards.iter().find(|&&i| self.routes[i].pattern.matches(model))?,
        };
        Some(&self.routes[i])
    }

    /// Every route in file order.
    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// Sets each pool's flattened fallback chain (`chains[route id]`).
    pub fn set_chains(&mut self, chains: Vec<Vec<(usize, Arc<str>)>>) {
        for (route, chain) in self.routes.iter_mut().zip(chains) {
            if let Some(pool) = &mut route.pool {
                pool.chain = chain;
            }
        }
    }

    /// Takes over the health of `previous`'s targets that have the same label and for which
    /// `unchanged` holds (their connection still reaches the same upstream the same way), so a
    /// reload keeps cooldowns, failure counts and latency for every target it keeps, and a
    /// target whose key or address was just fixed starts afresh.
    pub fn adopt_health(&mut self, previous: &Router, unchanged: impl Fn(&Target) -> bool) {
        let old: HashMap<&str, &Arc<Health>> =
            previous.routes.iter().flat_map(|r| &r.targets).map(|t| (&*t.label, &t.health)).collect();
        for t in self.routes.iter_mut().flat_map(|r| &mut r.targets) {
            if let Some(h) = old.get(&*t.label).filter(|_| unchanged(t)) {
                t.health = Arc::clone(h);
            }
        }
    }

    /// Number of routes.
    pub fn len(&self) -> usize {
        self.routes.len()
    }

    /// Whether there are no routes.
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router(pairs: &[(&str, usize, &str)]) -> Router {
        Router::new(pairs.iter().map(|(p, c, m)| Route::plain(p, Target::new(*c, "c", m))).collect())
    }

    fn first(r: &Router, model: &str) -> Option<(String, usize, String)> {
        let route = r.route(model)?;
        let t = &route.targets[0];
        Some((route.pattern.as_str().to_owned(), t.connection, t.upstream_model(model).to_owned()))
    }

    #[test]
    fn wildcards_match_anywhere() {
        let cases = [
            ("gpt*", "gpt-4o", true),
            ("gpt*", "gpt", true),
            ("gpt*", "xgpt", false),
            ("*-mini", "gpt-4o-mini", true),
            ("*-mini", "mini", false),
            ("a*b*c", "aXbYc", true),
            ("a*b*c", "abc", true),
            ("a*b*c", "acb", false),
            ("a*a", "a", false),
            ("*", "", true),
            ("exact", "exact", true),
            ("exact", "exactly", false),
        ];
        for (p, name, want) in cases {
            assert_eq!(Pattern::new(p).matches(name), want, "{p} ~ {name}");
        }
    }

    #[test]
    fn exact_name_beats_an_earlier_pattern() {
        let r = router(&[("gpt*", 0, "*"), ("gpt-4o", 1, "real")]);
        assert_eq!(first(&r, "gpt-4o"), Some(("gpt-4o".into(), 1, "real".into())));
    }

    #[test]
    fn patterns_are_tried_in_file_order_not_alphabetical() {
        // "z*" comes first in the file and must win over "*" and "zz*".
        let r = router(&[("z*", 2, "*"), ("zz*", 1, "*"), ("*", 0, "fallback")]);
        assert_eq!(first(&r, "zzz").unwrap().1, 2);
        assert_eq!(first(&r, "other").unwrap().2, "fallback");
        let r = router(&[("m*", 0, "*")]);
        assert!(r.route("x").is_none());
    }

    #[test]
    fn a_reload_keeps_the_health_of_targets_with_the_same_name_only() {
        let cfg = |routing: &str| {
            crate::config::Config::parse(
                &format!("[connections.a]\napi_type = \"mock\"\n[routing]\n{routing}"),
                &|_: &str| None,
            )
            .unwrap()
        };
        let old = cfg("\"p\" = [\"a.x\", \"a.y\"]\n");
        let mut new = cfg("\"q\" = [\"a.y\", \"a.z\"]\n");
        new.router.adopt_health(&old.router, |_| true);
        let (old_t, new_t) = (&old.router.routes()[0].targets, &new.router.routes()[0].targets);
        assert!(Arc::ptr_eq(&new_t[0].health, &old_t[1].health), "a.y keeps its health, whatever the route");
        assert!(!Arc::ptr_eq(&new_t[1].health, &old_t[0].health) && !Arc::ptr_eq(&new_t[1].health, &old_t[1].health));
        // A changed connection starts afresh.
        let mut again = cfg("\"q\" = [\"a.y\"]\n");
        again.router.adopt_health(&old.router, |_| false);
        assert!(!Arc::ptr_eq(&again.router.routes()[0].targets[0].health, &old_t[1].health));
    }

    #[test]
    fn renamed_model_token_is_escaped_json() {
        let t = Target::new(0, "c", "a\"b");
        assert_eq!(&t.model.unwrap().json[..], b"\"a\\\"b\"");
    }
}
