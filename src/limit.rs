//! Rate limits, concurrency limits and budgets: admitted before a request is sent, settled when
//! its record is written.
//!
//! A scope is a group (all its keys), one key of a group, or a connection (the upstream's quota).
//! Group and key scopes admit once per client request ([`Limits::admit`]); a connection admits
//! every upstream attempt. One admission checks every limit that applies and commits all or
//! nothing:
//!
//! - `rpm` and `tpm` are GCRA (the generic cell rate algorithm) with a burst of the whole
//!   limit: N per minute admits N at once, then one every 60/N s as the minute refills. Over any
//!   window of t seconds, at most N + N·t/60 are admitted; from a full bucket, exactly N in any
//!   instant. Tokens are reserved at admission (an estimate: `max_tokens` or the connection's
//!   `default_max_tokens`, plus prompt bytes / 4) and settled with the real usage when the
//!   response ends: the difference is refunded or charged.
//! - `max_concurrent` counts requests in flight (in Redis, leases with an expiry, renewed while a
//!   request runs, so a crashed replica's slots come back).
//! - A budget reserves the request's largest possible cost (at the route's most expensive target)
//!   and settles with the real cost. Spend can exceed the budget only by what admitted requests
//!   cost beyond their reservation (a prompt longer than bytes / 4 tokens).
//!
//! The memory backend keeps one small mutex per scope (never a global lock) and saves spend to
//! `state_file` at most a second after it changes, and at shutdown. The Redis backend runs one
//! Lua script per admission (one round trip, all limits, all or nothing), on Redis's clock, so
//! every replica sharing it sees one set of counters.

use crate::auth::{Caller, KeyId};
use crate::config::limits::{Backend, Budget, Limits as Settings, OnBackendError, Period, Rates};
use crate::config::{Config, Connection};
use crate::error::{Error, Kind};
use crate::json::RequestFields;
use crate::provider::Api;
use crate::router::Route;
use crate::snapshot::Snapshot;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

mod redis;

/// The rate window: limits are per minute.
const WINDOW: f64 = 60e9;
/// Tolerance for float rounding: N reservations of 60/N s fill the window exactly.
const SLACK: f64 = 1e-6;
/// The scopes one admission checks: a group and one of its keys, or a connection.
const MAX_SCOPES: usize = 2;
/// How long a Redis concurrency lease lives unless renewed.
const LEASE_TTL: Duration = Duration::from_secs(30);

/// What one request asks for.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Ask {
    /// Tokens reserved (prompt estimate + completion maximum).
    pub tokens: u64,
    /// USD reserved (the largest cost the request can have).
    pub cost: f64,
}

/// What a request may use, estimated before it is sent: prompt bytes / 4 (the rule of thumb for
/// English text under OpenAI's tokenizers) plus its `max_completion_tokens` or `max_tokens`.
pub struct Estimate {
    prompt: u64,
    completion: Option<u64>,
}

impl Estimate {
    /// The estimate of a request body, from the scan's ranges (no second parse).
    pub fn new(api: Api, fields: &RequestFields, body: &[u8]) -> Estimate {
        let input = match api {
            Api::Chat => &fields.messages,
            Api::Completions => &fields.prompt,
            Api::Embeddings => &fields.input,
        };
        let prompt = input.as_ref().map_or(0, |r| r.len() as u64).div_ceil(4);
        let number = |r: &Option<std::ops::Range<usize>>| {
            r.as_ref().and_then(|r| std::str::from_utf8(&body[r.clone()]).ok()?.parse::<u64>().ok())
        };
        let completion = match api {
            Api::Embeddings => Some(0),
            _ => number(&fields.max_completion_tokens).or_else(|| number(&fields.max_tokens)),
        };
        Estimate { prompt, completion }
    }

    /// The tokens asked of connection `conn` (its `default_max_tokens` without `max_tokens`).
    pub fn on(&self, conn: &Connection) -> Ask {
        Ask { tokens: self.prompt.saturating_add(self.completion.unwrap_or(conn.default_max_tokens)), cost: 0.0 }
    }

