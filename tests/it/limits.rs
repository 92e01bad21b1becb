//! Rate limits and quotas through the real gateway, in memory and through a real redis-server
//! (single and cluster): exact sharing across instances, failure modes, script reloads.

use crate::daemons::RedisCluster;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::support::*;

async fn call(port: u16, path: &str, key: Option<&str>) -> (u16, http::HeaderMap) {
    let fields: Vec<(&str, &str)> = key.map(|k| ("x-api-key", k)).into_iter().collect();
    let (s, h, _) = get_with(port, path, &fields).await.unwrap();
    (s, h)
}

fn yaml(backend: &TestBackend, limits: &str, redis: &str) -> String {
    format!(
        "gatewayPort: \"{{port}}\"\ngatewayBind: 127.0.0.1\nadminPort: \"{{admin}}\"\n{redis}services:\n  - name: users\n    path: /users/\n    backends: [\"{}\"]\n{limits}",
        backend.url()
    )
}

/// A `redis:` block; `extra` lines may set `timeout` (default here 200ms) and more.
fn redis_block(r: &RedisServer, extra: &str) -> String {
    let timeout = if extra.contains("timeout:") {
        ""
    } else {
        "  timeout: 200ms\n"
    };
    format!(
        "redis:\n  address: \"127.0.0.1:{}\"\n{timeout}{extra}",
        r.port
    )
}

/// A gateway with a large per-key quota through `redis` with a 100 ms timeout and the given
/// `failureMode`.
async fn quota_gateway(redis: &RedisServer, b: &TestBackend, failure_mode: &str) -> Gateway {
    let limits =
        "    quota: {enabled: true, limit: 100000, period: 1h, key: \"header:x-api-key\"}\n";
    Gateway::start(&yaml(
        b,
        limits,
        &redis_block(
            redis,
            &format!("  timeout: 100ms\n  failureMode: {failure_mode}\n"),
        ),
    ))
    .await
}

