//! Bad input and bad peers: request-smuggling probes and framing errors get a 4xx/5xx with a
//! reason and a closed connection and never reach a backend; idle and resetting connections.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::*;

/// A gateway config on loopback: `extra` top-level lines, then one service.
fn one_service(extra: &str, name: &str, path: &str, backends: &[&str]) -> String {
    let list = backends
        .iter()
        .map(|b| format!("\"{b}\""))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "gatewayPort: \"{{port}}\"\ngatewayBind: 127.0.0.1\nadminPort: \"{{admin}}\"\n{extra}services:\n  - name: {name}\n    path: {path}\n    backends: [{list}]\n"
    )
}

/// Sends raw bytes on a fresh connection; returns everything read until the gateway closed
/// the connection, or `None` if it was still open after two seconds.
async fn raw_exchange(port: u16, raw: &[u8]) -> (String, bool) {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect to the gateway");
    s.write_all(raw).await.expect("send the probe");
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let closed = loop {
        match tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await {
            Ok(Ok(0)) => break true,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Ok(Err(_)) => break true,
            Err(_) => break false,
        }
    };
    (String::from_utf8_lossy(&out).into_owned(), closed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggling_probes_are_refused_and_the_connection_closed() {
    let b = TestBackend::start(Behaviour::CountBody).await;
    let yaml = one_service("", "s", "/", &[&b.url()]);
    let gw = Gateway::start(&yaml).await;
    // Each probe is followed by a second, pipelined request that must never be parsed.
    let next = "GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n";
    let probes: &[(&str, String, u16)] = &[
        (
            "Content-Length then Transfer-Encoding",
            format!("POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{next}"),
            400,
        ),
        (
            "Transfer-Encoding then Content-Length",
            format!("POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n{next}"),
            400,
        ),
        (
            "duplicate Content-Length, same value",
            format!("POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: 4\r\n\r\nabcd{next}"),
            400,
        ),
        (
            "duplicate Content-Length, different values",
            format!("POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: 40\r\n\r\nabcd{next}"),
            400,
        ),
        (
            "Content-Length list",
            format!("POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 4, 4\r\n\r\nabcd{next}"),
            400,
        ),
        (
            "obs-fold",
            format!("GET /a HTTP/1.1\r\nHost: x\r\nX-A: a\r\n folded\r\n\r\n{next}"),
            400,
        ),
        (
            "space before the colon",
            format!("POST /a HTTP/1.1\r\nHost: x\r\nContent-Length : 4\r\n\r\nabcd{next}"),
            400,
        ),
        (
            "negative Content-Length",
            format!("POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n{next}"),
            400,
        ),
        (
            "Transfer-Encoding on HTTP/1.0",
            format!("POST /a HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{next}"),
            400,
        ),
        (
            "chunked not last",
            format!("POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n{next}"),
            400,
        ),
        (
            "a coding before chunked",
            format!("POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n{next}"),
            501,
        ),
        (
            "Transfer-Encoding twice",
            format!("POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{next}"),
            501,
        ),
        (
            "bad chunk size",
            format!("POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n\r\n{next}"),
            400,
        ),
        (
            "two Host headers",
            format!("GET /a HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n{next}"),
            400,
        ),
        (
            "no Host on HTTP/1.1",
            format!("GET /a HTTP/1.1\r\n\r\n{next}"),
            400,
        ),
        (
            "absolute target disagreeing with Host",
            format!("GET http://other/a HTTP/1.1\r\nHost: x\r\n\r\n{next}"),
            400,
        ),
        (
            "control byte in a header value",
            format!("GET /a HTTP/1.1\r\nHost: x\r\nX-A: a\x01b\r\n\r\n{next}"),
            400,
        ),
    ];
    let mut failures = Vec::new();
    for (name, raw, want) in probes {
        let (out, closed) = raw_exchange(gw.port, raw.as_bytes()).await;
        let status_ok = out.starts_with(&format!("HTTP/1.1 {want} "));
        let responses = out.lines().filter(|l| l.starts_with("HTTP/1.1 ")).count();
        if !status_ok || !closed || responses != 1 {
            failures.push(format!(
                "{name}: want {want}, one response and a close; got closed={closed}, {responses} response(s): {}",
                out.lines().next().unwrap_or("")
            ));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
    assert_eq!(b.hits(), 0, "no probe reached the backend");
    let (s, _) = get(gw.port, "/ok").await.unwrap();
    assert_eq!(s, 200, "still serving");
    // The reasons are spelled out for the gateway's own refusals.
    let (out, _) = raw_exchange(gw.port, b"GET /a HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n").await;
    assert!(out.contains("more than one Host header"), "{out}");
}

/// Reads one small response (headers and a body of `content-length` bytes) from `s`.
async fn read_response(s: &mut tokio::net::TcpStream) -> Result<String, String> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&out).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length: ")
                        .map(|v| v.trim().parse::<usize>())
                })
                .and_then(Result::ok)
                .unwrap_or(0);
            if body.len() >= len {
                return Ok(head.lines().next().unwrap_or("").to_string());
            }
        }
        match tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf)).await {
            Ok(Ok(0)) => return Err("closed".into()),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => return Err("timed out".into()),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_connections_live_for_idle_not_header_read() {
    let b = TestBackend::start(Behaviour::Hello).await;
    let yaml = one_service(
        "timeouts: {headerRead: 1s, idle: 3s}\n",
        "s",
        "/",
        &[&b.url()],
    );
    let gw = Gateway::start(&yaml).await;
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", gw.port))
        .await
        .unwrap();
    let req = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n";
    s.write_all(req).await.unwrap();
    assert_eq!(read_response(&mut s).await.unwrap(), "HTTP/1.1 200 OK");
    // Idle longer than headerRead but shorter than idle: the connection is still usable.
    tokio::time::sleep(Duration::from_millis(1800)).await;
    s.write_all(req).await.unwrap();
    assert_eq!(
        read_response(&mut s).await.unwrap(),
        "HTTP/1.1 200 OK",
        "a keep-alive connection idle for 1.8 s (headerRead 1 s, idle 3 s) still serves"
    );
    // A request head started after an idle pause still has only headerRead to complete.
    tokio::time::sleep(Duration::from_millis(500)).await;
    s.write_all(b"GET /a HTTP/1.1\r\n").await.unwrap();
    let t = std::time::Instant::now();
    let mut buf = [0u8; 512];
    let r = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await;
    let took = t.elapsed();
    assert!(
        matches!(r, Ok(Ok(_)) | Ok(Err(_))),
        "a partial head is cut off: {r:?}"
    );
    assert!(
        took >= Duration::from_millis(800) && took < Duration::from_millis(2500),
        "a partial head is cut off after headerRead (1 s), took {took:?}"
    );
    // An idle connection is closed once idle has passed.
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", gw.port))
        .await
        .unwrap();
    s.write_all(req).await.unwrap();
    assert_eq!(read_response(&mut s).await.unwrap(), "HTTP/1.1 200 OK");
    let t = std::time::Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(6), s.read(&mut buf)).await;
    let took = t.elapsed();
    assert!(matches!(r, Ok(Ok(0)) | Ok(Err(_))), "closed quietly: {r:?}");
    assert!(
        took >= Duration::from_millis(2700) && took < Duration::from_millis(4500),
        "closed after idle (3 s), took {took:?}"
    );
}

