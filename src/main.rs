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
        /// `.env` file with variables for `env:` references ("" to load none).
        #[arg(long, default_value = ".env")]
        env: String,
        /// Log format.
        #[arg(long, value_enum, default_value_t = LogFormat::Pretty)]
        log_format: LogFormat,
    },
    /// Validate a configuration and print a summary (never secret values).
    Check {
        /// Configuration file.
        #[arg(long, default_value = "config.toml")]
        config: PathBuf,
        /// `.env` file with variables for `env:` references ("" to load none).
        #[arg(long, default_value = ".env")]
        env: String,
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
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Pretty => builder.init(),
    }
}

/// The process environment, then the `.env` file (which never overrides the environment).
fn env_lookup(env_file: &str) -> Result<impl Fn(&str) -> Option<String>, String> {
    let mut dotenv = HashMap::new();
    if !env_file.is_empty() {
        let path = Path::new(env_file);
        match dotenvy::from_path_iter(path) {
            Ok(iter) => {
                for item in iter {
                    let (k, v) = item.map_err(|e| format!("{env_file}: {e}"))?;
                    dotenv.insert(k, v);
                }
            }
            // The default `.env` is optional; one named explicitly must exist.
            Err(e) if e.not_found() && env_file == ".env" => {}
            Err(e) => return Err(format!("{env_file}: {e}")),
        }
    }
    Ok(move |k: &str| std::env::var(k).ok().or_else(|| dotenv.get(k).cloned()))
}

fn load(config: &Path, env_file: &str) -> Result<Config, String> {
    let text = std::fs::read_to_string(config).map_err(|e| format!("{}: {e}", config.display()))?;
    let env = env_lookup(env_file)?;
    Config::parse(&text, &env).map_err(|e| format!("{}: {e}", config.display()))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (config, log_format, quiet) = match cli.command {
        Command::Bench(args) => return lmgate::bench::run(*args),
        Command::Check { config, env } => {
            return match load(&config, &env) {
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
        Command::Serve { config, env, log_format } => (load(&config, &env), log_format, false),
        Command::Mock { listen, log_format } => {
            let text = format!(
                "[server]\nlisten = \"{listen}\"\nshutdown_grace_secs = 1\n\
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
