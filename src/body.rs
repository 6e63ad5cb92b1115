//! Response (and upstream request) bodies, driven by hyper's poll: no task, no channel.
//!
//! - [`Body::full`]: one buffer (errors, local answers).
//! - [`Body::chunks`]: a list of buffers sent as frames, optionally paced (the mock's streams,
//!   spliced upstream requests that are a few slices of the client's own body).
//! - [`Body::passthrough`]: an upstream body forwarded as it arrives. It owns the upstream body,
//!   so a slow client stops us reading upstream (backpressure) and a gone client drops the
//!   upstream connection (cancellation). The unit of forwarding is the upstream read, not the
//!   event: each poll takes every upstream read that is ready (without waiting for more) and
//!   sends their bytes as one frame ([`Out`]): a single read goes out as a slice of the
//!   upstream's buffer, several are gathered into one reused buffer. Per-event frames would make
//!   hyper pay a chunk header, a buffer slot and often a flush per 100-byte event. SSE is cut at
//!   event boundaries only to observe usage and to hold a trailing partial event until its end
//!   (the client can do nothing with half an event, and an error event after a failure must not
//!   be glued onto one); the one removal is the usage-only event the gateway asked for on the
//!   client's behalf. JSON keeps a small tail in which the usage is read at the end. Between
//!   frames an idle timeout runs; once the head is sent a failure becomes one final SSE error
//!   event (streams) or an aborted body (JSON). [`Body::passthrough_from`] runs the same loop over
//!   any `http_body::Body` (the frame and zero-allocation tests drive it that way).
//!
//! [`Recorded`] pairs a response body with the request's [`Record`], written when it is dropped.

use crate::error::{Dialect, Error, Kind};
use crate::json::{self, Usage};
use crate::provider::Translate;
use crate::record::{Outcome, Record};
use crate::sse;
use bytes::{Bytes, BytesMut};
use http_body::{Body as _, Frame, SizeHint};
use hyper::body::Incoming;
use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::LazyLock;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};
use tokio::time::Sleep;

/// The error type of bodies: hyper aborts the connection when a body fails.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A request or response body.
pub struct Body {
    inner: Inner,
}

impl Default for Body {
    /// An empty body.
    fn default() -> Self {
        Body::full(Bytes::new())
    }
}

/// A response body with the request's [`Record`], written when it is dropped. Kept apart from
/// [`Body`] so the flow moves small bodies around and the record is attached once, at the end.
pub struct Recorded {
    body: Body,
    record: Record,
}

enum Inner {
    Full(Option<Bytes>),
    Chunks(Box<Paced>),
    Passthrough(Box<Passthrough>),
}

impl Body {
    /// A body of one buffer.
    pub fn full(b: impl Into<Bytes>) -> Self {
        Body { inner: Inner::Full(Some(b.into())) }
    }

    /// Buffers sent one frame each, with `delay` between them (the first goes at once).
    pub fn chunks(chunks: Vec<Bytes>, delay: Duration) -> Self {
        let len = chunks.iter().map(Bytes::len).sum();
        let paced = Paced { chunks: chunks.into(), delay, sleep: None, len };
        Body { inner: Inner::Chunks(Box::new(paced)) }
    }

    /// An upstream body forwarded as it arrives; see the module documentation.
    pub fn passthrough(upstream: Upstream, mode: Mode, idle: Duration, connection: &str) -> Self {
        Self::passthrough_upstream(upstream, mode, idle, connection)
    }

    /// [`Body::passthrough`] over any body standing in for the upstream's: the same poll loop,
    /// for in-process upstreams and for tests that drive it without a socket. Boxed, so the
    /// hyper path pays nothing for it.
    pub fn passthrough_from<B>(upstream: B, mode: Mode, idle: Duration, connection: &str) -> Self
    where
        B: http_body::Body<Data = Bytes> + Send + Sync + 'static,
        B::Error: Into<BoxError>,
    {
        let boxed = Box::pin(http_body_util::BodyExt::map_err(upstream, Into::into));
        Self::passthrough_upstream(Upstream::Boxed(boxed), mode, idle, connection)
    }

    fn passthrough_upstream(upstream: Upstream, mode: Mode, idle: Duration, connection: &str) -> Self {
        let p = Passthrough {
            upstream,
            mode,
            idle,
            last_frame: Instant::now(),
            sleep: None,
            out: Out::default(),
            next: None,
            done: false,
            connection: connection.to_owned(),
        };
        Body { inner: Inner::Passthrough(Box::new(p)) }
    }

