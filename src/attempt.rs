//! The attempt loop: one client request, one or more upstream attempts.
//!
//! A plain route (one target) makes one attempt, as a bare proxy hop does: no health is read or
//! kept. A pool ([`crate::router::Pool`]) makes up to `attempts` attempts:
//!
//! - each attempt picks a usable target ([`crate::pool::pick`]), preferring one this request
//!   has not tried: a failed attempt moves on to another target at once; only a retry on a
//!   target already tried waits a backoff (exponential, full jitter);
//! - a failure the error says may be retried ([`Error::retryable`]: unreachable, closed before
//!   the head, timeouts, 429, 500, 502, 503, 504, 529) is noted on the target's health (which
//!   may cool it down) and the loop goes on; any other failure is the answer;
//! - a target the request cannot use (a disabled connection, a group that may not use it, a
//!   provider that refuses the request's parameters before sending) is skipped, not counted;
//! - when no target is usable (all cooling down), the loop waits for the first to come back if
//!   that is within `retry_after_max`, else the pool is exhausted with 429 (every target out
//!   on an upstream rate limit) or 503, with `Retry-After`;
//! - an exhausted pool hands over to its fallbacks, in order, each tried as if the client had
//!   asked for it by name (with its own pool policy, or its one attempt).
//!
//! An attempt's future resolves before anything has been committed to the client (the response
//! head is only sent once the loop returns; a stream with `first_token_timeout_secs` resolves
//! only once its first bytes are in), so nothing is ever retried after the first byte went out.
//! Every wait is inside the request's future: a client that disconnects, or the end of the
//! shutdown grace, drops it, and with it every attempt still to come.

use crate::error::{Error, Kind};
use crate::pool::{self, Lease};
use crate::router::{Pool, Route, Router, Target};
use http::StatusCode;
use std::future::Future;
use std::time::{Duration, Instant};

/// One attempt's outcome as the loop sees it.
pub enum Outcome<T> {
    /// The answer to give the client.
    Success(T),
    /// A failure; `relay` is what the client gets for it if no other attempt follows (else the
    /// error renders).
    Failure {
        /// What went wrong, and whether another attempt may help.
        error: Error,
        /// The upstream's own answer to the failure, passed through.
        relay: Option<T>,
    },
    /// This target cannot serve this request (nothing was sent): another target may. Not an
    /// attempt.
    Skip(Error),
}

impl<T> Outcome<T> {
    /// A failure with nothing to relay.
    pub fn failed(error: Error) -> Self {
        Outcome::Failure { error, relay: None }
    }
}

/// What the loop did.
pub struct Run<T> {
    /// The answer, or the error to render.
    pub result: Result<T, Error>,
    /// The route id and target index of the last attempt, if one was made.
    pub target: Option<(usize, usize)>,
    /// How many attempts were made.
    pub attempts: u32,
    /// The kinds of the failed attempts before the answer, oldest first (the record logs them).
    pub failed: Vec<Kind>,
    /// The answering pooled target's lease: keep it until the response is done.
    pub lease: Option<Lease>,
}

/// How one route of the chain ended.
enum Link<T> {
    /// The request is answered (success or a final failure): stop.
    Answered(Result<T, Error>),
    /// Every attempt failed or nothing was usable: try the next route of the chain.
    Exhausted,
}

/// What the loop carries across attempts and routes.
struct State<T> {
    run: Run<T>,
    /// The latest retryable failure, with the upstream's own answer to it and whether it was
    /// an attempt's (else a pool's "everything is cooling down").
    last: Option<(Error, Option<T>, bool)>,
    /// Why a target was skipped, if every one was (a 403 is kept over other reasons).
    skipped: Option<Error>,
}

impl<T> State<T> {
    fn skip(&mut self, e: Error) {
        if !self.skipped.as_ref().is_some_and(|s| s.kind == Kind::Forbidden) {
            self.skipped = Some(e);
        }
    }

