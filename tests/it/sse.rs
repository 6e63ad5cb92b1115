//! The SSE and NDJSON decoders of `lmgate::sse`, held to the naive reference decoder
//! (`reference.rs`, written from the spec text) on recorded provider streams
//! (tests/fixtures/<provider>/, see tests/fixtures/README.md) and on generated streams, at every
//! chunking that matters: whole, one byte at a time, every single split point, and random
//! multi-splits. The streaming contract (stated on `Decoder::feed` in src/sse.rs) is that any
//! chunking of the same bytes gives the same output.

use crate::fuzz_replay::checks::{canonical, pieces, split};
use crate::reference::{self, RefEvent};
use lmgate::sse::{self, Decoder, LineDecoder, Splitter, TooLarge};
use std::path::Path;

const LIMIT: usize = 1 << 20;

// ----------------------------------------------------------------------------------------------
// Harness

/// A small deterministic PRNG (splitmix64): reproducible cases without the rand crate.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n > 0`).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// Up to `max` sorted split points in `0..=len` (repeats make empty chunks, which must be
    /// harmless too).
    fn cuts(&mut self, len: usize, max: usize) -> Vec<usize> {
        let n = self.below(max + 1);
        let mut cuts: Vec<usize> = (0..n).map(|_| self.below(len + 1)).collect();
        cuts.sort_unstable();
        cuts
    }
}

/// Every file whose last extension is exactly `ext` (`sse` or `ndjson`) under
/// tests/fixtures/<provider>/, sorted by path. The exact match keeps the `*.json` bodies and the
/// `*.expected.json` / `*.expected.jsonl` expectations out.
fn fixtures(ext: &str) -> Vec<(String, Vec<u8>)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let mut out = Vec::new();
    for dir in std::fs::read_dir(&root).unwrap() {
        let dir = dir.unwrap().path();
        if !dir.is_dir() {
            continue;
        }
        for file in std::fs::read_dir(&dir).unwrap() {
            let path = file.unwrap().path();
            if path.extension().is_some_and(|e| e == ext) {
                let name = path.strip_prefix(&root).unwrap().display().to_string();
                out.push((name, std::fs::read(&path).unwrap()));
            }
        }
    }
    out.sort();
    assert!(out.len() >= 5, "expected the {ext} fixtures in {}", root.display());
    out
}

/// Decodes `chunks` with a fresh `Decoder`: its events (an empty type spelled `message`, as the
/// reference does) and the error that stopped it, if any.
fn decode(chunks: &[&[u8]], limit: usize) -> (Vec<RefEvent>, Option<TooLarge>) {
    let mut decoder = Decoder::new(limit);
    let mut events = Vec::new();
    for chunk in chunks {
        let fed = decoder.feed(chunk, |e| {
            let kind = if e.event.is_empty() { &b"message"[..] } else { e.event };
            events.push((kind.to_vec(), e.data.to_vec(), e.id.to_vec()));
        });
        if let Err(e) = fed {
            return (events, Some(e));
        }
    }
    decoder.finish();
    (events, None)
}

/// Decodes `chunks` and checks each event against `want` as it comes, without allocating: the
/// every-split-point tests run this thousands of times per fixture.
fn decodes_to(chunks: &[&[u8]], want: &[RefEvent]) -> bool {
    let mut decoder = Decoder::new(LIMIT);
    let mut n = 0;
    let mut same = true;
    for chunk in chunks {
        decoder
            .feed(chunk, |e| {
                let kind = if e.event.is_empty() { &b"message"[..] } else { e.event };
                same &= want.get(n).is_some_and(|w| (&w.0[..], &w.1[..], &w.2[..]) == (kind, e.data, e.id));
                n += 1;
            })
            .unwrap();
    }
    same && n == want.len()
}

/// NDJSON lines from a fresh `LineDecoder`, and its error if any.
fn lines(chunks: &[&[u8]], limit: usize) -> (Vec<Vec<u8>>, Option<TooLarge>) {
    let mut decoder = LineDecoder::new(limit);
    let mut lines = Vec::new();
    for chunk in chunks {
        if let Err(e) = decoder.feed(chunk, |l| lines.push(l.to_vec())) {
            return (lines, Some(e));
        }
    }
    decoder.finish(|l| lines.push(l.to_vec()));
    (lines, None)
}

