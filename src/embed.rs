//! Embeddings at volume: requests split over an upstream's limits and merged back, encodings
//! converted, and embedding traffic to a connection bounded so it cannot starve chat.
//!
//! A request that fits the connection's `max_inputs` and `max_tokens` and asks for an encoding
//! the upstream gives (`encodings`, `upstream_encoding`) takes the plain passthrough: nothing is
//! parsed beyond the scan of its `input`. Any other is cut into consecutive sub-requests, each
//! within both limits, sent with at most `parallel` in flight, each made by the connection's
//! provider as if a client had sent it. Their answers are merged into one list: `data` in the
//! client's order with `index` 0..n-1, each vector in the encoding the client asked for, usage
//! summed. If any sub-request fails, the client gets that one error, never a list with holes.
//!
//! Each returned vector is read by its JSON type, whatever was asked (some compatible servers
//! ignore `encoding_format`): a string is base64 of little-endian f32s, an array is numbers.
//! Conversion is exact: numbers are read as the nearest f32 and written in the shortest form
//! that reads back to the same f32 (ryu); base64 carries the f32 bits as they are.

use crate::body::Body;
use crate::client::Transport;
use crate::config::{err, line_of, ConfigError, Connection};
use crate::error::{Error, Kind};
use crate::json::{self, RequestFields};
use crate::provider::{Call, Verdict};
use crate::router::Target;
use base64::Engine as _;
use http::Response;
use serde::Deserialize;
use std::future::Future;
use std::ops::Range;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;
use toml::Spanned;

pub mod batch;
pub mod cache;
pub use batch::Batcher;
pub use cache::Cache;

/// OpenAI's limit of inputs per request (<https://platform.openai.com/docs/api-reference/embeddings/create>).
const DEFAULT_MAX_INPUTS: usize = 2048;
/// OpenAI's limit of tokens summed over a request's inputs.
const DEFAULT_MAX_TOKENS: usize = 300_000;
const DEFAULT_PARALLEL: usize = 4;
const DEFAULT_QUEUE_TIMEOUT_MS: usize = 1000;
const DEFAULT_BATCH_MAX_INPUTS: usize = 256;
/// The most an upstream may send per input of a sub-request (a 12k-dimension float vector as
/// JSON is about 200 KiB), plus a fixed allowance.
const MAX_BYTES_PER_INPUT: usize = 256 << 10;
const MAX_BYTES_BASE: usize = 64 << 10;

/// `[embeddings_cache]` as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCache {
    max_mb: Option<Spanned<i64>>,
    ttl_secs: Option<Spanned<i64>>,
}

const DEFAULT_CACHE_MB: usize = 512;
const DEFAULT_CACHE_TTL_SECS: usize = 86_400;

/// `[embeddings_cache]`: `(max_mb, ttl_secs)`, or none without the table.
pub fn compile_cache(raw: Option<&RawCache>, source: Option<&str>) -> Result<Option<(usize, u64)>, ConfigError> {
    let Some(raw) = raw else { return Ok(None) };
    let mb = crate::config::count("embeddings_cache.max_mb", &raw.max_mb, DEFAULT_CACHE_MB, 1, source)?;
    let ttl = crate::config::count("embeddings_cache.ttl_secs", &raw.ttl_secs, DEFAULT_CACHE_TTL_SECS, 1, source)?;
    Ok(Some((mb, ttl as u64)))
}

/// `[connections.NAME.embeddings]` as written.
#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSettings {
    max_inputs: Option<Spanned<i64>>,
    max_tokens: Option<Spanned<i64>>,
    parallel: Option<Spanned<i64>>,
    encodings: Option<Spanned<Vec<String>>>,
    upstream_encoding: Option<Spanned<String>>,
    max_concurrent: Option<Spanned<i64>>,
    queue_timeout_ms: Option<Spanned<i64>>,
    batch_window_us: Option<Spanned<i64>>,
    batch_max_inputs: Option<Spanned<i64>>,
}

/// A vector encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// A JSON array of numbers.
    Float,
    /// Base64 of the little-endian f32 bytes.
    Base64,
}

impl Encoding {
    fn name(self) -> &'static str {
        match self {
            Encoding::Float => "float",
            Encoding::Base64 => "base64",
        }
    }
}

/// A connection's embeddings settings.
#[derive(Debug)]
pub struct Settings {
    /// Inputs per upstream request.
    pub max_inputs: usize,
    /// Estimated tokens per upstream request.
    pub max_tokens: u64,
    /// Sub-requests of one client request in flight at once.
    pub parallel: usize,
    /// What the upstream can return.
    pub float: bool,
    /// ...
    pub base64: bool,
    /// Always ask the upstream for this encoding (`None`: as the client asked, when it can).
    pub upstream: Option<Encoding>,
    /// Embedding requests in flight to this connection, and how long one waits for a slot.
    pub slots: Option<(Arc<tokio::sync::Semaphore>, usize, Duration)>,
    /// Micro-batching, when `batch_window_us` > 0.
    pub batcher: Option<Arc<Batcher>>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            max_inputs: DEFAULT_MAX_INPUTS,
            max_tokens: DEFAULT_MAX_TOKENS as u64,
            parallel: DEFAULT_PARALLEL,
            float: true,
            base64: true,
            upstream: None,
            slots: None,
            batcher: None,
        }
    }
}

