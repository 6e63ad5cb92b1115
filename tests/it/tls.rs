//! TLS on the listener: h2 and http/1.1 by ALPN with a certificate from a private CA, plain TCP
//! refused on the TLS port, and renewed certificate files taken by a reload.

use crate::harness::Gateway;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use lmgate::proxy::Proxy;
use lmgate::reload::{self, Source};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose, SanType};
use std::path::PathBuf;
use std::sync::Arc;

/// A private CA (its certificate as DER) and PEM files of a server certificate it signed for
/// `localhost` and 127.0.0.1, with their key, under a fresh temp directory.
struct Pki {
    ca: rustls_pki_types::CertificateDer<'static>,
    dir: PathBuf,
}

impl Pki {
    fn new(tag: &str) -> Pki {
        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name.push(DnType::CommonName, format!("lmgate it CA {tag}"));
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
        let ca_cert = ca.self_signed(&ca_key).expect("CA certificate");
        let key = KeyPair::generate().expect("server key");
        let mut params = CertificateParams::new(vec!["localhost".to_owned()]).expect("server params");
        params.subject_alt_names.push(SanType::IpAddress([127, 0, 0, 1].into()));
        let cert = params.signed_by(&key, &ca_cert, &ca_key).expect("server certificate");
        let dir = std::env::temp_dir().join(format!("lmgate-tls-{}-{tag}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        std::fs::write(dir.join("cert.pem"), cert.pem()).expect("write cert");
        std::fs::write(dir.join("key.pem"), key.serialize_pem()).expect("write key");
        Pki { ca: ca_cert.der().clone(), dir }
    }

    fn server_lines(&self) -> String {
        format!(
            "[server]\ntls_cert = '{}'\ntls_key = '{}'\n",
            self.dir.join("cert.pem").display(),
            self.dir.join("key.pem").display()
        )
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

const ROUTES: &str = "[connections.mk]\napi_type = \"mock\"\n[routing]\n\"m\" = \"mk.*\"\n";

/// GETs `/health` over https trusting only `ca`, offering h2 (or only http/1.1): the version
/// spoken, or the error.
async fn health(port: u16, ca: &rustls_pki_types::CertificateDer<'static>, h2: bool) -> Result<http::Version, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone()).expect("CA root");
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let builder = hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls).https_only();
    let connector = if h2 { builder.enable_http1().enable_http2().build() } else { builder.enable_http1().build() };
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build(connector);
    let uri: http::Uri = format!("https://localhost:{port}/health").parse().unwrap();
    let r = crate::harness::within("an https answer", client.get(uri)).await.map_err(|e| format!("{e:?}"))?;
    let version = r.version();
    assert_eq!(r.status(), 200);
    let body = r.into_body().collect().await.expect("body").to_bytes();
    assert_eq!(&body[..], br#"{"status":"ok"}"#);
    Ok(version)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_listener_speaks_tls_with_h2_and_http1_by_alpn_and_refuses_plain_tcp() {
    let pki = Pki::new("alpn");
    let gw = Gateway::start(&format!("{}{ROUTES}", pki.server_lines()));
    let port = gw.addr.port();
    assert_eq!(health(port, &pki.ca, true).await, Ok(http::Version::HTTP_2));
    assert_eq!(health(port, &pki.ca, false).await, Ok(http::Version::HTTP_11));
    // Another CA is not trusted: the handshake fails, nothing is served.
    let other = Pki::new("other");
    assert!(health(port, &other.ca, true).await.is_err());
    // Plain HTTP to the TLS port gets no HTTP answer.
    let r = crate::harness::client::Client::connect(gw.addr).await;
    let mut r = r;
    r.send(b"GET /health HTTP/1.1\r\nhost: localhost\r\n\r\n").await;
    r.closed().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_takes_renewed_certificate_files() {
    let (first, renewed) = (Pki::new("first"), Pki::new("renewed"));
    let file = std::env::temp_dir().join(format!("lmgate-tls-{}-reload.toml", std::process::id()));
    std::fs::write(&file, format!("{}{ROUTES}", first.server_lines())).unwrap();
    let source = Source { config: file.clone(), env: Some(String::new()) };
    let proxy = Arc::new(Proxy::new(source.load().expect("config")).expect("proxy"));
    let gw = Gateway::serve(proxy.clone());
    let port = gw.addr.port();
    assert!(health(port, &first.ca, true).await.is_ok());
    assert!(health(port, &renewed.ca, true).await.is_err());
    std::fs::write(&file, format!("{}{ROUTES}", renewed.server_lines())).unwrap();
    assert_eq!(reload::reload(&proxy, &source), Ok(vec![]));
    assert!(health(port, &renewed.ca, true).await.is_ok(), "new connections get the renewed certificate");
    assert!(health(port, &first.ca, true).await.is_err());
    // TLS cannot be turned off by a reload: kept, and named.
    std::fs::write(&file, ROUTES).unwrap();
    assert_eq!(reload::reload(&proxy, &source), Ok(vec!["tls_cert/tls_key (TLS on or off)"]));
    assert!(health(port, &renewed.ca, true).await.is_ok());
    let _ = std::fs::remove_file(&file);
}
