//! The request flow: [`Proxy::handle`] and [`Proxy::forward`] read top to bottom.
//!
//! ```text
//! load the snapshot (config + transports), once for this request
//! local endpoints (health)               -> answered here
//! auth::check(headers)                   -> 401, one generic body; the caller's group and key id
//! models                                 -> answered from routing, filtered by the group
//! bounded body read (max_request_bytes)  -> 413 (after reading the rest, bounded); body_timeout_secs -> 408
//! json::scan_request: model, stream      -> 400 (malformed, missing, duplicated)
//! router.route(model)                    -> 404; a route: one target, or a pool
//! limits.admit(group, key)               -> 429 + Retry-After (reserve now, settle when the record is written)
//! attempt::run (pool: pick, retry, cool down, fall back; see attempt.rs), per attempt:
//!   group may not / disabled / provider refuses / connection over quota -> target skipped
//!     (403 / 503 / 400 / 429 if all are)
//!   provider.prepare -> transport.send (header_timeout: 504; connect: 502)
//!   -> provider.classify -> provider.respond (passthrough, translation, the mock's body)
//!   -> streams with first_token_timeout_secs: the first body bytes
//! ```
//!
//! Every response carries the request's [`Record`], written once when its body is dropped.
//! Errors render in the endpoint's dialect.

use crate::attempt::{self, Outcome};
use crate::auth::{self, Caller};
use crate::body::{Body, Recorded};
use crate::budget::{Budget, Held};
use crate::config::{Config, ConfigError, Group};
use crate::embed;
use crate::error::{Dialect, Error, Kind};
use crate::json::{self, RequestError, Usage};
use crate::limit::{self, Limits};
use crate::metrics::{self, Metrics};
use crate::origin;
use crate::provider::{mock::Mock, Api, Call, Verdict};
use crate::record::{Holding, Outcome as Ended, Record};
use crate::router::{Pattern, Target};
use crate::snapshot::Snapshot;
use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use std::borrow::Cow;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A non-stream response body up to this size is read whole before its head goes out, so its
/// head can carry `x-lmgate-cost-usd`; a larger one is forwarded as it comes, without.
const MAX_COSTED_BODY: usize = 1 << 20;

/// The longest `x-request-id` kept from a client.
const MAX_REQUEST_ID: usize = 128;

/// An answer: the response, the usage known before its body is sent, and what the upstream
/// request holds until the response is done.
type Answer = (Response<Body>, Option<Usage>, Holding);

/// The gateway: the current snapshot, and the state that outlives snapshots (the mock's), shared
/// by all connections.
pub struct Proxy {
    snapshot: ArcSwap<Snapshot>,
    mock: Arc<Mock>,
    draining: AtomicBool,
    /// Request bodies held across all requests in flight; outlives reloads.
    budget: Budget,
    /// Every metric; outlives reloads.
    metrics: Arc<Metrics>,
    /// Rate limits, concurrency and spend; outlive reloads.
    limits: Limits,
}

/// What a request path names.
enum Endpoint<'a> {
    Api(Api),
    Models,
    Model(&'a str),
    Live,
    Ready,
    Metrics,
}

impl Endpoint<'_> {
    fn name(&self) -> &'static str {
        match self {
            Endpoint::Api(api) => api.name(),
            Endpoint::Models | Endpoint::Model(_) => "models",
            Endpoint::Live | Endpoint::Ready => "health",
            Endpoint::Metrics => "metrics",
        }
    }
}

/// Maps method and path to an endpoint; the `/v1` prefix is optional. `metrics` is the scrape
/// path when the main listener serves it.
fn endpoint<'a>(method: &Method, path: &'a str, metrics: Option<&str>) -> Result<Endpoint<'a>, Error> {
    if metrics == Some(path) {
        return match *method {
            Method::GET | Method::HEAD => Ok(Endpoint::Metrics),
            _ => Err(Error::method_not_allowed(method, path)),
        };
    }
    let p = path.strip_prefix("/v1").filter(|p| p.starts_with('/')).unwrap_or(path);
    let (e, want) = match p.trim_end_matches('/') {
        "/chat/completions" => (Endpoint::Api(Api::Chat), Method::POST),
        "/completions" => (Endpoint::Api(Api::Completions), Method::POST),
        "/embeddings" => (Endpoint::Api(Api::Embeddings), Method::POST),
        "/models" => (Endpoint::Models, Method::GET),
        "/health/live" | "/health" => (Endpoint::Live, Method::GET),
        "/health/ready" => (Endpoint::Ready, Method::GET),
        other => match other.strip_prefix("/models/") {
            Some(id) if !id.is_empty() => (Endpoint::Model(id), Method::GET),
            _ => return Err(Error::unknown_route(method, path)),
        },
    };
    if *method != want && !(want == Method::GET && *method == Method::HEAD) {
        return Err(Error::method_not_allowed(method, path));
    }
    Ok(e)
}

