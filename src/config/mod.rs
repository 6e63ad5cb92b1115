//! Configuration: TOML text → validated [`Config`].
//!
//! Two levels: [`RawConfig`] mirrors the file (serde, unknown keys rejected) and is compiled into
//! [`Config`]: dense connection ids, compiled routing patterns, hashed client keys and resolved
//! secrets. The file is shaped like lm-proxy's so its users can move over: its top-level `host`
//! and `port`, `api_type = "open_ai"` and `model_listing_mode` are accepted; its Python-only keys
//! are rejected with a message naming what lmgate offers instead.
//!
//! Secrets come from `env:NAME` references. The lookup is injected ([`Env`]) so tests never touch
//! the process environment. A connection whose key variable is missing is disabled with a warning
//! (requests routed there get 503 naming the variable); a missing variable in a group's
//! `api_keys` is an error, so a typo can never leave the gateway open.

pub mod limits;
pub mod observe;
mod routing;

use crate::auth::Keys;
pub use crate::provider::ApiType;
use crate::provider::Provider;
use crate::router::{Pattern, Router};
use http::header::{HeaderName, HeaderValue};
use http::Uri;
use indexmap::IndexMap;
use serde::Deserialize;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

/// Looks up an environment variable by name (the process environment plus `.env`, or a map in
/// tests).
pub type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

/// A configuration error: names the offending key and, for syntax errors, the line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

/// Why a gateway with no client keys (`open`) may not run on `server.listen`: anyone who can
/// reach a public address could spend the upstream keys, unless `[server] open = true` says so.
pub fn open_to_anyone(server: &Server, open: bool) -> Option<String> {
    (open && !server.listen.ip().is_loopback() && !server.open).then(|| {
        format!(
            "server.listen: no client keys are configured and `{}` is not a loopback address, so anyone who \
             can reach it could spend the upstream keys; add [groups.NAME] api_keys, or set [server] open = true \
             to run open on purpose",
            server.listen
        )
    })
}

pub(crate) fn err<T>(msg: impl Into<String>) -> Result<T, ConfigError> {
    Err(ConfigError(msg.into()))
}

// ---------------------------------------------------------------------------------------------
// The file as written.

/// The configuration file as written (see config.toml for every key, annotated).
// No `Debug` on the raw structs: they hold keys as written (literal keys included).
#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// lm-proxy alias for the host part of `server.listen`.
    pub host: Option<String>,
    /// lm-proxy alias for the port part of `server.listen`.
    pub port: Option<u16>,
    /// lm-proxy alias for `server.model_listing_mode`.
    pub model_listing_mode: Option<ListingMode>,
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    connections: IndexMap<String, RawConnection>,
    /// Model pattern → a target, a list of targets or a pool table; file order is kept (first
    /// match wins). Read by hand ([`routing`]) for errors with the route, key and line.
    #[serde(default)]
    routing: IndexMap<String, toml::Spanned<toml::Value>>,
    #[serde(default)]
    retries: routing::RawRetries,
    #[serde(default)]
    cooldown: routing::RawCooldown,
    #[serde(default)]
    groups: IndexMap<String, RawGroup>,
    #[serde(default)]
    limits: limits::RawLimits,
    embeddings_cache: Option<crate::embed::RawCache>,
    #[serde(default)]
    metrics: observe::RawMetrics,
    #[serde(default)]
    log: observe::RawLog,
    /// Model pattern → USD per million tokens.
    #[serde(default)]
    prices: IndexMap<String, toml::Spanned<observe::RawPrice>>,
    /// The file's text, to give line numbers to errors found after parsing.
    #[serde(skip)]
    source: Option<String>,
    // lm-proxy's Python-only keys, caught to explain what to use instead.
    api_key_check: Option<toml::Value>,
    loggers: Option<toml::Value>,
    before: Option<toml::Value>,
    dev_autoreload: Option<toml::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: Option<String>,
    max_request_bytes: Option<usize>,
    shutdown_grace_secs: Option<f64>,
    drain_delay_secs: Option<f64>,
    body_timeout_secs: Option<f64>,
    model_listing_mode: Option<ListingMode>,
    cors_allowed_origins: Option<toml::Spanned<Vec<String>>>,
    allowed_hosts: Option<toml::Spanned<Vec<String>>>,
    open: Option<toml::Spanned<bool>>,
    header_read_timeout_secs: Option<toml::Spanned<f64>>,
    idle_timeout_secs: Option<toml::Spanned<f64>>,
    send_timeout_secs: Option<toml::Spanned<f64>>,
    h2_keepalive_secs: Option<toml::Spanned<f64>>,
    max_connections: Option<toml::Spanned<i64>>,
    max_request_head_bytes: Option<toml::Spanned<i64>>,
    max_buffered_request_mb: Option<toml::Spanned<i64>>,
    tls_cert: Option<toml::Spanned<String>>,
    tls_key: Option<toml::Spanned<String>>,
}

/// How `/v1/models` shows wildcard routing patterns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ListingMode {
    /// List patterns such as `gpt*` as they are written (default).
    AsIs,
    /// List only exact model names.
    #[serde(alias = "hide_wildcards")]
    IgnoreWildcards,
}

/// `[connections.NAME]` as written. Every provider's keys are listed here, so an unknown key is
/// reported with its line by the TOML parser; each provider compiles the keys that are its own
/// ([`Provider::compile`]) and the flow refuses the keys of another provider. (A serde enum
/// tagged by `api_type` would lose the line numbers: serde buffers a tagged table before it
/// knows the variant.)
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConnection {
    /// The provider.
    pub api_type: ApiType,
    /// The upstream's base URL (literal or `env:VAR`).
    pub api_base: Option<String>,
    /// The upstream key (literal or `env:VAR`).
    pub api_key: Option<String>,
    #[serde(default)]
    headers: IndexMap<String, String>,
    #[serde(default)]
    http2: bool,
    ca_file: Option<PathBuf>,
    connect_timeout_secs: Option<f64>,
    header_timeout_secs: Option<f64>,
    idle_timeout_secs: Option<f64>,
    first_token_timeout_secs: Option<toml::Spanned<f64>>,
    /// OpenAI-compatible: ask streams for usage.
    pub stream_usage: Option<bool>,
    #[serde(default)]
    forward_headers: Vec<String>,
    /// Anthropic: the `anthropic-version` header.
    pub anthropic_version: Option<String>,
    /// The completion tokens a request without `max_tokens` is assumed to use (tpm and budget
    /// reservations; Anthropic also sends it, as its API requires `max_tokens`).
    pub default_max_tokens: Option<toml::Spanned<i64>>,
    rpm: Option<toml::Spanned<i64>>,
    tpm: Option<toml::Spanned<i64>>,
    max_concurrent: Option<toml::Spanned<i64>>,
    /// Azure OpenAI: the API version (dated, or `v1`).
    pub api_version: Option<toml::Spanned<String>>,
    /// `[connections.NAME.embeddings]`: split, convert, bound (OpenAI-compatible upstreams).
    embeddings: Option<crate::embed::RawSettings>,
}

/// Which provider owns each provider-specific key, so a key given to another provider is an
/// error naming both.
const PROVIDER_KEYS: &[(&str, &[ApiType])] = &[
    ("stream_usage", &[ApiType::Openai, ApiType::Azure]),
    ("anthropic_version", &[ApiType::Anthropic]),
    ("api_version", &[ApiType::Azure]),
];

impl RawConnection {
    /// The provider-specific keys that are set.
    fn provider_keys(&self) -> impl Iterator<Item = (&'static str, &'static [ApiType])> + '_ {
        let set = [self.stream_usage.is_some(), self.anthropic_version.is_some(), self.api_version.is_some()];
        PROVIDER_KEYS.iter().zip(set).filter(|(_, set)| *set).map(|(k, _)| *k)
    }
}

