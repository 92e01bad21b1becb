//! Rate limits (GCRA) and quotas (sliding window): policies compiled per snapshot, the store
//! (memory, or Redis shared by every instance), failure modes and the RateLimit response fields.

pub mod algo;
pub mod pipelined;
pub mod redis;

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use http::header::{HeaderMap, HeaderName, HeaderValue};

use algo::{Decision, Gcra, MemoryStore, Window};
use hexgate_config::{Config, Quota, RateLimit, RateLimitHeaders};
use hexgate_metrics::{Registry, ServiceMetrics};
use redis::RedisStore;

/// Labels of `hexgate_ratelimit_decisions_total{result}` and `{limit}` (declared with the
/// metrics).
pub use hexgate_metrics::{LIMITS, LIMIT_RESULTS as RESULTS};

/// What a limit counts by (the config's `key`).
pub use hexgate_config::LimitKey as KeyKind;

#[derive(Debug, Clone)]
pub struct RatePolicy {
    /// "global" for the top-level limit (shared by all routes), else the service name.
    pub scope: String,
    pub gcra: Gcra,
    pub key: KeyKind,
    pub burst: u64,
    pub window_secs: u64,
}

#[derive(Debug, Clone)]
pub struct QuotaPolicy {
    pub scope: String,
    pub window: Window,
    pub key: KeyKind,
    pub limit: u64,
    pub period_secs: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderMode {
    Draft,
    Legacy,
    Both,
    None,
}

/// The limits of one route, built with the snapshot.
#[derive(Debug, Clone)]
pub struct RoutePolicies {
    pub rate: Option<RatePolicy>,
    pub quota: Option<QuotaPolicy>,
    pub headers: HeaderMode,
    /// The precomputed `RateLimit-Policy` value.
    pub policy_header: Option<HeaderValue>,
}

impl RoutePolicies {
    pub fn build(
        cfg: &Config,
        service: &str,
        svc_rate: Option<&RateLimit>,
        quota: Option<&Quota>,
    ) -> Option<RoutePolicies> {
        let rate = match svc_rate {
            Some(r) => r.enabled.then(|| (service.to_string(), r)),
            None => cfg
                .rate_limiting
                .as_ref()
                .filter(|r| r.enabled)
                .map(|r| ("global".to_string(), r)),
        }
        .map(|(scope, r)| RatePolicy {
            scope,
            gcra: Gcra::new(r.rate_per_second, r.burst),
            key: r.key.clone(),
            burst: r.burst,
            window_secs: ((r.burst as f64 / r.rate_per_second).ceil() as u64).max(1),
        });
        let quota = quota.filter(|q| q.enabled).map(|q| QuotaPolicy {
            scope: service.to_string(),
            window: Window::new(q.limit, q.period),
            key: q.key.clone(),
            limit: q.limit,
            period_secs: q.period.as_secs().max(1),
        });
        if rate.is_none() && quota.is_none() {
            return None;
        }
        let headers = match cfg.rate_limit_headers {
            RateLimitHeaders::Legacy => HeaderMode::Legacy,
            RateLimitHeaders::Both => HeaderMode::Both,
            RateLimitHeaders::None => HeaderMode::None,
            RateLimitHeaders::Draft => HeaderMode::Draft,
        };
        let mut policy = Vec::new();
        if let Some(r) = &rate {
            policy.push(format!("\"rate\";q={};w={}", r.burst, r.window_secs));
        }
        if let Some(q) = &quota {
            policy.push(format!("\"quota\";q={};w={}", q.limit, q.period_secs));
        }
        Some(RoutePolicies {
            rate,
            quota,
            headers,
            policy_header: HeaderValue::from_str(&policy.join(", ")).ok(),
        })
    }
}

/// The outcome of a request's limits, with the response fields to add.
#[derive(Debug, Default)]
pub struct Verdict {
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// Set when a limit refused: seconds for Retry-After.
    pub retry_after: Option<u64>,
    /// Set when Redis failed and failureMode is closed.
    pub unavailable: bool,
}

/// What a check does when Redis fails (the config's `redis.failureMode`).
pub use hexgate_config::FailureMode;

/// The limit store of a process: memory, or Redis with memory as the fail-open fallback.
pub struct Limiter {
    memory: MemoryStore,
    redis: Option<Arc<RedisStore>>,
    failure_mode: FailureMode,
    key_prefix: String,
    metrics: Arc<Registry>,
    last_warning: AtomicU64,
    clock: Clock,
}

pub use hexgate_http::clock::{Clock, ManualClock};

static RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
static RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
static RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("ratelimit-limit");
static RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("ratelimit-remaining");
static RATELIMIT_RESET: HeaderName = HeaderName::from_static("ratelimit-reset");

fn secs_ceil(us: u64) -> u64 {
    us.div_ceil(1_000_000)
}

impl Limiter {
    /// Redis is used when the config names an address or a cluster; otherwise memory only.
    pub fn new(cfg: &Config, metrics: Arc<Registry>) -> Limiter {
        Limiter::with_clock(cfg, metrics, Clock::System)
    }