impl Proxy {
    /// Builds the proxy and one upstream transport per connection.
    pub fn new(config: Config) -> Result<Self, ConfigError> {
        let mock = Arc::new(Mock::default());
        let metrics = Arc::new(Metrics::default());
        let limits = Limits::new(&config).map_err(ConfigError)?;
        let mut snapshot = Snapshot::new(config, &mock, None, &metrics)?;
        snapshot.limits = limits.bind(&snapshot.config);
        Ok(Proxy {
            snapshot: ArcSwap::from_pointee(snapshot),
            mock,
            draining: AtomicBool::new(false),
            budget: Budget::default(),
            metrics,
            limits,
        })
    }

    /// The configuration in use.
    pub fn config(&self) -> Arc<Config> {
        self.snapshot.load().config.clone()
    }

    /// Replaces the configuration atomically. Requests in flight finish on the snapshot they
    /// started with; connections whose transport is unchanged keep their pools.
    pub fn reload(&self, config: Config) -> Result<(), ConfigError> {
        if !self.limits.compatible(&config) {
            return Err(ConfigError("limits: [limits] only takes effect on a restart".into()));
        }
        let previous = self.snapshot.load_full();
        let mut next = Snapshot::new(config, &self.mock, Some(&previous), &self.metrics)?;
        next.limits = self.limits.bind(&next.config);
        self.snapshot.store(Arc::new(next));
        Ok(())
    }

