//! Hand-written JSON scanning for the hot path: no allocation, no tree.
//!
//! The passthrough path never deserialises a request. [`scan_request`] makes one validating pass
//! over the body (RFC 8259 grammar, UTF-8, nesting bounded at [`MAX_DEPTH`]) and records where
//! the top-level `model`, `stream` and `stream_options` values lie, so the proxy can route on the
//! model and splice bytes. Keys are compared after unescaping (`"mod\u0065l"` is `model`), and a
//! duplicated one is an error: otherwise a client could show one model to the access check and
//! another to the upstream, whose parser may keep the other duplicate.
//!
//! The same scanner reads upstream JSON that is only observed: [`usage`] finds the `usage`
//! object of a response or stream event without building anything.
//!
//! Documents that must be read whole (a request being translated, a non-stream response being
//! rewritten) are deserialised with simd-json by [`with_scratch`]: simd-json unescapes strings in
//! place, so it needs a mutable copy, and that copy goes into a per-thread buffer reused across
//! requests (as do simd-json's own buffers). Sub-trees that are only carried over (tool schemas,
//! tool inputs) are read as [`Raw`], since serde_json's `RawValue` exists only for serde_json.

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use std::cell::RefCell;
use std::ops::Range;

/// Deepest nesting accepted; deeper documents are rejected rather than risking a slow path.
pub const MAX_DEPTH: usize = 256;

/// Why a JSON text was rejected, and where.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScanError {
    /// Byte offset of the problem.
    pub offset: usize,
    /// What was wrong there.
    pub what: &'static str,
}

impl std::fmt::Display for ScanError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} at byte {}", self.what, self.offset)
    }
}

/// The top-level request members the gateway cares about, as byte ranges of their values.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RequestFields {
    /// The `model` value (a string token, quotes included).
    pub model: Option<Range<usize>>,
    /// The `stream` value.
    pub stream: Option<Range<usize>>,
    /// The `stream_options` value.
    pub stream_options: Option<Range<usize>>,
    /// The `messages` value (chat).
    pub messages: Option<Range<usize>>,
    /// The `prompt` value (completions).
    pub prompt: Option<Range<usize>>,
    /// The `input` value (embeddings).
    pub input: Option<Range<usize>>,
    /// The `max_tokens` value.
    pub max_tokens: Option<Range<usize>>,
    /// The `max_completion_tokens` value.
    pub max_completion_tokens: Option<Range<usize>>,
    /// The `encoding_format` value (embeddings).
    pub encoding_format: Option<Range<usize>>,
}

/// Why a request body is unusable: malformed JSON, or a duplicated member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestError {
    /// The body is not a valid JSON object.
    Syntax(ScanError),
    /// A member the gateway reads appears twice.
    Duplicate(&'static str),
}

/// Validates `body` as one JSON object and locates its top-level `model`, `stream`,
/// `stream_options`, `messages`, `prompt`, `input`, `max_tokens` and `max_completion_tokens`
/// values. Nested keys of the same names are
/// not looked at.
pub fn scan_request(body: &[u8]) -> Result<RequestFields, RequestError> {
    if let Err(e) = std::str::from_utf8(body) {
        return Err(RequestError::Syntax(ScanError { offset: e.valid_up_to(), what: "invalid UTF-8" }));
    }
    let mut fields = RequestFields::default();
    let mut dup = None;
    members(body, |key, value| {
        let slot = match key_name(key) {
            Some(Known::Model) => (&mut fields.model, "model"),
            Some(Known::Stream) => (&mut fields.stream, "stream"),
            Some(Known::StreamOptions) => (&mut fields.stream_options, "stream_options"),
            Some(Known::Messages) => (&mut fields.messages, "messages"),
            Some(Known::Prompt) => (&mut fields.prompt, "prompt"),
            Some(Known::Input) => (&mut fields.input, "input"),
            Some(Known::MaxTokens) => (&mut fields.max_tokens, "max_tokens"),
            Some(Known::MaxCompletionTokens) => (&mut fields.max_completion_tokens, "max_completion_tokens"),
            Some(Known::EncodingFormat) => (&mut fields.encoding_format, "encoding_format"),
            None => return true,
        };
        if slot.0.is_some() {
            dup = Some(slot.1);
            return false;
        }
        *slot.0 = Some(value);
        true
    })
    .map_err(RequestError::Syntax)?;
    match dup {
        Some(name) => Err(RequestError::Duplicate(name)),
        None => Ok(fields),
    }
}