    /// Waits (at most `within`) for an upstream body's first bytes and keeps them for the first
    /// frame, so that the response head is only committed once the upstream has started: a
    /// stream that does not start is a failed attempt, and the next attempt can still answer.
    /// Bodies that are not forwarded from an upstream have their bytes already.
    pub async fn first_bytes(&mut self, within: Duration, connection: &str) -> Result<(), Error> {
        let Inner::Passthrough(p) = &mut self.inner else { return Ok(()) };
        let first = std::future::poll_fn(|cx| loop {
            match ready!(p.upstream.poll_frame(cx)) {
                Some(Ok(frame)) if frame.data_ref().is_some_and(|d| d.is_empty()) => continue,
                Some(Ok(frame)) if frame.is_data() => return Poll::Ready(Ok(frame)),
                // Trailers, or the end: no bytes came at all.
                Some(Ok(_)) | None => return Poll::Ready(Err("the upstream stream ended before its first bytes")),
                Some(Err(_)) => return Poll::Ready(Err("the upstream connection failed before the first bytes")),
            }
        });
        match tokio::time::timeout(within, first).await {
            Ok(Ok(frame)) => {
                p.next = Some(frame);
                p.last_frame = Instant::now();
                Ok(())
            }
            Ok(Err(why)) => {
                Err(Error::upstream_failure(Kind::UpstreamClosed, format!("Connection `{connection}`: {why}.")))
            }
            Err(_) => Err(Error::upstream_failure(
                Kind::UpstreamTimeout,
                format!(
                    "Connection `{connection}`: the stream sent nothing within {within:?} (first_token_timeout_secs)."
                ),
            )),
        }
    }

    /// Reads a forwarded JSON body whole, up to about `limit` bytes (what is read is kept for the
    /// client), and returns the usage in it once it is all in: so the response head can carry
    /// what the request cost. A larger body, or one of another kind, is left to be forwarded as
    /// it comes. The connection's idle timeout bounds every wait.
    pub async fn settle(&mut self, limit: usize, connection: &str) -> Result<Option<Usage>, Error> {
        let Inner::Passthrough(p) = &mut self.inner else { return Ok(None) };
        if !matches!(p.mode, Mode::Json { .. }) {
            return Ok(None);
        }
        let mut usage = None;
        while !p.done && p.out.len() < limit {
            let frame = std::future::poll_fn(|cx| p.upstream.poll_frame(cx));
            let ended = match tokio::time::timeout(p.idle, frame).await {
                Err(_) => {
                    let why = format!("Connection `{connection}`: no data from the upstream for {:?}.", p.idle);
                    return Err(Error::upstream_failure(Kind::UpstreamTimeout, why));
                }
                Ok(Some(Err(_))) => {
                    let why = format!("Connection `{connection}`: the upstream connection failed mid-response.");
                    return Err(Error::upstream_failure(Kind::UpstreamBroken, why));
                }
                Ok(None) => true,
                Ok(Some(Ok(frame))) => {
                    p.last_frame = Instant::now();
                    if let Ok(data) = frame.into_data() {
                        p.feed(data, &mut usage)?;
                    }
                    p.upstream.is_end_stream()
                }
            };
            if ended {
                p.finish(&mut usage)?;
                p.done = true;
            }
        }
        Ok(usage)
    }

    /// When the upstream's last body bytes arrived, for a forwarded body.
    fn upstream_last(&self) -> Option<Instant> {
        match &self.inner {
            Inner::Passthrough(p) => Some(p.last_frame),
            _ => None,
        }
    }

    /// Attaches the request record, written when the body is dropped.
    pub fn with_record(self, record: Record) -> Recorded {
        Recorded { body: self, record }
    }

    fn poll_recorded(
        &mut self,
        cx: &mut Context<'_>,
        record: Option<&mut Record>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut self.inner {
            Inner::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Inner::Chunks(p) => p.poll_frame(cx),
            Inner::Passthrough(p) => p.poll_frame(cx, record),
        }
    }
}

/// How a passthrough body is observed.
pub enum Mode {
    /// Server-sent events, cut at event boundaries.
    Sse(SseState),
    /// A JSON document: forwarded untouched, usage read from its tail.
    Json {
        /// The last bytes seen.
        tail: Vec<u8>,
    },
    /// Anything else (error bodies): forwarded untouched.
    Opaque,
    /// A provider stream decoded and rewritten into OpenAI SSE.
    Translate(Box<Translating>),
}

/// Translation state: the decoder the provider's framing needs and the provider's translator.
pub struct Translating {
    decoder: sse::FramedDecoder,
    translator: Box<dyn Translate>,
}

impl Translating {
    /// Translation of one response stream by `translator`; events larger than
    /// [`MAX_HELD_EVENT`] end the stream with an error.
    pub fn new(translator: Box<dyn Translate>) -> Self {
        let decoder = sse::FramedDecoder::new(translator.framing(), MAX_HELD_EVENT);
        Translating { decoder, translator }
    }

