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
    /// "@global" for the top-level limit (shared by all routes), else the service name.
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
    /// The route's items of the `RateLimit-Policy` value.
    pub policy_header: Option<HeaderValue>,
}

fn header_mode(cfg: &Config) -> HeaderMode {
    match cfg.rate_limit_headers {
        RateLimitHeaders::Legacy => HeaderMode::Legacy,
        RateLimitHeaders::Both => HeaderMode::Both,
        RateLimitHeaders::None => HeaderMode::None,
        RateLimitHeaders::Draft => HeaderMode::Draft,
    }
}

fn rate_policy(scope: String, r: &RateLimit) -> RatePolicy {
    RatePolicy {
        scope,
        gcra: Gcra::new(r.rate_per_second, r.burst),
        key: r.key.clone(),
        burst: r.burst,
        window_secs: ((r.burst as f64 / r.rate_per_second).ceil() as u64).max(1),
    }
}

fn quota_policy(scope: String, q: &Quota) -> QuotaPolicy {
    QuotaPolicy {
        scope,
        window: Window::new(q.limit, q.period),
        key: q.key.clone(),
        limit: q.limit,
        period_secs: q.period.as_secs().max(1),
    }
}

/// The `RateLimit-Policy` items of a rate limit and a quota, named `rate` and `quota` with
/// `prefix` before them.
fn policy_items(prefix: &str, rate: Option<&RatePolicy>, quota: Option<&QuotaPolicy>) -> String {
    let mut items = Vec::new();
    if let Some(r) = rate {
        items.push(format!(
            "\"{prefix}rate\";q={};w={}",
            r.burst, r.window_secs
        ));
    }
    if let Some(q) = quota {
        items.push(format!(
            "\"{prefix}quota\";q={};w={}",
            q.limit, q.period_secs
        ));
    }
    items.join(", ")
}

impl RoutePolicies {
    pub fn build(
        cfg: &Config,
        service: &str,
        svc_rate: Option<&RateLimit>,
        quota: Option<&Quota>,
    ) -> Option<RoutePolicies> {
        let rate = match svc_rate {
            Some(r) => r.enabled.then(|| rate_policy(service.to_string(), r)),
            None => cfg
                .rate_limiting
                .as_ref()
                .filter(|r| r.enabled)
                // `@` cannot start a service name: no route's own limit shares these keys.
                .map(|r| rate_policy("@global".to_string(), r)),
        };
        let quota = quota
            .filter(|q| q.enabled)
            .map(|q| quota_policy(service.to_string(), q));
        if rate.is_none() && quota.is_none() {
            return None;
        }
        let items = policy_items("", rate.as_ref(), quota.as_ref());
        Some(RoutePolicies {
            rate,
            quota,
            headers: header_mode(cfg),
            policy_header: HeaderValue::from_str(&items).ok(),
        })
    }
}

/// The scope of every plan's rate-limit counter: one per consumer whatever the plan, so a
/// consumer moved to another plan keeps its state. `@` cannot start a service name.
pub const PLAN_RATE_SCOPE: &str = "@plan";

/// The scope of the plan quota counters with this period: a consumer moved to a plan with the
/// same period keeps its count (a count over another window length cannot be carried over).
pub fn plan_quota_scope(period_secs: u64) -> String {
    format!("@plan/{period_secs}")
}

/// One plan's limits, counted per consumer.
#[derive(Debug, Clone)]
pub struct PlanPolicy {
    pub name: Arc<str>,
    /// `priority`: under `maxInFlight` overload, lower priorities are refused first.
    pub priority: u32,
    /// Kept with the plan's quota counters, so the ledger can name the plan that last counted.
    pub tag: u64,
    pub rate: Option<RatePolicy>,
    pub quota: Option<QuotaPolicy>,
    /// The plan's items of the `RateLimit-Policy` value (`plan-rate`, `plan-quota`).
    items: String,
    /// `rateLimitHeaders`.
    pub headers: HeaderMode,
}

