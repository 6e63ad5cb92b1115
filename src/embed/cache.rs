//! The per-input embeddings cache: vectors stored once, as little-endian f32 bytes, served in
//! either encoding; bounded in bytes (least recently used out first) and in age.
//!
//! Keys are 128-bit hashes, keyed with random keys drawn at start (two SipHash-1-3 runs with
//! independent keys), of everything that can change a vector: the connection, the upstream
//! model, every request member but `input`, `encoding_format` and `user` (dimensions,
//! input_type, truncate, ...: as written), and the exact input (string token or token ids). A
//! client cannot aim a collision at another's entries without the keys.
//!
//! Sixteen shards, each its own mutex: requests for unrelated inputs rarely meet on a lock, and
//! a lookup holds one only for a hash-map probe.

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, Hasher};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const SHARDS: usize = 16;
/// What an entry costs besides its vector (key, maps, bookkeeping).
const OVERHEAD: usize = 96;

/// A cache key.
pub type Key = u128;

/// The cache.
pub struct Cache {
    shards: Vec<Mutex<Shard>>,
    /// Bytes per shard.
    budget: usize,
    ttl: Duration,
    keys: (std::collections::hash_map::RandomState, std::collections::hash_map::RandomState),
    /// `max_mb` and `ttl_secs` as configured (a reload keeps an unchanged cache).
    pub settings: (usize, u64),
}

#[derive(Default)]
struct Shard {
    entries: HashMap<Key, Entry>,
    /// Use order: tick → key; the smallest tick is the least recently used.
    order: BTreeMap<u64, Key>,
    tick: u64,
    bytes: usize,
}

struct Entry {
    vector: Arc<[u8]>,
    at: Instant,
    tick: u64,
}

/// Builds keys: the parts that are the same for every input of a request first, then each input.
pub struct KeyBase {
    a: std::collections::hash_map::DefaultHasher,
    b: std::collections::hash_map::DefaultHasher,
}

impl KeyBase {
    fn write(&mut self, bytes: &[u8]) {
        // Length-prefixed: `ab` + `c` and `a` + `bc` differ.
        for h in [&mut self.a, &mut self.b] {
            h.write_usize(bytes.len());
            h.write(bytes);
        }
    }

    /// Adds a request member (raw key and value, as written).
    pub fn member(&mut self, key: &[u8], value: &[u8]) {
        self.write(key);
        self.write(value);
    }

    /// The key of one input (its JSON token, as the client wrote it).
    pub fn key(&self, input: &[u8]) -> Key {
        let (mut a, mut b) = (self.a.clone(), self.b.clone());
        a.write(input);
        b.write(input);
        (u128::from(a.finish()) << 64) | u128::from(b.finish())
    }
}

impl Cache {
    /// A cache of at most `max_mb` MiB whose entries live `ttl_secs`.
    pub fn new(max_mb: usize, ttl_secs: u64) -> Cache {
        Cache {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            budget: (max_mb << 20) / SHARDS,
            ttl: Duration::from_secs(ttl_secs),
            keys: Default::default(),
            settings: (max_mb, ttl_secs),
        }
    }

    /// The key base for a request's inputs to `connection` for upstream `model`; add the
    /// request's members that can change a vector with [`KeyBase::member`].
    pub fn base(&self, connection: &str, model: &str) -> KeyBase {
        let mut base = KeyBase { a: self.keys.0.build_hasher(), b: self.keys.1.build_hasher() };
        base.write(connection.as_bytes());
        base.write(model.as_bytes());
        base
    }

    fn shard(&self, key: Key) -> &Mutex<Shard> {
        &self.shards[(key as usize) % SHARDS]
    }

    /// The vector stored for `key`, if it is there and fresh.
    pub fn get(&self, key: Key) -> Option<Arc<[u8]>> {
        let mut s = self.shard(key).lock().unwrap_or_else(|e| e.into_inner());
        let s = &mut *s;
        let e = s.entries.get_mut(&key)?;
        if e.at.elapsed() > self.ttl {
            let (tick, len) = (e.tick, e.vector.len());
            s.entries.remove(&key);
            s.order.remove(&tick);
            s.bytes -= len + OVERHEAD;
            return None;
        }
        s.tick += 1;
        s.order.remove(&e.tick);
        e.tick = s.tick;
        s.order.insert(s.tick, key);
        Some(e.vector.clone())
    }

