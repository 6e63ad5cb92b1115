//! `[limits]`, and the limits written in `[groups.NAME]` and `[connections.NAME]`: read and
//! checked here, enforced by [`crate::limit`].

use super::{err, line_of, resolve, ConfigError, Env};
use serde::Deserialize;
use std::path::PathBuf;
use std::time::Duration;
use toml::Spanned;

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLimits {
    backend: Option<Spanned<String>>,
    redis_url: Option<Spanned<String>>,
    redis_timeout_ms: Option<Spanned<i64>>,
    on_backend_error: Option<Spanned<String>>,
    state_file: Option<Spanned<String>>,
}

/// `[limits]`: where the counters live.
#[derive(Clone, PartialEq)]
pub struct Limits {
    /// The counters' store.
    pub backend: Backend,
    /// What a request gets when the store cannot answer in time.
    pub on_backend_error: OnBackendError,
}

/// Where limit counters, leases and spend live.
#[derive(Clone, PartialEq)]
pub enum Backend {
    /// In this process; spend is saved to `state_file` when one is given.
    Memory {
        /// Spend survives restarts here (atomic writes).
        state_file: Option<PathBuf>,
    },
    /// In Redis, shared by every replica pointing at it.
    Redis {
        /// The URL (may hold a password: never printed).
        url: String,
        /// One round trip's deadline.
        timeout: Duration,
    },
}

/// Fail closed or open when the limits store is down or slow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnBackendError {
    /// 503: nothing goes past an unchecked limit.
    Deny,
    /// Admit unchecked.
    Allow,
}

impl std::fmt::Debug for Limits {
    // By hand: the Redis URL may hold a password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Limits {{ backend: {}, on_backend_error: {:?} }}", self.describe(), self.on_backend_error)
    }
}

impl Limits {
    /// The backend as `lmgate check` shows it, without the Redis URL (it may hold a password).
    pub fn describe(&self) -> String {
        match &self.backend {
            Backend::Memory { state_file: None } => "memory (spend is not saved)".into(),
            Backend::Memory { state_file: Some(p) } => format!("memory, spend saved to {}", p.display()),
            Backend::Redis { timeout, .. } => format!("redis, {} ms per round trip", timeout.as_millis()),
        }
    }
}

/// Requests per minute, tokens per minute and requests in flight; `None` is unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rates {
    /// Requests per minute.
    pub rpm: Option<u64>,
    /// Tokens (prompt + completion) per minute.
    pub tpm: Option<u64>,
    /// Requests in flight at once.
    pub max_concurrent: Option<u64>,
}

impl Rates {
    /// Whether any limit is set.
    pub fn any(&self) -> bool {
        self.rpm.is_some() || self.tpm.is_some() || self.max_concurrent.is_some()
    }

    /// `rpm 600, tpm 200000, max_concurrent 20` (or `none`), for `lmgate check`.
    pub fn describe(&self) -> String {
        let parts: Vec<String> = [("rpm", self.rpm), ("tpm", self.tpm), ("max_concurrent", self.max_concurrent)]
            .iter()
            .filter_map(|(k, v)| v.map(|v| format!("{k} {v}")))
            .collect();
        if parts.is_empty() {
            "none".into()
        } else {
            parts.join(", ")
        }
    }
}

/// A group's spending limit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Budget {
    /// USD per period.
    pub usd: f64,
    /// The period, on the UTC calendar.
    pub period: Period,
}

/// A budget's period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Period {
    /// From 00:00 UTC.
    Day,
    /// From Monday 00:00 UTC.
    Week,
    /// From the 1st, 00:00 UTC.
    Month,
    /// Never resets.
    Total,
}

impl Period {
    /// The name as written.
    pub fn name(self) -> &'static str {
        match self {
            Period::Day => "day",
            Period::Week => "week",
            Period::Month => "month",
            Period::Total => "total",
        }
    }
}

/// The default `redis_timeout_ms`.
const DEFAULT_REDIS_TIMEOUT_MS: usize = 50;

