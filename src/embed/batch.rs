//! Micro-batching: small embeddings requests that arrive together for the same upstream request
//! shape (connection, upstream model, every member but `input` and `user`, the encoding asked)
//! are sent as one upstream request.
//!
//! The first request of a batch leads it: it waits `batch_window_us` (less when the batch fills
//! up to `batch_max_inputs`), closes the batch, sends every input, and hands each caller its own
//! vectors, in its order, with its share of the usage (by estimated tokens; the shares add up to
//! the upstream's totals). A failed batch fails every caller with the error. A leader whose
//! client goes away during the window closes the batch; its followers then send their own
//! inputs alone, so nobody waits on a request that no longer exists.

use super::Part;
use crate::error::Error;
use bytes::Bytes;
use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{oneshot, Notify};

/// One connection's open batches, by request shape.
pub struct Batcher {
    window: Duration,
    max_inputs: usize,
    open: Mutex<HashMap<Vec<u8>, Arc<Batch>>>,
}

impl std::fmt::Debug for Batcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Batcher {{ window: {:?}, max_inputs: {} }}", self.window, self.max_inputs)
    }
}

struct Batch {
    state: Mutex<State>,
    /// The batch is full: the leader sends at once.
    full: Notify,
}

#[derive(Default)]
struct State {
    inputs: Vec<Bytes>,
    callers: Vec<Caller>,
    closed: bool,
}

/// One request in a batch: where its inputs start, how many, its estimated tokens, and (for a
/// follower) where its answer goes.
struct Caller {
    start: usize,
    len: usize,
    tokens: u64,
    answer: Option<oneshot::Sender<Result<Part, Error>>>,
}

/// Closes the batch when the leader is done with it, or is dropped (its client went away):
/// removed from the open batches, and followers left waiting are let go (they send alone).
struct Lead<'a> {
    batcher: &'a Batcher,
    key: &'a [u8],
    batch: Arc<Batch>,
}

impl Lead<'_> {
    fn close(&self) -> State {
        let mut open = self.batcher.open.lock().unwrap_or_else(|e| e.into_inner());
        if open.get(self.key).is_some_and(|b| Arc::ptr_eq(b, &self.batch)) {
            open.remove(self.key);
        }
        drop(open);
        let mut st = self.batch.state.lock().unwrap_or_else(|e| e.into_inner());
        st.closed = true;
        std::mem::take(&mut *st)
    }
}

impl Drop for Lead<'_> {
    fn drop(&mut self) {
        // Dropping the followers' senders wakes them.
        drop(self.close());
    }
}

impl Batcher {
    /// A batcher waiting `window` for at most `max_inputs` inputs.
    pub fn new(window: Duration, max_inputs: usize) -> Batcher {
        Batcher { window, max_inputs, open: Mutex::default() }
    }

    /// The most inputs a batch holds; larger requests are not delayed.
    pub fn max_inputs(&self) -> usize {
        self.max_inputs
    }