/// Redis connects in the background at start: sends requests with API key `key` until the
/// gateway has used it.
async fn wait_until_redis_used(redis: &RedisServer, gw: &Gateway, key: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while redis.calls("evalsha") == 0 {
        call(gw.port, "/users/warm", Some(key)).await;
        assert!(
            Instant::now() < deadline,
            "gateway never used Redis: {}",
            gw.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_burst_example_and_headers_in_memory() {
    let b = TestBackend::start(Behaviour::Hello).await;
    let gw = Gateway::start(&format!(
        "rateLimiting: {{enabled: true, ratePerSecond: 1, burst: 3}}\n{}",
        yaml(&b, "", "")
    ))
    .await;
    let mut codes = Vec::new();
    let mut last = None;
    for i in 1..=4 {
        let (s, h) = call(gw.port, &format!("/users/{i}"), None).await;
        codes.push(s);
        last = Some(h);
    }
    assert_eq!(codes, vec![200, 200, 200, 429]);
    let h = last.unwrap();
    assert_eq!(h["retry-after"], "1");
    assert_eq!(h["ratelimit-policy"], "\"rate\";q=3;w=3");
    assert_eq!(h["ratelimit"], "\"rate\";r=0;t=3");
    let (s, h) = call(gw.port, "/users/5", None).await;
    assert_eq!(s, 429);
    assert!(h.contains_key("retry-after"));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (s, h) = call(gw.port, "/users/6", None).await;
    assert_eq!(s, 200, "one more per second");
    assert!(h["ratelimit"]
        .to_str()
        .unwrap()
        .starts_with("\"rate\";r=0;"));
    let m = gw.metrics().await;
    assert!(m.contains("hexgate_ratelimit_decisions_total{service=\"users\",limit=\"rate\",result=\"limited\"} 2"), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_headers_and_per_service_override() {
    let b = TestBackend::start(Behaviour::Hello).await;
    let cfg = format!(
        "rateLimiting: {{enabled: true, ratePerSecond: 1, burst: 1}}\nrateLimitHeaders: legacy\n{}  - name: open\n    path: /open/\n    rateLimiting: {{enabled: false}}\n    backends: [\"{}\"]\n  - name: own\n    path: /own/\n    rateLimiting: {{enabled: true, ratePerSecond: 10, burst: 5, key: \"header:x-api-key\"}}\n    backends: [\"{}\"]\n",
        yaml(&b, "", ""),
        b.url(),
        b.url()
    );
    let gw = Gateway::start(&cfg).await;
    let (s, h) = call(gw.port, "/users/1", None).await;
    assert_eq!(s, 200);
    assert_eq!(h["ratelimit-limit"], "1");
    assert_eq!(h["ratelimit-remaining"], "0");
    assert!(!h.contains_key("ratelimit-policy"), "legacy only");
    assert_eq!(call(gw.port, "/users/2", None).await.0, 429);
    for _ in 0..10 {
        assert_eq!(
            call(gw.port, "/open/x", None).await.0,
            200,
            "limit disabled for this service"
        );
    }
    let codes: Vec<u16> = {
        let mut v = Vec::new();
        for _ in 0..6 {
            v.push(call(gw.port, "/own/x", Some("k1")).await.0);
        }
        v
    };
    assert_eq!(
        codes,
        vec![200, 200, 200, 200, 200, 429],
        "own burst of 5 per API key"
    );
    assert_eq!(
        call(gw.port, "/own/x", Some("k2")).await.0,
        200,
        "keys are isolated"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_window_through_redis_and_refusals_are_free() {
    let redis = RedisServer::start();
    let b = TestBackend::start(Behaviour::Hello).await;
    let limits = "    quota: {enabled: true, limit: 3, period: 2s, key: \"header:x-api-key\"}\n";
    let gw = Gateway::start(&yaml(&b, limits, &redis_block(&redis, ""))).await;
    wait_until_redis_used(&redis, &gw, "warmup").await;
    let start = Instant::now();
    let mut codes = Vec::new();
    for _ in 0..3 {
        codes.push(call(gw.port, "/users/1", Some("alice")).await.0);
    }
    assert_eq!(codes, vec![200, 200, 200]);
    // Refused requests (many) do not use up quota.
    let mut last = None;
    for _ in 0..20 {
        let (s, h) = call(gw.port, "/users/1", Some("alice")).await;
        assert_eq!(s, 429);
        last = Some(h);
    }
    let h = last.unwrap();
    let retry: u64 = h["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=3).contains(&retry), "Retry-After {retry}");
    assert_eq!(h["ratelimit-policy"], "\"quota\";q=3;w=2");
    assert_eq!(
        call(gw.port, "/users/1", Some("bob")).await.0,
        200,
        "per-consumer isolation"
    );
    // Once the window has passed, exactly `limit` again.
    let wait = Duration::from_millis(2100 + 2000 / 60).saturating_sub(start.elapsed());
    tokio::time::sleep(wait).await;
    let mut codes = Vec::new();
    for _ in 0..4 {
        codes.push(call(gw.port, "/users/1", Some("alice")).await.0);
    }
    assert_eq!(codes, vec![200, 200, 200, 429]);
    let keys = redis.cli(&["KEYS", "*"]);
    let alice = header_limit_key('q', "users", "alice");
    assert!(keys.contains(&alice), "hash-tagged key {alice}: {keys}");
    assert!(
        !keys.contains("alice"),
        "the header's value is not in Redis: {keys}"
    );
    let ttl: i64 = redis.cli(&["PTTL", &alice]).trim().parse().unwrap();
    assert!(ttl > 0 && ttl <= 4000, "idle keys expire: PTTL {ttl}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_gateways_share_one_quota_exactly_with_one_evalsha_per_limit() {
    let redis = RedisServer::start();
    let b = TestBackend::start(Behaviour::Hello).await;
    let limits = "    rateLimiting: {enabled: true, ratePerSecond: 100000, burst: 100000, key: \"header:x-api-key\"}\n    quota: {enabled: true, limit: 40, period: 1h, key: \"header:x-api-key\"}\n";
    let cfg = yaml(&b, limits, &redis_block(&redis, "  timeout: 2s\n"));
    let mut gws = Vec::new();
    for _ in 0..4 {
        gws.push(Gateway::start(&cfg).await);
    }
    // Warm every gateway's Redis connection (and script cache) on another key.
    for gw in &gws {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            call(gw.port, "/users/warm", Some("warmup")).await;
            let m = gw.metrics().await;
            if m.contains("limit=\"quota\",result=\"allowed\"") && !m.contains("failed_open") {
                break;
            }
            assert!(Instant::now() < deadline, "gateway never used Redis");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let evalsha_before = redis.calls("evalsha");
    let ok = Arc::new(AtomicU64::new(0));
    let limited = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    let ports: Vec<u16> = gws.iter().map(|g| g.port).collect();
    for t in 0..8 {
        let (ok, limited, ports) = (ok.clone(), limited.clone(), ports.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0..25 {
                let port = ports[(t + i) % ports.len()];
                match call(port, "/users/x", Some("shared")).await.0 {
                    200 => ok.fetch_add(1, Ordering::Relaxed),
                    429 => limited.fetch_add(1, Ordering::Relaxed),
                    other => panic!("unexpected status {other}"),
                };
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(
        ok.load(Ordering::Relaxed),
        40,
        "exactly the limit across 4 instances"
    );
    assert_eq!(limited.load(Ordering::Relaxed), 160);
    let evalsha = redis.calls("evalsha") - evalsha_before;
    // One EVALSHA per limit per request; requests the rate limit refused would add a refund.
    assert_eq!(evalsha, 400, "2 limits x 200 requests");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_fail_open_then_recovers_and_survives_script_flush() {
    let mut redis = RedisServer::start();
    let b = TestBackend::start(Behaviour::Hello).await;
    let gw = quota_gateway(&redis, &b, "open").await;
    wait_until_redis_used(&redis, &gw, "k").await;
    // SCRIPT FLUSH mid-run: the next call gets NOSCRIPT, reloads, and succeeds.
    redis.cli(&["SCRIPT", "FLUSH"]);
    for _ in 0..5 {
        assert_eq!(call(gw.port, "/users/1", Some("k")).await.0, 200);
    }
    let m = gw.metrics().await;
    assert!(
        !m.contains("failed_open"),
        "script flush must not count as a failure: {m}"
    );

    // Kill Redis under load: no failed requests, none slower than the timeout (plus slack).
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let failures = Arc::new(AtomicU64::new(0));
    let slowest = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..3 {
        let (stop, failures, slowest, port) =
            (stop.clone(), failures.clone(), slowest.clone(), gw.port);
        tasks.push(tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) && n < 20_000 {
                n += 1;
                let t = Instant::now();
                if call(port, "/users/1", Some("k")).await.0 != 200 {
                    failures.fetch_add(1, Ordering::Relaxed);
                }
                slowest.fetch_max(t.elapsed().as_millis() as u64, Ordering::Relaxed);
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    redis.kill();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let m = gw.metrics().await;
    assert!(
        m.contains("result=\"failed_open\""),
        "fail-open decisions counted: {m}"
    );
    redis.restart();
    let evalsha_deadline = Instant::now() + Duration::from_secs(10);
    while redis.calls("evalsha") == 0 {
        assert!(
            Instant::now() < evalsha_deadline,
            "Redis not used again after restart: {}",
            gw.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(
        failures.load(Ordering::Relaxed),
        0,
        "fail-open serves every request"
    );
    let slowest = slowest.load(Ordering::Relaxed);
    assert!(
        slowest < 1000,
        "a request waited {slowest}ms with a 100ms Redis timeout"
    );
    assert!(gw.metrics().await.contains("hexgate_redis_errors_total "));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_fail_closed_gives_503_then_recovers() {
    let mut redis = RedisServer::start();
    let b = TestBackend::start(Behaviour::Hello).await;
    let gw = quota_gateway(&redis, &b, "closed").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while call(gw.port, "/users/1", Some("k")).await.0 != 200 {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    redis.kill();
    let t = Instant::now();
    let (s, _) = call(gw.port, "/users/1", Some("k")).await;
    assert_eq!(s, 503);
    assert!(t.elapsed() < Duration::from_secs(1));
    assert!(gw.metrics().await.contains("result=\"failed_closed\""));
    redis.restart();
    let deadline = Instant::now() + Duration::from_secs(10);
    while call(gw.port, "/users/1", Some("k")).await.0 != 200 {
        assert!(
            Instant::now() < deadline,
            "never recovered after Redis came back: {}",
            gw.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_hosts_the_limits() {
    let cluster = RedisCluster::start();
    let nodes = &cluster.nodes;
    let b = TestBackend::start(Behaviour::Hello).await;
    let redis = cluster.config();
    let limits = "    quota: {enabled: true, limit: 3, period: 1h, key: \"header:x-api-key\"}\n";
    let gw = Gateway::start(&yaml(&b, limits, &redis)).await;
    // Calls made before the cluster connection is up fail open (and stay counted): wait until
    // a call is decided by the cluster, i.e. the failed-open count stops growing.
    let failed_open = |m: &str| -> u64 {
        m.lines()
            .filter(|l| l.contains("limit=\"quota\",result=\"failed_open\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let before = failed_open(&gw.metrics().await);
        call(gw.port, "/users/w", Some("warm")).await;
        let m = gw.metrics().await;
        if m.contains("limit=\"quota\",result=\"allowed\"") && failed_open(&m) == before {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "cluster never used: {}",
            gw.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let warmed = failed_open(&gw.metrics().await);
    for consumer in 0..12 {
        let key = format!("consumer-{consumer}");
        let mut codes = Vec::new();
        for _ in 0..4 {
            codes.push(call(gw.port, "/users/x", Some(&key)).await.0);
        }
        assert_eq!(codes, vec![200, 200, 200, 429], "{key}");
    }
    let with_keys = nodes
        .iter()
        .filter(|n| n.cli(&["DBSIZE"]).trim().parse::<u64>().unwrap_or(0) > 0)
        .count();
    assert!(with_keys >= 2, "keys spread over the masters");
    assert_eq!(
        failed_open(&gw.metrics().await),
        warmed,
        "no decision failed open once the cluster was in use"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_slower_than_its_timeout_fails_open_within_the_timeout() {
    let redis = RedisServer::start_with(&["--enable-debug-command", "yes"]);
    let b = TestBackend::start(Behaviour::Hello).await;
    let gw = quota_gateway(&redis, &b, "open").await;
    wait_until_redis_used(&redis, &gw, "k").await;
    // Redis stalls for 2 s (DEBUG SLEEP blocks its only thread): every request during the stall
    // is answered by the in-memory fallback within about the timeout.
    let port = redis.port;
    let sleeper = std::thread::spawn(move || {
        std::process::Command::new("redis-cli")
            .args(["-p", &port.to_string(), "DEBUG", "SLEEP", "2"])
            .output()
            .expect("redis-cli runs")
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut slowest = Duration::ZERO;
    for i in 0..10 {
        let t = Instant::now();
        let (status, _) = call(gw.port, &format!("/users/{i}"), Some("k")).await;
        slowest = slowest.max(t.elapsed());
        assert_eq!(status, 200, "failureMode open serves during the stall");
    }
    eprintln!("redis stalled 2 s: slowest of 10 requests {slowest:?} (timeout 100 ms)");
    assert!(
        slowest < Duration::from_millis(700),
        "no request waits much beyond the 100 ms timeout: {slowest:?}"
    );
    sleeper.join().unwrap();
    let m = gw.metrics().await;
    assert!(m.contains("result=\"failed_open\""), "{m}");
    // After the stall Redis decides again, without a restart.
    let before = redis.calls("evalsha");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        assert_eq!(call(gw.port, "/users/after", Some("k")).await.0, 200);
        if redis.calls("evalsha") > before {
            break;
        }
        assert!(Instant::now() < deadline, "Redis not used after the stall");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A script missing on the server (first use, SCRIPT FLUSH) is loaded and run again on its own:
/// when the rate script ran and only the quota script was missing, the request is counted once
/// against the rate limit, not twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_script_reruns_only_that_script() {
    let redis = RedisServer::start();
    let b = TestBackend::start(Behaviour::Hello).await;
    let gw = Gateway::start(&format!(
        "gatewayPort: \"{{port}}\"\ngatewayBind: 127.0.0.1\nadminPort: \"{{admin}}\"\n{}\
         rateLimiting: {{enabled: true, ratePerSecond: 1, burst: 5, key: \"header:x-api-key\"}}\n\
         services:\n  - name: users\n    path: /users/\n    backends: [\"{url}\"]\n\
         \x20   quota: {{enabled: true, limit: 1000, period: 1h, key: \"header:x-api-key\"}}\n\
         \x20 - name: other\n    path: /other/\n    backends: [\"{url}\"]\n",
        redis_block(&redis, ""),
        url = b.url()
    ))
    .await;
    wait_until_redis_used(&redis, &gw, "warm").await;
    redis.cli(&["SCRIPT", "FLUSH"]);
    // The rate script alone (loaded again on NOSCRIPT): 4 of 5 left.
    let (s, h) = call(gw.port, "/other/1", Some("k")).await;
    assert_eq!(s, 200);
    let rate = |h: &http::HeaderMap| {
        h.get("ratelimit")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    assert!(rate(&h).contains("\"rate\";r=4;"), "{:?}", h);
    // Rate and quota together: the rate script runs, the quota script is missing and reruns
    // alone, so the rate limit counts this request once: 3 left.
    let (s, h) = call(gw.port, "/users/1", Some("k")).await;
    assert_eq!(s, 200);
    assert!(rate(&h).contains("\"rate\";r=3;"), "{}", rate(&h));
    assert!(rate(&h).contains("\"quota\";r=999;"), "{}", rate(&h));
}