    /// The reservation of a request of `model` routed to `route` for group `group`: its tokens
    /// at the targets' largest `default_max_tokens`, and, when the group has a budget, its cost
    /// at the most expensive target the group may use (the route's, then its fallbacks'). A
    /// target without a price is a 403: a budget cannot hold spend it cannot count.
    pub fn ask(&self, snap: &Snapshot, route: &Route, model: &str, group: usize) -> Result<Ask, Error> {
        let cfg = &*snap.config;
        let g = &cfg.groups[group];
        let chain = route.pool.as_ref().map_or(&[][..], |p| &p.chain[..]);
        let links = std::iter::once((route, model)).chain(chain.iter().map(|(r, n)| (&cfg.router.routes()[*r], &**n)));
        let mut ask = Ask::default();
        for (route, name) in links {
            for (t, target) in route.targets.iter().enumerate() {
                let upstream = target.upstream_model(name);
                let Some(conn) = cfg.connections.get(target.connection) else { continue };
                if !g.allows(target.connection, name) {
                    continue;
                }
                let tokens = self.completion.unwrap_or(conn.default_max_tokens);
                ask.tokens = ask.tokens.max(self.prompt.saturating_add(tokens));
                if g.budget.is_none() {
                    continue;
                }
                let usage = crate::json::Usage { prompt: self.prompt, completion: tokens, ..Default::default() };
                let Some(cost) = snap.metrics.price(cfg, route.id, t, upstream).and_then(|p| p.cost(&usage)) else {
                    return Err(Error::forbidden(format!(
                        "Group `{}` has a budget, and model `{}` on connection `{}` has no price in [prices]: it cannot be used until it has one.",
                        g.name,
                        crate::error::clip(upstream),
                        conn.name
                    ))
                    .code("model_not_priced"));
                };
                ask.cost = ask.cost.max(cost);
            }
        }
        Ok(ask)
    }
}

/// One rate's standing after an admission, for the `x-ratelimit-*` headers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Window {
    /// The limit per minute.
    pub limit: u64,
    /// What is left now (after this request).
    pub remaining: u64,
    /// Until the limit is whole again.
    pub reset: Duration,
}

/// The standing of a request's tightest request and token limits.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Quota {
    /// Requests.
    pub requests: Option<Window>,
    /// Tokens.
    pub tokens: Option<Window>,
}

impl Quota {
    fn tighter(a: Option<Window>, b: Option<Window>) -> Option<Window> {
        match (a, b) {
            (Some(a), Some(b)) => Some(if b.remaining < a.remaining { b } else { a }),
            (a, b) => a.or(b),
        }
    }

    fn merge(self, other: Quota) -> Quota {
        Quota {
            requests: Self::tighter(self.requests, other.requests),
            tokens: Self::tighter(self.tokens, other.tokens),
        }
    }
}

/// A scope as a snapshot binds it: its limits and its state.
pub struct Scope {
    /// `g:NAME`, `k:KEYID` or `c:NAME`; Redis keys are `lmgate:` + this.
    name: Arc<str>,
    rates: Rates,
    budget: Option<Budget>,
    cell: Arc<Cell>,
}

/// A scope's state in memory (the memory backend's counters; unused with Redis).
#[derive(Default)]
struct Cell {
    state: Mutex<State>,
}

#[derive(Default, Clone, Copy)]
struct State {
    /// GCRA theoretical arrival times, ns on [`clock`].
    requests: f64,
    tokens: f64,
    in_flight: u64,
    /// The budget period the spend belongs to, and the spend (reservations included).
    period: i64,
    spent: f64,
}

/// The scopes of one snapshot.
#[derive(Default)]
pub struct Bound {
    groups: Vec<Option<Arc<Scope>>>,
    keys: HashMap<KeyId, Arc<Scope>>,
    connections: Vec<Option<Arc<Scope>>>,
}

impl Bound {
    /// Whether group `id` has limits of its own (its responses carry `x-ratelimit-*`).
    pub fn group_limited(&self, id: usize) -> bool {
        self.groups.get(id).is_some_and(Option::is_some)
    }

    /// Whether `caller`'s requests are admitted against a group or key scope.
    pub fn admits(&self, caller: Caller) -> bool {
        self.group_limited(caller.group) || caller.key.is_some_and(|k| self.keys.contains_key(&k))
    }

    /// Whether connection `id` has limits.
    pub fn connection_limited(&self, id: usize) -> bool {
        self.connections.get(id).is_some_and(Option::is_some)
    }
}

