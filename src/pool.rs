//! Pools of deployments: per-target health and the choice of the next target.
//!
//! Every pooled target has a [`Health`]: a handful of atomics (requests in flight, an EWMA of
//! the time to first byte, consecutive failures, cooled-down-until), updated by the attempt loop
//! and read by [`pick`] without any lock. Health belongs to the target as written in the config
//! (`conn.model`, or `conn.*` for a whole connection), so its state is bounded by the config, is
//! shared by every route that names the same target, and survives a reload that keeps the name
//! ([`crate::snapshot::Snapshot`] re-binds it).
//!
//! A target is *usable* unless it is cooling down. One whose cooldown has passed is half-open:
//! the next request to pick it holds the single probe slot ([`Lease`]) and the others leave it
//! alone until the probe's answer puts it back in service, or cools it again.
//!
//! Plain string routes (one target, today's behaviour) keep no health at all: the attempt loop
//! never touches these atomics for them.

use crate::error::Error;
use http::StatusCode;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

/// Most targets in one pool: the attempt loop keeps the tried ones in a `u64` bit set.
pub const MAX_TARGETS: usize = 64;

/// How a pool chooses among its usable targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// Weighted random (the default).
    Weighted,
    /// Fewest requests in flight: a scan for small pools, two random choices for large ones.
    LeastBusy,
    /// Lowest EWMA of time to first byte; untried targets first, and a little exploration.
    Latency,
    /// The first usable target in list order (primary and standby).
    Ordered,
}

impl Strategy {
    /// Every strategy by its config name.
    pub const NAMES: [(&'static str, Strategy); 4] = [
        ("weighted", Strategy::Weighted),
        ("least_busy", Strategy::LeastBusy),
        ("latency", Strategy::Latency),
        ("ordered", Strategy::Ordered),
    ];

    /// The config name.
    pub fn name(self) -> &'static str {
        Self::NAMES.iter().find(|(_, s)| *s == self).map_or("?", |(n, _)| n)
    }
}

/// `least_busy` scans pools up to this size; larger ones compare two random targets.
const SCAN: usize = 4;
/// `latency`: one pick in this many goes to a random usable target, so a target that got
/// faster (or recovered) is measured again.
const EXPLORE_ONE_IN: u32 = 20;
/// Weight of the newest sample in the latency EWMA, in 1/8ths.
const EWMA_NEW_EIGHTHS: u64 = 3;

/// Milliseconds since the process started: the clock cooldowns are kept in (0 = not cooling).
pub fn now_ms() -> u64 {
    static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);
    // +1: a cooldown set in the first millisecond is still non-zero.
    EPOCH.elapsed().as_millis() as u64 + 1
}

/// The longest an upstream's `Retry-After` keeps a target out. Past it a probe asks again: one
/// answer (a 503 saying "come back in 100 days", or a date years ahead) must not take a
/// deployment out until the next restart, and a reload keeps cooldowns.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// One target's shared state.
#[derive(Debug, Default)]
pub struct Health {
    in_flight: AtomicU32,
    /// EWMA of the time to first byte in microseconds; 0 until measured.
    ewma_us: AtomicU64,
    failures: AtomicU32,
    /// Cooling down until this [`now_ms`]; 0 when in service.
    until_ms: AtomicU64,
    /// The cooldown is an upstream's rate limit (429), not a failure.
    limited: AtomicBool,
    /// A half-open probe is in flight.
    probing: AtomicBool,
}

/// Cooldown settings of a pool (`[cooldown]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cooldown {
    /// Consecutive failed attempts that take a target out.
    pub failures: u32,
    /// How long it stays out.
    pub period: Duration,
}

impl Health {
    /// Whether a request may pick this target now: in service, or half-open with no probe out.
    pub fn usable(&self, now: u64) -> bool {
        let until = self.until_ms.load(Relaxed);
        until == 0 || (now >= until && !self.probing.load(Relaxed))
    }

    /// How long until this target may be picked again (zero when usable now), and whether it
    /// is out because of an upstream rate limit.
    pub fn wait(&self, now: u64) -> (Duration, bool) {
        let until = self.until_ms.load(Relaxed);
        let limited = self.limited.load(Relaxed);
        match until {
            0 => (Duration::ZERO, false),
            // A probe is out: it answers within the attempt's own timeouts; check back soon.
            u if u <= now => (Duration::from_millis(if self.probing.load(Relaxed) { 100 } else { 0 }), limited),
            u => (Duration::from_millis(u - now), limited),
        }
    }

