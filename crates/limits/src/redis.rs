//! The Redis store: each limit check is one Lua script (EVALSHA, loaded on NOSCRIPT) that checks
//! and updates atomically; a request's checks are sent together on the worker's own connection
//! (the pipelined client in `pipelined.rs` for a single Redis, plain or TLS; redis-rs for clusters).
//! Redis's own clock (TIME) is used, so every gateway instance agrees on time; only a limiter built
//! with a manual clock (tests) passes its `now` as a trailing argument instead.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use redis::cluster_async::ClusterConnection;
use redis::Script;
use tokio_rustls::rustls::ClientConfig;

use super::algo::{Decision, Gcra, Usage, Window, BUCKETS};
use super::pipelined::{self, PipelinedError};
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
if tat > now + limit then tat = now + limit - interval end
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

/// The part of the window scripts that reads a quota hash. Its fields: bucket indexes (requests
/// counted in the bucket), `c` and an index (credits the ledger gave in that bucket), and `t`
/// (the tag of the last check: a plan's, for the ledger). ARGV: limit, bucket width_us, buckets,
/// tag[, now_us] (as for GCRA_LUA). Sets `now`, `w`, `n`, `cur`, `used`, `credit`, `total`
/// (`used - credit`) and `first` (the oldest bucket counting requests, or nil); drops expired
/// buckets; `keep()` sets the key's expiry.
macro_rules! window_read {
    () => {
        r#"
pcall(redis.replicate_commands)
local now = tonumber(ARGV[5])
if now == nil then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local w = tonumber(ARGV[2])
local n = tonumber(ARGV[3])
local cur = math.floor(now / w)
local oldest = cur - n
local vals = redis.call('HGETALL', KEYS[1])
local used = 0
local credit = 0
local first = nil
local tag = 0
for i = 1, #vals, 2 do
  local f = vals[i]
  local idx = tonumber(f)
  if idx ~= nil then
    if idx < oldest then
      redis.call('HDEL', KEYS[1], f)
    else
      used = used + tonumber(vals[i + 1])
      if first == nil or idx < first then first = idx end
    end
  elseif f == 't' then
    tag = tonumber(vals[i + 1]) or 0
  elseif string.sub(f, 1, 1) == 'c' and tonumber(string.sub(f, 2)) ~= nil then
    if tonumber(string.sub(f, 2)) < oldest then
      redis.call('HDEL', KEYS[1], f)
    else
      credit = credit + tonumber(vals[i + 1])
    end
  end
end
local total = used - credit
local function keep()
  if not ARGV[5] then
    redis.call('PEXPIRE', KEYS[1], math.floor((n + 1) * w / 1000) + 1000)
  end
end
local function leaves()
  if first == nil then return 0 end
  return (first + n + 1) * w - now
end
"#
    };
}

/// Charges one request when it fits (ARGV as for `window_read!`).
const WINDOW_LUA: &str = concat!(
    window_read!(),
    r#"
local limit = tonumber(ARGV[1])
if ARGV[4] ~= '0' then redis.call('HSET', KEYS[1], 't', ARGV[4]); keep() end
if total + 1 > limit then
  local reset = w
  if first ~= nil then reset = (first + n + 1) * w - now end
  return {0, 0, reset, reset, cur}
end
redis.call('HINCRBY', KEYS[1], cur, 1)
keep()
if first == nil then first = cur end
return {1, limit - total - 1, (first + n + 1) * w - now, 0, cur}
"#
);

/// The ledger's read (ARGV as for `window_read!`, limit and tag unused): `{used, credit,
/// microseconds until the oldest counted bucket leaves, tag}`.
const PEEK_LUA: &str = concat!(
    window_read!(),
    r#"
return {used, credit, leaves(), tag}
"#
);

/// The ledger's credit (ARGV as for `window_read!`; ARGV[1] the amount, ARGV[4] the most credit
/// the window may hold): a credit in the current bucket, so `amount` more requests fit until it
/// leaves the window. Replies `{given (1 or 0), used, credit, leaves, tag}`, the window after.
const CREDIT_LUA: &str = concat!(
    window_read!(),
    r#"
local amount = tonumber(ARGV[1])
if credit + amount > tonumber(ARGV[4]) then
  return {0, used, credit, leaves(), tag}
end
redis.call('HINCRBY', KEYS[1], 'c' .. cur, amount)
keep()
return {1, used, credit + amount, leaves(), tag}
"#
);

