//! Load generation and per-request measurement for `lmgate bench`.
//!
//! One hyper-util legacy client over plain HTTP/1.1 (TCP_NODELAY, idle pool sized to the
//! concurrency); the request is built once and cloned per send (a `Bytes` body, shared). Two
//! load shapes:
//!
//! - closed loop ([`Shape::Closed`]): N workers, each sending its next request when the previous
//!   one finished;
//! - open loop ([`Shape::Open`]): requests scheduled at fixed intervals, latency measured from the
//!   *intended* send time, so a stall that delays later sends shows up in their latency instead of
//!   being hidden (coordinated omission). In-flight requests are capped; a scheduled request that
//!   finds the cap full is not sent and is counted as missed. The schedule is kept by a thread of
//!   its own (tokio's timer has millisecond granularity, which would count up to a millisecond
//!   of the generator's own lateness as latency): it sleeps until just before each send is
//!   due and spins the rest, then hands the send to the runtime. How late
//!   each send actually left is recorded ([`Report::lateness`]) so a run shows whether the
//!   generator kept up.
//!
//! Per request: latency to the last body byte, status, bytes; for streams the time to the first
//! body byte, the time to first token (the first SSE event whose JSON has a non-empty `choices[0].delta.content`: comments and
//! role-only chunks do not count) and the gaps between successive content events. Every run is
//! bounded in count and time; warm-up requests are sent but not recorded.

use super::report::{record, Report};
use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;
use std::borrow::Cow;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// The highest `--rate` accepted, requests per second: far above what one loopback client sends.
pub const MAX_RATE: f64 = 1_000_000.0;

/// The longest run allowed (measured phase), whatever the options say.
pub const MAX_DURATION: Duration = Duration::from_secs(3600);

/// The request kind to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    /// Non-streaming chat completion.
    Chat,
    /// Streaming chat completion (SSE).
    ChatStream,
    /// Embeddings.
    Embeddings,
}

/// The load shape.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Shape {
    /// This many workers, each sending back to back.
    Closed {
        /// Number of workers (at least 1).
        concurrency: usize,
    },
    /// This many requests per second at fixed intervals.
    Open {
        /// Requests per second (positive, finite).
        rate: f64,
        /// Requests allowed in flight at once; a send that finds them all busy is missed.
        max_in_flight: usize,
    },
}

/// Everything one load run needs.
#[derive(Debug, Clone)]
pub struct Load {
    /// Base URL, e.g. `http://127.0.0.1:4010/v1` (only `http://` is supported).
    pub url: String,
    /// What to send.
    pub kind: Kind,
    /// The `model` field.
    pub model: String,
    /// Sent as `Authorization: Bearer ...` when present.
    pub key: Option<String>,
    /// Extra request headers, as `name: value` strings.
    pub headers: Vec<String>,
    /// Embeddings: number of inputs.
    pub inputs: usize,
    /// Embeddings: `dimensions`, when set.
    pub dims: Option<usize>,
    /// Embeddings: ask for `encoding_format: base64`.
    pub base64: bool,
    /// Chat: sends `x-mock-chunks` (content pieces the mock answers with).
    pub chunks: Option<u32>,
    /// Load shape.
    pub shape: Shape,
    /// Stop after this many measured requests.
    pub requests: Option<u64>,
    /// Stop after this much measured time (capped at [`MAX_DURATION`]).
    pub duration: Option<Duration>,
    /// Unmeasured warm-up before the measured phase.
    pub warmup: Duration,
    /// Per-request timeout; a request over it counts as a transport error.
    pub timeout: Duration,
    /// Draw a one-line progress counter on stderr.
    pub progress: bool,
}

impl Load {
    /// A closed-loop load of `requests` requests of `kind` at `url` with defaults elsewhere.
    pub fn new(url: impl Into<String>, kind: Kind) -> Load {
        Load {
            url: url.into(),
            kind,
            model: "mock-1".to_string(),
            key: None,
            headers: Vec::new(),
            inputs: 1,
            dims: None,
            base64: false,
            chunks: None,
            shape: Shape::Closed { concurrency: 1 },
            requests: Some(100),
            duration: None,
            warmup: Duration::ZERO,
            timeout: Duration::from_secs(60),
            progress: false,
        }
    }
}

