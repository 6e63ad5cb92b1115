//! One record per request: what was asked, where it went, how it ended.
//!
//! The record travels with the response body and is written exactly once, when it is dropped:
//! after the last byte went out, or when the client went away, or with the error response. So
//! every exit path logs one line (and, later, settles limits and metrics) without any code path
//! having to remember to. Nothing secret is in it: model names, connection names, numbers.

use crate::config::Config;
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
}

/// The request's log record; written on drop.
pub struct Record {
    config: Arc<Config>,
    started: Instant,
    /// HTTP method.
    pub method: http::Method,
    /// Endpoint name (`chat`, `embeddings`, ...).
    pub endpoint: &'static str,
    /// Model as requested.
    pub model: Option<String>,
    /// Connection id it was routed to.
    pub connection: Option<usize>,
    /// Status sent to the client.
    pub status: u16,
    /// Token usage, when the upstream reported it.
    pub usage: Option<Usage>,
    /// How it ended.
    pub outcome: Outcome,
    /// The error message, when the gateway answered with or appended an error.
    pub error: Option<String>,
}

impl Record {
    /// Starts a record for a request.
    pub fn new(config: Arc<Config>, method: http::Method, endpoint: &'static str) -> Self {
        Record {
            config,
            started: Instant::now(),
            method,
            endpoint,
            model: None,
            connection: None,
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
        let (prompt, completion) = self.usage.map_or((None, None), |u| (Some(u.prompt), Some(u.completion)));
        let ms = self.started.elapsed().as_secs_f64() * 1e3;
        let outcome = match self.outcome {
            Outcome::ClientGone => "client_gone",
            Outcome::Complete => "complete",
            Outcome::UpstreamFailed => "upstream_failed",
        };
        macro_rules! line {
            ($level:ident) => {
                tracing::$level!(
                    target: "lmgate::request",
                    method = %self.method,
                    endpoint = self.endpoint,
                    model = self.model.as_deref(),
                    connection,
                    status = self.status,
                    duration_ms = (ms * 1000.0).round() / 1000.0,
                    prompt_tokens = prompt,
                    completion_tokens = completion,
                    outcome,
                    error = self.error.as_deref(),
                )
            };
        }
        if self.status >= 500 || self.outcome == Outcome::UpstreamFailed {
            line!(warn)
        } else {
            line!(info)
        }
    }
}
