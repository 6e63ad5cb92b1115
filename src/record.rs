//! One record per request: what was asked, where it went, how it ended.
//!
//! The record travels with the response body and is written exactly once, when it is dropped:
//! after the last byte went out, or when the client went away, or with the error response. So
//! every exit path logs one line (and, later, settles limits and metrics) without any code path
//! having to remember to. Nothing secret is in it: the method and path (never the query string,
//! where some clients put keys), model and connection names, numbers.

use crate::auth::KeyId;
use crate::config::Config;
use crate::error::Error;
use crate::json::Usage;
use std::sync::Arc;
use std::time::Instant;

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

/// The request's log record; written on drop.
pub struct Record {
    config: Arc<Config>,
    started: Instant,
    /// HTTP method.
    pub method: http::Method,
    /// The request URI; only its path is logged. A clone of the request's (shared bytes, no copy).
    pub uri: http::Uri,
    /// Endpoint name (`chat`, `embeddings`, ...).
    pub endpoint: &'static str,
    /// Model as requested.
    pub model: Option<String>,
    /// The caller's key id (never the key), when keys are required.
    pub key: Option<KeyId>,
    /// Connection id of the last attempt.
    pub connection: Option<usize>,
    /// Route id and target index of the last attempt (the target that answered, if one did).
    pub target: Option<(usize, usize)>,
    /// The answering pooled target's lease: the request counts as in flight there until this
    /// record is written.
    pub lease: Option<crate::pool::Lease>,
    /// Upstream attempts made.
    pub attempts: u32,
    /// The kinds of the failed attempts before the last one, oldest first.
    pub retried: Vec<crate::error::Kind>,
    /// Status sent to the client.
    pub status: u16,
    /// Token usage, when the upstream reported it.
    pub usage: Option<Usage>,
    /// How it ended.
    pub outcome: Outcome,
    /// The error, when the gateway answered with or appended one.
    pub error: Option<Error>,
}

impl Record {
    /// Starts a record for a request.
    pub fn new(config: Arc<Config>, method: http::Method, uri: http::Uri, endpoint: &'static str) -> Self {
        Record {
            config,
            started: Instant::now(),
            method,
            uri,
            endpoint,
            model: None,
            key: None,
            connection: None,
            target: None,
            lease: None,
            attempts: 0,
            retried: Vec::new(),
            status: 0,
            usage: None,
            outcome: Outcome::ClientGone,
            error: None,
        }
    }
}

impl Drop for Record {
    fn drop(&mut self) {
        let connection = self.connection.and_then(|c| self.config.connections.get(c)).map(|c| c.name.as_str());
        let target = self.target.and_then(|(r, t)| self.config.router.routes().get(r)?.targets.get(t));
        let target = target.map(|t| crate::error::clip(&t.label));
        let (prompt, completion) = self.usage.map_or((None, None), |u| (Some(u.prompt), Some(u.completion)));
        let ms = self.started.elapsed().as_secs_f64() * 1e3;
        let outcome = match self.outcome {
            Outcome::ClientGone => "client_gone",
            Outcome::Complete => "complete",
            Outcome::UpstreamFailed => "upstream_failed",
            Outcome::ClientStalled => "client_stalled",
        };
        let error = self.error.as_ref();
        let kind = error.map(|e| e.kind.name());
        let side = error.map(|e| e.side().name());
        let message = error.map(|e| e.message.as_str());
        let cause = error.and_then(|e| e.source.as_ref()).map(tracing::field::display);
        let key = self.key.map(tracing::field::display);
        let retried: Vec<&str> = self.retried.iter().map(|k| k.name()).collect();
        let retried = (!retried.is_empty()).then(|| retried.join(","));
        macro_rules! line {
            ($level:ident) => {
                tracing::$level!(
                    target: "lmgate::request",
                    method = %self.method,
                    path = crate::error::clip(self.uri.path()),
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

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

    #[test]
    fn the_request_line_has_method_path_model_key_id_connection_status_tokens_and_error_kind_but_no_query_or_key() {
        let config = Config::parse(
            "[connections.up]\napi_type = \"openai\"\napi_base = \"http://127.0.0.1:9/v1\"\napi_key = \"sk-conn-secret\"\n\
             [routing]\n\"gpt-4o\" = [\"up.gpt-4o-2024\"]\n",
            &|_: &str| -> Option<String> { None },
        )
        .unwrap();
        let sink = Sink::default();
        let writer = sink.clone();
        let subscriber = tracing_subscriber::fmt().with_ansi(false).with_writer(move || writer.clone()).finish();
        tracing::subscriber::with_default(subscriber, || {
            // Another test thread may have cached the log callsite's interest as "never"
            // while only the (absent) global subscriber existed; recompute it with ours.
            tracing::callsite::rebuild_interest_cache();
            let uri: http::Uri = "/v1/chat/completions?api-key=sk-query-secret".parse().unwrap();
            let mut record = Record::new(Arc::new(config), http::Method::POST, uri, "chat");
            record.model = Some("gpt-4o".into());
            record.connection = Some(0);
            record.target = Some((0, 0));
            record.status = 200;
            record.usage = Some(Usage { prompt: 11, completion: 7 });
            record.outcome = Outcome::Complete;
            record.key = Some(KeyId([0xab, 0, 1, 2, 3, 4, 5, 0xff]));
            record.attempts = 2;
            record.retried = vec![crate::error::Kind::UpstreamUnreachable];
            let reset = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "connection reset by peer");
            record.error =
                Some(Error::upstream_failure(crate::error::Kind::UpstreamClosed, "closed early").caused_by(reset));
        });
        let line = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
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
        let sink = Sink::default();
        let writer = sink.clone();
        let subscriber = tracing_subscriber::fmt().with_ansi(false).with_writer(move || writer.clone()).finish();
        let long = "é".repeat(20_000);
        tracing::subscriber::with_default(subscriber, || {
            // Another test thread may have cached the log callsite's interest as "never"
            // while only the (absent) global subscriber existed; recompute it with ours.
            tracing::callsite::rebuild_interest_cache();
            let uri: http::Uri = format!("/v1/{}", "p".repeat(20_000)).parse().unwrap();
            let mut record = Record::new(Arc::new(config), http::Method::POST, uri, "chat");
            record.model = Some(long.clone());
            record.status = 404;
            record.error = Some(Error::model_not_found(&long));
        });
        let line = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        assert_eq!(line.lines().count(), 1);
        assert!(line.len() <= 4096, "{} bytes", line.len());
        assert!(line.contains("model=\"éé") && line.contains("path=\"/v1/pp"), "{line:.300}");
    }
}