impl PartialEq for Settings {
    fn eq(&self, o: &Self) -> bool {
        let slots = |s: &Self| s.slots.as_ref().map(|(_, n, t)| (*n, *t));
        let batcher = |s: &Self| s.batcher.as_ref().map(|b| format!("{b:?}"));
        (self.max_inputs, self.max_tokens, self.parallel, self.float, self.base64, self.upstream)
            == (o.max_inputs, o.max_tokens, o.parallel, o.float, o.base64, o.upstream)
            && slots(self) == slots(o)
            && batcher(self) == batcher(o)
    }
}

/// Compiles `[connections.NAME.embeddings]`; errors name the key and its line.
pub fn compile(name: &str, raw: Option<&RawSettings>, source: Option<&str>) -> Result<Settings, ConfigError> {
    let Some(raw) = raw else { return Ok(Settings::default()) };
    let key = |k: &str| format!("connections.{name}.embeddings.{k}");
    let count =
        |k: &str, v: &Option<Spanned<i64>>, default: usize| crate::config::count(&key(k), v, default, 1, source);
    let (mut float, mut base64) = (true, true);
    if let Some(list) = &raw.encodings {
        let at = line_of(source, list.span());
        (float, base64) = (false, false);
        for e in list.get_ref() {
            match e.as_str() {
                "float" => float = true,
                "base64" => base64 = true,
                other => return err(format!("{}{at}: `{other}` is not `float` or `base64`", key("encodings"))),
            }
        }
        if !(float || base64) {
            return err(format!("{}{at}: name at least one of `float` and `base64`", key("encodings")));
        }
    }
    let upstream = match &raw.upstream_encoding {
        None => None,
        Some(v) => {
            let at = line_of(source, v.span());
            let e = match v.get_ref().as_str() {
                "as_requested" => None,
                "float" => Some(Encoding::Float),
                "base64" => Some(Encoding::Base64),
                other => {
                    return err(format!(
                        "{}{at}: `{other}` is not `as_requested`, `float` or `base64`",
                        key("upstream_encoding")
                    ))
                }
            };
            if e.is_some_and(|e| !(if e == Encoding::Float { float } else { base64 })) {
                return err(format!("{}{at}: the upstream cannot return it (`encodings`)", key("upstream_encoding")));
            }
            e
        }
    };
    let slots = match &raw.max_concurrent {
        None => {
            if raw.queue_timeout_ms.is_some() {
                return err(format!("{}: only used with `max_concurrent`", key("queue_timeout_ms")));
            }
            None
        }
        v => {
            let n = count("max_concurrent", v, 0)?;
            let wait = count("queue_timeout_ms", &raw.queue_timeout_ms, DEFAULT_QUEUE_TIMEOUT_MS)?;
            Some((Arc::new(tokio::sync::Semaphore::new(n)), n, Duration::from_millis(wait as u64)))
        }
    };
    let window = crate::config::count(&key("batch_window_us"), &raw.batch_window_us, 0, 0, source)?;
    let batch_max = count("batch_max_inputs", &raw.batch_max_inputs, DEFAULT_BATCH_MAX_INPUTS)?;
    if window == 0 && raw.batch_max_inputs.is_some() {
        return err(format!("{}: only used with `batch_window_us` > 0", key("batch_max_inputs")));
    }
    let batcher = (window > 0).then(|| Arc::new(Batcher::new(Duration::from_micros(window as u64), batch_max)));
    Ok(Settings {
        batcher,
        max_inputs: count("max_inputs", &raw.max_inputs, DEFAULT_MAX_INPUTS)?,
        max_tokens: count("max_tokens", &raw.max_tokens, DEFAULT_MAX_TOKENS)? as u64,
        parallel: count("parallel", &raw.parallel, DEFAULT_PARALLEL)?,
        float,
        base64,
        upstream,
        slots,
    })
}

impl Settings {
    fn gives(&self, e: Encoding) -> bool {
        match e {
            Encoding::Float => self.float,
            Encoding::Base64 => self.base64,
        }
    }

    /// What to ask the upstream for when the client asks for `wanted`.
    fn ask_for(&self, wanted: Encoding) -> Encoding {
        match self.upstream {
            Some(e) => e,
            None if self.gives(wanted) => wanted,
            None if wanted == Encoding::Float => Encoding::Base64,
            None => Encoding::Float,
        }
    }

    /// A slot for one upstream embeddings request, waited for up to `queue_timeout_ms`; 429
    /// with Retry-After past it. `None` when the connection has no `max_concurrent`.
    pub async fn slot(&self, connection: &str) -> Result<Option<tokio::sync::OwnedSemaphorePermit>, Error> {
        let Some((sem, n, wait)) = &self.slots else { return Ok(None) };
        match tokio::time::timeout(*wait, sem.clone().acquire_owned()).await {
            Ok(Ok(p)) => Ok(Some(p)),
            _ => {
                let mut e = Error::new(
                    Kind::Limited,
                    format!(
                        "Connection `{connection}` has {n} embedding requests in flight, its limit; retry shortly."
                    ),
                )
                .code("rate_limit_exceeded");
                e.retry_after = Some(Duration::from_secs(1));
                Err(e)
            }
        }
    }
}

