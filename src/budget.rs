//! The memory budget for request bodies: bytes held across every request in flight, bounded by
//! `[server] max_buffered_request_mb`.
//!
//! `max_request_bytes` bounds one body; this bounds them all together, so many large concurrent
//! requests (embedding batches, long prompts) cannot exhaust memory. A body takes its bytes from
//! the budget frame by frame as they arrive and gives them back when the request is done with
//! it. A request that finds no room waits for some, within its body timeout, then gets 503 with
//! `Retry-After`.
//!
//! The fast path is one compare-and-swap to take and one `fetch_sub` to give back; the lock
//! inside [`Notify`] is touched only while somebody waits.

use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::sync::Notify;
use tokio::time::Instant;

/// Request-body bytes held, across all requests.
#[derive(Default)]
pub struct Budget {
    used: AtomicUsize,
    waiting: AtomicUsize,
    freed: Notify,
}

/// Bytes taken from a [`Budget`]; given back when dropped.
pub struct Held<'a> {
    budget: &'a Budget,
    bytes: usize,
}

impl Budget {
    /// Bytes held now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// Nothing held yet: grow it with [`Held::take`].
    pub fn none(&self) -> Held<'_> {
        Held { budget: self, bytes: 0 }
    }

    fn try_take(&self, n: usize, limit: usize) -> bool {
        let mut used = self.used.load(Ordering::Relaxed);
        loop {
            let Some(next) = used.checked_add(n).filter(|&next| next <= limit) else { return false };
            match self.used.compare_exchange_weak(used, next, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => return true,
                Err(now) => used = now,
            }
        }
    }

    fn give(&self, n: usize) {
        if n == 0 {
            return;
        }
        self.used.fetch_sub(n, Ordering::AcqRel);
        if self.waiting.load(Ordering::Acquire) > 0 {
            self.freed.notify_waiters();
        }
    }
}

impl Held<'_> {
    /// Takes `n` more bytes, waiting until `deadline` for room under `limit`. `false` when there
    /// was none in time (what is already held stays held until dropped).
    pub async fn take(&mut self, n: usize, limit: usize, deadline: Instant) -> bool {
        let budget = self.budget;
        if !budget.try_take(n, limit) {
            budget.waiting.fetch_add(1, Ordering::AcqRel);
            let got = tokio::time::timeout_at(deadline, async {
                loop {
                    let freed = budget.freed.notified();
                    tokio::pin!(freed);
                    // Registered before the re-check, so a release in between is not missed.
                    freed.as_mut().enable();
                    if budget.try_take(n, limit) {
                        return;
                    }
                    freed.await;
                }
            })
            .await
            .is_ok();
            budget.waiting.fetch_sub(1, Ordering::AcqRel);
            if !got {
                return false;
            }
        }
        self.bytes += n;
        true
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.budget.give(self.bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn takes_within_the_limit_waits_for_room_and_gives_back_on_drop() {
        let budget = Budget::default();
        let soon = || Instant::now() + Duration::from_millis(50);
        let mut a = budget.none();
        assert!(a.take(600, 1000, soon()).await);
        let mut b = budget.none();
        assert!(!b.take(500, 1000, soon()).await, "over the limit, nothing freed: no room in time");
        assert_eq!(budget.used(), 600);
        assert!(b.take(400, 1000, soon()).await, "exactly the limit fits");
        drop(b);
        assert_eq!(budget.used(), 600);

        // A waiter gets the room freed while it waits.
        let mut c = budget.none();
        let later = Instant::now() + Duration::from_secs(5);
        let (took, ()) = tokio::join!(c.take(900, 1000, later), async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            drop(a);
        });
        assert!(took);
        assert_eq!(budget.used(), 900);
        drop(c);
        assert_eq!(budget.used(), 0);
    }
}
