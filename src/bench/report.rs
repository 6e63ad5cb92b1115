//! What a bench run measured, and how it is shown: HDR histograms (microseconds, 3 significant
//! digits) summarised as p50/p90/p99/p99.9/max, throughput, and errors by status; a human table
//! for stdout and one JSON object for `--json`; and the `--compare` arithmetic (added latency per
//! percentile as the median over interleaved rounds, with its spread and the A/A noise floor).

use hdrhistogram::Histogram;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

/// The largest value a histogram records, in microseconds (one hour, the run-time cap).
const MAX_US: u64 = 3_600_000_000;

/// The percentiles every summary reports, as (label, quantile).
pub const PERCENTILES: [(&str, f64); 4] = [("p50", 0.50), ("p90", 0.90), ("p99", 0.99), ("p99.9", 0.999)];

/// A fresh microsecond histogram covering 1 µs to one hour at 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    // The bounds are constants that `new_with_bounds` accepts (low >= 1, high >= 2 * low,
    // sigfig <= 5): no input reaches this call, and the unit tests construct it.
    Histogram::new_with_bounds(1, MAX_US, 3).expect("constant histogram bounds are valid")
}

/// Records `d` in `h` in microseconds, clamped to the histogram's range (0 is recordable).
pub fn record(h: &mut Histogram<u64>, d: Duration) {
    let us = u64::try_from(d.as_micros()).unwrap_or(MAX_US).min(MAX_US);
    // Clamped into range above, so this cannot fail; ignore rather than panic regardless.
    let _ = h.record(us);
}

/// Everything one load run measured (warm-up excluded).
#[derive(Debug, Clone)]
pub struct Report {
    /// What was driven, e.g. the URL; used as the label in tables and charts.
    pub target: String,
    /// Whole-request latency (to the last body byte), µs. Open loop: from the intended send time.
    pub latency: Histogram<u64>,
    /// Streams: time to the first response body byte, µs.
    pub ttfb: Histogram<u64>,
    /// Time to first token (first event with non-empty `choices[0].delta.content`), µs.
    pub ttft: Histogram<u64>,
    /// Gaps between successive content events, µs.
    pub gap: Histogram<u64>,
    /// Open loop: how late each send left against its intended time, µs (the generator's own
    /// delay, included in latency by design; small means the schedule was kept).
    pub lateness: Histogram<u64>,
    /// Requests that completed with a 2xx status and a whole body.
    pub ok: u64,
    /// Responses by non-2xx status.
    pub status_errors: BTreeMap<u16, u64>,
    /// Requests that failed below HTTP (connect, reset, body error, timeout).
    pub transport_errors: u64,
    /// Open loop only: scheduled requests that could not be sent on time (in-flight cap).
    pub missed: u64,
    /// Response body bytes received by measured requests.
    pub bytes: u64,
    /// Wall time of the measured phase.
    pub elapsed: Duration,
    /// Embeddings: inputs per request (0 for other kinds).
    pub inputs: u64,
}

impl Report {
    /// An empty report for `target`.
    pub fn new(target: impl Into<String>) -> Report {
        Report {
            target: target.into(),
            latency: histogram(),
            ttfb: histogram(),
            ttft: histogram(),
            gap: histogram(),
            lateness: histogram(),
            ok: 0,
            status_errors: BTreeMap::new(),
            transport_errors: 0,
            missed: 0,
            bytes: 0,
            elapsed: Duration::ZERO,
            inputs: 0,
        }
    }

    /// Adds `other`'s counts and histograms into `self` (elapsed is the maximum of the two).
    pub fn merge(&mut self, other: &Report) {
        // Both histograms come from `histogram()` with the same bounds, so adding cannot fail.
        let _ = self.latency.add(&other.latency);
        let _ = self.ttfb.add(&other.ttfb);
        let _ = self.ttft.add(&other.ttft);
        let _ = self.gap.add(&other.gap);
        let _ = self.lateness.add(&other.lateness);
        self.ok += other.ok;
        for (status, n) in &other.status_errors {
            *self.status_errors.entry(*status).or_default() += n;
        }
        self.transport_errors += other.transport_errors;
        self.missed += other.missed;
        self.bytes += other.bytes;
        self.elapsed = self.elapsed.max(other.elapsed);
        self.inputs = self.inputs.max(other.inputs);
    }