/// `[limits]`.
pub(super) fn compile(raw: &RawLimits, env: Env, source: Option<&str>) -> Result<Limits, ConfigError> {
    let at = |s: &Spanned<String>| line_of(source, s.span());
    let on_backend_error = match &raw.on_backend_error {
        None => OnBackendError::Deny,
        Some(v) => match v.get_ref().as_str() {
            "deny" => OnBackendError::Deny,
            "allow" => OnBackendError::Allow,
            other => return err(format!("limits.on_backend_error{}: `{other}` is not `deny` or `allow`", at(v))),
        },
    };
    let timeout = super::count("limits.redis_timeout_ms", &raw.redis_timeout_ms, DEFAULT_REDIS_TIMEOUT_MS, 1, source)?;
    let backend = match raw.backend.as_ref().map(|b| (b.get_ref().as_str(), b)) {
        None | Some(("memory", _)) => {
            for (k, set) in
                [("redis_url", raw.redis_url.is_some()), ("redis_timeout_ms", raw.redis_timeout_ms.is_some())]
            {
                if set {
                    return err(format!("limits.{k}: only used with `backend = \"redis\"`"));
                }
            }
            let state_file = match &raw.state_file {
                Some(p) if p.get_ref().trim().is_empty() => {
                    return err(format!("limits.state_file{}: the path is empty", at(p)));
                }
                p => p.as_ref().map(|p| PathBuf::from(p.get_ref())),
            };
            Backend::Memory { state_file }
        }
        Some(("redis", b)) => {
            if let Some(p) = &raw.state_file {
                return err(format!(
                    "limits.state_file{}: the redis backend keeps spend in Redis; state_file is for `backend = \"memory\"`",
                    at(p)
                ));
            }
            let Some(url) = &raw.redis_url else {
                return err(format!("limits.backend{}: `backend = \"redis\"` needs `redis_url`", at(b)));
            };
            let value = resolve(url.get_ref(), env).map_err(|var| {
                ConfigError(format!("limits.redis_url{}: environment variable `{var}` is not set", at(url)))
            })?;
            if !(value.starts_with("redis://") || value.starts_with("rediss://") || value.starts_with("unix://")) {
                // The value is not echoed: it may hold a password.
                return err(format!("limits.redis_url{}: not a redis://, rediss:// or unix:// URL", at(url)));
            }
            Backend::Redis { url: value, timeout: Duration::from_millis(timeout as u64) }
        }
        Some((other, b)) => return err(format!("limits.backend{}: `{other}` is not `memory` or `redis`", at(b))),
    };
    Ok(Limits { backend, on_backend_error })
}

/// One limit: absent, or a whole number of at least 1.
fn positive(key: &str, v: &Option<Spanned<i64>>, source: Option<&str>) -> Result<Option<u64>, ConfigError> {
    match v {
        None => Ok(None),
        v => super::count(key, v, 0, 1, source).map(|n| Some(n as u64)),
    }
}

/// `rpm`, `tpm` and `max_concurrent` under `prefix` (`groups.a.` or `connections.b.`), each
/// named with `stem` before it (`key_` for a group's per-key limits).
pub(super) fn rates(
    prefix: &str,
    stem: &str,
    [rpm, tpm, max_concurrent]: [&Option<Spanned<i64>>; 3],
    source: Option<&str>,
) -> Result<Rates, ConfigError> {
    Ok(Rates {
        rpm: positive(&format!("{prefix}{stem}rpm"), rpm, source)?,
        tpm: positive(&format!("{prefix}{stem}tpm"), tpm, source)?,
        max_concurrent: positive(&format!("{prefix}{stem}max_concurrent"), max_concurrent, source)?,
    })
}

/// A group's `budget_usd` and `budget_period` (default `month`).
pub(super) fn budget(
    group: &str,
    usd: &Option<Spanned<f64>>,
    period: &Option<Spanned<String>>,
    source: Option<&str>,
) -> Result<Option<Budget>, ConfigError> {
    let key = |k: &str, span| format!("groups.{group}.{k}{}", line_of(source, span));
    let kind = match period {
        None => Period::Month,
        Some(p) => match p.get_ref().as_str() {
            "day" => Period::Day,
            "week" => Period::Week,
            "month" => Period::Month,
            "total" => Period::Total,
            other => {
                let k = key("budget_period", p.span());
                return err(format!("{k}: `{other}` is not `day`, `week`, `month` or `total`"));
            }
        },
    };
    match (usd, period) {
        (None, None) => Ok(None),
        (None, Some(p)) => err(format!("{}: a budget period without `budget_usd`", key("budget_period", p.span()))),
        (Some(u), _) => {
            let v = *u.get_ref();
            if !(v.is_finite() && v > 0.0) {
                return err(format!("{}: `{v}` must be a positive number of dollars", key("budget_usd", u.span())));
            }
            Ok(Some(Budget { usd: v, period: kind }))
        }
    }
}
