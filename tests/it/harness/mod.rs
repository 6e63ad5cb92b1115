//! The socket-level harness: the gateway started in-process on 127.0.0.1:0, a scripted raw-TCP
//! upstream ([`upstream`]), and a raw-TCP client ([`client`]). Every wait is bounded by
//! [`within`], so a hang fails the test instead of stalling the run.

pub mod client;
pub mod upstream;

use lmgate::config::Config;
use lmgate::proxy::Proxy;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The bound on any single wait in these tests.
pub const WAIT: Duration = Duration::from_secs(5);

/// Awaits `fut`, failing the test with `what` if it takes longer than [`WAIT`].
pub async fn within<F: Future>(what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(WAIT, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {WAIT:?} waiting for {what}"),
    }
}

/// A gateway serving in this test's runtime.
pub struct Gateway {
    /// Where it listens.
    pub addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    served: Option<JoinHandle<()>>,
}

impl Gateway {
    /// Parses `toml` (no environment variables), binds 127.0.0.1:0 and serves.
    pub fn start(toml: &str) -> Gateway {
        let cfg = Config::parse(toml, &|_: &str| -> Option<String> { None })
            .unwrap_or_else(|e| panic!("config: {e}\n{toml}"));
        Gateway::serve(Arc::new(Proxy::new(cfg).unwrap_or_else(|e| panic!("proxy: {e}"))))
    }

    /// Binds 127.0.0.1:0 and serves `proxy` (which the test keeps, to reload it).
    pub fn serve(proxy: Arc<Proxy>) -> Gateway {
        let listener = lmgate::server::bind("127.0.0.1:0".parse().expect("address")).expect("bind the gateway");
        let addr = listener.local_addr().expect("gateway address");
        let (tx, rx) = oneshot::channel::<()>();
        let served = tokio::spawn(lmgate::server::serve(listener, proxy, async {
            rx.await.ok();
        }));
        Gateway { addr, shutdown: Some(tx), served: Some(served) }
    }

    /// Triggers graceful shutdown.
    pub fn shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    /// Waits (bounded) for the serve future to return.
    pub async fn stopped(&mut self) {
        let served = self.served.take().expect("stopped twice");
        within("the serve future to return", served).await.expect("the serve task panicked");
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// A config with one OpenAI-compatible connection `up` at `upstream` (`/v1` base, key
/// `sk-up`), routes `"alias" = "up.real"` and `"m*" = "up.*"`, plus `connection` lines added to
/// `[connections.up]` and `rest` appended (more tables).
pub fn config(upstream: SocketAddr, connection: &str, rest: &str) -> String {
    format!(
        "[connections.up]\napi_type = \"openai\"\napi_base = \"http://{upstream}/v1\"\napi_key = \"sk-up\"\n{connection}\n\
         [routing]\n\"alias\" = \"up.real\"\n\"m*\" = \"up.*\"\n\n{rest}\n"
    )
}

/// A local port nobody listens on (bound, then released).
pub fn dead_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("address")
}
