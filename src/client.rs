//! Upstream HTTP clients: one pooled hyper-util client per configured connection.
//!
//! One client per connection makes `http2` a per-connection choice (h2 with prior knowledge over
//! plain http, ALPN over TLS) and keeps each upstream's pool separate. HTTP/1.1 is the default:
//! an h2 pool multiplexes onto one TCP connection per host and caps concurrency near the
//! server's stream limit. TLS is rustls with the webpki roots plus an optional per-connection
//! `ca_file` (private CAs). Sockets get TCP_NODELAY; idle pooled connections expire.

use crate::body::Body;
use crate::config::{ConfigError, Connection};
use crate::error::Error;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::{capture_connection, HttpConnector};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use std::sync::Arc;
use std::time::Duration;

/// A pooled upstream client.
pub type HttpClient = Client<HttpsConnector<HttpConnector>, Body>;

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

    let plain_h2 = conn.http2 && conn.urls.as_ref().is_some_and(|u| u.chat.scheme_str() == Some("http"));
    Ok(Client::builder(TokioExecutor::new())
        .pool_idle_timeout(POOL_IDLE)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .http2_only(plain_h2)
        .build(https))
}

/// Sends `req` to `conn`'s upstream and waits for the response head.
///
/// Two bounds: `connect_timeout` until a connection is ready to carry the request (TCP connect,
/// TLS handshake and, for h2, the HTTP/2 handshake: an upstream that accepts TCP and then stalls
/// the handshake is as unreachable as one that drops SYNs, so it is a 502 too), and
/// `header_timeout` from the start until the response head arrives (504). The connector's own
/// timeout only covers TCP connect, so the connect phase is watched from here: hyper-util reports
/// the moment a pooled or new connection is handed to the request. Failures name the connection,
/// never a key.
pub async fn send(
    client: &HttpClient,
    conn: &Connection,
    mut req: http::Request<Body>,
) -> Result<http::Response<hyper::body::Incoming>, Error> {
    let header_deadline = tokio::time::Instant::now() + conn.timeouts.header;
    let mut connected = capture_connection(&mut req);
    let response = tokio::time::timeout_at(header_deadline, client.request(req));
    tokio::pin!(response);
    let connect = tokio::time::timeout(conn.timeouts.connect, async {
        // Resolves with `None` when the request failed before connecting; the response future
        // then has the error, so only the timer firing counts here.
        if connected.wait_for_connection_metadata().await.is_none() {
            std::future::pending::<()>().await;
        }
    });
    let result = tokio::select! {
        biased;
        r = &mut response => r,
        c = connect => match c {
            Ok(()) => response.await,
            Err(_) => {
                return Err(Error::bad_gateway(format!(
                    "Could not connect to connection `{}` within {:?} (TCP and TLS).",
                    conn.name, conn.timeouts.connect
                )))
            }
        },
    };
    match result {
        Ok(Ok(r)) => Ok(r),
        Ok(Err(e)) if e.is_connect() => {
            Err(Error::bad_gateway(format!("Could not connect to connection `{}`.", conn.name)))
        }
        Ok(Err(_)) => Err(Error::bad_gateway(format!(
            "Connection `{}`: the upstream closed the connection before answering.",
            conn.name
        ))),
        Err(_) => {
            Err(Error::timeout(format!("Connection `{}`: no response within {:?}.", conn.name, conn.timeouts.header)))
        }
    }
}