/// A backend that accepts, reads the request and answers with a TCP reset.
async fn resetting_backend() -> (String, Arc<AtomicU64>, tokio::task::JoinHandle<()>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    let resets = Arc::new(AtomicU64::new(0));
    let r = resets.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                continue;
            };
            let r = r.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                #[allow(deprecated)]
                let _ = s.set_linger(Some(Duration::ZERO));
                r.fetch_add(1, Ordering::Relaxed);
                drop(s);
            });
        }
    });
    (url, resets, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resetting_backend_costs_no_client_errors_and_is_ejected() {
    let good = TestBackend::start(Behaviour::Hello).await;
    let (bad, resets, task) = resetting_backend().await;
    let yaml = one_service("healthCheckInterval: 30\n", "s", "/", &[&bad, &good.url()]);
    let gw = Gateway::start(&yaml).await;
    let mut clients: Vec<KeepAlive> = (0..4).map(|_| KeepAlive::new(gw.port)).collect();
    let mut failures = Vec::new();
    let mut total = 0u64;
    for _ in 0..25 {
        for c in clients.iter_mut() {
            total += 1;
            match c.get("/x").await {
                Ok((200, _)) => {}
                other => failures.push(format!("{other:?}")),
            }
        }
    }
    task.abort();
    eprintln!(
        "resetting backend: {} resets, {} of {total} client requests failed",
        resets.load(Ordering::Relaxed),
        failures.len()
    );
    assert!(
        resets.load(Ordering::Relaxed) > 0,
        "the bad backend was tried"
    );
    assert!(
        failures.is_empty(),
        "{} of {total} failed: {failures:?}",
        failures.len()
    );
    assert_eq!(
        good.hits(),
        total,
        "every request was served by the good backend"
    );
    let m = gw.metrics().await;
    assert!(
        m.contains(&format!(
            "hexgate_upstream_healthy{{service=\"s\",backend=\"{bad}\"}} 0"
        )),
        "the resetting backend is ejected: {m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_paths_are_never_served_on_the_public_port() {
    let b = TestBackend::start(Behaviour::Hello).await;
    let yaml = one_service("", "users", "/users/", &[&b.url()]);
    let gw = Gateway::start(&yaml).await;
    for path in ["/metrics", "/admin/config", "/admin/upstreams", "/readyz"] {
        let (s, body) = get(gw.port, path).await.unwrap();
        assert_eq!(s, 404, "{path} on the public port: {body}");
        assert_eq!(get(gw.admin_port, path).await.unwrap().0, 200, "{path}");
    }
    let cfg = get(gw.admin_port, "/admin/config").await.unwrap().1;
    assert!(cfg.contains("\"adminBind\": \"127.0.0.1\""), "{cfg}");
}
