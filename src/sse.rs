//! Server-sent events: finding event boundaries in a byte stream, incrementally.
//!
//! Follows the WHATWG event-stream rules
//! (<https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation>):
//! lines end in LF, CRLF or a lone CR, and a CR at the end of one chunk followed by an LF at the
//! start of the next is one line end; an empty line ends an event. [`Splitter`] reports where
//! events end without copying, so the passthrough body can forward whole events as slices of the
//! upstream's own buffers and hold back only a trailing partial event. [`data`] reads an event's
//! `data` field (multi-line data joined with `\n`, one leading space stripped).
//!
//! [`Decoder`] is the full field-level decoder the translators read: a leading BOM is stripped,
//! `:` lines are comments, `event`/`data`/`id`/`retry` are interpreted, one space after the colon
//! is removed, a line without a colon is a field with an empty value, a blank line dispatches, and
//! a partial event at end of stream is discarded. An event that lies inside one chunk is handed
//! out as slices of that chunk (no copy); only events that straddle chunks are copied. A maximum
//! event size turns a runaway upstream into an error. [`LineDecoder`] does the same job for
//! NDJSON streams (one JSON document per line).

use memchr::{memchr, memchr2};
use std::ops::Range;

/// How a provider frames the events of its stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// Server-sent events (Anthropic, OpenAI, Gemini's `alt=sse`, Cohere v2).
    Sse,
    /// One JSON document per line (Ollama): each non-blank line is an event with that line as
    /// its `data` and empty `event` and `id`.
    Ndjson,
}

/// The decoder for a [`Framing`]: events of either kind come out as [`Event`]s.
pub enum FramedDecoder {
    /// Server-sent events.
    Sse(Decoder),
    /// NDJSON lines.
    Lines(LineDecoder),
}

impl FramedDecoder {
    /// A decoder for `framing` that fails once one event (or line) exceeds `limit` bytes.
    pub fn new(framing: Framing, limit: usize) -> Self {
        match framing {
            Framing::Sse => FramedDecoder::Sse(Decoder::new(limit)),
            Framing::Ndjson => FramedDecoder::Lines(LineDecoder::new(limit)),
        }
    }

