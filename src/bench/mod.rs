//! `lmgate bench`: a load generator and latency meter for any OpenAI-compatible base URL.
//!
//! [`load`] drives the traffic (closed loop by concurrency or open loop by rate, bounded by count
//! and time, warm-up excluded) and measures each request; [`report`] turns the HDR histograms
//! into percentiles, a table, JSON, the `--compare` arithmetic and the `--chart` SVG. This
//! module holds the command line ([`Args`]) and the orchestration ([`run`]): one run, or
//! interleaved rounds against a direct URL and the gateway for `--compare`.
//!
//! Gateway overhead is measured honestly only side by side: same client, same box, interleaved
//! rounds (so drift affects both arms alike), with the direct-vs-direct spread printed as the
//! noise floor so a difference smaller than the noise is not read as a win or a loss.

pub mod load;
pub mod report;

pub use load::{run_load, Kind, Load, Shape, MAX_DURATION, MAX_RATE};
pub use report::{compare, Comparison, Report, Summary};

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// Command-line options of `lmgate bench`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Base URL of the OpenAI-compatible API (http:// only), e.g. http://127.0.0.1:8080/v1.
    #[arg(long)]
    pub url: String,
    /// Request kind.
    #[arg(long, value_enum, default_value_t = Kind::Chat)]
    pub kind: Kind,
    /// The `model` field (the default matches the shipped config's `mock-*` route).
    #[arg(long, default_value = "mock-1")]
    pub model: String,
    /// API key, sent as `Authorization: Bearer KEY`.
    #[arg(long)]
    pub key: Option<String>,
    /// Extra request header `name: value` (repeatable), e.g. `x-mock-delay-us: 100`.
    #[arg(long = "header", short = 'H')]
    pub headers: Vec<String>,
    /// Closed loop: number of workers sending back to back.
    #[arg(long, default_value_t = 1, conflicts_with = "rate")]
    pub concurrency: usize,
    /// Open loop: requests per second at fixed intervals (latency from the intended send time).
    #[arg(long)]
    pub rate: Option<f64>,
    /// Open loop: requests in flight at once; scheduled sends beyond it are counted as missed.
    #[arg(long, default_value_t = 1000)]
    pub max_in_flight: usize,
    /// Stop after this many measured requests.
    #[arg(long)]
    pub requests: Option<u64>,
    /// Stop after this many measured seconds (at most 3600).
    #[arg(long)]
    pub duration: Option<f64>,
    /// Unmeasured warm-up, seconds, before each run (each --compare round included): opens the
    /// connections so the measured phase does not time cold connects.
    #[arg(long, default_value_t = 0.2)]
    pub warmup: f64,
    /// Per-request timeout, seconds.
    #[arg(long, default_value_t = 60.0)]
    pub timeout: f64,
    /// Embeddings: number of inputs per request.
    #[arg(long, default_value_t = 1)]
    pub inputs: usize,
    /// Embeddings: `dimensions` per vector.
    #[arg(long)]
    pub dims: Option<usize>,
    /// Embeddings: ask for base64 vectors.
    #[arg(long)]
    pub base64: bool,
    /// Chat: content pieces to ask the mock for (sends `x-mock-chunks`).
    #[arg(long)]
    pub chunks: Option<u32>,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Also write the JSON object to this file (the table still goes to stdout).
    #[arg(long)]
    pub save: Option<PathBuf>,
    /// Compare against this direct upstream URL in interleaved rounds (direct, gateway, ...).
    #[arg(long)]
    pub compare: Option<String>,
    /// Rounds per arm for --compare (at least 5).
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// Write the latency percentile curves (one per target) to this file: an SVG, or an HTML page
    /// holding it when the name ends in `.html`.
    #[arg(long)]
    pub chart: Option<PathBuf>,
}

/// Seconds from the command line as a duration, refusing negative, NaN and huge values.
fn seconds(name: &str, s: f64) -> Result<Duration, String> {
    if !s.is_finite() || s < 0.0 || s > MAX_DURATION.as_secs_f64() {
        return Err(format!("--{name} must be between 0 and {} seconds", MAX_DURATION.as_secs()));
    }
    Ok(Duration::from_secs_f64(s))
}

impl Args {
    /// The load these options describe, against `url`.
    pub fn load(&self, url: &str) -> Result<Load, String> {
        let shape = match self.rate {
            Some(rate) if rate > 0.0 && rate <= MAX_RATE => Shape::Open { rate, max_in_flight: self.max_in_flight },
            Some(_) => return Err(format!("--rate must be a positive number of at most {MAX_RATE}")),
            None => Shape::Closed { concurrency: self.concurrency },
        };
        Ok(Load {
            url: url.to_string(),
            kind: self.kind,
            model: self.model.clone(),
            key: self.key.clone(),
            headers: self.headers.clone(),
            inputs: self.inputs,
            dims: self.dims,
            base64: self.base64,
            chunks: self.chunks,
            shape,
            requests: self.requests,
            duration: self.duration.map(|d| seconds("duration", d)).transpose()?,
            warmup: seconds("warmup", self.warmup)?,
            timeout: seconds("timeout", self.timeout)?.max(Duration::from_millis(1)),
            progress: std::io::stderr().is_terminal(),
        })
    }
}

