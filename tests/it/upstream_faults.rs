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
