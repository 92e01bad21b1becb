//! The Redis store: each limit check is one Lua script (EVALSHA, loaded on NOSCRIPT) that checks
//! and updates atomically; a request's checks are sent together on the worker's own connection
//! (the pipelined client in `resp.rs` for a single plain-TCP Redis, redis-rs for TLS and clusters).
//! Redis's own clock (TIME) is used, so every gateway instance agrees on time; only a limiter built
//! with a manual clock (tests) passes its `now` as a trailing argument instead.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use redis::aio::ConnectionManager;
use redis::cluster_async::ClusterConnection;
use redis::Script;

use super::algo::{Decision, Gcra, Window, BUCKETS};
use super::resp::{self, RespError};
use hexgate_config::Redis as RedisConfig;
use hexgate_metrics::Registry;

/// ARGV: interval_us, burst[, now_us]. `now_us` is given only by a manual clock (tests); its time
/// does not pass with Redis's, so its keys get no real-time expiry.
const GCRA_LUA: &str = r#"
pcall(redis.replicate_commands)
local now = tonumber(ARGV[3])
if now == nil then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local interval = tonumber(ARGV[1])
local limit = interval * tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]))
if tat == nil or tat < now then tat = now end
local new_tat = tat + interval
if new_tat - now > limit then
  return {0, 0, tat - now, new_tat - now - limit}
end
if ARGV[3] then
  redis.call('SET', KEYS[1], new_tat)
else
  redis.call('SET', KEYS[1], new_tat, 'PX', math.floor((new_tat - now) / 1000) + 1000)
end
return {1, math.floor((limit - (new_tat - now)) / interval), new_tat - now, 0}
"#;

/// ARGV: limit, bucket width_us, buckets[, now_us] (as for GCRA_LUA).
const WINDOW_LUA: &str = r#"
pcall(redis.replicate_commands)
local now = tonumber(ARGV[4])
if now == nil then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local limit = tonumber(ARGV[1])
local w = tonumber(ARGV[2])
local n = tonumber(ARGV[3])
local cur = math.floor(now / w)
local oldest = cur - n
local vals = redis.call('HGETALL', KEYS[1])
local total = 0
local first = nil
for i = 1, #vals, 2 do
  local idx = tonumber(vals[i])
  if idx < oldest then
    redis.call('HDEL', KEYS[1], vals[i])
  else
    total = total + tonumber(vals[i + 1])
    if first == nil or idx < first then first = idx end
  end
end
if total + 1 > limit then
  local reset = w
  if first ~= nil then reset = (first + n + 1) * w - now end
  return {0, 0, reset, reset, cur}
end
redis.call('HINCRBY', KEYS[1], cur, 1)
if not ARGV[4] then
  redis.call('PEXPIRE', KEYS[1], math.floor((n + 1) * w / 1000) + 1000)
end
if first == nil then first = cur end
return {1, limit - total - 1, (first + n + 1) * w - now, 0, cur}
"#;

/// Gives back one admission counted in bucket ARGV[1]; replies `{0}` (every limit script replies
/// with an array of integers, which is what the store reads).
const REFUND_LUA: &str = r#"
local v = tonumber(redis.call('HGET', KEYS[1], ARGV[1]))
if v ~= nil and v > 0 then redis.call('HINCRBY', KEYS[1], ARGV[1], -1) end
return {0}
"#;

