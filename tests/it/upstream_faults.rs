//! Who gets blamed when an exchange fails, and which upgrades are tunnelled, through the real
//! binary on raw sockets.
//!
//! A client whose body stalls, trickles or breaks off is answered as the client's fault and never
//! counts against the backend; backends that really fail are still ejected, but passive signals
//! never take out more than half a pool; active health checks still take down backends out.
//! Upgrades: only allowed tokens are forwarded, and a tunnel opens only on a 101 that completes
//! the handshake the client asked for.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use http::Request;
use http_body_util::{Empty, Full};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use hexgate::auth::keys::Alg;
use hexgate::auth::tools::{self, SigningKey};

use crate::support::*;

/// Gateway config on loopback: `extra` top-level lines, then `services` (YAML list items).
fn config(extra: &str, services: &str) -> String {
    format!(
        "gatewayPort: \"{{port}}\"\ngatewayBind: 127.0.0.1\nadminPort: \"{{admin}}\"\n{extra}services:\n{services}"
    )
}

/// One service item for `config`.
fn service(name: &str, path: &str, backends: &[&str], extra: &str) -> String {
    let list = backends
        .iter()
        .map(|b| format!("\"{b}\""))
        .collect::<Vec<_>>()
        .join(", ");
    format!("  - name: {name}\n    path: {path}\n    backends: [{list}]\n{extra}")
}

/// (address, healthy) of every backend of `service`, from /admin/upstreams.
async fn upstreams(gw: &Gateway, service: &str) -> Vec<(String, bool)> {
    let (status, body) = get(gw.admin_port, "/admin/upstreams")
        .await
        .expect("GET /admin/upstreams");
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("upstreams JSON");
    let services = v["services"].as_array().cloned().unwrap_or_default();
    let svc = services
        .iter()
        .find(|s| s["service"] == service)
        .unwrap_or_else(|| panic!("no service {service} in {body}"));
    svc["backends"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|b| {
            (
                b["address"].as_str().unwrap_or_default().to_string(),
                b["healthy"].as_bool().expect("healthy is a bool"),
            )
        })
        .collect()
}

/// The gateway's `hexgate_upstream_errors_total` for `service`.
async fn upstream_errors(gw: &Gateway, service: &str) -> u64 {
    let m = gw.metrics().await;
    let prefix = format!("hexgate_upstream_errors_total{{service=\"{service}\"}} ");
    m.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no upstream error count for {service}: {m}"))
}

/// Reads from `s` until the end of a message head (or `limit`); returns the head, lower-cased,
/// and the bytes read after it. Empty head if the connection closed first.
async fn read_head(s: &mut TcpStream, limit: Duration) -> (String, Vec<u8>) {
    let (head, rest) = read_head_raw(s, limit).await;
    (head.to_ascii_lowercase(), rest)
}

/// `read_head` without the lower-casing.
async fn read_head_raw(s: &mut TcpStream, limit: Duration) -> (String, Vec<u8>) {
    let deadline = tokio::time::Instant::now() + limit;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while got.len() < 64 * 1024 {
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&got[..end + 4]).into_owned();
            return (head, got[end + 4..].to_vec());
        }
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    (String::new(), got)
}

/// Whether the peer closes `s` within `limit` (reading and discarding what it still sends).
async fn closes_within(s: &mut TcpStream, limit: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    let mut buf = [0u8; 4096];
    for _ in 0..1024 {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
            Err(_) => return false,
        }
    }
    false
}