    /// The snapshot requests are served from now.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// The gateway's metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The scrape: `/metrics` in the OpenMetrics text format.
    pub fn scrape(&self) -> Response<Body> {
        let text = self.metrics.render(self.snapshot.load().config.clone());
        let mut r = Response::new(Body::full(text));
        r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(metrics::CONTENT_TYPE));
        r
    }

    /// Waits (bounded) until the request log has written every record made so far.
    pub fn flush_log(&self, within: Duration) {
        if let Some(log) = &self.snapshot.load().log {
            log.flush(within);
        }
    }

    /// The limits' counters.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Marks the gateway as shutting down: `/health/ready` answers 503 from now on.
    pub fn drain(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// Answers one request. Never fails: errors become error responses in the endpoint's dialect.
    pub async fn handle<B>(&self, req: Request<B>) -> Response<Recorded>
    where
        B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: std::error::Error + Send + Sync + 'static,
    {
        let snap = self.snapshot.load_full();
        let (mut parts, body) = req.into_parts();
        let request_id = request_id(&mut parts.headers);
        let m = &snap.config.metrics;
        let scrape_here = (m.enabled && m.listen.is_none()).then_some(m.path.as_str());
        let ep = endpoint(&parts.method, parts.uri.path(), scrape_here);
        let name = ep.as_ref().map_or("unknown", Endpoint::name);
        let dialect = match &ep {
            Ok(Endpoint::Api(api)) => api.dialect(),
            _ => Dialect::Openai,
        };
        let mut record = Record::new(snap.clone(), parts.method.clone(), parts.uri.clone(), name, request_id.clone());
        let cfg = &*snap.config;
        // Browser origins and, when open on loopback, the Host: before anything else but health.
        let health = matches!(ep, Ok(Endpoint::Live | Endpoint::Ready));
        let from = if health {
            Ok(None)
        } else {
            origin::check(&cfg.server, cfg.open_group.is_some(), &parts.uri, &parts.headers)
        };
        let preflight = origin::is_preflight(&parts.method, &parts.headers);
        let browser = from.as_ref().ok().cloned().flatten();
        // The one 401 check, for every endpoint that needs a key.
        let caller = || auth::check(&cfg.keys, cfg.open_group, &parts.headers).ok_or_else(Error::unauthorized);
        let result = match (from, ep) {
            (Err(e), _) => Err(e),
            // A preflight carries no key: it is answered for an allowed origin, before auth.
            (Ok(Some(o)), _) if preflight => Ok(origin::preflight(o, &parts.headers)),
            (Ok(_), ep) => match ep {
                Ok(Endpoint::Live) => Ok(json_response(StatusCode::OK, Bytes::from_static(b"{\"status\":\"ok\"}"))),
                Ok(Endpoint::Ready) if self.draining.load(Ordering::Relaxed) => {
                    Ok(json_response(StatusCode::SERVICE_UNAVAILABLE, Bytes::from_static(b"{\"status\":\"draining\"}")))
                }
                Ok(Endpoint::Ready) => Ok(json_response(StatusCode::OK, Bytes::from_static(b"{\"status\":\"ready\"}"))),
                // No key, as Prometheus expects; the README says what it exposes.
                Ok(Endpoint::Metrics) => Ok(self.scrape()),
                Ok(Endpoint::Api(api)) => match caller() {
                    Ok(c) => {
                        record.key = c.key;
                        record.group = Some(c.group);
                        self.forward(&snap, api, c, &parts.headers, body, &mut record).await
                    }
                    Err(e) => Err(e),
                },
                Ok(Endpoint::Models) => caller().and_then(|c| models(cfg, c, None)),
                Ok(Endpoint::Model(id)) => caller().and_then(|c| models(cfg, c, Some(id))),
                Err(e) => Err(e),
            },
        };
        let mut response = match result {
            Ok(r) => r,
            Err(e) => {
                let mut response = json_response(e.status, e.render(dialect));
                if let Some(wait) = e.retry_after {
                    let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
                    response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
                }
                if e.code == Some("insufficient_quota") {
                    // The SDKs retry a 429 unless told not to; a spent budget does not come back soon.
                    response.headers_mut().insert("x-should-retry", HeaderValue::from_static("false"));
                }
                record.outcome = Ended::Complete;
                record.error = Some(e);
                response
            }
        };
        let headers = response.headers_mut();
        if let Some(quota) = &record.quota {
            limit::set_headers(headers, quota);
        }
        if record.attempts > 1 {
            headers.insert("x-lmgate-attempts", HeaderValue::from(record.attempts));
        }
        // Ours is the id the client gets; the upstream's own (its support id) is kept beside it.
        if let Some(theirs) = headers.insert(X_REQUEST_ID, request_id).filter(|t| *t != headers[X_REQUEST_ID]) {
            headers.insert("x-upstream-request-id", theirs);
        }
        if let Some(cost) = record.cost.filter(|_| !record.stream) {
            if let Ok(v) = HeaderValue::from_str(&format!("{cost:.9}")) {
                headers.insert("x-lmgate-cost-usd", v);
            }
        }
        if let Some(o) = browser.filter(|_| !preflight) {
            origin::allow(&mut response, o);
        }
        record.status = response.status().as_u16();
        record.head = Some(Instant::now());
        let (parts, body) = response.into_parts();
        Response::from_parts(parts, body.with_record(record))
    }

    /// The API flow: body, model, route, then the attempt loop over the route's targets.
    async fn forward<B>(
        &self,
        snap: &Snapshot,
        api: Api,
        caller: Caller,
        headers: &HeaderMap,
        body: B,
        record: &mut Record,
    ) -> Result<Response<Body>, Error>
    where
        B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: std::error::Error + Send + Sync + 'static,
    {
        let cfg = &*snap.config;
        let limit = cfg.server.max_request_bytes;
        let declared = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        let mut body = body;
        if declared.is_some_and(|n| n > limit as u64) {
            // A client waiting for `100 Continue` sends nothing more: it reads the 413 at once.
            if headers.get(header::EXPECT).is_none() {
                linger(body, cfg.server.body_timeout);
            }
            return Err(Error::too_large(limit));
        }
        // Bounded in size, in time (a client trickling its body cannot hold a connection) and in
        // memory across all requests (the bytes stay held until this request is done with them).
        let mut held = self.budget.none();
        let body = match read_body(&mut body, declared, &cfg.server, &mut held).await {
            Ok(b) => b,
            Err(e) => {
                if e.kind == Kind::TooLarge {
                    linger(body, cfg.server.body_timeout);
                }
                return Err(e);
            }
        };

        let fields = json::scan_request(&body).map_err(|e| match e {
            RequestError::Syntax(e) => Error::invalid_request(format!("The request body is not valid JSON: {e}.")),
            RequestError::Duplicate(k) => {
                Error::invalid_request(format!("The request body has more than one `{k}` member.")).param(k)
            }
        })?;
        let model = fields
            .model
            .as_ref()
            .and_then(|r| json::string_value(&body[r.clone()]))
            .filter(|m| !m.is_empty())
            .ok_or_else(|| {
                Error::invalid_request("You must provide a model parameter (a non-empty string).").param("model")
            })?;
        let stream = match fields.stream.as_ref().map(|r| &body[r.clone()]) {
            None | Some(b"false" | b"null") => false,
            Some(b"true") => true,
            Some(_) => return Err(Error::invalid_request("`stream` must be a boolean.").param("stream")),
        };
        record.model = Some(model.clone());
        record.bytes_in = body.len() as u64;
        record.stream = stream;
        required_member(api, &fields, &body)?;

        let route = cfg.router.route(&model).ok_or_else(|| Error::model_not_found(&model))?;
        record.route = Some(route.id);
        let group = &cfg.groups[caller.group];
        let estimate = limit::Estimate::new(api, &fields, &body);
        // A group or key with limits: admitted (tokens and cost reserved) or refused here, and
        // its standing goes out in the x-ratelimit-* headers either way.
        if snap.limits.admits(caller) {
            let ask = estimate.ask(snap, route, &model, caller.group)?;
            match self.limits.admit(&snap.limits, caller, ask).await {
                Ok((admission, quota)) => {
                    record.admission = admission;
                    record.quota = Some(quota);
                }
                Err(denied) => {
                    record.quota = denied.quota();
                    return Err(denied.error());
                }
            }
        }
        let call = Call { api, body: &body, fields: &fields, model: &model, fallback: false, stream, headers };
        let waited = AtomicU64::new(0);
        let limits = &self.limits;
        let run = attempt::run(&cfg.router, route, &model, |target, name| {
            let call = Call { model: name, fallback: name != call.model, ..call };
            Self::attempt(snap, group, call, target, &waited, (limits, &estimate))
        })
        .await;
        record.upstream_wait = Duration::from_nanos(waited.load(Ordering::Relaxed));
        record.target = run.target;
        if let Some((r, t)) = run.target {
            let target = &cfg.router.routes()[r].targets[t];
            record.connection = Some(target.connection);
            record.upstream_model = Some(target.model.as_ref().map_or_else(|| model.clone(), |m| m.name.clone()));
        }
        record.attempts = run.attempts;
        record.retried = run.failed;
        record.lease = run.lease;
        let (response, usage, held) = run.result?;
        record.upstream = held;
        record.usage = usage.or(record.usage);
        if !stream {
            record.price_usage();
        }
        Ok(response)
    }

    /// One attempt at `target`: may the caller use it (else skipped), then prepare (a request
    /// the provider refuses outright skips the target) → send → classify → respond, and for a
    /// stream on a connection with `first_token_timeout_secs`, its first bytes.
    async fn attempt(
        snap: &Snapshot,
        group: &Group,
        call: Call<'_>,
        target: &Target,
        waited: &AtomicU64,
        (limits, estimate): (&Limits, &limit::Estimate),
    ) -> Outcome<Answer> {
        let Some((conn, transport)) = snap.connection(target.connection) else {
            return Outcome::Skip(Error::unavailable("The route names an unknown connection."));
        };
        if let Some(why) = &conn.disabled {
            return Outcome::Skip(Error::unavailable(format!("Connection `{}` is disabled: {why}.", conn.name)));
        }
        if !group.allows(target.connection, call.model) {
            let message = format!("Your key (group `{}`) may not use model `{}`.", group.name, call.model);
            return Outcome::Skip(Error::forbidden(message));
        }
        let provider = &conn.provider;
        // Embeddings over the connection's limits, or in an encoding it cannot give, are split
        // and converted (embed.rs); any other request goes as the provider prepares it.
        let work = match call.api {
            Api::Embeddings if provider.speaks_openai() => {
                // `cache-control: no-cache` bypasses the cache: nothing read from it, nothing stored.
                let fresh =
                    call.headers.get(header::CACHE_CONTROL).is_some_and(|v| v.as_bytes().starts_with(b"no-cache"));
                let cache = snap.embeddings_cache.as_ref().filter(|_| !fresh);
                let cache = cache.map(|c| (c, conn.name.as_str(), target.upstream_model(call.model)));
                match embed::plan(&conn.embeddings, call.body, call.fields, cache) {
                    Ok(work) => work,
                    Err(e) => return Outcome::Skip(e),
                }
            }
            _ => None,
        };
        // Either the provider's one request, or embed.rs's work.
        let prepared = match work {
            Some(work) => Err(work),
            None => match provider.prepare(conn, &call, target) {
                Ok(p) => Ok(p),
                Err(e) => return Outcome::Skip(e),
            },
        };
        // The upstream's quota: over it, the target is skipped as if it were cooling down.
        // (Embeddings sent by embed.rs admit each of their upstream requests.)
        let quota =
            snap.limits.connection_limited(target.connection).then_some((limits, &snap.limits, target.connection));
        let admission = if quota.is_some() && prepared.is_ok() {
            match limits.admit_connection(&snap.limits, target.connection, estimate.on(conn)).await {
                Ok(a) => a,
                Err(denied) => return Outcome::Skip(denied.error()),
            }
        } else {
            None
        };
        let upstream = snap.metrics.upstream(target.connection);
        let mut held = Holding { in_flight: upstream.map(|u| u.start()), admission, slot: None };
        let sent = Instant::now();
        let outcome = async move {
            let prepared = match prepared {
                Ok(p) => p,
                Err(work) => {
                    let (response, usage) = embed::run((conn, transport, &call, target, quota), work).await?;
                    return Ok(Outcome::Success((response, Some(usage), held)));
                }
            };
            if call.api == Api::Embeddings {
                held.slot = conn.embeddings.slot(&conn.name).await?;
            }
            let plan = prepared.plan;
            let head = transport.send(conn, prepared.request, plan.deadline).await?;
            Ok::<_, Error>(match provider.classify(conn, head, &plan).await {
                Verdict::Success(head) => {
                    let (mut response, mut usage) = provider.respond(conn, head, &plan).await?;
                    let body = response.body_mut();
                    match (plan.stream, conn.timeouts.first_token) {
                        (true, Some(within)) => body.first_bytes(within, &conn.name).await?,
                        (true, None) => {}
                        // Read a small body whole, so its usage (and cost) is known before its head goes out.
                        (false, _) => usage = body.settle(MAX_COSTED_BODY, &conn.name).await?.or(usage),
                    }
                    Outcome::Success((response, usage, held))
                }
                Verdict::Failure { error, relay: Some(head) } => {
                    let relay = provider.respond(conn, head, &plan).await.ok();
                    Outcome::Failure { error, relay: relay.map(|(r, u)| (r, u, held)) }
                }
                Verdict::Failure { error, relay: None } => Outcome::failed(error),
            })
        }
        .await
        .unwrap_or_else(Outcome::failed);
        waited.fetch_add(sent.elapsed().as_nanos() as u64, Ordering::Relaxed);
        if let Some(u) = upstream {
            u.attempted(attempt_outcome(&outcome));
        }
        outcome
    }
}

