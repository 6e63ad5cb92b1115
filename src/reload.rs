//! Where the configuration comes from, and reloading it while serving.
//!
//! A [`Source`] is the config file and the `.env` file. `SIGHUP`, and with `lmgate serve --watch`
//! a change to either file, reloads both: the new configuration is compiled and validated
//! completely first; if anything is wrong, the gateway keeps serving the one it has and logs why.
//! Otherwise the new snapshot replaces the old one in one atomic store
//! ([`crate::proxy::Proxy::reload`]): requests in flight finish on the configuration they started
//! with, every new request (on new and existing connections alike) uses the new one, no
//! connection is dropped, unchanged connections keep their upstream pools, and pooled targets
//! keep their health by name. A removed client key stops working at once.
//!
//! A few `[server]` keys shape the listener itself and only take effect on a restart (`listen`,
//! `max_connections`, `max_request_head_bytes`, `h2_keepalive_secs`, and TLS on or off): they are
//! kept as they were, with a warning naming them. Renewed TLS files are taken.

use crate::config::Config;
use crate::proxy::Proxy;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// How often `--watch` looks at the files.
const WATCH_EVERY: Duration = Duration::from_secs(1);

/// The configuration's files.
#[derive(Debug, Clone)]
pub struct Source {
    /// The config file.
    pub config: PathBuf,
    /// `--env`: `None` reads `./.env` when it exists; a path given must exist; `""` reads none.
    pub env: Option<String>,
}

impl Source {
    /// Reads and validates the configuration. Errors start with the file's name.
    pub fn load(&self) -> Result<Config, String> {
        let text = std::fs::read_to_string(&self.config).map_err(|e| format!("{}: {e}", self.config.display()))?;
        let env = env_lookup(self.env.as_deref())?;
        Config::parse(&text, &env).map_err(|e| format!("{}: {e}", self.config.display()))
    }

    /// The files a `--watch` looks at.
    fn files(&self) -> Vec<PathBuf> {
        let env = match self.env.as_deref() {
            None => Some(PathBuf::from(".env")),
            Some("") => None,
            Some(p) => Some(PathBuf::from(p)),
        };
        std::iter::once(self.config.clone()).chain(env).collect()
    }
}

/// Reloads `proxy` from `source`. On success, returns the restart-only keys whose new values
/// were not applied; on failure nothing changed.
pub fn reload(proxy: &Proxy, source: &Source) -> Result<Vec<&'static str>, String> {
    let result = apply(proxy, source);
    proxy.metrics().reloaded(result.is_ok());
    result
}

fn apply(proxy: &Proxy, source: &Source) -> Result<Vec<&'static str>, String> {
    let mut next = source.load()?;
    let now = proxy.config();
    let (old, new) = (&now.server, &mut next.server);
    let mut kept = Vec::new();
    let mut keep = |name: &'static str, differs: bool| {
        if differs {
            kept.push(name);
        }
    };
    keep("listen", old.listen != new.listen);
    keep("max_connections", old.max_connections != new.max_connections);
    keep("max_request_head_bytes", old.max_request_head_bytes != new.max_request_head_bytes);
    keep("h2_keepalive_secs", old.h2_keepalive != new.h2_keepalive);
    keep("tls_cert/tls_key (TLS on or off)", old.tls.is_some() != new.tls.is_some());
    new.listen = old.listen;
    new.max_connections = old.max_connections;
    new.max_request_head_bytes = old.max_request_head_bytes;
    new.h2_keepalive = old.h2_keepalive;
    keep("metrics.listen", now.metrics.listen != next.metrics.listen);
    next.metrics.listen = now.metrics.listen;
    // TLS cannot be turned on or off, but renewed files are taken.
    if old.tls.is_some() != new.tls.is_some() {
        new.tls = old.tls.clone();
    }
    // The check at parse read the file's `listen`; the one kept is what callers reach.
    if let Some(refusal) = crate::config::open_to_anyone(&next.server, next.open_group.is_some()) {
        return Err(format!("{}: {refusal} (the running listener is kept until a restart)", source.config.display()));
    }
    proxy.reload(next).map_err(|e| format!("{}: {e}", source.config.display()))?;
    Ok(kept)
}

/// Reloads on `SIGHUP` and, with `watch`, when a file of `source` changes. The signal handler
/// is in place when this returns (a SIGHUP no longer ends the process); the loop runs on a task.
/// Call within the runtime.
pub fn spawn(proxy: Arc<Proxy>, source: Source, watch: bool) -> tokio::task::JoinHandle<()> {
    #[cfg(unix)]
    let hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP: reload on signal is off");
            None
        }
    };
    #[cfg(not(unix))]
    let hangup: Option<()> = None;
    tokio::spawn(run(proxy, source, watch, hangup))
}

#[cfg(unix)]
type Hangup = Option<tokio::signal::unix::Signal>;
#[cfg(not(unix))]
type Hangup = Option<()>;

