//! TLS on the listener: a rustls server configuration from PEM files (`[server] tls_cert` and
//! `tls_key`), offering h2 and http/1.1 by ALPN (RFC 7301). The files are read when the
//! configuration is compiled, so `lmgate check` validates them, a bad file is a startup error
//! naming its key, and a reload picks up renewed certificates (the listener takes the current
//! snapshot's configuration for every new connection).

use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The listener's TLS: where the files are, and the configuration built from them.
#[derive(Clone)]
pub struct Tls {
    /// The certificate chain (PEM), leaf first.
    pub cert: PathBuf,
    /// The private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// What the acceptor uses.
    pub config: Arc<ServerConfig>,
}

impl std::fmt::Debug for Tls {
    /// The paths only: never key material.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").field("cert", &self.cert).field("key", &self.key).finish_non_exhaustive()
    }
}

/// Which file an error is about, for the message: the config key and its line.
pub struct Keys<'a> {
    /// `server.tls_cert (line N)`.
    pub cert: &'a str,
    /// `server.tls_key (line N)`.
    pub key: &'a str,
}

impl Tls {
    /// Reads and checks the files. Errors name the key and the file, never quote key material.
    pub fn load(cert: &Path, key: &Path, keys: Keys<'_>) -> Result<Tls, String> {
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
            .and_then(|certs| certs.collect::<Result<_, _>>())
            .map_err(|e| format!("{}: `{}`: {}", keys.cert, cert.display(), pem_error(&e)))?;
        if chain.is_empty() {
            return Err(format!("{}: `{}` holds no PEM certificate", keys.cert, cert.display()));
        }
        let private = PrivateKeyDer::from_pem_file(key)
            .map_err(|e| format!("{}: `{}`: {}", keys.key, key.display(), pem_error(&e)))?;
        let mut config = ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("{}: {e}", keys.cert))?
            .with_no_client_auth()
            .with_single_cert(chain, private)
            .map_err(|e| {
                format!("{} / {}: the key and certificate cannot be used together ({e})", keys.cert, keys.key)
            })?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Tls { cert: cert.to_owned(), key: key.to_owned(), config: Arc::new(config) })
    }
}

/// A PEM error in words; the file's contents are never quoted.
fn pem_error(e: &rustls_pki_types::pem::Error) -> String {
    use rustls_pki_types::pem::Error;
    match e {
        Error::Io(io) => format!("cannot read it ({io})"),
        Error::NoItemsFound => "no PEM item of the expected kind in it".into(),
        _ => "not a valid PEM file".into(),
    }
}
