//! Prometheus metrics, in the OpenMetrics text format that the `prometheus-client` crate writes.
//!
//! Every label value comes from the configuration (route pattern, connection and group names) or
//! from a small closed set (endpoint, status code, outcome): never from what a client sent, so a
//! client that sends a million model names adds no series.
//!
//! The hot path takes no lock and looks up no string. A [`Handles`] is built with each
//! [`crate::snapshot::Snapshot`]: per route, a table indexed by endpoint, connection and group
//! whose cells are resolved once, on first use, and after that a request is a handful of relaxed
//! atomic additions. The cells themselves live in [`Metrics`], keyed by label values, which
//! outlives snapshots: a reload that keeps a name keeps its counters (Prometheus must never see
//! a counter go back), and a scrape reads them there.

use crate::config::observe::Price;
use crate::config::Config;
use crate::json::Usage;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

/// The `Content-Type` of a scrape.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Endpoint label values; [`crate::record::Record::endpoint`] is one of them.
pub const ENDPOINTS: [&str; 7] = ["chat", "completions", "embeddings", "models", "health", "metrics", "unknown"];

/// Status codes counted under their own value; any other is counted under its class (`4xx`).
const CODES: [u16; 18] = [200, 400, 401, 403, 404, 405, 408, 409, 413, 415, 422, 429, 431, 500, 502, 503, 504, 529];
const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];
const CODE_SLOTS: usize = CODES.len() + CLASSES.len();

/// How one upstream attempt went (`lmgate_upstream_attempts_total{outcome}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempt {
    /// A success status.
    Ok,
    /// A 4xx from the upstream.
    Status4xx,
    /// A 5xx (or other non-success status) from the upstream.
    Status5xx,
    /// No connection could be made.
    ConnectError,
    /// No response head, or no first bytes, in time.
    Timeout,
    /// Anything else: the upstream closed early, or answered something malformed.
    Error,
}

const ATTEMPTS: [&str; 6] = ["ok", "4xx", "5xx", "connect_error", "timeout", "error"];

/// How a stream ended (`lmgate_stream_outcomes_total{outcome}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// The whole stream went out.
    Complete,
    /// The client went away first.
    ClientGone,
    /// The upstream failed mid-stream.
    UpstreamError,
    /// The upstream sent nothing for its idle timeout.
    IdleTimeout,
    /// The client took nothing for `send_timeout_secs`.
    ClientStalled,
}

const STREAMS: [&str; 5] = ["complete", "client_gone", "upstream_error", "idle_timeout", "client_stalled"];

/// Bucket bounds in seconds.
const DURATION_BOUNDS: &[f64] = &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0];
const TTFT_BOUNDS: &[f64] = &[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
const OVERHEAD_BOUNDS: &[f64] =
    &[0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.1, 1.0];

/// A histogram: one atomic per bucket (not cumulative: one increment per observation), the sum
/// in nanoseconds.
pub struct Histogram {
    bounds: &'static [f64],
    counts: Box<[AtomicU64]>,
    sum_ns: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram { bounds, counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(), sum_ns: AtomicU64::new(0) }
    }

    /// Counts one observation.
    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        let i = self.bounds.iter().position(|&b| s <= b).unwrap_or(self.bounds.len());
        self.counts[i].fetch_add(1, Relaxed);
        self.sum_ns.fetch_add(d.as_nanos().min(u64::MAX as u128) as u64, Relaxed);
    }

    /// Adds this histogram's buckets (per bucket: the encoder makes them cumulative), count and
    /// sum into `into`.
    fn add_to(&self, into: &mut Summed) {
        if into.buckets.is_empty() {
            into.buckets = self.bounds.iter().map(|&b| (b, 0)).chain([(f64::INFINITY, 0)]).collect();
        }
        for (i, c) in self.counts.iter().enumerate() {
            let n = c.load(Relaxed);
            into.buckets[i].1 += n;
            into.count += n;
        }
        into.sum += self.sum_ns.load(Relaxed) as f64 / 1e9;
    }
}