/// Opens a connection and sends a POST announcing a 100-byte body but only `sent` bytes of it;
/// the caller then waits, trickles or hangs up. Returns the stream and when the bytes went out.
async fn partial_post(
    port: u16,
    path: &str,
    auth: Option<&str>,
    sent: usize,
) -> (TcpStream, Instant) {
    let mut s = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect to the gateway");
    let auth = auth
        .map(|a| format!("Authorization: {a}\r\n"))
        .unwrap_or_default();
    let head = format!("POST {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: 100\r\n\r\n");
    s.write_all(head.as_bytes()).await.expect("send the head");
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
        let req = Request::get(format!("/api/get/{i}"))
            .header("host", "localhost")
            .header("authorization", auth)
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        request(port, req).await?
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
    let yaml = config(
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
    let yaml = config(
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
    let yaml = config(
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

/// A backend that answers its health check (`GET /health`) with 200 and resets every other
/// request after reading it, counting those: passive failures only the requests can see.
struct ResettingBackend {
    url: String,
    resets: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl ResettingBackend {
    async fn start() -> ResettingBackend {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", l.local_addr().expect("local addr"));
        let resets = Arc::new(AtomicU64::new(0));
        let r = resets.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = l.accept().await else {
                    continue;
                };
                let r = r.clone();
                tokio::spawn(async move {
                    let (head, _) = read_head(&mut s, Duration::from_secs(5)).await;
                    if head.starts_with("get /health ") {
                        let _ = s
                            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nOK")
                            .await;
                        return;
                    }
                    #[allow(deprecated)]
                    let _ = s.set_linger(Some(Duration::ZERO));
                    r.fetch_add(1, Ordering::Relaxed);
                    drop(s);
                });
            }
        });
        ResettingBackend { url, resets, task }
    }

    fn resets(&self) -> u64 {
        self.resets.load(Ordering::Relaxed)
    }
}

impl Drop for ResettingBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_really_fails_is_still_ejected() {
    let bad = ResettingBackend::start().await;
    let good = TestBackend::start(Behaviour::Hello).await;
    let yaml = config(
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
    let yaml = config(
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
    let yaml = config(
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

// ---- Upgrades ----

/// How the raw upgrade backend answers a request.
#[derive(Clone, Copy)]
enum Answer {
    /// 101 websocket with the accept the request's key calls for.
    WebSocketRight,
    /// 101 websocket with the accept for some other key.
    WebSocketWrong,
    /// 101 websocket without Sec-WebSocket-Accept.
    WebSocketMissing,
    /// 101 naming this protocol.
    Switch(&'static str),
    /// An ordinary 200.
    Ordinary,
}

fn accept_for(key: &str) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY);
    ctx.update(key.as_bytes());
    ctx.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    base64::engine::general_purpose::STANDARD.encode(ctx.finish())
}

/// A raw-TCP backend for upgrades: records each request head and every byte received after it,
/// answers as `answer` says and, after a 101, echoes what it receives.
struct UpgradeBackend {
    url: String,
    heads: Arc<Mutex<Vec<String>>>,
    after: Arc<Mutex<Vec<u8>>>,
    task: tokio::task::JoinHandle<()>,
}

impl UpgradeBackend {
    async fn start(answer: Answer) -> UpgradeBackend {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", l.local_addr().expect("local addr"));
        let heads = Arc::new(Mutex::new(Vec::new()));
        let after = Arc::new(Mutex::new(Vec::new()));
        let (h, a) = (heads.clone(), after.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = l.accept().await else {
                    continue;
                };
                let (h, a) = (h.clone(), a.clone());
                tokio::spawn(async move {
                    let (head, rest) = read_head_raw(&mut s, Duration::from_secs(5)).await;
                    if head.is_empty() {
                        return;
                    }
                    // Active health checks are not part of what the tests look at.
                    if head.starts_with("GET /health ") {
                        let _ = s
                            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nOK")
                            .await;
                        return;
                    }
                    // The key as sent (base64 is case-sensitive): header names are not.
                    let key = head
                        .lines()
                        .find_map(|l| {
                            let (name, value) = l.split_once(':')?;
                            name.eq_ignore_ascii_case("sec-websocket-key")
                                .then(|| value.trim().to_string())
                        })
                        .unwrap_or_default();
                    h.lock().expect("heads").push(head.to_ascii_lowercase());
                    a.lock().expect("after").extend_from_slice(&rest);
                    let reply = match answer {
                        Answer::WebSocketRight => format!(
                            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
                            accept_for(&key)
                        ),
                        Answer::WebSocketWrong => format!(
                            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
                            accept_for("AAAAAAAAAAAAAAAAAAAAAA==")
                        ),
                        Answer::WebSocketMissing => "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n".to_string(),
                        Answer::Switch(p) => format!(
                            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: {p}\r\nConnection: Upgrade\r\n\r\n"
                        ),
                        Answer::Ordinary => "HTTP/1.1 200 OK\r\nContent-Length: 8\r\nConnection: close\r\n\r\nordinary".to_string(),
                    };
                    if s.write_all(reply.as_bytes()).await.is_err() {
                        return;
                    }
                    if matches!(answer, Answer::Ordinary) {
                        return;
                    }
                    // Echo until the peer closes or 5 s pass (bounded in count too).
                    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
                    let mut buf = [0u8; 4096];
                    for _ in 0..1024 {
                        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
                            Ok(Ok(n)) if n > 0 => {
                                a.lock().expect("after").extend_from_slice(&buf[..n]);
                                if s.write_all(&buf[..n]).await.is_err() {
                                    return;
                                }
                            }
                            _ => return,
                        }
                    }
                });
            }
        });
        UpgradeBackend {
            url,
            heads,
            after,
            task,
        }
    }

    fn heads(&self) -> Vec<String> {
        self.heads.lock().expect("heads").clone()
    }

    fn after(&self) -> Vec<u8> {
        self.after.lock().expect("after").clone()
    }
}

impl Drop for UpgradeBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The RFC 6455 example key (base64 of 16 bytes).
const WS_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
const TUNNEL_BYTES: &[u8] = b"TUNNEL-BYTES-FROM-THE-CLIENT";

fn upgrade_request(path: &str, upgrade: &str, extra: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: {upgrade}\r\n{extra}\r\n"
    )
}

fn ws_headers(key: &str, version: &str) -> String {
    format!("Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: {version}\r\n")
}

/// Sends `req`, then `TUNNEL_BYTES` right behind it as a client that assumes the upgrade
/// succeeds would; returns the response head and the open stream.
async fn try_upgrade(port: u16, req: &str) -> (String, Vec<u8>, TcpStream) {
    let mut s = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect to the gateway");
    s.write_all(req.as_bytes()).await.expect("send the request");
    let (head, rest) = read_head(&mut s, Duration::from_secs(5)).await;
    let _ = s.write_all(TUNNEL_BYTES).await;
    (head, rest, s)
}

/// Asserts that a failed upgrade tunnelled nothing: the backend saw the request, none of the
/// bytes sent after it, and the gateway closed the client's connection.
async fn assert_nothing_tunnelled(backend: &UpgradeBackend, s: &mut TcpStream) {
    assert!(
        closes_within(s, Duration::from_secs(3)).await,
        "the gateway closes the connection after a failed upgrade"
    );
    // Bytes a tunnel would carry arrive within milliseconds; wait well past that.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(backend.heads().len(), 1, "the request reached the backend");
    let after = backend.after();
    assert!(
        !after.windows(TUNNEL_BYTES.len()).any(|w| w == TUNNEL_BYTES) && after.is_empty(),
        "nothing reached the backend after the request: {:?}",
        String::from_utf8_lossy(&after)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_101_without_the_right_accept_is_a_502_and_no_tunnel() {
    for answer in [Answer::WebSocketWrong, Answer::WebSocketMissing] {
        let backend = UpgradeBackend::start(answer).await;
        let gw = Gateway::start(&config("", &service("ws", "/ws/", &[&backend.url], ""))).await;
        let req = upgrade_request("/ws/chat", "websocket", &ws_headers(WS_KEY, "13"));
        let (head, _, mut s) = try_upgrade(gw.port, &req).await;
        assert!(head.starts_with("http/1.1 502"), "{head:?}");
        assert!(head.contains("connection: close"), "{head}");
        assert_nothing_tunnelled(&backend, &mut s).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_with_the_right_accept_tunnels_both_ways() {
    let backend = UpgradeBackend::start(Answer::WebSocketRight).await;
    let gw = Gateway::start(&config("", &service("ws", "/ws/", &[&backend.url], ""))).await;
    let req = upgrade_request("/ws/chat", "websocket", &ws_headers(WS_KEY, "13"));
    let mut s = TcpStream::connect(("127.0.0.1", gw.port))
        .await
        .expect("connect");
    s.write_all(req.as_bytes()).await.expect("send");
    let (head, rest) = read_head(&mut s, Duration::from_secs(5)).await;
    assert!(head.starts_with("http/1.1 101"), "{head:?}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    assert!(
        head.contains(&format!(
            "sec-websocket-accept: {}",
            accept_for(WS_KEY).to_ascii_lowercase()
        )),
        "{head}"
    );
    assert!(rest.is_empty());
    // The backend saw the handshake as the client sent it.
    let heads = backend.heads();
    assert!(heads[0].contains("upgrade: websocket"), "{heads:?}");
    assert!(heads[0].contains("connection: upgrade"), "{heads:?}");
    for round in 0..3 {
        let msg = format!("frame {round}");
        s.write_all(msg.as_bytes())
            .await
            .expect("write through the tunnel");
        let mut echo = vec![0u8; msg.len()];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut echo))
            .await
            .expect("echo in time")
            .expect("echo");
        assert_eq!(echo, msg.as_bytes());
    }
    let after = String::from_utf8_lossy(&backend.after()).into_owned();
    assert_eq!(after, "frame 0frame 1frame 2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_requests_without_a_valid_key_or_version_are_refused() {
    let backend = UpgradeBackend::start(Answer::WebSocketRight).await;
    let gw = Gateway::start(&config("", &service("ws", "/ws/", &[&backend.url], ""))).await;
    let cases = [
        (
            "no key",
            "Sec-WebSocket-Version: 13\r\n".to_string(),
            "Sec-WebSocket-Key",
        ),
        (
            "key of 15 bytes",
            ws_headers("dGhlIHNhbXBsZSBub25jZQ", "13"),
            "Sec-WebSocket-Key",
        ),
        (
            "key not base64",
            ws_headers("not base64 at all!!!!!!!", "13"),
            "Sec-WebSocket-Key",
        ),
        (
            "two keys",
            format!(
                "{}Sec-WebSocket-Key: {WS_KEY}\r\n",
                ws_headers(WS_KEY, "13")
            ),
            "Sec-WebSocket-Key",
        ),
        (
            "version 8",
            ws_headers(WS_KEY, "8"),
            "Sec-WebSocket-Version",
        ),
        (
            "no version",
            format!("Sec-WebSocket-Key: {WS_KEY}\r\n"),
            "Sec-WebSocket-Version",
        ),
    ];
    for (name, extra, reason) in cases {
        let req = upgrade_request("/ws/chat", "websocket", &extra);
        let mut s = TcpStream::connect(("127.0.0.1", gw.port))
            .await
            .expect("connect");
        s.write_all(req.as_bytes()).await.expect("send");
        let (head, rest) = read_head(&mut s, Duration::from_secs(5)).await;
        assert!(head.starts_with("http/1.1 400"), "{name}: {head:?}");
        let mut body = rest;
        let mut buf = [0u8; 1024];
        if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(500), s.read(&mut buf)).await
        {
            body.extend_from_slice(&buf[..n]);
        }
        let body = String::from_utf8_lossy(&body);
        assert!(body.contains(reason), "{name}: {body}");
    }
    assert!(
        backend.heads().is_empty(),
        "no refused handshake reached the backend"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_the_route_does_not_allow_goes_upstream_as_an_ordinary_request() {
    // A backend that answers normally: the client gets its ordinary answer.
    let plain = UpgradeBackend::start(Answer::Ordinary).await;
    // A backend that switches anyway: 502, nothing tunnelled.
    let rogue = UpgradeBackend::start(Answer::Switch("foo")).await;
    let services = format!(
        "{}{}",
        service("plain", "/plain/", &[&plain.url], ""),
        service("rogue", "/rogue/", &[&rogue.url], "")
    );
    let gw = Gateway::start(&config("", &services)).await;

    let mut s = TcpStream::connect(("127.0.0.1", gw.port))
        .await
        .expect("connect");
    s.write_all(upgrade_request("/plain/x", "foo", "").as_bytes())
        .await
        .expect("send");
    let (head, _) = read_head(&mut s, Duration::from_secs(5)).await;
    assert!(head.starts_with("http/1.1 200"), "{head:?}");
    let seen = plain.heads();
    assert_eq!(seen.len(), 1);
    assert!(
        !seen[0].contains("upgrade"),
        "no Upgrade and no Connection: upgrade: {seen:?}"
    );

    let (head, _, mut s) = try_upgrade(gw.port, &upgrade_request("/rogue/x", "foo", "")).await;
    assert!(head.starts_with("http/1.1 502"), "{head:?}");
    assert_nothing_tunnelled(&rogue, &mut s).await;
    assert!(!rogue.heads()[0].contains("upgrade"), "{:?}", rogue.heads());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_upgrades_on_a_route_lets_another_protocol_through() {
    let foo = UpgradeBackend::start(Answer::Switch("foo")).await;
    let bar = UpgradeBackend::start(Answer::Switch("bar")).await;
    let services = format!(
        "{}{}",
        service("foo", "/foo/", &[&foo.url], "    allowedUpgrades: [foo]\n"),
        service("bar", "/bar/", &[&bar.url], "    allowedUpgrades: [foo]\n")
    );
    let gw = Gateway::start(&config("", &services)).await;

    let mut s = TcpStream::connect(("127.0.0.1", gw.port))
        .await
        .expect("connect");
    s.write_all(upgrade_request("/foo/x", "Foo", "").as_bytes())
        .await
        .expect("send");
    let (head, _) = read_head(&mut s, Duration::from_secs(5)).await;
    assert!(head.starts_with("http/1.1 101"), "{head:?}");
    assert!(head.contains("upgrade: foo"), "{head}");
    assert!(foo.heads()[0].contains("upgrade: foo"), "{:?}", foo.heads());
    s.write_all(b"ping")
        .await
        .expect("write through the tunnel");
    let mut echo = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut echo))
        .await
        .expect("echo in time")
        .expect("echo");
    assert_eq!(&echo, b"ping");

    // A 101 naming another protocol than the one asked for: 502, no tunnel.
    let (head, _, mut s) = try_upgrade(gw.port, &upgrade_request("/bar/x", "foo", "")).await;
    assert!(head.starts_with("http/1.1 502"), "{head:?}");
    assert_nothing_tunnelled(&bar, &mut s).await;

    // websocket is not in this route's list: the request goes up without an Upgrade.
    let (head, _, _s) = try_upgrade(
        gw.port,
        &upgrade_request("/foo/ws", "websocket", &ws_headers(WS_KEY, "13")),
    )
    .await;
    assert!(head.starts_with("http/1.1 502"), "{head:?}");
    let heads = foo.heads();
    assert_eq!(heads.len(), 2);
    assert!(!heads[1].contains("upgrade"), "{heads:?}");
}

// ---- The backend's time runs from the end of the upload ----

/// A raw backend that reads each request's head and its Content-Length body, then answers 200
/// with the body's length after `delay`; `None`: never answers (holds the connection for 15 s).
/// Answers `GET /health` at once. Counts the bodies it read whole.
struct AnswerAfterBody {
    url: String,
    bodies: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl AnswerAfterBody {
    async fn start(delay: Option<Duration>) -> AnswerAfterBody {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", l.local_addr().expect("local addr"));
        let bodies = Arc::new(AtomicU64::new(0));
        let b = bodies.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = l.accept().await else {
                    continue;
                };
                let b = b.clone();
                tokio::spawn(async move {
                    let (head, mut body) = read_head(&mut s, Duration::from_secs(15)).await;
                    if head.starts_with("get /health ") {
                        let _ = s
                            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nOK")
                            .await;
                        return;
                    }
                    let want = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse::<usize>().ok())
                        .unwrap_or(0);
                    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
                    let mut buf = [0u8; 4096];
                    for _ in 0..1024 {
                        if body.len() >= want {
                            break;
                        }
                        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
                            Ok(Ok(n)) if n > 0 => body.extend_from_slice(&buf[..n]),
                            _ => return,
                        }
                    }
                    if body.len() < want {
                        return;
                    }
                    b.fetch_add(1, Ordering::Relaxed);
                    let Some(delay) = delay else {
                        tokio::time::sleep(Duration::from_secs(15)).await;
                        return;
                    };
                    tokio::time::sleep(delay).await;
                    let n = body.len().to_string();
                    let reply = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{n}",
                        n.len()
                    );
                    let _ = s.write_all(reply.as_bytes()).await;
                });
            }
        });
        AnswerAfterBody { url, bodies, task }
    }

    fn bodies(&self) -> u64 {
        self.bodies.load(Ordering::Relaxed)
    }
}

