//! The two limit stores against each other and against a plain model.
//!
//! The memory store (`algo.rs`) and the Redis scripts (`redis.rs`) are two implementations of one
//! rule. Random sequences (seeded; the seed is printed, and `LIMITS_DIFF_SEED=<seed>` replays one)
//! of keys, policies, time steps and concurrent batches go through a memory-only `Limiter` and a
//! `Limiter` on a real redis-server, both on the same manual clock (passed to the Lua scripts as
//! their `now`); every decision, Retry-After and RateLimit field must match. Both are also checked
//! against an exact request log (the documented quota bounds) and a GCRA model. Then: fail-open
//! to memory and fail-closed when redis-server is killed, and the regression from the issue "The
//! embedded default does not enforce quotas".

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use hexgate::config::{Config, Quota, RateLimit};
use hexgate::limits::algo::BUCKETS;
use hexgate::limits::{Clock, KeyKind, Limiter, ManualClock, RoutePolicies, Verdict};
use hexgate::metrics::{Registry, ServiceMetrics};
use http::HeaderMap;

use crate::support::RedisServer;

const S: u64 = 1_000_000;
/// A realistic epoch (the Lua scripts compute in doubles, exact below 2^53 microseconds).
const EPOCH: u64 = 1_700_000_000 * S;
const CASES: usize = 60;
const IPS: [&str; 3] = ["10.0.0.1", "10.0.0.2", "2001:db8::3"];
const CONSUMERS: [Option<&str>; 3] = [Some("alice"), Some("bob"), None];

/// Limits config: `redis` is (port, failureMode, keyPrefix).
fn config(headers: &str, redis: Option<(u16, &str, &str)>) -> Config {
    let mut yaml = format!("rateLimitHeaders: {headers}\n");
    if let Some((port, mode, prefix)) = redis {
        yaml.push_str(&format!(
            "redis:\n  address: \"127.0.0.1:{port}\"\n  timeout: 5s\n  failureMode: {mode}\n  keyPrefix: \"{prefix}\"\n"
        ));
    }
    yaml.push_str("services: []\n");
    hexgate::config::parse(&yaml, "limits_diff.yaml").unwrap_or_else(|e| panic!("{e}"))
}

fn rate(rate_per_second: f64, burst: u64, key: &str) -> RateLimit {
    RateLimit {
        enabled: true,
        rate_per_second,
        burst,
        key: hexgate::config::LimitKey::parse(key).expect("a limit key"),
    }
}

fn quota(limit: u64, period: Duration, key: &str) -> Quota {
    Quota {
        enabled: true,
        limit,
        period,
        key: hexgate::config::LimitKey::parse(key).expect("a limit key"),
    }
}

/// A quota-only route on its own scope, used to see whether a limiter reaches Redis yet.
fn probe_policies() -> RoutePolicies {
    let q = quota(1_000_000, Duration::from_secs(3600), "consumer");
    let no_rate = RateLimit {
        enabled: false,
        ..rate(1.0, 1, "ip")
    };
    RoutePolicies::build(&config("both", None), "probe", Some(&no_rate), Some(&q)).unwrap()
}

