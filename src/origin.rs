//! Where a request comes from: browser origins (CORS) and, when the gateway runs open on a
//! loopback address, the `Host` it was sent to (DNS rebinding).
//!
//! A web page in a user's browser can POST to a gateway on localhost: a `text/plain` body needs
//! no CORS preflight (<https://fetch.spec.whatwg.org/#cors-safelisted-request-header>), so the
//! request reaches the gateway whatever CORS says about reading the answer, and in open mode it
//! would spend the operator's upstream keys. So a request that carries an `Origin` not listed in
//! `[server] cors_allowed_origins` is refused with 403 before anything reaches an upstream. A
//! listed origin gets real CORS answers: a preflight (`OPTIONS` with
//! `Access-Control-Request-Method`) is answered before authentication, since browsers send no key
//! with it, and the real request's answer carries `Access-Control-Allow-Origin`. Clients that are
//! not browsers (curl, the SDKs, servers) send no `Origin` and are unaffected.
//!
//! DNS rebinding (a hostile name resolving to 127.0.0.1) makes a browser send same-origin
//! requests to the gateway under a foreign `Host`. When the gateway is open (no client keys) and
//! listens on loopback, the `Host` (or h2 `:authority`) must be the listen address, `localhost`,
//! a loopback address, or a name in `[server] allowed_hosts` (`"*"` turns the check off).

use crate::config::Server;
use crate::error::Error;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Response, StatusCode, Uri};
use std::net::IpAddr;

/// Response headers a browser client may read (request ids for support, the rate-limit family
/// SDKs back off on).
const EXPOSED: &str = "x-request-id, x-upstream-request-id, request-id, openai-processing-ms, retry-after, \
                       retry-after-ms, x-lmgate-cost-usd, x-lmgate-attempts, x-ratelimit-limit-requests, x-ratelimit-limit-tokens, x-ratelimit-remaining-requests, \
                       x-ratelimit-remaining-tokens, x-ratelimit-reset-requests, x-ratelimit-reset-tokens";

/// How long a browser may cache a preflight answer, in seconds.
const MAX_AGE: &str = "600";

/// The checks for one request: `Ok(Some(origin))` when an allowed browser origin sent it (its
/// answer gets CORS headers), `Ok(None)` for a non-browser client, `Err` (403) otherwise.
pub fn check(server: &Server, open: bool, uri: &Uri, headers: &HeaderMap) -> Result<Option<HeaderValue>, Error> {
    if open && !host_allowed(server, uri, headers) {
        return Err(Error::forbidden(
            "This gateway runs without client keys on a loopback address and answers only requests \
             sent to that address or to `localhost`; add the name to [server] allowed_hosts.",
        )
        .code("host_not_allowed"));
    }
    let Some(origin) = headers.get(header::ORIGIN) else { return Ok(None) };
    if server.cors_allowed_origins.iter().any(|o| o.as_bytes() == origin.as_bytes()) {
        return Ok(Some(origin.clone()));
    }
    Err(Error::forbidden(
        "Requests from web pages are refused unless their origin is listed in [server] cors_allowed_origins.",
    )
    .code("origin_not_allowed"))
}

/// Whether a request is a CORS preflight.
pub fn is_preflight(method: &Method, headers: &HeaderMap) -> bool {
    method == Method::OPTIONS && headers.contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
}

/// The answer to a preflight from an allowed `origin`: 204, the origin, the methods, the
/// headers asked for (browser SDKs send `x-stainless-*` and their own headers), and how long to
/// cache it.
pub fn preflight<B: Default>(origin: HeaderValue, headers: &HeaderMap) -> Response<B> {
    let mut r = Response::new(B::default());
    *r.status_mut() = StatusCode::NO_CONTENT;
    let h = r.headers_mut();
    h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    h.insert(header::VARY, HeaderValue::from_static("Origin"));
    h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_static("GET, POST, OPTIONS"));
    if let Some(asked) = headers.get(header::ACCESS_CONTROL_REQUEST_HEADERS) {
        h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, asked.clone());
    }
    h.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static(MAX_AGE));
    r
}

/// Marks an answer to an allowed origin as readable by it.
pub fn allow<B>(response: &mut Response<B>, origin: HeaderValue) {
    let h = response.headers_mut();
    h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    h.append(header::VARY, HeaderValue::from_static("Origin"));
    h.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, HeaderValue::from_static(EXPOSED));
}

/// Whether the request was sent to a name this open loopback gateway answers to.
fn host_allowed(server: &Server, uri: &Uri, headers: &HeaderMap) -> bool {
    if !server.listen.ip().is_loopback() || server.allowed_hosts.iter().any(|h| h == "*") {
        return true;
    }
    let authority = uri.authority().map(|a| a.as_str()).or_else(|| headers.get(header::HOST)?.to_str().ok());
    // A request with no host at all (HTTP/1.0) comes from no browser.
    let Some(authority) = authority else { return true };
    let host = host_of(authority);
    // The usual names first, by bytes; an address is parsed only when they miss.
    matches!(host, "127.0.0.1" | "::1")
        || host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
        || server.allowed_hosts.iter().any(|h| h.eq_ignore_ascii_case(host))
}

/// The host of an authority, without the port and IPv6 brackets.
fn host_of(authority: &str) -> &str {
    if let Some(rest) = authority.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    authority
        .rsplit_once(':')
        .map_or(authority, |(h, port)| if port.bytes().all(|b| b.is_ascii_digit()) { h } else { authority })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_lose_their_port_and_brackets() {
        for (a, h) in [
            ("localhost:4000", "localhost"),
            ("[::1]:80", "::1"),
            ("127.0.0.1", "127.0.0.1"),
            ("evil.example", "evil.example"),
        ] {
            assert_eq!(host_of(a), h);
        }
    }
}