impl Drop for AnswerAfterBody {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Sends `POST {path}` with `Content-Length: {offsets.len()}` and one body byte at each offset
/// from the start (the head goes with the first byte), then reads the answer for up to
/// `wait`. Returns the head (lower-cased), the bytes after it and when the head arrived,
/// measured from the first byte.
async fn trickle_post(
    port: u16,
    path: &str,
    offsets: &[Duration],
    wait: Duration,
) -> (String, Vec<u8>, Duration) {
    let mut s = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect to the gateway");
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
        offsets.len()
    );
    let start = Instant::now();
    for (i, at) in offsets.iter().enumerate() {
        tokio::time::sleep((start + *at).saturating_duration_since(Instant::now())).await;
        let mut out = if i == 0 {
            head.as_bytes().to_vec()
        } else {
            Vec::new()
        };
        out.push(b'a');
        s.write_all(&out).await.expect("send a body byte");
    }
    let (head, rest) = read_head(&mut s, wait).await;
    (head, rest, start.elapsed())
}

/// The attack: a 5-byte upload trickled so its last byte arrives at 4.8 s (every gap under
/// headerRead, 3 s), to backends that answer 0.5 s after reading the body, with
/// `timeouts.request` 5 s. The backend's 5 s run from the end of the upload, so both uploads
/// (one per backend) get their 200 at about 5.3 s, and nothing is counted against either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickled_upload_never_ejects_a_backend_that_answers_in_time() {
    let b1 = AnswerAfterBody::start(Some(Duration::from_millis(500))).await;
    let b2 = AnswerAfterBody::start(Some(Duration::from_millis(500))).await;
    let yaml = config(
        "healthCheckInterval: 30\ntimeouts: {headerRead: 3s, request: 5s}\n",
        &service("api", "/api/", &[&b1.url, &b2.url], ""),
    );
    let gw = Gateway::start(&yaml).await;
    let offsets: Vec<Duration> = [0, 1500, 3000, 4500, 4800]
        .into_iter()
        .map(Duration::from_millis)
        .collect();
    // Two at once: round robin gives one to each backend.
    let uploads: Vec<_> = (0..2)
        .map(|_| {
            let offsets = offsets.clone();
            let port = gw.port;
            tokio::spawn(async move {
                trickle_post(port, "/api/upload", &offsets, Duration::from_secs(8)).await
            })
        })
        .collect();
    for u in uploads {
        let (head, rest, took) = u.await.expect("upload task");
        assert!(head.starts_with("http/1.1 200"), "{head:?} after {took:?}");
        assert_eq!(rest, b"5", "the backend read the whole body");
        assert!(
            took >= Duration::from_millis(5200) && took < Duration::from_millis(7000),
            "answered 0.5 s after the last byte (4.8 s): {took:?}"
        );
    }
    assert_eq!((b1.bodies(), b2.bodies()), (1, 1));
    let health = upstreams(&gw, "api").await;
    assert_eq!(health.len(), 2);
    assert!(health.iter().all(|(_, ok)| *ok), "{health:?}");
    assert_eq!(upstream_errors(&gw, "api").await, 0);
}