/// One client request's inputs: each input's range in the body and its estimated tokens.
#[derive(Debug, PartialEq)]
pub struct Inputs {
    /// The ranges, in order: strings (quotes included) or token arrays.
    pub items: Vec<Range<usize>>,
    /// Estimated tokens of each: string bytes / 4 (at least 1), or the token count.
    pub tokens: Vec<u64>,
}

fn bad_input(what: &str) -> Error {
    Error::invalid_request(format!("Invalid 'input': {what}.")).param("input")
}

/// Reads `input` in each of OpenAI's forms: a string, an array of strings, an array of token
/// ids (one input), an array of token-id arrays. Empty strings and arrays are OpenAI's 400.
pub fn inputs(body: &[u8], input: &Range<usize>) -> Result<Inputs, Error> {
    let text = &body[input.clone()];
    let at = |r: Range<usize>| input.start + r.start..input.start + r.end;
    let mut out = Inputs { items: Vec::new(), tokens: Vec::new() };
    let string_tokens = |r: &Range<usize>| ((r.len().saturating_sub(2)) as u64).div_ceil(4).max(1);
    match text.first() {
        Some(b'"') if text.len() > 2 => {
            out.tokens.push(string_tokens(input));
            out.items.push(input.clone());
        }
        Some(b'[') => {
            let mut first = true;
            let mut ids = false;
            let mut problem = None;
            json::elements(text, |r| {
                let v = &text[r.clone()];
                if first {
                    ids = v[0].is_ascii_digit();
                    first = false;
                }
                if ids {
                    return true;
                }
                match v[0] {
                    b'"' if v.len() > 2 => {
                        out.tokens.push(string_tokens(&r));
                        out.items.push(at(r));
                    }
                    b'[' => {
                        let (mut n, mut all) = (0u64, true);
                        let ok = json::elements(v, |e| {
                            n += 1;
                            all = v[e][0].is_ascii_digit();
                            all
                        });
                        if ok.is_err() || n == 0 || !all {
                            problem = Some("a token array must hold at least one token id");
                            return false;
                        }
                        out.tokens.push(n);
                        out.items.push(at(r));
                    }
                    b'"' => {
                        problem = Some("an input is an empty string");
                        return false;
                    }
                    _ => {
                        problem = Some("expected strings, token ids or arrays of token ids");
                        return false;
                    }
                }
                true
            })
            .map_err(|_| bad_input("not a valid array"))?;
            if let Some(p) = problem {
                return Err(bad_input(p));
            }
            if ids {
                let (mut n, mut all) = (0u64, true);
                json::elements(text, |e| {
                    n += 1;
                    all = text[e][0].is_ascii_digit();
                    all
                })
                .map_err(|_| bad_input("not a valid array"))?;
                if !all {
                    return Err(bad_input("token ids mixed with other values"));
                }
                out.tokens = vec![n];
                out.items = vec![input.clone()];
            }
            if out.items.is_empty() {
                return Err(bad_input("an empty array"));
            }
        }
        _ => return Err(bad_input("expected a non-empty string or array")),
    }
    Ok(out)
}

/// Whether a request of `len` input bytes could need splitting: each input takes at least two
/// bytes (`1,`), and a request's tokens are at most its bytes. Requests below both bounds skip the
/// scan of their inputs.
pub fn may_split(settings: &Settings, len: usize) -> bool {
    len / 2 >= settings.max_inputs || len as u64 > settings.max_tokens
}

/// The batches to send: consecutive runs of inputs within `max_inputs` and `max_tokens` (an
/// input over `max_tokens` alone goes alone: the upstream decides).
pub fn batches(settings: &Settings, tokens: &[u64]) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let (mut start, mut sum) = (0, 0u64);
    for (i, &t) in tokens.iter().enumerate() {
        if i > start && (i - start >= settings.max_inputs || sum + t > settings.max_tokens) {
            out.push(start..i);
            (start, sum) = (i, 0);
        }
        sum += t;
    }
    if start < tokens.len() {
        out.push(start..tokens.len());
    }
    out
}

/// What the gateway does with an embeddings request for a connection: nothing (passthrough),
/// or split and/or convert.
pub struct Work {
    /// The client's inputs.
    pub inputs: Inputs,
    /// The inputs sent upstream (indexes into `inputs`: all, or the cache's misses).
    pub sent: Vec<usize>,
    /// The batches, as ranges of `sent`.
    pub batches: Vec<Range<usize>>,
    /// What the client asked for.
    pub wanted: Encoding,
    /// What each sub-request asks for.
    pub ask: Encoding,
    /// With the cache: each input's key and the vectors found (f32 bytes).
    pub cached: Option<Cached>,
    /// The upstream model, named in a list served from the cache alone.
    pub model: String,
    /// Sent in a micro-batch with other requests of the same shape.
    pub coalesce: bool,
    /// The client's members but `input` and `encoding_format`, each with its comma: the start of
    /// every sub-request's body, written once.
    pub head: Vec<u8>,
}

