//! One record per request: what was asked, where it went, how it ended.
//!
//! The record travels with the response body and is written exactly once, when it is dropped:
//! after the last byte went out, or when the client went away, or with the error response. So
//! every exit path logs one line, counts its metrics and writes its request-log record without
//! any code path having to remember to. Nothing secret is in it: the method and path (never the query string,
//! where some clients put keys), model and connection names, numbers.

use crate::auth::KeyId;
use crate::error::Error;
use crate::json::Usage;
use crate::log::Entry;
use crate::metrics::{self, InFlight, Stream};
use crate::snapshot::Snapshot;
use http::HeaderValue;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// How a request ended, as far as the gateway can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The body was still being sent when it was dropped: the client went away.
    ClientGone,
    /// The whole response went out.
    Complete,
    /// The upstream failed or stalled after the response started.
    UpstreamFailed,
    /// The client took none of the response for `send_timeout_secs`: the connection was closed
    /// and the upstream cancelled.
    ClientStalled,
}

impl Outcome {
    fn name(self) -> &'static str {
        match self {
            Outcome::ClientGone => "client_gone",
            Outcome::Complete => "complete",
            Outcome::UpstreamFailed => "upstream_failed",
            Outcome::ClientStalled => "client_stalled",
        }
    }
}

/// What the answering upstream request holds until its record is written.
#[derive(Default)]
pub struct Holding {
    /// It counts in flight on its connection's metrics.
    pub in_flight: Option<InFlight>,
    /// Its hold on the connection's quota, settled with the usage.
    pub admission: Option<crate::limit::Admission>,
    /// Its slot among the connection's embedding requests (`max_concurrent`).
    pub slot: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// The request's log record; written on drop.
pub struct Record {
    snap: Arc<Snapshot>,
    started: Instant,
    /// HTTP method.
    pub method: http::Method,
    /// The request URI; only its path is logged. A clone of the request's (shared bytes, no copy).
    pub uri: http::Uri,
    /// Endpoint name (`chat`, `embeddings`, ...; one of [`metrics::ENDPOINTS`]).
    pub endpoint: &'static str,
    /// The request id (sent upstream and back to the client).
    pub request_id: HeaderValue,
    /// Model as requested.
    pub model: Option<String>,
    /// The caller's key id (never the key), when keys are required.
    pub key: Option<KeyId>,
    /// The caller's group id, once authenticated.
    pub group: Option<usize>,
    /// The route the requested model matched.
    pub route: Option<usize>,
    /// Connection id of the last attempt.
    pub connection: Option<usize>,
    /// Route id and target index of the last attempt (the target that answered, if one did).
    pub target: Option<(usize, usize)>,
    /// The model sent to the answering target.
    pub upstream_model: Option<String>,
    /// The answering pooled target's lease: the request counts as in flight there until this
    /// record is written.
    pub lease: Option<crate::pool::Lease>,
    /// What the answering upstream request holds until this record is written.
    pub upstream: Holding,
    /// The request's hold on its group's and key's limits, settled when this record is written.
    pub admission: Option<crate::limit::Admission>,
    /// The caller's standing against its limits (the `x-ratelimit-*` headers).
    pub quota: Option<crate::limit::Quota>,
    /// Upstream attempts made.
    pub attempts: u32,
    /// The kinds of the failed attempts before the last one, oldest first.
    pub retried: Vec<crate::error::Kind>,
    /// Status sent to the client.
    pub status: u16,
    /// Whether the response is a stream.
    pub stream: bool,
    /// Token usage, when the upstream reported it.
    pub usage: Option<Usage>,
    /// The cost of `usage`, once computed (for the `x-lmgate-cost-usd` header).
    pub cost: Option<f64>,
    /// How it ended.
    pub outcome: Outcome,
    /// The error, when the gateway answered with or appended one.
    pub error: Option<Error>,
    /// When the response head was ready.
    pub head: Option<Instant>,
    /// When the first body bytes went to the client.
    pub first_frame: Option<Instant>,
    /// Time spent waiting on upstreams for response heads (every attempt).
    pub upstream_wait: Duration,
    /// When the upstream's last body bytes arrived (passthrough bodies).
    pub upstream_last: Option<Instant>,
    /// Request body bytes.
    pub bytes_in: u64,
    /// Response body bytes sent.
    pub bytes_out: u64,
}

impl Record {
    /// Starts a record for a request.
    pub fn new(
        snap: Arc<Snapshot>,
        method: http::Method,
        uri: http::Uri,
        endpoint: &'static str,
        request_id: HeaderValue,
    ) -> Self {
        Record {
            snap,
            started: Instant::now(),
            method,
            uri,
            endpoint,
            request_id,
            model: None,
            key: None,
            group: None,
            route: None,
            connection: None,
            target: None,
            upstream_model: None,
            lease: None,
            upstream: Holding::default(),
            admission: None,
            quota: None,
            attempts: 0,
            retried: Vec::new(),
            status: 0,
            stream: false,
            usage: None,
            cost: None,
            outcome: Outcome::ClientGone,
            error: None,
            head: None,
            first_frame: None,
            upstream_wait: Duration::ZERO,
            upstream_last: None,
            bytes_in: 0,
            bytes_out: 0,
        }
    }