/// How an attempt went, for `lmgate_upstream_attempts_total`.
fn attempt_outcome(outcome: &Outcome<Answer>) -> metrics::Attempt {
    use metrics::Attempt;
    let class = |status: StatusCode| if status.is_client_error() { Attempt::Status4xx } else { Attempt::Status5xx };
    match outcome {
        Outcome::Success(_) => Attempt::Ok,
        Outcome::Failure { relay: Some((r, ..)), .. } => class(r.status()),
        Outcome::Failure { error, relay: None } => match error.kind {
            Kind::UpstreamUnreachable => Attempt::ConnectError,
            Kind::UpstreamTimeout => Attempt::Timeout,
            Kind::UpstreamStatus | Kind::UpstreamAuth => class(error.status),
            _ => Attempt::Error,
        },
        Outcome::Skip(_) => Attempt::Error,
    }
}

/// The request's id: the client's `x-request-id` when it is sane (visible ASCII, at most
/// [`MAX_REQUEST_ID`] bytes), else a new one (128 random bits, hex), set in `headers` so the
/// providers send it upstream.
fn request_id(headers: &mut HeaderMap) -> HeaderValue {
    let sane = |v: &HeaderValue| {
        let b = v.as_bytes();
        !b.is_empty() && b.len() <= MAX_REQUEST_ID && b.iter().all(|c| c.is_ascii_graphic())
    };
    let mut ids = headers.get_all(X_REQUEST_ID).iter();
    if let (Some(v), None) = (ids.next(), ids.next()) {
        if sane(v) {
            return v.clone();
        }
    }
    let mut hex = [0u8; 32];
    let mut bits = fastrand::u128(..);
    for d in hex.iter_mut().rev() {
        *d = b"0123456789abcdef"[(bits & 0xf) as usize];
        bits >>= 4;
    }
    let id = HeaderValue::from_bytes(&hex).expect("hex digits are a header value");
    headers.insert(X_REQUEST_ID, id.clone());
    id
}