/// Why a request was not admitted.
pub enum Denied {
    /// A rate or concurrency limit: retry after the wait.
    Limited { scope: Arc<str>, wait: Duration, quota: Quota },
    /// The budget cannot cover the reservation; `wait` is until the period ends.
    Budget { scope: Arc<str>, wait: Option<Duration> },
    /// The reservation alone exceeds a limit: it can never be admitted.
    Never(String),
    /// The store did not answer in time and `on_backend_error = "deny"`.
    Backend,
}

impl Denied {
    /// The standing of the limit that refused, for the headers of the 429.
    pub fn quota(&self) -> Option<Quota> {
        match self {
            Denied::Limited { quota, .. } => Some(*quota),
            _ => None,
        }
    }

    /// The error the client gets.
    pub fn error(self) -> Error {
        match self {
            Denied::Limited { scope, wait, .. } => {
                let secs = wait.as_secs_f64().ceil().max(1.0);
                let mut e = Error::new(
                    Kind::Limited,
                    format!("Rate limit reached for {}; retry after {secs} s.", describe(&scope)),
                )
                .code("rate_limit_exceeded");
                e.retry_after = Some(wait.max(Duration::from_secs(1)));
                e
            }
            Denied::Budget { scope, wait } => {
                let mut e = Error::new(
                    Kind::Limited,
                    format!("The budget of {} cannot cover this request; it resets with its period.", describe(&scope)),
                )
                .code("insufficient_quota");
                e.r#type = "insufficient_quota";
                e.retry_after = wait.map(|w| w.max(Duration::from_secs(1)));
                e
            }
            Denied::Never(message) => Error::invalid_request(message).param("max_tokens"),
            Denied::Backend => {
                let mut e = Error::unavailable("The rate-limit store did not answer in time; retry shortly.")
                    .code("limits_unavailable");
                e.retry_after = Some(Duration::from_secs(1));
                e
            }
        }
    }
}

/// `group `a``, `your key` or `connection `b``.
fn describe(scope: &str) -> String {
    match scope.split_once(':') {
        Some(("g", g)) => format!("group `{g}`"),
        Some(("k", _)) => "your key".into(),
        Some(("c", c)) => format!("upstream connection `{c}`"),
        _ => scope.into(),
    }
}

/// An admitted request's hold on its scopes; settled when the request ends. Dropped unsettled
/// (nothing was used: a failed attempt), it refunds its tokens and cost.
pub struct Admission {
    limits: Arc<Inner>,
    scopes: Vec<Arc<Scope>>,
    ask: Ask,
    /// Budget period of the reservation.
    period: i64,
    /// Redis concurrency lease id, when one was taken.
    lease: Option<u64>,
    settled: bool,
}

impl Admission {
    /// Settles with what the request used: `tokens` and `cost` as known (`None` keeps the
    /// reservation: unknown usage is never refunded).
    pub fn settle(mut self, tokens: Option<u64>, cost: Option<f64>) {
        self.settled = true;
        let tokens = tokens.unwrap_or(self.ask.tokens);
        let cost = cost.unwrap_or(self.ask.cost);
        self.limits.settle(&self.scopes, self.ask, tokens, cost, self.period, self.lease.take());
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        if !self.settled {
            self.limits.settle(&self.scopes, self.ask, 0, 0.0, self.period, self.lease.take());
        }
    }
}

/// The limits of every request: the store, and the scopes' state kept across reloads by name.
pub struct Limits {
    inner: Arc<Inner>,
}

struct Inner {
    settings: Settings,
    cells: Mutex<HashMap<Arc<str>, Arc<Cell>>>,
    /// Spend changed since the state file was written.
    dirty: AtomicBool,
    redis: Option<redis::Store>,
    /// Lease ids for the Redis backend.
    next_lease: AtomicU64,
}

impl Limits {
    /// The limits store `config` names; loads the state file of the memory backend.
    pub fn new(config: &Config) -> Result<Limits, String> {
        let inner = Arc::new(Inner {
            settings: config.limits.clone(),
            cells: Mutex::default(),
            dirty: AtomicBool::new(false),
            redis: match &config.limits.backend {
                Backend::Redis { url, timeout } => Some(redis::Store::new(url, *timeout)?),
                Backend::Memory { .. } => None,
            },
            next_lease: AtomicU64::new(1),
        });
        if let Backend::Memory { state_file: Some(path) } = &inner.settings.backend {
            inner.load(path, config)?;
        }
        Ok(Limits { inner })
    }