/// A request template: built once, cloned per send.
#[derive(Debug, Clone)]
struct Template {
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
    stream: bool,
}

impl Template {
    fn build(load: &Load) -> Result<Template, String> {
        let base = load.url.trim_end_matches('/');
        if !base.starts_with("http://") {
            return Err(format!("`{}`: only http:// URLs are supported", load.url));
        }
        let path = match load.kind {
            Kind::Chat | Kind::ChatStream => "/chat/completions",
            Kind::Embeddings => "/embeddings",
        };
        let uri: Uri = format!("{base}{path}").parse().map_err(|e| format!("`{}`: {e}", load.url))?;
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Some(key) = &load.key {
            let v =
                HeaderValue::from_str(&format!("Bearer {key}")).map_err(|_| "the key is not a valid header value")?;
            headers.insert(header::AUTHORIZATION, v);
        }
        if let Some(n) = load.chunks {
            headers.insert("x-mock-chunks", HeaderValue::from(n));
        }
        for h in &load.headers {
            let (name, value) = h.split_once(':').ok_or_else(|| format!("header `{h}`: expected `name: value`"))?;
            let name = HeaderName::from_bytes(name.trim().as_bytes()).map_err(|e| format!("header `{h}`: {e}"))?;
            let value = HeaderValue::from_str(value.trim()).map_err(|e| format!("header `{h}`: {e}"))?;
            headers.append(name, value);
        }
        let model = serde_json::to_string(&load.model).map_err(|e| e.to_string())?;
        let body = match load.kind {
            Kind::Chat | Kind::ChatStream => {
                let stream = load.kind == Kind::ChatStream;
                format!(
                    "{{\"model\":{model},\"stream\":{stream},\"messages\":[{{\"role\":\"user\",\"content\":\"Say hello.\"}}]}}"
                )
            }
            Kind::Embeddings => {
                let mut b = format!("{{\"model\":{model},\"input\":[");
                for i in 0..load.inputs.max(1) {
                    let _ = write!(b, "{}\"benchmark input {i}\"", if i > 0 { "," } else { "" });
                }
                b.push(']');
                if let Some(d) = load.dims {
                    let _ = write!(b, ",\"dimensions\":{d}");
                }
                if load.base64 {
                    b.push_str(",\"encoding_format\":\"base64\"");
                }
                b.push('}');
                b
            }
        };
        Ok(Template { uri, headers, body: Bytes::from(body), stream: load.kind == Kind::ChatStream })
    }

    fn request(&self) -> Request<Full<Bytes>> {
        let mut req = Request::new(Full::new(self.body.clone()));
        *req.method_mut() = Method::POST;
        *req.uri_mut() = self.uri.clone();
        *req.headers_mut() = self.headers.clone();
        req
    }
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

fn client(pool: usize) -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.enforce_http(true);
    Client::builder(TokioExecutor::new()).pool_max_idle_per_host(pool.max(1)).build(connector)
}

/// One stream chunk's shape, as far as time to first token needs it.
#[derive(Deserialize)]
struct Chunk<'a> {
    #[serde(borrow, default)]
    choices: Vec<Choice<'a>>,
}

#[derive(Deserialize)]
struct Choice<'a> {
    #[serde(borrow, default)]
    delta: Option<Delta<'a>>,
}

#[derive(Deserialize)]
struct Delta<'a> {
    #[serde(borrow, default)]
    content: Option<Cow<'a, str>>,
}

/// Whether an SSE `data` payload is a chunk with non-empty `choices[0].delta.content`.
pub fn has_content(data: &[u8]) -> bool {
    match serde_json::from_slice::<Chunk<'_>>(data) {
        Ok(c) => c
            .choices
            .first()
            .and_then(|c| c.delta.as_ref())
            .and_then(|d| d.content.as_ref())
            .is_some_and(|s| !s.is_empty()),
        Err(_) => false,
    }
}

/// The outcome of one request.
#[derive(Debug, Default)]
struct Sample {
    /// Open loop: how late the send left against its intended time.
    lateness: Option<Duration>,
    latency: Duration,
    ttfb: Option<Duration>,
    ttft: Option<Duration>,
    gaps: Vec<Duration>,
    bytes: u64,
    status: Option<u16>,
}

