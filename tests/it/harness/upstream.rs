//! A scripted raw-TCP upstream on 127.0.0.1:0 (plain or TLS).
//!
//! For each request it reads (head parsed with `httparse`, body by `content-length`), it hands
//! the exact request bytes to the test, then plays the [`Script`] the test's closure returns for
//! that request: write bytes, wait for the test's [`Gate`], close, reset, or hang. Whatever the
//! script does, the test can see when the gateway closes the connection ([`Upstream::closed`]):
//! a read returning 0 or an error, or a write failing. A script that ends after writing a whole
//! response leaves the connection open for the next request (keep-alive, as the gateway's pool
//! expects).

use super::within;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// One request as the upstream received it.
#[derive(Debug, Clone)]
pub struct Request {
    /// Which accepted connection it came on (0, 1, ... in accept order).
    pub conn: usize,
    /// The exact bytes: head and body.
    pub raw: Vec<u8>,
    /// Request method.
    pub method: String,
    /// Request target (path and query).
    pub path: String,
    /// `1` for HTTP/1.1.
    pub version: u8,
    /// Header fields in order, names lower-cased.
    pub headers: Vec<(String, Vec<u8>)>,
    /// The body bytes.
    pub body: Vec<u8>,
}

impl Request {
    /// Every value of header `name`, as text.
    pub fn all(&self, name: &str) -> Vec<String> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
            .collect()
    }

    /// The one value of header `name`; panics when it is missing or repeated.
    pub fn header(&self, name: &str) -> String {
        let all = self.all(name);
        assert_eq!(all.len(), 1, "header `{name}` present {} times in {:?}", all.len(), self.headers);
        all.into_iter().next().unwrap_or_default()
    }

    /// The header names, lower-case and sorted.
    pub fn header_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.headers.iter().map(|(n, _)| n.clone()).collect();
        names.sort();
        names
    }

    /// The body as text.
    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A signal from the test to a script waiting on it. Opening before the wait is not lost.
#[derive(Clone, Default)]
pub struct Gate(Arc<Notify>);

impl Gate {
    /// A closed gate.
    pub fn new() -> Self {
        Gate::default()
    }

    /// Lets the waiting script go on.
    pub fn open(&self) {
        self.0.notify_one();
    }
}

/// One step of a script.
pub enum Step {
    /// Write these bytes.
    Write(Vec<u8>),
    /// Wait until the test opens the gate (a gateway close meanwhile is reported and ends the
    /// connection).
    Wait(Gate),
    /// Pause before the next step. This only varies how the gateway's reads cut the bytes;
    /// no test asserts on timing.
    Pause(std::time::Duration),
    /// Close the connection (FIN).
    Close,
    /// Reset the connection (RST, via SO_LINGER 0).
    Reset,
    /// Never write again; wait for the gateway to close the connection.
    Hang,
}

/// What the upstream does with one request.
pub type Script = Vec<Step>;

type Scripter = Arc<dyn Fn(&Request) -> Script + Send + Sync>;

/// A running scripted upstream; stops when dropped.
pub struct Upstream {
    /// Where it listens.
    pub addr: SocketAddr,
    requests: mpsc::UnboundedReceiver<Request>,
    closed: mpsc::UnboundedReceiver<usize>,
    task: JoinHandle<()>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Upstream {
    /// A plain-HTTP upstream answering each request with `script(&request)`.
    pub async fn start(script: impl Fn(&Request) -> Script + Send + Sync + 'static) -> Upstream {
        Self::serve(None, Arc::new(script)).await
    }

    /// The same over TLS.
    pub async fn start_tls(
        acceptor: TlsAcceptor,
        script: impl Fn(&Request) -> Script + Send + Sync + 'static,
    ) -> Upstream {
        Self::serve(Some(acceptor), Arc::new(script)).await
    }

    async fn serve(tls: Option<TlsAcceptor>, script: Scripter) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the mock upstream");
        let addr = listener.local_addr().expect("mock upstream address");
        let (req_tx, requests) = mpsc::unbounded_channel();
        let (closed_tx, closed) = mpsc::unbounded_channel();
        let ids = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((tcp, _)) = listener.accept().await {
                let id = ids.fetch_add(1, Ordering::Relaxed);
                let (script, req_tx, closed_tx, tls) = (script.clone(), req_tx.clone(), closed_tx.clone(), tls.clone());
                conns.spawn(async move {
                    let conn = match tls {
                        None => Conn::Plain(tcp),
                        Some(acceptor) => match acceptor.accept(tcp).await {
                            Ok(s) => Conn::Tls(Box::new(s)),
                            // The gateway refused our certificate: nothing to serve.
                            Err(_) => return,
                        },
                    };
                    if serve_conn(id, conn, &*script, &req_tx).await == End::PeerClosed {
                        let _ = closed_tx.send(id);
                    }
                });
            }
        });
        Upstream { addr, requests, closed, task }
    }

    /// The next request received (bounded wait).
    pub async fn request(&mut self) -> Request {
        within("the upstream to receive a request", self.requests.recv()).await.expect("upstream stopped")
    }

    /// The id of the next connection the gateway closed (bounded wait).
    pub async fn closed(&mut self) -> usize {
        within("the gateway to close an upstream connection", self.closed.recv()).await.expect("upstream stopped")
    }

    /// A request received so far but not yet taken, if any (never waits).
    pub fn try_request(&mut self) -> Option<Request> {
        self.requests.try_recv().ok()
    }
}