    /// Decodes one upstream chunk and translates its events, appending what they produce to
    /// `out`. An error (in-band upstream error, malformed or oversized event) is returned for
    /// the body to send as the final event.
    pub fn feed(&mut self, data: &[u8], connection: &str, out: &mut BytesMut) -> Result<(), Error> {
        let Translating { decoder, translator } = self;
        // Reserve while the buffer is empty: once the last output has been written and dropped,
        // this reclaims the same allocation instead of growing mid-feed. OpenAI chunks run up to
        // about twice the size of the provider events they come from.
        if out.is_empty() {
            out.reserve(data.len() * 2 + 512);
        }
        let mut failed = None;
        let fed = decoder.feed(data, |ev| {
            if failed.is_none() && !translator.done() {
                failed = translator.event(&ev, out).err();
                if failed.is_none() && out.len() > MAX_OUT_PER_READ {
                    failed = Some(Error::upstream_failure(
                        Kind::UpstreamMalformed,
                        format!(
                            "Connection `{connection}`: one read of the stream translated to more than {MAX_OUT_PER_READ} bytes."
                        ),
                    ));
                }
            }
        });
        if let Err(e) = fed {
            failed.get_or_insert(Error::upstream_failure(
                Kind::UpstreamMalformed,
                format!("Connection `{connection}`: {e}."),
            ));
        }
        failed.map_or(Ok(()), Err)
    }

    /// The upstream stream ended: the decoder hands on what it still holds (a last NDJSON line
    /// without its LF), then the translator's end-of-stream hook runs; what they produce is
    /// appended to `out`. An error (the stream was cut short) is returned for the body to send
    /// last.
    pub fn finish(&mut self, connection: &str, out: &mut BytesMut) -> Result<(), Error> {
        let Translating { decoder, translator } = self;
        let mut failed = None;
        decoder.finish(|ev| {
            if failed.is_none() && !translator.done() {
                failed = translator.event(&ev, out).err();
            }
        });
        let finished = match failed {
            Some(e) => Err(e),
            None => translator.finish(out),
        };
        finished.map_err(|mut e| {
            e.message = format!("Connection `{connection}`: {}", e.message);
            e
        })
    }

    /// Whether the provider's stream reached its end.
    pub fn done(&self) -> bool {
        self.translator.done()
    }

    /// Usage seen so far.
    pub fn usage(&self) -> Option<Usage> {
        self.translator.usage()
    }
}

/// SSE passthrough state.
pub struct SseState {
    splitter: sse::Splitter,
    partial: BytesMut,
    /// The partial event grew past [`MAX_HELD_EVENT`]; it is forwarded without inspection.
    oversized: bool,
    strip_usage: bool,
    /// The last complete event was removed (so is the LF that may finish its CRLF).
    last_removed: bool,
    scratch: Vec<u8>,
}

/// Largest partial event held back for inspection before it is forwarded as is.
pub const MAX_HELD_EVENT: usize = 4 << 20;
/// Most bytes one upstream read may translate to. Translators copy little into each chunk (ids
/// and model names are capped), so a real stream stays far below; an upstream crafted to
/// amplify (many tiny events, each expanded) ends with an error instead of growing the buffer
/// without bound.
pub const MAX_OUT_PER_READ: usize = 16 << 20;
const TAIL: usize = 4096;

impl Mode {
    /// SSE passthrough; `strip_usage` removes the usage-only event (the gateway asked for it).
    pub fn sse(strip_usage: bool) -> Self {
        Mode::Sse(SseState {
            splitter: sse::Splitter::default(),
            partial: BytesMut::new(),
            oversized: false,
            strip_usage,
            last_removed: false,
            scratch: Vec::new(),
        })
    }

    /// A translated provider stream.
    pub fn translate(translator: Box<dyn Translate>) -> Self {
        Mode::Translate(Box::new(Translating::new(translator)))
    }

    /// JSON passthrough that reads usage at the end.
    pub fn json() -> Self {
        Mode::Json { tail: Vec::with_capacity(TAIL) }
    }
}

struct Paced {
    chunks: VecDeque<Bytes>,
    delay: Duration,
    sleep: Option<Pin<Box<Sleep>>>,
    len: usize,
}

/// An upstream's response body: hyper's, an in-process upstream's (the mock), or a boxed
/// stand-in ([`Body::passthrough_from`]).
pub enum Upstream {
    /// From a network upstream.
    Hyper(Incoming),
    /// From an in-process upstream.
    Local(Body),
    /// Any other body (tests, benches).
    Boxed(Pin<Box<dyn http_body::Body<Data = Bytes, Error = BoxError> + Send + Sync>>),
}

impl Upstream {
    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self {
            Upstream::Hyper(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            Upstream::Local(b) => Pin::new(b).poll_frame(cx),
            Upstream::Boxed(b) => b.as_mut().poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Upstream::Hyper(b) => b.is_end_stream(),
            Upstream::Local(b) => b.is_end_stream(),
            Upstream::Boxed(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Upstream::Hyper(b) => b.size_hint(),
            Upstream::Local(b) => b.size_hint(),
            Upstream::Boxed(b) => b.size_hint(),
        }
    }
}

impl http_body::Body for Upstream {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.get_mut().poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        Upstream::is_end_stream(self)
    }

