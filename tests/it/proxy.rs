//! Routing, balancing, failure handling, streaming, upgrades and h2c through the real binary.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{Empty, StreamBody};
use hyper::body::Frame;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::raw::{read_head, send};
use crate::support::*;

fn header() -> String {
    "gatewayPort: \"{port}\"\ngatewayBind: 127.0.0.1\nadminPort: \"{admin}\"\nhealthCheckInterval: 1\n".to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn longest_prefix_strip_path_and_404() {
    let users = TestBackend::start(Behaviour::Hello).await;
    let admin = TestBackend::start(Behaviour::Hello).await;
    let stripped = TestBackend::start(Behaviour::Hello).await;
    let exact = TestBackend::start(Behaviour::Hello).await;
    let yaml = format!(
        "{}services:\n  - name: users\n    path: /users/\n    backends: [\"{}\"]\n  - name: users-admin\n    path: /users/admin/\n    backends: [\"{}\"]\n  - name: api\n    path: /api/v1/\n    stripPath: true\n    backends: [\"{}\"]\n  - name: status\n    path: /status\n    pathType: exact\n    backends: [\"{}\"]\n",
        header(),
        users.url(),
        admin.url(),
        stripped.url(),
        exact.url()
    );
    let gw = Gateway::start(&yaml).await;

    let (s, h, _) = get_with(gw.port, "/users/admin/x", &[]).await.unwrap();
    assert_eq!(s, 200);
    assert_eq!(h["x-backend-port"], admin.addr.port().to_string().as_str());

    let (s, h, _) = get_with(gw.port, "/users/1?q=2", &[]).await.unwrap();
    assert_eq!(s, 200);
    assert_eq!(h["x-backend-port"], users.addr.port().to_string().as_str());
    assert_eq!(h["x-path"], "/users/1?q=2");

    let (s, h, _) = get_with(gw.port, "/api/v1/items/7?x=1", &[]).await.unwrap();
    assert_eq!(s, 200);
    assert_eq!(
        h["x-backend-port"],
        stripped.addr.port().to_string().as_str()
    );
    assert_eq!(h["x-path"], "/items/7?x=1", "stripPath removes the prefix");

    let (s, h, _) = get_with(gw.port, "/status", &[]).await.unwrap();
    assert_eq!(s, 200);
    assert_eq!(h["x-backend-port"], exact.addr.port().to_string().as_str());
    assert_eq!(
        get(gw.port, "/status/more").await.unwrap().0,
        404,
        "exact path only"
    );

    // Path tricks route on the normalised path, and that same path goes upstream.
    let (s, h, _) = get_with(gw.port, "/api/v1/../../users/admin/%2e%2e/me", &[])
        .await
        .unwrap();
    assert_eq!(s, 200);
    assert_eq!(h["x-backend-port"], users.addr.port().to_string().as_str());
    assert_eq!(h["x-path"], "/users/me");
    let (s, h, _) = get_with(gw.port, "/%75sers/admin/z", &[]).await.unwrap();
    assert_eq!(s, 200);
    assert_eq!(h["x-backend-port"], admin.addr.port().to_string().as_str());
    assert_eq!(get(gw.port, "/users/%zz").await.unwrap().0, 400);

    let (s, h, body) = get_with(gw.port, "/nothing/here", &[]).await.unwrap();
    assert_eq!(s, 404);
    let rid = h["x-request-id"].to_str().unwrap();
    assert!(
        body.contains("\"requestId\":\"") && body.contains(rid),
        "{body}"
    );
    assert_eq!(h["content-type"], "application/json");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_headers_request_id_and_host() {
    let b = TestBackend::start(Behaviour::Hello).await;
    let yaml = format!(
        "{}services:\n  - name: s\n    path: /\n    backends: [\"{}\"]\n",
        header(),
        b.url()
    );
    let gw = Gateway::start(&yaml).await;
    let req = Request::get("/x")
        .header("host", "api.example.com:8000")
        .header("x-forwarded-for", "6.6.6.6")
        .header("x-request-id", "client-id-1")
        .header("connection", "keep-alive, x-hop")
        .header("x-hop", "secret")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let (s, h, _) = request(gw.port, req).await.unwrap();
    assert_eq!(s, 200);
    assert_eq!(
        h["x-seen-x-forwarded-for"], "127.0.0.1",
        "untrusted XFF is replaced"
    );
    assert_eq!(h["x-seen-x-forwarded-proto"], "http");
    assert_eq!(h["x-seen-x-forwarded-host"], "api.example.com");
    assert_eq!(h["x-seen-host"], "api.example.com:8000", "Host preserved");
    assert_eq!(h["x-seen-x-request-id"], "client-id-1");
    assert_eq!(h["x-request-id"], "client-id-1");
    assert!(
        !h.contains_key("x-seen-x-hop"),
        "headers named in Connection are hop-by-hop"
    );

    let (_, h, _) = get_with(gw.port, "/x", &[("x-request-id", "bad id with spaces")])
        .await
        .unwrap();
    let id = h["x-request-id"].to_str().unwrap();
    assert_eq!(id.len(), 32, "a generated id replaces an unsafe one: {id}");
    assert_eq!(h["x-seen-x-request-id"], id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_alternates_and_least_request_spreads() {
    let a = TestBackend::start(Behaviour::Hello).await;
    let b = TestBackend::start(Behaviour::Hello).await;
    let yaml = format!(
        "{}services:\n  - name: users\n    path: /users/\n    backends: [\"{}\", \"{}\"]\n  - name: lr\n    path: /lr/\n    loadBalancing: leastRequest\n    backends: [\"{}\", \"{}\"]\n",
        header(),
        a.url(),
        b.url(),
        a.url(),
        b.url()
    );
    let gw = Gateway::start(&yaml).await;
    let mut seen = Vec::new();
    for i in 0..6 {
        let (s, body) = get(gw.port, &format!("/users/{i}")).await.unwrap();
        assert_eq!(s, 200);
        seen.push(body);
    }
    for w in seen.windows(2) {
        assert_ne!(w[0], w[1], "round robin alternates: {seen:?}");
    }
    assert_eq!(seen.iter().collect::<HashSet<_>>().len(), 2);
    let before = (a.hits(), b.hits());
    for i in 0..40 {
        assert_eq!(get(gw.port, &format!("/lr/{i}")).await.unwrap().0, 200);
    }
    assert!(
        a.hits() > before.0 && b.hits() > before.1,
        "least request uses both backends"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_backend_costs_no_client_errors_then_503_when_none_left() {
    let a = TestBackend::start(Behaviour::Hello).await;
    let b = TestBackend::start(Behaviour::Hello).await;
    let yaml = format!(
        "{}services:\n  - name: users\n    path: /users/\n    backends: [\"{}\", \"{}\"]\n",
        header(),
        a.url(),
        b.url()
    );
    let gw = Gateway::start(&yaml).await;
    // Warm pooled connections to both, then kill one mid-load.
    let mut clients: Vec<KeepAlive> = (0..4).map(|_| KeepAlive::new(gw.port)).collect();
    let mut failures = Vec::new();
    let mut total = 0;
    for round in 0..50 {
        if round == 10 {
            a.stop();
        }
        for c in clients.iter_mut() {
            total += 1;
            match c.get("/users/x").await {
                Ok((200, _)) => {}
                other => failures.push(format!("{other:?}")),
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {total} failed: {failures:?}",
        failures.len()
    );
    let up = get(gw.admin_port, "/admin/upstreams").await.unwrap().1;
    assert!(up.contains("\"healthy\": false"), "{up}");
    let m = gw.metrics().await;
    assert!(
        m.contains(&format!(
            "hexgate_upstream_healthy{{service=\"users\",backend=\"{}\"}} 0",
            a.url()
        )),
        "{m}"
    );

    b.stop();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (s, body) = get(gw.port, "/users/y").await.unwrap();
    assert_eq!(s, 503, "{body}");
    assert!(body.contains("requestId"), "{body}");
    let (s, _) = get(gw.port, "/users/z").await.unwrap();
    assert_eq!(s, 503);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_recovers_after_active_health_check() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let yaml = format!(
        "{}services:\n  - name: s\n    path: /\n    backends: [\"http://{}\"]\n",
        header(),
        addr
    );
    let gw = Gateway::start(&yaml).await;
    assert_eq!(get(gw.port, "/x").await.unwrap().0, 503);
    let _b = TestBackend::start_on(
        tokio::net::TcpListener::bind(addr).await.unwrap(),
        Behaviour::Hello,
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if get(gw.port, "/x").await.unwrap().0 == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "backend never came back into rotation"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_backend_gives_504_within_its_timeout() {
    let slow = TestBackend::start(Behaviour::Slow(Duration::from_secs(5))).await;
    let yaml = format!(
        "{}services:\n  - name: slow\n    path: /\n    timeouts: {{request: 300ms}}\n    backends: [\"{}\"]\n",
        header(),
        slow.url()
    );
    let gw = Gateway::start(&yaml).await;
    let t = Instant::now();
    let (s, body) = get(gw.port, "/x").await.unwrap();
    let took = t.elapsed();
    assert_eq!(s, 504, "{body}");
    assert!(
        took >= Duration::from_millis(290) && took < Duration::from_secs(3),
        "{took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrade_passes_through() {
    let ws = TestBackend::start(Behaviour::UpgradeEcho).await;
    let yaml = format!(
        "{}services:\n  - name: ws\n    path: /ws/\n    backends: [\"{}\"]\n",
        header(),
        ws.url()
    );
    let gw = Gateway::start(&yaml).await;
    let mut s = send(gw.port, b"GET /ws/chat HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n").await;
    let (head, _) = read_head(&mut s, Duration::from_secs(5)).await;
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    // A masked WebSocket text frame "hello", echoed byte for byte through both hops.
    let frame = [
        0x81u8,
        0x85,
        1,
        2,
        3,
        4,
        b'h' ^ 1,
        b'e' ^ 2,
        b'l' ^ 3,
        b'l' ^ 4,
        b'o' ^ 1,
    ];
    for _ in 0..3 {
        s.write_all(&frame).await.unwrap();
        let mut echo = vec![0u8; frame.len()];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut echo))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(echo, frame);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_upload_streams_with_flat_memory() {
    let sink = TestBackend::start(Behaviour::CountBody).await;
    let yaml = format!(
        "{}services:\n  - name: up\n    path: /upload\n    backends: [\"{}\"]\n",
        header(),
        sink.url()
    );
    let gw = Gateway::start(&yaml).await;
    // Warm up so the baseline includes the connection pools and buffers.
    assert_eq!(get(gw.port, "/upload").await.unwrap().0, 200);
    let before = gw.rss_kib();
    const CHUNK: usize = 256 * 1024;
    const TOTAL: usize = 200 * 1024 * 1024;
    let chunk = Bytes::from(vec![b'x'; CHUNK]);
    let stream = futures_util::stream::iter(
        (0..TOTAL / CHUNK).map(move |_| Ok::<_, std::io::Error>(Frame::data(chunk.clone()))),
    );
    let req = Request::post("/upload")
        .header("host", "localhost")
        .header("content-length", TOTAL.to_string())
        .body(StreamBody::new(stream))
        .unwrap();
    let (s, _, body) = request(gw.port, req).await.unwrap();
    assert_eq!(s, 200);
    assert_eq!(body, TOTAL.to_string(), "every byte arrived");
    let after = gw.rss_kib();
    let growth_mib = after.saturating_sub(before) / 1024;
    assert!(
        growth_mib < 32,
        "RSS grew {growth_mib} MiB for a 200 MiB upload ({before} -> {after} KiB)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_prior_knowledge() {
    let b = TestBackend::start(Behaviour::Hello).await;
    let yaml = format!(
        "{}services:\n  - name: s\n    path: /users/\n    backends: [\"{}\"]\n",
        header(),
        b.url()
    );
    let gw = Gateway::start(&yaml).await;
    let (s, v, body) = get_h2c(gw.port, "/users/1").await.unwrap();
    assert_eq!(s, 200);
    assert_eq!(v, http::Version::HTTP_2);
    assert_eq!(body, format!("Hello from Backend (Port {})", b.addr.port()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_headers_and_declared_body_are_refused() {
    let b = TestBackend::start(Behaviour::Hello).await;
    let yaml = format!(
        "{}maxHeaderSize: 16k\nservices:\n  - name: s\n    path: /\n    maxBodySize: 1k\n    backends: [\"{}\"]\n",
        header(),
        b.url()
    );
    let gw = Gateway::start(&yaml).await;
    let big = "a".repeat(40 * 1024);
    let req = Request::get("/x")
        .header("host", "localhost")
        .header("x-big", big)
        .body(Empty::<Bytes>::new())
        .unwrap();
    let r = request(gw.port, req).await;
    assert!(matches!(r, Ok((431, _, _))) || r.is_err(), "{r:?}");
    let req = Request::post("/x")
        .header("host", "localhost")
        .body(http_body_util::Full::new(Bytes::from(vec![0u8; 4096])))
        .unwrap();
    let (s, _, body) = request(gw.port, req).await.unwrap();
    assert_eq!(s, 413, "{body}");
    assert_eq!(b.hits(), 0, "nothing reached the backend");
    assert_eq!(get(gw.port, "/ok").await.unwrap().0, 200, "still serving");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_body_over_the_limit_gets_413() {
    let sink = TestBackend::start(Behaviour::CountBody).await;
    let yaml = format!(
        "{}services:\n  - name: up\n    path: /upload\n    maxBodySize: 100k\n    backends: [\"{}\"]\n",
        header(),
        sink.url()
    );
    let gw = Gateway::start(&yaml).await;
    let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
    let small = futures_util::stream::iter((0..1).map({
        let c = chunk.clone();
        move |_| Ok::<_, std::io::Error>(Frame::data(c.clone()))
    }));
    let req = Request::post("/upload")
        .header("host", "localhost")
        .body(StreamBody::new(small))
        .unwrap();
    let (s, _, body) = request(gw.port, req).await.unwrap();
    assert_eq!(
        (s, body.as_str()),
        (200, "65536"),
        "under the limit passes, chunked"
    );
    let big = futures_util::stream::iter(
        (0..16).map(move |_| Ok::<_, std::io::Error>(Frame::data(chunk.clone()))),
    );
    let req = Request::post("/upload")
        .header("host", "localhost")
        .body(StreamBody::new(big))
        .unwrap();
    // The gateway answers 413 before reading the rest and drains what the client still sends
    // (lingering close), so the client sees the 413 rather than a reset.
    let (s, _, body) = request(gw.port, req).await.expect("a 413, not a reset");
    assert_eq!(s, 413, "{body}");
    assert!(body.contains("limit of 102400 bytes"), "{body}");
    let m = gw.metrics().await;
    assert!(
        m.contains("hexgate_http_requests_total{service=\"up\",method=\"POST\",code=\"413\"} 1"),
        "{m}"
    );
    assert_eq!(
        get(gw.port, "/upload").await.unwrap().0,
        200,
        "still serving"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_connections_do_not_starve_real_requests() {
    let b = TestBackend::start(Behaviour::Hello).await;
    let yaml = format!(
        "{}timeouts: {{headerRead: 2s}}\nservices:\n  - name: s\n    path: /\n    backends: [\"{}\"]\n",
        header(),
        b.url()
    );
    let gw = Gateway::start(&yaml).await;
    // 300 slowloris-style connections: a request line and one header, then nothing.
    let mut idle = Vec::new();
    for _ in 0..300 {
        idle.push(send(gw.port, b"GET /x HTTP/1.1\r\nHost: localhost\r\n").await);
    }
    let t = Instant::now();
    let (s, _) = get(gw.port, "/real").await.unwrap();
    let took = t.elapsed();
    assert_eq!(s, 200);
    eprintln!("slowloris: a real request took {took:?} with 300 half-open connections");
    assert!(took < Duration::from_secs(1), "{took:?}");
    // The half-open connections are closed once headerRead has passed.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let mut closed = 0;
    for s in idle.iter_mut() {
        let mut buf = [0u8; 256];
        match tokio::time::timeout(Duration::from_millis(200), s.read(&mut buf)).await {
            Ok(Ok(_)) | Ok(Err(_)) => closed += 1, // EOF, an error response, or a reset
            Err(_) => {}
        }
    }
    assert_eq!(
        closed, 300,
        "every half-open connection was closed after headerRead"
    );
}