/// The `data` of each reported piece that has any (`sse::data`), which is what the passthrough
/// body observes. A leading BOM is forwarded as bytes by the passthrough (the client strips it);
/// it is skipped here so the fields behind it are read as the spec reads them.
fn piece_datas(pieces: &[Vec<u8>]) -> Vec<Vec<u8>> {
    let events = &pieces[..pieces.len() - 1];
    let mut scratch = Vec::new();
    let mut out = Vec::new();
    for (i, piece) in events.iter().enumerate() {
        let piece = if i == 0 { piece.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(piece) } else { piece };
        if let Some(data) = sse::data(piece, &mut scratch) {
            out.push(data.to_vec());
        }
    }
    out
}

/// Checks the Splitter on one chunking of `input` against its whole-input split and the
/// reference decoder.
fn assert_splits(input: &[u8], cuts: &[usize], whole: &[Vec<u8>], want: &[Vec<u8>], what: &str) {
    let pieces = split(input, cuts);
    assert_eq!(pieces.concat(), input, "{what}: cuts {cuts:?}: bytes lost or added");
    assert_eq!(canonical(pieces.clone()), whole, "{what}: cuts {cuts:?}: pieces differ");
    assert_eq!(piece_datas(&pieces), want, "{what}: cuts {cuts:?}: data differs from the reference");
}

fn show(events: &[RefEvent]) -> Vec<(String, String, String)> {
    let s = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    events.iter().map(|(k, d, i)| (s(k), s(d), s(i))).collect()
}

/// Streams built from the pieces that matter to the grammar: line ends, colons, spaces, BOM
/// bytes (whole and alone), NUL, field names, and a little text (some of it multi-byte).
fn generated(rng: &mut Rng) -> Vec<u8> {
    const TOKENS: &[&[u8]] = &[
        b"\r",
        b"\n",
        b"\r\n",
        b"\n\n",
        b"\r",
        b"\n",
        b":",
        b":",
        b" ",
        b" ",
        b"\xEF\xBB\xBF",
        b"\xEF",
        b"\xBB",
        b"\xBF",
        b"\0",
        b"data",
        b"data",
        b"data:",
        b"data: ",
        b"event",
        b"event:",
        b"id",
        b"id:",
        b"retry",
        b"retry: 10",
        b"a",
        b"x",
        b"{}",
        b"\xC3\xA9",
        b"[DONE]",
    ];
    let n = rng.below(40);
    let mut out = Vec::new();
    if rng.below(8) == 0 {
        out.extend_from_slice(b"\xEF\xBB\xBF");
    }
    for _ in 0..n {
        out.extend_from_slice(TOKENS[rng.below(TOKENS.len())]);
    }
    out
}

// ----------------------------------------------------------------------------------------------
// The reference itself

#[test]
fn reference_decoder_decodes_the_spec_examples() {
    let data = |s: &[u8]| reference::decode(s).into_iter().map(|e| e.1).collect::<Vec<_>>();
    assert_eq!(data(b"data: YHOO\ndata: +2\ndata: 10\n\n"), [b"YHOO\n+2\n10".to_vec()]);
    assert_eq!(data(b"data:test\n\n"), data(b"data: test\n\n"));
    assert_eq!(data(b"data\n\ndata\ndata\n\ndata:"), [b"".to_vec(), b"\n".to_vec()]);
    assert_eq!(
        show(&reference::decode(b"\xEF\xBB\xBF: c\r\nevent: add\rid: 1\r\ndata:  x\n\nid: a\0b\nretry: 5\ndata\n\n")),
        [("add".into(), " x".into(), "1".into()), ("message".into(), "".into(), "1".into())]
    );
}

#[test]
fn every_sse_fixture_yields_json_events_or_done() {
    for (name, input) in fixtures("sse") {
        let events = reference::decode(&input);
        assert!(!events.is_empty(), "{name}: no events");
        for (_, data, _) in &events {
            if data != b"[DONE]" {
                serde_json::from_slice::<serde_json::Value>(data)
                    .unwrap_or_else(|e| panic!("{name}: {e}: {}", String::from_utf8_lossy(data)));
            }
        }
    }
}