    fn size_hint(&self) -> SizeHint {
        Upstream::size_hint(self)
    }
}

/// The bytes for the client's next frame, gathered from every upstream read that is ready.
///
/// One piece goes out as it is: a slice of the upstream's buffer, no copy. More pieces are copied
/// into one buffer, reused from frame to frame: reserving while it is empty reclaims the
/// allocation of the last frame once hyper has written and dropped it, so a steady stream
/// allocates nothing.
#[derive(Default)]
pub struct Out {
    first: Option<Bytes>,
    buf: BytesMut,
}

impl Out {
    /// Appends a piece, without copying it if it is the only one.
    pub fn push(&mut self, piece: Bytes) {
        if piece.is_empty() {
            return;
        }
        if self.first.is_none() && self.buf.is_empty() {
            self.first = Some(piece);
        } else {
            self.buffer(piece.len()).extend_from_slice(&piece);
        }
    }

    /// The buffer, to append `more` bytes to (the single piece, if any, moved into it first).
    pub fn buffer(&mut self, more: usize) -> &mut BytesMut {
        let first = self.first.take();
        let len = first.as_ref().map_or(0, Bytes::len);
        if self.buf.is_empty() {
            self.buf.reserve((len + more).max(4096));
        }
        if let Some(f) = first {
            self.buf.extend_from_slice(&f);
        }
        &mut self.buf
    }

    /// Bytes gathered so far.
    pub fn len(&self) -> usize {
        self.first.as_ref().map_or(self.buf.len(), Bytes::len)
    }

    /// Whether nothing is gathered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The gathered bytes as one frame, if there are any.
    pub fn take(&mut self) -> Option<Bytes> {
        match self.first.take() {
            Some(f) => Some(f),
            None if self.buf.is_empty() => None,
            None => Some(self.buf.split().freeze()),
        }
    }
}

/// Gathering stops once this much is ready for the client: the per-frame cost is then small
/// against the bytes, and a large upstream read is never copied to join a small one.
const GATHER: usize = 16 << 10;

struct Passthrough {
    upstream: Upstream,
    mode: Mode,
    idle: Duration,
    last_frame: Instant,
    sleep: Option<Pin<Box<Sleep>>>,
    out: Out,
    /// An upstream read taken but not yet handled: a large one, which waits for the gathered
    /// bytes before it to go out first.
    next: Option<Frame<Bytes>>,
    done: bool,
    connection: String,
}

static USAGE_KEY: LazyLock<memchr::memmem::Finder<'static>> =
    LazyLock::new(|| memchr::memmem::Finder::new(b"\"usage\""));

impl SseState {
    /// Splits `data` into events, queueing what goes to the client. Observes usage.
    fn feed(&mut self, data: Bytes, out: &mut Out, usage: &mut Option<Usage>) {
        let mut emit_from = 0; // start of bytes of `data` not yet queued
        let mut from = 0;
        // The LF of a CRLF that closed the last event of the previous chunk belongs to that
        // event: it goes where the event went (to the client, or away with a removed event),
        // whatever becomes of the event after it.
        if self.partial.is_empty() && !self.oversized && self.splitter.continues_line_end(&data) {
            from = 1;
            emit_from = usize::from(self.last_removed);
        }
        while let Some(end) = self.splitter.next_end(&data, from) {
            self.last_removed = false;
            if self.oversized {
                // The rest of an event too large to inspect: forward it.
                self.oversized = false;
            } else if !self.partial.is_empty() {
                self.partial.extend_from_slice(&data[from..end]);
                let partial = std::mem::take(&mut self.partial);
                if self.keep(&partial, usage) {
                    out.buffer(partial.len()).extend_from_slice(&partial);
                } else {
                    self.last_removed = true;
                }
                self.partial = partial;
                self.partial.clear();
                emit_from = end;
            } else if !self.keep(&data[from..end], usage) {
                if from > emit_from {
                    out.push(data.slice(emit_from..from));
                }
                emit_from = end;
                self.last_removed = true;
            }
            from = end;
        }
        if from > emit_from {
            out.push(data.slice(emit_from..from));
        }
        if from < data.len() {
            if self.oversized {
                out.push(data.slice(from..));
            } else {
                self.partial.extend_from_slice(&data[from..]);
                if self.partial.len() > MAX_HELD_EVENT {
                    out.buffer(self.partial.len()).extend_from_slice(&self.partial);
                    self.partial.clear();
                    self.oversized = true;
                }
            }
        }
    }

    /// Whether an event goes to the client; records its usage if it has any.
    fn keep(&mut self, event: &[u8], usage: &mut Option<Usage>) -> bool {
        // Once usage is asked for, OpenAI puts `"usage":null` in every chunk: only an event in
        // which some `"usage"` is followed by anything but `null` is worth parsing.
        if USAGE_KEY.find_iter(event).all(|at| null_follows(&event[at + USAGE_KEY.needle().len()..])) {
            return true;
        }
        let Some(data) = sse::data(event, &mut self.scratch) else { return true };
        match json::usage(data) {
            Some((u, usage_only)) => {
                *usage = Some(u);
                !(self.strip_usage && usage_only)
            }
            None => true,
        }
    }
}