    /// The cost of the recorded usage at the answering target's price; `None` without usage or
    /// price.
    pub fn price_usage(&mut self) -> Option<f64> {
        let usage = self.usage.as_ref()?;
        let (r, t) = self.target?;
        let price = self.snap.metrics.price(&self.snap.config, r, t, self.upstream_model.as_deref()?)?;
        self.cost = price.cost(usage);
        self.cost
    }

    /// Settles the limits with what the request used: the usage and cost of a success (its
    /// reservation, when the upstream reported no usage), nothing for a failure.
    fn settle(&mut self) {
        if self.admission.is_none() && self.upstream.admission.is_none() {
            return;
        }
        let (tokens, cost) = match (self.status, &self.usage) {
            (200..=299, Some(u)) => (Some(u.prompt.saturating_add(u.completion)), self.cost),
            (200..=299, None) => (None, None),
            _ => (Some(0), Some(0.0)),
        };
        for a in [self.admission.take(), self.upstream.admission.take()].into_iter().flatten() {
            a.settle(tokens, cost);
        }
    }

    /// The time the gateway itself added: the whole time, less the waits for response heads
    /// and, for a forwarded body, the time between the head and the upstream's last bytes.
    fn overhead(&self, total: Duration) -> Duration {
        let body_wait = match (self.head, self.upstream_last) {
            (Some(h), Some(l)) => l.saturating_duration_since(h),
            _ => Duration::ZERO,
        };
        total.saturating_sub(self.upstream_wait).saturating_sub(body_wait)
    }

    fn metrics(&mut self, total: Duration, overhead: Duration) {
        if self.usage.is_some() && self.cost.is_none() {
            self.price_usage();
        }
        let m = &self.snap.metrics;
        let e = metrics::endpoint_index(self.endpoint);
        m.counts(e, self.route, self.connection, self.group).add(self.status, self.usage.as_ref(), self.cost);
        let latency = m.latency(e, self.route);
        latency.duration.observe(total);
        latency.overhead.observe(overhead);
        if self.stream && self.status < 300 {
            if let Some(first) = self.first_frame {
                latency.ttft.observe(first - self.started);
            }
            let kind = self.error.as_ref().map(|e| e.kind);
            m.metrics().stream(match self.outcome {
                Outcome::Complete => Stream::Complete,
                Outcome::ClientGone => Stream::ClientGone,
                Outcome::ClientStalled => Stream::ClientStalled,
                Outcome::UpstreamFailed if kind == Some(crate::error::Kind::UpstreamTimeout) => Stream::IdleTimeout,
                Outcome::UpstreamFailed => Stream::UpstreamError,
            });
        }
    }

