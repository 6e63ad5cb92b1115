//! The JSON-lines request log (`[log] requests`): one object per finished request.
//!
//! Requests never wait on the disk: a record is handed to a writer thread through a bounded
//! queue, and when the queue is full it is dropped and counted (`lmgate_log_records_lost`).
//! The writer serialises and appends, flushes whenever the queue is empty, and rotates by size
//! (`requests.jsonl` → `.1` → ... → `.5`, the oldest removed). Nothing secret is in a record:
//! the group's name, never a key; the path, never the query string.

use crate::config::observe::LOG_KEEP;
use crate::json::Usage;
use crate::metrics::Metrics;
use serde::Serialize;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// Records queued for the writer at most; past it they are dropped.
pub const QUEUE: usize = 16_384;

/// How long the writer sleeps when it finds the queue empty: a record is on disk within about
/// this, and the queue holds [`QUEUE`] records per tick (over a million a second).
const TICK: Duration = Duration::from_millis(10);

/// One finished request, as written. Built on the request path from what the record already
/// holds (its strings moved, not copied); formatted, clipped and serialised by the writer.
#[derive(Debug, Serialize)]
pub struct Entry {
    /// When the request arrived: RFC 3339, UTC, milliseconds.
    #[serde(serialize_with = "as_rfc3339")]
    pub time: SystemTime,
    /// The request id (the client's `x-request-id` if sane, else generated).
    #[serde(serialize_with = "as_text")]
    pub request_id: http::HeaderValue,
    /// `chat`, `completions`, `embeddings`, `models`, `health`, `metrics` or `unknown`.
    pub endpoint: &'static str,
    /// The caller's group (never the key).
    pub group: Option<Arc<str>>,
    /// The model as requested.
    #[serde(serialize_with = "clipped")]
    pub model: Option<String>,
    /// The routing pattern that matched.
    pub route: Option<Arc<str>>,
    /// The connection that answered (or the last one tried).
    pub connection: Option<Arc<str>>,
    /// The model sent to that connection.
    #[serde(serialize_with = "clipped")]
    pub upstream_model: Option<String>,
    /// The status sent to the client.
    pub status: u16,
    /// `complete`, `client_gone`, `upstream_failed` or `client_stalled`.
    pub outcome: &'static str,
    /// Whether the response was a stream.
    pub stream: bool,
    /// Upstream attempts made.
    pub attempts: u32,
    /// Arrival to the last byte (or the client leaving), ms.
    pub duration_ms: f64,
    /// Arrival to the response head, ms.
    pub ttfb_ms: Option<f64>,
    /// Streams: arrival to the first body bytes, ms.
    pub ttft_ms: Option<f64>,
    /// The time the gateway itself added, ms.
    pub overhead_ms: f64,
    /// Usage as reported: prompt (cached included), completion, cached.
    pub prompt_tokens: Option<u64>,
    /// See `prompt_tokens`.
    pub completion_tokens: Option<u64>,
    /// See `prompt_tokens`.
    pub cached_tokens: Option<u64>,
    /// USD, from `[prices]`; absent when the model has no price.
    pub cost_usd: Option<f64>,
    /// Request body bytes.
    pub bytes_in: u64,
    /// Response body bytes sent.
    pub bytes_out: u64,
    /// The error, when the gateway answered with or appended one.
    #[serde(serialize_with = "clipped")]
    pub error: Option<String>,
    /// Its kind.
    pub error_kind: Option<&'static str>,
}

impl Entry {
    /// Fills the usage fields.
    pub fn usage(&mut self, usage: Option<&Usage>) {
        if let Some(u) = usage {
            (self.prompt_tokens, self.completion_tokens, self.cached_tokens) =
                (Some(u.prompt), Some(u.completion), Some(u.cached));
        }
    }
}

fn as_rfc3339<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&rfc3339(*t))
}

fn as_text<S: serde::Serializer>(v: &http::HeaderValue, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&String::from_utf8_lossy(v.as_bytes()))
}

/// Client strings are clipped as in error messages (a model name can be megabytes).
fn clipped<S: serde::Serializer>(v: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(v) => s.serialize_some(crate::error::clip(v)),
        None => s.serialize_none(),
    }
}

enum Message {
    Entry(Box<Entry>),
    Flush(SyncSender<()>),
}

/// The request log: a queue to its writer thread.
pub struct RequestLog {
    tx: SyncSender<Message>,
    path: PathBuf,
    max_bytes: u64,
    metrics: Arc<Metrics>,
}