/// Calls `f(raw_key, value_range)` for each member of the JSON object that `text` holds (white
/// space around it allowed), validating the whole text. `raw_key` is the key token with its
/// quotes. `f` returns false to stop early; the rest is then not validated.
pub fn members(text: &[u8], mut f: impl FnMut(&[u8], Range<usize>) -> bool) -> Result<(), ScanError> {
    let mut s = Scanner { b: text, i: 0 };
    s.ws();
    s.expect(b'{', "expected a JSON object")?;
    s.ws();
    if s.peek() == Some(b'}') {
        s.i += 1;
    } else {
        loop {
            s.ws();
            let key = s.key()?;
            s.ws();
            let start = s.i;
            s.value()?;
            if !f(&text[key], start..s.i) {
                return Ok(());
            }
            s.ws();
            match s.peek() {
                Some(b',') => s.i += 1,
                Some(b'}') => {
                    s.i += 1;
                    break;
                }
                _ => return Err(s.err("expected `,` or `}` after an object member")),
            }
        }
    }
    s.ws();
    if s.i != text.len() {
        return Err(s.err("unexpected data after the JSON value"));
    }
    Ok(())
}

/// The ranges of the named top-level members of a JSON object (first occurrence each). For a
/// part of a text already validated: a value that is not an object has none of them.
pub fn fields<const N: usize>(text: &[u8], names: &[&[u8]; N]) -> [Option<Range<usize>>; N] {
    let mut out: [Option<Range<usize>>; N] = std::array::from_fn(|_| None);
    let _ = members(text, |k, v| {
        record_member(&mut out, names, k, v);
        true
    });
    out
}

/// [`fields`], validating the whole text in the same pass.
pub fn checked_fields<const N: usize>(text: &[u8], names: &[&[u8]; N]) -> Result<[Option<Range<usize>>; N], ScanError> {
    let mut out: [Option<Range<usize>>; N] = std::array::from_fn(|_| None);
    members(text, |k, v| {
        record_member(&mut out, names, k, v);
        true
    })?;
    Ok(out)
}

/// Keeps `v` as the member named by raw key `k` when `names` has it and it is not set yet.
fn record_member<const N: usize>(out: &mut [Option<Range<usize>>; N], names: &[&[u8]; N], k: &[u8], v: Range<usize>) {
    if let Some(k) = unescaped_key::<24>(k) {
        if let Some(i) = names.iter().position(|n| *n == k.as_slice()) {
            if out[i].is_none() {
                out[i] = Some(v);
            }
        }
    }
}

/// Calls `f(value_range)` for each element of the JSON array that `text` holds (white space
/// around it allowed), validating the whole text; `f` returns false to stop early.
pub fn elements(text: &[u8], mut f: impl FnMut(Range<usize>) -> bool) -> Result<(), ScanError> {
    let mut s = Scanner { b: text, i: 0 };
    s.ws();
    s.expect(b'[', "expected a JSON array")?;
    s.ws();
    if s.peek() == Some(b']') {
        s.i += 1;
    } else {
        loop {
            s.ws();
            let start = s.i;
            s.value()?;
            if !f(start..s.i) {
                return Ok(());
            }
            s.ws();
            match s.peek() {
                Some(b',') => s.i += 1,
                Some(b']') => {
                    s.i += 1;
                    break;
                }
                _ => return Err(s.err("expected `,` or `]` after an array element")),
            }
        }
    }
    s.ws();
    if s.i != text.len() {
        return Err(s.err("unexpected data after the JSON value"));
    }
    Ok(())
}

