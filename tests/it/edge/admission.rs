//! What is refused before it costs anything (CONNECT, a declared oversized body), and the
//! quota of the embedded (memory) limit store beside Redis.

use std::time::{Duration, Instant};

use super::{h2_request, Capture, TOP};
use crate::raw::{exchange, status};
use crate::support::*;

// ---------------------------------------------------------------------------------------------
// CONNECT

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_is_refused_and_logged_as_refused() {
    let b = Capture::start("b").await;
    let yaml = format!(
        "{TOP}accessLog: true\nservices:\n  - name: s\n    path: /\n    backends: [\"{}\"]\n",
        b.url()
    );
    let gw = Gateway::start(&yaml).await;
    for target in ["/path", "example.com:443", "127.0.0.1:22"] {
        let r = exchange(
            gw.port,
            format!(
                "CONNECT {target} HTTP/1.1\r\nHost: {}\r\n\r\nraw bytes",
                if target.starts_with('/') { "x" } else { target }
            )
            .as_bytes(),
        )
        .await;
        assert_eq!(status(&r), 405, "CONNECT {target}: {r}");
    }
    let (code, _) = h2_request(gw.port, "CONNECT", "example.com:443", "", &[])
        .await
        .unwrap();
    assert_eq!(code, 405, "HTTP/2 CONNECT");
    assert!(
        b.heads().is_empty(),
        "CONNECT reached the backend: {:?}",
        b.heads()
    );
    // Metrics count methods outside the common set as OTHER: four refusals, all 405.
    let m = gw.metrics().await;
    let counted: Vec<&str> = m
        .lines()
        .filter(|l| l.starts_with("hexgate_http_requests_total{") && l.contains("method=\"OTHER\""))
        .collect();
    assert_eq!(
        counted,
        vec!["hexgate_http_requests_total{service=\"unmatched\",method=\"OTHER\",code=\"405\"} 4"],
        "metrics must record what the client got:\n{m}"
    );
    // The access log line (stdout) says 405 too.
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline && !gw.stdout().contains("\"CONNECT") {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = gw.stdout();
    let lines: Vec<&str> = log.lines().filter(|l| l.contains("\"CONNECT")).collect();
    assert!(!lines.is_empty(), "no access log line for CONNECT:\n{log}");
    assert!(lines.iter().all(|l| l.contains(" 405 ")), "{lines:?}");
}

// ---------------------------------------------------------------------------------------------
// The embedded default enforces quotas exactly as Redis does

/// The run (rate 1/s burst 3, quota 5 per hour, one request every 0.2 s for 12 s),
/// five times faster (rate 5/s, a request every 40 ms for 2.4 s: the same 60 requests, the
/// same ratio of request rate to rate limit), keyed by a header so no token is needed.
async fn admitted(redis: Option<&RedisServer>) -> usize {
    let b = Capture::start("b").await;
    let redis = redis
        .map(|r| {
            format!(
                "redis:\n  address: \"127.0.0.1:{}\"\n  timeout: 500ms\n",
                r.port
            )
        })
        .unwrap_or_default();
    let yaml = format!(
        "{TOP}{redis}services:\n  - name: s\n    path: /\n    backends: [\"{}\"]\n    rateLimiting: {{enabled: true, ratePerSecond: 5, burst: 3, key: \"header:x-user\"}}\n    quota: {{enabled: true, limit: 5, period: 1h, key: \"header:x-user\"}}\n",
        b.url()
    );
    let gw = Gateway::start(&yaml).await;
    let mut ok = 0;
    let mut limited = 0;
    let start = tokio::time::Instant::now();
    for i in 0..60u32 {
        tokio::time::sleep_until(start + Duration::from_millis(40) * i).await;
        let r = exchange(
            gw.port,
            b"GET /a HTTP/1.1\r\nHost: x\r\nX-User: alice\r\nConnection: close\r\n\r\n",
        )
        .await;
        match status(&r) {
            200 => ok += 1,
            429 => limited += 1,
            other => panic!("unexpected {other}: {r}"),
        }
    }
    assert_eq!(ok + limited, 60);
    assert_eq!(
        b.heads().len(),
        ok,
        "every admitted request reached the backend"
    );
    ok
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_and_redis_quotas_admit_exactly_the_limit() {
    let redis = RedisServer::start();
    let (memory, shared) = tokio::join!(admitted(None), admitted(Some(&redis)));
    assert_eq!(memory, 5, "memory store");
    assert_eq!(shared, 5, "Redis store");
}

// ---------------------------------------------------------------------------------------------
// A declared oversized body is refused before anything is spent

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declared_oversized_body_is_a_413_before_auth_and_limits() {
    let b = Capture::start("b").await;
    let dir = temp_dir("413-first");
    hexgate_keygen(&dir);
    let yaml = format!(
        "{TOP}authentication:\n  enabled: true\n  publicKeyPath: \"{{dir}}/public.pem\"\nservices:\n  - name: s\n    path: /\n    maxBodySize: 1k\n    authentication: {{enabled: false}}\n    rateLimiting: {{enabled: true, ratePerSecond: 0.01, burst: 1, key: ip}}\n    backends: [\"{u}\"]\n  - name: p\n    path: /p/\n    maxBodySize: 1k\n    backends: [\"{u}\"]\n",
        u = b.url()
    );
    let gw = Gateway::start_in(dir, &yaml).await;
    let big = b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\nConnection: close\r\n\r\n";
    for _ in 0..3 {
        let r = exchange(gw.port, big).await;
        assert_eq!(status(&r), 413, "{r}");
    }
    // The one token of the rate limit was never spent on the refused requests.
    let r = exchange(
        gw.port,
        b"GET /a HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status(&r), 200, "{r}");
    // On an authenticated route, no token: still the 413 first.
    let r = exchange(
        gw.port,
        b"POST /p/a HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status(&r), 413, "{r}");
    assert_eq!(b.heads().len(), 1);
}