/// Resolves a connection's `env:` references; a missing variable disables the connection (the
/// first one missing is the reason given).
pub struct Secrets<'a> {
    env: Env<'a>,
    name: &'a str,
    /// The file's text, for the line of a key.
    source: Option<&'a str>,
    /// Why the connection is disabled, if a variable is missing.
    pub disabled: Option<String>,
}

impl Secrets<'_> {
    /// The value of `value` (literal or `env:VAR`) for config key `what`; `None` (and the
    /// connection disabled) when its variable is not set.
    pub fn resolve(&mut self, what: String, value: &str) -> Option<String> {
        match resolve(value, self.env) {
            Ok(v) => Some(v),
            Err(var) => {
                self.disabled.get_or_insert(format!("environment variable `{var}` (for {what}) is not set"));
                None
            }
        }
    }

    /// ` (line N)` for a span of the file, when its text is known.
    pub fn line(&self, span: std::ops::Range<usize>) -> String {
        line_of(self.source, span)
    }

    /// The connection's `api_key`, resolved, as header `name` with value `prefix` + key (a
    /// sensitive value); none when no key is set or its variable is missing.
    pub fn key_header(
        &mut self,
        raw: &RawConnection,
        name: HeaderName,
        prefix: &str,
    ) -> Result<Option<(HeaderName, HeaderValue)>, ConfigError> {
        let what = format!("connections.{}.api_key", self.name);
        let Some(key) = raw.api_key.as_deref().and_then(|k| self.resolve(what.clone(), k)) else { return Ok(None) };
        Ok(Some((name, header_value(&what, &format!("{prefix}{}", key.trim()))?)))
    }

    /// The connection's `api_base`, resolved, or `default`.
    pub fn base(&mut self, raw: &RawConnection, default: &str) -> String {
        let base = raw.api_base.as_deref().unwrap_or(default);
        self.resolve(format!("connections.{}.api_base", self.name), base).unwrap_or_else(|| default.to_owned())
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGroup {
    #[serde(default)]
    api_keys: Vec<String>,
    allowed_connections: Option<NameList>,
    allowed_models: Option<NameList>,
    rpm: Option<toml::Spanned<i64>>,
    tpm: Option<toml::Spanned<i64>>,
    max_concurrent: Option<toml::Spanned<i64>>,
    key_rpm: Option<toml::Spanned<i64>>,
    key_tpm: Option<toml::Spanned<i64>>,
    key_max_concurrent: Option<toml::Spanned<i64>>,
    budget_usd: Option<toml::Spanned<f64>>,
    budget_period: Option<toml::Spanned<String>>,
}

/// `"*"`, a comma-separated string (lm-proxy's form) or a list of names.
#[derive(Deserialize)]
#[serde(untagged)]
enum NameList {
    Text(String),
    List(Vec<String>),
}

impl NameList {
    fn names(&self) -> Vec<String> {
        let items: Vec<&str> = match self {
            NameList::Text(s) => s.split(',').collect(),
            NameList::List(v) => v.iter().map(String::as_str).collect(),
        };
        items.into_iter().map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned).collect()
    }
}

// ---------------------------------------------------------------------------------------------
// The compiled configuration.

/// A validated configuration, ready to serve.
#[derive(Debug)]
pub struct Config {
    /// Listener and request limits.
    pub server: Server,
    /// Upstream connections; a [`crate::router::Target`] refers to one by index.
    pub connections: Vec<Connection>,
    /// Model name → connection and upstream model.
    pub router: Router,
    /// Access groups; index 0.. as in the file (plus the implicit open group when running open).
    pub groups: Vec<Group>,
    /// Client keys (hashed) → group.
    pub keys: Keys,
    /// No client keys configured: every caller is let in as `open_group`.
    pub open_group: Option<usize>,
    /// Things an operator should know at start (disabled connections, open access).
    pub warnings: Vec<String>,
    /// `[metrics]`.
    pub metrics: observe::Metrics,
    /// `[log]`.
    pub log: observe::Log,
    /// `[prices]`.
    pub prices: observe::Prices,
    /// `[limits]`.
    pub limits: limits::Limits,
    /// `[embeddings_cache]`: `(max_mb, ttl_secs)`.
    pub embeddings_cache: Option<(usize, u64)>,
}

/// `[server]`.
#[derive(Debug, Clone)]
pub struct Server {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Largest request body accepted (413 past it).
    pub max_request_bytes: usize,
    /// How long in-flight requests may run after a shutdown signal.
    pub shutdown_grace: Duration,
    /// After a shutdown signal, how long `/health/ready` answers 503 while the gateway still
    /// accepts and serves, so a load balancer sees the 503 and stops sending before connections
    /// are refused. Zero (the default) closes the listener at once.
    pub drain_delay: Duration,
    /// How long a client may take to send its request body (408 past it).
    pub body_timeout: Duration,
    /// Whether `/v1/models` lists wildcard patterns.
    pub list_wildcards: bool,
    /// Browser origins (`scheme://host[:port]`) whose requests are served, with CORS answers;
    /// a request with any other `Origin` gets 403.
    pub cors_allowed_origins: Vec<String>,
    /// Names an open loopback gateway answers to besides its address and `localhost` (`"*"`:
    /// any).
    pub allowed_hosts: Vec<String>,
    /// Running without client keys on a non-loopback address was asked for explicitly.
    pub open: bool,
    /// How long a connection may take to send a request head: its first one from accept, a
    /// later HTTP/1 one from its first byte.
    pub header_read_timeout: Duration,
    /// How long a connection with no request in flight stays open (h2: then a GOAWAY).
    pub idle_timeout: Duration,
    /// How long a response may wait on a client that takes none of it before the connection is
    /// closed and the upstream cancelled.
    pub send_timeout: Duration,
    /// h2: a PING after this long without a frame from the client; unanswered for as long again,
    /// the connection is closed.
    pub h2_keepalive: Duration,
    /// Connections served at once; further ones wait in the listen backlog.
    pub max_connections: usize,
    /// Largest request head (request line and headers; h2: header list) before 431.
    pub max_request_head_bytes: usize,
    /// Request body bytes buffered across all requests in flight.
    pub max_buffered_request_bytes: usize,
    /// TLS on the listener (`tls_cert` and `tls_key`); `None`: plain TCP.
    pub tls: Option<crate::tls::Tls>,
}

/// Per-connection timeouts.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// TCP (and TLS) connect.
    pub connect: Duration,
    /// From sending the request until the response head arrives.
    pub header: Duration,
    /// Between two body frames once the head has arrived.
    pub idle: Duration,
    /// Streams: from the attempt's start until the first body bytes; the response head is
    /// held back until then, so a stream that does not start fails over. `None`: not held.
    pub first_token: Option<Duration>,
}

/// One upstream connection.
#[derive(Debug)]
pub struct Connection {
    /// The name in `[connections.NAME]`.
    pub name: String,
    /// Its provider, with the settings only that provider uses.
    pub provider: Provider,
    /// Headers set on every upstream request: the credential first, then `headers`. Values are
    /// marked sensitive so they never print.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// Why the connection cannot be used (a missing variable), if so.
    pub disabled: Option<String>,
    /// HTTP/2 to the upstream (prior knowledge on http, ALPN on https).
    pub http2: bool,
    /// Extra CA certificates (PEM) trusted for this upstream.
    pub ca_file: Option<PathBuf>,
    /// Timeouts.
    pub timeouts: Timeouts,
    /// Extra client request headers passed upstream (lower-case names, `*` wildcards).
    pub forward_headers: Vec<Pattern>,
    /// The upstream's quota: the gateway never sends more.
    pub limits: limits::Rates,
    /// Completion tokens assumed for a request without `max_tokens`.
    pub default_max_tokens: u64,
    /// How embeddings requests are split, converted and bounded.
    pub embeddings: crate::embed::Settings,
}