/// The extension is bounded: a backend that never answers a body completed at 1.9 s gets its
/// 504 at completion + `timeouts.request` (2 s), about 3.9 s, and is counted as failed; and
/// an upload still incomplete at `timeouts.request` stays the client's 408.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_silent_after_a_slow_upload_is_blamed_at_completion_plus_request() {
    let hung = AnswerAfterBody::start(None).await;
    let yaml = config(
        "healthCheckInterval: 30\ntimeouts: {headerRead: 1500ms, request: 2s}\n",
        &service("api", "/api/", &[&hung.url], ""),
    );
    let gw = Gateway::start(&yaml).await;

    let ms = |v: &[u64]| {
        v.iter()
            .map(|m| Duration::from_millis(*m))
            .collect::<Vec<_>>()
    };
    let (head, _, took) = trickle_post(
        gw.port,
        "/api/upload",
        &ms(&[0, 1000, 1900]),
        Duration::from_secs(6),
    )
    .await;
    assert!(head.starts_with("http/1.1 504"), "{head:?} after {took:?}");
    assert!(
        took >= Duration::from_millis(3800) && took < Duration::from_millis(5000),
        "504 at completion (1.9 s) + request (2 s): {took:?}"
    );
    assert_eq!(hung.bodies(), 1);
    assert_eq!(upstream_errors(&gw, "api").await, 1, "the backend's fault");

    // Still uploading at 2 s (the last byte is due at 2.5 s): the client's 408, at 2 s, and
    // nothing more counted.
    let (head, _, took) = trickle_post(
        gw.port,
        "/api/upload",
        &ms(&[0, 1000, 2500]),
        Duration::from_secs(4),
    )
    .await;
    assert!(head.starts_with("http/1.1 408"), "{head:?} after {took:?}");
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_millis(3000),
        "408 at timeouts.request: {took:?}"
    );
    assert_eq!(upstream_errors(&gw, "api").await, 1);
}

