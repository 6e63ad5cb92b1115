//! `[metrics]`, `[log]` and `[prices]`: what the gateway exports and what tokens cost.

use super::{err, line_of, ConfigError, Connection};
use crate::router::Pattern;
use indexmap::IndexMap;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::PathBuf;
use toml::Spanned;

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMetrics {
    enabled: Option<bool>,
    path: Option<Spanned<String>>,
    listen: Option<Spanned<String>>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLog {
    requests: Option<Spanned<String>>,
    requests_max_mb: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPrice {
    input: Option<Spanned<f64>>,
    cached_input: Option<Spanned<f64>>,
    cache_write_input: Option<Spanned<f64>>,
    output: Option<Spanned<f64>>,
}

/// `[metrics]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metrics {
    /// Whether `/metrics` is served at all.
    pub enabled: bool,
    /// The scrape path.
    pub path: String,
    /// Its own listener; then the main listener does not serve it.
    pub listen: Option<SocketAddr>,
}

/// `[log]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Log {
    /// The JSON-lines request log, if one is written.
    pub requests: Option<PathBuf>,
    /// Rotate the request log past this many bytes.
    pub requests_max_bytes: u64,
}

/// Files kept by the request log's rotation besides the live one (`.1` .. `.5`).
pub const LOG_KEEP: usize = 5;

/// USD per million tokens of each kind. `None`: that kind cannot be priced (a request that has
/// such tokens gets no cost, never a guessed one).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Price {
    /// Prompt tokens not read from a cache.
    pub input: Option<f64>,
    /// Prompt tokens read from a cache (defaults to `input`).
    pub cached_input: Option<f64>,
    /// Prompt tokens written to a cache (Anthropic; defaults to `input`).
    pub cache_write_input: Option<f64>,
    /// Completion tokens (reasoning included).
    pub output: Option<f64>,
}

/// `[prices]`: patterns matched against the upstream model that answered.
#[derive(Debug, Default, Clone)]
pub struct Prices {
    entries: Vec<PriceEntry>,
}

#[derive(Debug, Clone)]
struct PriceEntry {
    /// `conn.model` patterns name a connection; bare ones match on any connection.
    connection: Option<usize>,
    model: Pattern,
    price: Price,
}

impl Prices {
    /// The price of `model` as served by connection `connection`: a `conn.model` entry before a
    /// bare one, an exact name before a wildcard, then the longest pattern, then file order.
    pub fn find(&self, connection: usize, model: &str) -> Option<&Price> {
        self.entries
            .iter()
            .filter(|e| e.connection.is_none_or(|c| c == connection) && e.model.matches(model))
            .min_by_key(|e| (e.connection.is_none(), e.model.is_wildcard(), usize::MAX - e.model.as_str().len()))
            .map(|e| &e.price)
    }