    /// Requests in flight to this target.
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Relaxed)
    }

    /// The latency EWMA, if measured.
    pub fn latency(&self) -> Option<Duration> {
        Some(self.ewma_us.load(Relaxed)).filter(|&us| us > 0).map(Duration::from_micros)
    }

    /// Starts an attempt: counts it in flight and, if the target is half-open, takes the probe
    /// slot. `None` when another request took the probe slot first.
    pub fn lease(self: &Arc<Self>, now: u64) -> Option<Lease> {
        let until = self.until_ms.load(Relaxed);
        let probe = until != 0 && now >= until;
        if probe && self.probing.swap(true, Relaxed) {
            return None;
        }
        self.in_flight.fetch_add(1, Relaxed);
        Some(Lease { health: self.clone(), probe })
    }

    /// An attempt succeeded after `ttfb`: failures forgotten, latency noted. Only the half-open
    /// probe puts a cooling target back in service: a request that started before the target
    /// was cooled (a 429 with Retry-After meanwhile) must not lift the cooldown.
    fn succeeded(&self, ttfb: Duration, probe: bool) {
        if self.failures.load(Relaxed) != 0 {
            self.failures.store(0, Relaxed);
        }
        if probe {
            self.until_ms.store(0, Relaxed);
            self.limited.store(false, Relaxed);
        }
        let sample = (ttfb.as_micros() as u64).max(1);
        let old = self.ewma_us.load(Relaxed);
        let new = if old == 0 { sample } else { (old * (8 - EWMA_NEW_EIGHTHS) + sample * EWMA_NEW_EIGHTHS) / 8 };
        self.ewma_us.store(new.max(1), Relaxed);
    }

    /// An attempt failed in a way another attempt may fix. An upstream's `Retry-After` cools
    /// the target for that long, always (it said so), up to [`MAX_RETRY_AFTER`]. Other failures count; at
    /// `cooldown.failures` in a row the target goes out for `cooldown.period`, but only while
    /// `others_usable`: the last usable target of a pool is never taken out for failures.
    pub fn failed(&self, error: &Error, cooldown: Cooldown, others_usable: bool, now: u64) {
        let failures = self.failures.fetch_add(1, Relaxed).saturating_add(1);
        if let Some(wait) = error.retry_after {
            let until = now + (wait.min(MAX_RETRY_AFTER).as_millis() as u64).max(1);
            self.until_ms.fetch_max(until, Relaxed);
            self.limited.store(error.status == StatusCode::TOO_MANY_REQUESTS, Relaxed);
        } else if failures >= cooldown.failures && others_usable {
            self.until_ms.fetch_max(now + cooldown.period.as_millis() as u64, Relaxed);
            self.limited.store(false, Relaxed);
        } else if self.until_ms.load(Relaxed) != 0 && self.until_ms.load(Relaxed) <= now {
            // A failed probe of the last usable target: back in service rather than out.
            self.until_ms.store(0, Relaxed);
        }
    }

    /// A test's view: whether the target is cooling down at `now`.
    pub fn cooling(&self, now: u64) -> bool {
        let until = self.until_ms.load(Relaxed);
        until != 0 && now < until
    }
}

/// An attempt at a pooled target, from its start until the response body is done: counts the
/// request in flight and holds the half-open probe slot, released when dropped.
#[derive(Debug)]
pub struct Lease {
    health: Arc<Health>,
    probe: bool,
}

impl Lease {
    /// The attempt succeeded after `ttfb` (see [`Health::succeeded`]). A probe's slot is freed
    /// now, not when the response ends: a long stream must not keep the target half-open.
    pub fn succeeded(&mut self, ttfb: Duration) {
        self.health.succeeded(ttfb, self.probe);
        self.settle();
    }