    /// Requests that got an answer or failed (missed ones were never sent).
    pub fn requests(&self) -> u64 {
        self.ok + self.status_errors.values().sum::<u64>() + self.transport_errors
    }

    /// Errors of any kind, missed sends included.
    pub fn errors(&self) -> u64 {
        self.status_errors.values().sum::<u64>() + self.transport_errors + self.missed
    }

    /// The numbers shown to people and machines.
    pub fn summary(&self) -> Summary {
        let secs = self.elapsed.as_secs_f64();
        let per_sec = |n: f64| if secs > 0.0 { n / secs } else { 0.0 };
        Summary {
            target: self.target.clone(),
            requests: self.requests(),
            ok: self.ok,
            errors_by_status: self.status_errors.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            transport_errors: self.transport_errors,
            missed: self.missed,
            elapsed_s: secs,
            ok_per_s: per_sec(self.ok as f64),
            mb_per_s: per_sec(self.bytes as f64) / 1_000_000.0,
            bytes: self.bytes,
            latency_us: Percentiles::of(&self.latency),
            ttfb_us: (!self.ttfb.is_empty()).then(|| Percentiles::of(&self.ttfb)),
            ttft_us: (!self.ttft.is_empty()).then(|| Percentiles::of(&self.ttft)),
            gap_us: (!self.gap.is_empty()).then(|| Percentiles::of(&self.gap)),
            lateness_us: (!self.lateness.is_empty()).then(|| Percentiles::of(&self.lateness)),
            ok_inputs_per_s: (self.inputs > 0).then(|| per_sec((self.ok * self.inputs) as f64)),
        }
    }
}

/// p50/p90/p99/p99.9/max of one histogram, in microseconds (0 when it is empty).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Percentiles {
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    #[serde(rename = "p99.9")]
    pub p999: u64,
    /// Largest value recorded.
    pub max: u64,
    /// How many values were recorded.
    pub count: u64,
}

impl Percentiles {
    /// Reads the standard percentiles out of `h`.
    pub fn of(h: &Histogram<u64>) -> Percentiles {
        if h.is_empty() {
            return Percentiles { p50: 0, p90: 0, p99: 0, p999: 0, max: 0, count: 0 };
        }
        Percentiles {
            p50: h.value_at_quantile(0.50),
            p90: h.value_at_quantile(0.90),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
            count: h.len(),
        }
    }

    /// The values in table order: p50, p90, p99, p99.9, max.
    pub fn values(&self) -> [u64; 5] {
        [self.p50, self.p90, self.p99, self.p999, self.max]
    }
}

/// The summary of one run, as printed and as serialised for `--json`.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// What was driven.
    pub target: String,
    /// Requests answered or failed (missed sends excluded).
    pub requests: u64,
    /// 2xx answers.
    pub ok: u64,
    /// Non-2xx answers by status code.
    pub errors_by_status: BTreeMap<String, u64>,
    /// Failures below HTTP.
    pub transport_errors: u64,
    /// Open loop: requests not sent on time.
    pub missed: u64,
    /// Measured wall time, seconds.
    pub elapsed_s: f64,
    /// Successful (2xx, whole body) requests per second: failures never count as throughput.
    pub ok_per_s: f64,
    /// Response megabytes (10^6) per second.
    pub mb_per_s: f64,
    /// Response bytes received.
    pub bytes: u64,
    /// Whole-request latency.
    pub latency_us: Percentiles,
    /// Time to first byte (streams only).
    pub ttfb_us: Option<Percentiles>,
    /// Time to first token (streams only).
    pub ttft_us: Option<Percentiles>,
    /// Gaps between content events (streams only).
    pub gap_us: Option<Percentiles>,
    /// Open loop: how late sends left against the schedule.
    pub lateness_us: Option<Percentiles>,
    /// Embeddings: inputs of successful requests per second.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ok_inputs_per_s: Option<f64>,
}

/// Open loop: a p99 send lateness above this means the generator did not keep its schedule
/// (the latencies then include its own delays).
pub const LATE_P99_US: u64 = 500;

impl Summary {
    /// Open loop: whether the generator fell behind its schedule (late sends or missed ones).
    pub fn fell_behind(&self) -> bool {
        self.missed > 0 || self.lateness_us.is_some_and(|l| l.p99 > LATE_P99_US)
    }
}

