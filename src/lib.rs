//! lmgate: an OpenAI-compatible LLM gateway, a low-level streaming reverse proxy on hyper.
//!
//! # Architecture (read this first)
//!
//! The parts, in request order, and what each owns:
//! - [`server`]: listener (socket2 options, `max_connections`), TLS ([`tls`]: rustls, ALPN),
//!   HTTP/1.1 + h2 connections, the per-connection deadlines (head, idle, send), graceful
//!   shutdown.
//! - [`snapshot`]: one configuration and the upstream transports built for it, swapped whole
//!   ([`proxy::Proxy::reload`], driven by [`reload`]: SIGHUP, `--watch`); each request loads it
//!   once. State that must survive a reload (the mock's cache, pooled targets' health, metric
//!   cells, the request log's writer, limit counters, the embeddings cache) is kept by name.
//! - [`proxy`]: `Proxy::handle` and `Proxy::forward`, the whole request flow top to bottom:
//!   authenticate → read the body → scan → route → the attempt loop → respond.
//! - [`budget`]: the request-body bytes held across all requests (`max_buffered_request_mb`).
//! - [`limit`]: rate limits (GCRA), concurrency and budgets of groups, keys and connections:
//!   admitted between routing and the attempt loop, settled when the record is written; memory
//!   or Redis (one Lua script per admission).
//! - [`embed`]: embeddings inside one attempt: split over an upstream's limits and merged,
//!   encodings converted, the per-input cache, micro-batching, the per-connection bound.
//! - [`auth`]: virtual keys (hashed, constant-time) → the caller: group and a stable key id.
//! - [`json`]: the non-allocating request scanner and splice points; usage extraction.
//! - [`router`]: model patterns → a route: one target (connection + upstream model), or a pool
//!   with its policy (strategy, retries, cooldown, fallbacks).
//! - [`attempt`]: the attempt loop: one attempt for a plain route; for a pool, attempts across
//!   its targets (retries, backoff, Retry-After, cooldowns) and then its fallbacks, never after
//!   the first byte went to the client.
//! - [`pool`]: per-target health (lock-free atomics) and the choice of a target by strategy.
//! - [`provider`]: one enum variant and one file per `api_type`, each answering the same three
//!   questions: **prepare** (the upstream request for an attempt: URI, credential, body),
//!   **classify** (the response head → success, or a failure whose kind says if a retry may
//!   help), **respond** (the client's body: passthrough, translation, the mock's own). Also the
//!   `Translate` trait for stream rewriting and the one OpenAI chunk writer ([`provider::chunk`]).
//! - [`client`]: a transport per connection: a pooled hyper client (rustls, optional h2) or the
//!   in-process mock.
//! - [`body`]: response bodies: passthrough (observed for usage), translated (decoder +
//!   translator + reused buffer), chunks, full; the stream guard that writes the record on drop.
//! - [`sse`]: the WHATWG event-stream decoder, event boundaries for passthrough, NDJSON lines,
//!   the decoder per framing.
//! - [`record`]: one record per request (request id, key id, route, connection, attempts, usage,
//!   timings, error kind and side), written once on drop: the log line, the metrics, the
//!   request-log entry.
//! - [`metrics`]: Prometheus metrics: per-snapshot handles to lock-free cells kept by label
//!   values; the scrape (OpenMetrics text).
//! - [`log`]: the JSON-lines request log: a bounded queue to a writer thread, rotation.
//! - [`config`]: TOML → validated `Config`; `env:` secrets; lm-proxy compatibility; each
//!   provider compiles its own keys; `[metrics]`, `[log]` and `[prices]` ([`config::observe`]).
//! - [`error`]: errors of a closed set of kinds, with side, retry safety and status, rendered
//!   per dialect.
//! - [`bench`]: `lmgate bench`, the load generator and latency meter (closed/open loop,
//!   HDR percentiles, `--compare` against a direct upstream).
//!
//! Where the planned work plugs in: a new provider → one file under [`provider`] and a variant;
//! an Anthropic-shaped front door → an endpoint with its own [`error::Dialect`].
//!
//! Guarantees: the client never chooses where we connect (upstreams come from config only); the
//! client's credentials never go upstream and provider keys never reach a client, a log line or
//! an error; nothing is retried after the first byte went to the client; bad input gets an
//! OpenAI-style error, never a panic.

#![forbid(unsafe_code)]

pub mod attempt;
pub mod auth;
pub mod bench;
pub mod body;
pub mod budget;
pub mod client;
pub mod config;
pub mod embed;
pub mod error;
pub mod json;
pub mod limit;
pub mod log;
pub mod metrics;
pub mod origin;
pub mod pool;
pub mod provider;
pub mod proxy;
pub mod record;
pub mod reload;
pub mod router;
pub mod server;
pub mod snapshot;
pub mod sse;
pub mod tls;