/// `plans`, `authentication.planClaim` and `authentication.defaultPlan`, built with the snapshot.
#[derive(Debug, Clone)]
pub struct Plans {
    by_name: std::collections::HashMap<Arc<str>, Arc<PlanPolicy>>,
    /// The JWT claim naming the plan.
    pub claim: Option<String>,
    pub default: Option<Arc<PlanPolicy>>,
}

/// Why a consumer has no plan limits to apply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("unknown plan {0:?}")]
    Unknown(String),
    #[error("the consumer has no plan and no default plan is configured")]
    Missing,
}

impl PlanError {
    /// The `hexgate_auth_failures_total` reason.
    pub fn label(&self) -> &'static str {
        match self {
            PlanError::Unknown(_) => "plan_unknown",
            PlanError::Missing => "plan_missing",
        }
    }
}

/// A stable non-zero number for a plan name (FNV-1a, 52 bits so it stays exact in Lua's
/// doubles).
pub fn plan_tag(name: &str) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in name.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x100000001b3);
    }
    (h & ((1 << 52) - 1)).max(1)
}

impl Plans {
    /// None when no plans are configured.
    pub fn build(cfg: &Config) -> Option<Plans> {
        if cfg.plans.is_empty() {
            return None;
        }
        let by_name: std::collections::HashMap<Arc<str>, Arc<PlanPolicy>> = cfg
            .plans
            .iter()
            .map(|(name, p)| {
                let rate = p
                    .rate_limiting
                    .as_ref()
                    .map(|r| rate_policy(PLAN_RATE_SCOPE.to_string(), r));
                let quota = p
                    .quota
                    .as_ref()
                    .map(|q| quota_policy(plan_quota_scope(q.period.as_secs().max(1)), q));
                let items = policy_items("plan-", rate.as_ref(), quota.as_ref());
                let name: Arc<str> = Arc::from(name.as_str());
                let plan = PlanPolicy {
                    priority: p.priority,
                    tag: plan_tag(&name),
                    name: name.clone(),
                    rate,
                    quota,
                    items,
                    headers: header_mode(cfg),
                };
                (name, Arc::new(plan))
            })
            .collect();
        let default = cfg
            .authentication
            .default_plan
            .as_deref()
            .and_then(|d| by_name.get(d).cloned());
        Some(Plans {
            by_name,
            claim: cfg.authentication.plan_claim.clone(),
            default,
        })
    }

    /// The plan a credential names, else the default plan.
    pub fn resolve(&self, named: Option<&str>) -> Result<&Arc<PlanPolicy>, PlanError> {
        match named {
            Some(n) => self
                .by_name
                .get(n)
                .ok_or_else(|| PlanError::Unknown(n.to_string())),
            None => self.default.as_ref().ok_or(PlanError::Missing),
        }
    }

    pub fn get(&self, name: &str) -> Option<&Arc<PlanPolicy>> {
        self.by_name.get(name)
    }

    /// The plan whose tag this is.
    pub fn by_tag(&self, tag: u64) -> Option<&Arc<PlanPolicy>> {
        self.by_name.values().find(|p| p.tag == tag)
    }

    /// Every plan, by name.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<PlanPolicy>> {
        let mut v: Vec<_> = self.by_name.values().collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v.into_iter()
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
    /// What Redis did for this check: `None` when it was not asked (no Redis, no limit),
    /// `Some(true)` when it failed one limit or more (decided in memory under failureMode open),
    /// `Some(false)` when it decided them all. What a trace's Redis span reports.
    pub redis_failed: Option<bool>,
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