// ----------------------------------------------------------------------------------------------
// Decoder on the fixtures

#[test]
fn every_sse_fixture_decodes_like_the_reference_fed_whole_and_byte_by_byte() {
    for (name, input) in fixtures("sse") {
        let want = reference::decode(&input);
        assert_eq!(show(&decode(&[&input], LIMIT).0), show(&want), "{name}: whole");
        let bytes: Vec<&[u8]> = input.chunks(1).collect();
        assert_eq!(show(&decode(&bytes, LIMIT).0), show(&want), "{name}: one byte at a time");
    }
}

#[test]
fn every_sse_fixture_decodes_the_same_at_every_split_point() {
    for (name, input) in fixtures("sse") {
        let want = reference::decode(&input);
        for at in 0..=input.len() {
            assert!(decodes_to(&[&input[..at], &input[at..]], &want), "{name}: split at {at}");
        }
    }
}

#[test]
fn every_sse_fixture_decodes_the_same_at_random_multi_splits() {
    let mut rng = Rng(1);
    for (name, input) in fixtures("sse") {
        let want = reference::decode(&input);
        for _ in 0..300 {
            let cuts = rng.cuts(input.len(), 64);
            assert!(decodes_to(&pieces(&input, &cuts), &want), "{name}: cuts {cuts:?}");
        }
    }
}

// ----------------------------------------------------------------------------------------------
// Decoder on generated streams

#[test]
fn generated_streams_decode_like_the_reference_at_random_chunkings() {
    let mut rng = Rng(2);
    for case in 0..4000 {
        let input = generated(&mut rng);
        let want = show(&reference::decode(&input));
        let what = format!("case {case}: {:?}", String::from_utf8_lossy(&input));
        assert_eq!(show(&decode(&[&input], LIMIT).0), want, "{what}: whole");
        let bytes: Vec<&[u8]> = input.chunks(1).collect();
        assert_eq!(show(&decode(&bytes, LIMIT).0), want, "{what}: one byte at a time");
        for _ in 0..4 {
            let cuts = rng.cuts(input.len(), 8);
            assert_eq!(show(&decode(&pieces(&input, &cuts), LIMIT).0), want, "{what}: cuts {cuts:?}");
        }
    }
}

#[test]
fn generated_streams_hit_the_size_limit_at_the_same_event_at_every_chunking() {
    let mut rng = Rng(3);
    let mut errors = 0;
    for case in 0..2000 {
        let input = generated(&mut rng);
        let limit = 1 + rng.below(24);
        let whole = decode(&[&input], limit);
        errors += usize::from(whole.1.is_some());
        let what = format!("case {case}, limit {limit}: {:?}", String::from_utf8_lossy(&input));
        for at in 0..=input.len() {
            assert_eq!(decode(&[&input[..at], &input[at..]], limit), whole, "{what}: split at {at}");
        }
        if whole.1.is_none() {
            assert_eq!(whole.0, reference::decode(&input), "{what}");
        }
    }
    assert!(errors > 100, "only {errors} cases reached the limit");
}

// ----------------------------------------------------------------------------------------------
// Line ends across chunks, and the size limit

#[test]
fn crlf_split_across_chunks_is_one_line_end() {
    // Were the LF after a chunk-ending CR a line end of its own, it would be a blank line and
    // dispatch "a" early.
    let chunks: [&[u8]; 4] = [b"data: a\r", b"\ndata: b\r", b"\n\r", b"\n"];
    let (events, error) = decode(&chunks, LIMIT);
    assert_eq!(error, None);
    assert_eq!(show(&events), [("message".into(), "a\nb".into(), "".into())]);
}

#[test]
fn lone_cr_at_the_end_of_a_chunk_is_a_line_end() {
    let chunks: [&[u8]; 3] = [b"event: e\r", b"data: a\r", b"\rdata: b\r\r"];
    assert_eq!(
        show(&decode(&chunks, LIMIT).0),
        [("e".into(), "a".into(), "".into()), ("message".into(), "b".into(), "".into())]
    );
}

