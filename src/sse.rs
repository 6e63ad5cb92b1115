//! Server-sent events: finding event boundaries in a byte stream, incrementally.
//!
//! Follows the WHATWG event-stream rules
//! (<https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation>):
//! lines end in LF, CRLF or a lone CR, and a CR at the end of one chunk followed by an LF at the
//! start of the next is one line end; an empty line ends an event. [`Splitter`] reports where
//! events end without copying, so the passthrough body can forward whole events as slices of the
//! upstream's own buffers and hold back only a trailing partial event. [`data`] reads an event's
//! `data` field (multi-line data joined with `\n`, one leading space stripped).

use memchr::memchr2;

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
}