/// Returns the end of the JSON value starting at `text[start]` (white space before it allowed).
pub fn value_end(text: &[u8], start: usize) -> Result<usize, ScanError> {
    let mut s = Scanner { b: text, i: start };
    s.ws();
    s.value()?;
    Ok(s.i)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Known {
    Model,
    Stream,
    StreamOptions,
    Messages,
    Prompt,
    Input,
    MaxTokens,
    MaxCompletionTokens,
    EncodingFormat,
}

fn key_name(raw: &[u8]) -> Option<Known> {
    match unescaped_key::<24>(raw)?.as_slice() {
        b"model" => Some(Known::Model),
        b"stream" => Some(Known::Stream),
        b"stream_options" => Some(Known::StreamOptions),
        b"messages" => Some(Known::Messages),
        b"prompt" => Some(Known::Prompt),
        b"input" => Some(Known::Input),
        b"max_tokens" => Some(Known::MaxTokens),
        b"max_completion_tokens" => Some(Known::MaxCompletionTokens),
        b"encoding_format" => Some(Known::EncodingFormat),
        _ => None,
    }
}

/// A short key unescaped into a stack buffer; `None` when it is longer than `N` bytes (so it
/// cannot be any key we compare against) or uses a non-ASCII escape.
pub struct ShortKey<const N: usize> {
    buf: [u8; N],
    len: usize,
}

impl<const N: usize> ShortKey<N> {
    /// The unescaped key bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// Unescapes a key or string token (quotes included) of at most `N` bytes, without allocating.
/// `None` for anything else: callers pass value tokens from upstreams, which may be any JSON.
pub fn unescaped_key<const N: usize>(raw: &[u8]) -> Option<ShortKey<N>> {
    let inner = raw.strip_prefix(b"\"")?.strip_suffix(b"\"")?;
    let mut out = ShortKey { buf: [0; N], len: 0 };
    let mut i = 0;
    while i < inner.len() {
        let c = match inner[i] {
            b'\\' => {
                i += 1;
                match *inner.get(i)? {
                    b'u' => {
                        let hex = std::str::from_utf8(inner.get(i + 1..i + 5)?).ok()?;
                        i += 4;
                        let code = u8::try_from(u16::from_str_radix(hex, 16).ok()?).ok()?;
                        if !code.is_ascii() {
                            return None;
                        }
                        code
                    }
                    b'n' => b'\n',
                    b't' => b'\t',
                    b'r' => b'\r',
                    b'b' => 8,
                    b'f' => 12,
                    other => other,
                }
            }
            c => c,
        };
        *out.buf.get_mut(out.len)? = c;
        out.len += 1;
        i += 1;
    }
    Some(out)
}

/// The string value of a JSON string token (quotes included), unescaped.
pub fn string_value(token: &[u8]) -> Option<String> {
    if token.len() < 2 || token[0] != b'"' {
        return None;
    }
    let inner = &token[1..token.len() - 1];
    if memchr::memchr(b'\\', inner).is_none() {
        return std::str::from_utf8(inner).ok().map(str::to_owned);
    }
    serde_json::from_slice(token).ok()
}

/// Appends `s` as a JSON string token.
pub fn write_str(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &c) in bytes.iter().enumerate() {
        let esc: &[u8] = match c {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0..=0x1f => b"",
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        if esc.is_empty() {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            out.extend_from_slice(b"\\u00");
            out.push(HEX[(c >> 4) as usize]);
            out.push(HEX[(c & 15) as usize]);
        } else {
            out.extend_from_slice(esc);
        }
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

/// Token counts reported by an upstream.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// `prompt_tokens`.
    pub prompt: u64,
    /// `completion_tokens` (0 for embeddings).
    pub completion: u64,
    /// The part of `prompt` read from the provider's prompt cache
    /// (`prompt_tokens_details.cached_tokens`).
    pub cached: u64,
    /// The part of `prompt` written to the provider's prompt cache (Anthropic's
    /// `cache_creation_input_tokens`; OpenAI reports none).
    pub cache_write: u64,
}

/// Reads the top-level `usage` object of a JSON object text. Also says whether its `choices` is
/// an empty array (OpenAI's usage-only stream event). `None` when there is no usage object.
pub fn usage(text: &[u8]) -> Option<(Usage, bool)> {
    let mut usage_at = None;
    let mut empty_choices = false;
    members(text, |key, value| {
        match unescaped_key::<8>(key).as_ref().map(ShortKey::as_slice) {
            Some(b"usage") => usage_at = Some(value),
            Some(b"choices") => empty_choices = is_empty_array(&text[value]),
            _ => {}
        }
        true
    })
    .ok()?;
    Some((usage_object(&text[usage_at?])?, empty_choices))
}

/// Reads `prompt_tokens` and `completion_tokens` from a usage object text.
pub fn usage_object(text: &[u8]) -> Option<Usage> {
    let mut u = Usage::default();
    let mut any = false;
    members(text, |key, value| {
        let n = || u64_of(&text[value.clone()]);
        match unescaped_key::<20>(key).as_ref().map(ShortKey::as_slice) {
            Some(b"prompt_tokens") => {
                u.prompt = n().unwrap_or(0);
                any = true;
            }
            Some(b"completion_tokens") => {
                u.completion = n().unwrap_or(0);
                any = true;
            }
            Some(b"prompt_tokens_details") => {
                let details = &text[value.clone()];
                let _ = members(details, |k, v| {
                    if unescaped_key::<16>(k).as_ref().map(ShortKey::as_slice) == Some(b"cached_tokens") {
                        u.cached = u64_of(&details[v]).unwrap_or(0);
                    }
                    true
                });
            }
            _ => {}
        }
        true
    })
    .ok()?;
    any.then_some(u)
}

/// A non-negative integer token.
pub fn u64_of(token: &[u8]) -> Option<u64> {
    std::str::from_utf8(token.trim_ascii()).ok()?.parse().ok()
}

fn is_empty_array(v: &[u8]) -> bool {
    let v = v.trim_ascii();
    v.first() == Some(&b'[') && v[1..].trim_ascii() == b"]"
}

/// Finds the usage object in the last bytes of a JSON response whose head has already gone to
/// the client. Upstreams put `usage` after the (possibly huge) payload, so a bounded tail is
/// enough; a `"usage"` inside a string cannot match because its quotes would be escaped.
pub fn usage_in_tail(tail: &[u8]) -> Option<Usage> {
    // Built once rather than per response (callgrind: about 190 instructions per request).
    static FINDER: std::sync::LazyLock<memchr::memmem::FinderRev<'static>> =
        std::sync::LazyLock::new(|| memchr::memmem::FinderRev::new(b"\"usage\""));
    let mut end = tail.len();
    while let Some(at) = FINDER.rfind(&tail[..end]) {
        end = at;
        let before = tail[..at].trim_ascii_end();
        if !matches!(before.last(), Some(b',' | b'{')) {
            continue;
        }
        let rest = tail[at + 7..].trim_ascii_start();
        let Some(rest) = rest.strip_prefix(b":") else { continue };
        let rest = rest.trim_ascii_start();
        if let Ok(len) = value_end(rest, 0) {
            if let Some(u) = usage_object(&rest[..len]) {
                return Some(u);
            }
        }
    }
    None
}

/// A reused mutable copy of a document, for simd-json. See [`with_scratch`].
pub struct Scratch {
    copy: Vec<u8>,
    buffers: simd_json::Buffers,
}

/// Scratch space kept per thread after a document of at most this size; a larger one is freed,
/// so one huge request does not pin its size of memory on a worker thread for good.
const SCRATCH_KEPT: usize = 1 << 20;

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::new());
}

impl Scratch {
    fn new() -> Self {
        // Nesting bounded as the scanner bounds it: simd-json's deserialiser recurses per level.
        Scratch { copy: Vec::new(), buffers: simd_json::Buffers::with_max_depth(0, MAX_DEPTH) }
    }

    /// Deserialises the copy (once: simd-json rewrites it). Strings borrow from the copy, so
    /// `&str` fields work whatever escapes the text had.
    pub fn parse<'a, T: Deserialize<'a>>(&'a mut self) -> Result<T, simd_json::Error> {
        simd_json::serde::from_slice_with_buffers(&mut self.copy, &mut self.buffers)
    }
}

/// Copies `text` into this thread's scratch buffer and hands it to `f` for parsing. The buffer
/// and simd-json's own buffers are reused by the next call on the thread.
pub fn with_scratch<R>(text: &[u8], f: impl FnOnce(&mut Scratch) -> R) -> R {
    let run = |scratch: &mut Scratch| {
        scratch.copy.clear();
        scratch.copy.extend_from_slice(text);
        let out = f(scratch);
        if text.len() > SCRATCH_KEPT {
            *scratch = Scratch::new();
        }
        out
    };
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut scratch) => run(&mut scratch),
        // Only reached if `f` itself parsed another document: it gets a scratch of its own.
        Err(_) => run(&mut Scratch::new()),
    })
}