/// Microseconds as milliseconds with three decimals.
fn ms(us: u64) -> String {
    format!("{:.3}", us as f64 / 1000.0)
}

/// Signed microseconds as milliseconds with three decimals.
fn ms_signed(us: f64) -> String {
    format!("{:+.3}", us / 1000.0)
}

const COLUMNS: [&str; 5] = ["p50", "p90", "p99", "p99.9", "max"];

impl Summary {
    /// The human-readable table (milliseconds).
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "target       {}", self.target);
        let _ = writeln!(
            out,
            "requests     {} ({} ok) in {:.2} s: {:.1} ok req/s, {:.2} MB/s",
            self.requests, self.ok, self.elapsed_s, self.ok_per_s, self.mb_per_s
        );
        let _ = write!(out, "errors       {}", self.transport_errors + self.errors_by_status.values().sum::<u64>());
        if !self.errors_by_status.is_empty() {
            let by: Vec<String> = self.errors_by_status.iter().map(|(k, v)| format!("{k}: {v}")).collect();
            let _ = write!(out, " (by status {})", by.join(", "));
        }
        if self.transport_errors > 0 {
            let _ = write!(out, " ({} transport)", self.transport_errors);
        }
        out.push('\n');
        if let Some(inputs) = self.ok_inputs_per_s {
            let _ = writeln!(out, "inputs       {inputs:.1} ok inputs/s");
        }
        if self.missed > 0 {
            let _ = writeln!(out, "missed       {} (could not be sent on time: in-flight cap)", self.missed);
        }
        let _ = writeln!(out, "{:<12}{}", "ms", COLUMNS.map(|c| format!("{c:>12}")).concat());
        let mut row = |name: &str, p: &Percentiles| {
            let _ = writeln!(out, "{name:<12}{}", p.values().map(|v| format!("{:>12}", ms(v))).concat());
        };
        row("latency", &self.latency_us);
        if let Some(p) = &self.ttfb_us {
            row("ttfb", p);
        }
        if let Some(p) = &self.ttft_us {
            row("ttft", p);
        }
        if let Some(p) = &self.gap_us {
            row("chunk gap", p);
        }
        if let Some(p) = &self.lateness_us {
            row("send late", p);
            if self.fell_behind() {
                let _ = writeln!(
                    out,
                    "warning      the generator fell behind its schedule (p99 send lateness {} ms, {} missed): \
                     latencies include its own delays; lower --rate or give it a free core",
                    ms(p.p99),
                    self.missed
                );
            }
        }
        out
    }
}

/// A median with its spread over rounds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Spread {
    /// Median over rounds.
    pub median: f64,
    /// Smallest value over rounds.
    pub min: f64,
    /// Largest value over rounds.
    pub max: f64,
}

impl Spread {
    /// The median, min and max of `values`; `None` when there are none (or any is NaN).
    pub fn of(values: &[f64]) -> Option<Spread> {
        if values.is_empty() || values.iter().any(|v| v.is_nan()) {
            return None;
        }
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 };
        Some(Spread { median, min: v[0], max: v[n - 1] })
    }
}

/// One percentile of a comparison: what the gateway added and how noisy direct alone is.
#[derive(Debug, Clone, Serialize)]
pub struct Added {
    /// "p50", ..., "max".
    pub percentile: String,
    /// Gateway minus direct, µs, over rounds.
    pub added_us: Spread,
    /// Direct minus the previous direct round, µs: the A/A noise floor.
    pub noise_us: Option<Spread>,
    /// Whether |median added| is no larger than the largest A/A difference.
    pub within_noise: bool,
    /// The gateway arm was faster than direct by more than the noise: a hop cannot remove
    /// latency, so the arms were not measured alike (CPU contention, connection reuse).
    pub suspect: bool,
}

/// The `--compare` result: interleaved rounds, direct and gateway.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    /// Rounds per arm.
    pub rounds: usize,
    /// Added whole-request latency per percentile (p50, p90, p99, p99.9, max).
    pub latency: Vec<Added>,
    /// Added time to first byte per percentile (streams only, else empty).
    pub ttfb: Vec<Added>,
    /// Added time to first token per percentile (streams only, else empty).
    pub ttft: Vec<Added>,
    /// Added gap between content events per percentile (streams only, else empty).
    pub gap: Vec<Added>,
    /// Gateway throughput / direct throughput, over rounds.
    pub throughput_ratio: Option<Spread>,
    /// Per-round summaries of the direct arm.
    pub direct: Vec<Summary>,
    /// Per-round summaries of the gateway arm.
    pub gateway: Vec<Summary>,
    /// CPU cores this machine offers the generator, the gateway and the upstream together (0:
    /// not known).
    pub cores: usize,
}