    /// Whether a configuration can use this store (a reload cannot change `[limits]`).
    pub fn compatible(&self, config: &Config) -> bool {
        self.inner.settings == config.limits
    }

    /// Binds `config`'s scopes to their state (kept by name across reloads).
    pub fn bind(&self, config: &Config) -> Bound {
        let mut cells = self.inner.cells.lock().unwrap_or_else(|e| e.into_inner());
        let mut scope = |name: String, rates: Rates, budget: Option<Budget>| {
            let name: Arc<str> = name.into();
            let cell = cells.entry(name.clone()).or_default().clone();
            Arc::new(Scope { name, rates, budget, cell })
        };
        let groups = config
            .groups
            .iter()
            .map(|g| (g.limits.any() || g.budget.is_some()).then(|| scope(format!("g:{}", g.name), g.limits, g.budget)))
            .collect();
        let keys = config
            .keys
            .ids()
            .filter(|(_, g)| config.groups[*g].key_limits.any())
            .map(|(id, g)| (id, scope(format!("k:{id}"), config.groups[g].key_limits, None)))
            .collect();
        let connections = config
            .connections
            .iter()
            .map(|c| c.limits.any().then(|| scope(format!("c:{}", c.name), c.limits, None)))
            .collect();
        Bound { groups, keys, connections }
    }

    /// Admits a client request of `caller` against its group's and key's limits.
    pub async fn admit(&self, bound: &Bound, caller: Caller, ask: Ask) -> Result<(Option<Admission>, Quota), Denied> {
        let group = bound.groups.get(caller.group).cloned().flatten();
        let key = caller.key.and_then(|k| bound.keys.get(&k).cloned());
        let scopes: Vec<Arc<Scope>> = group.into_iter().chain(key).collect();
        self.inner.admit(scopes, ask).await
    }

    /// Admits one upstream attempt against connection `id`'s quota.
    pub async fn admit_connection(&self, bound: &Bound, id: usize, ask: Ask) -> Result<Option<Admission>, Denied> {
        let Some(scope) = bound.connections.get(id).cloned().flatten() else { return Ok(None) };
        self.inner.admit(vec![scope], ask).await.map(|(a, _)| a)
    }

    /// At shutdown: writes the memory backend's spend, or waits (up to `within`) for the
    /// settlements still on their way to Redis.
    pub async fn flush(&self, within: Duration) {
        match &self.inner.redis {
            Some(store) => store.flush(within).await,
            None => self.inner.save(),
        }
    }

    /// Starts the background work: saving spend every second (memory, with a state file), or
    /// renewing leases (Redis). Needs a tokio runtime.
    pub fn start(&self) {
        let inner = Arc::downgrade(&self.inner);
        match &self.inner.settings.backend {
            Backend::Memory { state_file: Some(_) } => {
                tokio::spawn(async move {
                    let mut every = tokio::time::interval(Duration::from_secs(1));
                    loop {
                        every.tick().await;
                        let Some(inner) = inner.upgrade() else { return };
                        if inner.dirty.load(Ordering::Relaxed) {
                            tokio::task::spawn_blocking(move || inner.save());
                        }
                    }
                });
            }
            Backend::Memory { state_file: None } => {}
            Backend::Redis { .. } => redis::renew_leases(inner),
        }
    }
}

/// Nanoseconds on the process's monotonic clock.
fn clock() -> f64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_nanos() as f64
}

/// One GCRA check: `tat` (ns) the theoretical arrival time, `limit` per minute, `cost` units.
/// Ok: the new TAT; Err: how long until it would fit.
fn gcra(tat: f64, now: f64, limit: u64, cost: u64) -> Result<f64, f64> {
    let new = tat.max(now) + cost as f64 * WINDOW / limit as f64;
    if new - now <= WINDOW * (1.0 + SLACK) {
        Ok(new)
    } else {
        Err(new - now - WINDOW)
    }
}