    /// Whether no price is configured.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// The largest price accepted, per million tokens: a typo guard (no model costs $100k/M).
const MAX_PRICE: f64 = 100_000.0;

pub(super) fn compile_metrics(raw: &RawMetrics, source: Option<&str>) -> Result<Metrics, ConfigError> {
    let path = match &raw.path {
        None => "/metrics".to_owned(),
        Some(p) => {
            let text = p.get_ref();
            let api = ["/v1/", "/chat/", "/completions", "/embeddings", "/models", "/health"];
            if !text.starts_with('/') || text.len() < 2 || text.contains(['?', '#', ' ']) {
                return err(format!(
                    "metrics.path{}: `{text}` is not a path like `/metrics`",
                    line_of(source, p.span())
                ));
            }
            if api.iter().any(|a| text.starts_with(a) || format!("{text}/").starts_with(a)) {
                return err(format!(
                    "metrics.path{}: `{text}` is one of the API's paths; choose another, like `/metrics`",
                    line_of(source, p.span())
                ));
            }
            text.clone()
        }
    };
    let listen = match &raw.listen {
        None => None,
        Some(l) => Some(l.get_ref().parse::<SocketAddr>().map_err(|_| {
            ConfigError(format!(
                "metrics.listen{}: `{}` is not an address like `127.0.0.1:9464`",
                line_of(source, l.span()),
                l.get_ref()
            ))
        })?),
    };
    Ok(Metrics { enabled: raw.enabled.unwrap_or(true), path, listen })
}

pub(super) fn compile_log(raw: &RawLog, source: Option<&str>) -> Result<Log, ConfigError> {
    let requests = match &raw.requests {
        None => None,
        Some(p) => {
            let path = PathBuf::from(p.get_ref());
            let at = line_of(source, p.span());
            if p.get_ref().is_empty() || p.get_ref().ends_with('/') {
                return err(format!("log.requests{at}: `{}` is not a file path", p.get_ref()));
            }
            let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
            if !dir.is_dir() {
                return err(format!("log.requests{at}: the directory `{}` does not exist", dir.display()));
            }
            Some(path)
        }
    };
    let mb = super::count("log.requests_max_mb", &raw.requests_max_mb, 100, 1, source)?;
    Ok(Log { requests, requests_max_bytes: (mb as u64).saturating_mul(1 << 20) })
}

pub(super) fn compile_prices(
    raw: &IndexMap<String, Spanned<RawPrice>>,
    connections: &[Connection],
    source: Option<&str>,
) -> Result<Prices, ConfigError> {
    let mut entries = Vec::with_capacity(raw.len());
    for (pattern, p) in raw {
        let at = line_of(source, p.span());
        let raw = p.get_ref();
        let field = |name: &str, v: &Option<Spanned<f64>>| -> Result<Option<f64>, ConfigError> {
            let Some(v) = v else { return Ok(None) };
            let x = *v.get_ref();
            if !x.is_finite() || !(0.0..=MAX_PRICE).contains(&x) {
                return err(format!(
                    "prices.\"{pattern}\".{name}{}: {x} is not a price in USD per million tokens \
                     (0 to {MAX_PRICE})",
                    line_of(source, v.span())
                ));
            }
            Ok(Some(x))
        };
        let input = field("input", &raw.input)?;
        let price = Price {
            input,
            cached_input: field("cached_input", &raw.cached_input)?.or(input),
            cache_write_input: field("cache_write_input", &raw.cache_write_input)?.or(input),
            output: field("output", &raw.output)?,
        };
        if price.input.is_none() && price.output.is_none() {
            return err(format!(
                "prices.\"{pattern}\"{at}: give at least `input` or `output` (USD per million tokens)"
            ));
        }
        if pattern.is_empty() {
            return err(format!("prices{at}: an empty model pattern"));
        }
        // `conn.model` when the part before the first dot names a connection; else a model
        // name, which may itself hold dots (`gpt-4.1`).
        let (connection, model) = match pattern.split_once('.') {
            Some((c, m)) if !m.is_empty() => match connections.iter().position(|x| x.name == c) {
                Some(id) => (Some(id), m),
                None => (None, pattern.as_str()),
            },
            _ => (None, pattern.as_str()),
        };
        entries.push(PriceEntry { connection, model: Pattern::new(model), price });
    }
    Ok(Prices { entries })
}

impl Price {
    /// The cost in USD of `usage` at this price; `None` when some tokens it has cannot be
    /// priced. Prompt tokens include cached reads and cache writes (as OpenAI counts them, and
    /// as the Anthropic translation reports them), so each is taken out of the input share once.
    pub fn cost(&self, usage: &crate::json::Usage) -> Option<f64> {
        let fresh = usage.prompt.saturating_sub(usage.cached).saturating_sub(usage.cache_write);
        let part = |tokens: u64, price: Option<f64>| match tokens {
            0 => Some(0.0),
            n => price.map(|p| n as f64 * p),
        };
        let total = part(fresh, self.input)?
            + part(usage.cached, self.cached_input)?
            + part(usage.cache_write, self.cache_write_input)?
            + part(usage.completion, self.output)?;
        Some(total / 1e6)
    }
}