#[derive(Default)]
struct Summed {
    sum: f64,
    count: u64,
    buckets: Vec<(f64, u64)>,
}

/// Counters of one (endpoint, route, connection, group).
pub struct Counts {
    codes: [AtomicU64; CODE_SLOTS],
    prompt: AtomicU64,
    completion: AtomicU64,
    cached: AtomicU64,
    /// Spend in nano-USD (an integer, so it adds without a lock).
    cost_nano: AtomicU64,
    /// Requests with usage but no price for it.
    unpriced: AtomicU64,
}

impl Counts {
    fn new() -> Self {
        let z = || AtomicU64::new(0);
        Counts {
            codes: std::array::from_fn(|_| z()),
            prompt: z(),
            completion: z(),
            cached: z(),
            cost_nano: z(),
            unpriced: z(),
        }
    }

    /// Counts a finished request: its status, tokens and cost (`None` with usage: unpriced).
    pub fn add(&self, status: u16, usage: Option<&Usage>, cost: Option<f64>) {
        self.codes[code_slot(status)].fetch_add(1, Relaxed);
        if let Some(u) = usage {
            self.prompt.fetch_add(u.prompt, Relaxed);
            self.completion.fetch_add(u.completion, Relaxed);
            self.cached.fetch_add(u.cached, Relaxed);
            match cost {
                Some(c) => {
                    self.cost_nano.fetch_add((c * 1e9).round() as u64, Relaxed);
                }
                None => {
                    self.unpriced.fetch_add(1, Relaxed);
                }
            }
        }
    }
}

fn code_slot(status: u16) -> usize {
    match CODES.iter().position(|&c| c == status) {
        Some(i) => i,
        None => CODES.len() + (usize::from(status / 100).clamp(1, 5) - 1),
    }
}

fn code_label(slot: usize) -> std::borrow::Cow<'static, str> {
    match CODES.get(slot) {
        Some(c) => c.to_string().into(),
        None => CLASSES[slot - CODES.len()].into(),
    }
}

/// Latency histograms of one (endpoint, route).
pub struct Latency {
    /// Whole request, arrival to the last byte (or the client leaving).
    pub duration: Histogram,
    /// Streams: arrival to the first body bytes sent.
    pub ttft: Histogram,
    /// The time the gateway itself added.
    pub overhead: Histogram,
}

/// One connection's upstream state.
pub struct Upstream {
    attempts: [AtomicU64; ATTEMPTS.len()],
    in_flight: AtomicI64,
}

impl Upstream {
    /// Counts an attempt's outcome.
    pub fn attempted(&self, outcome: Attempt) {
        self.attempts[outcome as usize].fetch_add(1, Relaxed);
    }

    /// A request now in flight to this connection, until the guard is dropped.
    pub fn start(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Relaxed);
        InFlight(self.clone())
    }
}

/// An upstream request in flight (`lmgate_upstream_in_flight`): until its response is done.
pub struct InFlight(Arc<Upstream>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Relaxed);
    }
}

type RequestKey = (u8, Arc<str>, Arc<str>, Arc<str>);

#[derive(Default)]
struct Series {
    requests: BTreeMap<RequestKey, Arc<Counts>>,
    latency: BTreeMap<(u8, Arc<str>), Arc<Latency>>,
    upstreams: BTreeMap<Arc<str>, Arc<Upstream>>,
    /// Interned label values, so cells of the same name share one allocation.
    names: std::collections::BTreeSet<Arc<str>>,
}

impl Series {
    fn name(&mut self, s: &str) -> Arc<str> {
        if let Some(k) = self.names.get(s) {
            return k.clone();
        }
        let k: Arc<str> = s.into();
        self.names.insert(k.clone());
        k
    }
}

