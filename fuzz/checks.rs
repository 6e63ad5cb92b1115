//! The properties the SSE fuzz targets check, as plain functions of the input bytes. The fuzz
//! targets (`fuzz_targets/*.rs`) call them on what libFuzzer generates; the integration test
//! `tests/it/fuzz_replay.rs` calls them on every file of `fuzz/corpus/<target>/`, so the corpora
//! are exercised by an ordinary `cargo test` on stable.
//!
//! - [`decode`] (`sse_decode`): arbitrary bytes through `Decoder` and `LineDecoder` never panic,
//!   a decoder's state stays bounded by its limit even when the caller keeps feeding after
//!   `TooLarge`, and within the limit the events are the reference decoder's.
//! - [`chunking`] (`sse_chunking`): the first two bytes choose split points in the rest; feeding
//!   whole and feeding split give identical results for `Decoder`, `LineDecoder` and
//!   `Splitter`, and those results are the reference's.
//!
//! A failed property panics, which libFuzzer reports as a crash and the test as a failure.
//! The includer also declares `mod reference` (tests/it/reference.rs), the spec-text decoder
//! the results are compared with.

#![allow(dead_code)] // each fuzz target uses part of this file; the replay test uses all of it

use crate::reference;
use lmgate::sse::{self, Decoder, LineDecoder, Splitter, TooLarge};

/// The event size limit the fuzz targets use.
pub const LIMIT: usize = 64 * 1024;

/// A small limit, so that short inputs exercise the `TooLarge` path too.
const SMALL_LIMIT: usize = 64;

/// What a decoder produced: its events (type, data, id; an empty type made `message`, as the
/// reference spells it), and the error that stopped it, if any.
type Decoded = (Vec<reference::RefEvent>, Option<TooLarge>);

/// `sse_decode`: arbitrary bytes.
pub fn decode(input: &[u8]) {
    let whole = decode_sse(input, &[], LIMIT);
    if whole.1.is_none() {
        assert_eq!(whole.0, reference::decode(input), "Decoder differs from the reference");
    }
    assert_eq!(decode_ndjson(input, &[], LIMIT), reference_ndjson(input, LIMIT), "LineDecoder");
    bounded_state(input);
}

/// `sse_chunking`: two bytes of seed, then the stream.
pub fn chunking(input: &[u8]) {
    let [a, b, stream @ ..] = input else { return };
    let cuts = cuts(u16::from_le_bytes([*a, *b]), stream.len());

    for limit in [LIMIT, SMALL_LIMIT] {
        let whole = decode_sse(stream, &[], limit);
        assert_eq!(decode_sse(stream, &cuts, limit), whole, "Decoder, limit {limit}, cuts {cuts:?}");
        if whole.1.is_none() {
            assert_eq!(whole.0, reference::decode(stream), "Decoder vs reference, limit {limit}");
        }
        let lines = decode_ndjson(stream, &[], limit);
        assert_eq!(decode_ndjson(stream, &cuts, limit), lines, "LineDecoder, limit {limit}, cuts {cuts:?}");
        assert_eq!(lines, reference_ndjson(stream, limit), "LineDecoder vs reference, limit {limit}");
    }

    let whole = split(stream, &[]);
    let pieces = split(stream, &cuts);
    assert_eq!(pieces.concat(), stream, "Splitter lost or added bytes, cuts {cuts:?}");
    assert_eq!(canonical(pieces.clone()), canonical(whole), "Splitter, cuts {cuts:?}");
    // The last piece is the unterminated rest: not an event.
    let events = &pieces[..pieces.len() - 1];
    let mut scratch = Vec::new();
    let datas: Vec<Vec<u8>> = events
        .iter()
        .enumerate()
        .filter_map(|(i, piece)| {
            // The Splitter forwards a BOM as bytes (the client strips it); `data` reads fields.
            let piece = if i == 0 { piece.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(piece) } else { piece };
            sse::data(piece, &mut scratch).map(<[u8]>::to_vec)
        })
        .collect();
    let want: Vec<Vec<u8>> = reference::decode(stream).into_iter().map(|e| e.1).collect();
    assert_eq!(datas, want, "Splitter + data vs reference, cuts {cuts:?}");
}

/// Split points in `0..=len` chosen by `seed`: one-byte pieces for a seed of 0xFFFF, else
/// `seed % 16` points from a PRNG seeded with the rest.
pub fn cuts(seed: u16, len: usize) -> Vec<usize> {
    if seed == 0xFFFF {
        return (1..len).collect();
    }
    let mut state = u64::from(seed).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut cuts: Vec<usize> = (0..seed % 16)
        .map(|_| {
            // xorshift64
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % (len as u64 + 1)) as usize
        })
        .collect();
    cuts.sort_unstable();
    cuts
}