/// The ledger's reset: the counter is deleted. Replies `{deleted}`.
const RESET_LUA: &str = r#"
return {redis.call('DEL', KEYS[1])}
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
    /// A single Redis, plain TCP or TLS: the small pipelined client in `pipelined.rs`.
    Pipelined(pipelined::Client),
    /// A Redis Cluster (plain TCP only: the workspace builds redis-rs without its TLS features).
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
    Pipelined(#[from] PipelinedError),
    #[error("Redis: {0}")]
    Server(String),
}

pub struct RedisStore {
    /// One multiplexed connection per runtime (index: `upstream::worker_slot()`), so a worker's
    /// Redis calls are driven by its own thread; slot 0 (control) serves until a worker's is up.
    conns: Box<[ArcSwapOption<Conn>]>,
    /// Per slot: a reconnect is under way (the pipelined client does not reconnect by itself).
    reconnecting: Box<[AtomicBool]>,
    me: Weak<RedisStore>,
    cfg: RedisConfig,
    /// With `tls`: the client config (system roots), built once; an error is reported by every
    /// connection attempt.
    tls: Result<Option<Arc<ClientConfig>>, String>,
    gcra: Lua,
    window: Lua,
    refund: Lua,
    peek: Lua,
    credit: Lua,
    reset: Lua,
    pub timeout: Duration,
    metrics: Arc<Registry>,
}

use hexgate_http::httpc::percent_encode as enc;