/// The header view of a TAT `ahead` ns in the future.
fn window(limit: u64, ahead: f64) -> Window {
    let ahead = ahead.max(0.0);
    let per = WINDOW / limit as f64;
    let remaining = ((WINDOW * (1.0 + SLACK) - ahead) / per).floor().max(0.0) as u64;
    Window { limit, remaining: remaining.min(limit), reset: Duration::from_nanos(ahead as u64) }
}

/// The budget period `now` falls in, and when it ends (none for `total`).
pub fn period(p: Period, now: SystemTime) -> (i64, Option<Duration>) {
    let d = now.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let day = (d.as_secs() / 86_400) as i64;
    let left = |end_day: i64| Some(Duration::from_secs((end_day * 86_400) as u64).saturating_sub(d));
    match p {
        Period::Total => (0, None),
        Period::Day => (day, left(day + 1)),
        // 1970-01-01 was a Thursday: weeks from Monday.
        Period::Week => {
            let week = (day + 3).div_euclid(7);
            (week, left(week * 7 + 4))
        }
        Period::Month => {
            let (y, m, _) = crate::log::civil(day);
            let next = if m == 12 { crate::log::days(y + 1, 1, 1) } else { crate::log::days(y, m + 1, 1) };
            (y * 12 + m - 1, left(next))
        }
    }
}

/// The reservation cannot fit the limit however long it waits.
fn never(scope: &Scope, ask: Ask) -> Option<String> {
    let who = describe(&scope.name);
    if let Some(tpm) = scope.rates.tpm.filter(|&t| ask.tokens > t) {
        return Some(format!(
            "This request may use up to {} tokens (max_tokens plus the prompt), more than the {tpm} tokens per minute of {who}; lower `max_tokens`.",
            ask.tokens
        ));
    }
    if let Some(b) = scope.budget.filter(|b| ask.cost > b.usd) {
        return Some(format!(
            "This request may cost up to ${:.4}, more than the ${} budget of {who}; lower `max_tokens`.",
            ask.cost, b.usd
        ));
    }
    None
}

impl Inner {
    async fn admit(self: &Arc<Self>, scopes: Vec<Arc<Scope>>, ask: Ask) -> Result<(Option<Admission>, Quota), Denied> {
        if scopes.is_empty() {
            return Ok((None, Quota::default()));
        }
        if let Some(m) = scopes.iter().find_map(|s| never(s, ask)) {
            return Err(Denied::Never(m));
        }
        // The wall clock only matters to budgets (their calendar periods).
        let budget = scopes.iter().find_map(|s| s.budget);
        let now = if budget.is_some() { SystemTime::now() } else { SystemTime::UNIX_EPOCH };
        let period = budget.map_or(0, |b| period(b.period, now).0);
        let (quota, lease) = match &self.settings.backend {
            Backend::Memory { .. } => (self.admit_local(&scopes, ask, now)?, None),
            Backend::Redis { timeout, .. } => {
                let lease = scopes
                    .iter()
                    .any(|s| s.rates.max_concurrent.is_some())
                    .then(|| self.next_lease.fetch_add(1, Ordering::Relaxed));
                match tokio::time::timeout(*timeout, self.redis().admit(&scopes, ask, lease, now)).await {
                    Ok(Ok(r)) => (r?, lease),
                    failed => {
                        let why = match failed {
                            Ok(Err(e)) => format!("{:?}", e.kind()),
                            _ => "timed out".to_owned(),
                        };
                        self.backend_failed(why);
                        match self.settings.on_backend_error {
                            OnBackendError::Deny => return Err(Denied::Backend),
                            // Admitted unchecked: nothing to settle.
                            OnBackendError::Allow => return Ok((None, Quota::default())),
                        }
                    }
                }
            }
        };
        let admission = Admission { limits: self.clone(), scopes, ask, period, lease, settled: false };
        if let Some(id) = lease {
            self.redis().hold(id, &admission.scopes);
        }
        Ok((Some(admission), quota))
    }

    /// Logs a failed round trip to the store, at most once a second.
    fn backend_failed(&self, why: String) {
        static LAST: AtomicU64 = AtomicU64::new(0);
        let now = clock() as u64;
        let last = LAST.load(Ordering::Relaxed);
        if (last == 0 || now.saturating_sub(last) >= 1_000_000_000)
            && LAST.compare_exchange(last, now.max(1), Ordering::Relaxed, Ordering::Relaxed).is_ok()
        {
            tracing::warn!(error = %why, policy = ?self.settings.on_backend_error, "limits: Redis did not answer");
        }
    }