/// Cores below which the generator, a gateway and an upstream on one machine compete for CPU.
pub const CORES_NEEDED: usize = 3;

/// The added value per percentile of one measure (`of` picks it out of a summary) over paired
/// rounds, with the noise floor from consecutive direct rounds. Empty when a round lacks it.
fn added(direct: &[Summary], gateway: &[Summary], of: fn(&Summary) -> Option<&Percentiles>) -> Vec<Added> {
    let rounds = direct.len().min(gateway.len());
    let values = |arm: &[Summary]| -> Option<Vec<[u64; 5]>> {
        arm[..rounds].iter().map(|s| of(s).map(Percentiles::values)).collect()
    };
    let (Some(d), Some(g)) = (values(direct), values(gateway)) else { return Vec::new() };
    (0..COLUMNS.len())
        .filter_map(|k| {
            let added: Vec<f64> = d.iter().zip(&g).map(|(d, g)| g[k] as f64 - d[k] as f64).collect();
            let noise: Vec<f64> = d.windows(2).map(|w| w[1][k] as f64 - w[0][k] as f64).collect();
            let added_us = Spread::of(&added)?;
            let noise_us = Spread::of(&noise);
            let floor = noise_us.map_or(0.0, |n| n.min.abs().max(n.max.abs()));
            let within_noise = noise_us.is_some() && added_us.median.abs() <= floor;
            let suspect = noise_us.is_some() && added_us.median < -floor;
            Some(Added { percentile: COLUMNS[k].to_string(), added_us, noise_us, within_noise, suspect })
        })
        .collect()
}

/// Compares paired rounds: round `i` of `direct` with round `i` of `gateway` (extra rounds on
/// either side are ignored). The noise floor is the spread of differences between consecutive
/// direct rounds, so it is `None` with fewer than two rounds.
pub fn compare(direct: Vec<Summary>, gateway: Vec<Summary>) -> Comparison {
    let rounds = direct.len().min(gateway.len());
    let ratios: Vec<f64> =
        (0..rounds).filter(|&i| direct[i].ok_per_s > 0.0).map(|i| gateway[i].ok_per_s / direct[i].ok_per_s).collect();
    Comparison {
        rounds,
        latency: added(&direct, &gateway, |s| Some(&s.latency_us)),
        ttfb: added(&direct, &gateway, |s| s.ttfb_us.as_ref()),
        ttft: added(&direct, &gateway, |s| s.ttft_us.as_ref()),
        gap: added(&direct, &gateway, |s| s.gap_us.as_ref()),
        throughput_ratio: Spread::of(&ratios),
        direct,
        gateway,
        cores: 0,
    }
}

impl Comparison {
    /// Rounds, of either arm, in which no request succeeded.
    pub fn empty_rounds(&self) -> usize {
        self.direct.iter().chain(&self.gateway).filter(|s| s.ok == 0).count()
    }