impl Connection {
    /// Whether two connections are the same upstream to the gateway: the same transport, the
    /// same credential and headers, equally usable (a reload keeps the health of its targets).
    pub fn same_upstream(&self, other: &Connection) -> bool {
        self.same_transport(other) && self.headers == other.headers && self.disabled == other.disabled
    }

    /// Whether two connections reach their upstream the same way, so a client built for one
    /// serves the other (a reload keeps the pool of an unchanged connection).
    pub fn same_transport(&self, other: &Connection) -> bool {
        self.provider.api_type() == other.provider.api_type()
            && self.provider.base_url() == other.provider.base_url()
            && self.http2 == other.http2
            && self.ca_file == other.ca_file
            && self.timeouts.connect == other.timeouts.connect
    }
}

/// An access group.
#[derive(Debug)]
pub struct Group {
    /// The name in `[groups.NAME]`.
    pub name: String,
    /// `allowed[connection id]`.
    pub connections: Vec<bool>,
    /// Allowed model patterns; `None` allows every model.
    pub models: Option<Vec<Pattern>>,
    /// The group's limits, all its keys together.
    pub limits: limits::Rates,
    /// The same limits for each key of the group.
    pub key_limits: limits::Rates,
    /// The group's spending limit.
    pub budget: Option<limits::Budget>,
}

impl Group {
    /// Whether this group may send `model` to `connection`.
    pub fn allows(&self, connection: usize, model: &str) -> bool {
        self.connections.get(connection).copied().unwrap_or(false)
            && self.models.as_ref().is_none_or(|m| m.iter().any(|p| p.matches(model)))
    }
}

/// `default_max_tokens` when a connection sets none.
pub const DEFAULT_MAX_TOKENS: usize = 4096;
const DEFAULT_LISTEN: &str = "127.0.0.1:4000";
const DEFAULT_MAX_REQUEST_BYTES: usize = 32 << 20;

impl Config {
    /// Parses and validates TOML text. `env` resolves `env:NAME` references.
    pub fn parse(text: &str, env: Env) -> Result<Config, ConfigError> {
        let mut raw: RawConfig = toml::from_str(text).map_err(|e| syntax_error(text, &e))?;
        raw.source = Some(text.to_owned());
        Self::compile(raw, env)
    }

    /// Validates a parsed file into a `Config`.
    pub fn compile(raw: RawConfig, env: Env) -> Result<Config, ConfigError> {
        reject_python_keys(&raw)?;
        let mut warnings = Vec::new();
        let server = compile_server(&raw)?;

        let mut connections = Vec::with_capacity(raw.connections.len());
        for (name, c) in &raw.connections {
            connections.push(compile_connection(name, c, env, raw.source.as_deref(), &mut warnings)?);
        }
        let find = |name: &str| connections.iter().position(|c| c.name == name);
        let router = routing::compile(&raw.routing, &raw.retries, &raw.cooldown, &connections, raw.source.as_deref())?;

        let mut groups = Vec::with_capacity(raw.groups.len() + 1);
        let mut keys = Keys::default();
        for (gname, g) in &raw.groups {
            let id = groups.len();
            let mut allowed = vec![false; connections.len()];
            match g.allowed_connections.as_ref().map(NameList::names) {
                None => allowed.fill(true),
                Some(list) if list.iter().any(|n| n == "*") => allowed.fill(true),
                Some(list) => {
                    for n in list {
                        let Some(c) = find(&n) else {
                            return err(format!(
                                "groups.{gname}.allowed_connections: no connection named `{n}` (known: {})",
                                names(&raw.connections)
                            ));
                        };
                        allowed[c] = true;
                    }
                }
            }
            let models = g.allowed_models.as_ref().map(NameList::names).and_then(|list| {
                (!list.iter().any(|n| n == "*")).then(|| list.iter().map(|p| Pattern::new(p)).collect())
            });
            for (i, key) in g.api_keys.iter().enumerate() {
                let value = resolve(key, env).map_err(|var| {
                    ConfigError(format!(
                        "groups.{gname}.api_keys[{i}]: environment variable `{var}` is not set \
                         (a missing client key would leave the gateway open, so this is an error)"
                    ))
                })?;
                if value.is_empty() {
                    return err(format!("groups.{gname}.api_keys[{i}]: the key is empty"));
                }
                if let Some(other) = keys.insert(&value, id) {
                    return err(format!(
                        "groups.{gname}.api_keys[{i}]: the same key is already in group `{}`",
                        raw.groups.get_index(other).map_or("?", |(n, _)| n.as_str())
                    ));
                }
            }
            let source = raw.source.as_deref();
            let prefix = format!("groups.{gname}.");
            let limits = limits::rates(&prefix, "", [&g.rpm, &g.tpm, &g.max_concurrent], source)?;
            let key_limits = limits::rates(&prefix, "key_", [&g.key_rpm, &g.key_tpm, &g.key_max_concurrent], source)?;
            let budget = limits::budget(gname, &g.budget_usd, &g.budget_period, source)?;
            groups.push(Group { name: gname.clone(), connections: allowed, models, limits, key_limits, budget });
        }

        let open_line = raw.server.open.as_ref().map_or(String::new(), |o| line_of(raw.source.as_deref(), o.span()));
        if let Some(refusal) = open_to_anyone(&server, keys.is_empty()) {
            return err(refusal);
        }
        if !keys.is_empty() && server.open {
            return err(format!(
                "server.open{open_line}: `open = true` contradicts the client keys in [groups]: remove one"
            ));
        }
        let open_group = if keys.is_empty() {
            warnings.push(
                "no client API keys are configured: the gateway is OPEN to anyone who can reach \
                 it; add [groups.NAME] api_keys to require keys"
                    .into(),
            );
            Some(match groups.iter().position(|g| g.name == "default") {
                Some(id) => id,
                None => {
                    groups.push(Group {
                        name: "open".into(),
                        connections: vec![true; connections.len()],
                        models: None,
                        limits: limits::Rates::default(),
                        key_limits: limits::Rates::default(),
                        budget: None,
                    });
                    groups.len() - 1
                }
            })
        } else {
            None
        };

        let source = raw.source.as_deref();
        let metrics = observe::compile_metrics(&raw.metrics, source)?;
        if metrics.listen.is_some_and(|l| l == server.listen) {
            return err(format!(
                "metrics.listen: `{}` is also server.listen; leave it out to serve metrics there",
                server.listen
            ));
        }
        let log = observe::compile_log(&raw.log, source)?;
        let prices = observe::compile_prices(&raw.prices, &connections, source)?;
        let limits = limits::compile(&raw.limits, env, source)?;
        let embeddings_cache = crate::embed::compile_cache(raw.embeddings_cache.as_ref(), source)?;
        Ok(Config {
            server,
            connections,
            router,
            groups,
            keys,
            open_group,
            warnings,
            metrics,
            log,
            prices,
            limits,
            embeddings_cache,
        })
    }