/// A request's view of the cache.
pub struct Cached {
    cache: Arc<Cache>,
    keys: Vec<cache::Key>,
    hits: Vec<Option<Arc<[u8]>>>,
}

impl Work {
    /// `(hits, misses)` when the cache was asked.
    pub fn cache_counts(&self) -> Option<(usize, usize)> {
        self.cached.as_ref().map(|_| (self.inputs.items.len() - self.sent.len(), self.sent.len()))
    }
}

/// The client's `encoding_format`: float by default; anything else is a 400.
fn wanted(body: &[u8], fields: &RequestFields) -> Result<Encoding, Error> {
    match fields.encoding_format.as_ref().map(|r| &body[r.clone()]) {
        None | Some(b"null") | Some(b"\"float\"") => Ok(Encoding::Float),
        Some(b"\"base64\"") => Ok(Encoding::Base64),
        Some(_) => {
            Err(Error::invalid_request("`encoding_format` must be \"float\" or \"base64\".").param("encoding_format"))
        }
    }
}

/// Decides whether a request needs the gateway's work for a connection with `settings`: with
/// `cache` (the cache, the connection's name and the upstream model), always; else when it is
/// over a limit or asks for an encoding the upstream does not give.
pub fn plan(
    settings: &Settings,
    body: &[u8],
    fields: &RequestFields,
    cache: Option<(&Arc<Cache>, &str, &str)>,
) -> Result<Option<Work>, Error> {
    let wanted = wanted(body, fields)?;
    let ask = settings.ask_for(wanted);
    let Some(input) = &fields.input else { return Ok(None) };
    if cache.is_none() && settings.batcher.is_none() && ask == wanted && !may_split(settings, input.len()) {
        return Ok(None);
    }
    let inputs = inputs(body, input)?;
    let (sent, cached): (Vec<usize>, Option<Cached>) = match cache {
        None => ((0..inputs.items.len()).collect(), None),
        Some((cache, connection, model)) => {
            // Every member but those that cannot change a vector (the model is the upstream's).
            let mut base = cache.base(connection, model);
            members_but(body, NOT_VECTOR, |k, v| base.member(k, v));
            let keys: Vec<cache::Key> = inputs.items.iter().map(|r| base.key(&body[r.clone()])).collect();
            let hits: Vec<Option<Arc<[u8]>>> = keys.iter().map(|k| cache.get(*k)).collect();
            let sent = (0..keys.len()).filter(|&i| hits[i].is_none()).collect();
            (sent, Some(Cached { cache: cache.clone(), keys, hits }))
        }
    };
    let tokens: Vec<u64> = sent.iter().map(|&i: &usize| inputs.tokens[i]).collect();
    let batches = if tokens.is_empty() { Vec::new() } else { batches(settings, &tokens) };
    // Only requests that go upstream as one, within a batch's size, are batched.
    let coalesce = batches.len() == 1 && settings.batcher.as_ref().is_some_and(|b| sent.len() <= b.max_inputs());
    if cached.is_none() && !coalesce && ask == wanted && batches.len() == 1 {
        return Ok(None);
    }
    let model = cache.map_or_else(String::new, |(_, _, m)| m.to_owned());
    let head = head(body, false);
    Ok(Some(Work { inputs, sent, batches, wanted, ask, cached, model, coalesce, head }))
}

/// One sub-request's body: the client's members in their order, but `input` holding only the
/// batch's inputs and `encoding_format` what the gateway asks for.
pub fn sub_body(body: &[u8], work: &Work, batch: &Range<usize>) -> Vec<u8> {
    let items: Vec<&[u8]> = work.sent[batch.clone()].iter().map(|&i| &body[work.inputs.items[i].clone()]).collect();
    // A single token-id array is the whole `input` value: sent as it is.
    let whole = work.inputs.items.len() == 1 && is_ids(items[0]);
    body_with(&work.head, &items, whole, work.ask)
}

/// `{` and `body`'s members but `input` and `encoding_format` (and `user`, for a batch of
/// several clients' inputs), each followed by a comma.
fn head(body: &[u8], drop_user: bool) -> Vec<u8> {
    let mut out = vec![b'{'];
    let skip: &[&[u8]] =
        if drop_user { &[b"input", b"encoding_format", b"user"] } else { &[b"input", b"encoding_format"] };
    members_but(body, skip, |k, v| {
        out.extend_from_slice(k);
        out.push(b':');
        out.extend_from_slice(v);
        out.push(b',');
    });
    out
}

/// Calls `f(raw_key, value)` for each member of `body` whose name is not in `skip`.
fn members_but(body: &[u8], skip: &[&[u8]], mut f: impl FnMut(&[u8], &[u8])) {
    let _ = json::members(body, |k, v| {
        let name = json::unescaped_key::<24>(k);
        if !name.as_ref().is_some_and(|n| skip.contains(&n.as_slice())) {
            f(k, &body[v]);
        }
        true
    });
}