    fn redis(&self) -> &redis::Store {
        self.redis.as_ref().expect("the redis backend has a store")
    }

    /// The memory backend: every scope's mutex, in order (group before key), checked, then
    /// committed together.
    fn admit_local(&self, scopes: &[Arc<Scope>], ask: Ask, wall: SystemTime) -> Result<Quota, Denied> {
        let now = clock();
        // At most a group and a key: the locks and the new states live on the stack.
        debug_assert!(scopes.len() <= MAX_SCOPES);
        let mut guards: [Option<std::sync::MutexGuard<'_, State>>; MAX_SCOPES] = [None, None];
        for (g, s) in guards.iter_mut().zip(scopes) {
            *g = Some(s.cell.state.lock().unwrap_or_else(|e| e.into_inner()));
        }
        let mut next = [State::default(); MAX_SCOPES];
        let mut quota = Quota::default();
        let mut wait: Option<(f64, usize)> = None;
        for (i, (scope, st)) in scopes.iter().zip(guards.iter().flatten()).enumerate() {
            let mut n = **st;
            let mut slow = |w: f64| {
                if wait.is_none_or(|(x, _)| w > x) {
                    wait = Some((w, i));
                }
            };
            let r = &scope.rates;
            if let Some(rpm) = r.rpm {
                match gcra(n.requests, now, rpm, 1) {
                    Ok(t) => n.requests = t,
                    Err(w) => slow(w),
                }
            }
            if let Some(tpm) = r.tpm {
                match gcra(n.tokens, now, tpm, ask.tokens) {
                    Ok(t) => n.tokens = t,
                    Err(w) => slow(w),
                }
            }
            if let Some(max) = r.max_concurrent {
                if n.in_flight >= max {
                    // No way to know when one ends: a second is the shortest honest answer.
                    slow(1e9);
                }
                n.in_flight += 1;
            }
            if let Some(b) = scope.budget {
                let (p, ends) = period(b.period, wall);
                if n.period != p {
                    n.period = p;
                    n.spent = 0.0;
                }
                if n.spent + ask.cost > b.usd {
                    return Err(Denied::Budget { scope: scope.name.clone(), wait: ends });
                }
                n.spent += ask.cost;
            }
            quota = quota.merge(Quota {
                requests: r.rpm.map(|l| window(l, n.requests - now)),
                tokens: r.tpm.map(|l| window(l, n.tokens - now)),
            });
            next[i] = n;
        }
        if let Some((w, i)) = wait {
            let s = &scopes[i];
            let Some(st) = guards[i].as_deref() else { unreachable!("scope {i} is locked") };
            let quota = Quota {
                requests: s.rates.rpm.map(|l| window(l, st.requests - now)),
                tokens: s.rates.tpm.map(|l| window(l, st.tokens - now)),
            };
            return Err(Denied::Limited { scope: s.name.clone(), wait: Duration::from_nanos(w as u64), quota });
        }
        for (g, n) in guards.iter_mut().flatten().zip(next) {
            **g = n;
        }
        if scopes.iter().any(|s| s.budget.is_some()) {
            self.dirty.store(true, Ordering::Relaxed);
        }
        Ok(quota)
    }

    /// Gives back what a request did not use (or charges what it used beyond its reservation),
    /// and its concurrency slot.
    fn settle(
        self: &Arc<Self>,
        scopes: &[Arc<Scope>],
        ask: Ask,
        tokens: u64,
        cost: f64,
        period: i64,
        lease: Option<u64>,
    ) {
        match &self.settings.backend {
            Backend::Memory { .. } => {
                for s in scopes {
                    let mut st = s.cell.state.lock().unwrap_or_else(|e| e.into_inner());
                    if let Some(tpm) = s.rates.tpm {
                        st.tokens += (tokens as f64 - ask.tokens as f64) * WINDOW / tpm as f64;
                    }
                    if s.rates.max_concurrent.is_some() {
                        st.in_flight = st.in_flight.saturating_sub(1);
                    }
                    if s.budget.is_some() && st.period == period && cost != ask.cost {
                        st.spent = (st.spent + cost - ask.cost).max(0.0);
                        self.dirty.store(true, Ordering::Relaxed);
                    }
                }
            }
            Backend::Redis { .. } => {
                if let Some(id) = lease {
                    self.redis().release(id);
                }
                self.redis().settle(scopes, ask, tokens, cost, period, lease);
            }
        }
    }

    /// Writes spend to the state file (temporary file, then rename: never half a file).
    fn save(&self) {
        let Backend::Memory { state_file: Some(path) } = &self.settings.backend else { return };
        self.dirty.store(false, Ordering::Relaxed);
        let mut spend = serde_json::Map::new();
        for (name, cell) in self.cells.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let st = *cell.state.lock().unwrap_or_else(|e| e.into_inner());
            if st.spent > 0.0 {
                spend.insert(name.to_string(), serde_json::json!({"period": st.period, "spent_usd": st.spent}));
            }
        }
        let text = serde_json::json!({"version": 1, "spend": spend}).to_string();
        let tmp = tmp_path(path);
        let result = std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, path));
        if let Err(e) = result {
            self.dirty.store(true, Ordering::Relaxed);
            tracing::warn!(path = %path.display(), error = %e, "cannot save limits state");
        }
    }

    /// Reads spend saved by an earlier run; a missing file is a first start.
    fn load(&self, path: &PathBuf, config: &Config) -> Result<(), String> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(format!("limits.state_file: cannot read {}: {e}", path.display())),
        };
        let bad = |why: &str| format!("limits.state_file: {} is not a state file of lmgate ({why})", path.display());
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(&e.to_string()))?;
        let spend = v.get("spend").and_then(|s| s.as_object()).ok_or_else(|| bad("no `spend`"))?;
        let mut cells = self.cells.lock().unwrap_or_else(|e| e.into_inner());
        let now = SystemTime::now();
        for (name, entry) in spend {
            let (Some(p), Some(spent)) = (entry["period"].as_i64(), entry["spent_usd"].as_f64()) else {
                return Err(bad(&format!("bad entry `{name}`")));
            };
            // Spend of a period that has ended is not carried over.
            let group = name.strip_prefix("g:").and_then(|g| config.groups.iter().find(|x| x.name == g));
            if group.and_then(|g| g.budget).is_some_and(|b| period(b.period, now).0 == p) {
                let cell = cells.entry(name.as_str().into()).or_default();
                let mut st = cell.state.lock().unwrap_or_else(|e| e.into_inner());
                st.period = p;
                st.spent = spent;
            }
        }
        Ok(())
    }
}