    /// A summary for `lmgate check`: never secret values.
    pub fn summary(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(s, "listen: {}", self.server.listen);
        let _ = writeln!(s, "connections ({}):", self.connections.len());
        for c in &self.connections {
            let base = c.provider.base_url().unwrap_or("in-process");
            let _ = write!(s, "  {} ({}) {}", c.name, c.provider.api_type().name(), base);
            if c.http2 {
                s.push_str(" h2");
            }
            match &c.disabled {
                Some(why) => {
                    let _ = write!(s, " DISABLED: {why}");
                }
                None if c.headers.iter().any(|(n, _)| is_credential(n)) => s.push_str(" key: set"),
                None => {}
            }
            s.push('\n');
        }
        let _ = writeln!(s, "routes ({}):", self.router.len());
        for route in self.router.routes() {
            let Some(pool) = &route.pool else {
                let _ = writeln!(s, "  {} -> {}", route.pattern.as_str(), route.targets[0].label);
                continue;
            };
            let weighted = pool.strategy == crate::pool::Strategy::Weighted;
            let targets: Vec<String> = route
                .targets
                .iter()
                .map(|t| if weighted { format!("{} (weight {})", t.label, t.weight) } else { t.label.to_string() })
                .collect();
            let r = &pool.retries;
            let _ = write!(
                s,
                "  {} -> pool [{}], {}, attempts {}, backoff {}..{} ms, waits Retry-After up to {:?}, \
                 cooldown after {} failure(s) for {:?}",
                route.pattern.as_str(),
                targets.join(", "),
                pool.strategy.name(),
                r.attempts,
                r.backoff.as_millis(),
                r.max_backoff.as_millis(),
                r.retry_after_max,
                pool.cooldown.failures,
                pool.cooldown.period,
            );
            if !pool.fallbacks.is_empty() {
                let _ = write!(s, ", fallbacks: {}", pool.fallbacks.join(", "));
            }
            s.push('\n');
        }
        let _ = writeln!(s, "groups ({}):", self.groups.len());
        for (id, g) in self.groups.iter().enumerate() {
            let conns: Vec<&str> = self
                .connections
                .iter()
                .zip(&g.connections)
                .filter(|(_, ok)| **ok)
                .map(|(c, _)| c.name.as_str())
                .collect();
            let _ = write!(s, "  {}: {} key(s), connections: {}", g.name, self.keys.count(id), conns.join(", "));
            if let Some(m) = &g.models {
                let m: Vec<&str> = m.iter().map(Pattern::as_str).collect();
                let _ = write!(s, ", models: {}", m.join(", "));
            }
            if g.limits.any() {
                let _ = write!(s, ", limits: {}", g.limits.describe());
            }
            if g.key_limits.any() {
                let _ = write!(s, ", per key: {}", g.key_limits.describe());
            }
            if let Some(b) = &g.budget {
                let _ = write!(s, ", budget: ${} per {}", b.usd, b.period.name());
            }
            s.push('\n');
        }
        let m = &self.metrics;
        match (m.enabled, m.listen) {
            (false, _) => s.push_str("metrics: off\n"),
            (true, None) => {
                let _ = writeln!(s, "metrics: {} on {} (no key needed)", m.path, self.server.listen);
            }
            (true, Some(l)) => {
                let _ = writeln!(s, "metrics: {} on {l} (no key needed)", m.path);
            }
        }
        match &self.log.requests {
            None => s.push_str("request log: off\n"),
            Some(p) => {
                let mb = self.log.requests_max_bytes >> 20;
                let _ = writeln!(s, "request log: {} (rotated past {mb} MB, {} kept)", p.display(), observe::LOG_KEEP);
            }
        }
        let _ = writeln!(s, "prices: {}", self.prices.len());
        let _ = writeln!(s, "limits: {}", self.limits.describe());
        if let Some((mb, ttl)) = self.embeddings_cache {
            let _ = writeln!(s, "embeddings cache: {mb} MiB, entries live {ttl} s");
        }
        for c in self.connections.iter().filter(|c| c.limits.any()) {
            let _ = writeln!(s, "  connection {}: {}", c.name, c.limits.describe());
        }
        for w in &self.warnings {
            let _ = writeln!(s, "warning: {w}");
        }
        s
    }
}

fn is_credential(name: &HeaderName) -> bool {
    name == http::header::AUTHORIZATION || name == "x-api-key" || name == "api-key"
}

fn names<V>(map: &IndexMap<String, V>) -> String {
    let v: Vec<&str> = map.keys().map(String::as_str).collect();
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}

/// A TOML error with its line and column, without echoing the source line (it may hold a key).
/// The enclosing table header is named, so "unknown field `lisen`" reads as a key of `[server]`.
fn syntax_error(text: &str, e: &toml::de::Error) -> ConfigError {
    let msg = e.message().trim();
    let Some(span) = e.span() else {
        return ConfigError(msg.to_owned());
    };
    let before = text.get(..span.start).unwrap_or(text);
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line = before.matches('\n').count() + 1;
    let col = before.len() - line_start + 1;
    let header = |l: &str| {
        let l = l.split('#').next().unwrap_or("").trim();
        (l.starts_with('[') && l.ends_with(']')).then(|| l.to_owned())
    };
    let this_line = text[line_start..].lines().next().unwrap_or("");
    // An error on a header line is about the header itself, not the table above it.
    let table = if header(this_line).is_some() { None } else { before[..line_start].lines().rev().find_map(header) };
    match table {
        Some(table) => ConfigError(format!("line {line}, column {col}, in {table}: {msg}")),
        None => ConfigError(format!("line {line}, column {col}: {msg}")),
    }
}

fn reject_python_keys(raw: &RawConfig) -> Result<(), ConfigError> {
    let hints: [(&Option<toml::Value>, &str, &str); 4] = [
        (
            &raw.api_key_check,
            "api_key_check",
            "lmgate checks client keys itself: list them in [groups.NAME] api_keys (literals or \"env:VAR\")",
        ),
        (
            &raw.loggers,
            "loggers",
            "lmgate logs one line per request to stderr; choose the format with `--log-format json|pretty`",
        ),
        (
            &raw.before,
            "before",
            "lmgate has no Python request hooks; use [routing] and [groups] for routing and access",
        ),
        (
            &raw.dev_autoreload,
            "dev_autoreload",
            "remove it; run `lmgate serve --watch` to reload a changed config, or send the process SIGHUP",
        ),
    ];
    for (value, key, hint) in hints {
        if value.is_some() {
            return err(format!("`{key}` is an lm-proxy (Python) setting that lmgate does not support: {hint}"));
        }
    }
    Ok(())
}