    /// The human-readable comparison table (milliseconds).
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "compare      {} interleaved rounds per arm (direct, gateway, ...)", self.rounds);
        if let (Some(d), Some(g)) = (self.direct.first(), self.gateway.first()) {
            let _ = writeln!(out, "direct       {}", d.target);
            let _ = writeln!(out, "gateway      {}", g.target);
        }
        // Latency is recorded for successes only, so failures must be seen beside it: a gateway
        // answering fast 404s would otherwise look faster than direct.
        let _ = write!(out, "outcomes    ");
        for (arm, rounds) in [("direct", &self.direct), ("gateway", &self.gateway)] {
            let ok: u64 = rounds.iter().map(|s| s.ok).sum();
            let failed: u64 = rounds.iter().map(|s| s.requests - s.ok + s.missed).sum();
            let _ = write!(out, " {arm} {ok} ok, {failed} failed or missed;");
        }
        out.pop();
        out.push('\n');
        if self.empty_rounds() > 0 {
            let _ = writeln!(
                out,
                "warning      {} round(s) without one success: the figures below mean nothing",
                self.empty_rounds()
            );
        }
        let measures =
            [("latency", &self.latency), ("ttfb", &self.ttfb), ("ttft", &self.ttft), ("chunk gap", &self.gap)];
        for (name, rows) in measures {
            if rows.is_empty() {
                continue;
            }
            let _ =
                writeln!(out, "{:<10}{:>14}{:>24}{:>24}", name, "added median", "added min..max", "A/A noise min..max");
            for a in rows {
                let noise = a
                    .noise_us
                    .map_or_else(|| "-".to_string(), |n| format!("{}..{}", ms_signed(n.min), ms_signed(n.max)));
                let _ = writeln!(
                    out,
                    "  {:<8}{:>14}{:>24}{:>24}{}",
                    a.percentile,
                    ms_signed(a.added_us.median),
                    format!("{}..{}", ms_signed(a.added_us.min), ms_signed(a.added_us.max)),
                    noise,
                    if a.within_noise {
                        "  (within noise)"
                    } else if a.suspect {
                        "  (suspect: faster than direct beyond the noise)"
                    } else {
                        ""
                    }
                );
            }
        }
        if let Some(r) = &self.throughput_ratio {
            let _ = writeln!(out, "throughput gateway/direct: {:.3} (min {:.3}, max {:.3})", r.median, r.min, r.max);
        }
        if (1..CORES_NEEDED).contains(&self.cores) {
            let _ = writeln!(
                out,
                "warning      {} core(s) for the generator, the gateway and the upstream (if they share this \
                 machine): they compete for CPU, so the throughput ratio measures the machine, not the gateway",
                self.cores
            );
        }
        let behind = self.direct.iter().chain(&self.gateway).filter(|s| s.fell_behind()).count();
        if behind > 0 {
            let _ = writeln!(
                out,
                "warning      the generator fell behind its schedule in {behind} run(s) (send lateness p99 over \
                 {} ms, or missed sends): those latencies include its own delays",
                ms(LATE_P99_US)
            );
        }
        if self.all().any(|a| a.suspect) {
            let _ = writeln!(
                out,
                "warning      figures marked suspect show the gateway faster than direct by more than the noise: \
                 a hop cannot remove latency, so the two arms were not measured alike (CPU contention between \
                 the generator, the gateway and the upstream, or different connection reuse); do not read \
                 them as a win"
            );
        }
        out.push_str(LEGEND);
        out
    }

    /// Every per-percentile figure of the comparison.
    fn all(&self) -> impl Iterator<Item = &Added> {
        self.latency.iter().chain(&self.ttfb).chain(&self.ttft).chain(&self.gap)
    }
}

/// What each figure of a comparison means, one line each, printed under the table.
const LEGEND: &str = "\
how to read this (milliseconds):
  added median      gateway minus direct at that percentile, the median over the paired rounds
  added min..max    the smallest and largest of those per-round differences
  A/A noise         differences between consecutive direct rounds: what chance alone produces
  (within noise)    the added median is inside the noise: neither a win nor a loss
  latency           send to last byte; ttfb: to the first body byte; ttft: to the first content token
  chunk gap         time between content events of a stream (0 for events read together)
  throughput        successful requests per second through the gateway, over direct
";

/// The latency curve of `h` for a chart: (x, µs) points where x = log10(1 / (1 - p)), from
/// p = 0 in steps of 0.05 on that scale while the data supports it (x ≤ log10(count)), ending at
/// the maximum. Empty for an empty histogram.
pub fn curve(h: &Histogram<u64>) -> Vec<(f64, u64)> {
    if h.is_empty() {
        return Vec::new();
    }
    let top = (h.len() as f64).log10();
    let mut points: Vec<(f64, u64)> = (0..=100)
        .map(|k| f64::from(k) * 0.05)
        .take_while(|x| *x < top)
        .map(|x| (x, h.value_at_quantile(1.0 - 10f64.powf(-x))))
        .collect();
    points.push((top, h.max()));
    points
}

