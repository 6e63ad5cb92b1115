//! How requests reach an upstream: a [`Transport`] per connection, a pooled hyper-util client for
//! network upstreams or the in-process mock.
//!
//! One client per connection makes `http2` a per-connection choice (h2 with prior knowledge over
//! plain http, ALPN over TLS) and keeps each upstream's pool separate. HTTP/1.1 is the default:
//! an h2 pool multiplexes onto one TCP connection per host and caps concurrency near the
//! server's stream limit. TLS is rustls with the webpki roots plus an optional per-connection
//! `ca_file` (private CAs). Sockets get TCP_NODELAY; idle pooled connections expire.

use crate::body::{Body, Upstream};
use crate::config::{ConfigError, Connection};
use crate::error::{Error, Kind};
use crate::provider::mock::Mock;
use crate::provider::Provider;
use http::{Response, Uri};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// A pooled upstream client.
pub type HttpClient = Client<TimedConnect<HttpsConnector<HttpConnector>>, Body>;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A connector whose whole connect — TCP, then the TLS handshake — must finish within `timeout`.
/// `HttpConnector`'s own timeout covers TCP only, and an upstream that accepts TCP and then stalls
/// the handshake is as unreachable as one that drops SYNs. The bound sits on the connector, so it
/// costs one boxed future per new connection and nothing per request on a pooled one.
#[derive(Clone)]
pub struct TimedConnect<C> {
    inner: C,
    timeout: Duration,
}

/// The connect phase did not finish within the connection's `connect_timeout`.
#[derive(Debug)]
struct ConnectTimeout(Duration);

impl std::fmt::Display for ConnectTimeout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TCP connect and TLS handshake did not finish within {:?}", self.0)
    }
}

impl std::error::Error for ConnectTimeout {}

impl<C> tower_service::Service<Uri> for TimedConnect<C>
where
    C: tower_service::Service<Uri>,
    C::Future: Send + 'static,
    C::Error: Into<BoxError>,
{
    type Response = C::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<C::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let (connect, limit) = (self.inner.call(uri), self.timeout);
        Box::pin(async move {
            match tokio::time::timeout(limit, connect).await {
                Ok(r) => r.map_err(Into::into),
                Err(_) => Err(ConnectTimeout(limit).into()),
            }
        })
    }
}

/// How long an unused pooled connection is kept.
const POOL_IDLE: Duration = Duration::from_secs(90);

/// Builds the client for an upstream connection.
pub fn build(conn: &Connection) -> Result<HttpClient, ConfigError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = &conn.ca_file {
        let bad = |e: String| ConfigError(format!("connections.{}.ca_file: {}: {e}", conn.name, path.display()));
        let mut n = 0;
        for cert in CertificateDer::pem_file_iter(path).map_err(|e| bad(e.to_string()))? {
            roots.add(cert.map_err(|e| bad(e.to_string()))?).map_err(|e| bad(e.to_string()))?;
            n += 1;
        }
        if n == 0 {
            return Err(bad("no PEM certificate in the file".into()));
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ConfigError(format!("connections.{}: TLS setup: {e}", conn.name)))?
        .with_root_certificates(roots)
        .with_no_client_auth();

    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(conn.timeouts.connect));
    http.set_keepalive(Some(Duration::from_secs(60)));

    let builder = hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls).https_or_http();
    let https = if conn.http2 {
        builder.enable_http1().enable_http2().wrap_connector(http)
    } else {
        builder.enable_http1().wrap_connector(http)
    };

    let https = TimedConnect { inner: https, timeout: conn.timeouts.connect };
    let plain_h2 = conn.http2 && conn.provider.base_url().is_some_and(|u| u.trim_start().starts_with("http://"));
    Ok(Client::builder(TokioExecutor::new())
        .pool_idle_timeout(POOL_IDLE)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .http2_only(plain_h2)
        .build(https))
}

/// How one connection's requests reach its upstream. Cloning shares the pool.
#[derive(Clone)]
pub enum Transport {
    /// A network upstream, through a pooled client.
    Http(Arc<HttpClient>),
    /// The in-process mock (shared by every mock connection, across reloads).
    Mock(Arc<Mock>),
}

impl Transport {
    /// The transport for `conn`: the shared mock, or a new pooled client.
    pub fn new(conn: &Connection, mock: &Arc<Mock>) -> Result<Self, ConfigError> {
        Ok(match conn.provider {
            Provider::Mock => Transport::Mock(mock.clone()),
            _ => Transport::Http(Arc::new(build(conn)?)),
        })
    }

    /// Whether two transports share one pool (or the one mock).
    #[cfg(test)]
    pub fn same_as(&self, other: &Transport) -> bool {
        match (self, other) {
            (Transport::Http(a), Transport::Http(b)) => Arc::ptr_eq(a, b),
            (Transport::Mock(a), Transport::Mock(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }

    /// Sends `req` and waits for the response head until `deadline` (the connection's
    /// `header_timeout` from the attempt's start: 504). A new network connection must also
    /// finish within `connect_timeout` (TCP connect and TLS handshake, in [`TimedConnect`]: 502).
    /// Failures name the connection, never a key, and know their kind: unreachable (never sent),
    /// closed before answering, timeout.
    pub async fn send(
        &self,
        conn: &Connection,
        req: http::Request<Body>,
        deadline: Instant,
    ) -> Result<Response<Upstream>, Error> {
        let client = match self {
            Transport::Http(client) => client,
            Transport::Mock(mock) => return Ok(mock.serve(req).await.map(Upstream::Local)),
        };
        match tokio::time::timeout_at(deadline.into(), client.request(req)).await {
            Ok(Ok(r)) => Ok(r.map(Upstream::Hyper)),
            Ok(Err(e)) if e.is_connect() => {
                let timed_out = std::error::Error::source(&e).is_some_and(|s| s.is::<ConnectTimeout>());
                let message = if timed_out {
                    format!(
                        "Could not connect to connection `{}` within {:?} (TCP connect and TLS handshake).",
                        conn.name, conn.timeouts.connect
                    )
                } else {
                    format!("Could not connect to connection `{}`.", conn.name)
                };
                Err(Error::upstream_failure(Kind::UpstreamUnreachable, message).caused_by(e))
            }
            Ok(Err(e)) => Err(Error::upstream_failure(
                Kind::UpstreamClosed,
                format!("Connection `{}`: the upstream closed the connection before answering.", conn.name),
            )
            .caused_by(e)),
            Err(_) => Err(Error::upstream_failure(
                Kind::UpstreamTimeout,
                format!("Connection `{}`: no response within {:?}.", conn.name, conn.timeouts.header),
            )),
        }
    }
}
