//! lmgate: an OpenAI-compatible LLM gateway, a low-level streaming reverse proxy on hyper.
//!
//! Crate map, in request order:
//! - [`server`]: listener (socket2 options), HTTP/1.1 + h2c connections, graceful shutdown.
//! - [`proxy`]: `Proxy::handle`, the whole request flow in one function.
//! - [`auth`]: virtual keys (hashed, constant-time) → access group.
//! - [`json`]: the non-allocating request scanner and splice points; usage extraction.
//! - [`router`]: model patterns → connection and upstream model.
//! - [`provider`]: what each `api_type` does: OpenAI-compatible passthrough, Anthropic
//!   translation (request, stream event by event, message, errors), the built-in mock; the
//!   `Translate` trait every translated stream implements.
//! - [`client`]: pooled upstream clients, one per connection (rustls, optional h2).
//! - [`body`]: response bodies: passthrough (observed for usage), translated (decoder +
//!   translator + reused buffer), chunks, full.
//! - [`sse`]: the WHATWG event-stream decoder, event boundaries for passthrough, NDJSON lines.
//! - [`record`]: one log record per request, written once on drop.
//! - [`config`]: TOML → validated `Config`; `env:` secrets; lm-proxy compatibility.
//! - [`error`]: OpenAI-style errors with status and fault side.
//! - [`bench`]: `lmgate bench`, the load generator and latency meter (closed/open loop,
//!   HDR percentiles, `--compare` against a direct upstream).
//!
//! Guarantees: the client never chooses where we connect (upstreams come from config only); the
//! client's credentials never go upstream and provider keys never reach a client, a log line or
//! an error; nothing is retried after the first byte went to the client; bad input gets an
//! OpenAI-style error, never a panic.

#![forbid(unsafe_code)]

pub mod auth;
pub mod bench;
pub mod body;
pub mod client;
pub mod config;
pub mod error;
pub mod json;
pub mod provider;
pub mod proxy;
pub mod record;
pub mod router;
pub mod server;
pub mod sse;