/// The gateway's metrics: every cell ever touched, by label values; outlives snapshots.
#[derive(Default)]
pub struct Metrics {
    series: Mutex<Series>,
    streams: [AtomicU64; STREAMS.len()],
    /// Request-log records dropped because the writer's queue was full.
    pub log_dropped: AtomicU64,
    /// Request-log records that could not be written (disk errors).
    pub log_failed: AtomicU64,
    reloads: [AtomicU64; 2],
}

impl Metrics {
    /// Counts a stream's end.
    pub fn stream(&self, outcome: Stream) {
        self.streams[outcome as usize].fetch_add(1, Relaxed);
    }

    /// Counts a configuration reload.
    pub fn reloaded(&self, ok: bool) {
        self.reloads[usize::from(!ok)].fetch_add(1, Relaxed);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Series> {
        self.series.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The scrape: every metric in the OpenMetrics text format, `config` giving the cooldown
    /// state of its pooled targets.
    pub fn render(self: &Arc<Self>, config: Arc<Config>) -> String {
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register_collector(Box::new(Scrape { metrics: self.clone(), config }));
        let mut out = String::with_capacity(16 << 10);
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    }
}

/// Cells resolved on first use.
type Cells<T> = Box<[OnceLock<Arc<T>>]>;

/// A snapshot's handles into [`Metrics`]: index arithmetic, then an atomic add.
pub struct Handles {
    metrics: Arc<Metrics>,
    routes: Box<[Arc<str>]>,
    connections: Box<[Arc<str>]>,
    groups: Box<[Arc<str>]>,
    /// Per route (the last slot: no route), cells by (endpoint, connection + 1, group + 1).
    requests: Box<[OnceLock<Cells<Counts>>]>,
    /// By (route + 1 or 0, endpoint).
    latency: Cells<Latency>,
    upstreams: Box<[Arc<Upstream>]>,
    /// The price of each target with a fixed upstream model, by route and target.
    prices: Box<[Box<[Option<Price>]>]>,
}

impl Handles {
    /// Handles for `config`'s names.
    pub fn new(metrics: Arc<Metrics>, config: &Config) -> Self {
        let (routes, connections, groups, upstreams) = {
            let mut s = metrics.lock();
            let routes: Box<[Arc<str>]> = config.router.routes().iter().map(|r| s.name(r.pattern.as_str())).collect();
            let connections: Box<[Arc<str>]> = config.connections.iter().map(|c| s.name(&c.name)).collect();
            let groups: Box<[Arc<str>]> = config.groups.iter().map(|g| s.name(&g.name)).collect();
            let upstreams = connections
                .iter()
                .map(|c| {
                    let fresh = || Arc::new(Upstream { attempts: Default::default(), in_flight: AtomicI64::new(0) });
                    s.upstreams.entry(c.clone()).or_insert_with(fresh).clone()
                })
                .collect();
            (routes, connections, groups, upstreams)
        };
        let prices = config
            .router
            .routes()
            .iter()
            .map(|r| {
                let price =
                    |t: &crate::router::Target| config.prices.find(t.connection, &t.model.as_ref()?.name).copied();
                r.targets.iter().map(price).collect()
            })
            .collect();
        Handles {
            prices,
            requests: (0..=routes.len()).map(|_| OnceLock::new()).collect(),
            latency: (0..(routes.len() + 1) * ENDPOINTS.len()).map(|_| OnceLock::new()).collect(),
            metrics,
            routes,
            connections,
            groups,
            upstreams,
        }
    }

    /// The metrics these handles write to.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The counters of (endpoint, route, connection, group); `None`: no such label (empty).
    pub fn counts(&self, endpoint: usize, route: Option<usize>, conn: Option<usize>, group: Option<usize>) -> &Counts {
        let (nc, ng) = (self.connections.len() + 1, self.groups.len() + 1);
        let r = route.filter(|&r| r < self.routes.len()).unwrap_or(self.routes.len());
        let c = conn.filter(|&c| c < self.connections.len()).map_or(0, |c| c + 1);
        let g = group.filter(|&g| g < self.groups.len()).map_or(0, |g| g + 1);
        let table = self.requests[r].get_or_init(|| (0..ENDPOINTS.len() * nc * ng).map(|_| OnceLock::new()).collect());
        let e = endpoint.min(ENDPOINTS.len() - 1);
        table[(e * nc + c) * ng + g].get_or_init(|| {
            let label = |names: &[Arc<str>], i: usize| if i == 0 { None } else { Some(names[i - 1].clone()) };
            let mut s = self.metrics.lock();
            let empty = s.name("");
            let key = (
                e as u8,
                self.routes.get(r).cloned().unwrap_or_else(|| empty.clone()),
                label(&self.connections, c).unwrap_or_else(|| empty.clone()),
                label(&self.groups, g).unwrap_or(empty),
            );
            s.requests.entry(key).or_insert_with(|| Arc::new(Counts::new())).clone()
        })
    }

    /// The latency histograms of (endpoint, route).
    pub fn latency(&self, endpoint: usize, route: Option<usize>) -> &Latency {
        let r = route.filter(|&r| r < self.routes.len()).map_or(0, |r| r + 1);
        let e = endpoint.min(ENDPOINTS.len() - 1);
        self.latency[r * ENDPOINTS.len() + e].get_or_init(|| {
            let mut s = self.metrics.lock();
            let route = if r == 0 { s.name("") } else { self.routes[r - 1].clone() };
            let fresh = || {
                Arc::new(Latency {
                    duration: Histogram::new(DURATION_BOUNDS),
                    ttft: Histogram::new(TTFT_BOUNDS),
                    overhead: Histogram::new(OVERHEAD_BOUNDS),
                })
            };
            s.latency.entry((e as u8, route)).or_insert_with(fresh).clone()
        })
    }

    /// The price of `model` served by target `t` of route `r`: resolved at load for a target
    /// naming its model, looked up for one passing the requested name through.
    pub fn price(&self, config: &Config, r: usize, t: usize, model: &str) -> Option<Price> {
        let target = config.router.routes().get(r)?.targets.get(t)?;
        match target.model {
            Some(_) => *self.prices.get(r)?.get(t)?,
            None => config.prices.find(target.connection, model).copied(),
        }
    }

    /// Route `r`'s pattern.
    pub fn route_name(&self, r: usize) -> Option<Arc<str>> {
        self.routes.get(r).cloned()
    }

    /// Connection `c`'s name.
    pub fn connection_name(&self, c: usize) -> Option<Arc<str>> {
        self.connections.get(c).cloned()
    }

    /// Group `g`'s name.
    pub fn group_name(&self, g: usize) -> Option<Arc<str>> {
        self.groups.get(g).cloned()
    }

    /// Connection `id`'s upstream state.
    pub fn upstream(&self, id: usize) -> Option<&Arc<Upstream>> {
        self.upstreams.get(id)
    }
}

/// The index of an endpoint name in [`ENDPOINTS`] (`unknown` for any other).
pub fn endpoint_index(name: &str) -> usize {
    ENDPOINTS.iter().position(|&e| e == name).unwrap_or(ENDPOINTS.len() - 1)
}

// ---------------------------------------------------------------------------------------------
// The scrape.

struct Scrape {
    metrics: Arc<Metrics>,
    config: Arc<Config>,
}

impl std::fmt::Debug for Scrape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Scrape")
    }
}