#[derive(Clone)]
enum Conn {
    /// A single Redis over plain TCP: the small pipelined client in `resp.rs`.
    Fast(resp::Client),
    /// A single Redis over TLS.
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

/// A Lua script: its source (for SCRIPT LOAD) and its SHA1 (for EVALSHA).
struct Lua {
    code: &'static str,
    script: Script,
}

impl Lua {
    fn new(code: &'static str) -> Lua {
        Lua {
            code,
            script: Script::new(code),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("not connected to Redis")]
    NotConnected,
    #[error("Redis timed out after {0:?}")]
    Timeout(Duration),
    #[error("Redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("unexpected reply from the limit script")]
    Reply,
    #[error(transparent)]
    Fast(#[from] RespError),
    #[error("Redis: {0}")]
    Server(String),
}

pub struct RedisStore {
    /// One multiplexed connection per runtime (index: `upstream::worker_slot()`), so a worker's
    /// Redis calls are driven by its own thread; slot 0 (control) serves until a worker's is up.
    conns: Box<[ArcSwapOption<Conn>]>,
    /// Per slot: a reconnect is under way (the fast client does not reconnect by itself).
    reconnecting: Box<[AtomicBool]>,
    me: Weak<RedisStore>,
    cfg: RedisConfig,
    gcra: Lua,
    window: Lua,
    refund: Lua,
    pub timeout: Duration,
    metrics: Arc<Registry>,
}

use hexgate_http::httpc::percent_encode as enc;

fn url(cfg: &RedisConfig, addr: &str) -> String {
    let scheme = if cfg.tls { "rediss" } else { "redis" };
    let creds = match (&cfg.username, cfg.password.is_empty()) {
        (Some(u), false) => format!("{}:{}@", enc(u), enc(&cfg.password)),
        (Some(u), true) => format!("{}@", enc(u)),
        (None, false) => format!(":{}@", enc(&cfg.password)),
        (None, true) => String::new(),
    };
    format!("{scheme}://{creds}{addr}/{}", cfg.db)
}

impl RedisStore {
    /// Creates the store and connects in the background (retrying), so a gateway starts and
    /// serves (per failureMode) while Redis is away.
    pub fn start(cfg: &RedisConfig, metrics: Arc<Registry>) -> Arc<RedisStore> {
        let store = Arc::new_cyclic(|me| RedisStore {
            conns: (0..=hexgate_http::worker::MAX_WORKERS)
                .map(|_| ArcSwapOption::empty())
                .collect(),
            reconnecting: (0..=hexgate_http::worker::MAX_WORKERS)
                .map(|_| AtomicBool::new(true))
                .collect(),
            me: me.clone(),
            cfg: cfg.clone(),
            gcra: Lua::new(GCRA_LUA),
            window: Lua::new(WINDOW_LUA),
            refund: Lua::new(REFUND_LUA),
            timeout: cfg.timeout,
            metrics,
        });
        store.connect_slot(0);
        store
    }

    /// Opens this worker's own connection (called once inside each worker runtime).
    pub fn attach_worker(self: &Arc<Self>) {
        let slot = hexgate_http::worker::worker_slot();
        if slot > 0 {
            self.connect_slot(slot);
        }
    }

    /// Connects slot `slot` in the background on the current runtime, retrying with back-off.
    fn connect_slot(&self, slot: usize) {
        let weak = self.me.clone();
        let cfg = self.cfg.clone();
        tokio::spawn(async move {
            let mut delay = Duration::from_millis(200);
            loop {
                if weak.strong_count() == 0 {
                    return;
                }
                match connect(&cfg).await {
                    Ok(c) => {
                        if let Some(s) = weak.upgrade() {
                            s.conns[slot].store(Some(Arc::new(c)));
                            s.reconnecting[slot].store(false, Ordering::Release);
                            if slot == 0 {
                                tracing::info!("connected to Redis");
                            }
                        }
                        return;
                    }
                    Err(e) => {
                        if slot == 0 {
                            tracing::warn!(error = %e, retry_in = ?delay, "cannot connect to Redis yet");
                        }
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(5));
                    }
                }
            }
        });
    }

    /// Runs one or two scripts (`EVALSHA` each, sent together) and returns their integer replies,
    /// within the store's timeout.
    async fn eval(&self, calls: &[(&Lua, &str, &[u64])]) -> Result<Vec<Vec<i64>>, StoreError> {
        let (slot, conn) = self.conn()?;
        let started = Instant::now();
        let res = tokio::time::timeout(self.timeout, async {
            match &*conn {
                Conn::Fast(c) => self.eval_fast(c, calls).await,
                Conn::Single(c) => eval_redis_rs(c, calls).await,
                Conn::Cluster(c) => eval_redis_rs(c, calls).await,
            }
        })
        .await;
        self.metrics.redis_duration.observe(started.elapsed());
        match res {
            Err(_) => Err(StoreError::Timeout(self.timeout)),
            Ok(Err(
                e @ StoreError::Fast(RespError::Closed | RespError::Io(_) | RespError::Protocol),
            )) => {
                self.lost(slot);
                Err(e)
            }
            Ok(r) => r,
        }
    }

    async fn eval_fast(
        &self,
        c: &resp::Client,
        calls: &[(&Lua, &str, &[u64])],
    ) -> Result<Vec<Vec<i64>>, StoreError> {
        let mut bytes = Vec::with_capacity(128 * calls.len());
        for (lua, key, args) in calls {
            resp::encode_evalsha(&mut bytes, lua.script.get_hash(), key, args);
        }
        let mut replies = c.call(bytes, calls.len()).await?;
        let noscript =
            |v: &resp::Value| matches!(v, resp::Value::Error(e) if e.starts_with("NOSCRIPT"));
        let missing: Vec<usize> = (0..replies.len())
            .filter(|&i| noscript(&replies[i]))
            .collect();
        if !missing.is_empty() {
            // First use on this server (or after SCRIPT FLUSH): load the missing scripts and run
            // only those again; a script that did run has already counted this request.
            let mut again = Vec::new();
            for &i in &missing {
                let (lua, key, args) = calls[i];
                resp::encode(&mut again, &[b"SCRIPT", b"LOAD", lua.code.as_bytes()]);
                resp::encode_evalsha(&mut again, lua.script.get_hash(), key, args);
            }
            let retried = c.call(again, 2 * missing.len()).await?;
            for (n, &i) in missing.iter().enumerate() {
                if let Some(resp::Value::Error(e)) = retried.get(2 * n) {
                    return Err(StoreError::Server(e.clone()));
                }
                replies[i] = retried.get(2 * n + 1).cloned().ok_or(StoreError::Reply)?;
            }
        }
        replies
            .iter()
            .map(|v| match v {
                resp::Value::Error(e) => Err(StoreError::Server(e.clone())),
                v => resp::ints(v).ok_or(StoreError::Reply),
            })
            .collect()
    }

    /// This worker's connection, else the control runtime's; with the slot it came from.
    fn conn(&self) -> Result<(usize, Arc<Conn>), StoreError> {
        let slot = hexgate_http::worker::worker_slot();
        let (slot, conn) = match self.conns[slot].load_full() {
            Some(c) => (slot, c),
            None => (
                0,
                self.conns[0].load_full().ok_or(StoreError::NotConnected)?,
            ),
        };
        if let Conn::Fast(c) = &*conn {
            if c.is_closed() {
                self.lost(slot);
                return Err(StoreError::NotConnected);
            }
        }
        Ok((slot, conn))
    }

    /// A fast connection was lost: drop it and reconnect in the background (once).
    fn lost(&self, slot: usize) {
        if !self.reconnecting[slot].swap(true, Ordering::AcqRel) {
            self.conns[slot].store(None);
            if slot == 0 {
                tracing::warn!("lost the connection to Redis; reconnecting");
            }
            self.connect_slot(slot);
        }
    }

    /// A rate limit and a quota for one request, both EVALSHAs sent together (on a single Redis
    /// as one write with one reply read and one timeout). `now`: a manual clock's time (tests),
    /// else `None` and the scripts use Redis's.
    pub async fn rate_and_quota(
        &self,
        rate: (&str, &Gcra),
        quota: (&str, &Window),
        now: Option<u64>,
    ) -> (Result<Decision, StoreError>, Result<Decision, StoreError>) {
        let (rk, g) = rate;
        let (qk, w) = quota;
        let (rate_args, rn) = with_now([g.interval_us, g.burst, 0], now);
        let (quota_args, qn) = with_now([w.limit, w.width_us(), BUCKETS, 0], now);
        match self
            .eval(&[
                (&self.gcra, rk, &rate_args[..rn]),
                (&self.window, qk, &quota_args[..qn]),
            ])
            .await
        {
            Ok(v) if v.len() == 2 => (decision(&v[0]), quota_decision(&v[1])),
            Ok(_) => (Err(StoreError::Reply), Err(StoreError::Reply)),
            Err(e) => {
                let again = StoreError::Server(e.to_string());
                (Err(e), Err(again))
            }
        }
    }

    pub async fn rate(
        &self,
        key: &str,
        g: &Gcra,
        now: Option<u64>,
    ) -> Result<Decision, StoreError> {
        let (args, n) = with_now([g.interval_us, g.burst, 0], now);
        let v = self.eval(&[(&self.gcra, key, &args[..n])]).await?;
        decision(v.first().ok_or(StoreError::Reply)?)
    }

    pub async fn quota(
        &self,
        key: &str,
        w: &Window,
        now: Option<u64>,
    ) -> Result<Decision, StoreError> {
        let (args, n) = with_now([w.limit, w.width_us(), BUCKETS, 0], now);
        let v = self.eval(&[(&self.window, key, &args[..n])]).await?;
        quota_decision(v.first().ok_or(StoreError::Reply)?)
    }

    pub async fn refund(&self, key: &str, bucket: u64) -> Result<(), StoreError> {
        self.eval(&[(&self.refund, key, &[bucket])])
            .await
            .map(|_| ())
    }
}

/// Script arguments whose last slot is the optional `now`: the array and how many to send.
fn with_now<const N: usize>(mut args: [u64; N], now: Option<u64>) -> ([u64; N], usize) {
    match now {
        Some(t) => {
            args[N - 1] = t;
            (args, N)
        }
        None => (args, N - 1),
    }
}

/// The scripts through redis-rs (TLS, cluster): one `invoke_async` each (it loads a missing
/// script and retries just that one), sent together on the multiplexed connection; on a cluster
/// the keys of a rate limit and a quota may live on different nodes.
async fn eval_redis_rs<C: redis::aio::ConnectionLike + Clone>(
    c: &C,
    calls: &[(&Lua, &str, &[u64])],
) -> Result<Vec<Vec<i64>>, StoreError> {
    let futs = calls.iter().map(|(lua, key, args)| {
        let mut c = c.clone();
        let mut inv = lua.script.key(*key);
        for a in *args {
            inv.arg(*a);
        }
        async move { inv.invoke_async::<Vec<i64>>(&mut c).await }
    });
    let mut out = Vec::with_capacity(calls.len());
    for r in futures_util::future::join_all(futs).await {
        out.push(r?);
    }
    Ok(out)
}

/// The window script's reply: a decision plus the bucket a granted request was counted in.
fn quota_decision(v: &[i64]) -> Result<Decision, StoreError> {
    let bucket = *v.get(4).ok_or(StoreError::Reply)?;
    let mut d = decision(v)?;
    d.bucket = d.allowed.then_some(bucket.max(0) as u64);
    Ok(d)
}

/// A script's reply `{allowed, remaining, reset_us, retry_after_us, ...}` as a decision.
fn decision(v: &[i64]) -> Result<Decision, StoreError> {
    let [allowed, remaining, reset, retry, ..] = v[..] else {
        return Err(StoreError::Reply);
    };
    Ok(Decision {
        allowed: allowed == 1,
        remaining: remaining.max(0) as u64,
        reset_us: reset.max(0) as u64,
        retry_after_us: retry.max(0) as u64,
        bucket: None,
    })
}

async fn connect(cfg: &RedisConfig) -> Result<Conn, redis::RedisError> {
    if !cfg.cluster.is_empty() {
        let nodes: Vec<String> = cfg.cluster.iter().map(|a| url(cfg, a)).collect();
        let client = redis::cluster::ClusterClient::new(nodes)?;
        let conn = tokio::time::timeout(Duration::from_secs(5), client.get_async_connection())
            .await
            .map_err(|_| {
                redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut))
            })??;
        return Ok(Conn::Cluster(conn));
    }
    let addr = cfg.address.as_deref().unwrap_or("127.0.0.1:6379");
    if !cfg.tls {
        let target = resp::Target {
            addr,
            username: cfg.username.as_deref(),
            password: &cfg.password,
            db: cfg.db,
        };
        return resp::Client::connect(&target, Duration::from_secs(2))
            .await
            .map(Conn::Fast)
            .map_err(|e| redis::RedisError::from(std::io::Error::other(e.to_string())));
    }
    let client = redis::Client::open(url(cfg, addr))?;
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_min_delay(Duration::from_millis(100))
        .set_max_delay(Duration::from_secs(2));
    let conn = ConnectionManager::new_with_config(client, config).await?;
    Ok(Conn::Single(conn))
}