/// Whether `rest`, the bytes after a `"usage"` key, read `: null` (JSON whitespace allowed).
fn null_follows(rest: &[u8]) -> bool {
    let ws = |b: &u8| matches!(b, b' ' | b'\t' | b'\n' | b'\r');
    let Some(colon) = rest.iter().position(|b| !ws(b)) else { return false };
    if rest[colon] != b':' {
        return false;
    }
    let value = &rest[colon + 1..];
    value.iter().position(|b| !ws(b)).is_some_and(|v| value[v..].starts_with(b"null"))
}

impl Passthrough {
    fn feed(&mut self, data: Bytes, usage: &mut Option<Usage>) -> Result<(), Error> {
        match &mut self.mode {
            Mode::Sse(s) => s.feed(data, &mut self.out, usage),
            Mode::Translate(t) => {
                let fed = t.feed(&data, &self.connection, self.out.buffer(0));
                *usage = t.usage();
                fed?;
                if t.done() {
                    // Anything after the provider's end event is not for the client.
                    self.done = true;
                }
            }
            Mode::Json { tail } => {
                if data.len() >= TAIL {
                    tail.clear();
                    tail.extend_from_slice(&data[data.len() - TAIL..]);
                } else {
                    let keep = (TAIL - data.len()).min(tail.len());
                    tail.drain(..tail.len() - keep);
                    tail.extend_from_slice(&data);
                }
                self.out.push(data);
            }
            Mode::Opaque => self.out.push(data),
        }
        Ok(())
    }

    /// The upstream ended normally; a translated stream must have reached its end event.
    fn finish(&mut self, usage: &mut Option<Usage>) -> Result<(), Error> {
        match &mut self.mode {
            Mode::Sse(s) if !s.partial.is_empty() => {
                // An unterminated last event: forward it as it came (the client discards it).
                self.out.buffer(s.partial.len()).extend_from_slice(&s.partial);
                s.partial.clear();
            }
            Mode::Json { tail } => {
                if let Some(u) = json::usage_in_tail(tail) {
                    *usage = Some(u);
                }
            }
            Mode::Translate(t) => {
                t.finish(&self.connection, self.out.buffer(0))?;
                *usage = t.usage();
            }
            _ => {}
        }
        Ok(())
    }

    /// The upstream failed after the head went out. Streams end with an error event; other
    /// bodies are aborted.
    fn fail(&mut self, e: Error, record: Option<&mut Record>) -> Result<(), BoxError> {
        self.done = true;
        if let Some(r) = record {
            r.outcome = Outcome::UpstreamFailed;
            r.error = Some(e.clone());
        }
        match &mut self.mode {
            Mode::Sse(s) => {
                // A held partial event never reached the client; drop it so the error event
                // is not glued onto it.
                s.partial.clear();
                self.out.push(e.render_event(Dialect::Openai));
                Ok(())
            }
            Mode::Translate(_) => {
                self.out.push(e.render_event(Dialect::Openai));
                Ok(())
            }
            _ => Err(Box::new(e)),
        }
    }

    /// The next frame for the client: everything the upstream has ready now, gathered (up to
    /// [`GATHER`] bytes), sent as soon as the upstream has nothing more ready. It never waits for
    /// more data to fill a frame: a paced stream goes out read by read.
    fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
        mut record: Option<&mut Record>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let ready = |out: &mut Out| Poll::Ready(out.take().map(|b| Ok(Frame::data(b))));
        loop {
            if self.done || self.out.len() >= GATHER {
                return ready(&mut self.out);
            }
            let polled = match self.next.take() {
                Some(frame) => Poll::Ready(Some(Ok(frame))),
                None => self.upstream.poll_frame(cx),
            };
            let mut usage = None;
            match polled {
                Poll::Ready(Some(Ok(frame))) => {
                    self.last_frame = Instant::now();
                    let data = match frame.into_data() {
                        // A large read joins nothing: what is gathered goes first, alone.
                        Ok(data) if data.len() >= GATHER && !self.out.is_empty() => {
                            self.next = Some(Frame::data(data));
                            return ready(&mut self.out);
                        }
                        Ok(data) => data,
                        // Upstream trailers are dropped: no allow-list covers them, and they could
                        // carry anything (a provider's internal ids, a set-cookie).
                        Err(_trailers) => continue,
                    };
                    let fed = self.feed(data, &mut usage);
                    // A body of known length is over with its last byte: hyper stops polling
                    // this body once it has sent that many, so finish now, not on a later poll.
                    let ended = match fed {
                        Ok(()) if self.upstream.is_end_stream() && !self.done => self.finish(&mut usage),
                        other => other,
                    };
                    match ended {
                        Ok(()) if self.upstream.is_end_stream() => self.done = true,
                        Ok(()) => {}
                        Err(e) => self.fail(e, record.as_deref_mut())?,
                    }
                }
                Poll::Ready(Some(Err(_))) => {
                    let e = Error::upstream_failure(
                        Kind::UpstreamBroken,
                        format!("Connection `{}`: the upstream connection failed mid-response.", self.connection),
                    );
                    self.fail(e, record.as_deref_mut())?;
                }
                Poll::Ready(None) => match self.finish(&mut usage) {
                    Ok(()) => self.done = true,
                    Err(e) => self.fail(e, record.as_deref_mut())?,
                },
                Poll::Pending if !self.out.is_empty() => return ready(&mut self.out),
                Poll::Pending => {
                    // Idle timeout, lazily: the timer is only re-armed when it fires early.
                    let deadline = self.last_frame + self.idle;
                    let sleep = self.sleep.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline.into())));
                    loop {
                        ready!(sleep.as_mut().poll(cx));
                        let deadline = self.last_frame + self.idle;
                        if Instant::now() >= deadline {
                            break;
                        }
                        sleep.as_mut().reset(deadline.into());
                    }
                    let e = Error::upstream_failure(
                        Kind::UpstreamTimeout,
                        format!("Connection `{}`: no data from the upstream for {:?}.", self.connection, self.idle),
                    );
                    self.fail(e, record.as_deref_mut())?;
                }
            }
            if let (Some(u), Some(r)) = (usage, record.as_deref_mut()) {
                r.usage = Some(u);
            }
        }
    }
}

