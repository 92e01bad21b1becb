//! The admin listener as an attacker on the network sees it: slow and half-sent requests are
//! cut off by `timeouts.headerRead`, connections beyond the cap wait in the backlog, one address
//! holds at most 32 connections, the header limits hold, and with an admin token every path but
//! /healthz and /readyz answers 401 without it, and only a client that sent the token keeps its
//! connection. Secrets in URLs (userinfo, query values) never show in /admin/config, logs or
//! `validate`.
//!
//! Several peer addresses are simulated with source addresses from 127.0.0.0/8 (all loopback).

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::*;

const TOKEN: &str = "adm-4f1c2e9b7d";

/// A loopback gateway config: `extra` top-level lines, then one service on `backend`.
fn config(extra: &str, backend: &str) -> String {
    format!(
        "gatewayPort: \"{{port}}\"\ngatewayBind: 127.0.0.1\nadminPort: \"{{admin}}\"\n{extra}services:\n  - name: s\n    path: /\n    backends: [\"{backend}\"]\n"
    )
}

/// A parsed raw response: status, the head as text (lower-cased names), the body.
struct Raw {
    status: u16,
    head: String,
    body: String,
}

impl Raw {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// Writes `raw` on a fresh connection and reads until the server closes it (the requests send
/// `Connection: close`), for at most five seconds.
async fn raw_request(port: u16, raw: &[u8]) -> Raw {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(raw).await.unwrap();
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    assert!(
        read.is_ok(),
        "no complete answer within 5s to {:?}",
        String::from_utf8_lossy(raw)
    );
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    Raw {
        status,
        head: head.to_string(),
        body: body.to_string(),
    }
}

/// A GET with an optional `Authorization` value.
async fn admin_get(port: u16, path: &str, authorization: Option<&str>) -> Raw {
    let auth = authorization
        .map(|a| format!("Authorization: {a}\r\n"))
        .unwrap_or_default();
    let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n{auth}Connection: close\r\n\r\n");
    raw_request(port, req.as_bytes()).await
}

/// Reads from `s` until the peer closes it; the time that took, or None if still open at `limit`.
async fn time_to_close(s: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        let left = limit.checked_sub(start.elapsed())?;
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Some(start.elapsed()),
            Ok(Ok(_)) => continue,
            Err(_) => return None,
        }
    }
}

/// A connection to the admin port on 127.0.0.1 from the loopback source address `src`.
async fn connect_from(src: [u8; 4], port: u16) -> std::io::Result<TcpStream> {
    let sock = tokio::net::TcpSocket::new_v4()?;
    sock.bind(SocketAddr::from((src, 0)))?;
    sock.connect(SocketAddr::from(([127, 0, 0, 1], port))).await
}

/// Reads one response (head, then a `Content-Length` body) from a connection that may stay
/// open; None if it is not complete within `limit` or the connection ends first.
async fn read_one(s: &mut TcpStream, limit: Duration) -> Option<Raw> {
    let deadline = Instant::now() + limit;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = out.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&out[..end]).into_owned();
            let mut r = Raw {
                status: head.split_whitespace().nth(1)?.parse().ok()?,
                head,
                body: String::new(),
            };
            let len: usize = r
                .header("content-length")
                .unwrap_or_else(|| panic!("no content-length in {}", r.head))
                .parse()
                .ok()?;
            if out.len() >= end + 4 + len {
                assert_eq!(
                    out.len(),
                    end + 4 + len,
                    "bytes after the response: {:?}",
                    String::from_utf8_lossy(&out)
                );
                r.body = String::from_utf8_lossy(&out[end + 4..]).into_owned();
                return Some(r);
            }
        }
        let left = deadline.checked_duration_since(Instant::now())?;
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return None,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
}