fn compile_server(raw: &RawConfig) -> Result<Server, ConfigError> {
    let s = &raw.server;
    let listen_text = match (&s.listen, &raw.host, raw.port) {
        (Some(_), Some(_), _) | (Some(_), _, Some(_)) => {
            return err("`server.listen` and lm-proxy's top-level `host`/`port` both set: keep one");
        }
        (Some(l), None, None) => l.clone(),
        (None, host, port) => {
            let host = host.as_deref().unwrap_or("127.0.0.1");
            let host = if host.contains(':') && !host.starts_with('[') { format!("[{host}]") } else { host.to_owned() };
            format!("{host}:{}", port.unwrap_or(4000))
        }
    };
    let listen = listen_text.to_socket_addrs().ok().and_then(|mut a| a.next()).ok_or_else(|| {
        ConfigError(format!("server.listen: `{listen_text}` is not an address like `{DEFAULT_LISTEN}`"))
    })?;
    let max_request_bytes = s.max_request_bytes.unwrap_or(DEFAULT_MAX_REQUEST_BYTES);
    if max_request_bytes == 0 {
        return err("server.max_request_bytes must be greater than 0");
    }
    let shutdown_grace = secs("server.shutdown_grace_secs", s.shutdown_grace_secs, 30.0, true)?;
    let drain_delay = secs("server.drain_delay_secs", s.drain_delay_secs, 0.0, true)?;
    let body_timeout = secs("server.body_timeout_secs", s.body_timeout_secs, 60.0, false)?;
    let mode = match (s.model_listing_mode, raw.model_listing_mode) {
        (Some(_), Some(_)) => {
            return err("`model_listing_mode` is set both at the top level and in [server]: keep one")
        }
        (a, b) => a.or(b).unwrap_or(ListingMode::AsIs),
    };
    let at = |span: std::ops::Range<usize>| line_of(raw.source.as_deref(), span);
    let mut cors_allowed_origins = Vec::new();
    if let Some(list) = &s.cors_allowed_origins {
        for (i, origin) in list.get_ref().iter().enumerate() {
            if !is_origin(origin) {
                return err(format!(
                    "server.cors_allowed_origins[{i}]{}: `{origin}` is not an origin like `https://app.example.com` \
                     (scheme, host and optional port; no path; `*` is not accepted: it would let every web page \
                     use this gateway)",
                    at(list.span())
                ));
            }
            cors_allowed_origins.push(origin.clone());
        }
    }
    let allowed_hosts = s.allowed_hosts.as_ref().map_or(Ok(Vec::new()), |list| {
        list.get_ref()
            .iter()
            .enumerate()
            .map(|(i, h)| {
                let ok = !h.is_empty() && !h.contains(['/', ' ', '@', ':']);
                ok.then(|| h.clone()).ok_or_else(|| {
                    ConfigError(format!(
                        "server.allowed_hosts[{i}]{}: `{h}` is not a host name (no scheme, port or path)",
                        at(list.span())
                    ))
                })
            })
            .collect()
    })?;
    let open = s.open.as_ref().is_some_and(|o| *o.get_ref());
    let source = raw.source.as_deref();
    let header_read_timeout =
        spanned_secs("server.header_read_timeout_secs", &s.header_read_timeout_secs, 30.0, source)?;
    let idle_timeout = spanned_secs("server.idle_timeout_secs", &s.idle_timeout_secs, 120.0, source)?;
    let send_timeout = spanned_secs("server.send_timeout_secs", &s.send_timeout_secs, 60.0, source)?;
    let h2_keepalive = spanned_secs("server.h2_keepalive_secs", &s.h2_keepalive_secs, 30.0, source)?;
    let max_connections = count("server.max_connections", &s.max_connections, 10_000, 1, source)?;
    // hyper's HTTP/1 read buffer, which bounds the head, cannot be smaller than 8 KiB.
    let max_request_head_bytes =
        count("server.max_request_head_bytes", &s.max_request_head_bytes, 64 << 10, 8192, source)?;
    let buffered_mb = count("server.max_buffered_request_mb", &s.max_buffered_request_mb, 512, 1, source)?;
    let max_buffered_request_bytes = buffered_mb.saturating_mul(1 << 20);
    if max_buffered_request_bytes < max_request_bytes {
        let line = s.max_buffered_request_mb.as_ref().map_or(String::new(), |v| line_of(source, v.span()));
        return err(format!(
            "server.max_buffered_request_mb{line}: {buffered_mb} MiB is less than server.max_request_bytes \
             ({max_request_bytes} bytes), so the largest allowed request could never be read: raise it or lower \
             max_request_bytes"
        ));
    }
    let tls = match (&s.tls_cert, &s.tls_key) {
        (None, None) => None,
        (Some(cert), Some(key)) => {
            let keys = crate::tls::Keys {
                cert: &format!("server.tls_cert{}", line_of(source, cert.span())),
                key: &format!("server.tls_key{}", line_of(source, key.span())),
            };
            let (cert, key) = (PathBuf::from(cert.get_ref()), PathBuf::from(key.get_ref()));
            Some(crate::tls::Tls::load(&cert, &key, keys).map_err(ConfigError)?)
        }
        (Some(one), None) | (None, Some(one)) => {
            let (set, missing) = if s.tls_cert.is_some() { ("tls_cert", "tls_key") } else { ("tls_key", "tls_cert") };
            return err(format!(
                "server.{set}{}: TLS needs both server.tls_cert and server.tls_key; server.{missing} is missing",
                line_of(source, one.span())
            ));
        }
    };
    Ok(Server {
        tls,
        listen,
        max_request_bytes,
        shutdown_grace,
        drain_delay,
        body_timeout,
        list_wildcards: mode == ListingMode::AsIs,
        cors_allowed_origins,
        allowed_hosts,
        open,
        header_read_timeout,
        idle_timeout,
        send_timeout,
        h2_keepalive,
        max_connections,
        max_request_head_bytes,
        max_buffered_request_bytes,
    })
}

/// A positive number of seconds from a spanned key; errors name the key and its line.
fn spanned_secs(
    key: &str,
    v: &Option<toml::Spanned<f64>>,
    default: f64,
    source: Option<&str>,
) -> Result<Duration, ConfigError> {
    let line = v.as_ref().map_or(String::new(), |v| line_of(source, v.span()));
    secs(&format!("{key}{line}"), v.as_ref().map(|v| *v.get_ref()), default, false)
}

/// A whole number of at least `min` from a spanned key; errors name the key and its line.
pub(crate) fn count(
    key: &str,
    v: &Option<toml::Spanned<i64>>,
    default: usize,
    min: usize,
    source: Option<&str>,
) -> Result<usize, ConfigError> {
    let Some(v) = v else { return Ok(default) };
    match usize::try_from(*v.get_ref()) {
        Ok(n) if n >= min => Ok(n),
        _ => err(format!(
            "{key}{}: `{}` must be a whole number of at least {min}",
            line_of(source, v.span()),
            v.get_ref()
        )),
    }
}

/// `, line N` for a span of the file, when the file's text is known.
pub(crate) fn line_of(source: Option<&str>, span: std::ops::Range<usize>) -> String {
    source
        .and_then(|t| t.get(..span.start))
        .map_or(String::new(), |before| format!(" (line {})", before.matches('\n').count() + 1))
}

/// Whether `s` is a serialised origin: `http` or `https`, `://`, a host and an optional port,
/// nothing after (<https://html.spec.whatwg.org/multipage/browsers.html#ascii-serialisation-of-an-origin>).
fn is_origin(s: &str) -> bool {
    let Some(rest) = s.strip_prefix("https://").or_else(|| s.strip_prefix("http://")) else { return false };
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || rest.starts_with('[') => (h, Some(p)),
        _ => (rest, None),
    };
    !host.is_empty()
        && !host.contains(['/', '?', '#', '@', ' '])
        && port.is_none_or(|p| !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()))
}

fn secs(key: &str, v: Option<f64>, default: f64, zero_ok: bool) -> Result<Duration, ConfigError> {
    let v = v.unwrap_or(default);
    if !v.is_finite() || v < 0.0 || (v == 0.0 && !zero_ok) || v > 1e9 {
        return err(format!("{key}: `{v}` must be a positive number of seconds"));
    }
    Ok(Duration::from_secs_f64(v))
}

/// Resolves `env:NAME` through `env`; other text is literal. `Err(NAME)` when unset.
fn resolve(value: &str, env: Env) -> Result<String, String> {
    match value.strip_prefix("env:") {
        Some(var) => env(var.trim()).ok_or_else(|| var.trim().to_owned()),
        None => Ok(value.to_owned()),
    }
}