/// The pieces of `input` between `cuts` (sorted; empty pieces allowed).
pub fn pieces<'a>(input: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
    let starts = std::iter::once(0).chain(cuts.iter().copied());
    let ends = cuts.iter().copied().chain(std::iter::once(input.len()));
    starts.zip(ends).map(|(s, e)| &input[s..e]).collect()
}

/// Feeds `input` to a `Decoder` in the pieces `cuts` makes; stops at the first error.
fn decode_sse(input: &[u8], cuts: &[usize], limit: usize) -> Decoded {
    let mut decoder = Decoder::new(limit);
    let mut events = Vec::new();
    for piece in pieces(input, cuts) {
        let fed = decoder.feed(piece, |e| {
            assert!(e.event.len() + e.data.len() <= limit, "an event over the limit was dispatched");
            let kind = if e.event.is_empty() { &b"message"[..] } else { e.event };
            events.push((kind.to_vec(), e.data.to_vec(), e.id.to_vec()));
        });
        if let Err(e) = fed {
            assert_eq!(e.limit, limit);
            return (events, Some(e));
        }
    }
    decoder.finish();
    (events, None)
}

/// Feeds `input` to a `LineDecoder` in the pieces `cuts` makes; stops at the first error.
fn decode_ndjson(input: &[u8], cuts: &[usize], limit: usize) -> (Vec<Vec<u8>>, Option<TooLarge>) {
    let mut decoder = LineDecoder::new(limit);
    let mut lines = Vec::new();
    for piece in pieces(input, cuts) {
        if let Err(e) = decoder.feed(piece, |l| lines.push(l.to_vec())) {
            return (lines, Some(e));
        }
    }
    decoder.finish(|l| lines.push(l.to_vec()));
    (lines, None)
}

/// NDJSON read the obvious way: LF-separated lines, one trailing CR dropped, blank lines
/// skipped; the first line longer than `limit` (without its LF) is an error.
fn reference_ndjson(input: &[u8], limit: usize) -> (Vec<Vec<u8>>, Option<TooLarge>) {
    let mut lines = Vec::new();
    for line in input.split(|&b| b == b'\n') {
        if line.len() > limit {
            return (lines, Some(TooLarge { limit }));
        }
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if !line.trim_ascii().is_empty() {
            lines.push(line.to_vec());
        }
    }
    (lines, None)
}

/// Feeds `input` in 16-byte pieces to decoders with a small limit, going on after errors, and
/// checks after each piece that what they hold stays within a few times the limit.
fn bounded_state(input: &[u8]) {
    // Each held byte prints as at most 5 characters ("255, "); the decoders hold at most a
    // line, a data buffer, an event type, an id and an NDJSON line, each within limit + one
    // piece, besides field names.
    const PIECE: usize = 16;
    let bound = 5 * 5 * (SMALL_LIMIT + PIECE) + 512;
    let mut decoder = Decoder::new(SMALL_LIMIT);
    let mut lines = LineDecoder::new(SMALL_LIMIT);
    for piece in input.chunks(PIECE) {
        let _ = decoder.feed(piece, |_| {});
        let _ = lines.feed(piece, |_| {});
        let held = format!("{decoder:?}").len() + format!("{lines:?}").len();
        assert!(held <= bound, "decoder state grew to {held} debug characters");
    }
}

/// Splits `input` fed in the pieces `cuts` makes into the pieces the Splitter reports, plus the
/// unterminated rest as the last piece (possibly empty).
pub fn split(input: &[u8], cuts: &[usize]) -> Vec<Vec<u8>> {
    let mut splitter = Splitter::default();
    let mut out = Vec::new();
    let mut current = Vec::new();
    for chunk in pieces(input, cuts) {
        let mut from = 0;
        while let Some(end) = splitter.next_end(chunk, from) {
            assert!(end > from && end <= chunk.len(), "next_end({from}) = {end} out of range");
            current.extend_from_slice(&chunk[from..end]);
            out.push(std::mem::take(&mut current));
            from = end;
        }
        current.extend_from_slice(&chunk[from..]);
    }
    out.push(current);
    out
}

/// When a blank line's CR ends a chunk, the Splitter cannot yet know that an LF follows, so the
/// LF starts the next piece; moving it back gives the split of the whole input.
pub fn canonical(pieces: Vec<Vec<u8>>) -> Vec<Vec<u8>> {
    let mut out: Vec<Vec<u8>> = Vec::new();
    for mut piece in pieces {
        if let Some(prev) = out.last_mut() {
            if piece.first() == Some(&b'\n') && prev.last() == Some(&b'\r') {
                prev.push(b'\n');
                piece.remove(0);
            }
        }
        out.push(piece);
    }
    out
}