    /// Runs a request's limits (the route's and its consumer's plan's), with one rule whatever
    /// the store: every limit is charged (in Redis, the scripts sent together on one multiplexed
    /// connection), and when one refuses, the quota slots the others took are given back, once,
    /// where they were taken (awaited, within the store timeout, so the next decision sees it).
    /// A limit that Redis could not decide is decided in memory (failureMode open) or makes the
    /// request `unavailable` (failureMode closed).
    pub async fn check(
        &self,
        route: Option<&RoutePolicies>,
        plan: Option<&PlanPolicy>,
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
        // The limits, in the order of `LIMITS` (their metric index).
        let mut charges: Vec<Charge> = Vec::with_capacity(4);
        let add_rate = |charges: &mut Vec<Charge>, r: &RatePolicy, metric: usize| {
            charges.push(Charge {
                key: self.key('r', &r.scope, &ident(&r.key)),
                limit: Limit::Rate(r.gcra, r.burst),
                metric,
            })
        };
        if let Some(r) = route.and_then(|p| p.rate.as_ref()) {
            add_rate(&mut charges, r, 0);
        }
        if let Some(q) = route.and_then(|p| p.quota.as_ref()) {
            charges.push(Charge {
                key: self.key('q', &q.scope, &ident(&q.key)),
                limit: Limit::Quota(q.window, 0),
                metric: 1,
            });
        }
        if let Some(r) = plan.and_then(|p| p.rate.as_ref()) {
            add_rate(&mut charges, r, 2);
        }
        if let Some((q, p)) = plan.and_then(|p| p.quota.as_ref().map(|q| (q, p))) {
            charges.push(Charge {
                key: self.key('q', &q.scope, &ident(&q.key)),
                limit: Limit::Quota(q.window, p.tag),
                metric: 3,
            });
        }

        let (mut decided, failed) = self.decide(&charges).await;
        let redis_failed =
            (self.redis.is_some() && !charges.is_empty()).then(|| failed.iter().any(|f| *f));
        // Redis failed a limit under failureMode closed: the request is not served.
        let unavailable = decided.iter().any(Option::is_none);
        // A refused or unserved request uses no quota: the slots the limits took are given
        // back in the store that counted them, so one more request remains there.
        if unavailable || decided.iter().flatten().any(|d| !d.allowed) {
            self.give_back(&charges, &mut decided, &failed).await;
        }
        if unavailable {
            for c in &charges {
                metrics.limit_decision(c.metric, 3);
            }
            return Verdict {
                unavailable: true,
                redis_failed,
                ..Verdict::default()
            };
        }
        let decisions: Vec<Decision> = decided.into_iter().flatten().collect();

        for ((c, d), failed) in charges.iter().zip(&decisions).zip(&failed) {
            let result = match (d.allowed, failed) {
                (false, _) => 1,
                (true, true) => 2,
                (true, false) => 0,
            };
            metrics.limit_decision(c.metric, result);
        }
        let retry_after = decisions
            .iter()
            .filter(|d| !d.allowed)
            .map(|d| secs_ceil(d.retry_after_us).max(1))
            .max();
        let mode = route.map_or(plan.map_or(HeaderMode::None, |p| p.headers), |r| r.headers);
        Verdict {
            headers: self.fields(route, plan, mode, &charges, &decisions),
            retry_after,
            unavailable: false,
            redis_failed,
        }
    }

    /// Decides every charge: in memory, or in Redis with failed ones decided in memory
    /// (failureMode open) or left undecided (None, failureMode closed). With the decisions,
    /// which ones Redis failed.
    async fn decide(&self, charges: &[Charge]) -> (Vec<Option<Decision>>, Vec<bool>) {
        let Some(store) = &self.redis else {
            let now = self.clock.now_us();
            let d = charges
                .iter()
                .map(|c| Some(self.decide_in_memory(c, now)))
                .collect();
            return (d, vec![false; charges.len()]);
        };
        let calls: Vec<redis::Call> = charges
            .iter()
            .map(|c| match &c.limit {
                Limit::Rate(g, _) => redis::Call::Rate(&c.key, g),
                Limit::Quota(w, tag) => redis::Call::Quota(&c.key, w, *tag),
            })
            .collect();
        let results = store.batch(&calls, self.clock.manual_us()).await;
        for e in results.iter().filter_map(|r| r.as_ref().err()) {
            self.warn_redis(e);
        }
        let failed: Vec<bool> = results.iter().map(Result::is_err).collect();
        let open = self.failure_mode == FailureMode::Open;
        let now = self.clock.now_us();
        let d = charges
            .iter()
            .zip(results)
            .map(|(c, r)| match r {
                Ok(d) => Some(d),
                // failureMode open: what Redis could not decide is decided in memory.
                Err(_) if open => Some(self.decide_in_memory(c, now)),
                Err(_) => None,
            })
            .collect();
        (d, failed)
    }