    /// Frees the probe slot, if this lease holds it.
    fn settle(&mut self) {
        if std::mem::take(&mut self.probe) {
            self.health.probing.store(false, Relaxed);
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.health.in_flight.fetch_sub(1, Relaxed);
        self.settle();
    }
}

/// What [`pick`] needs of a target.
pub trait Pickable {
    /// Its health.
    fn health(&self) -> &Health;
    /// Its weight (`weighted`).
    fn weight(&self) -> u32;
}

/// Chooses a usable target of `targets` not in the bit set `avoid`, by `strategy`. Nothing is
/// allocated and no lock is taken: a few atomic loads per target and at most two random numbers.
pub fn pick<T: Pickable>(targets: &[T], strategy: Strategy, avoid: u64, now: u64) -> Option<usize> {
    let mut candidates = [0u8; MAX_TARGETS];
    let mut n = 0;
    for (i, t) in targets.iter().enumerate().take(MAX_TARGETS) {
        if avoid & (1 << i) == 0 && t.health().usable(now) {
            candidates[n] = i as u8;
            n += 1;
        }
    }
    let c = &candidates[..n];
    let at = |k: usize| &targets[c[k] as usize];
    let chosen = match (strategy, n) {
        (_, 0) => return None,
        (_, 1) | (Strategy::Ordered, _) => 0,
        (Strategy::Weighted, _) => {
            let total: u64 = (0..n).map(|k| u64::from(at(k).weight())).sum();
            let mut r = fastrand::u64(0..total.max(1));
            (0..n)
                .find(|&k| {
                    let w = u64::from(at(k).weight());
                    r < w || {
                        r -= w;
                        false
                    }
                })
                .unwrap_or(n - 1)
        }
        (Strategy::LeastBusy, n) if n <= SCAN => {
            // From a random start, so that ties (an idle pool) spread instead of piling onto
            // the first target.
            let start = fastrand::usize(0..n);
            (0..n).map(|k| (start + k) % n).min_by_key(|&k| at(k).health().in_flight()).unwrap_or(0)
        }
        (Strategy::LeastBusy, n) => {
            let a = fastrand::usize(0..n);
            let b = (a + 1 + fastrand::usize(0..n - 1)) % n;
            if at(b).health().in_flight() < at(a).health().in_flight() {
                b
            } else {
                a
            }
        }
        (Strategy::Latency, n) => {
            if fastrand::u32(0..EXPLORE_ONE_IN) == 0 {
                fastrand::usize(0..n)
            } else {
                // Unmeasured targets first (latency 0), then the lowest EWMA.
                (0..n).min_by_key(|&k| at(k).health().ewma_us.load(Relaxed)).unwrap_or(0)
            }
        }
    };
    Some(c[chosen] as usize)
}

/// The pause before attempt `retry` (1 for the first retry) at a target already tried:
/// exponential from `base`, capped at `max`, with full jitter (a uniform draw below the cap), so
/// many clients retrying at once spread out.
pub fn backoff(retry: u32, base: Duration, max: Duration) -> Duration {
    let cap = base.saturating_mul(1u32 << retry.saturating_sub(1).min(20)).min(max);
    let ms = cap.as_millis() as u64;
    Duration::from_millis(fastrand::u64(0..=ms))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Kind;

    struct T {
        health: Arc<Health>,
        weight: u32,
    }

    impl Pickable for T {
        fn health(&self) -> &Health {
            &self.health
        }
        fn weight(&self) -> u32 {
            self.weight
        }
    }

    fn pool(weights: &[u32]) -> Vec<T> {
        weights.iter().map(|&weight| T { health: Arc::default(), weight }).collect()
    }

    fn counts(targets: &[T], strategy: Strategy, n: usize) -> Vec<usize> {
        let mut counts = vec![0; targets.len()];
        for _ in 0..n {
            counts[pick(targets, strategy, 0, now_ms()).unwrap()] += 1;
        }
        counts
    }

    fn failure() -> Error {
        Error::upstream_failure(Kind::UpstreamUnreachable, "refused")
    }

    const COOL: Cooldown = Cooldown { failures: 2, period: Duration::from_secs(30) };

    #[test]
    fn weights_three_to_one_give_three_to_one() {
        // 40,000 draws at p = 0.75: mean 30,000, standard deviation sqrt(n p (1 - p)) ≈ 86.6. The
        // bound is ±600 (about 7 standard deviations): a correct draw lands outside it with a
        // probability below 1e-11, while a pick that ignored weights (20,000) or inverted them
        // (10,000) cannot land inside it.
        let targets = pool(&[3, 1]);
        let c = counts(&targets, Strategy::Weighted, 40_000);
        assert!((29_400..=30_600).contains(&c[0]), "{c:?}");
    }

    #[test]
    fn ordered_takes_the_first_usable_and_skips_what_is_avoided_or_cooling() {
        let targets = pool(&[1, 1, 1]);
        assert_eq!(counts(&targets, Strategy::Ordered, 10), [10, 0, 0]);
        assert_eq!(pick(&targets, Strategy::Ordered, 0b001, now_ms()), Some(1));
        targets[1].health.failed(&failure(), Cooldown { failures: 1, ..COOL }, true, now_ms());
        assert_eq!(pick(&targets, Strategy::Ordered, 0b001, now_ms()), Some(2));
        assert_eq!(pick(&targets, Strategy::Ordered, 0b101, now_ms()), None);
    }

    #[test]
    fn least_busy_avoids_the_busy_target_in_small_and_large_pools() {
        for size in [2, 3, 16] {
            let targets = pool(&vec![1; size]);
            let _held: Vec<Lease> = (0..3).map(|_| targets[0].health.lease(now_ms()).unwrap()).collect();
            let c = counts(&targets, Strategy::LeastBusy, 2_000);
            assert_eq!(c[0], 0, "size {size}: {c:?}");
            // Idle targets share the load (ties are spread, not all on one).
            assert!(c[1..].iter().all(|&n| n > 0), "size {size}: {c:?}");
        }
    }

    #[test]
    fn latency_prefers_unmeasured_then_the_fastest_and_still_explores() {
        let targets = pool(&[1, 1]);
        targets[0].health.succeeded(Duration::from_millis(50), false);
        // Target 1 is unmeasured: it goes first (but for exploration).
        let c = counts(&targets, Strategy::Latency, 2_000);
        assert!(c[1] > 1_800, "{c:?}");
        targets[1].health.succeeded(Duration::from_millis(5), false);
        let c = counts(&targets, Strategy::Latency, 4_000);
        // Exploration sends about 1 in 40 to the slower one (1 in 20, half of them to either).
        assert!(c[1] > 3_700 && c[0] > 20, "{c:?}");
        // It gets faster: the EWMA follows within a few samples.
        for _ in 0..10 {
            targets[0].health.succeeded(Duration::from_millis(1), false);
        }
        let c = counts(&targets, Strategy::Latency, 4_000);
        assert!(c[0] > 3_700, "{c:?}");
    }

    #[test]
    fn failures_cool_a_target_only_while_another_is_usable() {
        let h = Arc::new(Health::default());
        let now = now_ms();
        h.failed(&failure(), COOL, true, now);
        assert!(h.usable(now), "one failure of two");
        h.failed(&failure(), COOL, false, now);
        assert!(h.usable(now), "the last usable target stays in");
        h.failed(&failure(), COOL, true, now);
        assert!(!h.usable(now) && h.cooling(now));
        assert_eq!(h.wait(now), (Duration::from_secs(30), false));
        // A request that started before the cooldown succeeds: the cooldown stands.
        h.succeeded(Duration::from_millis(1), false);
        assert!(!h.usable(now) && h.cooling(now));
        // The probe, once the time is up, lifts it.
        let mut probe = h.lease(now + 30_000).unwrap();
        probe.succeeded(Duration::from_millis(1));
        assert!(h.usable(now));
    }

    #[test]
    fn retry_after_cools_even_the_last_target_and_marks_a_rate_limit() {
        let h = Arc::new(Health::default());
        let now = now_ms();
        let mut e = Error::upstream_status(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", "slow down");
        e.retry_after = Some(Duration::from_secs(7));
        h.failed(&e, COOL, false, now);
        assert_eq!(h.wait(now), (Duration::from_secs(7), true));
        assert!(!h.usable(now + 6_999) && h.usable(now + 7_000));
    }

    #[test]
    fn a_retry_after_keeps_a_target_out_for_at_most_an_hour() {
        let h = Arc::new(Health::default());
        let now = now_ms();
        let mut e = Error::upstream_status(StatusCode::SERVICE_UNAVAILABLE, "api_error", "down");
        e.retry_after = Some(Duration::from_secs(9_999_999));
        h.failed(&e, COOL, true, now);
        assert_eq!(h.wait(now).0, MAX_RETRY_AFTER);
        assert!(!h.usable(now + 3_599_999) && h.usable(now + 3_600_000));
    }

    #[test]
    fn a_target_back_from_cooldown_takes_one_probe_at_a_time() {
        let h = Arc::new(Health::default());
        let now = now_ms();
        h.failed(&failure(), Cooldown { failures: 1, ..COOL }, true, now);
        let later = now + 30_000;
        let probe = h.lease(later).expect("the probe");
        assert!(!h.usable(later) && h.lease(later).is_none(), "one probe at a time");
        drop(probe);
        assert!(h.usable(later), "a probe that ended without an answer frees the slot");
        let probe = h.lease(later).unwrap();
        h.failed(&failure(), Cooldown { failures: 1, ..COOL }, true, later);
        drop(probe);
        assert!(!h.usable(later + 1), "a failed probe cools it again");
        let mut probe = h.lease(later + 30_000).unwrap();
        probe.succeeded(Duration::from_millis(1));
        assert!(h.usable(later + 30_000), "a good probe puts it back in service at once");
        assert!(h.lease(later + 30_000).is_some(), "while its response is still going");
        drop(probe);
        let (a, b) = (h.lease(later + 30_000), h.lease(later + 30_000));
        assert!(a.is_some() && b.is_some(), "for everyone, not one at a time");
        assert_eq!(h.in_flight(), 2);
    }

    #[test]
    fn backoff_is_capped_full_jitter() {
        let base = Duration::from_millis(50);
        let max = Duration::from_millis(2_000);
        for retry in 1..40 {
            let cap = (50u64 << (retry - 1).min(20)).min(2_000);
            let most = (0..200).map(|_| backoff(retry, base, max)).max().unwrap();
            assert!(most <= Duration::from_millis(cap), "retry {retry}: {most:?}");
        }
        assert!((0..200).map(|_| backoff(6, base, max)).any(|d| d > Duration::from_millis(1_000)));
    }
}
