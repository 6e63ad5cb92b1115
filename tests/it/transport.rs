//! Upstream transports: https with a private CA given by `ca_file` (and refused without it),
//! and HTTP/2 with prior knowledge over plain http.

use crate::harness::client::{exchange, post, Client};
use crate::harness::upstream::{chunk, json, sse_head, Step, Upstream, LAST_CHUNK};
use crate::harness::{within, Gateway};
use bytes::Bytes;
use http_body::Frame;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use std::convert::Infallible;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

/// A file under the temp dir, removed on drop.
struct TempFile(PathBuf);

impl TempFile {
    fn new(stem: &str, contents: &str) -> TempFile {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let path = std::env::temp_dir().join(format!("lmgate-it-{stem}-{}-{nanos}.pem", std::process::id()));
        std::fs::write(&path, contents).expect("write the temp file");
        TempFile(path)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A fresh CA (its PEM) and a TLS server config for `localhost` with a certificate it signed.
fn private_ca_server() -> (String, Arc<rustls::ServerConfig>) {
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "lmgate it CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let ca_cert = ca.self_signed(&ca_key).expect("CA certificate");

    let key = KeyPair::generate().expect("server key");
    let mut params = CertificateParams::new(vec!["localhost".to_owned()]).expect("server params");
    params.distinguished_name.push(DnType::CommonName, "localhost");
    let cert = params.signed_by(&key, &ca_cert, &ca_key).expect("server certificate");

    let server = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone()], PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())))
        .expect("server TLS config");
    (ca_cert.pem(), Arc::new(server))
}