#[test]
fn an_event_of_exactly_the_limit_decodes_and_one_byte_more_is_too_large() {
    // The limit counts the event's bytes, line ends included: 6 + 100 + 2 here.
    let input = [b"data: ".as_slice(), &[b'x'; 100], b"\n\n"].concat();
    let at_every_split = |limit: usize| -> Vec<(Vec<RefEvent>, Option<TooLarge>)> {
        (0..=input.len()).map(|at| decode(&[&input[..at], &input[at..]], limit)).collect()
    };
    for got in at_every_split(108) {
        assert_eq!(got, (vec![(b"message".to_vec(), vec![b'x'; 100], vec![])], None));
    }
    for got in at_every_split(107) {
        assert_eq!(got, (vec![], Some(TooLarge { limit: 107 })));
    }
}

/// What a decoder holds, in bytes, read from its `Debug` form: every held payload byte here is
/// `x`, which prints as "120, ".
fn held_bytes(state: &impl std::fmt::Debug) -> usize {
    format!("{state:?}").matches("120").count()
}

#[test]
fn a_runaway_event_is_too_large_and_memory_stays_bounded() {
    const TOTAL: usize = 10 << 20;
    const CHUNK: usize = 64 << 10;
    let line = [b"data: ".as_slice(), &[b'x'; 1000], b"\n"].concat();
    let one_line = [b"data: ".as_slice(), &vec![b'x'; TOTAL]].concat();
    let many_lines = line.repeat(TOTAL / line.len());
    for (what, input) in [("one endless line", one_line), ("data lines without a blank line", many_lines)] {
        let mut decoder = Decoder::new(LIMIT);
        let mut first_error = None;
        for (i, chunk) in input.chunks(CHUNK).enumerate() {
            // Keep feeding after the error, as a careless caller might: it must not grow.
            match decoder.feed(chunk, |_| panic!("{what}: an event was dispatched")) {
                Ok(()) => assert!(first_error.is_none(), "{what}: feed succeeded after the error"),
                Err(e) => {
                    assert_eq!(e, TooLarge { limit: LIMIT });
                    first_error.get_or_insert(i * CHUNK);
                }
            }
        }
        let at = first_error.unwrap_or_else(|| panic!("{what}: no error"));
        assert!(at <= LIMIT, "{what}: error only in the chunk at {at}");
        let held = held_bytes(&decoder);
        assert!(held <= 2 * (LIMIT + CHUNK), "{what}: the decoder holds {held} bytes");
    }
}

// ----------------------------------------------------------------------------------------------
// LineDecoder (NDJSON)

#[test]
fn every_ndjson_fixture_decodes_to_its_lines_at_every_split_point() {
    for (name, input) in fixtures("ndjson") {
        let text = std::str::from_utf8(&input).unwrap();
        let want: Vec<Vec<u8>> = text.lines().filter(|l| !l.trim().is_empty()).map(|l| l.into()).collect();
        assert!(!want.is_empty(), "{name}");
        for at in 0..=input.len() {
            assert_eq!(lines(&[&input[..at], &input[at..]], LIMIT), (want.clone(), None), "{name}: split at {at}");
        }
        let bytes: Vec<&[u8]> = input.chunks(1).collect();
        assert_eq!(lines(&bytes, LIMIT), (want, None), "{name}: one byte at a time");
    }
}

#[test]
fn ndjson_line_over_the_limit_is_an_error_at_any_chunking() {
    let long = format!("{{\"b\":\"{}\"}}", "x".repeat(100));
    let input = format!("{{\"a\":1}}\r\n{long}\n{{}}\n");
    let input = input.as_bytes();
    let want = (vec![b"{\"a\":1}".to_vec()], Some(TooLarge { limit: 64 }));
    for at in 0..=input.len() {
        assert_eq!(lines(&[&input[..at], &input[at..]], 64), want, "split at {at}");
    }
    let bytes: Vec<&[u8]> = input.chunks(1).collect();
    assert_eq!(lines(&bytes, 64), want, "one byte at a time");
    // Just within the limit, the same line is fine.
    assert_eq!(lines(&[input], long.len()).0.len(), 3);
}

