//! Rate limits (GCRA) and quotas (sliding window): policies compiled per snapshot, the store
//! (memory, or Redis shared by every instance), failure modes and the RateLimit response fields.

pub mod algo;
pub mod redis;
pub mod resp;

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use http::header::{HeaderMap, HeaderName, HeaderValue};

use crate::config::{Config, Quota, RateLimit};
use crate::metrics::{Registry, ServiceMetrics};
use algo::{Decision, Gcra, MemoryStore, Window};
use redis::RedisStore;

/// Labels of `hexgate_ratelimit_decisions_total{result}`, in counter order.
pub const RESULTS: [&str; 4] = ["allowed", "limited", "failed_open", "failed_closed"];
/// Labels of `hexgate_ratelimit_decisions_total{limit}`, in counter order.
pub const LIMITS: [&str; 2] = ["rate", "quota"];

/// What a limit counts by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyKind {
    Ip,
    Consumer,
    Header(HeaderName),
}

impl KeyKind {
    fn parse(s: &str) -> KeyKind {
        match s {
            "consumer" => KeyKind::Consumer,
            s => match s
                .strip_prefix("header:")
                .and_then(|h| HeaderName::from_bytes(h.as_bytes()).ok())
            {
                Some(h) => KeyKind::Header(h),
                None => KeyKind::Ip,
            },
        }
    }
}

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
            key: KeyKind::parse(&r.key),
            burst: r.burst,
            window_secs: ((r.burst as f64 / r.rate_per_second).ceil() as u64).max(1),
        });
        let quota = quota.filter(|q| q.enabled).map(|q| QuotaPolicy {
            scope: service.to_string(),
            window: Window::new(q.limit, q.period),
            key: KeyKind::parse(&q.key),
            limit: q.limit,
            period_secs: q.period.as_secs().max(1),
        });
        if rate.is_none() && quota.is_none() {
            return None;
        }
        let headers = match cfg.rate_limit_headers.as_str() {
            "legacy" => HeaderMode::Legacy,
            "both" => HeaderMode::Both,
            "none" => HeaderMode::None,
            _ => HeaderMode::Draft,
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureMode {
    Open,
    Closed,
}

/// The limit store of a process: memory, or Redis with memory as the fail-open fallback.
pub struct Limiter {
    memory: MemoryStore,
    redis: Option<Arc<RedisStore>>,
    failure_mode: FailureMode,
    key_prefix: String,
    metrics: Arc<Registry>,
    last_warning: AtomicU64,
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

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
        let redis_cfg = cfg
            .redis
            .as_ref()
            .filter(|r| r.address.is_some() || !r.cluster.is_empty());
        Limiter {
            memory: MemoryStore::default(),
            redis: redis_cfg.map(|r| RedisStore::start(r, metrics.clone())),
            failure_mode: match redis_cfg.map(|r| r.failure_mode.as_str()) {
                Some("closed") => FailureMode::Closed,
                _ => FailureMode::Open,
            },
            key_prefix: cfg
                .redis
                .as_ref()
                .map(|r| r.key_prefix.clone())
                .unwrap_or_else(|| "hexgate:".into()),
            metrics,
            last_warning: AtomicU64::new(0),
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
        let now = now_us() / 1_000_000;
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

    /// Runs the route's limits for one request. Both checks go to Redis together (pipelined on
    /// one multiplexed connection); a quota slot taken by a request that the rate limit refuses is
    /// given back.
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
                KeyKind::Header(h) => match headers.get(h).and_then(|v| v.to_str().ok()) {
                    Some(v) if !v.is_empty() => v.to_string(),
                    _ => format!("ip:{ip}"),
                },
            }
        };
        let rate_key = p
            .rate
            .as_ref()
            .map(|r| self.key('r', &r.scope, &ident(&r.key)));
        let quota_key = p
            .quota
            .as_ref()
            .map(|q| self.key('q', &q.scope, &ident(&q.key)));

        let (mut rate_failed, mut quota_failed) = (false, false);
        let (rate, quota) = match &self.redis {
            Some(store) => {
                let (r, q) = match (&p.rate, &rate_key, &p.quota, &quota_key) {
                    (Some(rp), Some(rk), Some(qp), Some(qk)) => {
                        let (r, q) = store.rate_and_quota((rk, &rp.gcra), (qk, &qp.window)).await;
                        (Some(r), Some(q))
                    }
                    (Some(rp), Some(rk), _, _) => (Some(store.rate(rk, &rp.gcra).await), None),
                    (_, _, Some(qp), Some(qk)) => (None, Some(store.quota(qk, &qp.window).await)),
                    _ => (None, None),
                };
                let now = now_us();
                let r = match r {
                    Some(Err(e)) => {
                        self.warn_redis(&e);
                        rate_failed = true;
                        match (&p.rate, &rate_key) {
                            (Some(rp), Some(k)) => Some(self.memory.rate(k, &rp.gcra, now)),
                            _ => None,
                        }
                    }
                    other => other.and_then(Result::ok),
                };
                let q = match q {
                    Some(Err(e)) => {
                        self.warn_redis(&e);
                        quota_failed = true;
                        match (&p.quota, &quota_key) {
                            (Some(qp), Some(k)) => Some(self.memory.quota(k, &qp.window, now)),
                            _ => None,
                        }
                    }
                    other => other.and_then(Result::ok),
                };
                (r, q)
            }
            None => {
                let now = now_us();
                let r = match (&p.rate, &rate_key) {
                    (Some(rp), Some(k)) => Some(self.memory.rate(k, &rp.gcra, now)),
                    _ => None,
                };
                // The quota is only charged when the rate limit let the request through.
                let q = match (&p.quota, &quota_key) {
                    (Some(qp), Some(k)) if r.is_none_or(|d| d.allowed) => {
                        Some(self.memory.quota(k, &qp.window, now))
                    }
                    (Some(qp), Some(k)) => Some(self.memory_peek_quota(k, qp)),
                    _ => None,
                };
                (r, q)
            }
        };

        let failed = rate_failed || quota_failed;
        if failed && self.failure_mode == FailureMode::Closed {
            for (i, present) in [rate.is_some(), quota.is_some()].into_iter().enumerate() {
                if present {
                    metrics.limit_decision(i, 3);
                }
            }
            return Verdict {
                unavailable: true,
                ..Verdict::default()
            };
        }

        // Give back a quota slot taken by a request the rate limit refused.
        if let (Some(r), Some(q), Some(k)) = (rate, quota, &quota_key) {
            if !r.allowed && q.allowed {
                if let Some(bucket) = q.bucket {
                    match &self.redis {
                        Some(store) if !quota_failed => {
                            let store = store.clone();
                            let k = k.clone();
                            tokio::spawn(async move {
                                let _ = store.refund(&k, bucket).await;
                            });
                        }
                        _ => self.memory.refund(k, bucket),
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
        let refused: Vec<&Decision> = [rate.as_ref(), quota.as_ref()]
            .into_iter()
            .flatten()
            .filter(|d| !d.allowed)
            .collect();
        let retry_after = if refused.is_empty() {
            None
        } else {
            Some(
                refused
                    .iter()
                    .map(|d| secs_ceil(d.retry_after_us).max(1))
                    .max()
                    .unwrap_or(1),
            )
        };
        Verdict {
            headers: self.fields(p, rate, quota),
            retry_after,
            unavailable: false,
        }
    }

    /// A quota decision that charges nothing (used when the rate limit already refused).
    fn memory_peek_quota(&self, key: &str, q: &QuotaPolicy) -> Decision {
        let d = self.memory.quota(key, &q.window, now_us());
        if let Some(b) = d.bucket {
            self.memory.refund(key, b);
        }
        d
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
