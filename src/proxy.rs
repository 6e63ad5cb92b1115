//! The request flow: [`Proxy::handle`] reads top to bottom.
//!
//! ```text
//! local endpoints (health, models)       -> answered here
//! auth::check(headers)                   -> 401, one generic body
//! bounded body read (max_request_bytes)  -> 413; body_timeout_secs -> 408
//! json::scan_request: model, stream      -> 400 (malformed, missing, duplicated)
//! router.route(model)                    -> 404; disabled connection 503; group may not 403
//! provider: mock answers in-process | openai splices the client's body | anthropic translates
//! client::send within header_timeout     -> 502 (connect/refused/closed), 504 (timeout)
//! provider response -> Body (passthrough observed for usage, or translated), record attached
//! ```
//!
//! Every response carries the request's [`Record`], written once when its body is dropped.

use crate::body::Body;
use crate::client::{self, HttpClient};
use crate::config::{ApiType, Config, ConfigError};
use crate::error::Error;
use crate::json::{self, RequestError};
use crate::provider::{anthropic, mock::Mock, openai, Api};
use crate::record::{Outcome, Record};
use crate::{auth, router::Pattern};
use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use std::borrow::Cow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// The gateway: configuration, upstream clients and the mock, shared by all connections.
pub struct Proxy {
    config: Arc<Config>,
    clients: Vec<Option<HttpClient>>,
    mock: Mock,
    draining: AtomicBool,
}

/// What a request path names.
enum Endpoint<'a> {
    Api(Api),
    Models,
    Model(&'a str),
    Live,
    Ready,
}

impl Endpoint<'_> {
    fn name(&self) -> &'static str {
        match self {
            Endpoint::Api(api) => api.name(),
            Endpoint::Models | Endpoint::Model(_) => "models",
            Endpoint::Live | Endpoint::Ready => "health",
        }
    }
}

