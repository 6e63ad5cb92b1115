//! The `lmgate` command: serve, check, mock, bench.

use clap::{Parser, Subcommand, ValueEnum};
use lmgate::config::Config;
use lmgate::proxy::Proxy;
use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

#[derive(Parser)]
#[command(name = "lmgate", version, about = "OpenAI-compatible LLM gateway")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Serve {
        /// Configuration file.
        #[arg(long, default_value = "config.toml")]
        config: PathBuf,
        /// `.env` file with variables for `env:` references; it must exist when given ("" loads
        /// none). Default: `.env` in the working directory, skipped when absent.
        #[arg(long)]
        env: Option<String>,
        /// Log format.
        #[arg(long, value_enum, default_value_t = LogFormat::Pretty)]
        log_format: LogFormat,
    },
    /// Validate a configuration and print a summary (never secret values).
    Check {
        /// Configuration file.
        #[arg(long, default_value = "config.toml")]
        config: PathBuf,
        /// `.env` file with variables for `env:` references; it must exist when given ("" loads
        /// none). Default: `.env` in the working directory, skipped when absent.
        #[arg(long)]
        env: Option<String>,
    },
    /// Run the built-in mock as a standalone OpenAI-compatible upstream.
    Mock {
        /// Address to listen on (port 0 picks a free one).
        #[arg(long, default_value = "127.0.0.1:4010")]
        listen: SocketAddr,
        /// Log format.
        #[arg(long, value_enum, default_value_t = LogFormat::Pretty)]
        log_format: LogFormat,
    },
    /// Benchmark an OpenAI-compatible base URL (latency percentiles, throughput, errors).
    Bench(Box<lmgate::bench::Args>),
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Pretty,
    Json,
}

fn init_logging(format: LogFormat, default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // Colour only on a terminal: escape codes in a log file or a collector are noise.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Pretty => builder.init(),
    }
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

/// A `.env` error that never quotes the file: dotenvy's parse error repeats the offending line,
/// which is usually `NAME=secret`. Only the variable name is kept.
fn env_file_error(path: &str, e: &dotenvy::Error) -> String {
    match e {
        dotenvy::Error::LineParse(line, _) => {
            let line = line.trim_start();
            let line = line.strip_prefix("export ").unwrap_or(line).trim_start();
            let name = line.split('=').next().unwrap_or("").trim();
            if !name.is_empty()
                && name.len() < line.len()
                && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
            {
                format!("{path}: cannot parse the entry for `{name}` (its value is not shown)")
            } else {
                format!("{path}: cannot parse a line (its text is not shown: it may hold a secret)")
            }
        }
        other => format!("{path}: {other}"),
    }
}

fn load(config: &Path, env_file: Option<&str>) -> Result<Config, String> {
    let text = std::fs::read_to_string(config).map_err(|e| format!("{}: {e}", config.display()))?;
    let env = env_lookup(env_file)?;
    Config::parse(&text, &env).map_err(|e| format!("{}: {e}", config.display()))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (config, log_format, quiet) = match cli.command {
        Command::Bench(args) => return lmgate::bench::run(*args),
        Command::Check { config, env } => {
            return match load(&config, env.as_deref()) {
                Ok(cfg) => {
                    print!("{}", cfg.summary());
                    println!("{}: OK", config.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            };
        }
        Command::Serve { config, env, log_format } => (load(&config, env.as_deref()), log_format, false),
        Command::Mock { listen, log_format } => {
            let text = format!(
                "[server]\nlisten = \"{listen}\"\nshutdown_grace_secs = 1\nallowed_hosts = [\"*\"]\nopen = true\n\
                 [connections.mock]\napi_type = \"mock\"\n[routing]\n\"*\" = \"mock.*\"\n"
            );
            (Config::parse(&text, &|_| None).map_err(|e| e.to_string()), log_format, true)
        }
    };
    init_logging(log_format, if quiet { "warn" } else { "info" });
    let config = match config {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    if !quiet {
        for w in &config.warnings {
            tracing::warn!("{w}");
        }
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let addr = config.server.listen;
        let proxy = match Proxy::new(config) {
            Ok(p) => Arc::new(p),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        };
        let listener = match lmgate::server::bind(addr) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("error: cannot listen on {addr}: {e}");
                return ExitCode::FAILURE;
            }
        };
        let local = listener.local_addr().map_or(addr, |a| a);
        // One line on stdout, so scripts and tests can find the port when listening on :0.
        println!("listening on {local}");
        let _ = std::io::stdout().flush();
        tracing::info!(%local, "lmgate ready");
        lmgate::server::serve(listener, proxy, shutdown_signal()).await;
        ExitCode::SUCCESS
    })
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {},
                    _ = term.recv() => {},
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