impl Report {
    fn add(&mut self, s: &Sample) {
        self.bytes += s.bytes;
        if let Some(l) = s.lateness {
            record(&mut self.lateness, l);
        }
        match s.status {
            None => self.transport_errors += 1,
            Some(st) if (200..300).contains(&st) => {
                self.ok += 1;
                record(&mut self.latency, s.latency);
                if let Some(t) = s.ttfb {
                    record(&mut self.ttfb, t);
                }
                if let Some(t) = s.ttft {
                    record(&mut self.ttft, t);
                }
                for g in &s.gaps {
                    record(&mut self.gap, *g);
                }
            }
            Some(st) => *self.status_errors.entry(st).or_default() += 1,
        }
    }
}

/// Sends one request and measures it from `intended` (open loop: when the schedule wanted it
/// sent) or from now.
async fn measure(client: &HttpClient, t: &Template, intended: Option<Instant>, timeout: Duration) -> Sample {
    let now = Instant::now();
    let start = intended.unwrap_or(now);
    let mut s = Sample { lateness: intended.map(|i| now.saturating_duration_since(i)), ..Sample::default() };
    let run = async {
        let resp = match client.request(t.request()).await {
            Ok(r) => r,
            Err(_) => return,
        };
        let status = resp.status().as_u16();
        let stream = t.stream && resp.status().is_success();
        let mut body = resp.into_body();
        let mut decoder = crate::sse::Decoder::new(16 << 20);
        let mut last: Option<Instant> = None;
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else { return };
            let Ok(data) = frame.into_data() else { continue };
            s.bytes += data.len() as u64;
            if stream {
                let now = Instant::now();
                s.ttfb.get_or_insert(now - start);
                let mut events = 0usize;
                if decoder.feed(&data, |e| events += usize::from(has_content(e.data))).is_err() {
                    return;
                }
                // Events that arrived in one read are timed together: the gaps between them are 0.
                for _ in 0..events {
                    match last {
                        None => s.ttft = Some(now - start),
                        Some(prev) => s.gaps.push(now - prev),
                    }
                    last = Some(now);
                }
            }
        }
        s.latency = start.elapsed();
        s.status = Some(status);
    };
    if tokio::time::timeout(timeout, run).await.is_err() {
        s.status = None;
    }
    s
}

/// Live counters shared with the progress line.
#[derive(Default)]
struct Progress {
    done: AtomicU64,
}

/// Redraws a one-line progress bar on stderr until aborted: the share of the run done (by
/// request count or by measured time, whichever is further along), requests and seconds.
async fn draw_progress(p: Arc<Progress>, load: Load, measure_start: Instant) {
    use std::io::Write as _;
    const WIDTH: usize = 30;
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tick.tick().await;
        let done = p.done.load(Ordering::Relaxed);
        let measured = Instant::now().saturating_duration_since(measure_start);
        let by_count = load.requests.map_or(0.0, |n| done as f64 / n as f64);
        let by_time = load.duration.map_or(0.0, |d| measured.as_secs_f64() / d.as_secs_f64().max(1e-9));
        let share = by_count.max(by_time).clamp(0.0, 1.0);
        let filled = (share * WIDTH as f64) as usize;
        let phase = if measured.is_zero() { "warm-up" } else { "" };
        let mut err = std::io::stderr().lock();
        let _ = write!(
            err,
            "\r[{}{}] {:3.0}% {done} requests, {:.1} s {phase}  ",
            "#".repeat(filled),
            " ".repeat(WIDTH - filled),
            share * 100.0,
            measured.as_secs_f64()
        );
        let _ = err.flush();
    }
}