impl RequestLog {
    /// Starts the writer for `path` (appended to; created if absent, opened by the writer).
    pub fn start(path: PathBuf, max_bytes: u64, metrics: Arc<Metrics>, queue: usize) -> std::io::Result<Self> {
        let (tx, rx) = sync_channel(queue);
        let writer = Writer { path: path.clone(), max_bytes, file: None, written: 0, metrics: metrics.clone() };
        std::thread::Builder::new().name("lmgate-request-log".into()).spawn(move || writer.run(rx))?;
        Ok(RequestLog { tx, path, max_bytes, metrics })
    }

    /// Whether this log writes where `path` and `max_bytes` say (a reload keeps it then).
    pub fn is(&self, path: &Path, max_bytes: u64) -> bool {
        self.path == path && self.max_bytes == max_bytes
    }

    /// Queues a record; never blocks (a full queue drops it, counted).
    pub fn write(&self, entry: Entry) {
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) =
            self.tx.try_send(Message::Entry(Box::new(entry)))
        {
            self.metrics.log_dropped.fetch_add(1, Relaxed);
        }
    }

    /// Waits (at most `within`) until everything queued before is written and flushed.
    pub fn flush(&self, within: Duration) -> bool {
        let (done, wait) = sync_channel(1);
        let deadline = std::time::Instant::now() + within;
        let mut msg = Message::Flush(done);
        loop {
            match self.tx.try_send(msg) {
                Ok(()) => break,
                Err(TrySendError::Full(m)) if std::time::Instant::now() < deadline => {
                    msg = m;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(_) => return false,
            }
        }
        wait.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now())).is_ok()
    }
}

struct Writer {
    path: PathBuf,
    max_bytes: u64,
    file: Option<BufWriter<File>>,
    written: u64,
    metrics: Arc<Metrics>,
}

impl Writer {
    /// Takes what is queued, writes it, flushes, and sleeps a tick when the queue is empty. It
    /// never parks on the queue: a parked receiver would make every request's send a wake-up (a
    /// futex call and a context switch on the request's core); polling costs one wake per tick.
    fn run(mut self, rx: Receiver<Message>) {
        let mut line = Vec::with_capacity(1024);
        loop {
            match rx.try_recv() {
                Ok(Message::Entry(e)) => {
                    line.clear();
                    if serde_json::to_writer(&mut line, &e).is_ok() {
                        line.push(b'\n');
                        self.append(&line);
                    }
                }
                Ok(Message::Flush(done)) => {
                    self.flush();
                    let _ = done.try_send(());
                }
                Err(TryRecvError::Empty) => {
                    self.flush();
                    std::thread::sleep(TICK);
                }
                Err(TryRecvError::Disconnected) => break,
            }
        }
        self.flush();
    }

    fn append(&mut self, line: &[u8]) {
        if self.file.is_some() && self.written + line.len() as u64 > self.max_bytes && self.written > 0 {
            self.rotate();
        }
        if self.file.is_none() {
            match OpenOptions::new().create(true).append(true).open(&self.path) {
                Ok(f) => {
                    self.written = f.metadata().map_or(0, |m| m.len());
                    self.file = Some(BufWriter::with_capacity(64 << 10, f));
                }
                Err(e) => {
                    self.lost(&e);
                    return;
                }
            }
            if self.written > 0 && self.written + line.len() as u64 > self.max_bytes {
                self.rotate();
                return self.append(line);
            }
        }
        let Some(f) = &mut self.file else { return };
        match f.write_all(line) {
            Ok(()) => self.written += line.len() as u64,
            Err(e) => {
                self.lost(&e);
                self.file = None;
            }
        }
    }

    fn flush(&mut self) {
        if let Some(f) = &mut self.file {
            if let Err(e) = f.flush() {
                self.lost(&e);
                self.file = None;
            }
        }
    }

    /// `path` → `path.1`, `.1` → `.2`, ..., the oldest removed; the next line opens a new file.
    fn rotate(&mut self) {
        self.flush();
        self.file = None;
        let nth = |i: usize| {
            let mut p = self.path.clone().into_os_string();
            p.push(format!(".{i}"));
            PathBuf::from(p)
        };
        let _ = std::fs::remove_file(nth(LOG_KEEP));
        for i in (1..LOG_KEEP).rev() {
            let _ = std::fs::rename(nth(i), nth(i + 1));
        }
        if let Err(e) = std::fs::rename(&self.path, nth(1)) {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot rotate the request log");
        }
        self.written = 0;
    }

    fn lost(&self, e: &std::io::Error) {
        self.metrics.log_failed.fetch_add(1, Relaxed);
        tracing::warn!(path = %self.path.display(), error = %e, "cannot write the request log");
    }
}

/// `t` as RFC 3339 in UTC with milliseconds (`2026-12-05T17:03:52.123Z`).
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    let (year, month, day) = civil(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

/// The civil date (year, month 1..=12, day) of a day counted from 1970-01-01 (H. Hinnant's
/// algorithm, <https://howardhinnant.github.io/date_algorithms.html>).
pub fn civil(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(month <= 2), month, day)
}