/// What a bench command produced: one run or a comparison.
#[derive(Debug)]
pub enum Outcome {
    /// A single run.
    Single(Box<Report>),
    /// `--compare` rounds, with each arm's rounds merged (for the chart).
    Compare {
        /// The per-round arithmetic.
        comparison: Comparison,
        /// All direct rounds merged.
        direct: Box<Report>,
        /// All gateway rounds merged.
        gateway: Box<Report>,
    },
}

impl Outcome {
    /// The SVG chart of this outcome's latency curves.
    pub fn chart(&self) -> String {
        let series = |label: &str, r: &Report| (label.to_string(), report::curve(&r.latency));
        match self {
            Outcome::Single(r) => report::chart(&[series(&r.target, r)]),
            Outcome::Compare { direct, gateway, .. } => report::chart(&[
                series(&format!("direct {}", direct.target), direct),
                series(&format!("gateway {}", gateway.target), gateway),
            ]),
        }
    }
}

/// Runs the bench these options describe (in the current Tokio runtime).
pub async fn execute(args: &Args) -> Result<Outcome, String> {
    let gateway = args.load(&args.url)?;
    let Some(direct_url) = &args.compare else {
        return Ok(Outcome::Single(Box::new(run_load(&gateway).await?)));
    };
    if args.rounds < 5 {
        return Err("--rounds must be at least 5 so the median and noise floor mean something".into());
    }
    let direct = args.load(direct_url)?;
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    let per_run = gateway.warmup + gateway.duration.unwrap_or(Duration::ZERO);
    let total = per_run * (2 * args.rounds) as u32;
    let bound = if gateway.duration.is_some() { "about" } else { "at least (--requests decides)" };
    eprintln!(
        "compare: {} rounds x 2 arms x {:.1} s (warm-up {:.1} s + {}) = {bound} {:.0} s",
        args.rounds,
        per_run.as_secs_f64(),
        gateway.warmup.as_secs_f64(),
        gateway.duration.map_or("the requests".into(), |d| format!("{:.1} s", d.as_secs_f64())),
        total.as_secs_f64()
    );
    if (1..report::CORES_NEEDED).contains(&cores) {
        eprintln!(
            "warning: {cores} core(s): if the gateway and the upstream run here too, all three compete for CPU and \
             the throughput ratio measures the machine; pin them apart (taskset) or use a larger machine"
        );
    }
    let (mut d, mut g) = (Vec::with_capacity(args.rounds), Vec::with_capacity(args.rounds));
    let (mut d_all, mut g_all) = (Report::new(direct_url.as_str()), Report::new(args.url.as_str()));
    for round in 1..=args.rounds {
        if direct.progress {
            eprintln!(
                "\rround {round}/{}, about {:.0} s left",
                args.rounds,
                (total.as_secs_f64() * (1.0 - (round - 1) as f64 / args.rounds as f64))
            );
        }
        // The arms take turns going first, so a bias of the first (or second) slot in a round
        // lands on both alike.
        let (rd, rg) = if round % 2 == 1 {
            let rd = run_load(&direct).await?;
            (rd, run_load(&gateway).await?)
        } else {
            let rg = run_load(&gateway).await?;
            (run_load(&direct).await?, rg)
        };
        d_all.merge(&rd);
        d.push(rd.summary());
        g_all.merge(&rg);
        g.push(rg.summary());
    }
    let comparison = Comparison { cores, ..compare(d, g) };
    Ok(Outcome::Compare { comparison, direct: Box::new(d_all), gateway: Box::new(g_all) })
}

/// The `lmgate bench` entry point: runs, prints the table or JSON to stdout, and exits non-zero
/// on bad options, or when a run (or a --compare round) had no successful request.
pub fn run(args: Args) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = match runtime.block_on(execute(&args)) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(path) = &args.chart {
        let svg = outcome.chart();
        let html = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("html") || e.eq_ignore_ascii_case("htm"));
        let page = if html { report::html_page("lmgate bench: latency by percentile", &svg) } else { svg };
        if let Err(e) = std::fs::write(path, page) {
            eprintln!("error: {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    }
    // A run with no success, or a comparison with a round of either arm without one, has no
    // latency to speak of: the figures are printed, but the exit status says they mean nothing.
    let (json, table, all_failed) = match &outcome {
        Outcome::Single(r) => {
            let s = r.summary();
            (serde_json::to_string_pretty(&s), s.table(), s.ok == 0)
        }
        Outcome::Compare { comparison: c, .. } => (serde_json::to_string_pretty(c), c.table(), c.empty_rounds() > 0),
    };
    let json = json.map_err(|e| e.to_string());
    if let (Some(path), Ok(json)) = (&args.save, &json) {
        if let Err(e) = std::fs::write(path, json) {
            eprintln!("error: {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    }
    let text = if args.json { json } else { Ok(table) };
    match text {
        Ok(t) => println!("{}", t.trim_end()),
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    }
    if all_failed {
        eprintln!("error: no request succeeded (in a run, or in a round of --compare)");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