/// Runs `load` against its URL and returns what the measured phase recorded.
///
/// Fails before sending anything when the options are unusable: no request count and no
/// duration, a non-http URL, an invalid header, or a nonsensical shape.
pub async fn run_load(load: &Load) -> Result<Report, String> {
    if load.requests.is_none() && load.duration.is_none() {
        return Err("refusing an unbounded run: give --requests or --duration".into());
    }
    if load.requests == Some(0) {
        return Err("--requests must be at least 1".into());
    }
    let duration = load.duration.unwrap_or(MAX_DURATION).min(MAX_DURATION);
    let warmup = load.warmup.min(MAX_DURATION);
    let template = Arc::new(Template::build(load)?);
    let pool = match load.shape {
        Shape::Closed { concurrency } if concurrency >= 1 => concurrency,
        Shape::Open { rate, max_in_flight } if rate > 0.0 && rate <= MAX_RATE && max_in_flight >= 1 => max_in_flight,
        _ => return Err("concurrency, rate and in-flight cap must be positive".into()),
    };
    let client = client(pool);
    let begin = Instant::now();
    let measure_start = begin + warmup;
    let deadline = measure_start + duration;
    let progress = Arc::new(Progress::default());
    let drawer = load.progress.then(|| tokio::spawn(draw_progress(progress.clone(), load.clone(), measure_start)));
    let mut report = match load.shape {
        Shape::Closed { concurrency } => {
            closed(&client, &template, concurrency, load, measure_start, deadline, &progress).await
        }
        Shape::Open { rate, max_in_flight } => {
            open(&client, &template, rate, max_in_flight, load, measure_start, deadline, &progress).await
        }
    };
    // Stamped before the progress line is cleared, so drawing never adds to the measured time.
    report.elapsed = Instant::now().saturating_duration_since(measure_start);
    if let Some(d) = drawer {
        d.abort();
        eprint!("\r{:80}\r", "");
    }
    report.target = load.url.clone();
    if load.kind == Kind::Embeddings {
        report.inputs = load.inputs.max(1) as u64;
    }
    Ok(report)
}

async fn closed(
    client: &HttpClient,
    t: &Arc<Template>,
    concurrency: usize,
    load: &Load,
    measure_start: Instant,
    deadline: Instant,
    progress: &Arc<Progress>,
) -> Report {
    let claimed = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        let (client, t, claimed, progress) = (client.clone(), t.clone(), claimed.clone(), progress.clone());
        let (limit, timeout) = (load.requests, load.timeout);
        workers.push(tokio::spawn(async move {
            let mut report = Report::new("");
            loop {
                let now = Instant::now();
                if now < measure_start {
                    // Warm-up: sent, not recorded. Bounded by the warm-up period.
                    measure(&client, &t, None, timeout.min(measure_start - now)).await;
                    continue;
                }
                if now >= deadline {
                    break;
                }
                if limit.is_some_and(|n| claimed.fetch_add(1, Ordering::Relaxed) >= n) {
                    break;
                }
                // A request started before the deadline runs to its end (bounded by the timeout):
                // cutting it at the deadline would drop the slowest requests from the histogram
                // and count them as errors.
                let s = measure(&client, &t, None, timeout).await;
                report.add(&s);
                progress.done.fetch_add(1, Ordering::Relaxed);
            }
            report
        }));
    }
    let mut report = Report::new("");
    for w in workers {
        if let Ok(r) = w.await {
            report.merge(&r);
        }
    }
    report
}