/// The members that cannot change a vector (the model is keyed as the upstream's).
const NOT_VECTOR: &[&[u8]] = &[b"input", b"encoding_format", b"user", b"model"];

/// A body of `head`, then `input` (`items` as an array, or the one item as the whole value) and
/// `encoding_format` = `ask`.
fn body_with(head: &[u8], items: &[&[u8]], whole: bool, ask: Encoding) -> Vec<u8> {
    let size = head.len() + items.iter().map(|r| r.len()).sum::<usize>() + items.len() + 64;
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(head);
    out.extend_from_slice(b"\"input\":");
    if !whole {
        out.push(b'[');
    }
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(item);
    }
    if !whole {
        out.push(b']');
    }
    out.extend_from_slice(b",\"encoding_format\":\"");
    out.extend_from_slice(ask.name().as_bytes());
    out.extend_from_slice(b"\"}");
    out
}

/// The shape of a request for micro-batching: requests of one shape can share an upstream request.
fn shape(connection: &str, model: &str, body: &[u8], ask: Encoding) -> Vec<u8> {
    let mut key = Vec::with_capacity(128);
    for part in [connection.as_bytes(), model.as_bytes(), ask.name().as_bytes()] {
        key.extend_from_slice(&part.len().to_le_bytes());
        key.extend_from_slice(part);
    }
    members_but(body, NOT_VECTOR, |k, v| {
        for part in [k, v] {
            key.extend_from_slice(&part.len().to_le_bytes());
            key.extend_from_slice(part);
        }
    });
    key
}

fn is_ids(v: &[u8]) -> bool {
    v.get(1..).is_some_and(|rest| rest.trim_ascii_start().first().is_some_and(u8::is_ascii_digit))
}

/// The limit on one sub-response's body.
pub fn body_limit(inputs: usize) -> usize {
    MAX_BYTES_BASE + inputs.saturating_mul(MAX_BYTES_PER_INPUT)
}

/// One sub-request's answer, read: each vector's range in `body` by its index, and the usage.
pub struct Part {
    body: bytes::Bytes,
    vectors: Vec<Range<usize>>,
    model: Option<Range<usize>>,
    prompt: u64,
    total: u64,
}

/// Reads an embeddings list answering `n` inputs: exactly one vector per index 0..n-1.
pub fn part(body: bytes::Bytes, n: usize, connection: &str) -> Result<Part, Error> {
    let malformed = |why: &str| {
        Error::upstream_failure(
            Kind::UpstreamMalformed,
            format!("Connection `{connection}` answered an embeddings request with {why}."),
        )
    };
    if let Some(list) = quick(&body) {
        let mut vectors: Vec<Option<Range<usize>>> = vec![None; n];
        for (i, r) in list.items {
            match vectors.get_mut(i as usize) {
                Some(slot @ None) => *slot = Some(r),
                _ => return Err(malformed("an index out of range or repeated")),
            }
        }
        let vectors =
            vectors.into_iter().collect::<Option<Vec<_>>>().ok_or_else(|| malformed("fewer vectors than inputs"))?;
        let (prompt, total) = list
            .usage
            .and_then(|u| json::usage_object(&body[u]))
            .map_or((0, 0), |u| (u.prompt, u.prompt + u.completion));
        return Ok(Part { body, vectors, model: list.model, prompt, total });
    }
    // Anything unusual (escaped keys, a missing member, bad JSON) takes the validating reader,
    // whose errors say what is wrong.
    let [data, model, usage] = json::checked_fields(&body, &[b"data", b"model", b"usage"])
        .map_err(|_| malformed("a body that is not a JSON object"))?;
    let data = data.ok_or_else(|| malformed("no `data`"))?;
    let mut vectors: Vec<Option<Range<usize>>> = vec![None; n];
    let mut problem = None;
    let text = &body[data.clone()];
    json::elements(text, |r| {
        let item = &text[r.clone()];
        let [index, embedding] = json::fields(item, &[b"index", b"embedding"]);
        let (Some(index), Some(embedding)) = (index, embedding) else {
            problem = Some("an item without `index` or `embedding`");
            return false;
        };
        match json::u64_of(&item[index]).map(|i| i as usize) {
            Some(i) if i < n && vectors[i].is_none() => {
                let base = data.start + r.start;
                vectors[i] = Some(base + embedding.start..base + embedding.end);
                true
            }
            _ => {
                problem = Some("an index out of range or repeated");
                false
            }
        }
    })
    .map_err(|_| malformed("a `data` that is not an array"))?;
    if let Some(p) = problem {
        return Err(malformed(p));
    }
    let vectors =
        vectors.into_iter().collect::<Option<Vec<_>>>().ok_or_else(|| malformed("fewer vectors than inputs"))?;
    let (prompt, total) =
        usage.and_then(|u| json::usage_object(&body[u])).map_or((0, 0), |u| (u.prompt, u.prompt + u.completion));
    Ok(Part { body, vectors, model, prompt, total })
}