    /// Decodes `chunk`, handing each complete event on.
    pub fn feed(&mut self, chunk: &[u8], mut on_event: impl FnMut(Event<'_>)) -> Result<(), TooLarge> {
        match self {
            FramedDecoder::Sse(d) => d.feed(chunk, on_event),
            FramedDecoder::Lines(d) => d.feed(chunk, |line| on_event(Event { event: b"", data: line, id: b"" })),
        }
    }

    /// The stream ended: a last NDJSON line without its LF is complete (an unterminated SSE
    /// event is discarded, as the WHATWG rules say).
    pub fn finish(&mut self, mut on_event: impl FnMut(Event<'_>)) {
        if let FramedDecoder::Lines(d) = self {
            d.finish(|line| on_event(Event { event: b"", data: line, id: b"" }));
        }
    }
}

/// Finds the ends of events across chunks. State is two bits: whether the current line is still
/// empty and whether the last byte seen was a CR (whose LF may arrive in the next chunk).
#[derive(Debug, Clone)]
pub struct Splitter {
    line_empty: bool,
    after_cr: bool,
}

impl Default for Splitter {
    fn default() -> Self {
        Splitter { line_empty: true, after_cr: false }
    }
}

impl Splitter {
    /// Whether `chunk` starts with the LF of a CRLF whose CR ended the previous chunk; if so that
    /// LF is consumed here (call before [`Splitter::next_end`] on the chunk, then scan from 1).
    /// Lets a caller that dropped nothing count that LF with the line end it finishes.
    pub fn continues_line_end(&mut self, chunk: &[u8]) -> bool {
        let continues = self.after_cr && chunk.first() == Some(&b'\n');
        if continues {
            self.after_cr = false;
        }
        continues
    }

    /// Scans `chunk[from..]` and returns the offset just past the next event's terminating blank
    /// line (its LF included when a CRLF ends it in this chunk), or `None` when the chunk ends
    /// first. Every byte up to the returned offset (or the whole chunk) is consumed: call again
    /// from the returned offset, and with the next chunk from 0.
    pub fn next_end(&mut self, chunk: &[u8], mut i: usize) -> Option<usize> {
        while i < chunk.len() {
            if self.after_cr {
                self.after_cr = false;
                if chunk[i] == b'\n' {
                    i += 1;
                    continue;
                }
            }
            let Some(n) = memchr2(b'\n', b'\r', &chunk[i..]) else {
                self.line_empty = false;
                return None;
            };
            let p = i + n;
            let blank = self.line_empty && n == 0;
            self.line_empty = true;
            i = p + 1;
            if chunk[p] == b'\r' {
                if chunk.get(i) == Some(&b'\n') {
                    i += 1;
                } else if i == chunk.len() {
                    self.after_cr = true;
                }
            }
            if blank {
                return Some(i);
            }
        }
        None
    }
}

/// The `data` of one raw event (its bytes up to and including the blank line). Borrows the
/// event when it has one data line; joins several into `scratch`. `None` when it has none.
pub fn data<'a>(event: &'a [u8], scratch: &'a mut Vec<u8>) -> Option<&'a [u8]> {
    let mut first: Option<&'a [u8]> = None;
    let mut joined = false;
    for line in lines(event) {
        let value = match line.strip_prefix(b"data") {
            Some([]) => &[][..],
            Some([b':', rest @ ..]) => rest.strip_prefix(b" ").unwrap_or(rest),
            _ => continue,
        };
        match first {
            None => first = Some(value),
            Some(f) => {
                if !joined {
                    scratch.clear();
                    scratch.extend_from_slice(f);
                    joined = true;
                }
                scratch.push(b'\n');
                scratch.extend_from_slice(value);
            }
        }
    }
    if joined {
        Some(&scratch[..])
    } else {
        first
    }
}

/// The lines of a complete event, without their line ends.
fn lines(mut s: &[u8]) -> impl Iterator<Item = &[u8]> {
    std::iter::from_fn(move || {
        if s.is_empty() {
            return None;
        }
        let n = memchr2(b'\n', b'\r', s).unwrap_or(s.len());
        let line = &s[..n];
        let mut next = (n + 1).min(s.len());
        if s.get(n) == Some(&b'\r') && s.get(n + 1) == Some(&b'\n') {
            next += 1;
        }
        s = &s[next..];
        Some(line)
    })
}

/// One decoded event. Slices borrow the chunk being fed or the decoder's buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Event<'a> {
    /// The `event` field; empty means the default type, `message`.
    pub event: &'a [u8],
    /// The data lines joined with `\n`.
    pub data: &'a [u8],
    /// The last event id seen on the stream (it persists across events, as the spec says).
    pub id: &'a [u8],
}

/// The stream went over the decoder's event size limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooLarge {
    /// The limit in bytes.
    pub limit: usize,
}

impl std::fmt::Display for TooLarge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "an upstream event is larger than {} bytes", self.limit)
    }
}

/// Where a buffered field value lives: nowhere yet, in the current chunk, or in our buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Slot {
    Empty,
    Chunk(Range<usize>),
    Owned,
}

/// Incremental WHATWG event-stream decoder; see the module documentation.
#[derive(Debug)]
pub struct Decoder {
    limit: usize,
    /// Bytes of the BOM matched so far at stream start; 3 once the start is past.
    bom: u8,
    after_cr: bool,
    /// A line that started in an earlier chunk.
    line: Vec<u8>,
    data: Slot,
    data_buf: Vec<u8>,
    kind: Slot,
    kind_buf: Vec<u8>,
    id: Vec<u8>,
    /// Size of the event being read, for the limit.
    size: usize,
}

const BOM: [u8; 3] = [0xEF, 0xBB, 0xBF];

impl Decoder {
    /// A decoder that fails once one event (or line) exceeds `limit` bytes.
    pub fn new(limit: usize) -> Self {
        Decoder {
            limit,
            bom: 0,
            after_cr: false,
            line: Vec::new(),
            data: Slot::Empty,
            data_buf: Vec::new(),
            kind: Slot::Empty,
            kind_buf: Vec::new(),
            id: Vec::new(),
            size: 0,
        }
    }

