//! The Redis store: each limit check is one Lua script (EVALSHA, loaded on NOSCRIPT) that checks
//! and updates atomically, on a multiplexed connection so a request's checks are pipelined.
//! Redis's own clock (TIME) is used, so every gateway instance agrees on time.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use redis::aio::ConnectionManager;
use redis::cluster_async::ClusterConnection;
use redis::Script;

use super::algo::{Decision, Gcra, Window, BUCKETS};
use crate::config::Redis as RedisConfig;
use crate::metrics::Registry;

const GCRA_LUA: &str = r#"
pcall(redis.replicate_commands)
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local limit = interval * tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]))
if tat == nil or tat < now then tat = now end
local new_tat = tat + interval
if new_tat - now > limit then
  return {0, 0, tat - now, new_tat - now - limit}
end
redis.call('SET', KEYS[1], new_tat, 'PX', math.floor((new_tat - now) / 1000) + 1000)
return {1, math.floor((limit - (new_tat - now)) / interval), new_tat - now, 0}
"#;

const WINDOW_LUA: &str = r#"
pcall(redis.replicate_commands)
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
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
redis.call('PEXPIRE', KEYS[1], math.floor((n + 1) * w / 1000) + 1000)
if first == nil then first = cur end
return {1, limit - total - 1, (first + n + 1) * w - now, 0, cur}
"#;

const REFUND_LUA: &str = r#"
local v = tonumber(redis.call('HGET', KEYS[1], ARGV[1]))
if v ~= nil and v > 0 then redis.call('HINCRBY', KEYS[1], ARGV[1], -1) end
return 0
"#;

#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
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
    /// The other half of a failed rate-and-quota pipeline (the first half carries the error).
    #[error("Redis: {0}")]
    Pipeline(String),
}

pub struct RedisStore {
    /// One multiplexed connection per runtime (index: `upstream::worker_slot()`), so a worker's
    /// Redis calls are driven by its own thread; slot 0 (control) serves until a worker's is up.
    conns: Box<[ArcSwapOption<Conn>]>,
    cfg: RedisConfig,
    gcra: Script,
    window: Script,
    refund: Script,
    pub timeout: Duration,
    metrics: Arc<Registry>,
}

use crate::httpc::percent_encode as enc;

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
        let store = Arc::new(RedisStore {
            conns: (0..=crate::upstream::MAX_WORKERS)
                .map(|_| ArcSwapOption::empty())
                .collect(),
            cfg: cfg.clone(),
            gcra: Script::new(GCRA_LUA),
            window: Script::new(WINDOW_LUA),
            refund: Script::new(REFUND_LUA),
            timeout: cfg.timeout,
            metrics,
        });
        store.connect_slot(0);
        store
    }

    /// Opens this worker's own connection (called once inside each worker runtime).
    pub fn attach_worker(self: &Arc<Self>) {
        let slot = crate::upstream::worker_slot();
        if slot > 0 {
            self.connect_slot(slot);
        }
    }

    /// Connects slot `slot` in the background on the current runtime, retrying with back-off.
    fn connect_slot(self: &Arc<Self>, slot: usize) {
        let weak = Arc::downgrade(self);
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

    async fn call(&self, script: &Script, key: &str, args: &[u64]) -> Result<Vec<i64>, StoreError> {
        let conn = self.conn()?;
        let mut inv = script.key(key);
        for a in args {
            inv.arg(*a);
        }
        let started = Instant::now();
        let fut = async {
            match &*conn {
                Conn::Single(c) => inv.invoke_async::<Vec<i64>>(&mut c.clone()).await,
                Conn::Cluster(c) => inv.invoke_async::<Vec<i64>>(&mut c.clone()).await,
            }
        };
        let res = tokio::time::timeout(self.timeout, fut).await;
        self.metrics.redis_duration.observe(started.elapsed());
        match res {
            Err(_) => Err(StoreError::Timeout(self.timeout)),
            Ok(r) => Ok(r?),
        }
    }

    /// A rate limit and a quota for one request: on a single Redis, both EVALSHAs go out as one
    /// pipeline (one write, one reply, one timeout); on a cluster, where the two keys may live on
    /// different nodes, as two calls sent together.
    pub async fn rate_and_quota(
        &self,
        rate: (&str, &Gcra),
        quota: (&str, &Window),
    ) -> (Result<Decision, StoreError>, Result<Decision, StoreError>) {
        let conn = match self.conn() {
            Ok(c) => c,
            Err(e) => return (Err(StoreError::NotConnected), Err(e)),
        };
        let Conn::Single(single) = &*conn else {
            return tokio::join!(self.rate(rate.0, rate.1), self.quota(quota.0, quota.1));
        };
        let (rk, g) = rate;
        let (qk, w) = quota;
        let mut pipe = redis::pipe();
        pipe.add_command(evalsha(&self.gcra, rk, &[g.interval_us, g.burst]))
            .add_command(evalsha(&self.window, qk, &[w.limit, w.width_us(), BUCKETS]));
        let started = Instant::now();
        let fut = async {
            let mut c = single.clone();
            match pipe.query_async::<(Vec<i64>, Vec<i64>)>(&mut c).await {
                Err(e)
                    if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
                {
                    // First use on this server (or after SCRIPT FLUSH): load both, then retry.
                    self.gcra.prepare_invoke().load_async(&mut c).await?;
                    self.window.prepare_invoke().load_async(&mut c).await?;
                    pipe.query_async::<(Vec<i64>, Vec<i64>)>(&mut c).await
                }
                other => other,
            }
        };
        let res = tokio::time::timeout(self.timeout, fut).await;
        self.metrics.redis_duration.observe(started.elapsed());
        match res {
            Err(_) => (
                Err(StoreError::Timeout(self.timeout)),
                Err(StoreError::Timeout(self.timeout)),
            ),
            Ok(Err(e)) => {
                let msg = e.to_string();
                (Err(StoreError::Redis(e)), Err(StoreError::Pipeline(msg)))
            }
            Ok(Ok((r, q))) => (decision(&r), quota_decision(&q)),
        }
    }

    fn conn(&self) -> Result<Arc<Conn>, StoreError> {
        self.conns[crate::upstream::worker_slot()]
            .load_full()
            .or_else(|| self.conns[0].load_full())
            .ok_or(StoreError::NotConnected)
    }

    pub async fn rate(&self, key: &str, g: &Gcra) -> Result<Decision, StoreError> {
        let v = self
            .call(&self.gcra, key, &[g.interval_us, g.burst])
            .await?;
        decision(&v)
    }

    pub async fn quota(&self, key: &str, w: &Window) -> Result<Decision, StoreError> {
        let v = self
            .call(&self.window, key, &[w.limit, w.width_us(), BUCKETS])
            .await?;
        quota_decision(&v)
    }

    pub async fn refund(&self, key: &str, bucket: u64) -> Result<(), StoreError> {
        self.call(&self.refund, key, &[bucket]).await.map(|_| ())
    }
}

/// `EVALSHA sha 1 key args...`, as `Script::invoke_async` sends it.
fn evalsha(script: &Script, key: &str, args: &[u64]) -> redis::Cmd {
    let mut cmd = redis::cmd("EVALSHA");
    cmd.arg(script.get_hash()).arg(1).arg(key);
    for a in args {
        cmd.arg(*a);
    }
    cmd
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
    let client = redis::Client::open(url(cfg, addr))?;
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_min_delay(Duration::from_millis(100))
        .set_max_delay(Duration::from_secs(2));
    let conn = ConnectionManager::new_with_config(client, config).await?;
    Ok(Conn::Single(conn))
}