    /// A retryable failure of an attempt: noted, the loop goes on.
    fn failed(&mut self, error: Error, relay: Option<T>) {
        self.run.failed.push(error.kind);
        self.last = Some((error, relay, true));
    }
}

/// Runs attempts for a request of `model` routed to `route` until one answers or the route and
/// its fallbacks are exhausted. `attempt(target, name)` makes one attempt, asking `target` for
/// `name` (the client's model, or a fallback's name).
pub async fn run<'r, T, F, Fut>(router: &'r Router, route: &'r Route, model: &'r str, mut attempt: F) -> Run<T>
where
    F: FnMut(&'r Target, &'r str) -> Fut,
    Fut: Future<Output = Outcome<T>>,
{
    let run = Run { result: Err(no_target()), target: None, attempts: 0, failed: Vec::new(), lease: None };
    let mut st = State { run, last: None, skipped: None };
    let chain = route.pool.as_ref().map_or(&[][..], |p| &p.chain[..]);
    let links = std::iter::once((route, model)).chain(chain.iter().map(|(r, n)| (&router.routes()[*r], &**n)));
    for (route, name) in links {
        let link = match &route.pool {
            None => plain(route, name, &mut attempt, &mut st).await,
            Some(pool) => pooled(route, pool, name, &mut attempt, &mut st).await,
        };
        if let Link::Answered(result) = link {
            st.run.result = result;
            return st.run;
        }
    }
    // Nothing answered: the last failure (relayed when the upstream's answer can be), else why
    // every target was skipped.
    st.run.result = match (st.last, st.skipped) {
        (Some((error, relay, attempted)), _) => {
            if attempted {
                // The answer's own failure is not one of those retried.
                st.run.failed.pop();
            }
            relay.ok_or(error)
        }
        (None, Some(skipped)) => Err(skipped),
        (None, None) => Err(no_target()),
    };
    st.run
}

fn no_target() -> Error {
    Error::unavailable("The route has no target.")
}

/// A plain route: one attempt at its one target.
async fn plain<'r, T, F, Fut>(route: &'r Route, name: &'r str, attempt: &mut F, st: &mut State<T>) -> Link<T>
where
    F: FnMut(&'r Target, &'r str) -> Fut,
    Fut: Future<Output = Outcome<T>>,
{
    let Some(target) = route.targets.first() else { return Link::Exhausted };
    match attempt(target, name).await {
        Outcome::Skip(e) => {
            st.skip(e);
            Link::Exhausted
        }
        outcome => {
            st.run.attempts += 1;
            st.run.target = Some((route.id, 0));
            match outcome {
                Outcome::Success(answer) => Link::Answered(Ok(answer)),
                Outcome::Failure { error, relay } if error.retryable() => {
                    st.failed(error, relay);
                    Link::Exhausted
                }
                Outcome::Failure { error, relay } => Link::Answered(relay.ok_or(error)),
                Outcome::Skip(_) => unreachable!("matched above"),
            }
        }
    }
}

