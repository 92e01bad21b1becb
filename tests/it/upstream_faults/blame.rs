//! Who is blamed: a client whose body stalls, trickles or breaks off is answered as the client's
//! fault and never counts against the backend; backends that really fail are still ejected, but
//! passive signals never take out more than half a pool; active health checks still take down
//! backends out.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use hexgate::auth::keys::Alg;
use hexgate::auth::tools::{self, SigningKey};

use super::{upstream_errors, upstreams};
use crate::raw::{read_head, send, ResettingBackend};
use crate::support::*;

/// Opens a connection and sends a POST announcing a 100-byte body but only `sent` bytes of it;
/// the caller then waits, trickles or hangs up. Returns the stream and when the bytes went out.
async fn partial_post(
    port: u16,
    path: &str,
    auth: Option<&str>,
    sent: usize,
) -> (TcpStream, Instant) {
    let auth = auth
        .map(|a| format!("Authorization: {a}\r\n"))
        .unwrap_or_default();
    let head = format!("POST {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: 100\r\n\r\n");
    let mut s = send(port, head.as_bytes()).await;
    s.write_all(&vec![b'a'; sent])
        .await
        .expect("send the body start");
    (s, Instant::now())
}

/// RSA keys and a token the gateway accepts (`authentication` block for `config`).
fn auth_setup(dir: &std::path::Path) -> (String, String) {
    tools::keygen(dir, Alg::RS256, false).expect("keygen");
    let pem = std::fs::read_to_string(dir.join("private.pem")).expect("private key");
    let key = SigningKey::from_pem(&pem).expect("signing key");
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
        + 600;
    let claims =
        serde_json::json!({"sub": "alice", "iss": "hexgate-tests", "aud": "api", "exp": exp});
    let token = tools::sign_token(&key, Alg::RS256, None, &claims).expect("token");
    let block = format!(
        "authentication:\n  enabled: true\n  publicKeyPath: \"{}/public.pem\"\n  issuer: \"hexgate-tests\"\n  audience: \"api\"\n",
        dir.display()
    );
    (block, format!("Bearer {token}"))
}