const X_REQUEST_ID: &str = "x-request-id";

/// The member each endpoint cannot do without, checked on the scan's ranges (no second pass): chat
/// needs a non-empty `messages` array, completions a `prompt`, embeddings a non-empty `input`.
/// A request without it could never succeed, so no upstream is asked.
fn required_member(api: Api, fields: &json::RequestFields, body: &[u8]) -> Result<(), Error> {
    let (name, range) = match api {
        Api::Chat => ("messages", &fields.messages),
        Api::Completions => ("prompt", &fields.prompt),
        Api::Embeddings => ("input", &fields.input),
    };
    let value = match range {
        None => return Err(Error::invalid_request(format!("Missing required parameter: '{name}'.")).param(name)),
        Some(r) => &body[r.clone()],
    };
    // `[]`, `[ ]` or `""`: the value holds nothing but white space between its delimiters.
    let empty = matches!(value[0], b'[' | b'"') && value[1..value.len() - 1].iter().all(u8::is_ascii_whitespace);
    let problem = match (api, value[0]) {
        (_, b'n') => Some("null"),
        (Api::Chat, b'[') if empty => Some("an empty array"),
        (Api::Chat, b'[') => None,
        (Api::Chat, _) => Some("not an array"),
        (Api::Embeddings, b'[') if empty => Some("an empty array"),
        (Api::Embeddings, b'"') if value.len() == 2 => Some("an empty string"),
        _ => None,
    };
    match problem {
        None => Ok(()),
        Some(what) => Err(Error::invalid_request(format!(
            "Invalid '{name}': {what}. {}",
            match api {
                Api::Chat => "Expected an array of at least one message.",
                Api::Completions => "Expected a string or an array of strings or tokens.",
                Api::Embeddings => "Expected a non-empty string or a non-empty array of strings or tokens.",
            }
        ))
        .param(name)),
    }
}

/// Reads a request body within `max_request_bytes` (413), the body timeout (408) and the
/// buffered-bytes budget (503 when no room comes free within the body timeout). One frame is
/// kept as it came; more are joined into one buffer.
async fn read_body<B>(
    body: &mut B,
    declared: Option<u64>,
    server: &crate::config::Server,
    held: &mut Held<'_>,
) -> Result<Bytes, Error>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let deadline = tokio::time::Instant::now() + server.body_timeout;
    let limit = server.max_request_bytes;
    let mut first: Option<Bytes> = None;
    let mut joined = bytes::BytesMut::new();
    let mut len = 0;
    loop {
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            Ok(None) => break,
            Ok(Some(Ok(frame))) => frame,
            Ok(Some(Err(_))) => return Err(Error::invalid_request("Could not read the request body.")),
            Err(_) => return Err(Error::body_timeout(server.body_timeout)),
        };
        let Ok(data) = frame.into_data() else { continue };
        len += data.len();
        if len > limit {
            return Err(Error::too_large(limit));
        }
        if !held.take(data.len(), server.max_buffered_request_bytes, deadline).await {
            return Err(Error::busy());
        }
        match &first {
            None => first = Some(data),
            Some(f) => {
                if joined.is_empty() {
                    let expected = declared.map_or(2 * len, |d| d as usize);
                    joined.reserve(expected.min(limit));
                    joined.extend_from_slice(f);
                }
                joined.extend_from_slice(&data);
            }
        }
    }
    Ok(if joined.is_empty() { first.unwrap_or_default() } else { joined.freeze() })
}