    /// As [`Limiter::new`], with the given clock (tests pass a [`Clock::Manual`]). With Redis,
    /// this starts connecting in the background, so it must be called inside a tokio runtime.
    pub fn with_clock(cfg: &Config, metrics: Arc<Registry>, clock: Clock) -> Limiter {
        let redis_cfg = cfg
            .redis
            .as_ref()
            .filter(|r| r.address.is_some() || !r.cluster.is_empty());
        Limiter {
            memory: MemoryStore::default(),
            redis: redis_cfg.map(|r| RedisStore::start(r, metrics.clone())),
            failure_mode: redis_cfg.map(|r| r.failure_mode).unwrap_or_default(),
            key_prefix: cfg
                .redis
                .as_ref()
                .map(|r| r.key_prefix.clone())
                .unwrap_or_else(|| "hexgate:".into()),
            metrics,
            last_warning: AtomicU64::new(0),
            clock,
        }
    }

    /// Gives the calling worker runtime its own Redis connection (no-op without Redis).
    pub fn attach_worker(&self) {
        if let Some(r) = &self.redis {
            r.attach_worker();
        }
    }

    pub fn uses_redis(&self) -> bool {
        self.redis.is_some()
    }

    /// The store key, hash-tagged so a Redis Cluster keeps each limit key in one slot.
    fn key(&self, kind: char, scope: &str, id: &str) -> String {
        let mut k = String::with_capacity(self.key_prefix.len() + scope.len() + id.len() + 6);
        k.push_str(&self.key_prefix);
        k.push('{');
        k.push(kind);
        k.push(':');
        push_escaped(&mut k, scope);
        k.push(':');
        push_escaped(&mut k, id);
        k.push('}');
        k
    }

    fn warn_redis(&self, e: &redis::StoreError) {
        self.metrics.redis_errors.fetch_add(1, Ordering::Relaxed);
        // Log throttling is about wall time, whatever clock the limits use.
        let now = Clock::System.now_secs();
        let last = self.last_warning.load(Ordering::Relaxed);
        if now >= last + 5
            && self
                .last_warning
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(error = %e, mode = ?self.failure_mode, "Redis limit check failed; applying failureMode (logged at most every 5s)");
        }
    }

    /// Runs the route's limits for one request, with one rule whatever the store: both limits are
    /// charged (in Redis, both scripts sent together on one multiplexed connection), and a quota
    /// slot taken by a request that the rate limit refused is given back, once, where it was taken
    /// (awaited, within the store timeout, so the next decision sees it). A limit that Redis
    /// could not decide is decided in memory (failureMode open) or makes the request
    /// `unavailable` (failureMode closed).
    pub async fn check(
        &self,
        p: &RoutePolicies,
        metrics: &ServiceMetrics,
        ip: IpAddr,
        consumer: Option<&str>,
        headers: &HeaderMap,
    ) -> Verdict {
        let ident = |k: &KeyKind| -> String {
            match k {
                KeyKind::Ip => ip.to_string(),
                KeyKind::Consumer => consumer.unwrap_or("-").to_string(),
                // The value is hashed: it may be a credential (an API key), and counter names
                // end up in Redis, where anyone who can list keys would read it.
                KeyKind::Header(h) => match headers.get(h).map(|v| v.as_bytes()) {
                    Some(v) if !v.is_empty() => header_digest(v),
                    _ => format!("ip:{ip}"),
                },
            }
        };
        let rate_limit = p
            .rate
            .as_ref()
            .map(|r| (r, self.key('r', &r.scope, &ident(&r.key))));
        let quota_limit = p
            .quota
            .as_ref()
            .map(|q| (q, self.key('q', &q.scope, &ident(&q.key))));

        let (mut rate_failed, mut quota_failed) = (false, false);
        let (rate, mut quota) = match &self.redis {
            None => {
                let now = self.clock.now_us();
                (
                    rate_limit
                        .as_ref()
                        .map(|(r, k)| self.memory.rate(k, &r.gcra, now)),
                    quota_limit
                        .as_ref()
                        .map(|(q, k)| self.memory.quota(k, &q.window, now)),
                )
            }
            Some(store) => {
                let at = self.clock.manual_us();
                let (r, q) = match (&rate_limit, &quota_limit) {
                    (Some((rp, rk)), Some((qp, qk))) => {
                        let (r, q) = store
                            .rate_and_quota((rk, &rp.gcra), (qk, &qp.window), at)
                            .await;
                        (Some(r), Some(q))
                    }
                    (Some((rp, rk)), None) => (Some(store.rate(rk, &rp.gcra, at).await), None),
                    (None, Some((qp, qk))) => (None, Some(store.quota(qk, &qp.window, at).await)),
                    (None, None) => (None, None),
                };
                for e in [&r, &q]
                    .into_iter()
                    .flatten()
                    .filter_map(|d| d.as_ref().err())
                {
                    self.warn_redis(e);
                }
                rate_failed = matches!(r, Some(Err(_)));
                quota_failed = matches!(q, Some(Err(_)));
                if (rate_failed || quota_failed) && self.failure_mode == FailureMode::Closed {
                    for (i, present) in [r.is_some(), q.is_some()].into_iter().enumerate() {
                        if present {
                            metrics.limit_decision(i, 3);
                        }
                    }
                    return Verdict {
                        unavailable: true,
                        ..Verdict::default()
                    };
                }
                // failureMode open: what Redis could not decide is decided in memory.
                let now = if rate_failed || quota_failed {
                    self.clock.now_us()
                } else {
                    0
                };
                (
                    match (r, &rate_limit) {
                        (Some(Err(_)), Some((rp, rk))) => Some(self.memory.rate(rk, &rp.gcra, now)),
                        (r, _) => r.and_then(Result::ok),
                    },
                    match (q, &quota_limit) {
                        (Some(Err(_)), Some((qp, qk))) => {
                            Some(self.memory.quota(qk, &qp.window, now))
                        }
                        (q, _) => q.and_then(Result::ok),
                    },
                )
            }
        };

        // Give back the quota slot of a request the rate limit refused, in the store that counted
        // it; it no longer counts, so one more request remains.
        if let (Some(r), Some(q), Some((_, qk))) = (&rate, &mut quota, &quota_limit) {
            if !r.allowed && q.allowed {
                if let Some(bucket) = q.bucket {
                    let given_back = match &self.redis {
                        Some(store) if !quota_failed => match store.refund(qk, bucket).await {
                            Ok(()) => true,
                            Err(e) => {
                                self.warn_redis(&e);
                                false
                            }
                        },
                        _ => {
                            self.memory.refund(qk, bucket);
                            true
                        }
                    };
                    if given_back {
                        q.remaining += 1;
                    }
                }
            }
        }

        let result_idx = |d: &Decision, failed: bool| match (d.allowed, failed) {
            (false, _) => 1,
            (true, true) => 2,
            (true, false) => 0,
        };
        if let Some(d) = &rate {
            metrics.limit_decision(0, result_idx(d, rate_failed));
        }
        if let Some(d) = &quota {
            metrics.limit_decision(1, result_idx(d, quota_failed));
        }
        let retry_after = [rate.as_ref(), quota.as_ref()]
            .into_iter()
            .flatten()
            .filter(|d| !d.allowed)
            .map(|d| secs_ceil(d.retry_after_us).max(1))
            .max();
        Verdict {
            headers: self.fields(p, rate, quota),
            retry_after,
            unavailable: false,
        }
    }