/// A JSON value carried over as text: deserialised from any serde format and rendered compactly,
/// key order and duplicate keys kept, strings re-escaped, integers exact, other numbers in
/// their shortest round-trip form. The stand-in for serde_json's `RawValue` under simd-json.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Raw(pub Vec<u8>);

impl Raw {
    /// Whether the value is `{}`.
    pub fn is_empty_object(&self) -> bool {
        self.0 == b"{}"
    }
}

impl<'de> Deserialize<'de> for Raw {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let mut out = Vec::new();
        Render(&mut out).deserialize(d)?;
        Ok(Raw(out))
    }
}

/// Renders one value into the buffer as it is visited.
struct Render<'o>(&'o mut Vec<u8>);

impl<'de> DeserializeSeed<'de> for Render<'_> {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Render<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<(), E> {
        self.0.extend_from_slice(if v { b"true" } else { b"false" });
        Ok(())
    }

    fn visit_i64<E>(self, v: i64) -> Result<(), E> {
        self.0.extend_from_slice(v.to_string().as_bytes());
        Ok(())
    }

    fn visit_u64<E>(self, v: u64) -> Result<(), E> {
        self.0.extend_from_slice(v.to_string().as_bytes());
        Ok(())
    }

    fn visit_f64<E>(self, v: f64) -> Result<(), E> {
        // A parser never yields a non-finite number; JSON has no spelling for one.
        if v.is_finite() {
            self.0.extend_from_slice(ryu::Buffer::new().format_finite(v).as_bytes());
        } else {
            self.0.extend_from_slice(b"null");
        }
        Ok(())
    }

    fn visit_str<E>(self, v: &str) -> Result<(), E> {
        write_str(self.0, v);
        Ok(())
    }

    fn visit_unit<E>(self) -> Result<(), E> {
        self.0.extend_from_slice(b"null");
        Ok(())
    }

    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        self.visit_unit()
    }

    fn visit_some<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        self.0.push(b'[');
        let mut first = true;
        loop {
            // The separator goes in before we know whether an element follows; taken back if not.
            let mark = self.0.len();
            if !first {
                self.0.push(b',');
            }
            if seq.next_element_seed(Render(self.0))?.is_none() {
                self.0.truncate(mark);
                break;
            }
            first = false;
        }
        self.0.push(b']');
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        self.0.push(b'{');
        let mut first = true;
        loop {
            let mark = self.0.len();
            if !first {
                self.0.push(b',');
            }
            // A key renders like any string value.
            if map.next_key_seed(Render(self.0))?.is_none() {
                self.0.truncate(mark);
                break;
            }
            self.0.push(b':');
            map.next_value_seed(Render(self.0))?;
            first = false;
        }
        self.0.push(b'}');
        Ok(())
    }
}