/// A pool: attempts across its targets by its policy.
async fn pooled<'r, T, F, Fut>(
    route: &'r Route,
    pool: &'r Pool,
    name: &'r str,
    attempt: &mut F,
    st: &mut State<T>,
) -> Link<T>
where
    F: FnMut(&'r Target, &'r str) -> Fut,
    Fut: Future<Output = Outcome<T>>,
{
    let targets = &route.targets[..route.targets.len().min(pool::MAX_TARGETS)];
    let all = if targets.len() == 64 { u64::MAX } else { (1u64 << targets.len()) - 1 };
    let retries = &pool.retries;
    let (mut tried, mut skipped) = (0u64, 0u64);
    let (mut made, mut again, mut waited) = (0u32, 0u32, Duration::ZERO);
    // The last pause was a cooldown wait: no backoff on top of it.
    let mut rested = false;
    while made < retries.attempts && skipped != all {
        let now = pool::now_ms();
        let fresh = pool::pick(targets, pool.strategy, tried | skipped, now);
        let Some(i) = fresh.or_else(|| pool::pick(targets, pool.strategy, skipped, now)) else {
            // Everything left is cooling down: wait for the first to come back, if soon enough.
            let (wait, limited) = (0..targets.len())
                .filter(|i| skipped & (1 << i) == 0)
                .map(|i| targets[i].health.wait(now))
                .fold((Duration::MAX, true), |(w, l), (tw, tl)| (w.min(tw), l && tl));
            let wait = wait.max(Duration::from_millis(1));
            if waited + wait <= retries.retry_after_max {
                waited += wait;
                tokio::time::sleep(wait).await;
                rested = true;
                continue;
            }
            st.last = Some((cooling(route, name, wait, limited), None, false));
            return Link::Exhausted;
        };
        let bit = 1u64 << i;
        let target = &targets[i];
        if fresh.is_none() && !std::mem::take(&mut rested) {
            again += 1;
            tokio::time::sleep(pool::backoff(again, retries.backoff, retries.max_backoff)).await;
            // Another request may have cooled it meanwhile (a 429 with Retry-After): pick again.
            if !target.health.usable(pool::now_ms()) {
                continue;
            }
        }
        // `None`: another request took the half-open probe slot; pick again.
        let Some(mut lease) = target.health.lease(pool::now_ms()) else { continue };
        let started = Instant::now();
        let outcome = attempt(target, name).await;
        if let Outcome::Skip(e) = outcome {
            skipped |= bit;
            st.skip(e);
            continue;
        }
        made += 1;
        tried |= bit;
        st.run.attempts += 1;
        st.run.target = Some((route.id, i));
        match outcome {
            Outcome::Success(answer) => {
                lease.succeeded(started.elapsed());
                st.run.lease = Some(lease);
                return Link::Answered(Ok(answer));
            }
            Outcome::Failure { error, relay } if error.retryable() => {
                let now = pool::now_ms();
                let others = (0..targets.len()).any(|j| {
                    j != i && skipped & (1 << j) == 0 && !targets[j].disabled && targets[j].health.usable(now)
                });
                target.health.failed(&error, pool.cooldown, others, now);
                st.failed(error, relay);
            }
            Outcome::Failure { error, relay } => return Link::Answered(relay.ok_or(error)),
            Outcome::Skip(_) => unreachable!("handled above"),
        }
    }
    Link::Exhausted
}