    /// Gives back the quota slots `decided` took, each in the store that counted it: Redis's
    /// in one batch, memory's at once. A slot given back counts as one more remaining.
    async fn give_back(
        &self,
        charges: &[Charge],
        decided: &mut [Option<Decision>],
        failed: &[bool],
    ) {
        let mut in_redis = Vec::new();
        for (i, (c, d)) in charges.iter().zip(decided.iter_mut()).enumerate() {
            let (Limit::Quota(..), Some(d)) = (&c.limit, d) else {
                continue;
            };
            let (true, Some(bucket)) = (d.allowed, d.bucket) else {
                continue;
            };
            if self.redis.is_some() && !failed[i] {
                in_redis.push((i, bucket));
            } else {
                self.memory.refund(&c.key, bucket);
                d.remaining += 1;
            }
        }
        let (Some(store), false) = (&self.redis, in_redis.is_empty()) else {
            return;
        };
        let refunds: Vec<(&str, u64)> = in_redis
            .iter()
            .map(|(i, b)| (charges[*i].key.as_str(), *b))
            .collect();
        for ((i, _), r) in in_redis.iter().zip(store.refund(&refunds).await) {
            match r {
                Ok(()) => {
                    if let Some(d) = &mut decided[*i] {
                        d.remaining += 1;
                    }
                }
                Err(e) => self.warn_redis(&e),
            }
        }
    }

    fn decide_in_memory(&self, c: &Charge, now: u64) -> Decision {
        match &c.limit {
            Limit::Rate(g, _) => self.memory.rate(&c.key, g, now),
            Limit::Quota(w, tag) => self.memory.quota_tagged(&c.key, w, *tag, now),
        }
    }