// ---- What the backend is told about the request's origin ----

/// The `host:` field values of a lower-cased request head.
fn host_fields(head: &str) -> Vec<&str> {
    head.lines()
        .filter_map(|l| l.strip_prefix("host:"))
        .map(str::trim)
        .collect()
}

/// Sends one HTTP/2 request (prior knowledge) as raw frames: `fields` as HPACK literals without
/// indexing, exactly as given, pseudo-headers first. Returns the open connection; the caller
/// looks at what the backend received.
async fn h2_send(port: u16, fields: &[(&str, &str)]) -> TcpStream {
    let mut block = Vec::new();
    for (n, v) in fields {
        assert!(n.len() < 127 && v.len() < 127, "one-byte lengths only");
        // Literal without indexing, new name, no Huffman (RFC 7541 6.2.2).
        block.push(0x00);
        block.push(n.len() as u8);
        block.extend_from_slice(n.as_bytes());
        block.push(v.len() as u8);
        block.extend_from_slice(v.as_bytes());
    }
    let frame = |out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]| {
        out.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
        out.push(kind);
        out.push(flags);
        out.extend_from_slice(&stream.to_be_bytes());
        out.extend_from_slice(payload);
    };
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    frame(&mut out, 0x4, 0, 0, &[]); // SETTINGS
    frame(&mut out, 0x1, 0x4 | 0x1, 1, &block); // HEADERS, END_HEADERS | END_STREAM
    let mut s = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect to the gateway");
    s.write_all(&out).await.expect("send the frames");
    s
}