/// Redis connects in the background: with failureMode closed, polls until a decision is not
/// `unavailable` (bounded).
async fn wait_closed_connected(l: &Limiter, m: &ServiceMetrics) {
    let p = probe_policies();
    let ip: IpAddr = IPS[0].parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    for _ in 0..2000 {
        if !l
            .check(Some(&p), None, m, ip, Some("probe"), &HeaderMap::new())
            .await
            .unavailable
        {
            return;
        }
        assert!(Instant::now() < deadline, "the limiter never reached Redis");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("the limiter never reached Redis");
}

/// As above for failureMode open, where a failed decision looks like any other: polls until a
/// decision adds no Redis error.
async fn wait_open_connected(l: &Limiter, m: &ServiceMetrics, registry: &Registry) {
    let p = probe_policies();
    let ip: IpAddr = IPS[0].parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    for _ in 0..2000 {
        let before = registry.redis_errors.load(Ordering::Relaxed);
        l.check(Some(&p), None, m, ip, Some("probe"), &HeaderMap::new())
            .await;
        if registry.redis_errors.load(Ordering::Relaxed) == before {
            return;
        }
        assert!(Instant::now() < deadline, "the limiter never reached Redis");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("the limiter never reached Redis");
}

fn ident(kind: &KeyKind, ip: usize, consumer: usize) -> String {
    match kind {
        KeyKind::Ip => IPS[ip].parse::<IpAddr>().unwrap().to_string(),
        KeyKind::Consumer => CONSUMERS[consumer].unwrap_or("-").to_string(),
        KeyKind::Header(_) => unreachable!("not generated"),
    }
}

/// One request: route index, IP index, consumer index.
#[derive(Debug, Clone, Copy)]
struct Req {
    route: usize,
    ip: usize,
    consumer: usize,
}

/// The model's names for the limit keys of a request (scope and identity, as the store's keys).
fn keys(routes: &[RoutePolicies], r: Req) -> (Option<String>, Option<String>) {
    let p = &routes[r.route];
    (
        p.rate
            .as_ref()
            .map(|x| format!("{}|{}", x.scope, ident(&x.key, r.ip, r.consumer))),
        p.quota
            .as_ref()
            .map(|x| format!("{}|{}", x.scope, ident(&x.key, r.ip, r.consumer))),
    )
}

/// The reference: a GCRA per rate key, and the exact log of admitted timestamps per key.
#[derive(Default)]
struct Model {
    tat: BTreeMap<String, u64>,
    rate_log: BTreeMap<String, Vec<u64>>,
    quota_log: BTreeMap<String, Vec<u64>>,
}

impl Model {
    /// GCRA: admitted when `max(tat, now) + T - now <= burst * T`; returns (admitted, retry_us).
    /// The rate limit is charged whatever the quota says, so the model is too.
    fn rate(&mut self, p: &RoutePolicies, key: &Option<String>, now: u64) -> (bool, u64) {
        let (Some(r), Some(k)) = (&p.rate, key) else {
            return (true, 0);
        };
        let (t, b) = (r.gcra.interval_us, r.gcra.burst);
        let base = self.tat.get(k).copied().unwrap_or(now).max(now);
        if base + t - now <= b * t {
            self.tat.insert(k.clone(), base + t);
            (true, 0)
        } else {
            (false, base + t - now - b * t)
        }
    }

    /// Requests admitted by the exact log within `(now - span, now]` on `key`.
    fn quota_count(&self, key: &str, now: u64, span: u64) -> u64 {
        self.quota_log
            .get(key)
            .map_or(0, |l| l.iter().filter(|&&a| a + span > now).count() as u64)
    }

    /// Records `n` admissions at `now` and checks the bounds that must hold after them.
    fn admit(
        &mut self,
        p: &RoutePolicies,
        keys: &(Option<String>, Option<String>),
        now: u64,
        n: u64,
        ctx: &str,
    ) {
        if n == 0 {
            return;
        }
        if let (Some(r), Some(k)) = (&p.rate, &keys.0) {
            let log = self.rate_log.entry(k.clone()).or_default();
            log.extend(std::iter::repeat_n(now, n as usize));
            // GCRA: in any interval [a, now], at most burst + (now - a) / T admitted.
            for (i, &a) in log.iter().enumerate() {
                let in_interval = (log.len() - i) as u64;
                let bound = r.gcra.burst + (now - a) / r.gcra.interval_us;
                assert!(
                    in_interval <= bound,
                    "{ctx}: {in_interval} admitted on {k} in [{a}, {now}], GCRA allows {bound}"
                );
            }
        }
        if let (Some(q), Some(k)) = (&p.quota, &keys.1) {
            self.quota_log
                .entry(k.clone())
                .or_default()
                .extend(std::iter::repeat_n(now, n as usize));
            // Never more than `limit` in any window of length `period` (it ends at an admission).
            let in_window = self.quota_count(k, now, q.window.period_us);
            assert!(
                in_window <= q.window.limit,
                "{ctx}: {in_window} admitted on {k} within one period, limit {}",
                q.window.limit
            );
        }
    }
}

/// The span an exact log must count over for a quota refusal to be allowed: the store counts
/// the buckets `cur - BUCKETS ..= cur`, all within `(now - (BUCKETS + 1) * w, now]`. That is the
/// documented bound (refused at most one bucket width `w` earlier than the exact log) with the
/// period rounded up to `BUCKETS * w` (under `BUCKETS` microseconds more).
fn refusal_span(w_us: u64) -> u64 {
    (BUCKETS + 1) * w_us
}

/// A random case: the RateLimit fields mode, a global rate limit or none, 1-3 routes.
fn gen_routes(rng: &mut fastrand::Rng) -> (String, Vec<RoutePolicies>) {
    let headers = ["draft", "legacy", "both", "both"][rng.usize(0..4)];
    let mut cfg = config(headers, None);
    let kind = |rng: &mut fastrand::Rng| ["ip", "consumer"][rng.usize(0..2)];
    let gen_rate = |rng: &mut fastrand::Rng| {
        let per_second = [0.2, 0.5, 1.0, 1.0, 2.0, 3.0, 10.0, 50.0][rng.usize(0..8)];
        rate(per_second, rng.u64(1..=6), kind(rng))
    };
    if rng.u8(0..3) == 0 {
        cfg.rate_limiting = Some(gen_rate(rng));
    }
    let mut routes = Vec::new();
    for i in 0..rng.usize(1..=3) {
        let shape = rng.u8(0..3); // 0 rate only, 1 quota only, 2 both
        let own_rate = match shape {
            1 => Some(RateLimit {
                enabled: false,
                ..gen_rate(rng)
            }),
            // The global limit (scope "@global", shared by routes) when there is one, half the time.
            _ if cfg.rate_limiting.is_some() && rng.bool() => None,
            _ => Some(gen_rate(rng)),
        };
        let q = (shape != 0).then(|| {
            let secs = [1, 2, 7, 60, 3600][rng.usize(0..5)];
            quota(rng.u64(1..=8), Duration::from_secs(secs), kind(rng))
        });
        let p = RoutePolicies::build(&cfg, &format!("svc{i}"), own_rate.as_ref(), q.as_ref())
            .expect("a route with limits");
        assert!(p.rate.is_some() || p.quota.is_some());
        routes.push(p);
    }
    let desc = routes
        .iter()
        .map(|p| {
            format!(
                "[rate {:?} quota {:?}]",
                p.rate.as_ref().map(|r| (&r.scope, r.gcra, &r.key)),
                p.quota.as_ref().map(|q| (&q.scope, q.window, &q.key))
            )
        })
        .collect::<Vec<_>>()
        .join(" ");
    (format!("headers {headers} {desc}"), routes)
}

/// The next time step: same instant, sub-interval, across a bucket or interval boundary, or a
/// long pause.
fn gen_step(rng: &mut fastrand::Rng, routes: &[RoutePolicies], now: u64) -> u64 {
    let widths: Vec<u64> = routes
        .iter()
        .filter_map(|p| p.quota.as_ref().map(|q| q.window.width_us()))
        .collect();
    let intervals: Vec<u64> = routes
        .iter()
        .filter_map(|p| p.rate.as_ref().map(|r| r.gcra.interval_us))
        .collect();
    let longest = routes
        .iter()
        .map(|p| p.quota.as_ref().map_or(10 * S, |q| q.window.period_us))
        .max()
        .unwrap_or(10 * S);
    match rng.u8(0..100) {
        0..=24 => 0,
        25..=49 => rng.u64(1..=S / 5),
        50..=64 => rng.u64(S / 5..=3 * S),
        65..=79 if !widths.is_empty() => {
            // Just before, at or just after the next quota bucket boundary.
            let w = widths[rng.usize(0..widths.len())];
            (now / w + 1) * w + rng.u64(0..=2) - 1 - now
        }
        80..=89 if !intervals.is_empty() => {
            let t = intervals[rng.usize(0..intervals.len())];
            (rng.u64(1..=3) * t + rng.u64(0..=2)).saturating_sub(1)
        }
        90..=99 => rng.u64(0..=longest + longest / 2),
        _ => rng.u64(0..=2 * S),
    }
}

struct Pair<'a> {
    memory: &'a Limiter,
    redis: &'a Limiter,
    m: &'a ServiceMetrics,
}

async fn one(l: &Limiter, m: &ServiceMetrics, routes: &[RoutePolicies], r: Req) -> Verdict {
    let ip: IpAddr = IPS[r.ip].parse().unwrap();
    let consumer = CONSUMERS[r.consumer];
    l.check(
        Some(&routes[r.route]),
        None,
        m,
        ip,
        consumer,
        &HeaderMap::new(),
    )
    .await
}

/// Drives `steps` random steps through both limiters. `exact_batches`: compare the requests of a
/// concurrent batch one by one (both limiters decide in memory) rather than by count.
async fn drive(
    rng: &mut fastrand::Rng,
    pair: &Pair<'_>,
    clock: &ManualClock,
    routes: &[RoutePolicies],
    steps: usize,
    exact_batches: bool,
    ctx: &str,
) -> (u64, u64) {
    let mut model = Model::default();
    let (mut admitted, mut requests) = (0u64, 0u64);
    for step in 0..steps {
        clock.advance_us(gen_step(rng, routes, clock.now_us()));
        let now = clock.now_us();
        let ctx = format!("{ctx} step {step} t={now}");
        if rng.u8(0..10) < 7 {
            // One request, compared field by field and with the model.
            let r = Req {
                route: rng.usize(0..routes.len()),
                ip: rng.usize(0..IPS.len()),
                consumer: rng.usize(0..CONSUMERS.len()),
            };
            let ctx = format!("{ctx} {r:?}");
            let p = &routes[r.route];
            let keys = keys(routes, r);
            let (rate_ok, retry_us) = model.rate(p, &keys.0, now);
            let vm = one(pair.memory, pair.m, routes, r).await;
            let vr = one(pair.redis, pair.m, routes, r).await;
            assert!(!vr.unavailable, "{ctx}: Redis failed mid-run");
            assert!(!vm.unavailable, "{ctx}");
            assert_eq!(
                (vm.retry_after, &vm.headers),
                (vr.retry_after, &vr.headers),
                "{ctx}: memory (left) and Redis (right) differ"
            );
            let ok = vm.retry_after.is_none();
            requests += 1;
            if !rate_ok {
                assert!(!ok, "{ctx}: admitted, the GCRA model refuses");
            }
            match &p.quota {
                None => {
                    assert_eq!(
                        ok, rate_ok,
                        "{ctx}: the GCRA model decides a rate-only route"
                    );
                    if !ok {
                        let want = retry_us.div_ceil(S).max(1);
                        assert_eq!(vm.retry_after, Some(want), "{ctx}: Retry-After");
                    }
                }
                Some(q) if rate_ok && !ok => {
                    let k = keys.1.as_deref().unwrap();
                    let n = model.quota_count(k, now, refusal_span(q.window.width_us()));
                    assert!(
                        n >= q.window.limit,
                        "{ctx}: quota refused with {n} admitted in the last period plus one \
                         bucket, limit {}",
                        q.window.limit
                    );
                }
                Some(_) => {}
            }
            if ok {
                admitted += 1;
                model.admit(p, &keys, now, 1, &ctx);
            }
        } else {
            // Concurrent requests at one instant. Within a batch, IPs and consumers are paired
            // one to one, so all requests on one quota key share one rate key: at one instant a
            // rate key admits its first requests and refuses the rest, so the quota slots that
            // rate-refused requests hold until their give-back are taken after every admitted
            // request on that quota key was decided, and cannot change how many are admitted.
            let mut pairing = [0, 1, 2];
            rng.shuffle(&mut pairing);
            let batch: Vec<Req> = (0..rng.usize(2..=8))
                .map(|_| {
                    let c = rng.usize(0..3);
                    Req {
                        route: rng.usize(0..routes.len()),
                        ip: c,
                        consumer: pairing[c],
                    }
                })
                .collect();
            let ctx = format!("{ctx} batch {batch:?}");
            let vm = join_all(batch.iter().map(|&r| one(pair.memory, pair.m, routes, r))).await;
            let vr = join_all(batch.iter().map(|&r| one(pair.redis, pair.m, routes, r))).await;
            assert!(
                vr.iter().all(|v| !v.unavailable),
                "{ctx}: Redis failed mid-run"
            );
            requests += batch.len() as u64;
            // Concurrent checks may be decided in any order, and a refused request's quota slot
            // is held until its give-back (in Redis a round trip later, after the rest of the
            // batch was decided; in memory at once). So another request's quota remaining, and a
            // rate-refused request's Retry-After, may differ between stores; what must not
            // differ is how many were admitted, per route and client and in all.
            let mut counts: BTreeMap<(usize, usize), [u64; 3]> = BTreeMap::new();
            for (i, r) in batch.iter().enumerate() {
                let c = counts.entry((r.route, r.ip)).or_default();
                c[0] += 1;
                c[1] += u64::from(vm[i].retry_after.is_none());
                c[2] += u64::from(vr[i].retry_after.is_none());
                if exact_batches {
                    assert_eq!(
                        (vm[i].retry_after, &vm[i].headers),
                        (vr[i].retry_after, &vr[i].headers),
                        "{ctx}: request {i}: memory (left) and fallback (right) differ"
                    );
                }
            }
            for (&(route, ip), c) in &counts {
                assert_eq!(
                    c[1], c[2],
                    "{ctx}: route {route} client {ip}: memory admitted {} of {}, Redis {}",
                    c[1], c[0], c[2]
                );
            }
            // The model: the GCRA admits the same number on a key at one instant in any order.
            let mut rate_ok: BTreeMap<String, (u64, u64, bool)> = BTreeMap::new();
            let mut quota_room: BTreeMap<String, u64> = BTreeMap::new();
            for &r in &batch {
                let keys = keys(routes, r);
                let p = &routes[r.route];
                let (ok, _) = model.rate(p, &keys.0, now);
                if let Some(k) = keys.0 {
                    let e = rate_ok.entry(k).or_default();
                    e.0 += u64::from(ok);
                    e.2 |= p.quota.is_some();
                }
                if let (Some(q), Some(k)) = (&p.quota, keys.1) {
                    let span = refusal_span(q.window.width_us());
                    let before = model.quota_count(&k, now, span);
                    quota_room
                        .entry(k)
                        .or_insert(q.window.limit.saturating_sub(before));
                }
            }
            let mut quota_only: BTreeMap<String, (u64, u64)> = BTreeMap::new();
            for (&(route, ip), c) in &counts {
                let r = Req {
                    route,
                    ip,
                    consumer: pairing[ip],
                };
                let p = &routes[route];
                let keys = keys(routes, r);
                admitted += c[1];
                if let Some(k) = &keys.0 {
                    rate_ok.get_mut(k).unwrap().1 += c[1];
                } else if let Some(k) = &keys.1 {
                    let e = quota_only.entry(k.clone()).or_default();
                    e.0 += c[0];
                    e.1 += c[1];
                }
                model.admit(p, &keys, now, c[1], &ctx);
            }
            for (k, (model_ok, got, with_quota)) in &rate_ok {
                assert!(
                    got <= model_ok,
                    "{ctx}: {got} admitted on {k}, GCRA model {model_ok}"
                );
                if !with_quota {
                    assert_eq!(got, model_ok, "{ctx}: rate key {k}");
                }
            }
            for (k, (sent, got)) in &quota_only {
                let room = quota_room[k];
                assert!(
                    *got >= room.min(*sent),
                    "{ctx}: {got} of {sent} admitted on {k}; the exact log has room for {room}"
                );
            }
        }
    }
    (admitted, requests)
}

fn seed() -> u64 {
    std::env::var("LIMITS_DIFF_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_and_redis_stores_decide_alike() {
    let redis = RedisServer::start();
    let seed = seed();
    eprintln!("limits_diff seed {seed} (replay: LIMITS_DIFF_SEED={seed} cargo test --test it limits_diff)");
    let mut rng = fastrand::Rng::with_seed(seed);
    let started = Instant::now();
    let (mut admitted, mut requests) = (0, 0);
    for case in 0..CASES {
        let (desc, routes) = gen_routes(&mut rng);
        let ctx = format!("seed {seed} case {case} ({desc})");
        let clock = ManualClock::new(EPOCH + rng.u64(0..3600 * S));
        let registry = Arc::new(Registry::default());
        let m = registry.service("svc");
        let memory = Limiter::with_clock(
            &config("both", None),
            registry.clone(),
            Clock::Manual(clock.clone()),
        );
        let prefix = format!("diff{case}:");
        let on_redis = Limiter::with_clock(
            &config("both", Some((redis.port, "closed", &prefix))),
            registry.clone(),
            Clock::Manual(clock.clone()),
        );
        assert!(on_redis.uses_redis() && !memory.uses_redis());
        wait_closed_connected(&on_redis, &m).await;
        let pair = Pair {
            memory: &memory,
            redis: &on_redis,
            m: &m,
        };
        let steps = rng.usize(80..=140);
        let (a, n) = drive(&mut rng, &pair, &clock, &routes, steps, false, &ctx).await;
        admitted += a;
        requests += n;
    }
    eprintln!(
        "{CASES} cases, {requests} requests ({admitted} admitted) through both stores in {:?}",
        started.elapsed()
    );
    assert!(
        admitted > 0 && admitted < requests,
        "both outcomes exercised"
    );
}

/// The issue: 1/s burst 3, quota 5 per hour per consumer, one request every 0.2 s for 12 s of
/// the manual clock: exactly 5 admitted, in memory and in Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_rate_and_quota_admit_exactly_the_quota_in_both_stores() {
    let redis = RedisServer::start();
    let policies_cfg = config("both", None);
    let p = RoutePolicies::build(
        &policies_cfg,
        "users",
        Some(&rate(1.0, 3, "consumer")),
        Some(&quota(5, Duration::from_secs(3600), "consumer")),
    )
    .unwrap();
    let registry = Arc::new(Registry::default());
    let m = registry.service("users");
    let ip: IpAddr = IPS[0].parse().unwrap();
    for store in ["memory", "redis"] {
        let clock = ManualClock::new(EPOCH);
        let cfg = match store {
            "memory" => config("both", None),
            _ => config("both", Some((redis.port, "closed", "issue:"))),
        };
        let l = Limiter::with_clock(&cfg, registry.clone(), Clock::Manual(clock.clone()));
        if l.uses_redis() {
            wait_closed_connected(&l, &m).await;
        }
        let mut admitted = Vec::new();
        for i in 0..60u64 {
            let v = l
                .check(Some(&p), None, &m, ip, Some("alice"), &HeaderMap::new())
                .await;
            assert!(!v.unavailable, "{store}: Redis failed");
            if v.retry_after.is_none() {
                admitted.push(i);
            }
            clock.advance_us(S / 5);
        }
        // The burst at 0, 0.2 and 0.4 s, then one a second at 1 s and 2 s; then the quota is
        // used up for the hour.
        assert_eq!(
            admitted,
            vec![0, 1, 2, 5, 10],
            "{store}: admitted request numbers"
        );
    }
}

/// Redis killed: failureMode open decides from then on exactly as a memory-only limiter does;
/// failureMode closed reports every request `unavailable`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_open_decides_as_memory_closed_is_unavailable() {
    let mut redis = RedisServer::start();
    let seed = seed();
    eprintln!("limits_diff seed {seed} (replay: LIMITS_DIFF_SEED={seed} cargo test --test it limits_diff)");
    let mut rng = fastrand::Rng::with_seed(seed);
    let clock = ManualClock::new(EPOCH + rng.u64(0..3600 * S));
    let registry = Arc::new(Registry::default());
    let m = registry.service("svc");
    let open = Limiter::with_clock(
        &config("both", Some((redis.port, "open", "open:"))),
        registry.clone(),
        Clock::Manual(clock.clone()),
    );
    let closed = Limiter::with_clock(
        &config("both", Some((redis.port, "closed", "closed:"))),
        registry.clone(),
        Clock::Manual(clock.clone()),
    );
    wait_open_connected(&open, &m, &registry).await;
    wait_closed_connected(&closed, &m).await;
    let (desc, routes) = gen_routes(&mut rng);
    let ctx = format!("seed {seed} ({desc})");

    // While Redis is up, the open limiter decides through it like memory does.
    let memory = Limiter::with_clock(
        &config("both", None),
        registry.clone(),
        Clock::Manual(clock.clone()),
    );
    let errors = registry.redis_errors.load(Ordering::Relaxed);
    let pair = Pair {
        memory: &memory,
        redis: &open,
        m: &m,
    };
    drive(
        &mut rng,
        &pair,
        &clock,
        &routes,
        40,
        false,
        &format!("{ctx} up"),
    )
    .await;
    assert_eq!(
        registry.redis_errors.load(Ordering::Relaxed),
        errors,
        "{ctx}: Redis used while up"
    );
    let evalsha = redis.calls("evalsha");
    assert!(evalsha > 0, "{ctx}: Redis used while up");

    redis.kill();
    // From now on the open limiter fails open to its memory store, which is as fresh (for these
    // keys) as a new memory-only limiter: every decision is the same, batches included.
    let fresh = Limiter::with_clock(
        &config("both", None),
        registry.clone(),
        Clock::Manual(clock.clone()),
    );
    let pair = Pair {
        memory: &fresh,
        redis: &open,
        m: &m,
    };
    let down = format!("{ctx} down");
    let (_, n) = drive(&mut rng, &pair, &clock, &routes, 60, true, &down).await;
    let failed = registry.redis_errors.load(Ordering::Relaxed) - errors;
    assert!(
        failed >= n,
        "{down}: {failed} Redis errors for {n} requests"
    );
    let failed_open: u64 = m
        .limit_decisions
        .iter()
        .map(|l| l[2].load(Ordering::Relaxed))
        .sum();
    assert!(failed_open > 0, "{down}: fail-open decisions counted");

    // failureMode closed: every request with a limit is unavailable, and nothing else is said.
    let ip: IpAddr = IPS[1].parse().unwrap();
    for (i, p) in routes.iter().chain([&probe_policies()]).enumerate() {
        for _ in 0..3 {
            let v = closed
                .check(Some(p), None, &m, ip, Some("bob"), &HeaderMap::new())
                .await;
            assert!(
                v.unavailable,
                "{down}: route {i}: closed must be unavailable"
            );
            assert!(
                v.retry_after.is_none() && v.headers.is_empty(),
                "{down}: {v:?}"
            );
        }
    }
    let failed_closed: u64 = m
        .limit_decisions
        .iter()
        .map(|l| l[3].load(Ordering::Relaxed))
        .sum();
    assert!(failed_closed > 0, "{down}: fail-closed decisions counted");
}

