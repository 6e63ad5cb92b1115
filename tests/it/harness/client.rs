//! A raw-TCP HTTP/1.1 client: sends exact request bytes and reads the response incrementally,
//! decoding `content-length` and chunked bodies, so a test can see a frame arrive before the
//! upstream has finished, and can tell a complete body from a connection that was cut.

use super::within;
use std::net::SocketAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A request's bytes: `POST path` with these headers and a `content-length` body.
pub fn post(path: &str, headers: &[(&str, &str)], body: &str) -> Vec<u8> {
    let mut out = format!(
        "POST {path} HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (n, v) in headers {
        out.push_str(&format!("{n}: {v}\r\n"));
    }
    out.push_str("\r\n");
    out.push_str(body);
    out.into_bytes()
}

/// A `GET path` request's bytes.
pub fn get(path: &str, headers: &[(&str, &str)]) -> Vec<u8> {
    let mut out = format!("GET {path} HTTP/1.1\r\nhost: localhost\r\n");
    for (n, v) in headers {
        out.push_str(&format!("{n}: {v}\r\n"));
    }
    out.push_str("\r\n");
    out.into_bytes()
}

/// A response head.
#[derive(Debug, Clone)]
pub struct Head {
    /// Status code.
    pub status: u16,
    /// Header fields in order, names lower-cased.
    pub headers: Vec<(String, String)>,
}

impl Head {
    /// The first value of header `name`, if present.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

/// A whole response.
#[derive(Debug, Clone)]
pub struct Response {
    /// Status and headers.
    pub head: Head,
    /// The decoded body.
    pub body: Vec<u8>,
}

impl Response {
    /// The status code.
    pub fn status(&self) -> u16 {
        self.head.status
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body parsed as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }

    /// Asserts an OpenAI error response with `status`, returns the `error` object.
    pub fn openai_error(&self, status: u16) -> serde_json::Value {
        assert_eq!(self.status(), status, "body: {}", self.text());
        assert_eq!(self.head.get("content-type"), Some("application/json"));
        let v = self.json();
        let e = v["error"].clone();
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
        assert!(e["type"].is_string(), "{v}");
        assert!(e.get("param").is_some() && e.get("code").is_some(), "{v}");
        e
    }
}

/// How the body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// `remaining` bytes of a `content-length` body.
    Length(usize),
    /// Chunked: a size line comes next.
    ChunkSize,
    /// Chunked: `remaining` data bytes of the current chunk, then its CRLF.
    ChunkData(usize),
    /// Chunked: the CRLF after a chunk's data.
    ChunkEnd,
    /// Chunked: trailer lines after the last chunk, up to a blank line.
    Trailers,
    /// Until the connection closes.
    Close,
    /// The body is complete.
    Done,
}

/// The body ended before its framing said it was complete: the connection was closed or reset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cut;

/// One client connection.
pub struct Client {
    stream: TcpStream,
    buf: Vec<u8>,
    framing: Framing,
}

impl Client {
    /// Connects to `addr` (bounded wait).
    pub async fn connect(addr: SocketAddr) -> Client {
        let stream = within("connect to the gateway", TcpStream::connect(addr)).await.expect("connect to the gateway");
        Client { stream, buf: Vec::new(), framing: Framing::Done }
    }

    /// Sends raw bytes.
    pub async fn send(&mut self, bytes: &[u8]) {
        within("send to the gateway", self.stream.write_all(bytes)).await.expect("send to the gateway");
    }

