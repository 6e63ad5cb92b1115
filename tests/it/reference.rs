//! A naive reference event-stream decoder, written straight from the interpretation rules of
//! WHATWG HTML §9.2.6 (<https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation>)
//! and sharing no code with `lmgate::sse`. It reads the whole stream at once and favours being
//! obviously right over being fast: the tests hold the real decoders to it.
//!
//! It works on bytes rather than decoded text: every byte the algorithm looks at (CR, LF, `:`,
//! space, NUL, the BOM) is ASCII or the BOM itself, and none can occur inside a multi-byte UTF-8
//! sequence, so on valid UTF-8 this is the spec's algorithm exactly; on invalid UTF-8 it keeps
//! the bytes instead of turning them into U+FFFD, as a byte-level decoder must.

/// One dispatched event: (type, data, last event id). The type is `message` when the stream
/// gave none, as the spec says (step 5 of the dispatch).
pub type RefEvent = (Vec<u8>, Vec<u8>, Vec<u8>);

/// Decodes a complete stream. A trailing event without its blank line is discarded.
pub fn decode(stream: &[u8]) -> Vec<RefEvent> {
    // 1. "UTF-8 decode" strips one leading BOM, only at the very start of the stream.
    let stream = stream.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(stream);

    // 3. The three buffers.
    let mut data: Vec<u8> = Vec::new();
    let mut event_type: Vec<u8> = Vec::new();
    let mut last_event_id: Vec<u8> = Vec::new();
    let mut events = Vec::new();

    for line in lines(stream) {
        if line.is_empty() {
            // 5. Dispatch.
            if data.is_empty() {
                data.clear();
                event_type.clear();
                continue;
            }
            if data.last() == Some(&b'\n') {
                data.pop();
            }
            let kind = if event_type.is_empty() { b"message".to_vec() } else { event_type.clone() };
            events.push((kind, data.clone(), last_event_id.clone()));
            data.clear();
            event_type.clear();
            continue;
        }
        if line[0] == b':' {
            // A comment.
            continue;
        }
        let (name, value) = match line.iter().position(|&b| b == b':') {
            Some(colon) => {
                let mut value = &line[colon + 1..];
                if value.first() == Some(&b' ') {
                    value = &value[1..];
                }
                (&line[..colon], value)
            }
            None => (line, &[][..]),
        };
        // 4. Process the field; names are compared case-sensitively. An `id` containing NUL is
        // ignored.
        match name {
            b"event" => event_type = value.to_vec(),
            b"data" => {
                data.extend_from_slice(value);
                data.push(b'\n');
            }
            b"id" if !value.contains(&0) => last_event_id = value.to_vec(),
            // `retry` sets the reconnection time, which no event carries; others are ignored.
            _ => {}
        }
    }
    // 6. Whatever is left in the buffers at the end of the stream is discarded.
    events
}

/// The complete lines of the stream, without their ends (step 2): a line ends at CRLF, at a lone
/// LF or at a lone CR. Text after the last line end is an unterminated line and is not returned.
fn lines(stream: &[u8]) -> Vec<&[u8]> {
    let mut lines = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i < stream.len() {
        match stream[i] {
            b'\r' => {
                lines.push(&stream[start..i]);
                i += if stream.get(i + 1) == Some(&b'\n') { 2 } else { 1 };
                start = i;
            }
            b'\n' => {
                lines.push(&stream[start..i]);
                i += 1;
                start = i;
            }
            _ => i += 1,
        }
    }
    lines
}