use std::future::Future;

impl Paced {
    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.chunks.is_empty() {
            return Poll::Ready(None);
        }
        if let Some(sleep) = &mut self.sleep {
            ready!(sleep.as_mut().poll(cx));
        }
        let chunk = self.chunks.pop_front();
        if !self.delay.is_zero() && !self.chunks.is_empty() {
            let at = tokio::time::Instant::now() + self.delay;
            match &mut self.sleep {
                Some(s) => s.as_mut().reset(at),
                None => self.sleep = Some(Box::pin(tokio::time::sleep_until(at))),
            }
        }
        if let Some(c) = &chunk {
            self.len -= c.len();
        }
        Poll::Ready(chunk.map(|c| Ok(Frame::data(c))))
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.get_mut().poll_recorded(cx, None)
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Full(b) => b.is_none(),
            Inner::Chunks(p) => p.chunks.is_empty(),
            Inner::Passthrough(p) => p.done && p.out.is_empty() && p.next.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Inner::Chunks(p) => SizeHint::with_exact(p.len as u64),
            Inner::Passthrough(p) => match p.mode {
                Mode::Sse(_) | Mode::Translate(_) => SizeHint::default(),
                _ => {
                    // The upstream's hint counts what it has not yet handed over; bytes already
                    // taken (the first frame held by `first_bytes`, gathered output) come on top.
                    let held = (p.out.len() + p.next.as_ref().and_then(Frame::data_ref).map_or(0, Bytes::len)) as u64;
                    let up = p.upstream.size_hint();
                    let mut hint = SizeHint::new();
                    hint.set_lower(up.lower() + held);
                    if let Some(upper) = up.upper() {
                        hint.set_upper(upper + held);
                    }
                    hint
                }
            },
        }
    }
}

impl Recorded {
    /// Marks a response the client stopped taking: the record says so unless it already ended.
    pub fn stalled(&mut self) {
        if self.record.outcome == Outcome::ClientGone {
            self.record.outcome = Outcome::ClientStalled;
        }
    }
}

impl Drop for Recorded {
    fn drop(&mut self) {
        // The record is written after this, with the time the upstream's body ended.
        self.record.upstream_last = self.body.upstream_last();
    }
}