    fn fields(
        &self,
        route: Option<&RoutePolicies>,
        plan: Option<&PlanPolicy>,
        mode: HeaderMode,
        charges: &[Charge],
        decisions: &[Decision],
    ) -> Vec<(HeaderName, HeaderValue)> {
        let mut out = Vec::new();
        if mode == HeaderMode::None {
            return out;
        }
        if matches!(mode, HeaderMode::Draft | HeaderMode::Both) {
            let policy = match (route.and_then(|r| r.policy_header.as_ref()), plan) {
                (Some(v), Some(p)) if !p.items.is_empty() => {
                    let mut joined = v.as_bytes().to_vec();
                    joined.extend_from_slice(b", ");
                    joined.extend_from_slice(p.items.as_bytes());
                    HeaderValue::from_bytes(&joined).ok()
                }
                (Some(v), _) => Some(v.clone()),
                (None, Some(p)) => HeaderValue::from_str(&p.items).ok(),
                (None, None) => None,
            };
            if let Some(v) = policy {
                out.push((RATELIMIT_POLICY.clone(), v));
            }
            let mut value = String::with_capacity(64);
            for (i, (c, d)) in charges.iter().zip(decisions).enumerate() {
                use std::fmt::Write as _;
                let sep = if i == 0 { "" } else { ", " };
                let _ = write!(
                    value,
                    "{sep}\"{}\";r={};t={}",
                    ITEM_NAMES[c.metric],
                    d.remaining,
                    secs_ceil(d.reset_us)
                );
            }
            if let Ok(v) = HeaderValue::from_str(&value) {
                out.push((RATELIMIT.clone(), v));
            }
        }
        if matches!(mode, HeaderMode::Legacy | HeaderMode::Both) {
            // The most restrictive policy: the one with the fewest requests left.
            if let Some((c, d)) = charges
                .iter()
                .zip(decisions)
                .min_by_key(|(_, d)| d.remaining)
            {
                out.push((RATELIMIT_LIMIT.clone(), HeaderValue::from(c.limit.size())));
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

/// A quota counter as the ledger reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QuotaUsage {
    /// Requests counted in the window.
    pub used: u64,
    /// Credits the ledger gave in the window.
    pub credit: u64,
    /// Microseconds until the oldest counted request leaves the window (0: nothing counted).
    pub leaves_us: u64,
    /// The tag of the last check (a plan's, see [`plan_tag`]); 0 when none.
    pub tag: u64,
}

impl QuotaUsage {
    fn of((u, leaves_us, tag): (algo::Usage, u64, u64)) -> QuotaUsage {
        QuotaUsage {
            used: u.used.max(0) as u64,
            credit: u.credit,
            leaves_us,
            tag,
        }
    }

    /// Whether the counter holds anything.
    pub fn exists(&self) -> bool {
        self.used != 0 || self.credit != 0 || self.leaves_us != 0 || self.tag != 0
    }

    /// Requests that may still pass now under `limit`.
    pub fn remaining(&self, limit: u64) -> u64 {
        limit.saturating_add(self.credit).saturating_sub(self.used)
    }
}

/// Most credit one quota window may hold (the sum of the ledger's credits in it).
pub const MAX_CREDIT: u64 = 1_000_000_000;

/// The quota ledger (the admin API's reads and corrections), in the store requests are counted
/// in: memory, or Redis. Each call is one atomic step against concurrent requests (one Lua
/// script, or the memory shard's lock).
impl Limiter {
    fn now_for_store(&self) -> Option<u64> {
        self.clock.manual_us()
    }

    /// The counter of quota `q` for `id` (a consumer), without charging it.
    pub async fn quota_read(
        &self,
        q: &QuotaPolicy,
        id: &str,
    ) -> Result<QuotaUsage, redis::StoreError> {
        let key = self.key('q', &q.scope, id);
        Ok(QuotaUsage::of(match &self.redis {
            Some(store) => {
                store
                    .quota_peek(&key, &q.window, self.now_for_store())
                    .await?
            }
            None => self.memory.quota_peek(&key, &q.window, self.clock.now_us()),
        }))
    }

    /// Deletes the counter of quota `q` for `id` (a no-op when there is none).
    pub async fn quota_reset(&self, q: &QuotaPolicy, id: &str) -> Result<(), redis::StoreError> {
        let key = self.key('q', &q.scope, id);
        match &self.redis {
            Some(store) => store.remove(&key).await,
            None => {
                self.memory.remove(&key);
                Ok(())
            }
        }
    }

    /// `amount` more requests for `id` in the current window of quota `q`, unless the window's
    /// credits would exceed [`MAX_CREDIT`]: whether it was given, and the counter after.
    pub async fn quota_credit(
        &self,
        q: &QuotaPolicy,
        id: &str,
        amount: u64,
    ) -> Result<(bool, QuotaUsage), redis::StoreError> {
        let key = self.key('q', &q.scope, id);
        let (given, u, leaves, tag) = match &self.redis {
            Some(store) => {
                store
                    .quota_credit(&key, &q.window, amount, MAX_CREDIT, self.now_for_store())
                    .await?
            }
            None => {
                self.memory
                    .quota_credit(&key, &q.window, amount, MAX_CREDIT, self.clock.now_us())
            }
        };
        Ok((given, QuotaUsage::of((u, leaves, tag))))
    }
}

/// The `RateLimit` item names of the limits, indexed like `LIMITS`.
const ITEM_NAMES: [&str; 4] = ["rate", "quota", "plan-rate", "plan-quota"];

/// One limit charged for a request: its store key, its parameters and its `LIMITS` index.
struct Charge {
    key: String,
    limit: Limit,
    metric: usize,
}

enum Limit {
    /// The GCRA parameters and the burst (what `RateLimit-Limit` shows).
    Rate(Gcra, u64),
    /// The window and the tag kept with the counter (0 for none).
    Quota(Window, u64),
}

impl Limit {
    /// The number of requests the limit allows (`RateLimit-Limit`).
    fn size(&self) -> u64 {
        match self {
            Limit::Rate(_, burst) => *burst,
            Limit::Quota(w, _) => w.limit,
        }
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