    /// The request-log entry; takes the record's strings (the last use of them).
    fn entry(&mut self, total: Duration, overhead: Duration) -> Entry {
        let m = &self.snap.metrics;
        let ms = |d: Duration| (d.as_secs_f64() * 1e6).round() / 1e3;
        let since = |t: Option<Instant>| t.map(|t| ms(t - self.started));
        let mut entry = Entry {
            // The wall clock at arrival, from the one read now (the record keeps a monotonic one).
            time: SystemTime::now().checked_sub(total).unwrap_or(SystemTime::UNIX_EPOCH),
            request_id: self.request_id.clone(),
            endpoint: self.endpoint,
            group: self.group.and_then(|g| m.group_name(g)),
            model: self.model.take(),
            route: self.route.and_then(|r| m.route_name(r)),
            connection: self.connection.and_then(|c| m.connection_name(c)),
            upstream_model: self.upstream_model.take(),
            status: self.status,
            outcome: self.outcome.name(),
            stream: self.stream,
            attempts: self.attempts,
            duration_ms: ms(total),
            ttfb_ms: since(self.head),
            ttft_ms: if self.stream { since(self.first_frame) } else { None },
            overhead_ms: ms(overhead),
            prompt_tokens: None,
            completion_tokens: None,
            cached_tokens: None,
            cost_usd: self.cost,
            bytes_in: self.bytes_in,
            bytes_out: self.bytes_out,
            error_kind: self.error.as_ref().map(|e| e.kind.name()),
            error: self.error.take().map(|e| e.message),
        };
        entry.usage(self.usage.as_ref());
        entry
    }

