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

    /// How many prices are configured.
    pub fn len(&self) -> usize {
        self.entries.len()
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

#[cfg(test)]
mod tests {
    use crate::config::Config;
    use crate::json::Usage;

    fn parse(text: &str) -> Result<Config, String> {
        Config::parse(text, &|_: &str| -> Option<String> { None }).map_err(|e| e.0)
    }

    const CONNS: &str = "[connections.openai]\napi_type = \"openai\"\napi_key = \"k\"\n\
                         [connections.anthropic]\napi_type = \"anthropic\"\napi_key = \"k\"\n";

    #[test]
    fn defaults_serve_metrics_on_the_main_listener_and_write_no_log() {
        let c = parse("").unwrap();
        assert!(c.metrics.enabled && c.metrics.listen.is_none());
        assert_eq!(c.metrics.path, "/metrics");
        assert_eq!((c.log.requests.as_ref(), c.log.requests_max_bytes), (None, 100 << 20));
        assert!(c.prices.is_empty());
    }

    #[test]
    fn bad_values_are_errors_naming_the_key_and_line() {
        let cases = [
            ("[prices]\n\"gpt-4o\" = { input = -1.0, output = 10.0 }\n", "prices.\"gpt-4o\".input (line 2): -1"),
            ("[prices]\n\"m\" = { input = 1.0, outptu = 2.0 }\n", "line 2"),
            ("[prices]\n\"m\" = { input = 1.0, output = nan }\n", "prices.\"m\".output (line 2)"),
            ("[prices]\n\"m\" = { cached_input = 1.0 }\n", "prices.\"m\" (line 2): give at least"),
            ("[log]\nrequests = \"/nonexistent-dir-x/requests.jsonl\"\n", "log.requests (line 2): the directory"),
            ("[log]\nrequests = \"r.jsonl\"\nrequests_max_mb = 0\n", "log.requests_max_mb (line 3)"),
            ("[metrics]\npath = \"metrics\"\n", "metrics.path (line 2)"),
            ("[metrics]\npath = \"/v1/metrics\"\n", "metrics.path (line 2): `/v1/metrics` is one of the API's"),
            ("[metrics]\nlisten = \"nowhere\"\n", "metrics.listen (line 2)"),
            ("[server]\nlisten = \"127.0.0.1:4000\"\n[metrics]\nlisten = \"127.0.0.1:4000\"\n", "metrics.listen"),
            ("[metrics]\nenabeld = true\n", "line 2"),
        ];
        for (text, want) in cases {
            let e = parse(text).err().unwrap_or_else(|| panic!("accepted: {text}"));
            assert!(e.contains(want), "{text}\n-> {e}\nwanted: {want}");
        }
    }

    #[test]
    fn a_price_is_found_by_connection_then_exactness_then_length() {
        let c = parse(&format!(
            "{CONNS}[prices]\n\"gpt-4o*\" = {{ input = 2.5, output = 10.0 }}\n\"gpt-4o-mini*\" = {{ input = 0.15, output = 0.6 }}\n\
             \"gpt-4o-mini\" = {{ input = 0.1, output = 0.5 }}\n\"openai.gpt-4o*\" = {{ input = 3.0, output = 12.0 }}\n\
             \"gpt-4.1\" = {{ input = 2.0, output = 8.0 }}\n"
        ))
        .unwrap();
        let input = |conn: usize, model: &str| c.prices.find(conn, model).and_then(|p| p.input);
        assert_eq!(input(0, "gpt-4o-2024-08-06"), Some(3.0), "conn.model first");
        assert_eq!(input(1, "gpt-4o-2024-08-06"), Some(2.5));
        assert_eq!(input(1, "gpt-4o-mini"), Some(0.1), "exact before wildcard");
        assert_eq!(input(1, "gpt-4o-mini-2024"), Some(0.15), "longer pattern first");
        assert_eq!(input(1, "gpt-4.1"), Some(2.0), "a dotted model name, not a connection");
        assert_eq!(input(1, "claude-x"), None);
    }

    #[test]
    fn cost_counts_cached_reads_and_cache_writes_out_of_the_prompt_once() {
        let c = parse(
            "[prices]\n\"a\" = { input = 2.5, cached_input = 1.25, output = 10.0 }\n\
             \"b\" = { input = 3.0, cached_input = 0.3, cache_write_input = 3.75, output = 15.0 }\n\
             \"e\" = { input = 0.02 }\n\"o\" = { input = 1.0, output = 4.0 }\n",
        )
        .unwrap();
        let cost = |m: &str, prompt, cached, cache_write, completion| {
            c.prices.find(0, m).unwrap().cost(&Usage { prompt, completion, cached, cache_write })
        };
        let close = |got: Option<f64>, want: f64| got.is_some_and(|g| (g - want).abs() < 1e-12);
        // (1000 - 400) x 2.5 + 400 x 1.25 + 200 x 10 = 1500 + 500 + 2000 micro-USD per token-million.
        assert!(close(cost("a", 1000, 400, 0, 200), 0.004), "{:?}", cost("a", 1000, 400, 0, 200));
        // Anthropic: 3210 prompt = 10 fresh + 3000 read + 200 written; 42 out.
        // 10 x 3 + 3000 x 0.3 + 200 x 3.75 + 42 x 15 = 30 + 900 + 750 + 630 = 2310 -> 0.00231.
        assert!(close(cost("b", 3210, 3000, 200, 42), 0.00231), "{:?}", cost("b", 3210, 3000, 200, 42));
        // Embeddings: input only.
        assert!(close(cost("e", 1_000_000, 0, 0, 0), 0.02));
        // No cached price: cached tokens at the input price.
        assert!(close(cost("o", 100, 50, 0, 10), (50.0 + 50.0 + 40.0) / 1e6));
        // Completion tokens and no output price: no cost, never a guess.
        assert_eq!(cost("e", 10, 0, 0, 5), None);
    }

    #[test]
    fn the_shipped_prices_pick_the_most_specific_entry() {
        let c = parse(include_str!("../../config.toml")).unwrap();
        let openai = c.connections.iter().position(|x| x.name == "openai").unwrap();
        let anthropic = c.connections.iter().position(|x| x.name == "anthropic").unwrap();
        let price = |conn: usize, m: &str| c.prices.find(conn, m).map(|p| (p.input, p.output));
        assert_eq!(price(openai, "gpt-4o-2024-08-06"), Some((Some(2.5), Some(10.0))));
        assert_eq!(price(openai, "gpt-4o-mini"), Some((Some(0.15), Some(0.6))));
        assert_eq!(price(openai, "gpt-4.1-nano-2025-04-14"), Some((Some(0.1), Some(0.4))));
        assert_eq!(price(openai, "gpt-5"), Some((Some(1.25), Some(10.0))));
        assert_eq!(price(openai, "gpt-5-mini"), Some((Some(0.25), Some(2.0))));
        assert_eq!(price(openai, "text-embedding-3-small"), Some((Some(0.02), None)));
        assert_eq!(price(anthropic, "claude-opus-4-5-20251101"), Some((Some(5.0), Some(25.0))));
        assert_eq!(price(anthropic, "claude-opus-4-1-20250805"), Some((Some(15.0), Some(75.0))));
        assert_eq!(price(anthropic, "claude-sonnet-4-5"), Some((Some(3.0), Some(15.0))));
        assert_eq!(price(openai, "gpt-3.5-turbo"), None, "no price is guessed");
    }
}