/// One authenticated request over a fresh connection: a GET, or a POST with a complete body.
async fn normal_request(port: u16, auth: &str, i: usize) -> Result<u16, String> {
    let resp = if i % 2 == 0 {
        get_with(port, &format!("/api/get/{i}"), &[("authorization", auth)]).await?
    } else {
        let req = Request::post(format!("/api/post/{i}"))
            .header("host", "localhost")
            .header("authorization", auth)
            .body(Full::new(Bytes::from(vec![b'b'; 100])))
            .map_err(|e| e.to_string())?;
        let r = request(port, req).await?;
        if r.0 == 200 && r.2 != "100" {
            return Err(format!("the backend saw {} body bytes, not 100", r.2));
        }
        r
    };
    Ok(resp.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stalled_bodies_get_408_and_never_eject_a_backend() {
    let b1 = TestBackend::start(Behaviour::CountBody).await;
    let b2 = TestBackend::start(Behaviour::CountBody).await;
    let dir = temp_dir("stall");
    let keys = dir.join("keys");
    let (auth_block, auth) = auth_setup(&keys);
    let yaml = loopback_config(
        &format!(
            "healthCheckInterval: 30\ntimeouts: {{request: 5s, headerRead: 1s}}\n{auth_block}"
        ),
        &service("api", "/api/", &[&b1.url(), &b2.url()], ""),
    );
    let gw = Gateway::start_in(dir, &yaml).await;
    let port = gw.port;

    // 12 authenticated uploads that announce 100 bytes, send 10 and go silent (120 bytes of
    // body in all), while 50 authenticated requests run beside them and after their 408s.
    let stalls: Vec<_> = (0..12)
        .map(|_| {
            let auth = auth.clone();
            tokio::spawn(async move {
                let (mut s, t) = partial_post(port, "/api/upload", Some(&auth), 10).await;
                let (head, _) = read_head(&mut s, Duration::from_secs(8)).await;
                (head, t.elapsed())
            })
        })
        .collect();
    let normal: Vec<_> = (0..5)
        .map(|task| {
            let auth = auth.clone();
            tokio::spawn(async move {
                let mut out = Vec::new();
                for k in 0..10 {
                    out.push(normal_request(port, &auth, task * 10 + k).await);
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                out
            })
        })
        .collect();
    let mut failures = Vec::new();
    let mut normal_total = 0;
    for n in normal {
        for r in n.await.expect("normal requests task") {
            normal_total += 1;
            if r != Ok(200) {
                failures.push(r);
            }
        }
    }
    let mut took = Vec::new();
    for s in stalls {
        let (head, elapsed) = s.await.expect("stalled request task");
        assert!(
            head.starts_with("http/1.1 408"),
            "a stalled body is the client's fault: {head:?}"
        );
        assert!(head.contains("connection: close"), "{head}");
        took.push(elapsed);
    }
    let slowest = took.iter().max().copied().unwrap_or_default();
    let fastest = took.iter().min().copied().unwrap_or_default();
    eprintln!(
        "stalled bodies: 408 after {fastest:?}..{slowest:?}; normal requests: {} of {normal_total} failed",
        failures.len()
    );
    assert_eq!(normal_total, 50);
    assert!(failures.is_empty(), "normal requests failed: {failures:?}");
    // The body-idle timeout (headerRead, 1 s) answers, well before timeouts.request (5 s).
    assert!(
        fastest >= Duration::from_millis(900) && slowest < Duration::from_secs(3),
        "408 after {fastest:?}..{slowest:?}"
    );
    assert_eq!(
        b1.hits() + b2.hits(),
        62,
        "every request, stalled or not, reached a backend"
    );
    let health = upstreams(&gw, "api").await;
    assert_eq!(health.len(), 2);
    assert!(health.iter().all(|(_, ok)| *ok), "{health:?}");
    assert_eq!(upstream_errors(&gw, "api").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_trickling_past_the_request_timeout_is_the_clients_fault() {
    let b1 = TestBackend::start(Behaviour::CountBody).await;
    let b2 = TestBackend::start(Behaviour::CountBody).await;
    let yaml = loopback_config(
        "healthCheckInterval: 30\ntimeouts: {request: 2s, headerRead: 1s}\n",
        &service("api", "/api/", &[&b1.url(), &b2.url()], ""),
    );
    let gw = Gateway::start(&yaml).await;
    let mut heads = Vec::new();
    for _ in 0..3 {
        // One byte every 300 ms: never idle for headerRead, never done within request.
        let (mut s, t) = partial_post(gw.port, "/api/upload", None, 1).await;
        let mut sent = 1;
        let head = loop {
            let (head, _) = read_head(&mut s, Duration::from_millis(300)).await;
            if !head.is_empty() || sent >= 40 {
                break head;
            }
            if s.write_all(b"a").await.is_err() {
                break read_head(&mut s, Duration::from_secs(1)).await.0;
            }
            sent += 1;
        };
        heads.push((head, t.elapsed()));
    }
    for (head, took) in &heads {
        assert!(head.starts_with("http/1.1 408"), "{head:?}");
        assert!(
            *took >= Duration::from_millis(1900) && *took < Duration::from_millis(3500),
            "answered at timeouts.request (2 s): {took:?}"
        );
    }
    let health = upstreams(&gw, "api").await;
    assert!(health.iter().all(|(_, ok)| *ok), "{health:?}");
    assert_eq!(upstream_errors(&gw, "api").await, 0);
    assert_eq!(b1.hits() + b2.hits(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_goes_away_mid_body_ejects_nothing() {
    let b1 = TestBackend::start(Behaviour::CountBody).await;
    let b2 = TestBackend::start(Behaviour::CountBody).await;
    let yaml = loopback_config(
        "healthCheckInterval: 30\ntimeouts: {request: 10s, headerRead: 5s}\n",
        &service("api", "/api/", &[&b1.url(), &b2.url()], ""),
    );
    let gw = Gateway::start(&yaml).await;
    for i in 0..12 {
        let (s, _) = partial_post(gw.port, "/api/upload", None, 10).await;
        // Let the gateway forward the head and start waiting on the body, then hang up: half
        // with a FIN, half with a reset.
        let deadline = Instant::now() + Duration::from_secs(3);
        while b1.hits() + b2.hits() < i + 1 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if i % 2 == 1 {
            // Linger zero: close with a reset (it never blocks, unlike a non-zero linger).
            #[allow(deprecated)]
            let _ = s.set_linger(Some(Duration::ZERO));
        }
        drop(s);
    }
    assert_eq!(b1.hits() + b2.hits(), 12, "every upload reached a backend");
    // The gateway notices each hang-up at once; give it a moment before looking.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let health = upstreams(&gw, "api").await;
    assert_eq!(health.len(), 2);
    assert!(health.iter().all(|(_, ok)| *ok), "{health:?}");
    assert_eq!(upstream_errors(&gw, "api").await, 0);
    for i in 0..10 {
        let (s, body) = get(gw.port, &format!("/api/after/{i}")).await.expect("GET");
        assert_eq!(s, 200, "{body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_really_fails_is_still_ejected() {
    let bad = ResettingBackend::start().await;
    let good = TestBackend::start(Behaviour::Hello).await;
    let yaml = loopback_config(
        "healthCheckInterval: 30\n",
        &service("api", "/api/", &[&bad.url, &good.url()], ""),
    );
    let gw = Gateway::start(&yaml).await;
    for i in 0..10 {
        let (s, body) = get(gw.port, &format!("/api/{i}")).await.expect("GET");
        assert_eq!(s, 200, "retried on the good backend: {body}");
    }
    assert!(bad.resets() >= 1, "the bad backend was tried");
    let health = upstreams(&gw, "api").await;
    let bad_addr = bad.url.clone();
    for (addr, ok) in &health {
        assert_eq!(*ok, *addr != bad_addr, "{health:?}");
    }
    assert!(upstream_errors(&gw, "api").await >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passive_failures_eject_at_most_half_a_pool() {
    let a = ResettingBackend::start().await;
    let b = ResettingBackend::start().await;
    let yaml = loopback_config(
        "healthCheckInterval: 30\nretries: 1\n",
        &service("api", "/api/", &[&a.url, &b.url], ""),
    );
    let gw = Gateway::start(&yaml).await;
    for i in 0..10 {
        let (s, _) = get(gw.port, &format!("/api/{i}")).await.expect("GET");
        assert!(s == 502 || s == 503, "both backends fail: {s}");
    }
    let health = upstreams(&gw, "api").await;
    let down: Vec<_> = health.iter().filter(|(_, ok)| !ok).collect();
    assert_eq!(down.len(), 1, "one of two ejected, never both: {health:?}");
    // The one left in keeps being tried: every request reaches it, first try or retry.
    let kept = if down[0].0 == a.url { &b } else { &a };
    let before = kept.resets();
    for i in 0..5 {
        let _ = get(gw.port, &format!("/api/more/{i}")).await.expect("GET");
    }
    assert!(
        kept.resets() >= before + 5,
        "the remaining backend still takes requests: {before} -> {}",
        kept.resets()
    );
    // Never both, however the ejections and their expiry interleave.
    let health = upstreams(&gw, "api").await;
    assert!(
        health.iter().filter(|(_, ok)| !ok).count() <= 1,
        "{health:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_health_checks_still_take_down_backends_out() {
    let b1 = TestBackend::start(Behaviour::Hello).await;
    let b2 = TestBackend::start(Behaviour::Hello).await;
    let yaml = loopback_config(
        "healthCheckInterval: 1\n",
        &service("api", "/api/", &[&b1.url(), &b2.url()], ""),
    );
    let gw = Gateway::start(&yaml).await;
    assert_eq!(get(gw.port, "/api/x").await.expect("GET").0, 200);
    b1.stop();
    b2.stop();
    // Both down: the checks (every second) take both out, the whole pool, unlike passive ones.
    let deadline = Instant::now() + Duration::from_secs(6);
    let mut health = upstreams(&gw, "api").await;
    while health.iter().any(|(_, ok)| *ok) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        health = upstreams(&gw, "api").await;
    }
    assert!(health.iter().all(|(_, ok)| !ok), "{health:?}");
    let (s, body) = get(gw.port, "/api/x").await.expect("GET");
    assert_eq!(s, 503, "{body}");
    assert!(body.contains("no healthy backend"), "{body}");
}