fn https_config(port: u16, ca_file: Option<&TempFile>) -> String {
    let ca = ca_file.map_or(String::new(), |f| format!("ca_file = '{}'\n", f.0.display()));
    format!(
        "[connections.up]\napi_type = \"openai\"\napi_base = \"https://localhost:{port}/v1\"\napi_key = \"sk-up\"\nconnect_timeout_secs = 3\n{ca}\n\
         [routing]\n\"m*\" = \"up.*\"\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_upstream_signed_by_the_ca_file_is_trusted_and_refused_without_it() {
    let (ca_pem, server) = private_ca_server();
    let ca_file = TempFile::new("ca", &ca_pem);
    let mut up =
        Upstream::start_tls(tokio_rustls::TlsAcceptor::from(server), |_| vec![Step::Write(json(r#"{"tls":true}"#))])
            .await;
    let port = up.addr.port();
    let body = r#"{"model":"m-1","messages":[{"role":"user","content":"hi"}]}"#;

    let gw = Gateway::start(&https_config(port, Some(&ca_file)));
    let resp = exchange(gw.addr, &post("/v1/chat/completions", &[], body)).await;
    assert_eq!(resp.status(), 200, "{}", resp.text());
    assert_eq!(resp.body, br#"{"tls":true}"#);
    let req = up.request().await;
    assert_eq!(req.body_text(), body);
    assert_eq!(req.header("authorization"), "Bearer sk-up");
    assert_eq!(req.header("host"), format!("localhost:{port}"));

    // The same upstream without the CA: the certificate is not trusted.
    let gw = Gateway::start(&https_config(port, None));
    let resp = exchange(gw.addr, &post("/v1/chat/completions", &[], body)).await;
    assert_eq!(resp.openai_error(502)["code"], "upstream_error");
    assert!(up.try_request().is_none(), "a request went over an untrusted connection");
}

/// What the h2 upstream saw of one request.
struct Seen {
    version: http::Version,
    path: String,
    headers: http::HeaderMap,
    body: Bytes,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_upstream_is_spoken_to_with_prior_knowledge() {
    let stream = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"h2\"}}],\"usage\":null}\n\n\
                  data: {\"choices\":[],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":1,\"total_tokens\":2}}\n\n\
                  data: [DONE]\n\n";
    let (tx, mut seen) = mpsc::unbounded_channel::<Seen>();
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    let server = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req: hyper::Request<Incoming>| {
                    let tx = tx.clone();
                    async move {
                        let (parts, body) = req.into_parts();
                        let body = body.collect().await?.to_bytes();
                        let is_stream = body.windows(13).any(|w| w == b"\"stream\":true");
                        let _ = tx.send(Seen {
                            version: parts.version,
                            path: parts.uri.path().to_owned(),
                            headers: parts.headers,
                            body,
                        });
                        let (ct, out) = if is_stream {
                            ("text/event-stream", stream)
                        } else {
                            ("application/json", r#"{"h2":true}"#)
                        };
                        Ok::<_, hyper::Error>(
                            hyper::Response::builder()
                                .header("content-type", ct)
                                .body(Full::new(Bytes::from_static(out.as_bytes())))
                                .expect("response"),
                        )
                    }
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });

    let gw = Gateway::start(&format!(
        "[connections.up]\napi_type = \"openai\"\napi_base = \"http://{addr}/v1\"\napi_key = \"sk-up\"\nhttp2 = true\n\n[routing]\n\"m*\" = \"up.*\"\n"
    ));
    let body = r#"{"model":"m-1","messages":[{"role":"user","content":"hi"}]}"#;
    let resp = exchange(gw.addr, &post("/v1/chat/completions", &[("cookie", "c=1")], body)).await;
    assert_eq!(resp.status(), 200, "{}", resp.text());
    assert_eq!(resp.body, br#"{"h2":true}"#);
    let req = within("the h2 upstream to see the request", seen.recv()).await.expect("request");
    assert_eq!(req.version, http::Version::HTTP_2);
    assert_eq!(req.path, "/v1/chat/completions");
    assert_eq!(req.body, body.as_bytes());
    assert_eq!(req.headers.get("authorization").and_then(|v| v.to_str().ok()), Some("Bearer sk-up"));
    assert!(req.headers.get("cookie").is_none());

    // A stream over h2: the usage event the gateway asked for is removed, the rest is intact.
    let resp = exchange(
        gw.addr,
        &post(
            "/v1/chat/completions",
            &[],
            r#"{"model":"m-1","messages":[{"role":"user","content":"hi"}],"stream":true}"#,
        ),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let req = within("the h2 upstream to see the request", seen.recv()).await.expect("request");
    assert_eq!(req.version, http::Version::HTTP_2);
    assert!(req.body.ends_with(br#","stream_options":{"include_usage":true}}"#));
    assert_eq!(
        resp.text(),
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"h2\"}}],\"usage\":null}\n\ndata: [DONE]\n\n"
    );
    server.abort();
}

/// A response body fed by the test through a channel; dropped (closing the channel) when the
/// server abandons the response.
struct ChannelBody(mpsc::Receiver<Bytes>);

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_cancels_its_http2_upstream_stream() {
    let (feeds_tx, mut feeds) = mpsc::unbounded_channel::<mpsc::Sender<Bytes>>();
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    let server = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let feeds_tx = feeds_tx.clone();
            tokio::spawn(async move {
                let service = service_fn(move |_req: hyper::Request<Incoming>| {
                    let (tx, rx) = mpsc::channel(8);
                    let _ = feeds_tx.send(tx);
                    async move {
                        Ok::<_, Infallible>(
                            hyper::Response::builder()
                                .header("content-type", "text/event-stream")
                                .body(ChannelBody(rx))
                                .expect("response"),
                        )
                    }
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    let gw = Gateway::start(&format!(
        "[connections.up]\napi_type = \"openai\"\napi_base = \"http://{addr}/v1\"\napi_key = \"sk-up\"\nhttp2 = true\n\n[routing]\n\"m*\" = \"up.*\"\n"
    ));
    let mut client = Client::connect(gw.addr).await;
    client
        .send(&post(
            "/v1/chat/completions",
            &[],
            r#"{"model":"m-1","messages":[{"role":"user","content":"hi"}],"stream":true}"#,
        ))
        .await;
    let feed = within("the h2 upstream to get the request", feeds.recv()).await.expect("feed");
    let first = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"h2\"}}]}\n\n";
    feed.send(Bytes::from_static(first.as_bytes())).await.expect("body open");
    assert_eq!(client.head().await.status, 200);
    assert_eq!(client.until(first.as_bytes()).await, first.as_bytes());
    drop(client);
    // The gateway resets the h2 stream, so the upstream server drops the response body.
    within("the h2 upstream to drop the response body", feed.closed()).await;
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2c_client_is_served_streams_included() {
    let stream = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"x\"}}]}\n\ndata: [DONE]\n\n";
    let mut up = Upstream::start(move |req| {
        if req.body_text().contains("\"stream\":true") {
            vec![Step::Write(sse_head(&[])), Step::Write(chunk(stream.as_bytes())), Step::Write(LAST_CHUNK.to_vec())]
        } else {
            vec![Step::Write(json(r#"{"ok":true}"#))]
        }
    })
    .await;
    let gw = Gateway::start(&crate::harness::config(up.addr, "", ""));
    let tcp = within("connect", tokio::net::TcpStream::connect(gw.addr)).await.expect("connect");
    let (mut sender, conn) =
        within("the h2 handshake", hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)))
            .await
            .expect("h2 handshake");
    tokio::spawn(conn);
    for (body, want) in [
        (r#"{"model":"m-1","messages":[{"role":"user","content":"hi"}]}"#, r#"{"ok":true}"#),
        (
            r#"{"model":"m-1","messages":[{"role":"user","content":"hi"}],"stream":true,"stream_options":{"include_usage":true}}"#,
            stream,
        ),
    ] {
        let req = hyper::Request::post(format!("http://{}/v1/chat/completions", gw.addr))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .expect("request");
        let resp = within("the h2 response", sender.send_request(req)).await.expect("h2 response");
        assert_eq!(resp.version(), http::Version::HTTP_2);
        assert_eq!(resp.status(), 200);
        let got = within("the h2 body", resp.into_body().collect()).await.expect("h2 body").to_bytes();
        assert_eq!(got, want.as_bytes());
        assert_eq!(up.request().await.body_text(), body);
    }
}