#[allow(clippy::too_many_arguments)]
async fn open(
    client: &HttpClient,
    t: &Arc<Template>,
    rate: f64,
    max_in_flight: usize,
    load: &Load,
    measure_start: Instant,
    deadline: Instant,
    progress: &Arc<Progress>,
) -> Report {
    let shared = Arc::new(Mutex::new(Report::new("")));
    let permits = Arc::new(tokio::sync::Semaphore::new(max_in_flight));
    let runtime = tokio::runtime::Handle::current();
    let (client, t, requests, timeout) = (client.clone(), t.clone(), load.requests, load.timeout);
    let (shared_s, progress) = (shared.clone(), progress.clone());
    let (measure_start, deadline) = (measure_start.into_std(), deadline.into_std());
    // The schedule runs on a blocking-pool thread: sleeps there never stall the runtime.
    let scheduler = tokio::task::spawn_blocking(move || {
        let mut tasks = tokio::task::JoinSet::new();
        let begin = std::time::Instant::now();
        let mut measured: u64 = 0;
        for i in 0u64.. {
            // The i-th send is due at i / rate: computed from i, not accumulated, so rounding
            // never drifts the schedule. `--rate` is capped (see `MAX_RATE`) so this stays finite.
            let intended = begin + Duration::from_secs_f64(i as f64 / rate);
            let warm = intended < measure_start;
            if !warm && (intended >= deadline || requests.is_some_and(|n| measured >= n)) {
                break;
            }
            // Handed over early: waking a parked runtime worker takes tens of microseconds, so
            // the task is started ahead and spins to the due time itself.
            wait_until(intended.checked_sub(HANDOFF).unwrap_or(intended));
            if !warm {
                measured += 1;
            }
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                if !warm {
                    lock(&shared_s).missed += 1;
                }
                continue;
            };
            let (client, t, shared, progress) = (client.clone(), t.clone(), shared_s.clone(), progress.clone());
            let intended = Instant::from_std(intended);
            tasks.spawn_on(
                async move {
                    wait_until(intended.into_std());
                    let s = measure(&client, &t, Some(intended), timeout).await;
                    if !warm {
                        lock(&shared).add(&s);
                        progress.done.fetch_add(1, Ordering::Relaxed);
                    }
                    drop(permit);
                },
                &runtime,
            );
            // Reap finished tasks so the set does not grow with the run.
            while tasks.try_join_next().is_some() {}
        }
        tasks
    });
    if let Ok(mut tasks) = scheduler.await {
        while tasks.join_next().await.is_some() {}
    }
    let report = lock(&shared).clone();
    report
}

/// How long before its due time a send is handed to the runtime (see `open`).
const HANDOFF: Duration = Duration::from_micros(100);

/// How long before a due time the scheduler stops sleeping and spins: covers how late a sleep
/// may end (Linux's default timer slack is 50 µs, plus the wake-up), at a CPU cost of about this
/// much per send (8% of a core at 1,000 req/s).
const SPIN: Duration = Duration::from_micros(80);

/// Blocks the calling thread until `at`: a sleep to `SPIN` before it, then a spin.
fn wait_until(at: std::time::Instant) {
    let now = std::time::Instant::now();
    if at > now + SPIN {
        std::thread::sleep(at - now - SPIN);
    }
    while std::time::Instant::now() < at {
        std::hint::spin_loop();
    }
}

fn lock(m: &Mutex<Report>) -> std::sync::MutexGuard<'_, Report> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_only_and_empty_chunks_are_not_content() {
        assert!(!has_content(br#"{"choices":[{"index":0,"delta":{"role":"assistant"}}]}"#));
        assert!(!has_content(br#"{"choices":[{"index":0,"delta":{"content":""}}]}"#));
        assert!(!has_content(br#"{"choices":[],"usage":{"total_tokens":3}}"#));
        assert!(!has_content(b"[DONE]"));
        assert!(has_content(br#"{"choices":[{"index":0,"delta":{"content":"Hi"}}]}"#));
        assert!(has_content(br#"{"choices":[{"delta":{"content":"\"escaped\" \u00e9"}}]}"#));
    }

    #[test]
    fn embeddings_template_carries_inputs_dims_and_format() {
        let mut load = Load::new("http://127.0.0.1:1/v1/", Kind::Embeddings);
        load.inputs = 3;
        load.dims = Some(8);
        load.base64 = true;
        let t = Template::build(&load).unwrap();
        assert_eq!(t.uri.path(), "/v1/embeddings");
        let v: serde_json::Value = serde_json::from_slice(&t.body).unwrap();
        assert_eq!(v["input"].as_array().map(Vec::len), Some(3));
        assert_eq!(v["dimensions"], 8);
        assert_eq!(v["encoding_format"], "base64");
    }

    #[test]
    fn bad_urls_and_headers_are_refused() {
        assert!(Template::build(&Load::new("https://example.com/v1", Kind::Chat)).is_err());
        let mut load = Load::new("http://127.0.0.1:1/v1", Kind::Chat);
        load.headers = vec!["no-colon".into()];
        assert!(Template::build(&load).is_err());
    }

    #[tokio::test]
    async fn a_run_with_neither_count_nor_duration_is_refused() {
        let mut load = Load::new("http://127.0.0.1:1/v1", Kind::Chat);
        load.requests = None;
        assert!(run_load(&load).await.is_err());
    }
}