impl http_body::Body for Recorded {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let polled = this.body.poll_recorded(cx, Some(&mut this.record));
        // hyper stops polling once `is_end_stream` is true, so the last frame marks completion.
        let ended = match &polled {
            Poll::Ready(None) => true,
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let r = &mut this.record;
                    if r.bytes_out == 0 && r.stream {
                        r.first_frame = Some(Instant::now());
                    }
                    r.bytes_out += data.len() as u64;
                }
                this.body.is_end_stream()
            }
            _ => false,
        };
        if ended && this.record.outcome == Outcome::ClientGone {
            this.record.outcome = Outcome::Complete;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(input: &[u8], step: usize, strip: bool) -> (Vec<u8>, Option<Usage>) {
        let Mode::Sse(mut s) = Mode::sse(strip) else { unreachable!() };
        let (mut q, mut out) = (Out::default(), Vec::new());
        let mut usage = None;
        for c in input.chunks(step) {
            s.feed(Bytes::copy_from_slice(c), &mut q, &mut usage);
            out.extend_from_slice(&q.take().unwrap_or_default());
        }
        out.extend_from_slice(&s.partial);
        (out, usage)
    }

    const STREAM: &[u8] = b"data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}],\"usage\":null}\n\n\
data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":5,\"total_tokens\":8}}\n\n\
data: [DONE]\n\n";

    #[test]
    fn passthrough_keeps_every_byte_when_not_stripping() {
        for step in 1..STREAM.len() {
            let (out, usage) = run(STREAM, step, false);
            assert_eq!(out, STREAM, "step {step}");
            assert_eq!(usage, Some(Usage { prompt: 3, completion: 5, ..Usage::default() }));
        }
    }

    #[test]
    fn passthrough_removes_only_the_usage_only_event() {
        let first_end = STREAM.windows(2).position(|w| w == b"\n\n").unwrap() + 2;
        let want: Vec<u8> = [&STREAM[..first_end], &b"data: [DONE]\n\n"[..]].concat();
        for step in 1..STREAM.len() {
            let (out, usage) = run(STREAM, step, true);
            assert_eq!(String::from_utf8_lossy(&out), String::from_utf8_lossy(&want), "step {step}");
            assert_eq!(usage, Some(Usage { prompt: 3, completion: 5, ..Usage::default() }));
        }
    }

    #[test]
    fn removing_the_usage_event_keeps_the_lf_of_a_crlf_split_from_its_cr() {
        let stream = String::from_utf8_lossy(STREAM).replace('\n', "\r\n");
        let stream = stream.as_bytes();
        let first_end = stream.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        let want: Vec<u8> = [&stream[..first_end], &b"data: [DONE]\r\n\r\n"[..]].concat();
        for step in 1..stream.len() {
            let (out, _) = run(stream, step, true);
            assert_eq!(String::from_utf8_lossy(&out), String::from_utf8_lossy(&want), "step {step}");
        }
        // Two chunks split at every point, among them between the CR and LF that end event one.
        for cut in 1..stream.len() {
            let Mode::Sse(mut s) = Mode::sse(true) else { unreachable!() };
            let (mut q, mut usage) = (Out::default(), None);
            s.feed(Bytes::copy_from_slice(&stream[..cut]), &mut q, &mut usage);
            s.feed(Bytes::copy_from_slice(&stream[cut..]), &mut q, &mut usage);
            let out = q.take().unwrap_or_default();
            assert_eq!(String::from_utf8_lossy(&out), String::from_utf8_lossy(&want), "cut {cut}");
        }
    }

    /// Echoes each event's data as a content chunk; `[DONE]` on a `{"done":true}` document.
    use crate::sse::Framing;

    struct Echo(Framing, bool);

    impl Translate for Echo {
        fn framing(&self) -> Framing {
            self.0
        }
        fn event(&mut self, ev: &sse::Event<'_>, out: &mut BytesMut) -> Result<(), Error> {
            if ev.data == b"{\"done\":true}" {
                out.extend_from_slice(b"data: [DONE]\n\n");
                self.1 = true;
            } else {
                out.extend_from_slice(b"data: ");
                out.extend_from_slice(ev.data);
                out.extend_from_slice(b"\n\n");
            }
            Ok(())
        }
        fn done(&self) -> bool {
            self.1
        }
        fn usage(&self) -> Option<Usage> {
            None
        }
    }

    #[test]
    fn a_translator_gets_events_in_its_framing_at_every_chunking() {
        let want = "data: {\"a\":1}\n\ndata: {\"b\":\"x\\ny\"}\n\ndata: [DONE]\n\n";
        let inputs = [
            (Framing::Ndjson, "{\"a\":1}\n\n{\"b\":\"x\\ny\"}\r\n{\"done\":true}\n"),
            (
                Framing::Sse,
                "event: a\ndata: {\"a\":1}\n\n: ping\n\ndata: {\"b\":\"x\\ny\"}\r\n\r\ndata: {\"done\":true}\n\n",
            ),
        ];
        for (framing, input) in inputs {
            for step in 1..=input.len() {
                let mut t = Translating::new(Box::new(Echo(framing, false)));
                let mut out = BytesMut::new();
                for c in input.as_bytes().chunks(step) {
                    t.feed(c, "test", &mut out).unwrap_or_else(|e| panic!("{framing:?} step {step}: {}", e.message));
                }
                assert_eq!(String::from_utf8_lossy(&out), want, "{framing:?} step {step}");
                assert!(t.done());
            }
        }
    }

    /// An upstream body that has every chunk ready.
    struct Chunks(VecDeque<Bytes>);

    impl http_body::Body for Chunks {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            Poll::Ready(self.0.pop_front().map(|b| Ok(Frame::data(b))))
        }
    }

    /// What the client gets when `input` arrives in chunks of `step` bytes and goes through the
    /// body's real poll loop, translated by `translator`.
    fn through_body(translator: Box<dyn Translate>, input: &'static [u8], step: usize) -> String {
        let upstream = Chunks(input.chunks(step).map(Bytes::from_static).collect());
        let body = Body::passthrough_from(upstream, Mode::translate(translator), Duration::from_secs(5), "test");
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        let out = rt.block_on(http_body_util::BodyExt::collect(body)).unwrap().to_bytes();
        String::from_utf8(out.to_vec()).unwrap()
    }

    #[test]
    fn a_last_ndjson_line_without_its_lf_is_translated_at_eof_not_an_error() {
        // Ollama's last line may end the stream without a newline.
        let input = b"{\"a\":1}\n{\"done\":true}";
        for step in 1..=input.len() {
            let out = through_body(Box::new(Echo(Framing::Ndjson, false)), input, step);
            assert_eq!(out, "data: {\"a\":1}\n\ndata: [DONE]\n\n", "step {step}");
        }
    }

    /// Echoes events; its stream has no end event: `[DONE]` goes out at EOF (Gemini's shape).
    struct EndsAtEof(bool);

    impl Translate for EndsAtEof {
        fn event(&mut self, ev: &sse::Event<'_>, out: &mut BytesMut) -> Result<(), Error> {
            out.extend_from_slice(b"data: ");
            out.extend_from_slice(ev.data);
            out.extend_from_slice(b"\n\n");
            Ok(())
        }
        fn finish(&mut self, out: &mut BytesMut) -> Result<(), Error> {
            out.extend_from_slice(b"data: [DONE]\n\n");
            self.0 = true;
            Ok(())
        }
        fn done(&self) -> bool {
            self.0
        }
        fn usage(&self) -> Option<Usage> {
            None
        }
    }

    /// Writes 1 MiB for every event it gets: an amplifying upstream's worst case.
    struct Amplifies;

    impl Translate for Amplifies {
        fn event(&mut self, _: &sse::Event<'_>, out: &mut BytesMut) -> Result<(), Error> {
            out.extend_from_slice(&[b'x'; 1 << 20]);
            Ok(())
        }
        fn done(&self) -> bool {
            false
        }
        fn usage(&self) -> Option<Usage> {
            None
        }
    }

    #[test]
    fn one_read_translates_to_at_most_max_out_per_read_bytes() {
        let read = b"data: {}\n\n".repeat(100);
        let mut t = Translating::new(Box::new(Amplifies));
        let mut out = BytesMut::new();
        let e = t.feed(&read, "c", &mut out).expect_err("100 MiB from one read is refused");
        assert_eq!(e.kind, Kind::UpstreamMalformed);
        assert!(out.len() <= MAX_OUT_PER_READ + (1 << 20), "{} bytes", out.len());
        // Within the cap, nothing is refused.
        let mut t = Translating::new(Box::new(Amplifies));
        let mut out = BytesMut::new();
        assert!(t.feed(&b"data: {}\n\n".repeat(8), "c", &mut out).is_ok());
    }

    #[test]
    fn the_end_of_stream_hook_writes_the_last_events_of_a_stream_that_ends_at_eof() {
        let input = b"data: {\"a\":1}\r\n\r\ndata: {\"b\":2}\r\n\r\n";
        for step in 1..=input.len() {
            let out = through_body(Box::new(EndsAtEof(false)), input, step);
            assert_eq!(out, "data: {\"a\":1}\n\ndata: {\"b\":2}\n\ndata: [DONE]\n\n", "step {step}");
        }
        // Without the hook, a stream that never reached its end is cut short: one error event.
        let out = through_body(Box::new(Echo(Framing::Sse, false)), b"data: {\"a\":1}\n\n", 4);
        assert!(out.starts_with("data: {\"a\":1}\n\ndata: {\"error\":"), "{out}");
        assert!(out.contains("ended before it was complete") && !out.contains("[DONE]"), "{out}");
    }

    #[test]
    fn only_a_usage_key_followed_by_null_skips_the_parse() {
        assert!(null_follows(b":null}"));
        assert!(null_follows(b" : \r\n null,"));
        for rest in [&b":{\"prompt_tokens\":1}"[..], b"", b":", b": nul", b"null", b"\\\": null", b":\ndata: null"] {
            assert!(!null_follows(rest), "{}", String::from_utf8_lossy(rest));
        }
        // A `"usage":null` inside a content string does not hide the real usage after it.
        let event = br#"data: {"choices":[],"x":"say \"usage\":null","usage":{"prompt_tokens":3,"completion_tokens":5}}

"#;
        let Mode::Sse(mut s) = Mode::sse(true) else { unreachable!() };
        let mut usage = None;
        assert!(!s.keep(event, &mut usage));
        assert_eq!(usage, Some(Usage { prompt: 3, completion: 5, ..Usage::default() }));
    }

    #[test]
    fn oversized_events_pass_uninspected() {
        let big = format!("data: {}\n\ndata: [DONE]\n\n", "x".repeat(MAX_HELD_EVENT + 10));
        let (out, _) = run(big.as_bytes(), 1 << 16, true);
        assert_eq!(out, big.as_bytes());
    }
}