/// An embeddings list as [`quick`] reads it.
#[derive(Default)]
struct List {
    /// Each item's `index` and the range of its `embedding`.
    items: Vec<(u64, Range<usize>)>,
    model: Option<Range<usize>>,
    usage: Option<Range<usize>>,
}

/// Reads the usual shape of an embeddings list in one pass, at memchr speed over the vectors: a
/// float vector is a flat array of numbers, which holds no `]`, and a base64 one a string
/// without quotes or escapes. Vectors are not validated here (they are copied as they came, as
/// passthrough forwards them, or parsed when converted). `None` for anything else (escaped keys,
/// nested vectors, no `data`): the validating reader takes it.
fn quick(b: &[u8]) -> Option<List> {
    let ws = |mut i: usize| {
        while b.get(i).is_some_and(|c| c.is_ascii_whitespace()) {
            i += 1;
        }
        i
    };
    // A key or short string token without escapes: its end.
    let string = |i: usize| -> Option<usize> {
        if b.get(i) != Some(&b'"') {
            return None;
        }
        let len = memchr::memchr2(b'"', b'\\', &b[i + 1..])?;
        (b[i + 1 + len] == b'"').then_some(i + len + 2)
    };
    let members = |mut i: usize, f: &mut dyn FnMut(&[u8], usize) -> Option<usize>| -> Option<usize> {
        i = ws(i);
        if b.get(i) != Some(&b'{') {
            return None;
        }
        i = ws(i + 1);
        if b.get(i) == Some(&b'}') {
            return Some(i + 1);
        }
        loop {
            let end = string(i)?;
            let key = &b[i + 1..end - 1];
            i = ws(end);
            if b.get(i) != Some(&b':') {
                return None;
            }
            i = f(key, ws(i + 1))?;
            i = ws(i);
            match b.get(i)? {
                b',' => i = ws(i + 1),
                b'}' => return Some(i + 1),
                _ => return None,
            }
        }
    };
    let skip = |i: usize| json::value_end(b, i).ok();
    let mut list = List::default();
    let mut data = false;
    let end = members(0, &mut |key, i| match key {
        b"data" => {
            data = true;
            if b.get(i) != Some(&b'[') {
                return None;
            }
            let mut i = ws(i + 1);
            if b.get(i) == Some(&b']') {
                return Some(i + 1);
            }
            loop {
                let (mut index, mut vector) = (None, None);
                i = members(i, &mut |key, i| match key {
                    b"embedding" => {
                        let end = match b.get(i)? {
                            b'[' => i + memchr::memchr(b']', &b[i..])? + 1,
                            b'"' => string(i)?,
                            _ => return None,
                        };
                        vector = Some(i..end);
                        Some(end)
                    }
                    b"index" => {
                        let end = skip(i)?;
                        index = Some(json::u64_of(&b[i..end])?);
                        Some(end)
                    }
                    _ => skip(i),
                })?;
                list.items.push((index?, vector?));
                i = ws(i);
                match b.get(i)? {
                    b',' => i = ws(i + 1),
                    b']' => return Some(i + 1),
                    _ => return None,
                }
            }
        }
        b"model" => {
            let end = skip(i)?;
            list.model = Some(i..end);
            Some(end)
        }
        b"usage" => {
            let end = skip(i)?;
            list.usage = Some(i..end);
            Some(end)
        }
        _ => skip(i),
    })?;
    (data && ws(end) == b.len()).then_some(list)
}

/// Reads one vector's JSON (`raw`, either encoding) into little-endian f32 bytes.
pub fn decode(raw: &[u8], bytes: &mut Vec<u8>) -> Result<(), &'static str> {
    bytes.clear();
    if raw.first() == Some(&b'"') {
        let inner = raw.get(1..raw.len().saturating_sub(1)).ok_or("a vector that is not a string")?;
        base64::engine::general_purpose::STANDARD
            .decode_vec(inner, bytes)
            .map_err(|_| "a vector that is not base64")?;
        if !bytes.len().is_multiple_of(4) {
            return Err("a base64 vector whose length is not a multiple of 4 bytes");
        }
        return Ok(());
    }
    let mut bad = false;
    json::elements(raw, |r| {
        match std::str::from_utf8(&raw[r]).ok().and_then(|t| t.parse::<f32>().ok()) {
            Some(f) => bytes.extend_from_slice(&f.to_le_bytes()),
            None => bad = true,
        }
        !bad
    })
    .map_err(|_| "a vector that is not an array")?;
    if bad {
        return Err("a vector element that is not a number");
    }
    Ok(())
}