/// One family: its samples by label set.
fn family<M: EncodeMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    samples: impl IntoIterator<Item = (Vec<(&'static str, String)>, M)>,
) -> std::fmt::Result {
    let mut metric = encoder.encode_descriptor(name, help, None, kind)?;
    for (labels, m) in samples {
        m.encode(metric.encode_family(&labels)?)?;
    }
    Ok(())
}

fn histograms(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: BTreeMap<Vec<(&'static str, String)>, Summed>,
) -> std::fmt::Result {
    let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Histogram)?;
    for (labels, h) in samples {
        metric
            .encode_family(&labels)?
            .encode_histogram::<prometheus_client::encoding::NoLabelSet>(h.sum, h.count, &h.buckets, None)?;
    }
    Ok(())
}

impl Collector for Scrape {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let s = self.metrics.lock();
        let endpoint = |e: u8| ENDPOINTS[usize::from(e)].to_owned();
        let v = |a: &Arc<str>| a.to_string();

        let mut requests = Vec::new();
        let mut tokens: BTreeMap<Vec<(&'static str, String)>, u64> = BTreeMap::new();
        let mut cost: BTreeMap<Vec<(&'static str, String)>, u64> = BTreeMap::new();
        let mut unpriced: BTreeMap<Vec<(&'static str, String)>, u64> = BTreeMap::new();
        for ((e, route, conn, group), c) in &s.requests {
            for (slot, n) in c.codes.iter().enumerate() {
                let n = n.load(Relaxed);
                if n > 0 {
                    let labels = vec![
                        ("endpoint", endpoint(*e)),
                        ("route", v(route)),
                        ("connection", v(conn)),
                        ("group", v(group)),
                        ("code", code_label(slot).into_owned()),
                    ];
                    requests.push((labels, ConstCounter::new(n)));
                }
            }
            for (kind, n) in [("prompt", &c.prompt), ("completion", &c.completion), ("cached", &c.cached)] {
                let n = n.load(Relaxed);
                if n > 0 {
                    let labels =
                        vec![("route", v(route)), ("connection", v(conn)), ("group", v(group)), ("kind", kind.into())];
                    *tokens.entry(labels).or_default() += n;
                }
            }
            let nano = c.cost_nano.load(Relaxed);
            if nano > 0 {
                *cost.entry(vec![("route", v(route)), ("group", v(group))]).or_default() += nano;
            }
            let n = c.unpriced.load(Relaxed);
            if n > 0 {
                *unpriced.entry(vec![("route", v(route)), ("connection", v(conn))]).or_default() += n;
            }
        }
        family(&mut enc, "lmgate_requests", "Requests answered, by status code.", MetricType::Counter, requests)?;
        family(
            &mut enc,
            "lmgate_tokens",
            "Tokens reported by upstreams: prompt (cached included), completion, and the cached part of prompt.",
            MetricType::Counter,
            tokens.into_iter().map(|(l, n)| (l, ConstCounter::new(n))),
        )?;
        family(
            &mut enc,
            "lmgate_cost_usd",
            "Spend in USD from [prices] and the reported usage.",
            MetricType::Counter,
            cost.into_iter().map(|(l, n)| (l, ConstCounter::new(n as f64 / 1e9))),
        )?;
        family(
            &mut enc,
            "lmgate_unpriced_requests",
            "Requests with usage whose model has no (complete) price in [prices]: no cost counted.",
            MetricType::Counter,
            unpriced.into_iter().map(|(l, n)| (l, ConstCounter::new(n))),
        )?;

        let mut duration = BTreeMap::new();
        let mut ttft = BTreeMap::new();
        let mut overhead = BTreeMap::new();
        for ((e, route), l) in &s.latency {
            l.duration.add_to(duration.entry(vec![("endpoint", endpoint(*e)), ("route", v(route))]).or_default());
            if l.ttft.counts.iter().any(|c| c.load(Relaxed) > 0) {
                l.ttft.add_to(ttft.entry(vec![("route", v(route))]).or_default());
            }
            l.overhead.add_to(overhead.entry(vec![("endpoint", endpoint(*e))]).or_default());
        }
        histograms(&mut enc, "lmgate_request_duration_seconds", "Request time, arrival to last byte.", duration)?;
        histograms(
            &mut enc,
            "lmgate_time_to_first_token_seconds",
            "Streams: arrival to the first body bytes sent to the client.",
            ttft,
        )?;
        histograms(
            &mut enc,
            "lmgate_overhead_seconds",
            "Time the gateway added: request time minus the time spent waiting on upstreams.",
            overhead,
        )?;

        let mut attempts = Vec::new();
        let mut in_flight = Vec::new();
        for (conn, u) in &s.upstreams {
            for (i, n) in u.attempts.iter().enumerate() {
                let n = n.load(Relaxed);
                if n > 0 {
                    attempts
                        .push((vec![("connection", v(conn)), ("outcome", ATTEMPTS[i].into())], ConstCounter::new(n)));
                }
            }
            in_flight.push((vec![("connection", v(conn))], ConstGauge::new(u.in_flight.load(Relaxed))));
        }
        family(&mut enc, "lmgate_upstream_attempts", "Upstream attempts, by outcome.", MetricType::Counter, attempts)?;
        family(&mut enc, "lmgate_upstream_in_flight", "Upstream requests not yet done.", MetricType::Gauge, in_flight)?;
        drop(s);

        let now = crate::pool::now_ms();
        let mut seen = std::collections::BTreeSet::new();
        let cooling = self.config.router.routes().iter().filter(|r| r.pool.is_some()).flat_map(|r| &r.targets);
        let cooling = cooling
            .filter(|t| seen.insert(t.label.clone()))
            .map(|t| (vec![("target", t.label.to_string())], ConstGauge::new(i64::from(t.health.cooling(now)))))
            .collect::<Vec<_>>();
        family(
            &mut enc,
            "lmgate_target_cooling_down",
            "Pooled targets: 1 while cooling down (taken out after failures), else 0.",
            MetricType::Gauge,
            cooling,
        )?;

        let streams = STREAMS
            .iter()
            .zip(&self.metrics.streams)
            .map(|(o, n)| (vec![("outcome", (*o).to_owned())], ConstCounter::new(n.load(Relaxed))));
        family(&mut enc, "lmgate_stream_outcomes", "Streams, by how they ended.", MetricType::Counter, streams)?;
        let log = [("dropped", &self.metrics.log_dropped), ("failed", &self.metrics.log_failed)];
        family(
            &mut enc,
            "lmgate_log_records_lost",
            "Request-log records not written: dropped (queue full) or failed (write error).",
            MetricType::Counter,
            log.iter().map(|(why, n)| (vec![("reason", (*why).to_owned())], ConstCounter::new(n.load(Relaxed)))),
        )?;
        let reloads = ["ok", "failed"]
            .iter()
            .zip(&self.metrics.reloads)
            .map(|(r, n)| (vec![("result", (*r).to_owned())], ConstCounter::new(n.load(Relaxed))));
        family(&mut enc, "lmgate_config_reloads", "Configuration reloads, by result.", MetricType::Counter, reloads)?;
        process(&mut enc)
    }
}

/// Process metrics under their conventional names, from `/proc` (Linux; elsewhere none).
fn process(enc: &mut DescriptorEncoder) -> std::fmt::Result {
    let Some(p) = ProcessStats::read() else { return Ok(()) };
    let mut one = |name: &str, help: &str, kind: MetricType, value: f64| -> std::fmt::Result {
        let mut metric = enc.encode_descriptor(name, help, None, kind)?;
        match kind {
            MetricType::Counter => ConstCounter::new(value).encode(metric.encode_family(&Vec::<(&str, &str)>::new())?),
            _ => ConstGauge::new(value).encode(metric.encode_family(&Vec::<(&str, &str)>::new())?),
        }
    };
    one("process_cpu_seconds", "User and system CPU time spent, in seconds.", MetricType::Counter, p.cpu_seconds)?;
    one("process_resident_memory_bytes", "Resident memory size in bytes.", MetricType::Gauge, p.resident_bytes)?;
    one("process_open_fds", "Number of open file descriptors.", MetricType::Gauge, p.open_fds)?;
    if let Some(max) = p.max_fds {
        one("process_max_fds", "Maximum number of open file descriptors.", MetricType::Gauge, max)?;
    }
    one(
        "process_start_time_seconds",
        "Start time of the process since the Unix epoch, in seconds.",
        MetricType::Gauge,
        p.start_time,
    )
}

/// What `/proc` says about this process.
#[derive(Debug)]
pub struct ProcessStats {
    /// `utime + stime`.
    pub cpu_seconds: f64,
    /// `VmRSS`.
    pub resident_bytes: f64,
    /// Entries of `/proc/self/fd`.
    pub open_fds: f64,
    /// The soft `Max open files` limit.
    pub max_fds: Option<f64>,
    /// Boot time + `starttime`.
    pub start_time: f64,
}

/// Clock ticks per second of `/proc/self/stat` times (`USER_HZ`, 100 on every Linux ABI).
const USER_HZ: f64 = 100.0;

impl ProcessStats {
    /// Reads `/proc/self`; `None` where there is no procfs.
    pub fn read() -> Option<Self> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        // The command name is in parentheses and may hold spaces: fields count from after it.
        let fields: Vec<&str> = stat.get(stat.rfind(')')? + 2..)?.split(' ').collect();
        let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<f64>().ok());
        let cpu_seconds = (field(14)? + field(15)?) / USER_HZ;
        let boot = std::fs::read_to_string("/proc/stat").ok()?;
        let btime: f64 = boot.lines().find_map(|l| l.strip_prefix("btime "))?.trim().parse().ok()?;
        let start_time = btime + field(22)? / USER_HZ;
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let rss_kb: f64 =
            status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?.trim().trim_end_matches("kB").trim().parse().ok()?;
        let open_fds = std::fs::read_dir("/proc/self/fd").ok()?.count() as f64;
        let limits = std::fs::read_to_string("/proc/self/limits").ok();
        let max_fds = limits.as_deref().and_then(|l| {
            let line = l.lines().find(|l| l.starts_with("Max open files"))?;
            line.split_whitespace().nth(3)?.parse().ok()
        });
        Some(ProcessStats { cpu_seconds, resident_bytes: rss_kb * 1024.0, open_fds, max_fds, start_time })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_outside_the_list_count_under_their_class() {
        assert_eq!(code_label(code_slot(200)), "200");
        assert_eq!(code_label(code_slot(529)), "529");
        assert_eq!(code_label(code_slot(418)), "4xx");
        assert_eq!(code_label(code_slot(599)), "5xx");
        assert_eq!(code_label(code_slot(204)), "2xx");
        assert_eq!(code_label(code_slot(0)), "1xx");
        assert_eq!(code_label(code_slot(999)), "5xx");
    }

    #[test]
    fn a_histogram_counts_each_observation_in_one_bucket_with_the_sum_in_seconds() {
        let h = Histogram::new(&[0.001, 0.01]);
        h.observe(Duration::from_micros(500));
        h.observe(Duration::from_millis(5));
        h.observe(Duration::from_millis(5));
        h.observe(Duration::from_secs(2));
        let mut s = Summed::default();
        h.add_to(&mut s);
        assert_eq!(s.count, 4);
        assert_eq!(s.buckets, vec![(0.001, 1), (0.01, 2), (f64::INFINITY, 1)]);
        assert!((s.sum - 2.0105).abs() < 1e-9, "{}", s.sum);
    }

    #[test]
    fn process_stats_are_read_from_proc() {
        let p = ProcessStats::read().expect("procfs");
        assert!(p.resident_bytes > 1e6 && p.open_fds >= 3.0 && p.cpu_seconds >= 0.0, "{p:?}");
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
        assert!(p.start_time <= now + 1.0 && p.start_time > now - 86_400.0 * 365.0, "{p:?}");
    }
}