/// How a connection ended.
#[derive(PartialEq, Eq)]
enum End {
    /// The gateway closed it (read 0 / error, or a write failed).
    PeerClosed,
    /// The script closed or reset it.
    Ours,
}

async fn serve_conn(
    id: usize,
    mut conn: Conn,
    script: &(dyn Fn(&Request) -> Script + Send + Sync),
    req_tx: &mpsc::UnboundedSender<Request>,
) -> End {
    let mut buf = Vec::new();
    loop {
        let Some(req) = read_request(id, &mut conn, &mut buf).await else {
            return End::PeerClosed;
        };
        let steps = script(&req);
        let _ = req_tx.send(req);
        for step in steps {
            match step {
                Step::Write(bytes) => {
                    if conn.write_all(&bytes).await.is_err() || conn.flush().await.is_err() {
                        return End::PeerClosed;
                    }
                }
                Step::Wait(gate) => {
                    // Watch the connection meanwhile, so a gateway close is seen at once.
                    let mut chunk = [0u8; 4096];
                    loop {
                        tokio::select! {
                            _ = gate.0.notified() => break,
                            n = conn.read(&mut chunk) => match n {
                                Ok(0) | Err(_) => return End::PeerClosed,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            },
                        }
                    }
                }
                Step::Pause(d) => tokio::time::sleep(d).await,
                Step::Close => {
                    let _ = conn.shutdown().await;
                    return End::Ours;
                }
                Step::Reset => {
                    conn.reset();
                    return End::Ours;
                }
                Step::Hang => {
                    let mut chunk = [0u8; 4096];
                    loop {
                        match conn.read(&mut chunk).await {
                            Ok(0) | Err(_) => return End::PeerClosed,
                            Ok(_) => {}
                        }
                    }
                }
            }
        }
    }
}

/// Reads one request (head + `content-length` body); `None` when the peer closed first.
async fn read_request(conn_id: usize, conn: &mut Conn, buf: &mut Vec<u8>) -> Option<Request> {
    let mut chunk = [0u8; 8192];
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut parsed = httparse::Request::new(&mut headers);
        if let httparse::Status::Complete(head_len) =
            parsed.parse(buf).expect("the gateway sent a malformed request head")
        {
            let headers: Vec<(String, Vec<u8>)> =
                parsed.headers.iter().map(|h| (h.name.to_ascii_lowercase(), h.value.to_vec())).collect();
            let length = headers
                .iter()
                .find(|(n, _)| n == "content-length")
                .map_or(0, |(_, v)| std::str::from_utf8(v).ok().and_then(|v| v.parse().ok()).expect("content-length"));
            assert!(
                !headers.iter().any(|(n, _)| n == "transfer-encoding"),
                "the mock upstream reads content-length bodies only"
            );
            let (method, path, version) = (
                parsed.method.unwrap_or_default().to_owned(),
                parsed.path.unwrap_or_default().to_owned(),
                parsed.version.unwrap_or(1),
            );
            while buf.len() < head_len + length {
                match conn.read(&mut chunk).await {
                    Ok(0) | Err(_) => return None,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            let raw: Vec<u8> = buf.drain(..head_len + length).collect();
            let body = raw[head_len..].to_vec();
            return Some(Request { conn: conn_id, raw, method, path, version, headers, body });
        }
        match conn.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// A plain or TLS server-side connection.
enum Conn {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl Conn {
    /// Makes the coming drop send RST instead of FIN.
    fn reset(&self) {
        let tcp = match self {
            Conn::Plain(s) => s,
            Conn::Tls(s) => s.get_ref().0,
        };
        tcp.set_zero_linger().expect("SO_LINGER 0");
    }
}

impl AsyncRead for Conn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

// ----------------------------------------------------------------------------------------------
// Response bytes for scripts.

/// A complete response with a `content-length` body.
pub fn response(status: u16, content_type: &str, extra_headers: &[(&str, &str)], body: &str) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status} {}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\n",
        reason(status),
        body.len()
    );
    for (n, v) in extra_headers {
        out.push_str(&format!("{n}: {v}\r\n"));
    }
    out.push_str("\r\n");
    out.push_str(body);
    out.into_bytes()
}

/// A `200` JSON response.
pub fn json(body: &str) -> Vec<u8> {
    response(200, "application/json", &[], body)
}

/// The head of a chunked `text/event-stream` response.
pub fn sse_head(extra_headers: &[(&str, &str)]) -> Vec<u8> {
    let mut out = String::from("HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n");
    for (n, v) in extra_headers {
        out.push_str(&format!("{n}: {v}\r\n"));
    }
    out.push_str("\r\n");
    out.into_bytes()
}

/// One chunk of a chunked body.
pub fn chunk(data: &[u8]) -> Vec<u8> {
    let mut out = format!("{:x}\r\n", data.len()).into_bytes();
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
    out
}

/// The end of a chunked body.
pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        401 => "Unauthorized",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        _ => "Other",
    }
}