/// A minimal HTML page showing `svg` under `title`, for `--chart FILE.html`.
pub fn html_page(title: &str, svg: &str) -> String {
    let title = xml_escape(title);
    format!(
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{title}</title></head>\n\
         <body style=\"font-family: sans-serif\"><h1>{title}</h1>\n{svg}</body></html>\n"
    )
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// A self-contained SVG of latency percentile curves, one per `(label, curve)` series: x is the
/// percentile on a log scale of 1/(1-p) (0 %, 90 %, 99 %, ...), y the latency in milliseconds.
pub fn chart(series: &[(String, Vec<(f64, u64)>)]) -> String {
    const W: f64 = 800.0;
    const H: f64 = 450.0;
    const L: f64 = 70.0;
    const R: f64 = 20.0;
    const T: f64 = 20.0;
    const B: f64 = 50.0;
    const COLORS: [&str; 6] = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b"];
    let all = series.iter().flat_map(|(_, c)| c.iter());
    let x_max = all.clone().map(|p| p.0).fold(1.0f64, f64::max).ceil();
    let y_max = all.map(|p| p.1).max().unwrap_or(0).max(1) as f64 / 1000.0 * 1.05;
    let sx = |x: f64| L + x / x_max * (W - L - R);
    let sy = |ms: f64| H - B - ms / y_max * (H - T - B);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" font-family=\"sans-serif\" font-size=\"12\">"
    );
    let _ = writeln!(out, "<rect width=\"{W}\" height=\"{H}\" fill=\"white\"/>");
    let _ = writeln!(out, "<path d=\"M{L} {T}V{}H{}\" stroke=\"black\" fill=\"none\"/>", H - B, W - R);
    for k in 0..=(x_max as u32) {
        let x = sx(f64::from(k));
        let label = if k == 0 { "0%".to_string() } else { format!("{}%", 100.0 - 100.0 / 10f64.powi(k as i32)) };
        let _ = writeln!(
            out,
            "<line x1=\"{x:.1}\" y1=\"{T}\" x2=\"{x:.1}\" y2=\"{}\" stroke=\"#ddd\"/><text x=\"{x:.1}\" y=\"{}\" text-anchor=\"middle\">{label}</text>",
            H - B,
            H - B + 16.0
        );
    }
    for k in 0..=5 {
        let ms = y_max * f64::from(k) / 5.0;
        let y = sy(ms);
        let _ = writeln!(
            out,
            "<line x1=\"{L}\" y1=\"{y:.1}\" x2=\"{}\" y2=\"{y:.1}\" stroke=\"#ddd\"/><text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{ms:.3}</text>",
            W - R,
            L - 6.0,
            y + 4.0
        );
    }
    let _ = writeln!(
        out,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">percentile</text><text x=\"16\" y=\"{}\" transform=\"rotate(-90 16 {})\" text-anchor=\"middle\">latency (ms)</text>",
        (L + W - R) / 2.0,
        H - 10.0,
        H / 2.0,
        H / 2.0
    );
    for (i, (label, points)) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let d: Vec<String> = points
            .iter()
            .enumerate()
            .map(|(j, (x, us))| {
                format!("{}{:.1} {:.1}", if j == 0 { 'M' } else { 'L' }, sx(*x), sy(*us as f64 / 1000.0))
            })
            .collect();
        let _ = writeln!(out, "<path d=\"{}\" stroke=\"{color}\" stroke-width=\"2\" fill=\"none\"/>", d.join(""));
        let y = T + 14.0 + 16.0 * i as f64;
        let _ = writeln!(out, "<text x=\"{}\" y=\"{y:.1}\" fill=\"{color}\">{}</text>", L + 10.0, xml_escape(label));
    }
    out.push_str("</svg>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report_with(values: impl IntoIterator<Item = u64>) -> Report {
        let mut r = Report::new("t");
        for v in values {
            record(&mut r.latency, Duration::from_micros(v));
            r.ok += 1;
        }
        r.elapsed = Duration::from_secs(2);
        r
    }

    #[test]
    fn percentiles_of_one_to_a_thousand_are_the_matching_ranks() {
        let p = Percentiles::of(&report_with(1..=1000).latency);
        assert_eq!((p.p50, p.p90, p.p99, p.p999, p.max, p.count), (500, 900, 990, 999, 1000, 1000));
    }

    #[test]
    fn an_empty_histogram_summarises_as_zeros() {
        let p = Percentiles::of(&histogram());
        assert_eq!(p.values(), [0; 5]);
        assert_eq!(p.count, 0);
    }

    #[test]
    fn durations_beyond_an_hour_are_clamped_not_rejected() {
        let mut h = histogram();
        record(&mut h, Duration::from_secs(10_000));
        record(&mut h, Duration::ZERO);
        assert_eq!(h.len(), 2);
        assert!(h.max() >= MAX_US);
    }

    #[test]
    fn summary_json_has_the_documented_shape() {
        let mut r = report_with([100, 200, 300]);
        r.status_errors.insert(503, 2);
        r.bytes = 4_000_000;
        let v = serde_json::to_value(r.summary()).unwrap();
        assert_eq!(v["requests"], 5);
        assert_eq!(v["ok"], 3);
        assert_eq!(v["errors_by_status"]["503"], 2);
        assert_eq!(v["ok_per_s"], 1.5, "failures never count as throughput");
        assert_eq!(v["mb_per_s"], 2.0);
        assert_eq!(v["latency_us"]["p50"], 200);
        assert_eq!(v["latency_us"]["max"], 300);
        assert!(v["latency_us"]["p99.9"].is_u64());
        assert!(v["ttft_us"].is_null());
        assert!(v["gap_us"].is_null());
    }

    #[test]
    fn merge_adds_counts_and_histograms() {
        let mut a = report_with([100]);
        let mut b = report_with([300]);
        b.status_errors.insert(404, 1);
        b.transport_errors = 2;
        a.merge(&b);
        assert_eq!(a.requests(), 5);
        assert_eq!(a.latency.len(), 2);
        assert_eq!(a.status_errors.get(&404), Some(&1));
    }

    #[test]
    fn table_names_every_row_and_error_status() {
        let mut r = report_with([100, 200]);
        record(&mut r.ttft, Duration::from_micros(50));
        r.status_errors.insert(429, 3);
        let t = r.summary().table();
        assert!(t.contains("latency"), "{t}");
        assert!(t.contains("ttft"), "{t}");
        assert!(t.contains("429: 3"), "{t}");
        assert!(!t.contains("chunk gap"), "{t}");
    }

    #[test]
    fn spread_takes_median_min_and_max() {
        assert_eq!(Spread::of(&[3.0, 1.0, 2.0]), Some(Spread { median: 2.0, min: 1.0, max: 3.0 }));
        assert_eq!(Spread::of(&[4.0, 1.0, 2.0, 3.0]).map(|s| s.median), Some(2.5));
        assert_eq!(Spread::of(&[]), None);
        assert_eq!(Spread::of(&[f64::NAN]), None);
    }

    #[test]
    fn compare_reports_added_latency_ratio_and_noise_floor() {
        let arm = |lat: &[u64], secs: u64| -> Vec<Summary> {
            lat.iter()
                .map(|&l| {
                    let mut r = report_with([l; 10]);
                    r.elapsed = Duration::from_secs(secs);
                    r.summary()
                })
                .collect()
        };
        // Direct p50s 1000, 1010, 990; gateway 1100, 1120, 1090: added 100, 110, 100.
        let c = compare(arm(&[1000, 1010, 990], 1), arm(&[1100, 1120, 1090], 2));
        assert_eq!(c.rounds, 3);
        let p50 = &c.latency[0];
        assert_eq!(p50.percentile, "p50");
        assert_eq!(p50.added_us, Spread { median: 100.0, min: 100.0, max: 110.0 });
        // Consecutive direct differences: +10, -20.
        assert_eq!(p50.noise_us, Some(Spread { median: -5.0, min: -20.0, max: 10.0 }));
        assert!(!p50.within_noise);
        assert_eq!(c.throughput_ratio.map(|r| r.median), Some(0.5));
        assert!(c.table().contains("p50"));
    }

    #[test]
    fn compare_reports_ttft_and_gaps_only_when_every_round_has_them() {
        let arm = |ttft: &[u64]| -> Vec<Summary> {
            ttft.iter()
                .map(|&t| {
                    let mut r = report_with([5000; 4]);
                    r.elapsed = Duration::from_secs(1);
                    record(&mut r.ttft, Duration::from_micros(t));
                    record(&mut r.gap, Duration::from_micros(t / 10));
                    r.summary()
                })
                .collect()
        };
        let c = compare(arm(&[1000, 1000, 1000]), arm(&[1300, 1200, 1250]));
        assert_eq!(c.ttft[0].added_us, Spread { median: 250.0, min: 200.0, max: 300.0 });
        assert_eq!(c.gap[0].added_us.median, 25.0);
        assert!(c.table().contains("ttft") && c.table().contains("chunk gap"));
        // A non-stream arm has no TTFT: nothing is invented for it.
        let plain = |n: usize| (0..n).map(|_| report_with([5000; 4]).summary()).collect::<Vec<_>>();
        let c = compare(plain(3), arm(&[1300, 1200, 1250]));
        assert!(c.ttft.is_empty() && c.gap.is_empty() && !c.table().lines().any(|l| l.starts_with("ttft")));
    }

    #[test]
    fn compare_flags_a_difference_smaller_than_the_noise() {
        let arm = |lat: &[u64]| -> Vec<Summary> { lat.iter().map(|&l| report_with([l]).summary()).collect() };
        let c = compare(arm(&[1000, 1100, 1000]), arm(&[1010, 1090, 1020]));
        assert!(c.latency[0].within_noise);
        assert!(c.table().contains("within noise"));
    }

    #[test]
    fn a_gateway_faster_than_direct_beyond_the_noise_is_suspect_not_a_win() {
        let arm = |lat: &[u64]| -> Vec<Summary> { lat.iter().map(|&l| report_with([l]).summary()).collect() };
        // Direct noise ±10; the gateway 200 µs faster.
        let c = compare(arm(&[1000, 1010, 1000]), arm(&[800, 810, 800]));
        let p50 = &c.latency[0];
        assert!(p50.suspect && !p50.within_noise);
        let t = c.table();
        assert!(
            t.contains("(suspect: faster than direct beyond the noise)") && t.contains("not measured alike"),
            "{t}"
        );
        // Slower than direct beyond the noise is a finding, not suspect.
        let c = compare(arm(&[1000, 1010, 1000]), arm(&[1200, 1210, 1200]));
        assert!(!c.latency[0].suspect && !c.table().contains("suspect"));
        assert!(c.table().contains("A/A noise         differences between consecutive direct rounds"));
    }

    #[test]
    fn few_cores_and_a_generator_behind_its_schedule_are_flagged() {
        let mut late = report_with([100]);
        record(&mut late.lateness, Duration::from_micros(2_000));
        assert!(late.summary().fell_behind());
        assert!(late.summary().table().contains("fell behind its schedule"));
        let mut kept = report_with([100]);
        record(&mut kept.lateness, Duration::from_micros(20));
        assert!(!kept.summary().fell_behind() && kept.summary().table().contains("send late"));
        let c = Comparison { cores: 2, ..compare(vec![kept.summary(); 3], vec![late.summary(); 3]) };
        let t = c.table();
        assert!(t.contains("2 core(s)") && t.contains("fell behind its schedule in 3 run(s)"), "{t}");
        let c = Comparison { cores: 8, ..compare(vec![kept.summary(); 3], vec![kept.summary(); 3]) };
        assert!(!c.table().contains("core(s)") && !c.table().contains("fell behind"));
    }
    #[test]
    fn curve_stops_where_the_data_does_and_ends_at_the_max() {
        let h = report_with(1..=1000).latency;
        let c = curve(&h);
        assert_eq!(c.first(), Some(&(0.0, 1)));
        assert_eq!(c.last(), Some(&(3.0, 1000)));
        assert!(c.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1), "{c:?}");
        assert!(curve(&histogram()).is_empty());
    }

    #[test]
    fn html_chart_page_holds_the_svg_and_escapes_the_title() {
        let page = html_page("a < b", "<svg></svg>");
        assert!(page.starts_with("<!DOCTYPE html>"), "{page}");
        assert!(page.contains("<title>a &lt; b</title>") && page.contains("<svg></svg>"), "{page}");
    }

    #[test]
    fn chart_is_an_svg_with_one_path_and_label_per_series() {
        let h = report_with(1..=100).latency;
        let svg = chart(&[("direct".into(), curve(&h)), ("gate<way>".into(), curve(&h))]);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("stroke-width=\"2\"").count(), 2);
        assert!(svg.contains("gate&lt;way&gt;"));
        assert!(svg.contains("99%"));
        assert!(!svg.contains("NaN"));
    }
}