    fn trace(&self, total: Duration) {
        let config = &self.snap.config;
        let connection = self.connection.and_then(|c| config.connections.get(c)).map(|c| c.name.as_str());
        let target = self.target.and_then(|(r, t)| config.router.routes().get(r)?.targets.get(t));
        let target = target.map(|t| crate::error::clip(&t.label));
        let (prompt, completion) = self.usage.map_or((None, None), |u| (Some(u.prompt), Some(u.completion)));
        let ms = total.as_secs_f64() * 1e3;
        let outcome = self.outcome.name();
        let error = self.error.as_ref();
        let kind = error.map(|e| e.kind.name());
        let side = error.map(|e| e.side().name());
        let message = error.map(|e| e.message.as_str());
        let cause = error.and_then(|e| e.source.as_ref()).map(tracing::field::display);
        let key = self.key.map(tracing::field::display);
        let retried: Vec<&str> = self.retried.iter().map(|k| k.name()).collect();
        let retried = (!retried.is_empty()).then(|| retried.join(","));
        let request_id = String::from_utf8_lossy(self.request_id.as_bytes());
        macro_rules! line {
            ($level:ident) => {
                tracing::$level!(
                    target: "lmgate::request",
                    method = %self.method,
                    path = crate::error::clip(self.uri.path()),
                    request_id = &*request_id,
                    endpoint = self.endpoint,
                    model = self.model.as_deref().map(crate::error::clip),
                    connection,
                    status = self.status,
                    duration_ms = (ms * 1000.0).round() / 1000.0,
                    prompt_tokens = prompt,
                    completion_tokens = completion,
                    outcome,
                    attempts = self.attempts,
                    retried = retried.as_deref(),
                    target,
                    key,
                    error = message,
                    error_kind = kind,
                    error_side = side,
                    cause,
                )
            };
        }
        if self.status >= 500 || matches!(self.outcome, Outcome::UpstreamFailed | Outcome::ClientStalled) {
            line!(warn)
        } else {
            line!(info)
        }
    }
}

impl Drop for Record {
    fn drop(&mut self) {
        // The upstream request is over before it is counted: a scrape never sees it both done
        // and in flight.
        self.upstream.in_flight = None;
        let total = self.started.elapsed();
        let overhead = self.overhead(total);
        self.metrics(total, overhead);
        self.settle();
        self.trace(total);
        // Probes and scrapes come every few seconds: counted in the metrics, not logged.
        if self.snap.log.is_some() && !matches!(self.endpoint, "health" | "metrics") {
            let entry = self.entry(total, overhead);
            if let Some(log) = &self.snap.log {
                log.write(entry);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use std::sync::Mutex;

    fn snap(config: Config) -> Arc<Snapshot> {
        let mock = Arc::new(crate::provider::mock::Mock::default());
        Arc::new(Snapshot::new(config, &mock, None, &Arc::new(crate::metrics::Metrics::default())).unwrap())
    }

    fn id() -> HeaderValue {
        HeaderValue::from_static("req-1")
    }

    /// A log sink shared with the subscriber.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// The log line `make`'s record writes when dropped. Tests run in parallel threads, and the
    /// interest of the line's callsite (and the global maximum level) is process-wide: another
    /// thread can recompute it while only the absent global subscriber exists. So the record is
    /// built first, the interest recomputed with ours just before the drop, and a lost line is
    /// tried again.
    fn line_of(make: impl Fn() -> Record) -> String {
        for _ in 0..50 {
            let record = make();
            let sink = Sink::default();
            let writer = sink.clone();
            let subscriber = tracing_subscriber::fmt().with_ansi(false).with_writer(move || writer.clone()).finish();
            tracing::subscriber::with_default(subscriber, || {
                tracing::callsite::rebuild_interest_cache();
                drop(record);
            });
            let line = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
            if !line.is_empty() {
                return line;
            }
        }
        panic!("no log line in 50 tries");
    }

    #[test]
    fn the_request_line_has_method_path_model_key_id_connection_status_tokens_and_error_kind_but_no_query_or_key() {
        let config = Config::parse(
            "[connections.up]\napi_type = \"openai\"\napi_base = \"http://127.0.0.1:9/v1\"\napi_key = \"sk-conn-secret\"\n\
             [routing]\n\"gpt-4o\" = [\"up.gpt-4o-2024\"]\n",
            &|_: &str| -> Option<String> { None },
        )
        .unwrap();
        let snap = snap(config);
        let line = line_of(|| {
            let uri: http::Uri = "/v1/chat/completions?api-key=sk-query-secret".parse().unwrap();
            let mut record = Record::new(snap.clone(), http::Method::POST, uri, "chat", id());
            record.model = Some("gpt-4o".into());
            record.connection = Some(0);
            record.target = Some((0, 0));
            record.status = 200;
            record.usage = Some(Usage { prompt: 11, completion: 7, ..Usage::default() });
            record.outcome = Outcome::Complete;
            record.key = Some(KeyId([0xab, 0, 1, 2, 3, 4, 5, 0xff]));
            record.attempts = 2;
            record.retried = vec![crate::error::Kind::UpstreamUnreachable];
            let reset = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "connection reset by peer");
            record.error =
                Some(Error::upstream_failure(crate::error::Kind::UpstreamClosed, "closed early").caused_by(reset));
            record
        });
        for field in [
            "method=POST",
            "path=\"/v1/chat/completions\"",
            "model=\"gpt-4o\"",
            "connection=\"up\"",
            "status=200",
            "duration_ms=",
            "prompt_tokens=11",
            "completion_tokens=7",
            "key=ab000102030405ff",
            "attempts=2",
            "retried=\"upstream_unreachable\"",
            "target=\"up.gpt-4o-2024\"",
            "error=\"closed early\"",
            "error_kind=\"upstream_closed\"",
            "error_side=\"upstream\"",
            "cause=connection reset by peer",
        ] {
            assert!(line.contains(field), "{field} missing from {line}");
        }
        assert!(!line.contains("secret"), "{line}");
        assert_eq!(line.lines().count(), 1, "{line}");
    }

    #[test]
    fn no_request_makes_a_log_line_longer_than_4_kib() {
        let config = Config::parse("", &|_: &str| -> Option<String> { None }).unwrap();
        let long = "é".repeat(20_000);
        let snap = snap(config);
        let line = line_of(|| {
            let uri: http::Uri = format!("/v1/{}", "p".repeat(20_000)).parse().unwrap();
            let mut record = Record::new(snap.clone(), http::Method::POST, uri, "chat", id());
            record.model = Some(long.clone());
            record.status = 404;
            record.error = Some(Error::model_not_found(&long));
            record
        });
        assert_eq!(line.lines().count(), 1);
        assert!(line.len() <= 4096, "{} bytes", line.len());
        assert!(line.contains("model=\"éé") && line.contains("path=\"/v1/pp"), "{line:.300}");
    }
}