fn compile_connection(
    name: &str,
    c: &RawConnection,
    env: Env,
    source: Option<&str>,
    warnings: &mut Vec<String>,
) -> Result<Connection, ConfigError> {
    if name.is_empty() || name.contains('.') {
        return err(format!("connections.{name}: a connection name may not be empty or contain `.`"));
    }
    let key = |k: &str| format!("connections.{name}.{k}");
    let timeouts = Timeouts {
        connect: secs(&key("connect_timeout_secs"), c.connect_timeout_secs, 10.0, false)?,
        header: secs(&key("header_timeout_secs"), c.header_timeout_secs, 600.0, false)?,
        idle: secs(&key("idle_timeout_secs"), c.idle_timeout_secs, 300.0, false)?,
        first_token: match &c.first_token_timeout_secs {
            None => None,
            v => Some(spanned_secs(&key("first_token_timeout_secs"), v, 0.0, source)?),
        },
    };
    if let Some((k, owners)) = c.provider_keys().find(|(_, owners)| !owners.contains(&c.api_type)) {
        let owners: Vec<&str> = owners.iter().map(|o| o.name()).collect();
        return err(format!(
            "{}: `{k}` is for {} connections, not {}",
            key(k),
            owners.join(" and "),
            c.api_type.name()
        ));
    }
    let prefix = format!("connections.{name}.");
    let limits = limits::rates(&prefix, "", [&c.rpm, &c.tpm, &c.max_concurrent], source)?;
    let default_max_tokens =
        count(&key("default_max_tokens"), &c.default_max_tokens, DEFAULT_MAX_TOKENS, 1, source)? as u64;
    if c.embeddings.is_some() && !matches!(c.api_type, ApiType::Openai | ApiType::Azure | ApiType::Mock) {
        return err(format!(
            "{}: splitting and converting embeddings is for OpenAI-compatible connections (openai, azure, mock), not {}",
            key("embeddings"),
            c.api_type.name()
        ));
    }
    let embeddings = crate::embed::compile(name, c.embeddings.as_ref(), source)?;
    let mut secrets = Secrets { env, name, source, disabled: None };
    let (provider, mut headers) = Provider::compile(c.api_type, name, c, &mut secrets)?;
    for (h, v) in &c.headers {
        let hname = HeaderName::try_from(h.as_str())
            .map_err(|_| ConfigError(format!("{}: `{h}` is not a header name", key("headers"))))?;
        if let Some(v) = secrets.resolve(format!("{}.{h}", key("headers")), v) {
            let v = header_value(&format!("{}.{h}", key("headers")), &v)?;
            headers.retain(|(n, _)| *n != hname);
            headers.push((hname, v));
        }
    }
    if let Some(ca) = &c.ca_file {
        if !ca.is_file() {
            return err(format!("{}: `{}` is not a readable file", key("ca_file"), ca.display()));
        }
    }
    let disabled = secrets.disabled;
    if let Some(why) = &disabled {
        warnings.push(format!("connection `{name}` is disabled: {why}"));
    }
    Ok(Connection {
        name: name.to_owned(),
        provider,
        headers,
        disabled,
        http2: c.http2,
        ca_file: c.ca_file.clone(),
        timeouts,
        forward_headers: c.forward_headers.iter().map(|h| Pattern::new(&h.to_ascii_lowercase())).collect(),
        limits,
        default_max_tokens,
        embeddings,
    })
}

/// A header value marked sensitive, so it never prints (`Debug` shows `Sensitive`).
pub fn header_value(key: &str, v: &str) -> Result<HeaderValue, ConfigError> {
    let mut v = HeaderValue::try_from(v).map_err(|_| ConfigError(format!("{key}: not a valid header value")))?;
    v.set_sensitive(true);
    Ok(v)
}

/// `base` (an http or https URL with a host and no query) followed by `path`; errors name `key`.
/// Errors quote the URL with any credentials in it (`user:pass@`, a query) masked.
pub fn endpoint_url(key: &str, base: &str, path: &str) -> Result<Uri, ConfigError> {
    let base = base.trim().trim_end_matches('/');
    let shown = redact_url(base);
    let parsed: Uri = base.parse().map_err(|_| ConfigError(format!("{key}: `{shown}` is not a URL")))?;
    if !matches!(parsed.scheme_str(), Some("http" | "https")) || parsed.host().is_none() {
        return err(format!("{key}: `{shown}` must be an http:// or https:// URL with a host"));
    }
    if parsed.authority().is_some_and(|a| a.as_str().contains('@')) {
        return err(format!(
            "{key}: `{shown}` has credentials in it: put the key in api_key (or headers), where it is kept secret"
        ));
    }
    if parsed.query().is_some() {
        return err(format!("{key}: `{shown}` may not have a query string"));
    }
    format!("{base}{path}").parse().map_err(|_| ConfigError(format!("{key}: `{shown}` is not a URL")))
}