    /// Sends `inputs` (raw JSON, `tokens` estimated) in a batch of the shape `key`: `send`
    /// makes one upstream request of the inputs given and reads its answer. Returns this
    /// caller's part.
    pub async fn join<F, Fut>(&self, key: Vec<u8>, inputs: Vec<Bytes>, tokens: u64, send: F) -> Result<Part, Error>
    where
        F: Fn(Vec<Bytes>) -> Fut,
        Fut: Future<Output = Result<Part, Error>>,
    {
        let n = inputs.len();
        let (batch, waiting) = {
            let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
            let joined = open.get(&key).and_then(|b| {
                let mut st = b.state.lock().unwrap_or_else(|e| e.into_inner());
                if st.closed || st.inputs.len() + n > self.max_inputs {
                    return None;
                }
                let (tx, rx) = oneshot::channel();
                let start = st.inputs.len();
                st.callers.push(Caller { start, len: n, tokens, answer: Some(tx) });
                st.inputs.extend(inputs.iter().cloned());
                if st.inputs.len() == self.max_inputs {
                    b.full.notify_one();
                }
                Some((b.clone(), rx))
            });
            match joined {
                Some((b, rx)) => (b, Some(rx)),
                None => {
                    let leader = Caller { start: 0, len: n, tokens, answer: None };
                    let st = State { inputs: inputs.clone(), callers: vec![leader], closed: false };
                    let b = Arc::new(Batch { state: Mutex::new(st), full: Notify::new() });
                    open.insert(key.clone(), b.clone());
                    (b, None)
                }
            }
        };
        if let Some(rx) = waiting {
            drop(batch);
            return match rx.await {
                Ok(result) => result,
                // The leader went away before sending: alone, then.
                Err(_) => send(inputs).await,
            };
        }
        let lead = Lead { batcher: self, key: &key, batch };
        if n < self.max_inputs {
            tokio::select! {
                _ = tokio::time::sleep(self.window) => {}
                _ = lead.batch.full.notified() => {}
            }
        }
        let st = lead.close();
        drop(lead);
        let mut callers = st.callers;
        match send(st.inputs).await {
            Err(e) => {
                for c in &mut callers {
                    if let Some(tx) = c.answer.take() {
                        let _ = tx.send(Err(e.clone()));
                    }
                }
                Err(e)
            }
            Ok(all) => {
                let estimated: u64 = callers.iter().map(|c| c.tokens).sum::<u64>().max(1);
                let share = |total: u64, t: u64| ((total as u128 * t as u128) / estimated as u128) as u64;
                // The leader's share takes the rounding remainder, so the shares add up.
                let (mut prompt_rest, mut total_rest) = (all.prompt, all.total);
                for c in &callers[1..] {
                    prompt_rest -= share(all.prompt, c.tokens);
                    total_rest -= share(all.total, c.tokens);
                }
                let mut mine = None;
                for (i, c) in callers.into_iter().enumerate() {
                    let (prompt, total) = match i {
                        0 => (prompt_rest, total_rest),
                        _ => (share(all.prompt, c.tokens), share(all.total, c.tokens)),
                    };
                    let part = Part {
                        body: all.body.clone(),
                        vectors: all.vectors[c.start..c.start + c.len].to_vec(),
                        model: all.model.clone(),
                        prompt,
                        total,
                    };
                    match c.answer {
                        Some(tx) => {
                            let _ = tx.send(Ok(part));
                        }
                        None => mine = Some(part),
                    }
                }
                Ok(mine.expect("the leader is the first caller"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake upstream: one vector (the input's own bytes) per input, 2 tokens each; counts calls.
    fn answer(inputs: &[Bytes]) -> Part {
        let mut body = Vec::new();
        let mut vectors = Vec::new();
        for i in inputs {
            let start = body.len();
            body.extend_from_slice(i);
            vectors.push(start..body.len());
        }
        let n = inputs.len() as u64;
        Part { body: body.into(), vectors, model: None, prompt: 2 * n, total: 2 * n }
    }

    #[tokio::test]
    async fn followers_of_a_leader_that_goes_away_send_alone() {
        let batcher = Arc::new(Batcher::new(Duration::from_secs(30), 10));
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let send = |calls: Arc<std::sync::atomic::AtomicUsize>| {
            move |all: Vec<Bytes>| {
                calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let p = answer(&all);
                async move { Ok::<_, Error>(p) }
            }
        };
        let leader = tokio::spawn({
            let (b, c) = (batcher.clone(), calls.clone());
            async move { b.join(b"k".to_vec(), vec![Bytes::from_static(b"L")], 1, send(c)).await.map(|_| ()) }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        let follower = tokio::spawn({
            let (b, c) = (batcher.clone(), calls.clone());
            async move { b.join(b"k".to_vec(), vec![Bytes::from_static(b"F")], 1, send(c)).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        leader.abort();
        let part = tokio::time::timeout(Duration::from_secs(5), follower).await.unwrap().unwrap().unwrap();
        assert_eq!(&part.body[part.vectors[0].clone()], b"F");
        assert_eq!(calls.load(std::sync::atomic::Ordering::Relaxed), 1, "the follower alone");
        // The batch was closed: a new request leads a new one (and a full one goes at once).
        let full = batcher.join(
            b"k".to_vec(),
            (0..10).map(|i| Bytes::from(vec![b'0' + i])).collect(),
            10,
            send(calls.clone()),
        );
        let part = tokio::time::timeout(Duration::from_secs(5), full).await.unwrap().unwrap();
        assert_eq!((part.vectors.len(), part.prompt), (10, 20));
    }

    #[tokio::test]
    async fn usage_shares_follow_the_estimates_and_add_up() {
        let batcher = Arc::new(Batcher::new(Duration::from_millis(100), 10));
        let send = |all: Vec<Bytes>| {
            let mut p = answer(&all);
            (p.prompt, p.total) = (7, 7);
            async move { Ok::<_, Error>(p) }
        };
        let (b1, b2) = (batcher.clone(), batcher.clone());
        let (a, b) = tokio::join!(
            async move { b1.join(b"k".to_vec(), vec![Bytes::from_static(b"a")], 1, send).await.unwrap() },
            async move {
                tokio::time::sleep(Duration::from_millis(10)).await;
                b2.join(b"k".to_vec(), vec![Bytes::from_static(b"b"), Bytes::from_static(b"c")], 2, send).await.unwrap()
            }
        );
        assert_eq!((a.vectors.len(), b.vectors.len()), (1, 2));
        assert_eq!((a.prompt, b.prompt), (3, 4), "2/3 of 7 rounds down to 4; the leader takes the rest");
        assert_eq!(&b.body[b.vectors[1].clone()], b"c");
    }
}