/// Writes little-endian f32 `bytes` as a vector in `to`: base64, or numbers in their shortest
/// form that reads back to the same f32.
pub fn encode(bytes: &[u8], to: Encoding, out: &mut Vec<u8>) -> Result<(), &'static str> {
    match to {
        Encoding::Base64 => {
            out.push(b'"');
            let start = out.len();
            out.resize(start + base64::encoded_len(bytes.len(), true).unwrap_or(0), 0);
            let written = base64::engine::general_purpose::STANDARD
                .encode_slice(bytes, &mut out[start..])
                .map_err(|_| "a vector too large to encode")?;
            out.truncate(start + written);
            out.push(b'"');
        }
        Encoding::Float => {
            out.push(b'[');
            let mut number = ryu::Buffer::new();
            for (j, b) in bytes.chunks_exact(4).enumerate() {
                if j > 0 {
                    out.push(b',');
                }
                let f = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                if !f.is_finite() {
                    return Err("a vector element that JSON cannot carry (NaN or infinite)");
                }
                out.extend_from_slice(number.format_finite(f).as_bytes());
            }
            out.push(b']');
        }
    }
    Ok(())
}

/// Writes one vector in `to`, from its JSON (`raw`, either encoding): copied when it is in `to`
/// already, else converted exactly.
pub fn convert(raw: &[u8], to: Encoding, out: &mut Vec<u8>, scratch: &mut Vec<u8>) -> Result<(), &'static str> {
    let from = if raw.first() == Some(&b'"') { Encoding::Base64 } else { Encoding::Float };
    if from == to {
        out.extend_from_slice(raw);
        return Ok(());
    }
    decode(raw, scratch)?;
    encode(scratch, to, out)
}

/// The merged list: every input's vector in the client's order (from the cache or from the
/// parts, in order), in `to`, usage summed over the parts (the tokens actually sent). Vectors
/// the parts brought are stored in the cache. The list is written as pieces: a vector already in
/// the client's encoding is a slice of its part's body, not a copy.
pub fn merge(parts: &[Part], work: &Work, connection: &str) -> Result<(Vec<bytes::Bytes>, json::Usage), Error> {
    let malformed = |why: &str| {
        Error::upstream_failure(
            Kind::UpstreamMalformed,
            format!("Connection `{connection}` answered an embeddings request with {why}."),
        )
    };
    let to = work.wanted;
    let mut pieces = Vec::with_capacity(2 * work.inputs.items.len() + 2);
    let mut out = Vec::with_capacity(64 * 1024);
    let mut scratch = Vec::new();
    out.extend_from_slice(b"{\"object\":\"list\",\"data\":[");
    let mut fresh = parts.iter().flat_map(|p| p.vectors.iter().map(move |v| (p, v)));
    for i in 0..work.inputs.items.len() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"object\":\"embedding\",\"index\":");
        out.extend_from_slice(crate::provider::chunk::itoa(i as u64).as_bytes());
        out.extend_from_slice(b",\"embedding\":");
        let hit = work.cached.as_ref().and_then(|c| c.hits[i].clone());
        match (hit, &work.cached) {
            (Some(bytes), _) => encode(&bytes, to, &mut out).map_err(malformed)?,
            (None, cached) => {
                let (p, v) = fresh.next().ok_or_else(|| malformed("fewer vectors than inputs"))?;
                let raw = &p.body[v.clone()];
                let from = if raw.first() == Some(&b'"') { Encoding::Base64 } else { Encoding::Float };
                if let Some(c) = cached {
                    decode(raw, &mut scratch).map_err(malformed)?;
                    c.cache.put(c.keys[i], Arc::from(&scratch[..]));
                }
                // With the cache, every vector is written from its f32 bits, so a later hit reads
                // exactly as this miss did (an upstream may print more digits than the shortest).
                if from == to && cached.is_none() {
                    pieces.push(bytes::Bytes::from(std::mem::replace(&mut out, Vec::with_capacity(64 * 1024))));
                    pieces.push(p.body.slice(v.clone()));
                } else {
                    if cached.is_none() {
                        decode(raw, &mut scratch).map_err(malformed)?;
                    }
                    encode(&scratch, to, &mut out).map_err(malformed)?;
                }
            }
        }
        out.push(b'}');
    }
    out.extend_from_slice(b"],\"model\":");
    match parts.first().and_then(|p| p.model.clone().map(|m| &p.body[m])) {
        Some(m) if m.first() == Some(&b'"') => out.extend_from_slice(m),
        _ => json::write_str(&mut out, &work.model),
    }
    let prompt: u64 = parts.iter().map(|p| p.prompt).fold(0, u64::saturating_add);
    let total: u64 = parts.iter().map(|p| p.total).fold(0, u64::saturating_add);
    out.extend_from_slice(b",\"usage\":{\"prompt_tokens\":");
    out.extend_from_slice(crate::provider::chunk::itoa(prompt).as_bytes());
    out.extend_from_slice(b",\"total_tokens\":");
    out.extend_from_slice(crate::provider::chunk::itoa(total).as_bytes());
    out.extend_from_slice(b"}}");
    pieces.push(out.into());
    Ok((pieces, json::Usage { prompt, completion: total.saturating_sub(prompt), ..Default::default() }))
}