/// Waits (up to 5 s) until `backend` has seen `n` requests; returns their heads.
async fn heads_when(backend: &UpgradeBackend, n: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(5);
    while backend.heads().len() < n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    backend.heads()
}

/// HTTP/1.0 without Host and HTTP/2 without `:authority` or `host` go upstream as HTTP/1.1,
/// which needs a Host (RFC 9112 3.2): the backend's own authority, set per attempt (the first
/// attempt goes to a backend that resets, the replay to the recording one), and no
/// X-Forwarded-Host. A request with a host keeps it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_without_a_host_gets_the_backends_authority_as_host() {
    let bad = ResettingBackend::start().await;
    let good = UpgradeBackend::start(Answer::Ordinary).await;
    let good_authority = good.url.trim_start_matches("http://").to_string();
    let yaml = config(
        "healthCheckInterval: 30\n",
        &service("api", "/api/", &[&bad.url, &good.url], ""),
    );
    let gw = Gateway::start(&yaml).await;

    let mut s = TcpStream::connect(("127.0.0.1", gw.port))
        .await
        .expect("connect");
    s.write_all(b"GET /api/one HTTP/1.0\r\n\r\n")
        .await
        .expect("send");
    let (head, rest) = read_head(&mut s, Duration::from_secs(5)).await;
    // An HTTP/1.0 client is answered in HTTP/1.0.
    assert!(head.starts_with("http/1.0 200"), "{head:?}");
    assert_eq!(rest, b"ordinary");
    assert_eq!(
        bad.resets(),
        1,
        "round robin tried the resetting backend first"
    );
    let heads = good.heads();
    assert_eq!(heads.len(), 1, "{heads:?}");
    assert!(
        heads[0].starts_with("get /api/one http/1.1\r\n"),
        "{heads:?}"
    );
    assert_eq!(
        host_fields(&heads[0]),
        [good_authority.as_str()],
        "{heads:?}"
    );
    assert!(!heads[0].contains("x-forwarded-host"), "{heads:?}");

    let _h2 = h2_send(
        gw.port,
        &[
            (":method", "GET"),
            (":scheme", "http"),
            (":path", "/api/two"),
        ],
    )
    .await;
    let heads = heads_when(&good, 2).await;
    assert_eq!(
        heads.len(),
        2,
        "the HTTP/2 request reached the backend: {heads:?}"
    );
    assert!(
        heads[1].starts_with("get /api/two http/1.1\r\n"),
        "{heads:?}"
    );
    assert_eq!(
        host_fields(&heads[1]),
        [good_authority.as_str()],
        "{heads:?}"
    );
    assert!(!heads[1].contains("x-forwarded-host"), "{heads:?}");

    // With a host: that host, and X-Forwarded-Host.
    let mut s = TcpStream::connect(("127.0.0.1", gw.port))
        .await
        .expect("connect");
    s.write_all(b"GET /api/three HTTP/1.0\r\nHost: Example.COM\r\n\r\n")
        .await
        .expect("send");
    let (head, _) = read_head(&mut s, Duration::from_secs(5)).await;
    assert!(head.starts_with("http/1.0 200"), "{head:?}");
    let heads = heads_when(&good, 3).await;
    assert_eq!(heads.len(), 3, "{heads:?}");
    assert_eq!(host_fields(&heads[2]), ["example.com"], "{heads:?}");
    assert!(
        heads[2].contains("x-forwarded-host: example.com\r\n"),
        "{heads:?}"
    );
}