/// Plans and the quota ledger, memory against Redis on one manual clock: random sequences of
/// requests (a route's limits with a consumer's plan, plans switched between requests), ledger
/// reads, credits and resets, and time steps; every verdict (RateLimit fields and Retry-After
/// included) and every read must match. A consumer id with `{`, `}`, `:` and `%` is among them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plans_and_ledger_decide_alike_in_both_stores() {
    let redis = RedisServer::start();
    let seed = seed();
    eprintln!("plans/ledger seed {seed} (replay: LIMITS_DIFF_SEED={seed})");
    let mut rng = fastrand::Rng::with_seed(seed);
    let plans_yaml = "plans:\n  small: {rateLimiting: {ratePerSecond: 2, burst: 3}, quota: {limit: 6, period: 1m}}\n  big: {quota: {limit: 9, period: 1m}}\n  third: {quota: {limit: 4, period: 1m}}\n";
    let with_plans = |redis: Option<(u16, &str)>| {
        let mut yaml = format!("rateLimitHeaders: both\n{plans_yaml}");
        if let Some((port, prefix)) = redis {
            yaml.push_str(&format!(
                "redis:\n  address: \"127.0.0.1:{port}\"\n  timeout: 5s\n  failureMode: closed\n  keyPrefix: \"{prefix}\"\n"
            ));
        }
        yaml.push_str("services: []\n");
        hexgate::config::parse(&yaml, "plans_diff.yaml").unwrap_or_else(|e| panic!("{e}"))
    };
    let plans = hexgate::limits::Plans::build(&with_plans(None)).expect("plans");
    let names = ["small", "big", "third"];
    let route = RoutePolicies::build(
        &config("both", None),
        "svc",
        None,
        Some(&quota(7, Duration::from_secs(120), "consumer")),
    )
    .unwrap();
    let ip: IpAddr = IPS[0].parse().unwrap();
    for case in 0..30 {
        let clock = ManualClock::new(EPOCH + rng.u64(0..3600 * S));
        let registry = Arc::new(Registry::default());
        let m = registry.service("svc");
        let memory = Limiter::with_clock(
            &with_plans(None),
            registry.clone(),
            Clock::Manual(clock.clone()),
        );
        let prefix = format!("plans{case}:");
        let on_redis = Limiter::with_clock(
            &with_plans(Some((redis.port, &prefix))),
            registry.clone(),
            Clock::Manual(clock.clone()),
        );
        wait_closed_connected(&on_redis, &m).await;
        let consumers = ["c0", "c1", "c{2}:%"];
        for step in 0..150 {
            let ctx = format!("seed {seed} case {case} step {step}");
            let who = consumers[rng.usize(..consumers.len())];
            let plan = plans.get(names[rng.usize(..names.len())]).unwrap();
            let q = plan.quota.as_ref().unwrap();
            match rng.u8(..10) {
                0..=5 => {
                    let with_route = rng.bool();
                    let r = with_route.then_some(&route);
                    let a = memory
                        .check(r, Some(plan), &m, ip, Some(who), &HeaderMap::new())
                        .await;
                    let b = on_redis
                        .check(r, Some(plan), &m, ip, Some(who), &HeaderMap::new())
                        .await;
                    assert_eq!(
                        (a.retry_after, &a.headers, a.unavailable),
                        (b.retry_after, &b.headers, b.unavailable),
                        "{ctx}: check {who} on {}",
                        plan.name
                    );
                }
                6 => {
                    let n = rng.u64(1..4);
                    memory.quota_credit(q, who, n).await.unwrap();
                    on_redis.quota_credit(q, who, n).await.unwrap();
                }
                7 => {
                    memory.quota_reset(q, who).await.unwrap();
                    on_redis.quota_reset(q, who).await.unwrap();
                }
                _ => clock.advance_us(rng.u64(0..20 * S)),
            }
            let a = memory.quota_read(q, who).await.unwrap();
            let b = on_redis.quota_read(q, who).await.unwrap();
            assert_eq!(a, b, "{ctx}: read {who} on {}", plan.name);
        }
    }
}
