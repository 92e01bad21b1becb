//! What the backend is told about the request's origin: its own authority as Host when the
//! client sent none, and proxy fields only from a trusted proxy.

use std::time::{Duration, Instant};

use super::{Answer, UpgradeBackend};
use crate::raw::{h2_send, read_head, send, ResettingBackend};
use crate::support::*;

/// The `host:` field values of a lower-cased request head.
fn host_fields(head: &str) -> Vec<&str> {
    head.lines()
        .filter_map(|l| l.strip_prefix("host:"))
        .map(str::trim)
        .collect()
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
    let yaml = loopback_config(
        "healthCheckInterval: 30\n",
        &service("api", "/api/", &[&bad.url, &good.url], ""),
    );
    let gw = Gateway::start(&yaml).await;

    let mut s = send(gw.port, b"GET /api/one HTTP/1.0\r\n\r\n").await;
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
        &[],
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
    let mut s = send(
        gw.port,
        b"GET /api/three HTTP/1.0\r\nHost: Example.COM\r\n\r\n",
    )
    .await;
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
    let gw = Gateway::start(&loopback_config("healthCheckInterval: 30\n", &svc)).await;

    let mut s = send(gw.port, spoofing_request("/api/h1").as_bytes()).await;
    let (head, _) = read_head(&mut s, Duration::from_secs(5)).await;
    assert!(head.starts_with("http/1.1 200"), "{head:?}");
    let mut fields = vec![(":method", "GET"), (":scheme", "http"), (":authority", "x")];
    fields.push((":path", "/api/h2"));
    fields.extend(SPOOFED);
    let _h2 = h2_send(gw.port, &[], &fields).await;
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

    let trusted = loopback_config(
        "healthCheckInterval: 30\ntrustedProxies: [\"127.0.0.1\"]\n",
        &svc,
    );
    let gw = Gateway::start(&trusted).await;
    let mut s = send(gw.port, spoofing_request("/api/trusted").as_bytes()).await;
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
