//! SSE decoding throughput: `sse::Decoder` against a naive decoder, on a recorded Anthropic
//! stream (tests/fixtures/anthropic/stream-thinking.sse) repeated to about 1 MB, fed in
//! chunks of 1, 64 and 4096 bytes. Run: `cargo bench --bench sse`.
//!
//! The naive decoder is the obvious way to write one (the approach of the tests' reference
//! decoder, made incremental): append each chunk to a buffer, rescan the unfinished line from
//! its start, copy every line out, and drain what was used. Both must find the same events; the
//! setup checks that before measuring.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use lmgate::sse::Decoder;

const FIXTURE: &[u8] = include_bytes!("../tests/fixtures/anthropic/stream-thinking.sse");

/// The fixture repeated to at least `target` bytes (it ends with a blank line, so the copies
/// are whole events).
fn stream(target: usize) -> Vec<u8> {
    FIXTURE.repeat(target.div_ceil(FIXTURE.len()))
}

/// Events and data bytes found, so that neither decoder's work can be optimised away and both
/// can be compared.
#[derive(Debug, Default, PartialEq, Eq, Clone, Copy)]
struct Tally {
    events: usize,
    data_bytes: usize,
}

fn decode(input: &[u8], chunk: usize) -> Tally {
    let mut decoder = Decoder::new(1 << 20);
    let mut tally = Tally::default();
    for piece in input.chunks(chunk) {
        decoder
            .feed(piece, |e| {
                tally.events += 1;
                tally.data_bytes += e.data.len() + e.event.len();
            })
            .expect("within the limit");
    }
    decoder.finish();
    tally
}

/// The naive decoder: whole-buffer rescans and a copy per line.
#[derive(Default)]
struct Naive {
    buf: Vec<u8>,
    started: bool,
    data: Vec<u8>,
    event: Vec<u8>,
    id: Vec<u8>,
}

impl Naive {
    fn feed(&mut self, chunk: &[u8], on_event: &mut impl FnMut(&[u8], &[u8], &[u8])) {
        self.buf.extend_from_slice(chunk);
        if !self.started {
            if self.buf.len() < 3 && b"\xEF\xBB\xBF".starts_with(&self.buf) {
                return;
            }
            if self.buf.starts_with(b"\xEF\xBB\xBF") {
                self.buf.drain(..3);
            }
            self.started = true;
        }
        let mut start = 0;
        while let Some(p) = self.buf[start..].iter().position(|&b| b == b'\r' || b == b'\n') {
            let end = start + p;
            let next = match (self.buf[end], self.buf.get(end + 1)) {
                (b'\r', None) => break, // an LF may follow in the next chunk
                (b'\r', Some(b'\n')) => end + 2,
                _ => end + 1,
            };
            let line = self.buf[start..end].to_vec();
            self.line(&line, on_event);
            start = next;
        }
        self.buf.drain(..start);
    }

    fn line(&mut self, line: &[u8], on_event: &mut impl FnMut(&[u8], &[u8], &[u8])) {
        if line.is_empty() {
            if !self.data.is_empty() {
                self.data.pop();
                on_event(&self.event, &self.data, &self.id);
            }
            self.data.clear();
            self.event.clear();
            return;
        }
        let (name, value) = match line.iter().position(|&b| b == b':') {
            Some(c) => (&line[..c], line[c + 1..].strip_prefix(b" ").unwrap_or(&line[c + 1..])),
            None => (line, &[][..]),
        };
        match name {
            b"data" => {
                self.data.extend_from_slice(value);
                self.data.push(b'\n');
            }
            b"event" => self.event = value.to_vec(),
            b"id" if !value.contains(&0) => self.id = value.to_vec(),
            _ => {}
        }
    }
}

fn decode_naive(input: &[u8], chunk: usize) -> Tally {
    let mut decoder = Naive::default();
    let mut tally = Tally::default();
    let mut on_event = |event: &[u8], data: &[u8], _id: &[u8]| {
        tally.events += 1;
        tally.data_bytes += data.len() + event.len();
    };
    for piece in input.chunks(chunk) {
        decoder.feed(piece, &mut on_event);
    }
    tally
}

fn bench(c: &mut Criterion) {
    let input = stream(1 << 20);
    let mut g = c.benchmark_group("sse_decode");
    g.throughput(Throughput::Bytes(input.len() as u64));
    g.sample_size(10);
    for chunk in [1, 64, 4096] {
        let want = decode(&input, input.len());
        assert!(want.events > 0);
        assert_eq!(decode(&input, chunk), want, "Decoder, chunk {chunk}");
        assert_eq!(decode_naive(&input, chunk), want, "naive, chunk {chunk}");
        g.bench_function(format!("decoder/chunk_{chunk}"), |b| b.iter(|| decode(black_box(&input), chunk)));
        g.bench_function(format!("naive/chunk_{chunk}"), |b| b.iter(|| decode_naive(black_box(&input), chunk)));
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