async fn run(proxy: Arc<Proxy>, source: Source, watch: bool, mut hangup: Hangup) {
    let files = source.files();
    let mut seen = stamps(&files);
    // A change is taken once the files have stood still for a tick: a file rewritten in place
    // can be read mid-write, and a valid prefix of it would drop the routes after the cut.
    let mut changing = None;
    let mut tick = tokio::time::interval(WATCH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let why = tokio::select! {
            Some(()) = signal(&mut hangup) => "SIGHUP",
            _ = tick.tick(), if watch => {
                let now = stamps(&files);
                if now == seen || changing.as_ref() != Some(&now) {
                    changing = (now != seen).then_some(now);
                    continue;
                }
                seen = now;
                changing = None;
                "a file changed"
            }
        };
        // Reading files and compiling (TLS files included) blocks: off the runtime's workers.
        let (p, src) = (proxy.clone(), source.clone());
        let reloaded = tokio::task::spawn_blocking(move || reload(&p, &src)).await;
        match reloaded.unwrap_or_else(|e| Err(format!("the reload task failed: {e}"))) {
            Ok(kept) => {
                let cfg = proxy.config();
                tracing::info!(
                    trigger = why,
                    connections = cfg.connections.len(),
                    routes = cfg.router.len(),
                    groups = cfg.groups.len(),
                    "configuration reloaded"
                );
                if !kept.is_empty() {
                    tracing::warn!(
                        keys = kept.join(", "),
                        "these [server] keys only change on a restart: kept as they were"
                    );
                }
                for w in &cfg.warnings {
                    tracing::warn!("{w}");
                }
            }
            Err(e) => {
                tracing::error!(trigger = why, error = %e, "configuration reload failed: still serving the previous one")
            }
        }
    }
}

/// The next SIGHUP; never, without a handler.
async fn signal(hangup: &mut Hangup) -> Option<()> {
    #[cfg(unix)]
    if let Some(h) = hangup.as_mut() {
        return h.recv().await;
    }
    let _ = hangup;
    std::future::pending().await
}

/// Modification time and length of each file (`None` when absent), to notice a change.
fn stamps(files: &[PathBuf]) -> Vec<Option<(SystemTime, u64)>> {
    files
        .iter()
        .map(|f| std::fs::metadata(f).ok().map(|m| (m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len())))
        .collect()
}

/// The process environment, then the `.env` file (which never overrides the environment).
///
/// `env_file` is `--env`: `None` reads `./.env` when it exists; a path given explicitly must exist
/// (a typo there would otherwise start the gateway with connections silently disabled); `""`
/// reads no file.
fn env_lookup(env_file: Option<&str>) -> Result<impl Fn(&str) -> Option<String>, String> {
    let mut dotenv = HashMap::new();
    let (path, optional) = match env_file {
        None => (".env", true),
        Some(path) => (path, false),
    };
    if !path.is_empty() {
        match dotenvy::from_path_iter(Path::new(path)) {
            Ok(iter) => {
                for item in iter {
                    let (k, v) = item.map_err(|e| env_file_error(path, &e))?;
                    dotenv.insert(k, v);
                }
            }
            Err(e) if e.not_found() && optional => {}
            Err(e) => return Err(format!("{path}: {e}")),
        }
    }
    Ok(move |k: &str| std::env::var(k).ok().or_else(|| dotenv.get(k).cloned()))
}

/// A `.env` error that never quotes the file: dotenvy's parse error repeats the offending text,
/// which is usually a secret. The message gives the line number and, when the line starts
/// with one, the variable's name.
fn env_file_error(path: &str, e: &dotenvy::Error) -> String {
    let dotenvy::Error::LineParse(text, _) = e else { return format!("{path}: {e}") };
    let wanted = text.lines().next().unwrap_or("").trim();
    let file = std::fs::read_to_string(path).unwrap_or_default();
    let found = file.lines().enumerate().find(|(_, l)| !wanted.is_empty() && l.contains(wanted));
    let Some((i, line)) = found else {
        return format!("{path}: a line cannot be parsed (its text is not shown: it may hold a secret)");
    };
    let line = line.trim_start();
    let line = line.strip_prefix("export ").unwrap_or(line).trim_start();
    let name = line.split('=').next().unwrap_or("").trim();
    if !name.is_empty() && name.len() < line.len() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        format!("{path}: line {}: cannot parse the entry for `{name}` (its value is not shown)", i + 1)
    } else {
        format!("{path}: line {} cannot be parsed (its text is not shown: it may hold a secret)", i + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_env_line_is_named_by_number_and_variable_never_quoted() {
        let dir = std::env::temp_dir();
        let cases = [
            ("A=1\nSECRET_KEY=abc def-hunter2\nB=2\n", "line 2: cannot parse the entry for `SECRET_KEY`"),
            ("A=1\n\nthis is junk hunter2\n", "line 3 cannot be parsed"),
            ("A=1\nX=\"unterminated hunter2\nY=2\n", "line 2: cannot parse the entry for `X`"),
        ];
        for (i, (text, want)) in cases.into_iter().enumerate() {
            let path = dir.join(format!("lmgate-env-{}-{i}.env", std::process::id()));
            std::fs::write(&path, text).unwrap();
            let p = path.to_str().unwrap();
            let e = env_lookup(Some(p)).err().expect("a parse error");
            let _ = std::fs::remove_file(&path);
            assert!(e.contains(want), "{e}");
            assert!(!e.contains("hunter2") && !e.contains("abc"), "{e}");
        }
    }
}