    /// Stores `vector` (f32 bytes) for `key`, making room by dropping the least recently used.
    /// A vector larger than a shard's budget is not stored.
    pub fn put(&self, key: Key, vector: Arc<[u8]>) {
        let cost = vector.len() + OVERHEAD;
        if cost > self.budget {
            return;
        }
        let mut s = self.shard(key).lock().unwrap_or_else(|e| e.into_inner());
        let s = &mut *s;
        if let Some(old) = s.entries.remove(&key) {
            s.order.remove(&old.tick);
            s.bytes -= old.vector.len() + OVERHEAD;
        }
        while s.bytes + cost > self.budget {
            let Some((_, oldest)) = s.order.pop_first() else { break };
            if let Some(e) = s.entries.remove(&oldest) {
                s.bytes -= e.vector.len() + OVERHEAD;
            }
        }
        s.tick += 1;
        s.order.insert(s.tick, key);
        s.entries.insert(key, Entry { vector, at: Instant::now(), tick: s.tick });
        s.bytes += cost;
    }

    /// Bytes held (vectors and bookkeeping), for tests and metrics.
    pub fn bytes(&self) -> usize {
        self.shards.iter().map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).bytes).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn least_recently_used_goes_first_and_the_budget_holds() {
        let c = Cache::new(1, 3600);
        let v: Arc<[u8]> = vec![0u8; 4096].into();
        // Keys of one shard.
        let keys: Vec<Key> = (0..2000u128).map(|i| i * SHARDS as u128).collect();
        for &k in &keys[..10] {
            c.put(k, v.clone());
        }
        assert!(c.get(keys[0]).is_some());
        for &k in &keys[10..] {
            c.put(k, v.clone());
            assert!(c.bytes() <= (1 << 20) / SHARDS);
        }
        // keys[0] was used after keys[1..10] were stored: it outlived them, until it was oldest.
        assert!(c.get(keys[1]).is_none());
        assert!(c.get(*keys.last().unwrap()).is_some());
        let big: Arc<[u8]> = vec![0u8; 1 << 20].into();
        c.put(7, big);
        assert!(c.get(7).is_none(), "larger than a shard: not stored");
    }

    #[test]
    fn entries_expire() {
        let c = Cache::new(1, 0);
        c.put(1, vec![1u8; 4].into());
        std::thread::sleep(Duration::from_millis(5));
        assert!(c.get(1).is_none());
        assert_eq!(c.bytes(), 0);
    }

    #[test]
    fn keys_depend_on_everything_that_changes_a_vector() {
        let c = Cache::new(1, 60);
        let k = |conn: &str, model: &str, members: &[(&[u8], &[u8])], input: &[u8]| {
            let mut base = c.base(conn, model);
            for (k, v) in members {
                base.member(k, v);
            }
            base.key(input)
        };
        let base = k("c", "m", &[(b"\"dimensions\"", b"8")], b"\"hi\"");
        assert_eq!(base, k("c", "m", &[(b"\"dimensions\"", b"8")], b"\"hi\""));
        for other in [
            k("d", "m", &[(b"\"dimensions\"", b"8")], b"\"hi\""),
            k("c", "n", &[(b"\"dimensions\"", b"8")], b"\"hi\""),
            k("c", "m", &[(b"\"dimensions\"", b"9")], b"\"hi\""),
            k("c", "m", &[], b"\"hi\""),
            k("c", "m", &[(b"\"dimensions\"", b"8")], b"\"ho\""),
            k("cm", "", &[(b"\"dimensions\"", b"8")], b"\"hi\""),
        ] {
            assert_ne!(base, other);
        }
        // Another process (other keys) hashes differently.
        let mut other = Cache::new(1, 60).base("c", "m");
        other.member(b"\"dimensions\"", b"8");
        assert_ne!(base, other.key(b"\"hi\""));
    }
}
