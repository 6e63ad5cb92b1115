//! The `lmgate` command: serve, check, mock, bench.

use clap::{Parser, Subcommand, ValueEnum};
use lmgate::config::Config;
use lmgate::proxy::Proxy;
use lmgate::reload::{self, Source};
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
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
        /// Reload when the config or `.env` file changes (checked every second), as on SIGHUP.
        #[arg(long)]
        watch: bool,
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut source = None;
    let (config, log_format, quiet) = match cli.command {
        Command::Bench(args) => return lmgate::bench::run(*args),
        Command::Check { config, env } => {
            // The limits' store is checked too (the state file read, the Redis URL parsed; no
            // connection is made).
            let loaded = (Source { config: config.clone(), env }).load();
            let loaded = loaded.and_then(|cfg| lmgate::limit::Limits::new(&cfg).map(|_| cfg));
            return match loaded {
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
        Command::Serve { config, env, log_format, watch } => {
            let s = Source { config, env };
            let loaded = s.load();
            source = Some((s, watch));
            (loaded, log_format, false)
        }
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
        proxy.limits().start();
        let listener = match lmgate::server::bind(addr) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("error: cannot listen on {addr}: {e}");
                return ExitCode::FAILURE;
            }
        };
        let metrics = proxy.config().metrics.clone();
        if let (true, Some(at)) = (metrics.enabled, metrics.listen) {
            match tokio::net::TcpListener::bind(at).await {
                Ok(l) => {
                    tracing::info!(listen = %l.local_addr().map_or(at, |a| a), path = metrics.path, "metrics listener ready");
                    tokio::spawn(lmgate::server::serve_metrics(l, proxy.clone()));
                }
                Err(e) => {
                    eprintln!("error: cannot listen on {at} (metrics.listen): {e}");
                    return ExitCode::FAILURE;
                }
            }
        }
        // SIGHUP reloads (and no longer ends the process) from here on.
        if let Some((source, watch)) = source {
            reload::spawn(proxy.clone(), source, watch);
        }
        let shutdown = shutdown_signal();
        let local = listener.local_addr().map_or(addr, |a| a);
        // One line on stdout, so scripts and tests can find the port when listening on :0.
        println!("listening on {local}");
        let _ = std::io::stdout().flush();
        tracing::info!(%local, "lmgate ready");
        lmgate::server::serve(listener, proxy.clone(), shutdown).await;
        // Records of the last requests are in the log, and their spend saved, before the process ends.
        proxy.flush_log(std::time::Duration::from_secs(5));
        proxy.limits().flush(std::time::Duration::from_secs(2)).await;
        ExitCode::SUCCESS
    })
}

/// SIGTERM or SIGINT (Ctrl-C). The handlers are installed when this is called, not when the
/// future is first polled: a signal sent right after the "listening on" line is never lost.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let term = signal(SignalKind::terminate());
        let int = signal(SignalKind::interrupt());
        async move {
            match (term, int) {
                (Ok(mut term), Ok(mut int)) => {
                    tokio::select! {
                        _ = int.recv() => {},
                        _ = term.recv() => {},
                    }
                }
                _ => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        async {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
