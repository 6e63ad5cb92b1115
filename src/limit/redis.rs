//! The Redis backend: one Lua script per admission (every limit of the request checked, then all
//! committed, on Redis's clock), one per settlement, and lease renewal for requests in flight.
//!
//! Keys, all under `lmgate:` and all expiring on their own:
//! - `lmgate:SCOPE` (hash): `r` and `t`, the GCRA arrival times of requests and tokens (µs);
//! - `lmgate:SCOPE:leases` (sorted set): concurrency leases, scored by their expiry (µs);
//! - `lmgate:SCOPE:spend:PERIOD` (float): USD spent in a budget period, reservations included.

use super::{Admission, Ask, Denied, Inner, Quota, Scope, LEASE_TTL};
use redis::aio::ConnectionManager;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex, OnceLock, Weak};
use std::time::{Duration, SystemTime};

const ADMIT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local W = 60000000
local n, lease, ttl = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
local new = {}
local wait, at = -1, 0
for i = 1, n do
  local a = 4 + (i - 1) * 7
  local rpm, tpm, maxc, budget = tonumber(ARGV[a]), tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
  local tokens, cost = tonumber(ARGV[a + 4]), tonumber(ARGV[a + 5])
  local rate, leases, spend = KEYS[3 * i - 2], KEYS[3 * i - 1], KEYS[3 * i]
  local r, tk = -1, -1
  if rpm > 0 then
    r = math.max(tonumber(redis.call('HGET', rate, 'r') or 0), now) + W / rpm
    if r - now > W * (1 + 1e-6) and r - now - W > wait then wait, at = r - now - W, i end
  end
  if tpm > 0 then
    tk = math.max(tonumber(redis.call('HGET', rate, 't') or 0), now) + tokens * W / tpm
    if tk - now > W * (1 + 1e-6) and tk - now - W > wait then wait, at = tk - now - W, i end
  end
  if maxc > 0 then
    redis.call('ZREMRANGEBYSCORE', leases, '-inf', now)
    if redis.call('ZCARD', leases) >= maxc and 1000000 > wait then wait, at = 1000000, i end
  end
  if budget > 0 then
    local spent = tonumber(redis.call('GET', spend) or 0)
    if spent + cost > budget then return {2, i} end
  end
  new[i] = {r, tk}
end
if at > 0 then
  local rate = KEYS[3 * at - 2]
  local r, tk = tonumber(redis.call('HGET', rate, 'r') or 0), tonumber(redis.call('HGET', rate, 't') or 0)
  return {0, math.floor(wait), at, math.floor(r - now), math.floor(tk - now)}
end
local out = {1}
for i = 1, n do
  local a = 4 + (i - 1) * 7
  local rate, leases, spend = KEYS[3 * i - 2], KEYS[3 * i - 1], KEYS[3 * i]
  local r, tk = new[i][1], new[i][2]
  if r >= 0 then redis.call('HSET', rate, 'r', string.format('%.17g', r)) end
  if tk >= 0 then redis.call('HSET', rate, 't', string.format('%.17g', tk)) end
  if r >= 0 or tk >= 0 then
    redis.call('PEXPIRE', rate, math.ceil((math.max(r, tk) - now) / 1000) + 60000)
  end
  if tonumber(ARGV[a + 2]) > 0 then
    redis.call('ZADD', leases, now + ttl * 1000, lease)
    redis.call('PEXPIRE', leases, ttl * 2)
  end
  if tonumber(ARGV[a + 3]) > 0 then
    redis.call('INCRBYFLOAT', spend, ARGV[a + 5])
    redis.call('EXPIRE', spend, ARGV[a + 6])
  end
  out[#out + 1] = r >= 0 and math.floor(r - now) or -1
  out[#out + 1] = tk >= 0 and math.floor(tk - now) or -1
end
return out
";

const SETTLE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local n, lease = tonumber(ARGV[1]), ARGV[2]
for i = 1, n do
  local a = 3 + (i - 1) * 4
  local tpm, dt, dc = tonumber(ARGV[a]), tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  local rate = KEYS[3 * i - 2]
  if tpm > 0 and dt ~= 0 then
    local tat = tonumber(redis.call('HGET', rate, 't') or 0)
    if tat > now or dt > 0 then
      local v = math.max(tat, now - 60000000) + dt * 60000000 / tpm
      redis.call('HSET', rate, 't', string.format('%.17g', v))
      redis.call('PEXPIRE', rate, math.ceil(math.max(v - now, 0) / 1000) + 60000)
    end
  end
  if dc ~= 0 and redis.call('EXISTS', KEYS[3 * i]) == 1 then
    redis.call('INCRBYFLOAT', KEYS[3 * i], ARGV[a + 2])
  end
  if ARGV[a + 3] == '1' then redis.call('ZREM', KEYS[3 * i - 1], lease) end
end
return 1
";

const RENEW: &str = r"
local t = redis.call('TIME')
local expiry = tonumber(t[1]) * 1000000 + tonumber(t[2]) + tonumber(ARGV[1]) * 1000
for i = 1, #KEYS do
  redis.call('ZADD', KEYS[i], 'XX', expiry, ARGV[i + 1])
  redis.call('PEXPIRE', KEYS[i], tonumber(ARGV[1]) * 2)
end
return 1
";

// The scripts, hashed once per process (an invocation borrows its script). Redis runs them by
// hash (EVALSHA), loading one the first time it is missing.
static ADMIT_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(ADMIT));
static SETTLE_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(SETTLE));
static RENEW_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(RENEW));