fn tmp_path(path: &std::path::Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_owned();
    name.push(".tmp");
    path.with_file_name(name)
}

/// OpenAI's duration format for `x-ratelimit-reset-*`: `20ms`, `1.5s`, `6m0s`, `1h2m3s`.
pub fn reset_text(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let secs = d.as_secs_f64();
    if secs < 60.0 {
        let s = format!("{:.3}", (secs * 1000.0).ceil() / 1000.0);
        return format!("{}s", s.trim_end_matches('0').trim_end_matches('.'));
    }
    let whole = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    let (h, m, s) = (whole / 3600, whole % 3600 / 60, whole % 60);
    if h > 0 {
        format!("{h}h{m}m{s}s")
    } else {
        format!("{m}m{s}s")
    }
}

/// Sets OpenAI's rate-limit headers from `quota`, replacing any the upstream sent (they describe
/// the operator's account, not the caller's).
pub fn set_headers(headers: &mut http::HeaderMap, quota: &Quota) {
    const NAMES: [[&str; 3]; 2] = [
        ["x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests"],
        ["x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens"],
    ];
    for (names, w) in NAMES.iter().zip([quota.requests, quota.tokens]) {
        let [limit, remaining, reset] = names.map(http::HeaderName::from_static);
        let Some(w) = w else {
            for n in [limit, remaining, reset] {
                headers.remove(n);
            }
            continue;
        };
        headers.insert(limit, http::HeaderValue::from(w.limit));
        headers.insert(remaining, http::HeaderValue::from(w.remaining));
        headers.insert(reset, http::HeaderValue::try_from(reset_text(w.reset)).expect("digits and units"));
    }
}

#[cfg(test)]
mod tests;