/// Proxy fields a backend reads as the client's address, host, scheme, port or prefix.
const SPOOFED: [(&str, &str); 6] = [
    ("forwarded", "for=192.0.2.66;host=admin.example;proto=https"),
    ("forwarded", "for=198.51.100.7"),
    ("x-real-ip", "192.0.2.66"),
    ("x-forwarded-port", "8443"),
    ("x-forwarded-prefix", "/admin"),
    ("x-forwarded-server", "admin.example"),
];

/// The request head for `path` carrying `SPOOFED`, names in mixed case.
fn spoofing_request(path: &str) -> String {
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: x\r\n");
    for (i, (n, v)) in SPOOFED.iter().enumerate() {
        let name = if i % 2 == 0 {
            n.to_ascii_uppercase()
        } else {
            n.to_string()
        };
        req.push_str(&format!("{name}: {v}\r\n"));
    }
    req.push_str("Connection: close\r\n\r\n");
    req
}

/// The `SPOOFED` fields in a lower-cased request head, in order.
fn spoofed_fields(head: &str) -> Vec<(String, String)> {
    head.lines()
        .filter_map(|l| l.split_once(':'))
        .filter(|(n, _)| SPOOFED.iter().any(|(s, _)| s == n))
        .map(|(n, v)| (n.to_string(), v.trim().to_string()))
        .collect()
}