/// The day (from 1970-01-01) of a civil date: the inverse of [`civil`].
pub fn days(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = if month > 2 { month - 3 } else { month + 9 };
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str) -> Entry {
        Entry {
            time: SystemTime::now(),
            request_id: http::HeaderValue::from_str(id).unwrap(),
            endpoint: "chat",
            group: None,
            model: Some("m".into()),
            route: None,
            connection: None,
            upstream_model: None,
            status: 200,
            outcome: "complete",
            stream: false,
            attempts: 1,
            duration_ms: 1.0,
            ttfb_ms: None,
            ttft_ms: None,
            overhead_ms: 0.1,
            prompt_tokens: None,
            completion_tokens: None,
            cached_tokens: None,
            cost_usd: None,
            bytes_in: 10,
            bytes_out: 20,
            error: None,
            error_kind: None,
        }
    }

    /// An empty directory of its own for a test.
    fn fresh_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("lmgate-log-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn rfc3339_dates_are_civil_utc() {
        let t = |s: u64, ms: u64| rfc3339(SystemTime::UNIX_EPOCH + Duration::from_millis(s * 1000 + ms));
        assert_eq!(t(0, 0), "1970-01-01T00:00:00.000Z");
        assert_eq!(t(951_782_400, 5), "2000-02-29T00:00:00.005Z");
        assert_eq!(t(1_796_468_632, 999), "2026-12-05T11:03:52.999Z");
        assert_eq!(t(4_107_542_399, 0), "2100-02-28T23:59:59.000Z");
    }

    #[test]
    fn the_log_rotates_by_size_and_keeps_five() {
        let dir = fresh_dir("rotate");
        let path = dir.join("requests.jsonl");
        let metrics = Arc::new(Metrics::default());
        let log = RequestLog::start(path.clone(), 2_000, metrics.clone(), 64).unwrap();
        for i in 0..200 {
            log.write(entry(&format!("id-{i:04}")));
            if i % 32 == 31 {
                assert!(log.flush(Duration::from_secs(5)));
            }
        }
        assert!(log.flush(Duration::from_secs(5)));
        let mut files: Vec<String> =
            std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        files.sort();
        let want: Vec<String> = std::iter::once("requests.jsonl".to_owned())
            .chain((1..=LOG_KEEP).map(|i| format!("requests.jsonl.{i}")))
            .collect();
        assert_eq!(files, want);
        // Every file is within the bound; the newest lines are in the live file, in order.
        let mut last = Vec::new();
        for f in &files {
            let text = std::fs::read_to_string(dir.join(f)).unwrap();
            assert!(text.len() <= 2_000, "{f}: {} bytes", text.len());
            for line in text.lines() {
                let v: serde_json::Value = serde_json::from_str(line).unwrap();
                if f == "requests.jsonl" {
                    last.push(v["request_id"].as_str().unwrap().to_owned());
                }
            }
        }
        assert_eq!(last.last().map(String::as_str), Some("id-0199"));
        assert!(last.windows(2).all(|w| w[0] < w[1]), "{last:?}");
        assert_eq!(metrics.log_dropped.load(Relaxed) + metrics.log_failed.load(Relaxed), 0);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_full_queue_drops_and_counts_instead_of_blocking() {
        // A FIFO nobody reads: the writer blocks opening it, as on a stuck disk.
        let dir = fresh_dir("full");
        let path = dir.join("fifo");
        let made = std::process::Command::new("mkfifo").arg(&path).status().unwrap();
        assert!(made.success());
        let metrics = Arc::new(Metrics::default());
        let log = RequestLog::start(path.clone(), 1 << 20, metrics.clone(), 8).unwrap();
        // Were a write to block, this would never return: run it aside and wait for it to end
        // (the bound only turns a hang into a failure).
        let log = std::thread::spawn(move || {
            for i in 0..100 {
                log.write(entry(&format!("{i}")));
            }
            log
        });
        let (done, finished) = sync_channel(1);
        std::thread::spawn(move || done.send(log.join().unwrap()));
        let log = finished.recv_timeout(Duration::from_secs(60)).expect("a write blocked on the stuck disk");
        // The writer holds one record (blocked on it), the queue 8: the rest are counted.
        let dropped = metrics.log_dropped.load(Relaxed);
        assert!((91..=92).contains(&dropped), "{dropped}");
        // A reader comes: what was queued is written, nothing else.
        let reader = std::thread::spawn(move || std::fs::read_to_string(&path).unwrap());
        drop(log);
        let text = reader.join().unwrap();
        assert_eq!(text.lines().count() as u64, 100 - dropped, "{text}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