/// A cluster seed's redis-rs URL (plain TCP: see `connect`).
fn url(cfg: &RedisConfig, addr: &str) -> String {
    let creds = match (&cfg.username, cfg.password.is_empty()) {
        (Some(u), false) => format!("{}:{}@", enc(u), enc(&cfg.password)),
        (Some(u), true) => format!("{}@", enc(u)),
        (None, false) => format!(":{}@", enc(&cfg.password)),
        (None, true) => String::new(),
    };
    format!("redis://{creds}{addr}/{}", cfg.db)
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
            tls: tls_config(cfg),
            gcra: Lua::new(GCRA_LUA),
            window: Lua::new(WINDOW_LUA),
            refund: Lua::new(REFUND_LUA),
            peek: Lua::new(PEEK_LUA),
            credit: Lua::new(CREDIT_LUA),
            reset: Lua::new(RESET_LUA),
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
        let tls = self.tls.clone();
        tokio::spawn(async move {
            let mut delay = Duration::from_millis(200);
            loop {
                if weak.strong_count() == 0 {
                    return;
                }
                match connect(&cfg, &tls).await {
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

    /// Runs scripts (`EVALSHA` each, sent together) and returns each one's integer reply or
    /// error, within the store's timeout. Err: none is known to have run (the connection failed
    /// or the time ran out; a script may then have run without its reply being read).
    async fn eval(&self, calls: &[(&Lua, &str, &[u64])]) -> Result<Vec<Replied>, StoreError> {
        let (slot, conn) = self.conn()?;
        let started = Instant::now();
        let res = tokio::time::timeout(self.timeout, async {
            match &*conn {
                Conn::Pipelined(c) => self.eval_pipelined(c, calls).await,
                Conn::Cluster(c) => eval_redis_rs(c, calls).await,
            }
        })
        .await;
        self.metrics.redis_duration.observe(started.elapsed());
        match res {
            Err(_) => Err(StoreError::Timeout(self.timeout)),
            Ok(Err(
                e @ StoreError::Pipelined(
                    PipelinedError::Closed | PipelinedError::Io(_) | PipelinedError::Protocol,
                ),
            )) => {
                self.lost(slot);
                Err(e)
            }
            Ok(r) => r,
        }
    }

    async fn eval_pipelined(
        &self,
        c: &pipelined::Client,
        calls: &[(&Lua, &str, &[u64])],
    ) -> Result<Vec<Replied>, StoreError> {
        let mut bytes = Vec::with_capacity(128 * calls.len());
        for (lua, key, args) in calls {
            pipelined::encode_evalsha(&mut bytes, lua.script.get_hash(), key, args);
        }
        let mut replies = c.call(bytes, calls.len()).await?;
        let noscript = |v: &pipelined::Value| matches!(v, pipelined::Value::Error(e) if e.starts_with("NOSCRIPT"));
        let missing: Vec<usize> = (0..replies.len())
            .filter(|&i| noscript(&replies[i]))
            .collect();
        if !missing.is_empty() {
            // First use on this server (or after SCRIPT FLUSH): load the missing scripts and run
            // only those again; a script that did run has already counted this request.
            let mut again = Vec::new();
            for &i in &missing {
                let (lua, key, args) = calls[i];
                pipelined::encode(&mut again, &[b"SCRIPT", b"LOAD", lua.code.as_bytes()]);
                pipelined::encode_evalsha(&mut again, lua.script.get_hash(), key, args);
            }
            let retried = c.call(again, 2 * missing.len()).await?;
            for (n, &i) in missing.iter().enumerate() {
                replies[i] = match (retried.get(2 * n), retried.get(2 * n + 1)) {
                    (Some(pipelined::Value::Error(e)), _) => pipelined::Value::Error(e.clone()),
                    (_, Some(v)) => v.clone(),
                    _ => return Err(StoreError::Reply),
                };
            }
        }
        if replies.len() != calls.len() {
            return Err(StoreError::Reply);
        }
        Ok(replies
            .iter()
            .map(|v| match v {
                pipelined::Value::Error(e) => Err(StoreError::Server(e.clone())),
                v => pipelined::ints(v).ok_or(StoreError::Reply),
            })
            .collect())
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
        if let Conn::Pipelined(c) = &*conn {
            if c.is_closed() {
                self.lost(slot);
                return Err(StoreError::NotConnected);
            }
        }
        Ok((slot, conn))
    }

    /// A pipelined connection was lost: drop it and reconnect in the background (once).
    fn lost(&self, slot: usize) {
        if !self.reconnecting[slot].swap(true, Ordering::AcqRel) {
            self.conns[slot].store(None);
            if slot == 0 {
                tracing::warn!("lost the connection to Redis; reconnecting");
            }
            self.connect_slot(slot);
        }
    }

    /// The limits of one request, their EVALSHAs sent together (on a single Redis as one write
    /// with one reply read and one timeout); a decision per call, in order. `now`: a manual
    /// clock's time (tests), else `None` and the scripts use Redis's.
    pub async fn batch(
        &self,
        calls: &[Call<'_>],
        now: Option<u64>,
    ) -> Vec<Result<Decision, StoreError>> {
        let args: Vec<([u64; 5], usize)> = calls
            .iter()
            .map(|c| match c {
                Call::Rate(_, g) => {
                    let (a, n) = with_now([g.interval_us, g.burst, 0], now);
                    ([a[0], a[1], a[2], 0, 0], n)
                }
                Call::Quota(_, w, tag) => with_now([w.limit, w.width_us(), BUCKETS, *tag, 0], now),
            })
            .collect();
        let evals: Vec<(&Lua, &str, &[u64])> = calls
            .iter()
            .zip(&args)
            .map(|(c, (a, n))| match c {
                Call::Rate(k, _) => (&self.gcra, *k, &a[..*n]),
                Call::Quota(k, _, _) => (&self.window, *k, &a[..*n]),
            })
            .collect();
        match self.eval(&evals).await {
            Ok(replies) => calls
                .iter()
                .zip(replies)
                .map(|(c, r)| match c {
                    Call::Rate(..) => r.and_then(|v| decision(&v)),
                    Call::Quota(..) => r.and_then(|v| quota_decision(&v)),
                })
                .collect(),
            Err(e) => {
                let text = e.to_string();
                let mut out = vec![Err(e)];
                out.extend((1..calls.len()).map(|_| Err(StoreError::Server(text.clone()))));
                out
            }
        }
    }

    /// One script's reply.
    async fn eval_one(&self, lua: &Lua, key: &str, args: &[u64]) -> Result<Vec<i64>, StoreError> {
        self.eval(&[(lua, key, args)])
            .await?
            .pop()
            .ok_or(StoreError::Reply)?
    }

    /// The ledger's read of the quota `key`: what its window holds, microseconds until its
    /// oldest counted bucket leaves the window, and its tag.
    pub async fn quota_peek(
        &self,
        key: &str,
        w: &Window,
        now: Option<u64>,
    ) -> Result<(Usage, u64, u64), StoreError> {
        let (args, n) = with_now([0, w.width_us(), BUCKETS, 0, 0], now);
        match self.eval_one(&self.peek, key, &args[..n]).await?[..] {
            [used, credit, leaves, tag, ..] => {
                Ok((usage(used, credit), leaves.max(0) as u64, tag.max(0) as u64))
            }
            _ => Err(StoreError::Reply),
        }
    }

    /// The ledger's credit: `amount` more requests in the current window of `key`, unless its
    /// credits would exceed `cap`. Whether it was given, and the window after.
    pub async fn quota_credit(
        &self,
        key: &str,
        w: &Window,
        amount: u64,
        cap: u64,
        now: Option<u64>,
    ) -> Result<(bool, Usage, u64, u64), StoreError> {
        let (args, n) = with_now([amount, w.width_us(), BUCKETS, cap, 0], now);
        match self.eval_one(&self.credit, key, &args[..n]).await?[..] {
            [given, used, credit, leaves, tag, ..] => Ok((
                given == 1,
                usage(used, credit),
                leaves.max(0) as u64,
                tag.max(0) as u64,
            )),
            _ => Err(StoreError::Reply),
        }
    }

    /// The ledger's reset: deletes the counter `key`.
    pub async fn remove(&self, key: &str) -> Result<(), StoreError> {
        self.eval_one(&self.reset, key, &[]).await.map(|_| ())
    }

    /// Gives back one admission counted in `bucket` of each quota key, the scripts sent
    /// together; per key, whether it was given back.
    pub async fn refund(&self, refunds: &[(&str, u64)]) -> Vec<Result<(), StoreError>> {
        let buckets: Vec<[u64; 1]> = refunds.iter().map(|(_, b)| [*b]).collect();
        let calls: Vec<(&Lua, &str, &[u64])> = refunds
            .iter()
            .zip(&buckets)
            .map(|((k, _), b)| (&self.refund, *k, &b[..]))
            .collect();
        match self.eval(&calls).await {
            Ok(replies) => replies.into_iter().map(|r| r.map(|_| ())).collect(),
            Err(e) => {
                let text = e.to_string();
                refunds
                    .iter()
                    .map(|_| Err(StoreError::Server(text.clone())))
                    .collect()
            }
        }
    }
}

/// A window's usage from a script's `used` and `credit` (`first` is not needed by the ledger).
fn usage(used: i64, credit: i64) -> Usage {
    Usage {
        used,
        credit: credit.max(0) as u64,
        first: None,
    }
}

/// One script's reply or error, from [`RedisStore::eval`].
type Replied = Result<Vec<i64>, StoreError>;

/// One limit of a request for [`RedisStore::batch`]: its key and parameters (a quota's tag, 0 for
/// none, is kept with the counter for the ledger).
pub enum Call<'a> {
    Rate(&'a str, &'a Gcra),
    Quota(&'a str, &'a Window, u64),
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

/// The scripts through redis-rs (cluster): one `invoke_async` each (it loads a missing
/// script and retries just that one), sent together on the multiplexed connection; on a cluster
/// the keys of a rate limit and a quota may live on different nodes.
async fn eval_redis_rs<C: redis::aio::ConnectionLike + Clone>(
    c: &C,
    calls: &[(&Lua, &str, &[u64])],
) -> Result<Vec<Replied>, StoreError> {
    let futs = calls.iter().map(|(lua, key, args)| {
        let mut c = c.clone();
        let mut inv = lua.script.key(*key);
        for a in *args {
            inv.arg(*a);
        }
        async move { inv.invoke_async::<Vec<i64>>(&mut c).await }
    });
    // Per call: on a cluster one node may fail while the others answer.
    Ok(futures_util::future::join_all(futs)
        .await
        .into_iter()
        .map(|r| r.map_err(StoreError::from))
        .collect())
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

/// The TLS client config for a `tls: true` Redis: rustls with the system roots, as for the
/// gateway's other outbound TLS (`SSL_CERT_FILE` / `SSL_CERT_DIR` replace the system roots, as
/// with OpenSSL); `Ok(None)` without TLS.
fn tls_config(cfg: &RedisConfig) -> Result<Option<Arc<ClientConfig>>, String> {
    if !cfg.tls {
        return Ok(None);
    }
    hexgate_http::httpc::tls_with_roots(None)
        .map(Some)
        .map_err(|e| e.to_string())
}

async fn connect(
    cfg: &RedisConfig,
    tls: &Result<Option<Arc<ClientConfig>>, String>,
) -> Result<Conn, StoreError> {
    let tls = tls
        .clone()
        .map_err(|e| StoreError::Server(format!("TLS setup: {e}")))?;
    if !cfg.cluster.is_empty() {
        if cfg.tls {
            // redis-rs is built without TLS (its cluster client would answer "can't connect with
            // TLS, the feature is not enabled"); say what is missing instead.
            return Err(StoreError::Server(
                "TLS to a Redis Cluster is not supported (redis.tls with redis.cluster)".into(),
            ));
        }
        let nodes: Vec<String> = cfg.cluster.iter().map(|a| url(cfg, a)).collect();
        let client = redis::cluster::ClusterClient::new(nodes)?;
        let conn = tokio::time::timeout(Duration::from_secs(5), client.get_async_connection())
            .await
            .map_err(|_| StoreError::Timeout(Duration::from_secs(5)))??;
        return Ok(Conn::Cluster(conn));
    }
    let target = pipelined::Target {
        addr: cfg.address.as_deref().unwrap_or("127.0.0.1:6379"),
        tls,
        username: cfg.username.as_deref(),
        password: &cfg.password,
        db: cfg.db,
    };
    Ok(Conn::Pipelined(
        pipelined::Client::connect(&target, Duration::from_secs(2)).await?,
    ))
}