/// Reads and discards the rest of a refused (too large) request body while the 413 goes out, for
/// at most [`LINGER`] (or the body timeout, if shorter) and [`LINGER_BYTES`]. Closing a socket
/// with unread data makes the kernel send a reset, and a client still writing its body (urllib,
/// `requests`) then sees "connection reset" or "broken pipe" instead of the 413. Past either
/// bound the body is dropped and the connection closed (nginx's lingering close, bounded the
/// same way). The 413 is not delayed: hyper writes it while this task takes the body.
fn linger<B>(body: B, body_timeout: std::time::Duration)
where
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
{
    tokio::spawn(async move {
        let mut body = body;
        let mut left = LINGER_BYTES;
        let drain = async {
            while let Some(Ok(frame)) = body.frame().await {
                left = left.saturating_sub(frame.data_ref().map_or(0, Bytes::len));
                if left == 0 {
                    return;
                }
            }
        };
        let _ = tokio::time::timeout(LINGER.min(body_timeout), drain).await;
    });
}

/// Bounds on reading a refused body ([`linger`]).
const LINGER: std::time::Duration = std::time::Duration::from_secs(10);
const LINGER_BYTES: usize = 256 << 20;

/// `GET /v1/models` and `/v1/models/{id}`: built from routing, filtered by the caller's group.
/// Routes to a disabled connection (its key variable is missing) are left out: the caller
/// cannot use them, and a client that picks a model from this list should get one that works.
fn models(cfg: &Config, caller: Caller, id: Option<&str>) -> Result<Response<Body>, Error> {
    let group = &cfg.groups[caller.group];
    let usable = |connection: usize| cfg.connections[connection].disabled.is_none();
    let visible = |p: &Pattern, connection: usize| {
        let models_ok =
            group.models.as_ref().is_none_or(|m| m.iter().any(|g| g.matches(p.as_str()) || g.as_str() == p.as_str()));
        group.connections[connection] && models_ok && usable(connection)
    };
    let object = |out: &mut Vec<u8>, name: &str, connection: usize| {
        out.extend_from_slice(b"{\"id\":");
        json::write_str(out, name);
        out.extend_from_slice(b",\"object\":\"model\",\"created\":0,\"owned_by\":");
        json::write_str(out, &cfg.connections[connection].name);
        out.push(b'}');
    };
    let mut out = Vec::with_capacity(256);
    if let Some(raw) = id {
        // SDKs percent-encode the id as one path segment: `org/model` arrives as `org%2Fmodel`.
        let id = percent_decode(raw).ok_or_else(|| Error::model_not_found(raw))?;
        let route = cfg.router.route(&id).ok_or_else(|| Error::model_not_found(&id))?;
        let target = route
            .targets
            .iter()
            .find(|t| group.allows(t.connection, &id) && usable(t.connection))
            .ok_or_else(|| Error::model_not_found(&id))?;
        object(&mut out, &id, target.connection);
        return Ok(json_response(StatusCode::OK, Bytes::from(out)));
    }
    out.extend_from_slice(b"{\"object\":\"list\",\"data\":[");
    let mut first = true;
    for route in cfg.router.routes() {
        let p = &route.pattern;
        let Some(t) = route.targets.iter().find(|t| visible(p, t.connection)) else { continue };
        if p.is_wildcard() && !cfg.server.list_wildcards {
            continue;
        }
        if !first {
            out.push(b',');
        }
        first = false;
        object(&mut out, p.as_str(), t.connection);
    }
    out.extend_from_slice(b"]}");
    Ok(json_response(StatusCode::OK, Bytes::from(out)))
}

/// Decodes `%XX` escapes of a path segment; `None` when an escape is malformed or the result is
/// not UTF-8. Borrows when there is nothing to decode (the usual case).
fn percent_decode(segment: &str) -> Option<Cow<'_, str>> {
    if !segment.contains('%') {
        return Some(Cow::Borrowed(segment));
    }
    let hex = |b: u8| (b as char).to_digit(16);
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hi = hex(*bytes.get(i + 1)?)?;
            let lo = hex(*bytes.get(i + 2)?)?;
            out.push((hi * 16 + lo) as u8);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok().map(Cow::Owned)
}