/// How many times a settlement is tried before it is given up (its lease then expires alone).
const SETTLE_TRIES: u32 = 3;

/// A connection to Redis (connected on first use, reconnected when lost) and the leases this
/// replica holds.
pub struct Store {
    client: redis::Client,
    manager: OnceLock<ConnectionManager>,
    timeout: Duration,
    /// This process's lease prefix: leases of a crashed replica are never renewed.
    replica: String,
    /// Lease id → the lease sets it is in.
    held: Mutex<HashMap<u64, Vec<String>>>,
    /// Settlements still being sent.
    pending: Arc<AtomicUsize>,
}

fn key(scope: &Scope, part: &str) -> String {
    format!("lmgate:{}{part}", scope.name)
}

fn spend_key(scope: &Scope, period: i64) -> String {
    key(scope, &format!(":spend:{period}"))
}

impl Store {
    /// A store for `url` (checked now, connected on first use).
    pub fn new(url: &str, timeout: Duration) -> Result<Store, String> {
        // The URL is not echoed: it may hold a password.
        let client = redis::Client::open(url).map_err(|e| format!("limits.redis_url: not usable: {:?}", e.kind()))?;
        Ok(Store {
            client,
            manager: OnceLock::new(),
            timeout,
            replica: format!("{:016x}", fastrand::u64(..)),
            held: Mutex::default(),
            pending: Arc::default(),
        })
    }