/// `Forwarded`, `X-Real-IP`, `X-Forwarded-Port`, `-Prefix` and `-Server` from a client that is
/// not a trusted proxy never reach the backend (HTTP/1.1 and HTTP/2); from a trusted proxy they
/// pass unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_fields_reach_the_backend_only_from_a_trusted_proxy() {
    let backend = UpgradeBackend::start(Answer::Ordinary).await;
    let svc = service("api", "/api/", &[&backend.url], "");
    let gw = Gateway::start(&config("healthCheckInterval: 30\n", &svc)).await;

    let mut s = TcpStream::connect(("127.0.0.1", gw.port))
        .await
        .expect("connect");
    s.write_all(spoofing_request("/api/h1").as_bytes())
        .await
        .expect("send");
    let (head, _) = read_head(&mut s, Duration::from_secs(5)).await;
    assert!(head.starts_with("http/1.1 200"), "{head:?}");
    let mut fields = vec![(":method", "GET"), (":scheme", "http"), (":authority", "x")];
    fields.push((":path", "/api/h2"));
    fields.extend(SPOOFED);
    let _h2 = h2_send(gw.port, &fields).await;
    let heads = heads_when(&backend, 2).await;
    assert_eq!(heads.len(), 2, "{heads:?}");
    for head in &heads {
        assert_eq!(spoofed_fields(head), [], "{head}");
        for value in ["192.0.2.66", "198.51.100.7", "admin.example", "/admin\r"] {
            assert!(!head.contains(value), "{value} reached the backend: {head}");
        }
        // The fields the gateway owns are its own.
        assert!(head.contains("x-forwarded-for: 127.0.0.1\r\n"), "{head}");
        assert!(head.contains("x-forwarded-host: x\r\n"), "{head}");
    }
    drop(gw);

    let trusted = config(
        "healthCheckInterval: 30\ntrustedProxies: [\"127.0.0.1\"]\n",
        &svc,
    );
    let gw = Gateway::start(&trusted).await;
    let mut s = TcpStream::connect(("127.0.0.1", gw.port))
        .await
        .expect("connect");
    s.write_all(spoofing_request("/api/trusted").as_bytes())
        .await
        .expect("send");
    let (head, _) = read_head(&mut s, Duration::from_secs(5)).await;
    assert!(head.starts_with("http/1.1 200"), "{head:?}");
    let heads = heads_when(&backend, 3).await;
    assert_eq!(heads.len(), 3, "{heads:?}");
    let want: Vec<(String, String)> = SPOOFED
        .iter()
        .map(|(n, v)| (n.to_string(), v.to_ascii_lowercase()))
        .collect();
    assert_eq!(spoofed_fields(&heads[2]), want, "{}", heads[2]);
}
