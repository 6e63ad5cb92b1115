//! Replays the fuzz corpora (`fuzz/corpus/<target>/`, every file) through the same checks the
//! fuzz targets run (`fuzz/checks.rs`), so an ordinary `cargo test` on stable exercises them,
//! including any crash input added there after it was fixed.

#[path = "../../fuzz/checks.rs"]
pub mod checks;

use std::path::Path;

/// Runs `check` on every file of `fuzz/corpus/<target>/`; returns how many there were.
fn replay(target: &str, check: fn(&[u8])) -> usize {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|f| f.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    for path in &files {
        let input = std::fs::read(path).unwrap();
        if let Err(panic) = std::panic::catch_unwind(|| check(&input)) {
            eprintln!("fuzz corpus input {} fails its check", path.display());
            std::panic::resume_unwind(panic);
        }
    }
    files.len()
}

#[test]
fn sse_decode_corpus_passes_its_checks() {
    assert!(replay("sse_decode", checks::decode) >= 5);
}

#[test]
fn sse_chunking_corpus_passes_its_checks() {
    assert!(replay("sse_chunking", checks::chunking) >= 5);
}

#[test]
fn anthropic_stream_corpus_passes_its_checks() {
    assert!(replay("anthropic_stream", checks::anthropic_stream) >= 5);
}

#[test]
fn ollama_stream_corpus_passes_its_checks() {
    assert!(replay("ollama_stream", checks::ollama_stream) >= 5);
}

#[test]
fn gemini_stream_corpus_passes_its_checks() {
    assert!(replay("gemini_stream", checks::gemini_stream) >= 5);
}

#[test]
fn request_corpus_passes_its_checks() {
    assert!(replay("request", checks::request) >= 5);
}