struct Scanner<'a> {
    b: &'a [u8],
    i: usize,
}

impl Scanner<'_> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn err(&self, what: &'static str) -> ScanError {
        ScanError { offset: self.i, what }
    }

    fn expect(&mut self, c: u8, what: &'static str) -> Result<(), ScanError> {
        if self.peek() == Some(c) {
            self.i += 1;
            Ok(())
        } else {
            Err(self.err(what))
        }
    }

    fn ws(&mut self) {
        while let Some(b' ' | b'\n' | b'\r' | b'\t') = self.peek() {
            self.i += 1;
        }
    }

    /// A member key and the colon after it; returns the key token's range.
    fn key(&mut self) -> Result<Range<usize>, ScanError> {
        if self.peek() != Some(b'"') {
            return Err(self.err("expected a string key"));
        }
        let start = self.i;
        self.string()?;
        let key = start..self.i;
        self.ws();
        self.expect(b':', "expected `:` after an object key")?;
        Ok(key)
    }

    /// A string token starting at the opening quote.
    fn string(&mut self) -> Result<(), ScanError> {
        self.i += 1;
        loop {
            let rest = &self.b[self.i..];
            let Some(n) = memchr::memchr2(b'"', b'\\', rest) else {
                self.i = self.b.len();
                return Err(self.err("unterminated string"));
            };
            if let Some(bad) = rest[..n].iter().position(|&c| c < 0x20) {
                self.i += bad;
                return Err(self.err("control character in a string"));
            }
            self.i += n + 1;
            if rest[n] == b'"' {
                return Ok(());
            }
            match self.peek() {
                Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => self.i += 1,
                Some(b'u') => {
                    let hex = self.b.get(self.i + 1..self.i + 5);
                    if !hex.is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit)) {
                        return Err(self.err("invalid \\u escape"));
                    }
                    self.i += 5;
                }
                _ => return Err(self.err("invalid escape")),
            }
        }
    }

    fn digits(&mut self) -> usize {
        let start = self.i;
        while self.peek().is_some_and(|c| c.is_ascii_digit()) {
            self.i += 1;
        }
        self.i - start
    }

    fn number(&mut self) -> Result<(), ScanError> {
        if self.peek() == Some(b'-') {
            self.i += 1;
        }
        match self.peek() {
            Some(b'0') => self.i += 1,
            Some(b'1'..=b'9') => {
                self.digits();
            }
            _ => return Err(self.err("invalid number")),
        }
        if self.peek() == Some(b'.') {
            self.i += 1;
            if self.digits() == 0 {
                return Err(self.err("invalid number"));
            }
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.i += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.i += 1;
            }
            if self.digits() == 0 {
                return Err(self.err("invalid number"));
            }
        }
        Ok(())
    }

    fn literal(&mut self, word: &'static [u8]) -> Result<(), ScanError> {
        if self.b[self.i..].starts_with(word) {
            self.i += word.len();
            Ok(())
        } else {
            Err(self.err("invalid literal"))
        }
    }

    /// One complete value, iteratively (no recursion), nesting tracked in a bit stack.
    fn value(&mut self) -> Result<(), ScanError> {
        let mut stack = [0u64; MAX_DEPTH / 64]; // bit set = object, clear = array
        let mut depth = 0usize;
        let push = |stack: &mut [u64; MAX_DEPTH / 64], depth: &mut usize, obj: bool| {
            if *depth == MAX_DEPTH {
                return false;
            }
            let (w, b) = (*depth / 64, *depth % 64);
            if obj {
                stack[w] |= 1 << b;
            } else {
                stack[w] &= !(1 << b);
            }
            *depth += 1;
            true
        };
        'value: loop {
            self.ws();
            match self.peek() {
                Some(b'{') => {
                    self.i += 1;
                    self.ws();
                    if self.peek() == Some(b'}') {
                        self.i += 1;
                    } else {
                        if !push(&mut stack, &mut depth, true) {
                            return Err(self.err("nesting too deep"));
                        }
                        self.key()?;
                        continue 'value;
                    }
                }
                Some(b'[') => {
                    self.i += 1;
                    self.ws();
                    if self.peek() == Some(b']') {
                        self.i += 1;
                    } else {
                        if !push(&mut stack, &mut depth, false) {
                            return Err(self.err("nesting too deep"));
                        }
                        continue 'value;
                    }
                }
                Some(b'"') => self.string()?,
                Some(b't') => self.literal(b"true")?,
                Some(b'f') => self.literal(b"false")?,
                Some(b'n') => self.literal(b"null")?,
                Some(b'-' | b'0'..=b'9') => self.number()?,
                None => return Err(self.err("unexpected end of JSON")),
                Some(_) => return Err(self.err("expected a JSON value")),
            }
            // After a complete value: close containers or move to the next element.
            loop {
                if depth == 0 {
                    return Ok(());
                }
                let top = depth - 1;
                let in_object = stack[top / 64] & (1 << (top % 64)) != 0;
                self.ws();
                match (self.peek(), in_object) {
                    (Some(b','), true) => {
                        self.i += 1;
                        self.ws();
                        self.key()?;
                        continue 'value;
                    }
                    (Some(b','), false) => {
                        self.i += 1;
                        continue 'value;
                    }
                    (Some(b'}'), true) | (Some(b']'), false) => {
                        self.i += 1;
                        depth -= 1;
                    }
                    (None, _) => return Err(self.err("unexpected end of JSON")),
                    _ => return Err(self.err("expected `,` or a closing bracket")),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(s: &str) -> RequestFields {
        scan_request(s.as_bytes()).unwrap()
    }

    fn at<'a>(s: &'a str, r: &Option<Range<usize>>) -> &'a str {
        &s[r.clone().unwrap()]
    }

    #[test]
    fn finds_top_level_members_in_any_order_and_spacing() {
        let s = r#" { "stream" : true ,"messages":[{"model":"inner"}], "model" :"gpt-4o","stream_options":{ } } "#;
        let f = fields(s);
        assert_eq!(at(s, &f.model), "\"gpt-4o\"");
        assert_eq!(at(s, &f.stream), "true");
        assert_eq!(at(s, &f.stream_options), "{ }");
    }

    #[test]
    fn nested_model_keys_are_not_top_level() {
        let s = r#"{"metadata":{"model":"x"},"tools":[{"model":"y"}]}"#;
        assert_eq!(fields(s).model, None);
    }

    #[test]
    fn escaped_keys_are_compared_after_unescaping() {
        let s = r#"{"mod\u0065l":"a"}"#;
        assert_eq!(at(s, &fields(s).model), "\"a\"");
        let dup = r#"{"model":"a","mod\u0065l":"b"}"#;
        assert_eq!(scan_request(dup.as_bytes()), Err(RequestError::Duplicate("model")));
    }

    #[test]
    fn duplicate_stream_members_are_rejected() {
        for s in [r#"{"stream":true,"stream":false}"#, r#"{"stream_options":null,"stream_options":{}}"#] {
            assert!(matches!(scan_request(s.as_bytes()), Err(RequestError::Duplicate(_))));
        }
    }

    #[test]
    fn malformed_json_is_rejected_with_an_offset() {
        for bad in [
            "",
            "[]",
            "{",
            r#"{"model":}"#,
            r#"{"model":"a",}"#,
            r#"{"model":"a"} x"#,
            r#"{"a":[1,2,]}"#,
            r#"{"a":01}"#,
            r#"{"a":1.}"#,
            r#"{"a":tru}"#,
            "{\"a\":\"x\ny\"}",
            r#"{"a":"\x"}"#,
            r#"{"a":"\u12"}"#,
            r#"{"a" 1}"#,
            r#"{"a":[}"#,
            r#"{"a":{]}"#,
        ] {
            assert!(matches!(scan_request(bad.as_bytes()), Err(RequestError::Syntax(_))), "accepted {bad:?}");
        }
    }

    #[test]
    fn valid_json_of_every_kind_is_accepted() {
        let s = r#"{"a":[1,-0.5e+3,2E-2,true,false,null,"\"\\\/\b\f\n\r\t\u00e9",{},[],{"b":[[{}]]}]}"#;
        assert!(scan_request(s.as_bytes()).is_ok());
        // serde_json agrees on every accepted and rejected sample above.
        assert!(serde_json::from_str::<serde_json::Value>(s).is_ok());
    }

    #[test]
    fn invalid_utf8_is_rejected() {
        assert!(scan_request(b"{\"a\":\"\xff\"}").is_err());
    }

    #[test]
    fn nesting_is_bounded_without_recursion() {
        let deep = format!("{{\"a\":{}{}}}", "[".repeat(100_000), "]".repeat(100_000));
        assert!(scan_request(deep.as_bytes()).is_err());
        let ok = format!("{{\"a\":{}{}}}", "[".repeat(200), "]".repeat(200));
        assert!(scan_request(ok.as_bytes()).is_ok());
    }

    #[test]
    fn non_string_tokens_are_not_keys() {
        for token in [&b"1"[..], b"null", b"\"", b"", b"{}"] {
            assert!(unescaped_key::<8>(token).is_none(), "{token:?}");
        }
        assert_eq!(unescaped_key::<8>(br#""a\u0062""#).unwrap().as_slice(), b"ab");
    }

    #[test]
    fn string_value_unescapes() {
        assert_eq!(string_value(br#""gpt-4o""#).unwrap(), "gpt-4o");
        assert_eq!(string_value(br#""g\u0070t""#).unwrap(), "gpt");
    }

    #[test]
    fn write_str_escapes_and_roundtrips() {
        let mut out = Vec::new();
        let s = "a\"b\\c\nd\u{1}é";
        write_str(&mut out, s);
        assert_eq!(serde_json::from_slice::<String>(&out).unwrap(), s);
    }

    #[test]
    fn usage_of_an_event_and_empty_choices() {
        let ev = br#"{"id":"x","choices":[],"usage":{"prompt_tokens":12,"completion_tokens":34,"total_tokens":46}}"#;
        assert_eq!(usage(ev), Some((Usage { prompt: 12, completion: 34, ..Usage::default() }, true)));
        let ev = br#"{"choices":[{"delta":{}}],"usage":null}"#;
        assert_eq!(usage(ev), None);
    }

    fn raw(text: &str) -> String {
        let raw: Raw = with_scratch(text.as_bytes(), |s| s.parse()).unwrap();
        String::from_utf8(raw.0).unwrap()
    }

    #[test]
    fn raw_values_render_compactly_in_their_key_order() {
        // More keys than a small-map backend keeps in order, and keys that sort differently.
        let keys: Vec<String> = (0..40).map(|i| format!("\"k{}\":{i}", 40 - i)).collect();
        let text = format!("{{ {} }}", keys.join(" , "));
        assert_eq!(raw(&text), format!("{{{}}}", keys.join(",")));
        assert_eq!(
            raw(r#" { "b" : [ 1 , -2 , 1.50 , 1e2 , true , null , { } , [ ] ] , "a" : "x" } "#),
            r#"{"b":[1,-2,1.5,100.0,true,null,{},[]],"a":"x"}"#
        );
    }

    #[test]
    fn raw_strings_are_re_escaped_to_the_same_value() {
        let text = r#"{"k\u00e9\"y":"a\n\"b\"\\ \u0001 \ud83d\ude00 /"}"#;
        let got = raw(text);
        let want: serde_json::Value = serde_json::from_str(text).unwrap();
        assert_eq!(serde_json::from_str::<serde_json::Value>(&got).unwrap(), want);
        assert_eq!(got, "{\"ké\\\"y\":\"a\\n\\\"b\\\"\\\\ \\u0001 😀 /\"}");
    }

    #[test]
    fn integers_beyond_64_bits_read_as_floats_like_serde_json() {
        assert_eq!(raw(r#"{"n":123456789012345678901234567890}"#), r#"{"n":1.2345678901234568e29}"#);
    }

    #[test]
    fn scratch_is_reused_without_leftovers_from_a_longer_document() {
        assert_eq!(
            raw(r#"{"long":"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"}"#),
            r#"{"long":"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"}"#
        );
        assert_eq!(raw(r#"{"s":1}"#), r#"{"s":1}"#);
        // A parse nested in another gets a scratch of its own.
        let (outer, inner) = with_scratch(br#"{"o":2}"#, |s| {
            let inner: Raw = with_scratch(br#"{"i":3}"#, |s| s.parse()).unwrap();
            (s.parse::<Raw>().unwrap(), inner)
        });
        assert_eq!((outer.0, inner.0), (br#"{"o":2}"#.to_vec(), br#"{"i":3}"#.to_vec()));
    }

    #[test]
    fn scratch_parses_refuse_nesting_deeper_than_the_scanner_allows() {
        let deep = format!("{{\"a\":{}{}}}", "[".repeat(MAX_DEPTH + 1), "]".repeat(MAX_DEPTH + 1));
        assert!(with_scratch(deep.as_bytes(), |s| s.parse::<Raw>()).is_err());
        let ok = format!("{{\"a\":{}{}}}", "[".repeat(MAX_DEPTH - 2), "]".repeat(MAX_DEPTH - 2));
        assert!(with_scratch(ok.as_bytes(), |s| s.parse::<Raw>()).is_ok());
    }

    #[test]
    fn usage_in_a_tail_ignores_quoted_lookalikes() {
        let tail = br#"3,0.4]}],"note":"\"usage\": {\"prompt_tokens\": 9}","model":"m","usage":{"prompt_tokens":7,"total_tokens":7}}"#;
        assert_eq!(usage_in_tail(tail), Some(Usage { prompt: 7, completion: 0, ..Usage::default() }));
        assert_eq!(usage_in_tail(br#"{"a":"\"usage\":{\"prompt_tokens\":9}"}"#), None);
    }
}