/// Maps method and path to an endpoint; the `/v1` prefix is optional.
fn endpoint<'a>(method: &Method, path: &'a str) -> Result<Endpoint<'a>, Error> {
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
    /// Builds the proxy and one upstream client per connection.
    pub fn new(config: Config) -> Result<Self, ConfigError> {
        let clients = config
            .connections
            .iter()
            .map(|c| (c.api_type != ApiType::Mock).then(|| client::build(c)).transpose())
            .collect::<Result<_, _>>()?;
        Ok(Proxy { config: Arc::new(config), clients, mock: Mock::default(), draining: AtomicBool::new(false) })
    }

    /// The configuration in use.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Marks the gateway as shutting down: `/health/ready` answers 503 from now on.
    pub fn drain(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// Answers one request. Never fails: errors become OpenAI error responses.
    pub async fn handle<B>(&self, req: Request<B>) -> Response<Body>
    where
        B: http_body::Body<Data = Bytes> + Send,
        B::Error: std::error::Error + Send + Sync + 'static,
    {
        let (parts, body) = req.into_parts();
        let ep = endpoint(&parts.method, parts.uri.path());
        let name = ep.as_ref().map_or("unknown", Endpoint::name);
        let mut record = Record::new(self.config.clone(), parts.method.clone(), parts.uri.clone(), name);
        let result = match ep {
            Ok(Endpoint::Api(api)) => self.forward(api, &parts.headers, body, &mut record).await,
            Ok(Endpoint::Models) => self.models(&parts.headers, None),
            Ok(Endpoint::Model(id)) => self.models(&parts.headers, Some(id)),
            Ok(Endpoint::Live) => Ok(json_response(StatusCode::OK, Bytes::from_static(b"{\"status\":\"ok\"}"))),
            Ok(Endpoint::Ready) if self.draining.load(Ordering::Relaxed) => {
                Ok(json_response(StatusCode::SERVICE_UNAVAILABLE, Bytes::from_static(b"{\"status\":\"draining\"}")))
            }
            Ok(Endpoint::Ready) => Ok(json_response(StatusCode::OK, Bytes::from_static(b"{\"status\":\"ready\"}"))),
            Err(e) => Err(e),
        };
        let response = match result {
            Ok(r) => r,
            Err(e) => {
                record.outcome = Outcome::Complete;
                record.error = Some(e.message.clone());
                json_response(e.status, Bytes::from(e.to_json()))
            }
        };
        record.status = response.status().as_u16();
        let (parts, body) = response.into_parts();
        Response::from_parts(parts, body.with_record(record))
    }

    /// The API flow: auth, body, model, route, provider, upstream, response.
    async fn forward<B>(
        &self,
        api: Api,
        headers: &HeaderMap,
        body: B,
        record: &mut Record,
    ) -> Result<Response<Body>, Error>
    where
        B: http_body::Body<Data = Bytes> + Send,
        B::Error: std::error::Error + Send + Sync + 'static,
    {
        let cfg = &*self.config;
        let group = auth::check(&cfg.keys, cfg.open_group, headers).ok_or_else(Error::unauthorized)?;

        let limit = cfg.server.max_request_bytes;
        let declared = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit as u64) {
            return Err(Error::too_large(limit));
        }
        // Bounded in size and in time: a client trickling its body cannot hold a connection.
        let read = tokio::time::timeout(cfg.server.body_timeout, Limited::new(body, limit).collect());
        let body = match read.await {
            Ok(Ok(b)) => b.to_bytes(),
            Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => return Err(Error::too_large(limit)),
            Ok(Err(_)) => return Err(Error::invalid_request("Could not read the request body.")),
            Err(_) => return Err(Error::body_timeout(cfg.server.body_timeout)),
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

        let (_, target) = cfg.router.route(&model).ok_or_else(|| Error::model_not_found(&model))?;
        let conn = &cfg.connections[target.connection];
        record.connection = Some(target.connection);
        if let Some(why) = &conn.disabled {
            return Err(Error::unavailable(format!("Connection `{}` is disabled: {why}.", conn.name)));
        }
        let g = &cfg.groups[group];
        if !g.allows(target.connection, &model) {
            return Err(Error::forbidden(format!("Your key (group `{}`) may not use model `{model}`.", g.name)));
        }

        let upstream_model = target.upstream_model(&model);
        let client = self.clients[target.connection].as_ref();
        match (conn.api_type, client) {
            (ApiType::Openai, Some(client)) => {
                let up = openai::request(conn, api, body, &fields, stream, target, headers)?;
                let resp = client::send(client, conn, up.request).await?;
                openai::response(conn, resp, stream, up.strip_usage)
            }
            (ApiType::Anthropic, Some(client)) => {
                if api != Api::Chat {
                    return Err(Error::invalid_request(format!(
                        "Model `{model}` is served by an Anthropic connection, which has no /v1/{} endpoint.",
                        api.name()
                    ))
                    .param("model"));
                }
                let translated = anthropic::request::translate(&body, upstream_model, conn.default_max_tokens)?;
                let req = anthropic::upstream_request(conn, &translated, headers)?;
                let resp = client::send(client, conn, req).await?;
                let (response, usage) = anthropic::response(conn, resp, &translated).await?;
                record.usage = usage.or(record.usage);
                Ok(response)
            }
            (ApiType::Mock, _) => {
                let answer = self.mock.respond(api, &body, upstream_model, headers)?;
                record.usage = Some(answer.usage);
                Ok(answer.response)
            }
            // Proxy::new builds a client for every network connection.
            (_, None) => Err(Error::unavailable(format!("Connection `{}` has no upstream client.", conn.name))),
        }
    }

    /// `GET /v1/models` and `/v1/models/{id}`: built from routing, filtered by the caller's group.
    /// Routes to a disabled connection (its key variable is missing) are left out: the caller
    /// cannot use them, and a client that picks a model from this list should get one that works.
    fn models(&self, headers: &HeaderMap, id: Option<&str>) -> Result<Response<Body>, Error> {
        let cfg = &*self.config;
        let group = &cfg.groups[auth::check(&cfg.keys, cfg.open_group, headers).ok_or_else(Error::unauthorized)?];
        let usable = |connection: usize| cfg.connections[connection].disabled.is_none();
        let visible = |p: &Pattern, connection: usize| {
            let models_ok = group
                .models
                .as_ref()
                .is_none_or(|m| m.iter().any(|g| g.matches(p.as_str()) || g.as_str() == p.as_str()));
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
            let (_, target) = cfg.router.route(&id).ok_or_else(|| Error::model_not_found(&id))?;
            if !group.allows(target.connection, &id) || !usable(target.connection) {
                return Err(Error::model_not_found(&id));
            }
            object(&mut out, &id, target.connection);
            return Ok(json_response(StatusCode::OK, Bytes::from(out)));
        }
        out.extend_from_slice(b"{\"object\":\"list\",\"data\":[");
        let mut first = true;
        for (p, t) in cfg.router.entries() {
            if (p.is_wildcard() && !cfg.server.list_wildcards) || !visible(p, t.connection) {
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
            assert!(endpoint(&m, p).is_ok(), "{m} {p}");
        }
        assert_eq!(endpoint(&Method::GET, "/v1/chat/completions").err().unwrap().status, 405);
        assert_eq!(endpoint(&Method::POST, "/v2/x").err().unwrap().status, 404);
        assert!(matches!(endpoint(&Method::GET, "/v1/models/"), Ok(Endpoint::Models)));
        assert_eq!(endpoint(&Method::GET, "/v1/modelsx").err().unwrap().status, 404);
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