/// Two authenticated GET /metrics on one keep-alive connection from `src`, each answered 200
/// within two seconds, the connection left open.
async fn scrape_twice(src: [u8; 4], port: u16, token: &str, when: &str) {
    let mut s = connect_from(src, port).await.unwrap();
    for i in 1..=2 {
        let sent = Instant::now();
        s.write_all(
            format!("GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap_or_else(|e| panic!("scrape {i} from {src:?} {when}: write failed: {e}"));
        let r = read_one(&mut s, Duration::from_secs(2))
            .await
            .unwrap_or_else(|| panic!("scrape {i} from {src:?} {when}: no answer within 2s"));
        eprintln!(
            "scrape {i} from {src:?} {when} answered in {:?}",
            sent.elapsed()
        );
        assert_eq!(r.status, 200, "{}", r.head);
        assert!(r.body.contains("hexgate_open_connections"), "{}", r.body);
        assert_eq!(r.header("connection"), None, "{}", r.head);
    }
}

/// Runs `hexgate validate` on `yaml` with `env` (HEXGATE_ADMIN_TOKEN removed unless given).
fn validate(yaml: &str, env: &[(&str, &str)]) -> (i32, String) {
    let dir = temp_dir("admin-validate");
    let f = dir.join("config.yaml");
    std::fs::write(&f, yaml).unwrap();
    let out = Command::new(bin())
        .arg("validate")
        .arg(&f)
        .env_remove("HEXGATE_ADMIN_TOKEN")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_sent_and_silent_admin_connections_are_closed_after_header_read() {
    let b = TestBackend::start(Behaviour::Hello).await;
    let yaml = config("timeouts: {headerRead: 1s, idle: 3s}\n", &b.url());
    let gw = Gateway::start(&yaml).await;

    // Half a request head, never finished.
    let mut half = TcpStream::connect(("127.0.0.1", gw.admin_port))
        .await
        .unwrap();
    half.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
        .await
        .unwrap();
    // Nothing at all.
    let mut silent = TcpStream::connect(("127.0.0.1", gw.admin_port))
        .await
        .unwrap();
    // A slowloris: one byte every 300 ms keeps it busy but never finishes the head.
    let mut drip = TcpStream::connect(("127.0.0.1", gw.admin_port))
        .await
        .unwrap();
    drip.write_all(b"GET /healthz HTTP/1.1\r\n").await.unwrap();
    let dripper = tokio::spawn(async move {
        let start = Instant::now();
        for _ in 0..30 {
            if drip.write_all(b"X").await.is_err() {
                return Some(start.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        None
    });

    // Both timed from here, concurrently (they were opened just before).
    let limit = Duration::from_secs(6);
    let (half_closed, silent_closed) = tokio::join!(
        time_to_close(&mut half, limit),
        time_to_close(&mut silent, limit)
    );
    eprintln!("half-sent closed after {half_closed:?}, silent after {silent_closed:?}");
    let half_closed = half_closed.expect("half-sent admin request still open after 6s");
    let silent_closed = silent_closed.expect("silent admin connection still open after 6s");
    // The header read timeout closed them, not something immediate.
    assert!(half_closed >= Duration::from_millis(800), "{half_closed:?}");
    assert!(half_closed <= Duration::from_secs(4), "{half_closed:?}");
    assert!(
        silent_closed >= Duration::from_millis(800),
        "{silent_closed:?}"
    );
    assert!(silent_closed <= Duration::from_secs(4), "{silent_closed:?}");
    let dripped = dripper.await.unwrap();
    assert!(
        dripped.is_some_and(|d| d <= Duration::from_secs(5)),
        "a slowloris on the admin port was not cut off: {dripped:?}"
    );

    // A keep-alive connection idle after a complete request is closed after `timeouts.idle`
    // (3s here), not after headerRead (1s).
    let mut ka = TcpStream::connect(("127.0.0.1", gw.admin_port))
        .await
        .unwrap();
    ka.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(3), ka.read(&mut buf))
        .await
        .expect("answer on the keep-alive connection")
        .unwrap();
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&buf[..n])
    );
    let idle_closed = time_to_close(&mut ka, Duration::from_secs(8)).await;
    eprintln!("idle keep-alive closed after {idle_closed:?}");
    let idle_closed = idle_closed.expect("idle admin keep-alive connection still open after 8s");
    assert!(
        idle_closed >= Duration::from_millis(2500),
        "{idle_closed:?}"
    );
    assert!(idle_closed <= Duration::from_secs(6), "{idle_closed:?}");

    // Still serving.
    assert_eq!(admin_get(gw.admin_port, "/healthz", None).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_connections_beyond_the_cap_wait_in_the_backlog() {
    const CAP: usize = hexgate::admin::MAX_CONNECTIONS;
    assert_eq!(CAP, 256, "the cap the README documents");
    let b = TestBackend::start(Behaviour::Hello).await;
    let yaml = config("timeouts: {headerRead: 3s}\n", &b.url());
    let gw = Gateway::start(&yaml).await;

    // CAP half-sent requests hold every admin connection slot until headerRead (3s); one
    // address holds at most MAX_CONNECTIONS_PER_PEER, so they come from 127.0.0.2, .3, ...
    const PER_PEER: usize = hexgate::admin::MAX_CONNECTIONS_PER_PEER;
    let opened = Instant::now();
    let mut holders = Vec::with_capacity(CAP);
    for i in 0..CAP {
        let src = [127, 0, 0, 2 + u8::try_from(i / PER_PEER).unwrap()];
        let mut s = connect_from(src, gw.admin_port).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n")
            .await
            .unwrap();
        holders.push(s);
    }
    // Let the gateway accept all of them.
    tokio::time::sleep(Duration::from_millis(300)).await;

    // One more: the kernel completes the handshake (backlog), but the gateway does not accept
    // it while the cap is reached, so its complete request gets no answer...
    let mut extra = connect_from([127, 0, 0, 200], gw.admin_port).await.unwrap();
    let sent = Instant::now();
    extra
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    // Watched until 2s after the first holder opened (their header read timeout is 3s).
    let watch = Duration::from_secs(2).saturating_sub(opened.elapsed());
    assert!(
        watch >= Duration::from_millis(500),
        "opening the holders took too long"
    );
    let early = tokio::time::timeout(watch, extra.read_to_end(&mut out)).await;
    assert!(
        early.is_err() && out.is_empty(),
        "connection {} was served while {CAP} others held every slot: {:?}",
        CAP + 1,
        String::from_utf8_lossy(&out)
    );
    // ...until the holders' header read timeout frees slots; then it is served.
    tokio::time::timeout(Duration::from_secs(10), extra.read_to_end(&mut out))
        .await
        .expect("the waiting admin connection was never served")
        .unwrap();
    let waited = sent.elapsed();
    let since_open = opened.elapsed();
    eprintln!(
        "connection {} answered {waited:?} after its request ({since_open:?} after the holders opened)",
        CAP + 1
    );
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        since_open >= Duration::from_millis(2500),
        "served before the holders' header read timeout: {since_open:?}"
    );

    // Every holder was closed by the header read timeout.
    let mut still_open = 0;
    for s in holders.iter_mut() {
        if time_to_close(s, Duration::from_secs(3)).await.is_none() {
            still_open += 1;
        }
    }
    assert_eq!(still_open, 0, "holders still open after headerRead");
    assert_eq!(admin_get(gw.admin_port, "/healthz", None).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_header_limits_hold() {
    let b = TestBackend::start(Behaviour::Hello).await;
    let yaml = config("maxHeaderCount: 10\nmaxHeaderSize: 2k\n", &b.url());
    let gw = Gateway::start(&yaml).await;
    let with_fields = |n: usize, value_len: usize| {
        // Host and Connection, then n - 2 more.
        let mut req =
            String::from("GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
        for i in 0..n - 2 {
            req.push_str(&format!("X-F{i}: {}\r\n", "v".repeat(value_len)));
        }
        req.push_str("\r\n");
        req
    };
    // Exactly maxHeaderCount fields pass; one more is 431.
    let ok = raw_request(gw.admin_port, with_fields(10, 1).as_bytes()).await;
    assert_eq!(ok.status, 200, "{}", ok.head);
    let many = raw_request(gw.admin_port, with_fields(11, 1).as_bytes()).await;
    assert_eq!(many.status, 431, "{}", many.head);
    // Fields over maxHeaderSize (2 KiB, under hyper's 8 KiB buffer): 431 from the policy.
    let big = raw_request(gw.admin_port, with_fields(3, 3000).as_bytes()).await;
    assert_eq!(big.status, 431, "{}", big.head);
    assert!(big.body.contains("maxHeaderSize"), "{}", big.body);
    // Over the buffer itself: 431 from hyper, connection closed.
    let huge = raw_request(gw.admin_port, with_fields(3, 20_000).as_bytes()).await;
    assert_eq!(huge.status, 431, "{}", huge.head);
    // Two Authorization fields: which one would be checked? Refused.
    let two = raw_request(
        gw.admin_port,
        b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer a\r\nAuthorization: Bearer b\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(two.status, 400, "{}", two.head);
    assert_eq!(admin_get(gw.admin_port, "/healthz", None).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_keep_alive_flood_from_one_address_leaves_metrics_answered() {
    // The reported attack: with adminToken set, 256 connections from one address each send
    // GET /healthz and stay keep-alive (re-sending every 10s); Prometheus's scrapes with the
    // token then got no answer for seconds.
    const ATTACKERS: usize = 256;
    let b = TestBackend::start(Behaviour::Hello).await;
    let yaml = config(
        &format!("adminToken: \"{TOKEN}\"\ntimeouts: {{headerRead: 20s, idle: 60s}}\n"),
        &b.url(),
    );
    let gw = Gateway::start(&yaml).await;

    let opened = Instant::now();
    let mut attackers = Vec::with_capacity(ATTACKERS);
    for _ in 0..ATTACKERS {
        let mut s = TcpStream::connect(("127.0.0.1", gw.admin_port))
            .await
            .unwrap();
        // A write can fail when the server already closed it (over the per-peer cap).
        let _ = s
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await;
        attackers.push(s);
    }
    eprintln!("{ATTACKERS} attackers opened in {:?}", opened.elapsed());

    // During the attack, Prometheus on another address is answered on one kept connection.
    scrape_twice([127, 0, 0, 2], gw.admin_port, TOKEN, "during the attack").await;

    // The server ended every attacker connection itself (the attackers still hold their
    // sockets and send nothing more): each was answered with `connection: close` and closed,
    // or closed without a response over the per-peer cap. Within 5s of opening: far less
    // than headerRead (20s) and idle (60s).
    let deadline = opened + Duration::from_secs(5);
    let (mut answered, mut refused) = (0, 0);
    for (i, s) in attackers.iter_mut().enumerate() {
        let mut out = Vec::new();
        let left = deadline.saturating_duration_since(Instant::now());
        let mut buf = [0u8; 1024];
        let closed = loop {
            match tokio::time::timeout(left, s.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break true,
                Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
                Err(_) => break false,
            }
        };
        let text = String::from_utf8_lossy(&out);
        assert!(
            closed,
            "attacker {i} still open 5s after the flood began; got {text:?}"
        );
        if out.is_empty() {
            refused += 1;
        } else {
            answered += 1;
            assert!(text.starts_with("HTTP/1.1 200"), "attacker {i}: {text}");
            assert!(
                text.to_ascii_lowercase()
                    .contains("\r\nconnection: close\r\n"),
                "attacker {i} answered without connection: close: {text}"
            );
        }
    }
    eprintln!("attackers: {answered} answered and closed, {refused} closed unanswered");
    assert!(answered >= 1, "no attacker request was answered at all");

    // And the attackers' own address is not locked out either.
    scrape_twice([127, 0, 0, 1], gw.admin_port, TOKEN, "after the attack").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_token_unauthenticated_answers_close_the_connection() {
    let b = TestBackend::start(Behaviour::Hello).await;
    let yaml = config(
        &format!("adminToken: \"{TOKEN}\"\ntimeouts: {{headerRead: 20s, idle: 60s}}\n"),
        &b.url(),
    );
    let gw = Gateway::start(&yaml).await;
    let good = format!("Authorization: Bearer {TOKEN}\r\n");
    let cases: [(&str, &str, u16); 6] = [
        ("/healthz", "", 200),
        ("/readyz", "", 200),
        ("/healthz", "Authorization: Bearer wrong\r\n", 200),
        ("/metrics", "", 401),
        ("/metrics", "Authorization: Bearer wrong\r\n", 401),
        ("/admin/config", "Authorization: Basic x\r\n", 401),
    ];
    for (path, auth, want) in cases {
        let mut s = TcpStream::connect(("127.0.0.1", gw.admin_port))
            .await
            .unwrap();
        // Keep-alive requests: nothing from the client asks to close.
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n{auth}\r\n").as_bytes())
            .await
            .unwrap();
        let r = read_one(&mut s, Duration::from_secs(2))
            .await
            .unwrap_or_else(|| panic!("{path} {auth:?}: no answer"));
        assert_eq!(r.status, want, "{path} {auth:?}: {}", r.head);
        assert_eq!(
            r.header("connection"),
            Some("close"),
            "{path} {auth:?}: {}",
            r.head
        );
        let closed = time_to_close(&mut s, Duration::from_secs(2)).await;
        assert!(
            closed.is_some(),
            "{path} {auth:?}: the server left the connection open"
        );
    }
    // A header error without the token closes too.
    let mut s = TcpStream::connect(("127.0.0.1", gw.admin_port))
        .await
        .unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer a\r\nAuthorization: Bearer b\r\n\r\n")
        .await
        .unwrap();
    let r = read_one(&mut s, Duration::from_secs(2))
        .await
        .expect("no answer to two Authorization fields");
    assert_eq!(r.status, 400, "{}", r.head);
    assert_eq!(r.header("connection"), Some("close"), "{}", r.head);
    assert!(time_to_close(&mut s, Duration::from_secs(2))
        .await
        .is_some());

    // A health checker that sends the token keeps its connection.
    let mut s = TcpStream::connect(("127.0.0.1", gw.admin_port))
        .await
        .unwrap();
    for path in ["/healthz", "/readyz", "/healthz"] {
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n{good}\r\n").as_bytes())
            .await
            .unwrap();
        let r = read_one(&mut s, Duration::from_secs(2))
            .await
            .unwrap_or_else(|| panic!("{path} with the token: no answer on the kept connection"));
        assert_eq!(r.status, 200, "{}", r.head);
        assert_eq!(r.header("connection"), None, "{}", r.head);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authenticated_keep_alive_admin_connection_serves_two_requests() {
    let b = TestBackend::start(Behaviour::Hello).await;
    let yaml = config(
        &format!("adminToken: \"{TOKEN}\"\ntimeouts: {{idle: 60s}}\n"),
        &b.url(),
    );
    let gw = Gateway::start(&yaml).await;
    let mut s = TcpStream::connect(("127.0.0.1", gw.admin_port))
        .await
        .unwrap();
    for (path, marker) in [
        ("/metrics", "hexgate_open_connections"),
        ("/admin/config", "\"generation\""),
        ("/metrics", "hexgate_open_connections"),
    ] {
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
        let r = read_one(&mut s, Duration::from_secs(2))
            .await
            .unwrap_or_else(|| panic!("{path}: no answer on the kept connection"));
        assert_eq!(r.status, 200, "{path}: {}", r.head);
        assert_eq!(r.header("connection"), None, "{path}: {}", r.head);
        assert!(r.body.contains(marker), "{path}: {}", r.body);
    }
    // Still open: the server did not close it after the last answer.
    assert_eq!(
        time_to_close(&mut s, Duration::from_millis(500)).await,
        None,
        "the authenticated connection was closed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_holds_at_most_32_admin_connections() {
    const PER_PEER: usize = hexgate::admin::MAX_CONNECTIONS_PER_PEER;
    assert_eq!(PER_PEER, 32, "the cap the README documents");
    const OPENED: usize = 40;
    let b = TestBackend::start(Behaviour::Hello).await;
    let yaml = config("timeouts: {headerRead: 4s}\n", &b.url());
    let gw = Gateway::start(&yaml).await;

    // 40 half-sent heads from 127.0.0.1; each watched until the server closes it.
    let opened = Instant::now();
    let mut watchers = Vec::with_capacity(OPENED);
    for _ in 0..OPENED {
        let mut s = TcpStream::connect(("127.0.0.1", gw.admin_port))
            .await
            .unwrap();
        // May fail if the server already closed it.
        let _ = s
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
            .await;
        watchers.push(tokio::spawn(async move {
            let mut got = 0;
            let mut buf = [0u8; 1024];
            for _ in 0..1000 {
                let left = Duration::from_secs(10).saturating_sub(opened.elapsed());
                match tokio::time::timeout(left, s.read(&mut buf)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => return (Some(opened.elapsed()), got),
                    Ok(Ok(n)) => got += n,
                    Err(_) => break,
                }
            }
            (None, got)
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    // While 127.0.0.1 holds its 32: one more from it is closed at once, without an answer...
    let mut more = TcpStream::connect(("127.0.0.1", gw.admin_port))
        .await
        .unwrap();
    let _ = more
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await;
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(1), more.read_to_end(&mut out)).await;
    assert!(
        read.is_ok(),
        "connection {} from 127.0.0.1 was neither served nor closed",
        OPENED + 1
    );
    assert!(
        out.is_empty(),
        "connection {} from 127.0.0.1 was served over the per-peer cap: {:?}",
        OPENED + 1,
        String::from_utf8_lossy(&out)
    );
    // ...and another address is served as usual.
    let mut other = connect_from([127, 0, 0, 2], gw.admin_port).await.unwrap();
    other
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let r = read_one(&mut other, Duration::from_secs(2))
        .await
        .expect("127.0.0.2 not served while 127.0.0.1 is at its cap");
    assert_eq!(r.status, 200, "{}", r.head);
    let checked = opened.elapsed();
    assert!(
        checked < Duration::from_millis(3500),
        "checks ran past headerRead: {checked:?}"
    );

    // 8 were closed within a second, without a byte; the other 32 were held until headerRead.
    let mut prompt = 0;
    let mut held = Vec::new();
    for w in watchers {
        let (closed, got) = w.await.unwrap();
        let closed = closed.expect("a half-sent connection still open 10s after opening");
        if closed < Duration::from_secs(1) {
            assert_eq!(got, 0, "a connection over the cap got a response");
            prompt += 1;
        } else {
            held.push(closed);
        }
    }
    eprintln!("{prompt} closed at once; held ones closed after {held:?}");
    assert!(
        held.len() <= PER_PEER,
        "{} connections from one address held",
        held.len()
    );
    assert_eq!(held.len(), PER_PEER, "fewer than the cap were held");
    assert_eq!(prompt, OPENED - PER_PEER);
    for t in &held {
        assert!(
            *t >= Duration::from_millis(3500) && *t <= Duration::from_secs(8),
            "a held connection closed after {t:?}, not by headerRead (4s)"
        );
    }

    // Their slots were given back: 127.0.0.1 is served again.
    assert_eq!(admin_get(gw.admin_port, "/healthz", None).await.status, 200);
}

/// Every guarded path answers 401 with the challenge without the token or with a wrong one,
/// and not 401 with `good`; /healthz and /readyz answer 200 without.
async fn assert_guarded(port: u16, good: &str) {
    for path in [
        "/metrics",
        "/admin/config",
        "/admin/upstreams",
        "/admin/sd",
        "/nope",
    ] {
        for (auth, why) in [
            (None, "no Authorization"),
            (Some("Bearer wrong-token".to_string()), "wrong token"),
            (Some(format!("Bearer {good}x")), "token with a suffix"),
            (Some(format!("Basic {good}")), "Basic scheme"),
            (Some("Bearer".to_string()), "empty bearer"),
        ] {
            let r = admin_get(port, path, auth.as_deref()).await;
            assert_eq!(r.status, 401, "{path} with {why}: {}\n{}", r.head, r.body);
            assert_eq!(
                r.header("www-authenticate"),
                Some("Bearer realm=\"hexgate-admin\""),
                "{path} with {why}: {}",
                r.head
            );
            assert!(!r.body.trim().is_empty(), "401 without a reason");
            assert!(!r.body.contains(good), "the 401 echoes the token");
        }
        let r = admin_get(port, path, Some(&format!("Bearer {good}"))).await;
        let want = match path {
            "/admin/sd" | "/nope" => 404,
            _ => 200,
        };
        assert_eq!(
            r.status, want,
            "{path} with the right token: {}\n{}",
            r.head, r.body
        );
        // The scheme is case-insensitive.
        let r = admin_get(port, path, Some(&format!("bearer {good}"))).await;
        assert_eq!(r.status, want, "{path} with `bearer`: {}", r.head);
    }
    for path in ["/healthz", "/readyz"] {
        let r = admin_get(port, path, None).await;
        assert_eq!(
            r.status, 200,
            "{path} without a token: {}\n{}",
            r.head, r.body
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_token_guards_every_path_but_health_and_follows_reloads() {
    let b = TestBackend::start(Behaviour::Hello).await;
    let gw = Gateway::start(&config(&format!("adminToken: \"{TOKEN}\"\n"), &b.url())).await;
    assert_guarded(gw.admin_port, TOKEN).await;

    // HEAD is guarded too; a method other than GET/HEAD with the token is 405, without it 401.
    let head = raw_request(
        gw.admin_port,
        b"HEAD /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(head.status, 401, "{}", head.head);
    let post = raw_request(
        gw.admin_port,
        format!("POST /metrics HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await;
    assert_eq!(post.status, 405, "{}", post.head);

    // /admin/config shows neither the token nor a way to get it.
    let cfg = admin_get(
        gw.admin_port,
        "/admin/config",
        Some(&format!("Bearer {TOKEN}")),
    )
    .await;
    assert_eq!(cfg.status, 200);
    assert!(!cfg.body.contains(TOKEN), "{}", cfg.body);
    assert!(
        cfg.body.contains("\"adminToken\": \"<redacted>\""),
        "{}",
        cfg.body
    );

    // The token is reloaded with the config: the new one works, the old one stops working.
    let rotated = "adm-rotated-77aa";
    gw.rewrite_config(&config(&format!("adminToken: \"{rotated}\"\n"), &b.url()));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = admin_get(
            gw.admin_port,
            "/metrics",
            Some(&format!("Bearer {rotated}")),
        )
        .await;
        if r.status == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "rotated token never accepted; log:\n{}",
            gw.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let old = admin_get(gw.admin_port, "/metrics", Some(&format!("Bearer {TOKEN}"))).await;
    assert_eq!(
        old.status, 401,
        "the old token still works after the reload"
    );
    assert!(
        !gw.log().contains(TOKEN) && !gw.log().contains(rotated),
        "a token was logged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_token_from_file_and_from_the_environment() {
    let b = TestBackend::start(Behaviour::Hello).await;

    // adminTokenFile, relative to the config's directory; the first line, trimmed.
    let dir = temp_dir("admin-token-file");
    std::fs::write(dir.join("admin-token"), "file-token-93e1\n").unwrap();
    let gw = Gateway::start_in(dir, &config("adminTokenFile: admin-token\n", &b.url())).await;
    assert_guarded(gw.admin_port, "file-token-93e1").await;
    let cfg = admin_get(
        gw.admin_port,
        "/admin/config",
        Some("Bearer file-token-93e1"),
    )
    .await;
    assert!(!cfg.body.contains("file-token-93e1"), "{}", cfg.body);
    drop(gw);

    // HEXGATE_ADMIN_TOKEN, with no token in the config.
    let dir = temp_dir("admin-token-env");
    let gw = Gateway::start_with(
        dir,
        &config("", &b.url()),
        &[("HEXGATE_ADMIN_TOKEN", "env-token-5d2c")],
    )
    .await;
    assert_guarded(gw.admin_port, "env-token-5d2c").await;
    let cfg = admin_get(
        gw.admin_port,
        "/admin/config",
        Some("Bearer env-token-5d2c"),
    )
    .await;
    assert_eq!(cfg.status, 200);
    assert!(!cfg.body.contains("env-token-5d2c"), "{}", cfg.body);

    // No token anywhere: the loopback admin listener stays open, as before.
    let gw = Gateway::start(&config("", &b.url())).await;
    assert_eq!(admin_get(gw.admin_port, "/metrics", None).await.status, 200);
    assert_eq!(
        admin_get(gw.admin_port, "/admin/config", None).await.status,
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn urls_with_credentials_are_redacted_in_admin_config_and_logs() {
    let b = TestBackend::start(Behaviour::Hello).await;
    // Nothing listens on these ports: the JWKS fetch and the Consul watch fail and are logged.
    let dead = free_port();
    let extra = format!(
        "authentication:\n  enabled: true\n  jwksUrl: \"http://jwksuser:jwkspass@127.0.0.1:{dead}/jwks.json?api_key=jwks-query-secret&v=1\"\n\
         consul:\n  address: \"http://consuluser:consulpass@127.0.0.1:{dead}\"\n\
         redis:\n  address: \"127.0.0.1:{dead}\"\n  username: redisuser\n  password: \"redis-password-field\"\n"
    );
    let yaml = format!(
        "gatewayPort: \"{{port}}\"\ngatewayBind: 127.0.0.1\nadminPort: \"{{admin}}\"\n{extra}services:\n  - name: s\n    path: /\n    backends: [\"{}\"]\n  - name: d\n    path: /d/\n    consulServiceName: d\n",
        b.url()
    );
    let gw = Gateway::start(&yaml).await;
    let secrets = [
        "jwksuser",
        "jwkspass",
        "jwks-query-secret",
        "consuluser",
        "consulpass",
        "redis-password-field",
    ];

    let cfg = admin_get(gw.admin_port, "/admin/config", None).await;
    assert_eq!(cfg.status, 200, "{}", cfg.body);
    for s in secrets {
        assert!(
            !cfg.body.contains(s),
            "/admin/config shows {s}:\n{}",
            cfg.body
        );
    }
    assert!(
        cfg.body.contains(&format!(
            "http://<redacted>@127.0.0.1:{dead}/jwks.json?api_key=<redacted>&v=<redacted>"
        )),
        "{}",
        cfg.body
    );
    assert!(
        cfg.body
            .contains(&format!("http://<redacted>@127.0.0.1:{dead}\"")),
        "consul.address: {}",
        cfg.body
    );

    // The JWKS refresh and the Consul watch fail and say so, with the URLs redacted.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(gw.log().contains("JWKS refresh failed") && gw.log().contains("Consul query failed")) {
        assert!(
            Instant::now() < deadline,
            "failures not logged:\n{}",
            gw.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = gw.log();
    for s in secrets {
        assert!(!log.contains(s), "the log shows {s}:\n{log}");
    }
    assert!(log.contains("<redacted>"), "{log}");
}

#[test]
fn validate_never_prints_url_credentials() {
    // A backend URL with userinfo is refused; the message shows it redacted.
    let (code, out) = validate(
        "services:\n  - name: s\n    path: /\n    backends: [\"http://backuser:hunter2pass@127.0.0.1:8080\"]\n",
        &[],
    );
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("services[0]"), "{out}");
    assert!(out.contains("<redacted>@127.0.0.1:8080"), "{out}");
    assert!(
        !out.contains("hunter2pass") && !out.contains("backuser"),
        "{out}"
    );

    // With a query and a raw '/' in the password.
    let (code, out) = validate(
        "services:\n  - name: s\n    path: /\n    backends: [\"http://u:hunter2/pass@127.0.0.1:8080/?key=qsecret\"]\n",
        &[],
    );
    assert_eq!(code, 2, "{out}");
    assert!(
        !out.contains("hunter2") && !out.contains("qsecret"),
        "{out}"
    );

    // A bad Consul address with userinfo.
    let (code, out) = validate(
        "consul: {address: \"ftp://cuser:cpass@\"}\nservices:\n  - name: s\n    path: /\n    backends: [\"http://127.0.0.1:8080\"]\n",
        &[],
    );
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("consul.address"), "{out}");
    assert!(!out.contains("cpass") && !out.contains("cuser"), "{out}");

    // A valid config naming URLs with secrets: the summary shows none of them.
    let (code, out) = validate(
        "consul: {address: \"http://cuser:cpass@127.0.0.1:8500\"}\nauthentication: {enabled: true, jwksUrl: \"https://ju:jpass@idp.example/jwks?api_key=jq\"}\nservices:\n  - name: s\n    path: /\n    backends: [\"http://127.0.0.1:8080\"]\n",
        &[],
    );
    assert_eq!(code, 0, "{out}");
    for s in ["cpass", "cuser", "jpass", "api_key=jq"] {
        assert!(!out.contains(s), "{s} in {out}");
    }
}

#[test]
fn validate_refuses_a_non_loopback_admin_bind_without_a_token() {
    let yaml = "adminBind: 0.0.0.0\nservices:\n  - name: s\n    path: /\n    backends: [\"http://127.0.0.1:8080\"]\n";
    let (code, out) = validate(yaml, &[]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("adminBind"), "{out}");
    assert!(out.contains("token"), "{out}");

    // Any token source makes it acceptable.
    let (code, out) = validate(&format!("adminToken: \"{TOKEN}\"\n{yaml}"), &[]);
    assert_eq!(code, 0, "{out}");
    assert!(!out.contains(TOKEN), "{out}");
    let (code, out) = validate(yaml, &[("HEXGATE_ADMIN_TOKEN", "from-env")]);
    assert_eq!(code, 0, "{out}");
    // A loopback adminBind needs none.
    let (code, out) = validate(&yaml.replace("0.0.0.0", "127.0.0.1"), &[]);
    assert_eq!(code, 0, "{out}");
}