#[test]
fn a_runaway_ndjson_line_is_too_large_and_memory_stays_bounded() {
    const CHUNK: usize = 64 << 10;
    let input = vec![b'x'; 10 << 20];
    let mut decoder = LineDecoder::new(LIMIT);
    let mut first_error = None;
    for (i, chunk) in input.chunks(CHUNK).enumerate() {
        if decoder.feed(chunk, |_| panic!("a line was emitted")).is_err() {
            first_error.get_or_insert(i * CHUNK);
        }
    }
    assert!(first_error.is_some_and(|at| at <= LIMIT), "error at {first_error:?}");
    let held = held_bytes(&decoder);
    assert!(held <= LIMIT + CHUNK, "the decoder holds {held} bytes");
}

// ----------------------------------------------------------------------------------------------
// Splitter (passthrough)

/// Where the Splitter ends events in `input` split at `at`, as offsets into `input`.
fn ends_split_at(input: &[u8], at: usize) -> Vec<usize> {
    let mut splitter = Splitter::default();
    let mut ends = Vec::new();
    for (offset, chunk) in [(0, &input[..at]), (at, &input[at..])] {
        let mut from = 0;
        while let Some(end) = splitter.next_end(chunk, from) {
            assert!(from < end && end <= chunk.len(), "next_end({from}) = {end}");
            ends.push(offset + end);
            from = end;
        }
    }
    ends
}

#[test]
fn splitter_pieces_give_back_the_input_and_the_reference_data_at_every_split_point() {
    let mut scratch = Vec::new();
    let mut data = |piece: &[u8]| sse::data(piece, &mut scratch).map(<[u8]>::to_vec);
    for (name, input) in fixtures("sse") {
        let whole = canonical(split(&input, &[]));
        let want: Vec<Vec<u8>> = reference::decode(&input).into_iter().map(|e| e.1).collect();
        assert_eq!(piece_datas(&whole), want, "{name}: whole");
        let every_byte: Vec<usize> = (1..input.len()).collect();
        assert_splits(&input, &every_byte, &whole, &want, &name);

        // At every single split point, the events must end where they end in the whole input,
        // so every piece is a piece of the whole split, except that an LF completing a blank
        // line's CR at the split starts the next piece: those two must still read the same.
        let whole_ends = ends_split_at(&input, input.len());
        for at in 0..=input.len() {
            let mut ends = ends_split_at(&input, at);
            let moved_lf = at > 0 && input[at - 1] == b'\r' && input.get(at) == Some(&b'\n');
            if let Some(k) = ends.iter().position(|&e| e == at).filter(|_| moved_lf) {
                let start = if k == 0 { 0 } else { ends[k - 1] };
                let next = ends.get(k + 1).copied().unwrap_or(input.len());
                assert_eq!(data(&input[start..at]), data(&input[start..at + 1]), "{name}: split at {at}");
                assert_eq!(data(&input[at..next]), data(&input[at + 1..next]), "{name}: split at {at}");
                ends[k] += 1;
            }
            assert_eq!(ends, whole_ends, "{name}: split at {at}");
        }
    }
}

#[test]
fn splitter_on_generated_streams_agrees_with_the_reference_at_random_chunkings() {
    let mut rng = Rng(4);
    for case in 0..4000 {
        let input = generated(&mut rng);
        let whole = canonical(split(&input, &[]));
        let want: Vec<Vec<u8>> = reference::decode(&input).into_iter().map(|e| e.1).collect();
        let what = format!("case {case}: {:?}", String::from_utf8_lossy(&input));
        assert_eq!(piece_datas(&whole), want, "{what}: whole");
        let every_byte: Vec<usize> = (1..input.len()).collect();
        assert_splits(&input, &every_byte, &whole, &want, &what);
        for _ in 0..4 {
            let cuts = rng.cuts(input.len(), 8);
            assert_splits(&input, &cuts, &whole, &want, &what);
        }
    }
}
