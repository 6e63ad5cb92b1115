//! The attempt loop: one client request, one or more upstream attempts.
//!
//! A route lists its targets in order. [`run`] makes one attempt per target until one succeeds,
//! or one fails in a way that no other attempt can fix (the error's [`crate::error::Retry`]
//! says `Never`: the client's fault, or a final upstream answer). When every attempt failed,
//! the client gets the last failure: the upstream's own answer when the provider relays it,
//! else the rendered error.
//!
//! An attempt's future resolves before anything has been committed to the client (the
//! response head is only sent once the loop returns), so nothing is ever retried after the first
//! byte went out. With one target (every route today) the loop runs once, at no extra cost; the
//! resilience work adds its policy here (retries on the same target after `Retry-After`,
//! cooldowns, the choice among pooled targets), not in the flow.

use crate::error::Error;
use crate::router::Target;
use std::future::Future;

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
    /// The index (in the route's targets) of the last attempt's target.
    pub target: usize,
    /// How many attempts were made.
    pub attempts: u32,
    /// The failures before the last attempt, oldest first (the record logs their kinds).
    pub failed: Vec<Error>,
}

/// Runs `attempt` on `targets` in order until one succeeds or a failure is final.
pub async fn run<'t, T, F, Fut>(targets: &'t [Target], mut attempt: F) -> Run<T>
where
    F: FnMut(&'t Target) -> Fut,
    Fut: Future<Output = Outcome<T>>,
{
    let mut failed = Vec::new();
    let mut i = 0;
    loop {
        let Some(target) = targets.get(i) else {
            // A route always has a target; an empty one is a bug, reported, not a panic.
            let e = Error::unavailable("The route has no target.");
            return Run { result: Err(e), target: 0, attempts: i as u32, failed };
        };
        let outcome = attempt(target).await;
        let attempts = i as u32 + 1;
        match outcome {
            Outcome::Success(answer) => return Run { result: Ok(answer), target: i, attempts, failed },
            Outcome::Failure { error, .. } if error.retryable() && i + 1 < targets.len() => failed.push(error),
            Outcome::Failure { error, relay } => {
                let result = relay.ok_or(error);
                return Run { result, target: i, attempts, failed };
            }
        }
        i += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Kind;
    use http::StatusCode;
    use std::cell::RefCell;

    fn targets(n: usize) -> Vec<Target> {
        (0..n).map(|c| Target::new(c, "*")).collect()
    }

    /// Runs the loop with a stub provider whose answers per connection are scripted; returns the
    /// run and the connections attempted, in order.
    fn script(n: usize, answers: Vec<Outcome<&'static str>>) -> (Run<&'static str>, Vec<usize>) {
        let ts = targets(n);
        let seen = RefCell::new(Vec::new());
        let answers = RefCell::new(answers.into_iter());
        let run = block_on(run(&ts, |t| {
            seen.borrow_mut().push(t.connection);
            let next = answers.borrow_mut().next().expect("an attempt the script did not expect");
            async move { next }
        }));
        (run, seen.into_inner())
    }

    /// Polls a future that never waits to completion.
    fn block_on<F: Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(f)
    }

    fn busy() -> Error {
        Error::upstream_status(StatusCode::SERVICE_UNAVAILABLE, "api_error", "busy")
    }

    #[test]
    fn one_target_that_answers_is_one_attempt() {
        let (run, seen) = script(1, vec![Outcome::Success("ok")]);
        assert_eq!((run.result.unwrap(), run.target, run.attempts, seen), ("ok", 0, 1, vec![0]));
        assert!(run.failed.is_empty());
    }

    #[test]
    fn a_retryable_failure_moves_on_to_the_next_target() {
        let unreachable = Error::upstream_failure(Kind::UpstreamUnreachable, "refused");
        let (run, seen) =
            script(3, vec![Outcome::failed(unreachable), Outcome::failed(busy()), Outcome::Success("third")]);
        assert_eq!((run.result.unwrap(), run.target, run.attempts, seen), ("third", 2, 3, vec![0, 1, 2]));
        let kinds: Vec<Kind> = run.failed.iter().map(|e| e.kind).collect();
        assert_eq!(kinds, [Kind::UpstreamUnreachable, Kind::UpstreamStatus]);
    }

    #[test]
    fn a_final_failure_stops_the_loop_with_targets_left() {
        let bad = Error::upstream_status(StatusCode::BAD_REQUEST, "invalid_request_error", "no");
        let (run, seen) = script(3, vec![Outcome::Failure { error: bad, relay: Some("the upstream's 400") }]);
        assert_eq!((run.result.unwrap(), run.target, run.attempts, seen), ("the upstream's 400", 0, 1, vec![0]));
        let (run, seen) = script(2, vec![Outcome::failed(Error::forbidden("no"))]);
        assert_eq!((run.result.unwrap_err().status.as_u16(), run.attempts, seen), (403, 1, vec![0]));
    }

    #[test]
    fn when_every_attempt_fails_the_client_gets_the_last_failure() {
        let (run, _) =
            script(2, vec![Outcome::failed(busy()), Outcome::Failure { error: busy(), relay: Some("relayed") }]);
        assert_eq!((run.result.unwrap(), run.target, run.attempts), ("relayed", 1, 2));
        let timeout = Error::upstream_failure(Kind::UpstreamTimeout, "slow");
        let (run, _) =
            script(2, vec![Outcome::Failure { error: busy(), relay: Some("first") }, Outcome::failed(timeout)]);
        assert_eq!(run.result.unwrap_err().kind, Kind::UpstreamTimeout);
    }

    #[test]
    fn a_route_without_targets_is_an_error_not_a_panic() {
        let (run, seen) = script(0, vec![]);
        assert_eq!((run.result.unwrap_err().status.as_u16(), run.attempts, seen.len()), (503, 0, 0));
    }
}