/// `anthropic_stream`: the first byte picks usage on or off, the next two seed split points, the
/// rest is an Anthropic event stream. See [`translated_stream`].
pub fn anthropic_stream(input: &[u8]) {
    translated_stream(input, |usage| Box::new(lmgate::provider::anthropic::stream::Stream::new(usage)));
}

/// `ollama_stream`: as [`anthropic_stream`], the rest being Ollama `/api/chat` NDJSON lines.
pub fn ollama_stream(input: &[u8]) {
    translated_stream(input, |usage| Box::new(lmgate::provider::ollama::stream::Stream::new(usage, "chatcmpl-fuzz")));
}

/// `gemini_stream`: as [`anthropic_stream`], the rest being a Gemini `streamGenerateContent` SSE
/// stream.
pub fn gemini_stream(input: &[u8]) {
    translated_stream(input, |usage| Box::new(lmgate::provider::gemini::stream::Stream::new(usage, "chatcmpl-fuzz")));
}

/// The first byte picks usage on or off, the next two seed split points, the rest is a provider
/// stream for the translator `make` builds. Translation (the stream's end included) never
/// panics; whole and split feeding give the same output; the output is SSE whose data lines are
/// JSON or `[DONE]`; after `[DONE]` or an error event nothing follows.
fn translated_stream(input: &[u8], make: impl Fn(bool) -> Box<dyn lmgate::provider::Translate>) {
    use lmgate::body::Translating;

    let [flags, a, b, stream @ ..] = input else { return };
    let include_usage = flags & 1 == 1;
    let run = |cuts: &[usize]| -> Vec<u8> {
        let mut t = Translating::new(make(include_usage));
        let mut out = lmgate::body::Out::default();
        let mut ended = false;
        for piece in pieces(stream, cuts) {
            if let Err(e) = t.feed(piece, "fuzz", out.buffer(0)) {
                out.push(e.to_sse());
                ended = true;
                break;
            }
            if t.done() {
                ended = true;
                break;
            }
        }
        if !ended {
            if let Err(e) = t.finish("fuzz", out.buffer(0)) {
                out.push(e.to_sse());
            }
        }
        out.take().unwrap_or_default().to_vec()
    };
    let whole = run(&[]);
    let cuts = cuts(u16::from_le_bytes([*a, *b]), stream.len());
    let split = run(&cuts);
    assert_eq!(
        String::from_utf8_lossy(&without_created(&split)),
        String::from_utf8_lossy(&without_created(&whole)),
        "translation depends on chunking, cuts {cuts:?}"
    );
    let events = reference::decode(&whole);
    for (i, (_, data, _)) in events.iter().enumerate() {
        if data == b"[DONE]" {
            assert_eq!(i + 1, events.len(), "events after [DONE]");
            continue;
        }
        // Valid JSON text: UTF-8 and the RFC 8259 grammar (lone surrogate escapes, which
        // serde_json refuses, are copied from the upstream as they are and are grammatical).
        let text = std::str::from_utf8(data).unwrap_or_else(|e| panic!("output data is not UTF-8: {e}"));
        let mut is_error = false;
        lmgate::json::members(data, |k, _| {
            is_error |= k == b"\"error\"";
            true
        })
        .unwrap_or_else(|e| panic!("output data is not a JSON object ({e}): {text}"));
        if is_error {
            assert_eq!(i + 1, events.len(), "events after an error event");
        }
    }
}

/// `out` with the digits of every `"created":` value removed: two runs may straddle a second.
fn without_created(out: &[u8]) -> Vec<u8> {
    const KEY: &[u8] = b"\"created\":";
    let mut result = Vec::with_capacity(out.len());
    let mut i = 0;
    while i < out.len() {
        if out[i..].starts_with(KEY) {
            result.extend_from_slice(KEY);
            i += KEY.len();
            while i < out.len() && out[i].is_ascii_digit() {
                i += 1;
            }
        } else {
            result.push(out[i]);
            i += 1;
        }
    }
    result
}

/// `request`: arbitrary bytes as a client request body. The scanner never panics and accepts
/// every object serde_json accepts (unless a member it reads is duplicated; serde_json also
/// refuses some things the scanner accepts: lone surrogate escapes, nesting past 128); a body it
/// accepts translates for Anthropic or fails with a 400, never a panic.
pub fn request(input: &[u8]) {
    let scanned = lmgate::json::scan_request(input);
    if let Ok(serde_json::Value::Object(_)) = serde_json::from_slice::<serde_json::Value>(input) {
        assert!(
            matches!(scanned, Ok(_) | Err(lmgate::json::RequestError::Duplicate(_))),
            "serde_json accepts what the scanner refuses: {scanned:?}"
        );
    }
    if scanned.is_ok() {
        if let Err(e) = lmgate::provider::anthropic::request::translate(input, "claude-fuzz", 1024) {
            assert_eq!(e.status, 400, "translation failed with {e}");
        }
    }
}