    fn connection(&self) -> redis::RedisResult<ConnectionManager> {
        if let Some(m) = self.manager.get() {
            return Ok(m.clone());
        }
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.timeout.max(Duration::from_millis(200))))
            .set_response_timeout(Some(self.timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(1));
        let m = ConnectionManager::new_lazy_with_config(self.client.clone(), config)?;
        Ok(self.manager.get_or_init(|| m).clone())
    }

    fn member(&self, lease: u64) -> String {
        format!("{}:{lease}", self.replica)
    }

    /// One round trip: every limit of `scopes` checked, then all committed, or none.
    pub async fn admit(
        &self,
        scopes: &[Arc<Scope>],
        ask: Ask,
        lease: Option<u64>,
        now: SystemTime,
    ) -> redis::RedisResult<Result<Quota, Denied>> {
        let mut inv = ADMIT_SCRIPT.prepare_invoke();
        inv.arg(scopes.len()).arg(lease.map_or(String::new(), |l| self.member(l))).arg(LEASE_TTL.as_millis() as u64);
        for s in scopes {
            let (period, ends) = s.budget.map_or((0, None), |b| super::period(b.period, now));
            // Spend outlives its period by a day; a total budget's by 400 days of silence.
            let keep = ends.map_or(400 * 86_400, |e| e.as_secs() + 86_400);
            inv.key(key(s, "")).key(key(s, ":leases")).key(spend_key(s, period));
            let r = &s.rates;
            inv.arg(r.rpm.unwrap_or(0))
                .arg(r.tpm.unwrap_or(0))
                .arg(r.max_concurrent.unwrap_or(0))
                .arg(s.budget.map_or(0.0, |b| b.usd))
                .arg(ask.tokens)
                .arg(ask.cost)
                .arg(keep);
        }
        let mut conn = self.connection()?;
        let out: Vec<i64> = inv.invoke_async(&mut conn).await?;
        let us = |v: i64| (v >= 0).then_some(v as f64 * 1e3);
        let window = |limit: Option<u64>, ahead: Option<f64>| Some(super::window(limit?, ahead.unwrap_or(0.0)));
        Ok(match out.first() {
            Some(1) => {
                let mut quota = Quota::default();
                for (i, s) in scopes.iter().enumerate() {
                    let (r, t) = (out.get(1 + 2 * i).copied().unwrap_or(-1), out.get(2 + 2 * i).copied().unwrap_or(-1));
                    quota =
                        quota.merge(Quota { requests: window(s.rates.rpm, us(r)), tokens: window(s.rates.tpm, us(t)) });
                }
                Ok(quota)
            }
            Some(2) => {
                let s = &scopes[(out.get(1).copied().unwrap_or(1) as usize).saturating_sub(1).min(scopes.len() - 1)];
                let wait = s.budget.and_then(|b| super::period(b.period, now).1);
                Err(Denied::Budget { scope: s.name.clone(), wait })
            }
            _ => {
                let at = (out.get(2).copied().unwrap_or(1) as usize).saturating_sub(1).min(scopes.len() - 1);
                let s = &scopes[at];
                let (r, t) = (out.get(3).copied().unwrap_or(0), out.get(4).copied().unwrap_or(0));
                let quota = Quota { requests: window(s.rates.rpm, us(r)), tokens: window(s.rates.tpm, us(t)) };
                let wait = Duration::from_micros(out.get(1).copied().unwrap_or(1_000_000).max(0) as u64);
                Err(Denied::Limited { scope: s.name.clone(), wait, quota })
            }
        })
    }

    /// Notes a lease this replica now holds, so it is renewed until released.
    pub fn hold(&self, lease: u64, scopes: &[Arc<Scope>]) {
        let sets = scopes.iter().filter(|s| s.rates.max_concurrent.is_some()).map(|s| key(s, ":leases")).collect();
        self.held.lock().unwrap_or_else(|e| e.into_inner()).insert(lease, sets);
    }

    /// Stops renewing a lease (its settlement removes it).
    pub fn release(&self, lease: u64) {
        self.held.lock().unwrap_or_else(|e| e.into_inner()).remove(&lease);
    }

    /// Sends a settlement in the background: never on the response's path, never lost to the
    /// client going away (tried a few times; a lease left behind expires on its own).
    pub fn settle(&self, scopes: &[Arc<Scope>], ask: Ask, tokens: u64, cost: f64, period: i64, lease: Option<u64>) {
        let dt = tokens as i64 - ask.tokens as i64;
        let dc = cost - ask.cost;
        let any = scopes.iter().any(|s| {
            (s.rates.tpm.is_some() && dt != 0) || (s.budget.is_some() && dc != 0.0) || s.rates.max_concurrent.is_some()
        });
        let (Some(rt), true) = (tokio::runtime::Handle::try_current().ok(), any) else { return };
        let mut inv = SETTLE_SCRIPT.prepare_invoke();
        inv.arg(scopes.len()).arg(lease.map_or(String::new(), |l| self.member(l)));
        for s in scopes {
            inv.key(key(s, "")).key(key(s, ":leases")).key(spend_key(s, period));
            let has_lease = lease.is_some() && s.rates.max_concurrent.is_some();
            inv.arg(s.rates.tpm.unwrap_or(0))
                .arg(dt)
                .arg(if s.budget.is_some() { dc } else { 0.0 })
                .arg(if has_lease { "1" } else { "0" });
        }
        let Ok(mut conn) = self.connection() else { return };
        let (pending, timeout) = (self.pending.clone(), self.timeout);
        pending.fetch_add(1, Ordering::AcqRel);
        rt.spawn(async move {
            for attempt in 0..SETTLE_TRIES {
                let sent = tokio::time::timeout(timeout * 4, inv.invoke_async::<i64>(&mut conn)).await;
                if matches!(sent, Ok(Ok(_))) {
                    break;
                }
                if attempt + 1 == SETTLE_TRIES {
                    tracing::warn!("limits: a settlement could not reach Redis; its reservation stays counted");
                } else {
                    tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
                }
            }
            pending.fetch_sub(1, Ordering::AcqRel);
        });
    }

    /// Waits, up to `within`, for settlements still being sent.
    pub async fn flush(&self, within: Duration) {
        let until = tokio::time::Instant::now() + within;
        while self.pending.load(Ordering::Acquire) > 0 && tokio::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn renew_all(&self) {
        let leases: Vec<(String, String)> = {
            let held = self.held.lock().unwrap_or_else(|e| e.into_inner());
            held.iter().flat_map(|(id, sets)| sets.iter().map(|s| (s.clone(), self.member(*id)))).collect()
        };
        if leases.is_empty() {
            return;
        }
        let mut inv = RENEW_SCRIPT.prepare_invoke();
        inv.arg(LEASE_TTL.as_millis() as u64);
        for (set, member) in &leases {
            inv.key(set).arg(member);
        }
        let Ok(mut conn) = self.connection() else { return };
        if !matches!(tokio::time::timeout(self.timeout * 4, inv.invoke_async::<i64>(&mut conn)).await, Ok(Ok(_))) {
            tracing::warn!(leases = leases.len(), "limits: cannot renew concurrency leases in Redis");
        }
    }
}

/// Renews this replica's leases every third of their life, while the limits live.
pub fn renew_leases(inner: Weak<Inner>) {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(LEASE_TTL / 3);
        every.tick().await;
        loop {
            every.tick().await;
            let Some(inner) = inner.upgrade() else { return };
            if let Some(store) = inner.redis.as_ref() {
                store.renew_all().await;
            }
        }
    });
}

impl Admission {
    /// Test hook: the Redis lease member of this admission.
    #[cfg(test)]
    pub fn lease_member(&self) -> Option<String> {
        let store = self.limits.redis.as_ref()?;
        self.lease.map(|l| store.member(l))
    }
}