    /// Decodes `chunk`, calling `on_event` for every event it completes. Any chunking of the
    /// same bytes yields the same events.
    pub fn feed(&mut self, chunk: &[u8], mut on_event: impl FnMut(Event<'_>)) -> Result<(), TooLarge> {
        let mut i = 0;
        while self.bom < 3 && i < chunk.len() {
            if chunk[i] == BOM[self.bom as usize] {
                self.bom += 1;
                i += 1;
            } else {
                // Not a BOM after all: the bytes matched so far are text.
                self.line.extend_from_slice(&BOM[..self.bom as usize]);
                self.bom = 3;
            }
        }
        while i < chunk.len() {
            if self.after_cr {
                self.after_cr = false;
                if chunk[i] == b'\n' {
                    i += 1;
                    continue;
                }
            }
            let Some(n) = memchr2(b'\n', b'\r', &chunk[i..]) else {
                self.grow(chunk.len() - i)?;
                self.line.extend_from_slice(&chunk[i..]);
                break;
            };
            let end = i + n;
            let mut next = end + 1;
            if chunk[end] == b'\r' {
                match chunk.get(next) {
                    Some(b'\n') => next += 1,
                    Some(_) => {}
                    None => self.after_cr = true,
                }
            }
            self.grow(n + 1)?;
            if self.line.is_empty() {
                self.line(chunk, i..end, &mut on_event);
            } else {
                self.line.extend_from_slice(&chunk[i..end]);
                let line = std::mem::take(&mut self.line);
                self.owned_line(chunk, &line, &mut on_event);
                self.line = line;
                self.line.clear();
            }
            i = next;
        }
        // Field values still pointing into this chunk must outlive it.
        if let Slot::Chunk(r) = &self.data {
            self.data_buf.clear();
            self.data_buf.extend_from_slice(&chunk[r.clone()]);
            self.data = Slot::Owned;
        }
        if let Slot::Chunk(r) = &self.kind {
            self.kind_buf.clear();
            self.kind_buf.extend_from_slice(&chunk[r.clone()]);
            self.kind = Slot::Owned;
        }
        Ok(())
    }

    /// The stream ended: a partial event is discarded, as the spec says. Resets the decoder.
    pub fn finish(&mut self) {
        *self = Decoder::new(self.limit);
    }

    /// Counts `n` more bytes of the current event against the limit.
    fn grow(&mut self, n: usize) -> Result<(), TooLarge> {
        self.size += n;
        if self.size > self.limit {
            return Err(TooLarge { limit: self.limit });
        }
        Ok(())
    }

    /// A line lying in `chunk[range]`: values may be kept as ranges of the chunk.
    fn line(&mut self, chunk: &[u8], range: Range<usize>, on_event: &mut impl FnMut(Event<'_>)) {
        let line = &chunk[range.clone()];
        if line.is_empty() {
            return self.dispatch(chunk, on_event);
        }
        let (name, value_at) = split_field(line);
        let value = range.start + value_at..range.end;
        match name {
            b"data" => match &self.data {
                Slot::Empty => self.data = Slot::Chunk(value),
                _ => self.append_data(chunk, &chunk[value]),
            },
            b"event" => self.kind = Slot::Chunk(value),
            _ => self.other_field(name, &chunk[value]),
        }
    }

    /// A line assembled from several chunks (owned by the caller).
    fn owned_line(&mut self, chunk: &[u8], line: &[u8], on_event: &mut impl FnMut(Event<'_>)) {
        if line.is_empty() {
            return self.dispatch(chunk, on_event);
        }
        let (name, value_at) = split_field(line);
        let value = &line[value_at..];
        match name {
            b"data" => match &self.data {
                Slot::Empty => {
                    self.data_buf.clear();
                    self.data_buf.extend_from_slice(value);
                    self.data = Slot::Owned;
                }
                _ => self.append_data(chunk, value),
            },
            b"event" => {
                self.kind_buf.clear();
                self.kind_buf.extend_from_slice(value);
                self.kind = Slot::Owned;
            }
            _ => self.other_field(name, value),
        }
    }

    fn append_data(&mut self, chunk: &[u8], value: &[u8]) {
        if let Slot::Chunk(r) = &self.data {
            self.data_buf.clear();
            self.data_buf.extend_from_slice(&chunk[r.clone()]);
            self.data = Slot::Owned;
        }
        self.data_buf.push(b'\n');
        self.data_buf.extend_from_slice(value);
    }

    fn other_field(&mut self, name: &[u8], value: &[u8]) {
        // `retry` only concerns reconnecting clients; a gateway never reconnects mid-response.
        if name == b"id" && memchr(0, value).is_none() {
            self.id.clear();
            self.id.extend_from_slice(value);
        }
    }

    fn dispatch(&mut self, chunk: &[u8], on_event: &mut impl FnMut(Event<'_>)) {
        self.size = 0;
        let data = match &self.data {
            Slot::Empty => {
                self.kind = Slot::Empty;
                return;
            }
            Slot::Chunk(r) => &chunk[r.clone()],
            Slot::Owned => &self.data_buf[..],
        };
        let event = match &self.kind {
            Slot::Empty => &[][..],
            Slot::Chunk(r) => &chunk[r.clone()],
            Slot::Owned => &self.kind_buf[..],
        };
        on_event(Event { event, data, id: &self.id });
        self.data = Slot::Empty;
        self.kind = Slot::Empty;
    }
}

/// Splits a non-empty line into field name and the offset of its value (one space after the
/// colon skipped). A line without a colon is a field with an empty value; a comment line (empty
/// name) matches no field.
fn split_field(line: &[u8]) -> (&[u8], usize) {
    match memchr(b':', line) {
        Some(c) => {
            let v = if line.get(c + 1) == Some(&b' ') { c + 2 } else { c + 1 };
            (&line[..c], v)
        }
        None => (line, line.len()),
    }
}

/// Incremental NDJSON decoder: one document per LF-terminated line (a CR before the LF is
/// dropped, blank lines are skipped, a last line without LF is complete at end of stream).
#[derive(Debug)]
pub struct LineDecoder {
    limit: usize,
    line: Vec<u8>,
}

impl LineDecoder {
    /// A decoder that fails once one line exceeds `limit` bytes.
    pub fn new(limit: usize) -> Self {
        LineDecoder { limit, line: Vec::new() }
    }

    /// Decodes `chunk`, calling `on_line` for each complete non-blank line. Lengths are checked
    /// before anything is kept, so the outcome does not depend on the chunking and the decoder
    /// holds at most `limit` bytes.
    pub fn feed(&mut self, chunk: &[u8], mut on_line: impl FnMut(&[u8])) -> Result<(), TooLarge> {
        let mut i = 0;
        while let Some(n) = memchr(b'\n', &chunk[i..]) {
            let end = i + n;
            self.check(self.line.len() + n)?;
            if self.line.is_empty() {
                emit_line(&chunk[i..end], &mut on_line);
            } else {
                self.line.extend_from_slice(&chunk[i..end]);
                emit_line(&self.line, &mut on_line);
                self.line.clear();
            }
            i = end + 1;
        }
        self.check(self.line.len() + chunk.len() - i)?;
        self.line.extend_from_slice(&chunk[i..]);
        Ok(())
    }

    /// A line of `len` bytes (without its LF) is over the limit.
    fn check(&self, len: usize) -> Result<(), TooLarge> {
        if len > self.limit {
            return Err(TooLarge { limit: self.limit });
        }
        Ok(())
    }

    /// The stream ended: a last line without LF is complete.
    pub fn finish(&mut self, mut on_line: impl FnMut(&[u8])) {
        emit_line(&self.line, &mut on_line);
        self.line.clear();
    }
}

fn emit_line(line: &[u8], on_line: &mut impl FnMut(&[u8])) {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if !line.trim_ascii().is_empty() {
        on_line(line);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Splits `input` fed in pieces of `step` bytes; returns the events as strings.
    fn split(input: &[u8], step: usize) -> Vec<String> {
        let mut sp = Splitter::default();
        let mut events = Vec::new();
        let mut cur = Vec::new();
        for chunk in input.chunks(step.max(1)) {
            let mut from = 0;
            while let Some(end) = sp.next_end(chunk, from) {
                cur.extend_from_slice(&chunk[from..end]);
                events.push(String::from_utf8(std::mem::take(&mut cur)).unwrap());
                from = end;
            }
            cur.extend_from_slice(&chunk[from..]);
        }
        events
    }

    /// When a blank line's CR ends a chunk, its LF cannot be known to belong to it yet and
    /// starts the next slice instead; moving such an LF back gives the canonical split.
    fn canonical(events: Vec<String>) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for mut e in events {
            if e.starts_with('\n') && out.last().is_some_and(|p| p.ends_with('\r')) {
                out.last_mut().unwrap().push('\n');
                e.remove(0);
            }
            out.push(e);
        }
        out
    }

    #[test]
    fn events_end_at_blank_lines_of_every_line_ending() {
        let input = b"data: a\n\ndata: b\r\n\r\ndata: c\r\rdata: d\n\r\n: x\n\n";
        let want = ["data: a\n\n", "data: b\r\n\r\n", "data: c\r\r", "data: d\n\r\n", ": x\n\n"];
        for step in 1..input.len() + 1 {
            let got = split(input, step);
            assert_eq!(got.concat().as_bytes(), input, "step {step}: bytes lost or added");
            assert_eq!(canonical(got), want, "step {step}");
        }
    }

    #[test]
    fn crlf_split_across_chunks_is_one_line_end() {
        let mut sp = Splitter::default();
        assert_eq!(sp.next_end(b"data: a\r", 0), None);
        assert_eq!(sp.next_end(b"\n", 0), None);
        assert_eq!(sp.next_end(b"\r", 0), Some(1));
        // the LF completing that CR belongs to no new line
        assert_eq!(sp.next_end(b"\n\n", 0), Some(2));
    }

    #[test]
    fn partial_event_is_not_reported() {
        assert_eq!(split(b"data: a\n\ndata: b\n", 4), ["data: a\n\n"]);
    }

    #[test]
    fn data_lines_are_joined_and_one_space_stripped() {
        let mut s = Vec::new();
        assert_eq!(data(b"event: x\ndata: {\"a\":1}\n\n", &mut s), Some(&b"{\"a\":1}"[..]));
        assert_eq!(data(b"data:  two\r\ndata\r\ndata:x\r\n\r\n", &mut s), Some(&b" two\n\nx"[..]));
        assert_eq!(data(b": comment\n\n", &mut s), None);
        assert_eq!(data(b"dataX: no\n\n", &mut s), None);
    }

    fn decode(input: &[u8], step: usize) -> Vec<(String, String, String)> {
        let mut d = Decoder::new(1 << 20);
        let mut out = Vec::new();
        for chunk in input.chunks(step.max(1)) {
            d.feed(chunk, |e| {
                let s = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
                out.push((s(e.event), s(e.data), s(e.id)));
            })
            .unwrap();
        }
        out
    }

    fn datas(input: &[u8]) -> Vec<String> {
        decode(input, input.len()).into_iter().map(|e| e.1).collect()
    }

    #[test]
    fn spec_examples_decode_as_the_spec_says() {
        assert_eq!(datas(b"data: YHOO\ndata: +2\ndata: 10\n\n"), ["YHOO\n+2\n10"]);
        assert_eq!(datas(b"data:test\n\n"), datas(b"data: test\n\n"));
        assert_eq!(datas(b"data\n\ndata\ndata\n\ndata:"), ["", "\n"]);
        assert_eq!(datas(b": comment\ndata:  two spaces\n\n"), [" two spaces"]);
    }

    #[test]
    fn event_id_and_bom_are_handled() {
        let input = b"\xEF\xBB\xBFevent: add\nid: 7\ndata: x\n\ndata: y\n\nid\ndata: z\n\n";
        for step in 1..input.len() {
            assert_eq!(
                decode(input, step),
                [
                    ("add".into(), "x".into(), "7".into()),
                    ("".into(), "y".into(), "7".into()),
                    ("".into(), "z".into(), "".into())
                ],
                "step {step}"
            );
        }
    }

    #[test]
    fn a_partial_bom_is_text() {
        assert_eq!(decode(b"\xEFdata: x\n\n", 1).len(), 0);
        assert_eq!(datas(b"\xEF\xBB\xBF\xEF\xBB\xBFdata: x\n\n"), Vec::<String>::new());
    }

    #[test]
    fn oversized_events_are_an_error() {
        let mut d = Decoder::new(16);
        assert!(d.feed(b"data: 0123456789", |_| {}).is_ok());
        assert!(d.feed(b"0123456789", |_| {}).is_err());
        let mut d = Decoder::new(16);
        assert!(d.feed(b"data: 0123\ndata: 0123456789\n", |_| {}).is_err());
    }

    #[test]
    fn ndjson_lines_split_anywhere() {
        let input = b"{\"a\":1}\r\n\n{\"b\":2}\n{\"c\":3}";
        for step in 1..input.len() {
            let mut d = LineDecoder::new(1024);
            let mut lines = Vec::new();
            for c in input.chunks(step) {
                d.feed(c, |l| lines.push(l.to_vec())).unwrap();
            }
            d.finish(|l| lines.push(l.to_vec()));
            assert_eq!(lines, [&b"{\"a\":1}"[..], b"{\"b\":2}", b"{\"c\":3}"], "step {step}");
        }
    }
}