fn json_response(status: StatusCode, body: Bytes) -> Response<Body> {
    let mut r = Response::new(Body::full(body));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_map_with_and_without_v1() {
        for (m, p) in [
            (Method::POST, "/v1/chat/completions"),
            (Method::POST, "/chat/completions"),
            (Method::POST, "/v1/embeddings/"),
            (Method::GET, "/models"),
            (Method::GET, "/v1/models/org/model-x"),
            (Method::GET, "/health/ready"),
        ] {
            assert!(endpoint(&m, p, None).is_ok(), "{m} {p}");
        }
        assert_eq!(endpoint(&Method::GET, "/v1/chat/completions", None).err().unwrap().status, 405);
        assert_eq!(endpoint(&Method::POST, "/v2/x", None).err().unwrap().status, 404);
        assert!(matches!(endpoint(&Method::GET, "/v1/models/", None), Ok(Endpoint::Models)));
        assert_eq!(endpoint(&Method::GET, "/v1/modelsx", None).err().unwrap().status, 404);
    }

    fn config(text: &str) -> Config {
        Config::parse(text, &|_: &str| -> Option<String> { None }).unwrap()
    }

    /// Status and body of a chat request for `model`, answered by `proxy`.
    async fn chat(proxy: &Proxy, model: &str) -> (u16, String) {
        let body = format!("{{\"model\":\"{model}\",\"messages\":[{{\"role\":\"user\",\"content\":\"hi\"}}]}}");
        let req = Request::post("/v1/chat/completions").body(http_body_util::Full::new(Bytes::from(body))).unwrap();
        let resp = proxy.handle(req).await;
        let status = resp.status().as_u16();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&bytes).into_owned())
    }

    #[tokio::test]
    async fn a_reload_swaps_routes_and_keeps_the_pools_of_unchanged_connections() {
        let up = "[connections.up]\napi_type = \"openai\"\napi_base = \"http://127.0.0.1:9/v1\"\n";
        let proxy = Proxy::new(config(&format!(
            "[connections.mk]\napi_type = \"mock\"\n{up}[routing]\n\"a\" = \"mk.*\"\n\"u\" = \"up.*\"\n"
        )))
        .unwrap();
        let (status, body) = chat(&proxy, "a").await;
        assert_eq!(status, 200, "{body}");
        let before = proxy.snapshot();

        // Connections swap places and a route is renamed: transports follow names, not positions.
        proxy
            .reload(config(&format!(
                "{up}[connections.mk]\napi_type = \"mock\"\n[routing]\n\"b\" = \"mk.*\"\n\"u\" = \"up.*\"\n"
            )))
            .unwrap();
        let after = proxy.snapshot();
        assert_eq!(chat(&proxy, "a").await.0, 404);
        assert_eq!(chat(&proxy, "b").await.0, 200);
        assert!(after.kept_transport(0, &before) && after.kept_transport(1, &before));
        // The request that started before the reload still holds its configuration.
        assert!(before.config.router.route("a").is_some());

        // A changed transport setting gets a new client.
        proxy.reload(config(&format!("{up}http2 = true\n[routing]\n\"u\" = \"up.*\"\n"))).unwrap();
        assert!(!proxy.snapshot().kept_transport(0, &after));
    }

    /// A request with `headers` and `body` to `path`, answered and read to the end.
    async fn exchange(proxy: &Proxy, path: &str, headers: &[(&str, &str)], body: &str) -> Response<Bytes> {
        let mut req = Request::post(path);
        for (n, v) in headers {
            req = req.header(*n, *v);
        }
        let resp = proxy.handle(req.body(http_body_util::Full::new(Bytes::from(body.to_owned()))).unwrap()).await;
        let (parts, body) = resp.into_parts();
        Response::from_parts(parts, body.collect().await.unwrap().to_bytes())
    }

    /// `GET /metrics`.
    async fn scrape(proxy: &Proxy) -> String {
        let resp = proxy.handle(Request::get("/metrics").body(http_body_util::Empty::<Bytes>::new()).unwrap()).await;
        assert_eq!(resp.headers()[header::CONTENT_TYPE], metrics::CONTENT_TYPE);
        String::from_utf8(resp.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
    }

    /// The value of the sample `line` (name and labels as rendered) in a scrape, 0 if absent.
    fn sample(text: &str, line: &str) -> f64 {
        text.lines().find_map(|l| l.strip_prefix(line)?.strip_prefix(' ')?.parse().ok()).unwrap_or(0.0)
    }

    const MOCK_PRICED: &str = "[connections.mk]\napi_type = \"mock\"\n[routing]\n\"m-*\" = \"mk.*\"\n\
                               [prices]\n\"m-*\" = { input = 1.0, output = 2.0 }\n";

    #[tokio::test]
    async fn counters_tokens_and_cost_add_up_and_a_non_stream_answer_carries_its_cost() {
        let proxy = Proxy::new(config(MOCK_PRICED)).unwrap();
        let chat = r#"{"model":"m-1","messages":[{"role":"user","content":"Hello"}]}"#;
        let mut spent = 0.0;
        let (mut prompt, mut completion) = (0, 0);
        for _ in 0..3 {
            let resp = exchange(&proxy, "/v1/chat/completions", &[], chat).await;
            assert_eq!(resp.status(), 200);
            let v: serde_json::Value = serde_json::from_slice(resp.body()).unwrap();
            let (p, c) =
                (v["usage"]["prompt_tokens"].as_u64().unwrap(), v["usage"]["completion_tokens"].as_u64().unwrap());
            (prompt, completion) = (prompt + p, completion + c);
            let want = (p as f64 * 1.0 + c as f64 * 2.0) / 1e6;
            let header = resp.headers()["x-lmgate-cost-usd"].to_str().unwrap().parse::<f64>().unwrap();
            assert!((header - want).abs() < 1e-12, "{header} vs {want}");
            spent += want;
        }
        let stream = r#"{"model":"m-1","stream":true,"messages":[{"role":"user","content":"Hello"}]}"#;
        let resp = exchange(&proxy, "/v1/chat/completions", &[], stream).await;
        assert!(resp.headers().get("x-lmgate-cost-usd").is_none(), "a stream's cost is known after its head");
        assert_eq!(
            exchange(&proxy, "/v1/chat/completions", &[], r#"{"model":"zzz","messages":[1]}"#).await.status(),
            404
        );
        assert_eq!(exchange(&proxy, "/v1/chat/completions", &[], "{").await.status(), 400);
        let status = exchange(&proxy, "/v1/chat/completions", &[("x-mock-status", "503")], chat).await.status();
        assert_eq!(status, 503);

        let text = scrape(&proxy).await;
        let req = |route: &str, conn: &str, code: &str| {
            let line = format!(
                "lmgate_requests_total{{endpoint=\"chat\",route=\"{route}\",connection=\"{conn}\",group=\"open\",code=\"{code}\"}}"
            );
            sample(&text, &line)
        };
        assert_eq!(req("m-*", "mk", "200"), 4.0, "{text}");
        assert_eq!(req("m-*", "mk", "503"), 1.0);
        assert_eq!(req("", "", "404"), 1.0);
        assert_eq!(req("", "", "400"), 1.0);
        let tokens = |kind: &str| {
            sample(
                &text,
                &format!("lmgate_tokens_total{{route=\"m-*\",connection=\"mk\",group=\"open\",kind=\"{kind}\"}}"),
            )
        };
        // The stream's usage (the mock reports it) counts too.
        assert!(tokens("prompt") > prompt as f64 && tokens("completion") > completion as f64, "{text}");
        let cost = sample(&text, "lmgate_cost_usd_total{route=\"m-*\",group=\"open\"}");
        let stream_cost = ((tokens("prompt") - prompt as f64) + 2.0 * (tokens("completion") - completion as f64)) / 1e6;
        assert!((cost - (spent + stream_cost)).abs() < 1e-9, "{cost} vs {spent} + {stream_cost}");
        assert_eq!(sample(&text, "lmgate_stream_outcomes_total{outcome=\"complete\"}"), 1.0);
        assert_eq!(sample(&text, "lmgate_upstream_attempts_total{connection=\"mk\",outcome=\"ok\"}"), 4.0);
        assert_eq!(sample(&text, "lmgate_upstream_attempts_total{connection=\"mk\",outcome=\"5xx\"}"), 1.0);
        assert_eq!(sample(&text, "lmgate_upstream_in_flight{connection=\"mk\"}"), 0.0);
        assert_eq!(sample(&text, "lmgate_request_duration_seconds_count{endpoint=\"chat\",route=\"m-*\"}"), 5.0);
        assert!(text.ends_with("# EOF\n"));
    }

    #[tokio::test]
    async fn ten_thousand_unknown_model_names_add_no_series() {
        let proxy = Proxy::new(config(MOCK_PRICED)).unwrap();
        let series = |text: &str| text.lines().filter(|l| !l.starts_with('#')).count();
        let body = |m: &str| format!("{{\"model\":\"{m}\",\"messages\":[{{\"role\":\"user\",\"content\":\"x\"}}]}}");
        assert_eq!(exchange(&proxy, "/v1/chat/completions", &[], &body("nope-0")).await.status(), 404);
        // A scrape is a request too: the first one's own series are in from the second on.
        scrape(&proxy).await;
        let before = scrape(&proxy).await;
        for i in 1..=10_000 {
            assert_eq!(exchange(&proxy, "/v1/chat/completions", &[], &body(&format!("model-{i}"))).await.status(), 404);
        }
        let after = scrape(&proxy).await;
        assert_eq!(series(&before), series(&after), "{after}");
        assert!(!after.contains("model-1"));
        let line = "lmgate_requests_total{endpoint=\"chat\",route=\"\",connection=\"\",group=\"open\",code=\"404\"}";
        assert_eq!(sample(&after, line), 10_001.0);
    }

    #[tokio::test]
    async fn a_sane_request_id_is_kept_and_any_other_replaced() {
        let proxy = Proxy::new(config(MOCK_PRICED)).unwrap();
        let chat = r#"{"model":"m-1","messages":[{"role":"user","content":"Hello"}]}"#;
        let id = |resp: &Response<Bytes>| resp.headers()["x-request-id"].to_str().unwrap().to_owned();
        let resp = exchange(&proxy, "/v1/chat/completions", &[("x-request-id", "trace-42_a.b")], chat).await;
        assert_eq!(id(&resp), "trace-42_a.b");
        let long = "x".repeat(129);
        for bad in [long.as_str(), "has space", ""] {
            let resp = exchange(&proxy, "/v1/chat/completions", &[("x-request-id", bad)], chat).await;
            let got = id(&resp);
            assert!(got.len() == 32 && got.bytes().all(|b| b.is_ascii_hexdigit()), "{bad:?} -> {got}");
        }
        let (a, b) = (exchange(&proxy, "/v1/models", &[], "").await, exchange(&proxy, "/v1/models", &[], "").await);
        assert_ne!(id(&a), id(&b), "generated ids differ");
    }

    #[test]
    fn model_ids_are_percent_decoded_and_bad_escapes_refused() {
        assert_eq!(percent_decode("gpt-4o").as_deref(), Some("gpt-4o"));
        assert_eq!(percent_decode("org%2Fmodel").as_deref(), Some("org/model"));
        assert_eq!(percent_decode("a%2fb%20c").as_deref(), Some("a/b c"));
        assert_eq!(percent_decode("caf%C3%A9").as_deref(), Some("café"));
        for bad in ["%", "a%2", "%zz", "%C3"] {
            assert_eq!(percent_decode(bad), None, "{bad}");
        }
    }
}