/// Sends `work`'s sub-requests to `target` (each made by the connection's provider, as if the
/// client had sent it; at most `parallel` in flight, each holding an embeddings slot), and
/// merges their answers. The first failure is the answer: nothing partial reaches the client.
pub async fn run(via: Via<'_, '_>, work: Work) -> Result<(Response<Body>, json::Usage), Error> {
    let (conn, _, call, target, _) = via;
    let parts = match (&conn.embeddings.batcher, work.coalesce) {
        (Some(batcher), true) => {
            let key = shape(&conn.name, target.upstream_model(call.model), call.body, work.ask);
            let inputs = work.sent.iter().map(|&i| call.body.slice(work.inputs.items[i].clone())).collect();
            let tokens = work.sent.iter().map(|&i| work.inputs.tokens[i]).sum();
            let head = head(call.body, true);
            let part = batcher
                .join(key, inputs, tokens, |all| {
                    let items: Vec<&[u8]> = all.iter().map(|b| &b[..]).collect();
                    let body = body_with(&head, &items, false, work.ask);
                    let tokens = (items.iter().map(|i| i.len()).sum::<usize>() as u64).div_ceil(4);
                    send(via, body, all.len(), tokens)
                })
                .await?;
            vec![part]
        }
        _ => in_parallel(via, &work).await?,
    };
    let (pieces, usage) = merge(&parts, &work, &conn.name)?;
    let mut response = Response::new(Body::chunks(pieces, Duration::ZERO));
    let json = http::HeaderValue::from_static("application/json");
    response.headers_mut().insert(http::header::CONTENT_TYPE, json);
    if let Some((hits, misses)) = work.cache_counts() {
        let v = format!("hits={hits} misses={misses}");
        response.headers_mut().insert("x-lmgate-cache", http::HeaderValue::try_from(v).expect("ascii"));
    }
    Ok((response, usage))
}

/// `work`'s batches as sub-requests, at most `parallel` in flight; their parts in order.
async fn in_parallel(via: Via<'_, '_>, work: &Work) -> Result<Vec<Part>, Error> {
    let (conn, _, call, ..) = via;
    let n = work.batches.len();
    let mut parts: Vec<Option<Part>> = (0..n).map(|_| None).collect();
    let mut next = 0;
    let mut running: Vec<(usize, Sending<'_>)> = Vec::with_capacity(conn.embeddings.parallel.min(n));
    std::future::poll_fn(|cx| loop {
        while running.len() < conn.embeddings.parallel && next < n {
            let batch = &work.batches[next];
            let body = sub_body(call.body, work, batch);
            let tokens = work.sent[batch.clone()].iter().map(|&i| work.inputs.tokens[i]).sum();
            running.push((next, Box::pin(send(via, body, batch.len(), tokens))));
            next += 1;
        }
        let before = running.len();
        let mut k = 0;
        while k < running.len() {
            match running[k].1.as_mut().poll(cx) {
                Poll::Ready(Ok(part)) => {
                    parts[running.swap_remove(k).0] = Some(part);
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => k += 1,
            }
        }
        if running.is_empty() && next == n {
            return Poll::Ready(Ok(()));
        }
        if running.len() == before {
            return Poll::Pending;
        }
    })
    .await?;
    Ok(parts.into_iter().flatten().collect())
}

type Sending<'a> = Pin<Box<dyn Future<Output = Result<Part, Error>> + Send + 'a>>;

/// One sub-request: an embeddings slot, the provider's request for `body`, the answer read whole.
async fn send(
    (conn, transport, call, target, quota): Via<'_, '_>,
    body: Vec<u8>,
    n: usize,
    tokens: u64,
) -> Result<Part, Error> {
    let _slot = conn.embeddings.slot(&conn.name).await?;
    // Each upstream request admits against the connection's quota, settled with its usage.
    let admission = match quota {
        Some((limits, bound, id)) => {
            limits.admit_connection(bound, id, crate::limit::Ask { tokens, cost: 0.0 }).await.map_err(|d| d.error())?
        }
        None => None,
    };
    let fields = json::scan_request(&body)
        .map_err(|_| Error::invalid_request("The embeddings request could not be split.").param("input"))?;
    let body = bytes::Bytes::from(body);
    let sub = Call { body: &body, fields: &fields, ..*call };
    let prepared = conn.provider.prepare(conn, &sub, target)?;
    let deadline = prepared.plan.deadline;
    let head = transport.send(conn, prepared.request, deadline).await?;
    match conn.provider.classify(conn, head, &prepared.plan).await {
        Verdict::Success(head) => {
            let bytes = crate::provider::read_body(conn, head.into_body(), body_limit(n), deadline).await?;
            let part = part(bytes, n, &conn.name)?;
            if let Some(a) = admission {
                a.settle(Some(part.total), None);
            }
            Ok(part)
        }
        Verdict::Failure { error, .. } => Err(error),
    }
}

/// Where sub-requests go: the connection, its transport, the client's call, the target, and
/// the connection's quota when it has one (limits, their bound scopes, the connection's id).
pub type Via<'a, 'c> = (
    &'a Connection,
    &'a Transport,
    &'a Call<'c>,
    &'a Target,
    Option<(&'a crate::limit::Limits, &'a crate::limit::Bound, usize)>,
);

#[cfg(test)]
mod tests;