    fn fields(
        &self,
        p: &RoutePolicies,
        rate: Option<Decision>,
        quota: Option<Decision>,
    ) -> Vec<(HeaderName, HeaderValue)> {
        let mut out = Vec::new();
        if p.headers == HeaderMode::None {
            return out;
        }
        let items: Vec<(&str, u64, Decision)> = [
            rate.zip(p.rate.as_ref()).map(|(d, r)| ("rate", r.burst, d)),
            quota
                .zip(p.quota.as_ref())
                .map(|(d, q)| ("quota", q.limit, d)),
        ]
        .into_iter()
        .flatten()
        .collect();
        if matches!(p.headers, HeaderMode::Draft | HeaderMode::Both) {
            if let Some(v) = &p.policy_header {
                out.push((RATELIMIT_POLICY.clone(), v.clone()));
            }
            let mut value = String::with_capacity(64);
            for (i, (name, _, d)) in items.iter().enumerate() {
                use std::fmt::Write as _;
                let sep = if i == 0 { "" } else { ", " };
                let _ = write!(
                    value,
                    "{sep}\"{name}\";r={};t={}",
                    d.remaining,
                    secs_ceil(d.reset_us)
                );
            }
            if let Ok(v) = HeaderValue::from_str(&value) {
                out.push((RATELIMIT.clone(), v));
            }
        }
        if matches!(p.headers, HeaderMode::Legacy | HeaderMode::Both) {
            // The most restrictive policy: the one with the fewest requests left.
            if let Some((_, limit, d)) = items.iter().min_by_key(|(_, _, d)| d.remaining) {
                out.push((RATELIMIT_LIMIT.clone(), HeaderValue::from(*limit)));
                out.push((RATELIMIT_REMAINING.clone(), HeaderValue::from(d.remaining)));
                out.push((
                    RATELIMIT_RESET.clone(),
                    HeaderValue::from(secs_ceil(d.reset_us)),
                ));
            }
        }
        out
    }
}

/// `h:` and the first 128 bits of the SHA-256 of a header value, in hex.
fn header_digest(value: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, value);
    let mut out = String::with_capacity(34);
    out.push_str("h:");
    for b in &d.as_ref()[..16] {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

fn push_escaped(out: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            '{' => out.push_str("%7B"),
            '}' => out.push_str("%7D"),
            '%' => out.push_str("%25"),
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests;