/// `url` with anything that may be a credential masked: the user information before `@` in the
/// authority, and the query.
pub fn redact_url(url: &str) -> String {
    let (head, query) = match url.split_once('?') {
        Some((h, _)) => (h, "?***"),
        None => (url, ""),
    };
    let (scheme, rest) = head.split_once("://").unwrap_or(("", head));
    let (authority, path) = rest.find('/').map_or((rest, ""), |i| rest.split_at(i));
    let authority = match authority.rsplit_once('@') {
        Some((_, host)) => format!("***@{host}"),
        None => authority.to_owned(),
    };
    let sep = if scheme.is_empty() { "" } else { "://" };
    format!("{scheme}{sep}{authority}{path}{query}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k: &str| map.get(k).cloned()
    }

    fn parse(text: &str, pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::parse(text, &env_of(pairs))
    }

    #[test]
    fn shipped_config_parses_without_any_key() {
        let text = include_str!("../../config.toml");
        let cfg = parse(text, &[]).unwrap();
        assert!(cfg.open_group.is_some());
        assert_eq!(cfg.server.drain_delay, Duration::ZERO, "the default keeps today's shutdown");
        let openai = cfg.connections.iter().find(|c| c.name == "openai").unwrap();
        assert!(openai.disabled.as_deref().unwrap().contains("OPENAI_API_KEY"));
        let anthropic = cfg.connections.iter().find(|c| c.name == "anthropic").unwrap();
        assert!(anthropic.disabled.as_deref().unwrap().contains("ANTHROPIC_API_KEY"));
        let cfg = parse(text, &[("OPENAI_API_KEY", "sk-x"), ("ANTHROPIC_API_KEY", "sk-ant")]).unwrap();
        assert!(cfg.connections.iter().all(|c| c.disabled.is_none()));
    }

    #[test]
    fn unknown_keys_are_errors_with_a_line() {
        let e = parse("[server]\nlisten = \"127.0.0.1:1\"\nlisen = 3\n", &[]).unwrap_err();
        assert!(e.0.starts_with("line 3, column 1, in [server]: unknown field `lisen`"), "{e}");
        let e = parse("[connections.m]  # comment\napi_type = \"mock\"\n\napi_bse = 1\n", &[]).unwrap_err();
        assert!(e.0.starts_with("line 4, column 1, in [connections.m]: unknown field `api_bse`"), "{e}");
        // A bad table name is reported on its own line, not as a key of the table above.
        let e = parse("[server]\nlisten = \"127.0.0.1:1\"\n[servr]\nx = 1\n", &[]).unwrap_err();
        assert!(e.0.starts_with("line 3, column 2: unknown field `servr`"), "{e}");
    }

    #[test]
    fn lm_proxy_aliases_are_accepted() {
        let cfg = parse(
            "host = \"0.0.0.0\"\nport = 8000\nmodel_listing_mode = \"ignore_wildcards\"\n\
             [connections.o]\napi_type = \"open_ai\"\napi_base = \"https://api.openai.com/v1/\"\napi_key = \"k\"\n\
             [routing]\n\"gpt*\" = \"o.*\"\n[groups.default]\napi_keys = [\"a\"]\nallowed_connections = \"o, \"\n",
            &[],
        )
        .unwrap();
        assert_eq!(cfg.server.listen.to_string(), "0.0.0.0:8000");
        assert!(!cfg.server.list_wildcards);
        let Provider::Openai(openai) = &cfg.connections[0].provider else { panic!("not openai") };
        assert_eq!(openai.uri(crate::provider::Api::Chat).to_string(), "https://api.openai.com/v1/chat/completions");
    }

    #[test]
    fn azure_keys_are_validated_with_their_line() {
        let conn =
            |extra: &str| format!("[connections.az]\napi_type = \"azure\"\n{extra}\n[routing]\n\"*\" = \"az.*\"\n");
        let base = "api_base = \"https://r.openai.azure.com\"";
        for (extra, want) in [
            (base.to_owned(), "connections.az.api_version: required for azure connections"),
            ("api_version = \"v1\"".to_owned(), "connections.az.api_base: required for azure connections"),
            (
                format!("{base}\napi_version = \"2024-13\""),
                "connections.az.api_version (line 4): `2024-13` is neither \"v1\" nor a dated API version",
            ),
            (
                "api_base = \"https://r.openai.azure.com/openai/\"\napi_version = \"v1\"".to_owned(),
                "connections.az.api_base: give the resource's URL without `/openai...`",
            ),
            (
                "api_base = \"https://r.openai.azure.com?x=1\"\napi_version = \"v1\"".to_owned(),
                "connections.az.api_base: `https://r.openai.azure.com?***` may not have a query string",
            ),
            (
                format!("{base}\napi_version = \"v1\"\nanthropic_version = \"x\""),
                "`anthropic_version` is for anthropic connections, not azure",
            ),
        ] {
            let e = parse(&conn(&extra), &[]).unwrap_err();
            assert!(e.0.contains(want), "{extra}: {e}");
        }
        let e = parse("[connections.o]\napi_type = \"openai\"\napi_version = \"v1\"\n", &[]).unwrap_err();
        assert!(e.0.contains("`api_version` is for azure connections, not openai"), "{e}");
        // stream_usage belongs to both OpenAI-dialect providers.
        parse(&conn(&format!("{base}\napi_version = \"2024-10-21\"\nstream_usage = false")), &[]).unwrap();
        // A deployment written in a route is checked when the config loads.
        let bad = format!(
            "[connections.az]\napi_type = \"azure\"\n{base}\napi_version = \"2024-10-21\"\n\
             [routing]\n\"m\" = \"az.dep/../x\"\n"
        );
        let e = parse(&bad, &[]).unwrap_err();
        assert!(e.0.contains("routing.\"m\" (line 6)") && e.0.contains("not an Azure OpenAI deployment name"), "{e}");
        // ...but not for the v1 API, where the model goes in the body.
        parse(&bad.replace("2024-10-21", "v1"), &[]).unwrap();
    }

    #[test]
    fn ollama_connections_default_to_the_local_server_and_refuse_other_providers_keys() {
        let cfg = parse("[connections.l]\napi_type = \"ollama\"\n[routing]\n\"llama*\" = \"l.*\"\n", &[]).unwrap();
        assert_eq!(cfg.connections[0].provider.base_url(), Some("http://127.0.0.1:11434"));
        assert!(cfg.connections[0].headers.is_empty(), "no key, no Authorization header");
        for key in ["stream_usage = false", "api_version = \"v1\""] {
            let e = parse(&format!("[connections.l]\napi_type = \"ollama\"\n{key}\n"), &[]).unwrap_err();
            assert!(e.0.contains("connections, not ollama"), "{key}: {e}");
        }
        let e = parse("[connections.l]\napi_type = \"ollama\"\napi_base = \"ftp://x\"\n", &[]).unwrap_err();
        assert!(e.0.contains("connections.l.api_base"), "{e}");
    }

    #[test]
    fn gemini_connections_need_a_key_and_check_route_models() {
        let e = parse("[connections.g]\napi_type = \"gemini\"\n", &[]).unwrap_err();
        assert!(e.0.contains("connections.g.api_key: a gemini connection needs a key"), "{e}");
        let cfg = parse("[connections.g]\napi_type = \"gemini\"\napi_key = \"k\"\n", &[]).unwrap();
        assert_eq!(cfg.connections[0].provider.base_url(), Some("https://generativelanguage.googleapis.com"));
        assert_eq!(cfg.connections[0].headers[0].0.as_str(), "x-goog-api-key");
        let e = parse(
            "[connections.g]\napi_type = \"gemini\"\napi_key = \"k\"\n[routing]\n\"m\" = \"g.models/x?key=1\"\n",
            &[],
        )
        .unwrap_err();
        assert!(e.0.contains("not a Gemini model name"), "{e}");
        let e =
            parse("[connections.g]\napi_type = \"gemini\"\napi_key = \"k\"\nstream_usage = true\n", &[]).unwrap_err();
        assert!(e.0.contains("not gemini"), "{e}");
    }

    #[test]
    fn python_only_keys_explain_the_alternative() {
        let e = parse("api_key_check = \"my.fn\"\n", &[]).unwrap_err();
        assert!(e.0.contains("api_keys"), "{e}");
        let e = parse("[[loggers]]\nclass = \"x\"\n", &[]).unwrap_err();
        assert!(e.0.contains("--log-format"), "{e}");
    }

    #[test]
    fn missing_connection_key_disables_it_without_printing_values() {
        let cfg =
            parse("[connections.o]\napi_type = \"openai\"\napi_key = \"env:NOPE\"\n[routing]\n\"*\" = \"o.*\"\n", &[])
                .unwrap();
        assert_eq!(
            cfg.connections[0].disabled.as_deref(),
            Some("environment variable `NOPE` (for connections.o.api_key) is not set")
        );
        assert_eq!(cfg.warnings.len(), 2); // disabled + open
    }

    #[test]
    fn missing_group_key_variable_is_a_startup_error() {
        let e = parse("[groups.g]\napi_keys = [\"env:CLIENT_KEY\"]\n", &[]).unwrap_err();
        assert!(e.0.contains("groups.g.api_keys[0]") && e.0.contains("CLIENT_KEY"), "{e}");
        let cfg = parse("[groups.g]\napi_keys = [\"env:CLIENT_KEY\"]\n", &[("CLIENT_KEY", "s3")]).unwrap();
        assert_eq!(cfg.keys.group_of("s3"), Some(0));
        assert!(cfg.open_group.is_none());
    }

    #[test]
    fn routing_to_unknown_connection_is_an_error() {
        let e = parse("[connections.a]\napi_type = \"mock\"\n[routing]\n\"x\" = \"b.y\"\n", &[]).unwrap_err();
        assert!(e.0.contains("routing.\"x\"") && e.0.contains("`b`"), "{e}");
        let e = parse("[connections.a]\napi_type = \"mock\"\n[routing]\n\"x\" = \"a\"\n", &[]).unwrap_err();
        assert!(e.0.contains("connection.model"), "{e}");
    }

    #[test]
    fn connection_limits_have_defaults_and_bad_values_name_the_key_and_line() {
        let cfg = parse("", &[]).unwrap();
        let s = &cfg.server;
        assert_eq!(
            (s.header_read_timeout, s.idle_timeout, s.send_timeout),
            (Duration::from_secs(30), Duration::from_secs(120), Duration::from_secs(60))
        );
        assert_eq!((s.max_connections, s.max_request_head_bytes), (10_000, 64 << 10));
        assert_eq!(s.max_buffered_request_bytes, 512 << 20);
        for (line, key) in [
            ("header_read_timeout_secs = 0", "server.header_read_timeout_secs (line 3)"),
            ("idle_timeout_secs = -1", "server.idle_timeout_secs (line 3)"),
            ("send_timeout_secs = 0", "server.send_timeout_secs (line 3)"),
            ("h2_keepalive_secs = 0", "server.h2_keepalive_secs (line 3)"),
            ("max_connections = 0", "server.max_connections (line 3)"),
            ("max_request_head_bytes = 4096", "server.max_request_head_bytes (line 3)"),
            ("max_buffered_request_mb = -5", "server.max_buffered_request_mb (line 3)"),
        ] {
            let e = parse(&format!("[server]\n\n{line}\n"), &[]).unwrap_err();
            assert!(e.0.starts_with(key), "{line}: {e}");
        }
        // A budget smaller than one allowed request contradicts max_request_bytes.
        let e = parse("[server]\nmax_request_bytes = 8388608\nmax_buffered_request_mb = 4\n", &[]).unwrap_err();
        assert!(e.0.starts_with("server.max_buffered_request_mb (line 3)") && e.0.contains("max_request_bytes"), "{e}");
    }

    #[test]
    fn summary_never_shows_secrets() {
        let cfg = parse(
            "[connections.o]\napi_type = \"openai\"\napi_key = \"sk-very-secret\"\nheaders = { OpenAI-Organization = \"org-secret\" }\n\
             [routing]\n\"*\" = \"o.*\"\n[groups.g]\napi_keys = [\"client-secret\"]\n",
            &[],
        )
        .unwrap();
        let s = cfg.summary();
        assert!(!s.contains("secret"), "{s}");
        assert!(s.contains("key: set"), "{s}");
        assert!(format!("{cfg:?}").find("sk-very-secret").is_none());
    }

    #[test]
    fn anthropic_connections_get_their_headers_and_url() {
        let cfg = parse(
            "[connections.a]\napi_type = \"anthropic\"\napi_key = \"env:AK\"\ndefault_max_tokens = 100\n",
            &[("AK", "sk-ant")],
        )
        .unwrap();
        let c = &cfg.connections[0];
        let Provider::Anthropic(a) = &c.provider else { panic!("not anthropic") };
        assert_eq!(a.messages.to_string(), "https://api.anthropic.com/v1/messages");
        assert!(c.headers.iter().any(|(n, v)| n == "x-api-key" && v == "sk-ant"));
        assert!(c.headers.iter().any(|(n, v)| n == "anthropic-version" && v == "2023-06-01"));
        assert_eq!(c.default_max_tokens, 100);
        // Every connection has one now (limits reserve it); 4096 unless set.
        let o = parse("[connections.o]\napi_type = \"openai\"\n", &[]).unwrap();
        assert_eq!(o.connections[0].default_max_tokens, 4096);
        let e = parse("[connections.A]\napi_type = \"anthropic\"\napi_key = \"k\"\nstream_usage = false\n", &[])
            .unwrap_err();
        assert_eq!(
            e.0,
            "connections.A.stream_usage: `stream_usage` is for openai and azure connections, not anthropic"
        );
        let e = parse("[connections.m]\napi_type = \"mock\"\nanthropic_version = \"x\"\n", &[]).unwrap_err();
        assert!(e.0.contains("is for anthropic connections, not mock"), "{e}");
    }

    #[test]
    fn api_base_credentials_are_refused_and_never_shown() {
        for (base, why) in [
            ("https://user:sk-secret@api.example.com/v1", "credentials"),
            ("https://api.example.com/v1?key=sk-secret", "query string"),
            ("https://sk-secret@api.example.com/v1", "credentials"),
        ] {
            let e =
                parse(&format!("[connections.o]\napi_type = \"openai\"\napi_base = \"{base}\"\n"), &[]).unwrap_err();
            assert!(e.0.contains("connections.o.api_base") && e.0.contains(why), "{e}");
            assert!(!e.0.contains("sk-secret"), "{e}");
        }
        // From the environment too: the error names the key, never the value.
        let e = parse(
            "[connections.o]\napi_type = \"openai\"\napi_base = \"env:BASE\"\n",
            &[("BASE", "https://u:sk-secret@h.example/v1")],
        )
        .unwrap_err();
        assert!(!e.0.contains("sk-secret"), "{e}");
        assert_eq!(redact_url("https://u:p@h:1/v1?k=s"), "https://***@h:1/v1?***");
        assert_eq!(redact_url("http://h/v1"), "http://h/v1");
    }

    #[test]
    fn bad_values_name_their_key() {
        let e = parse("[connections.o]\napi_type = \"openai\"\napi_base = \"ftp://x\"\n", &[]).unwrap_err();
        assert!(e.0.contains("connections.o.api_base"), "{e}");
        let e = parse("[connections.o]\napi_type = \"mock\"\nidle_timeout_secs = -1\n", &[]).unwrap_err();
        assert!(e.0.contains("connections.o.idle_timeout_secs"), "{e}");
        let e = parse("[server]\ndrain_delay_secs = -1\n", &[]).unwrap_err();
        assert!(e.0.contains("server.drain_delay_secs"), "{e}");
        let e = parse("[connections.o]\napi_type = \"gopher\"\n", &[]).unwrap_err();
        assert!(e.0.contains("gopher") && e.0.contains("line 2"), "{e}");
    }

    #[test]
    fn open_mode_off_loopback_must_be_asked_for_and_cannot_be_mixed_with_keys() {
        let e = parse("[server]\nlisten = \"0.0.0.0:4000\"\n", &[]).unwrap_err();
        assert!(e.0.starts_with("server.listen: no client keys") && e.0.contains("open = true"), "{e}");
        let cfg = parse("[server]\nlisten = \"0.0.0.0:4000\"\nopen = true\n", &[]).unwrap();
        assert!(cfg.server.open && cfg.open_group.is_some());
        assert!(parse("[server]\nlisten = \"127.0.0.1:4000\"\n", &[]).is_ok(), "open on loopback needs nothing");
        let e = parse("[server]\nlisten = \"0.0.0.0:4000\"\n\nopen = true\n[groups.g]\napi_keys = [\"k\"]\n", &[])
            .unwrap_err();
        assert_eq!(e.0, "server.open (line 4): `open = true` contradicts the client keys in [groups]: remove one");
    }

    #[test]
    fn cors_origins_and_allowed_hosts_are_validated_with_their_line() {
        let cfg = parse(
            "[server]\ncors_allowed_origins = [\"https://app.example.com\", \"http://localhost:5173\", \"http://[::1]:3000\"]\n\
             allowed_hosts = [\"gw.internal\", \"*\"]\n",
            &[],
        )
        .unwrap();
        assert_eq!(cfg.server.cors_allowed_origins.len(), 3);
        assert_eq!(cfg.server.allowed_hosts, ["gw.internal", "*"]);
        for bad in [
            "*",
            "https://app.example.com/",
            "app.example.com",
            "ftp://x",
            "https://",
            "https://a:99999x",
            "https://a/b",
        ] {
            let e = parse(&format!("[server]\n\ncors_allowed_origins = [\"https://ok.example\", \"{bad}\"]\n"), &[])
                .unwrap_err();
            assert!(e.0.starts_with("server.cors_allowed_origins[1] (line 3): "), "{bad}: {e}");
        }
        for bad in ["", "http://x", "x:80", "a b"] {
            let e = parse(&format!("[server]\nallowed_hosts = [\"{bad}\"]\n"), &[]).unwrap_err();
            assert!(e.0.starts_with("server.allowed_hosts[0] (line 2): "), "{bad:?}: {e}");
        }
    }

    #[test]
    fn tls_needs_both_files_and_bad_files_name_the_key_and_line() {
        let e = parse("[server]\ntls_key = \"/nonexistent/key.pem\"\n", &[]).unwrap_err();
        assert!(e.0.contains("server.tls_key (line 2): TLS needs both") && e.0.contains("tls_cert is missing"), "{e}");
        let both = "[server]\ntls_cert = \"/nonexistent/cert.pem\"\ntls_key = \"/nonexistent/key.pem\"\n";
        let e = parse(both, &[]).unwrap_err();
        assert!(e.0.contains("server.tls_cert (line 2): `/nonexistent/cert.pem`: cannot read it"), "{e}");
        let junk = std::env::temp_dir().join(format!("lmgate-junk-{}.pem", std::process::id()));
        std::fs::write(&junk, "not a certificate\nsecret-looking-text\n").unwrap();
        let j = junk.display();
        let e = parse(&format!("[server]\ntls_cert = '{j}'\ntls_key = '{j}'\n"), &[]).unwrap_err();
        assert!(e.0.contains("server.tls_cert (line 2)") && e.0.contains("holds no PEM certificate"), "{e}");
        assert!(!e.0.contains("secret-looking-text"), "{e}");
        let _ = std::fs::remove_file(&junk);
    }

    #[test]
    fn group_lists_accept_strings_and_arrays() {
        let cfg = parse(
            "[connections.a]\napi_type = \"mock\"\n[connections.b]\napi_type = \"mock\"\n\
             [groups.x]\napi_keys = [\"k1\"]\nallowed_connections = \"a,b\"\n\
             [groups.y]\napi_keys = [\"k2\"]\nallowed_connections = [\"b\"]\nallowed_models = [\"m*\"]\n",
            &[],
        )
        .unwrap();
        assert_eq!(cfg.groups[0].connections, vec![true, true]);
        assert_eq!(cfg.groups[1].connections, vec![false, true]);
        assert!(cfg.groups[1].allows(1, "m1") && !cfg.groups[1].allows(1, "n1") && !cfg.groups[1].allows(0, "m1"));
    }
}