/// The answer when every usable target of a pool is cooling down for longer than the request
/// may wait: 429 when they are all out on an upstream rate limit, else 503; both with the time
/// until the first comes back as `Retry-After`.
fn cooling(route: &Route, name: &str, wait: Duration, limited: bool) -> Error {
    let secs = wait.as_secs_f64().ceil().max(1.0);
    let mut e = if limited {
        Error::upstream_status(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            format!(
                "Every upstream of `{name}` (route `{}`) is rate-limited; retry after {secs} s.",
                route.pattern.as_str()
            ),
        )
        .code("rate_limit_exceeded")
    } else {
        Error::unavailable(format!(
            "Every upstream of `{name}` (route `{}`) is cooling down after failures; retry after {secs} s.",
            route.pattern.as_str()
        ))
        .code("upstream_unavailable")
    };
    e.retry_after = Some(wait);
    e
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use std::cell::RefCell;

    /// Connections `a`..`e` (mock) and `routing` lines.
    fn router(routing: &str) -> Config {
        let conns: String = "abcde".chars().map(|c| format!("[connections.{c}]\napi_type = \"mock\"\n")).collect();
        Config::parse(&format!("{conns}[routing]\n{routing}"), &|_: &str| None).unwrap()
    }

    type Answer = Outcome<&'static str>;

    /// Runs the loop for `model` with a stub provider: `answer(connection id, name)` scripts
    /// each attempt. Returns the run and the attempts as "connection:name", in order.
    fn script(cfg: &Config, model: &str, answer: impl Fn(usize, &str) -> Answer) -> (Run<&'static str>, Vec<String>) {
        let seen = RefCell::new(Vec::new());
        let route = cfg.router.route(model).expect("a route");
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        let run = rt.block_on(run(&cfg.router, route, model, |t, name| {
            let c = t.connection;
            seen.borrow_mut().push(format!("{}:{name}", cfg.connections[c].name));
            let a = answer(c, name);
            async move { a }
        }));
        (run, seen.into_inner())
    }

    fn busy() -> Error {
        Error::upstream_status(StatusCode::SERVICE_UNAVAILABLE, "api_error", "busy")
    }

    fn unreachable() -> Error {
        Error::upstream_failure(Kind::UpstreamUnreachable, "refused")
    }

    #[test]
    fn a_plain_route_is_one_attempt_whatever_happens() {
        let cfg = router("\"m\" = \"a.x\"\n");
        let (run, seen) = script(&cfg, "m", |_, _| Outcome::Success("ok"));
        assert_eq!((run.result.unwrap(), run.target, run.attempts, seen), ("ok", Some((0, 0)), 1, vec!["a:m".into()]));
        assert!(run.lease.is_none(), "a plain route keeps no health");
        let (run, seen) = script(&cfg, "m", |_, _| Outcome::Failure { error: busy(), relay: Some("the 503") });
        assert_eq!((run.result.unwrap(), run.attempts, seen.len()), ("the 503", 1, 1));
        assert!(run.failed.is_empty());
        assert!(!cfg.router.routes()[0].targets[0].health.cooling(pool::now_ms()));
    }

    #[test]
    fn a_failed_attempt_moves_on_to_an_untried_target_at_once() {
        let cfg = router("\"m\" = { targets = [\"a.x\", \"b.x\", \"c.x\"], strategy = \"ordered\" }\n");
        let (run, seen) = script(&cfg, "m", |c, _| match c {
            0 => Outcome::failed(unreachable()),
            1 => Outcome::failed(busy()),
            _ => Outcome::Success("third"),
        });
        assert_eq!((run.result.unwrap(), run.target, run.attempts), ("third", Some((0, 2)), 3));
        assert_eq!(seen, ["a:m", "b:m", "c:m"]);
        assert_eq!(run.failed, [Kind::UpstreamUnreachable, Kind::UpstreamStatus]);
        assert!(run.lease.is_some());
    }

    #[test]
    fn a_final_failure_is_the_answer_with_attempts_left() {
        let cfg = router("\"m\" = [\"a.x\", \"b.x\"]\n");
        let bad = || Error::upstream_status(StatusCode::BAD_REQUEST, "invalid_request_error", "no");
        let (run, seen) = script(&cfg, "m", |_, _| Outcome::Failure { error: bad(), relay: Some("the 400") });
        assert_eq!((run.result.unwrap(), run.attempts, seen.len()), ("the 400", 1, 1));
    }

    #[test]
    fn attempts_bound_the_tries_and_the_last_failure_is_relayed() {
        let cfg = router("\"m\" = { targets = [\"a.x\", \"b.x\"], attempts = 3, backoff_ms = 1 }\n");
        let n = RefCell::new(0);
        let (run, seen) = script(&cfg, "m", |_, _| {
            *n.borrow_mut() += 1;
            Outcome::Failure { error: busy(), relay: Some(if *n.borrow() == 3 { "third" } else { "earlier" }) }
        });
        assert_eq!((run.result.unwrap(), run.attempts, seen.len()), ("third", 3, 3));
        assert_eq!(run.failed.len(), 2, "the answer's own failure is not among the retried");
        // Both targets were tried before either was tried again.
        assert_ne!(seen[0], seen[1]);
    }

    #[test]
    fn skipped_targets_are_not_attempts_and_a_403_wins_when_all_are_skipped() {
        let cfg = router("\"m\" = { targets = [\"a.x\", \"b.x\", \"c.x\"], strategy = \"ordered\", attempts = 1 }\n");
        let (run, seen) = script(&cfg, "m", |c, _| match c {
            0 => Outcome::Skip(Error::invalid_request("a cannot do that")),
            1 => Outcome::Skip(Error::forbidden("not b")),
            _ => Outcome::Success("c"),
        });
        assert_eq!((run.result.unwrap(), run.attempts, seen.len()), ("c", 1, 3));
        let (run, _) = script(&cfg, "m", |c, _| match c {
            1 => Outcome::Skip(Error::forbidden("not b")),
            _ => Outcome::Skip(Error::unavailable("disabled")),
        });
        assert_eq!((run.result.unwrap_err().status.as_u16(), run.attempts), (403, 0));
    }

    #[test]
    fn failures_never_cool_the_last_target_whose_connection_is_enabled() {
        let conns = "[connections.a]\napi_type = \"mock\"\n[connections.b]\napi_type = \"openai\"\n\
                     api_base = \"http://127.0.0.1:9/v1\"\napi_key = \"env:LMGATE_TEST_UNSET_KEY\"\n";
        let routing = "[routing]\n\"m\" = { targets = [\"a.x\", \"b.x\"], strategy = \"ordered\", attempts = 1 }\n";
        let cfg = Config::parse(&format!("{conns}{routing}"), &|_: &str| None).unwrap();
        assert!(cfg.connections[1].disabled.is_some());
        // Each request fails on `a` before it reaches `b` (disabled), far past `[cooldown] failures`.
        for _ in 0..10 {
            let (run, seen) = script(&cfg, "m", |_, _| Outcome::failed(busy()));
            assert_eq!((run.attempts, seen), (1, vec!["a:m".to_owned()]));
        }
        assert!(!cfg.router.routes()[0].targets[0].health.cooling(pool::now_ms()), "`b` cannot serve");
    }

    #[test]
    fn an_exhausted_pool_hands_over_to_its_fallbacks_by_their_names() {
        let cfg = router(
            "\"m\" = { targets = [\"a.x\"], attempts = 1, fallbacks = [\"f\", \"g*\"] }\n\
             \"f\" = { targets = [\"b.*\"], attempts = 1, fallbacks = [\"h\"] }\n\"g*\" = \"c.*\"\n\"h\" = \"d.*\"\n",
        );
        let (run, seen) =
            script(&cfg, "m", |c, _| if c == 2 { Outcome::Success("c") } else { Outcome::failed(busy()) });
        assert_eq!(run.result.unwrap(), "c");
        // Depth first: f, then f's own fallback h, then g*.
        assert_eq!(seen, ["a:m", "b:f", "d:h", "c:g*"]);
        assert_eq!((run.attempts, run.target), (4, Some((2, 0))));
    }

    #[test]
    fn a_pool_cooling_down_past_retry_after_max_answers_429_with_retry_after() {
        let cfg = router("\"m\" = { targets = [\"a.x\"], retry_after_max_secs = 1 }\n");
        let limited = || {
            let mut e = Error::upstream_status(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", "slow");
            e.retry_after = Some(Duration::from_secs(7));
            Outcome::failed(e)
        };
        let (run, seen) = script(&cfg, "m", |_, _| limited());
        let e = run.result.unwrap_err();
        assert_eq!((e.status.as_u16(), seen.len()), (429, 1));
        assert!(e.retry_after.unwrap() > Duration::from_secs(6));
        // The next request does not reach the upstream at all.
        let (run, seen) = script(&cfg, "m", |_, _| limited());
        assert_eq!((run.result.unwrap_err().status.as_u16(), seen.len()), (429, 0));
    }

    #[test]
    fn a_short_retry_after_is_waited_out_on_the_same_target() {
        let cfg = router("\"m\" = { targets = [\"a.x\"], retry_after_max_secs = 2 }\n");
        let n = RefCell::new(0);
        let started = Instant::now();
        let (run, seen) = script(&cfg, "m", |_, _| {
            *n.borrow_mut() += 1;
            if *n.borrow() == 1 {
                let mut e = busy();
                e.retry_after = Some(Duration::from_millis(200));
                Outcome::failed(e)
            } else {
                Outcome::Success("later")
            }
        });
        assert_eq!((run.result.unwrap(), seen.len()), ("later", 2));
        assert!(started.elapsed() >= Duration::from_millis(200));
    }
}