    /// Reads more bytes into the buffer; `false` on EOF or error.
    async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 16384];
        match within("bytes from the gateway", self.stream.read(&mut chunk)).await {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
        }
    }

    /// Reads a response head (skipping 1xx) and sets up body decoding.
    pub async fn head(&mut self) -> Head {
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut parsed = httparse::Response::new(&mut headers);
            if let httparse::Status::Complete(len) = parsed.parse(&self.buf).expect("malformed response head") {
                let status = parsed.code.unwrap_or(0);
                let headers: Vec<(String, String)> = parsed
                    .headers
                    .iter()
                    .map(|h| (h.name.to_ascii_lowercase(), String::from_utf8_lossy(h.value).into_owned()))
                    .collect();
                self.buf.drain(..len);
                if (100..200).contains(&status) {
                    continue;
                }
                let head = Head { status, headers };
                let chunked = head.get("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
                self.framing = match (chunked, head.get("content-length")) {
                    _ if status == 204 || status == 304 => Framing::Done,
                    (true, _) => Framing::ChunkSize,
                    (false, Some(n)) => Framing::Length(n.trim().parse().expect("content-length")),
                    (false, None) => Framing::Close,
                };
                if self.framing == Framing::Length(0) {
                    self.framing = Framing::Done;
                }
                return head;
            }
            assert!(
                self.fill().await,
                "the connection ended before a response head; got {:?}",
                String::from_utf8_lossy(&self.buf)
            );
        }
    }

    /// The next piece of body as it arrives: `Ok(None)` once the body is complete, `Err(Cut)`
    /// when the connection ends first.
    pub async fn next(&mut self) -> Result<Option<Vec<u8>>, Cut> {
        loop {
            match self.framing {
                Framing::Done => return Ok(None),
                Framing::Length(remaining) | Framing::ChunkData(remaining) if !self.buf.is_empty() => {
                    let n = remaining.min(self.buf.len());
                    let piece: Vec<u8> = self.buf.drain(..n).collect();
                    self.framing = match (self.framing, n == remaining) {
                        (Framing::Length(_), true) => Framing::Done,
                        (Framing::Length(_), false) => Framing::Length(remaining - n),
                        (_, true) => Framing::ChunkEnd,
                        (_, false) => Framing::ChunkData(remaining - n),
                    };
                    return Ok(Some(piece));
                }
                Framing::Close if !self.buf.is_empty() => return Ok(Some(std::mem::take(&mut self.buf))),
                Framing::ChunkEnd if self.buf.len() >= 2 => {
                    assert_eq!(&self.buf[..2], b"\r\n", "chunk data not followed by CRLF");
                    self.buf.drain(..2);
                    self.framing = Framing::ChunkSize;
                    continue;
                }
                Framing::ChunkSize | Framing::Trailers => {
                    if let Some(end) = self.buf.windows(2).position(|w| w == b"\r\n") {
                        let line: Vec<u8> = self.buf.drain(..end + 2).take(end).collect();
                        if self.framing == Framing::Trailers {
                            if line.is_empty() {
                                self.framing = Framing::Done;
                            }
                            continue;
                        }
                        let text = String::from_utf8_lossy(&line).into_owned();
                        let size = usize::from_str_radix(text.split(';').next().unwrap_or("").trim(), 16)
                            .unwrap_or_else(|_| panic!("bad chunk size line {text:?}"));
                        self.framing = if size == 0 { Framing::Trailers } else { Framing::ChunkData(size) };
                        continue;
                    }
                }
                _ => {}
            }
            if !self.fill().await {
                if self.framing == Framing::Close {
                    self.framing = Framing::Done;
                    return Ok(None);
                }
                return Err(Cut);
            }
        }
    }

    /// Reads body pieces until the body so far contains `needle`; returns the body so far.
    pub async fn until(&mut self, needle: &[u8]) -> Vec<u8> {
        let mut body = Vec::new();
        while !body.windows(needle.len()).any(|w| w == needle) {
            match self.next().await {
                Ok(Some(piece)) => body.extend_from_slice(&piece),
                end => panic!(
                    "the body ended ({end:?}) before {:?}; got {:?}",
                    String::from_utf8_lossy(needle),
                    String::from_utf8_lossy(&body)
                ),
            }
        }
        body
    }

    /// Reads the rest of the body: `Ok` when it completed, `Err` with what came when the
    /// connection was cut first.
    pub async fn rest(&mut self) -> Result<Vec<u8>, Vec<u8>> {
        let mut body = Vec::new();
        loop {
            match self.next().await {
                Ok(Some(piece)) => body.extend_from_slice(&piece),
                Ok(None) => return Ok(body),
                Err(Cut) => return Err(body),
            }
        }
    }

    /// Reads a whole response.
    pub async fn response(&mut self) -> Response {
        let head = self.head().await;
        let body = self.rest().await.unwrap_or_else(|b| panic!("response cut after {:?}", String::from_utf8_lossy(&b)));
        Response { head, body }
    }

    /// Waits until the gateway closes this connection (EOF or error), discarding what comes.
    pub async fn closed(&mut self) {
        while self.fill().await {
            self.buf.clear();
        }
    }
}

/// Sends one request on a new connection and reads the whole response.
pub async fn exchange(addr: SocketAddr, request: &[u8]) -> Response {
    let mut c = Client::connect(addr).await;
    c.send(request).await;
    c.response().await
}
