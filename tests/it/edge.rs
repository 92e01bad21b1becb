//! Edge rules through the real binary, byte by byte: host canonicalisation (HTTP/1 Host and
//! absolute targets, HTTP/2 `:authority` and `host`), the escaped-separator policy, the
//! header-field policy (underscores, count, size, duplicate Authorization), CONNECT, silent
//! connections, and the quota of the embedded (memory) limit store beside Redis.
//!
//! HTTP/1 probes are written on raw sockets; HTTP/2 probes use the h2 crate (a frame-level
//! client: it sends the pseudo-headers and fields exactly as given) and, for bytes no URI type
//! can hold, hand-written HEADERS frames.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::support::*;

/// A raw HTTP/1.1 backend that records every request head it receives and answers 200 with
/// `x-backend: NAME`. Lets the tests see exactly which names and values reached a backend.
struct Capture {
    port: u16,
    heads: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Capture {
    async fn start(name: &'static str) -> Capture {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let heads = Arc::new(Mutex::new(Vec::new()));
        let h = heads.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let h = h.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    // One request per connection is enough here; bounded by the read timeout.
                    loop {
                        let n =
                            match tokio::time::timeout(Duration::from_secs(5), s.read(&mut chunk))
                                .await
                            {
                                Ok(Ok(n)) if n > 0 => n,
                                _ => return,
                            };
                        buf.extend_from_slice(&chunk[..n]);
                        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                            if head.starts_with("GET /health") {
                                let _ = s
                                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nOK")
                                    .await;
                                return;
                            }
                            h.lock().unwrap().push(head);
                            let resp = format!(
                                "HTTP/1.1 200 OK\r\nx-backend: {name}\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok"
                            );
                            let _ = s.write_all(resp.as_bytes()).await;
                            return;
                        }
                        if buf.len() > 1 << 20 {
                            return;
                        }
                    }
                });
            }
        });
        Capture { port, heads, task }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn heads(&self) -> Vec<String> {
        self.heads.lock().unwrap().clone()
    }

    fn last(&self) -> String {
        self.heads().last().cloned().unwrap_or_default()
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.task.abort();
    }
}

const TOP: &str = "gatewayPort: \"{port}\"\ngatewayBind: 127.0.0.1\nadminPort: \"{admin}\"\nhealthCheckInterval: 1h\n";

/// Writes `raw` on a fresh connection and reads until the gateway closes it or 3 s pass.
async fn exchange(port: u16, raw: &[u8]) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(raw).await.unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => out.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The status code of the first response in `resp`, or 0.
fn status(resp: &str) -> u16 {
    resp.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

// ---------------------------------------------------------------------------------------------
// HTTP/2 clients

/// One HTTP/2 request through the h2 crate: `authority` as `:authority`, `fields` as given.
async fn h2_request(
    port: u16,
    method: &str,
    authority: &str,
    path: &str,
    fields: &[(&str, &str)],
) -> Result<(u16, http::HeaderMap), String> {
    let tcp = TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| e.to_string())?;
    let (client, conn) = h2::client::handshake(tcp)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut client = client.ready().await.map_err(|e| e.to_string())?;
    let uri = if method == "CONNECT" {
        authority.to_string()
    } else {
        format!("http://{authority}{path}")
    };
    let mut b = http::Request::builder().method(method).uri(uri);
    for (n, v) in fields {
        b = b.header(*n, *v);
    }
    let req = b.body(()).map_err(|e| e.to_string())?;
    let (resp, _) = client.send_request(req, true).map_err(|e| e.to_string())?;
    let resp = tokio::time::timeout(Duration::from_secs(5), resp)
        .await
        .map_err(|_| "no response".to_string())?
        .map_err(|e| e.to_string())?;
    Ok((resp.status().as_u16(), resp.headers().clone()))
}

/// HPACK literal field without indexing, new name, no Huffman (RFC 7541 6.2.2).
fn hpack_literal(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    assert!(name.len() < 127 && value.len() < 127);
    out.push(0x00);
    out.push(name.len() as u8);
    out.extend_from_slice(name);
    out.push(value.len() as u8);
    out.extend_from_slice(value);
}

fn frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    let len = payload.len() as u32;
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
}

/// What came back for stream 1 of a hand-written HTTP/2 request.
#[derive(Debug, PartialEq)]
enum H2Outcome {
    /// A response whose `:status` was HPACK-indexed from the static table (200, 204, 206, 304,
    /// 400, 404, 500).
    Status(u16),
    /// A response with another status encoding.
    OtherStatus,
    Reset,
    GoAway,
    Nothing,
}

/// Sends one GET as raw frames with the given fields (pseudo-headers first) and reports what
/// stream 1 got.
async fn h2_raw(port: u16, fields: &[(&[u8], &[u8])]) -> H2Outcome {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    frame(&mut out, 0x4, 0, 0, &[]); // SETTINGS
    let mut block = Vec::new();
    for (n, v) in fields {
        hpack_literal(&mut block, n, v);
    }
    frame(&mut out, 0x1, 0x4 | 0x1, 1, &block); // HEADERS, END_HEADERS | END_STREAM
    s.write_all(&out).await.unwrap();
    let mut buf = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut chunk = [0u8; 4096];
    while Instant::now() < deadline {
        // Parse whole frames already read.
        let mut at = 0;
        while buf.len() >= at + 9 {
            let len = u32::from_be_bytes([0, buf[at], buf[at + 1], buf[at + 2]]) as usize;
            if buf.len() < at + 9 + len {
                break;
            }
            let kind = buf[at + 3];
            let stream = u32::from_be_bytes([buf[at + 5], buf[at + 6], buf[at + 7], buf[at + 8]])
                & 0x7fff_ffff;
            let payload = &buf[at + 9..at + 9 + len];
            match (kind, stream) {
                (0x1, 1) => {
                    const STATIC: [(u8, u16); 7] = [
                        (0x88, 200),
                        (0x89, 204),
                        (0x8a, 206),
                        (0x8b, 304),
                        (0x8c, 400),
                        (0x8d, 404),
                        (0x8e, 500),
                    ];
                    return match payload
                        .first()
                        .and_then(|b| STATIC.iter().find(|(i, _)| i == b))
                    {
                        Some((_, code)) => H2Outcome::Status(*code),
                        None => H2Outcome::OtherStatus,
                    };
                }
                (0x3, 1) => return H2Outcome::Reset,
                (0x7, _) => return H2Outcome::GoAway,
                _ => {}
            }
            at += 9 + len;
        }
        buf.drain(..at);
        match tokio::time::timeout(Duration::from_millis(500), s.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return H2Outcome::Nothing,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => {}
        }
    }
    H2Outcome::Nothing
}

// ---------------------------------------------------------------------------------------------
// 1. Host canonicalisation

/// A host-bound admin route beside a public catch-all on the same path: every spelling of the
/// admin host reaches the admin route, over HTTP/1 and HTTP/2, and invalid hosts are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_variants_reach_the_host_bound_route() {
    let admin = Capture::start("admin").await;
    let public = Capture::start("public").await;
    let yaml = format!(
        "{TOP}services:\n  - name: admin\n    path: /\n    hosts: [admin.example.com]\n    backends: [\"{}\"]\n  - name: public\n    path: /\n    backends: [\"{}\"]\n",
        admin.url(),
        public.url()
    );
    let gw = Gateway::start(&yaml).await;
    for host in [
        "admin.example.com",
        "admin.example.com.",
        "ADMIN.EXAMPLE.COM.",
        "admin.example.com.:80",
        "Admin.Example.Com:80",
        "admin.example.com:",
    ] {
        let r = exchange(
            gw.port,
            format!("GET /x HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await;
        assert_eq!(status(&r), 200, "Host {host:?}: {r}");
        assert!(r.contains("x-backend: admin"), "Host {host:?} reached {r}");
        let seen = admin.last();
        assert_eq!(header(&seen, "host"), Some("admin.example.com"), "{seen}");
        assert_eq!(
            header(&seen, "x-forwarded-host"),
            Some("admin.example.com"),
            "{seen}"
        );
    }
    // A non-default port stays, canonical; it is the same host for routing.
    let r = exchange(
        gw.port,
        b"GET /x HTTP/1.1\r\nHost: ADMIN.example.com.:8080\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(r.contains("x-backend: admin"), "{r}");
    assert_eq!(
        header(&admin.last(), "host"),
        Some("admin.example.com:8080")
    );
    // Absolute-form target: the target's authority is canonicalised too, and must agree.
    let r = exchange(
        gw.port,
        b"GET http://ADMIN.example.com./x HTTP/1.1\r\nHost: admin.example.com:80\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(r.contains("x-backend: admin"), "{r}");
    let r = exchange(
        gw.port,
        b"GET http://public.example.com/x HTTP/1.1\r\nHost: admin.example.com\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status(&r), 400, "{r}");

    let before = admin.heads().len() + public.heads().len();
    let bad: &[&[u8]] = &[
        b"evil@x",
        b"x/y",
        b"x:80:80",
        b"admin.example.com..",
        b"a..b",
        b".admin.example.com",
        b"x:99999",
        b"x:http",
        b"\xc3\xa9.example.com",
        b"[::1",
        b"x%2ey",
        b"",
    ];
    for host in bad {
        let mut raw = b"GET /x HTTP/1.1\r\nHost: ".to_vec();
        raw.extend_from_slice(host);
        raw.extend_from_slice(b"\r\nConnection: close\r\n\r\n");
        let r = exchange(gw.port, &raw).await;
        assert_eq!(
            status(&r),
            400,
            "Host {:?} must be refused: {r}",
            String::from_utf8_lossy(host)
        );
    }
    assert_eq!(
        admin.heads().len() + public.heads().len(),
        before,
        "a refused host reached a backend"
    );

    // HTTP/2: the same canonical host from :authority, and :authority/host disagreement.
    for authority in [
        "admin.example.com.",
        "ADMIN.EXAMPLE.COM.:80",
        "admin.example.com",
    ] {
        let (code, headers) = h2_request(gw.port, "GET", authority, "/x", &[])
            .await
            .unwrap();
        assert_eq!(code, 200, ":authority {authority}");
        assert_eq!(
            headers.get("x-backend").map(|v| v.to_str().unwrap()),
            Some("admin"),
            ":authority {authority:?} reached the wrong route"
        );
        assert_eq!(header(&admin.last(), "host"), Some("admin.example.com"));
    }
    let (code, headers) = h2_request(
        gw.port,
        "GET",
        "admin.example.com.",
        "/x",
        &[("host", "ADMIN.example.com")],
    )
    .await
    .unwrap();
    assert_eq!(code, 200, "same host, two spellings");
    assert_eq!(headers.get("x-backend").unwrap(), "admin");
    let (code, _) = h2_request(
        gw.port,
        "GET",
        "public.example.com",
        "/x",
        &[("host", "admin.example.com")],
    )
    .await
    .unwrap();
    assert_eq!(code, 400, ":authority and host differ");
    // Bytes no URI type holds, as raw HEADERS frames: refused (400 or a stream reset).
    for authority in [&b"evil@x"[..], b"a..b", b"\xc3\xa9.example.com", b"x:80:80"] {
        let got = h2_raw(
            gw.port,
            &[
                (b":method", b"GET"),
                (b":scheme", b"http"),
                (b":path", b"/x"),
                (b":authority", authority),
            ],
        )
        .await;
        assert!(
            matches!(
                got,
                H2Outcome::Status(400) | H2Outcome::Reset | H2Outcome::GoAway
            ),
            ":authority {:?} must be refused, got {got:?}",
            String::from_utf8_lossy(authority)
        );
    }
    let got = h2_raw(
        gw.port,
        &[
            (b":method", b"GET"),
            (b":scheme", b"http"),
            (b":path", b"/x"),
            (b":authority", b"admin.example.com."),
        ],
    )
    .await;
    assert_eq!(got, H2Outcome::Status(200), "the raw client works");
    assert_eq!(header(&admin.last(), "host"), Some("admin.example.com"));
    assert_eq!(
        admin.heads().len() + public.heads().len(),
        before + 5,
        "only the valid HTTP/2 requests reached a backend"
    );
}

// ---------------------------------------------------------------------------------------------
// 4. Encoded separators

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encoded_separators_are_refused_by_default_and_kept_or_decoded_on_request() {
    let b = Capture::start("b").await;
    let yaml = format!(
        "{TOP}services:\n  - name: public\n    path: /files/public/\n    backends: [\"{u}\"]\n  - name: ids\n    path: /ids/\n    escapedSlashes: keep\n    backends: [\"{u}\"]\n  - name: dec\n    path: /dec/public/\n    escapedSlashes: decode\n    backends: [\"{u}\"]\n  - name: decroot\n    path: /dec/\n    escapedSlashes: decode\n    backends: [\"{u}\"]\n  - name: other\n    path: /other/\n    backends: [\"{u}\"]\n",
        u = b.url()
    );
    let gw = Gateway::start(&yaml).await;
    let get = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    for path in [
        "/files/public/..%2fprivate/secret",
        "/files/public/..%2Fprivate/secret",
        "/files/public/..%5cprivate/secret",
        "/files/public/..%5Cprivate/secret",
        "/files/public/a%00b",
        "/ids/a%00b",
    ] {
        let r = exchange(gw.port, get(path).as_bytes()).await;
        assert_eq!(status(&r), 400, "{path}: {r}");
    }
    // A raw backslash: refused by the HTTP parser or by the policy, never forwarded.
    let r = exchange(gw.port, get("/files/public/..\\private/secret").as_bytes()).await;
    assert_eq!(status(&r), 400, "raw backslash: {r}");
    assert!(
        b.heads().is_empty(),
        "a refused path reached the backend: {:?}",
        b.heads()
    );

    // keep: forwarded as it came (upper-case hex), routed as one segment.
    let r = exchange(gw.port, get("/ids/org%2fteam/1").as_bytes()).await;
    assert_eq!(status(&r), 200, "{r}");
    assert!(
        b.last().starts_with("GET /ids/org%2Fteam/1 "),
        "{}",
        b.last()
    );

    // decode: separators before routing; the decoded path goes upstream.
    let r = exchange(gw.port, get("/dec/public/..%2fprivate/secret").as_bytes()).await;
    assert_eq!(status(&r), 200, "{r}");
    assert!(
        b.last().starts_with("GET /dec/private/secret "),
        "{}",
        b.last()
    );
    // decoding may not carry a request onto a route that refuses separators.
    let r = exchange(gw.port, get("/dec/public/..%2f..%2fother/x").as_bytes()).await;
    assert_eq!(status(&r), 400, "{r}");
    assert!(!b.last().contains("/other/"), "{}", b.last());
}

/// A path must route the same however the backend reads it: with `;` segment parameters removed
/// (Tomcat, Jetty, Spring) or, on a `keep` route, with its escaped separators decoded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_readings_that_reach_another_route_are_refused() {
    let private = Capture::start("private").await;
    let public = Capture::start("public").await;
    let yaml = format!(
        "{TOP}services:\n  - name: private\n    path: /files/private/\n    backends: [\"{p}\"]\n  - name: public\n    path: /\n    backends: [\"{u}\"]\n  - name: ids\n    path: /k/\n    escapedSlashes: keep\n    backends: [\"{u}\"]\n",
        p = private.url(),
        u = public.url()
    );
    let gw = Gateway::start(&yaml).await;
    let get = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    for path in [
        "/files/private;x/secret",
        "/files;/private/secret",
        "/files/public/..;/private/secret",
        "/files/public/..;x=1/private/secret",
        "/k/..%2f..%2ffiles/private/secret",
        "/k/..%2F..%2Ffiles;a/private/secret",
        // Parameters removed before separators are decoded (Tomcat's order).
        "/k/z;%2Fw/..%2F..%2Ffiles/private/secret",
    ] {
        let r = exchange(gw.port, get(path).as_bytes()).await;
        assert_eq!(status(&r), 400, "{path}: {r}");
        assert!(r.contains("ambiguous path"), "{path}: {r}");
    }
    assert!(private.heads().is_empty() && public.heads().is_empty());
    // Parameters that do not change the route are fine.
    for (path, to) in [
        ("/files/private/a;v=1", "private"),
        ("/files/public;v=1/a", "public"),
        ("/k/org%2fteam;v=2", "public"),
    ] {
        let r = exchange(gw.port, get(path).as_bytes()).await;
        assert_eq!(status(&r), 200, "{path}: {r}");
        assert!(r.contains(&format!("x-backend: {to}")), "{path}: {r}");
    }
    // HTTP/2 goes through the same rule.
    let (code, _) = h2_request(gw.port, "GET", "x", "/files/private;x/secret", &[])
        .await
        .unwrap();
    assert_eq!(code, 400);
    assert!(
        private.heads().len() == 1,
        "only the legitimate request reached private"
    );
}

// ---------------------------------------------------------------------------------------------
// 5. and 6. Header names with underscores; two Authorization fields

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn underscore_names_never_reach_a_backend_by_default() {
    let b = Capture::start("b").await;
    let yaml = format!(
        "{TOP}services:\n  - name: s\n    path: /\n    backends: [\"{}\"]\n",
        b.url()
    );
    let gw = Gateway::start(&yaml).await;
    // The CGI desync: Transfer_Encoding beside Content-Length, with a second request in the body.
    let body = "0\r\n\r\nGET /admin HTTP/1.1\r\nHost: x\r\n\r\n";
    let raw = format!(
        "POST /a HTTP/1.1\r\nHost: x\r\nX_Consumer_Id: admin\r\nTransfer_Encoding: chunked\r\nX-Ok: 1\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let r = exchange(gw.port, raw.as_bytes()).await;
    assert_eq!(status(&r), 200, "{r}");
    let seen = b.last();
    assert!(seen.starts_with("POST /a "), "{seen}");
    for line in seen.lines().skip(1) {
        let name = line.split(':').next().unwrap_or("");
        assert!(!name.contains('_'), "{name} reached the backend:\n{seen}");
    }
    assert_eq!(header(&seen, "x-ok"), Some("1"));
    assert_eq!(b.heads().len(), 1, "the body was read as a second request");

    // HTTP/2 goes through the same policy.
    let (code, _) = h2_request(gw.port, "GET", "x", "/h2", &[("x_consumer_id", "admin")])
        .await
        .unwrap();
    assert_eq!(code, 200);
    let seen = b.last();
    assert!(seen.starts_with("GET /h2 "), "{seen}");
    assert!(
        !seen.to_ascii_lowercase().contains("x_consumer_id"),
        "{seen}"
    );

    // Two Authorization fields: 400 on both protocols, nothing forwarded.
    let n = b.heads().len();
    let r = exchange(
        gw.port,
        b"GET /a HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer a\r\nAuthorization: Bearer b\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status(&r), 400, "{r}");
    assert!(
        r.contains("Authorization"),
        "the reason names the header: {r}"
    );
    let (code, _) = h2_request(
        gw.port,
        "GET",
        "x",
        "/a",
        &[("authorization", "Bearer a"), ("authorization", "Bearer b")],
    )
    .await
    .unwrap();
    assert_eq!(code, 400);
    assert_eq!(b.heads().len(), n, "a refused request reached the backend");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn underscore_policy_reject_and_allow() {
    let b = Capture::start("b").await;
    let svc = format!(
        "services:\n  - name: s\n    path: /\n    backends: [\"{}\"]\n",
        b.url()
    );
    let raw = b"GET /a HTTP/1.1\r\nHost: x\r\nX_Thing: 1\r\nConnection: close\r\n\r\n";
    let gw = Gateway::start(&format!("{TOP}underscoreHeaders: reject\n{svc}")).await;
    let r = exchange(gw.port, raw).await;
    assert_eq!(status(&r), 400, "{r}");
    assert!(b.heads().is_empty());
    drop(gw);
    let gw = Gateway::start(&format!("{TOP}underscoreHeaders: allow\n{svc}")).await;
    let r = exchange(gw.port, raw).await;
    assert_eq!(status(&r), 200, "{r}");
    assert_eq!(header(&b.last(), "x_thing"), Some("1"));
}

// ---------------------------------------------------------------------------------------------
// 10. Header limits at their documented values; a silent connection

fn with_fields(count: usize, value_len: usize) -> Vec<u8> {
    // `Host: x` is one field; `count` more follow.
    let mut raw = b"GET /a HTTP/1.1\r\nHost: x\r\n".to_vec();
    for i in 0..count {
        raw.extend_from_slice(format!("x-f{i:04}: {}\r\n", "v".repeat(value_len)).as_bytes());
    }
    raw.extend_from_slice(b"Connection: close\r\n\r\n");
    raw
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_count_and_size_hold_at_their_values() {
    let b = Capture::start("b").await;
    let svc = format!(
        "services:\n  - name: s\n    path: /\n    backends: [\"{}\"]\n",
        b.url()
    );
    let gw = Gateway::start(&format!("{TOP}{svc}")).await;
    // Default maxHeaderCount 100: Host + Connection + 98 = 100 fields pass, 101 do not.
    assert_eq!(status(&exchange(gw.port, &with_fields(98, 1)).await), 200);
    assert_eq!(status(&exchange(gw.port, &with_fields(99, 1)).await), 431);
    let (code, _) = h2_request(
        gw.port,
        "GET",
        "x",
        "/a",
        &(0..101).map(|_| ("x-f", "v")).collect::<Vec<_>>(),
    )
    .await
    .unwrap();
    assert_eq!(code, 431, "HTTP/2: 101 fields");
    // Default maxHeaderSize 64k, each field counted as name + value + 4 bytes:
    // Host (4+1+4) + Connection (10+5+4) + 60 fields of (7 + v + 4).
    let budget = 64 * 1024 - 9 - 19;
    let per = budget / 60 - 11;
    let raw = with_fields(60, per);
    assert_eq!(status(&exchange(gw.port, &raw).await), 200, "at the limit");
    // The same limit on HTTP/2, each field counted the same way (name + value + 4).
    let value = "v".repeat(per);
    let names: Vec<String> = (0..60).map(|i| format!("x-f{i:04}")).collect();
    let mut fields: Vec<(&str, &str)> =
        names.iter().map(|n| (n.as_str(), value.as_str())).collect();
    // Host (as :authority) and Connection are not there: make up their 28 bytes in one field.
    let pad = "p".repeat(28 - 4 - 5);
    fields.push(("x-pad", &pad));
    let (code, _) = h2_request(gw.port, "GET", "x", "/a", &fields)
        .await
        .unwrap();
    assert_eq!(code, 200, "HTTP/2 at the limit");
    let bigger = "v".repeat(per + 1 + (budget % 60));
    let fields: Vec<(&str, &str)> = names
        .iter()
        .map(|n| (n.as_str(), bigger.as_str()))
        .collect();
    let (code, _) = h2_request(gw.port, "GET", "x", "/a", &fields)
        .await
        .unwrap();
    assert_eq!(code, 431, "HTTP/2 just over the limit");
    // 114,681 bytes got through before; now anything over 64k of fields is 431.
    let over = with_fields(60, per + 1 + (budget % 60));
    let r = exchange(gw.port, &over).await;
    assert_eq!(
        status(&r),
        431,
        "just over the limit: {}",
        &r[..r.len().min(200)]
    );
    let big = with_fields(50, 2290); // ~114 KB
    assert_eq!(status(&exchange(gw.port, &big).await), 431);
    drop(gw);

    // A configured count: 150.
    let gw = Gateway::start(&format!("{TOP}maxHeaderCount: 150\n{svc}")).await;
    assert_eq!(status(&exchange(gw.port, &with_fields(148, 1)).await), 200);
    assert_eq!(status(&exchange(gw.port, &with_fields(149, 1)).await), 431);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_connection_is_closed_after_one_header_read_timeout() {
    let b = Capture::start("b").await;
    let yaml = format!(
        "{TOP}timeouts: {{headerRead: 1s}}\nservices:\n  - name: s\n    path: /\n    backends: [\"{}\"]\n",
        b.url()
    );
    let gw = Gateway::start(&yaml).await;
    for (what, first, after) in [
        ("nothing", &b""[..], 0),
        ("half a preface", b"PRI * HT", 0),
        ("half a head", b"GET / HT", 0),
        // A first byte late in the budget does not buy a second headerRead.
        ("a late half head", b"G", 900),
        (
            "an HTTP/2 preface and SETTINGS, then nothing",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00",
            0,
        ),
    ] {
        let t = Instant::now();
        let mut s = TcpStream::connect(("127.0.0.1", gw.port)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(after)).await;
        s.write_all(first).await.unwrap();
        let mut buf = [0u8; 1024];
        let closed = loop {
            match tokio::time::timeout(Duration::from_secs(4), s.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break true,
                Ok(Ok(_)) => continue, // a 408 may come first
                Err(_) => break false,
            }
        };
        assert!(closed, "{what}: still open after 4 s");
        let held = t.elapsed();
        assert!(
            held < Duration::from_millis(1600),
            "{what}: held for {held:?}, headerRead is 1s"
        );
    }
}

/// An HTTP/2 connection with no stream open for `timeouts.idle` is closed (GOAWAY), even when
/// the client keeps answering pings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_http2_connection_is_closed_after_the_idle_timeout() {
    let b = Capture::start("b").await;
    let yaml = format!(
        "{TOP}timeouts: {{headerRead: 1s, idle: 2s}}\nservices:\n  - name: s\n    path: /\n    backends: [\"{}\"]\n",
        b.url()
    );
    let gw = Gateway::start(&yaml).await;
    let tcp = TcpStream::connect(("127.0.0.1", gw.port)).await.unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.unwrap();
    let conn = tokio::spawn(conn);
    let mut client = client.ready().await.unwrap();
    let req = http::Request::get("http://x/a").body(()).unwrap();
    let (resp, _) = client.send_request(req, true).unwrap();
    assert_eq!(resp.await.unwrap().status(), 200);
    let t = Instant::now();
    // The h2 client answers pings by itself; the gateway must still close the connection.
    let ended = tokio::time::timeout(Duration::from_secs(6), conn).await;
    assert!(
        ended.is_ok(),
        "still open 6 s after the last stream (idle is 2s)"
    );
    let held = t.elapsed();
    assert!(
        held >= Duration::from_millis(1500) && held < Duration::from_millis(4500),
        "closed after {held:?}, idle is 2s"
    );
}

/// A backend that streams its body: `n` chunks, one every `gap`.
async fn streaming_backend(n: usize, gap: Duration) -> (u16, tokio::task::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await;
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n")
                    .await;
                for _ in 0..n {
                    tokio::time::sleep(gap).await;
                    if s.write_all(b"5\r\nchunk\r\n").await.is_err() {
                        return;
                    }
                }
                let _ = s.write_all(b"0\r\n\r\n").await;
            });
        }
    });
    (port, task)
}

/// The HTTP/2 idle timer counts a response still sending as activity (a long stream is not cut),
/// and a stream the client stalls (zero flow-control window) as none: that connection is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_idle_spares_streaming_responses_and_closes_stalled_ones() {
    let (port, task) = streaming_backend(8, Duration::from_millis(400)).await;
    let yaml = format!(
        "{TOP}timeouts: {{headerRead: 1s, idle: 1s}}\nservices:\n  - name: s\n    path: /\n    backends: [\"http://127.0.0.1:{port}\"]\n"
    );
    let gw = Gateway::start(&yaml).await;
    // 8 chunks over 3.2 s, with idle 1 s: the whole body arrives.
    let tcp = TcpStream::connect(("127.0.0.1", gw.port)).await.unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    let mut client = client.ready().await.unwrap();
    let (resp, _) = client
        .send_request(http::Request::get("http://x/s").body(()).unwrap(), true)
        .unwrap();
    let resp = resp.await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(8);
    while let Some(chunk) = tokio::time::timeout_at(deadline.into(), body.data())
        .await
        .expect("the stream stalled")
    {
        let chunk = chunk.expect("the stream was cut");
        let _ = body.flow_control().release_capacity(chunk.len());
        got.extend_from_slice(&chunk);
    }
    assert_eq!(got, b"chunk".repeat(8), "the whole streamed body");
    // And the connection was not told to go away meanwhile: it takes another request.
    let mut client = client.ready().await.expect("no GOAWAY during the stream");
    let (resp, _) = client
        .send_request(http::Request::get("http://x/s").body(()).unwrap(), true)
        .unwrap();
    assert_eq!(resp.await.expect("a second stream").status(), 200);

    // A client that never opens its flow-control window: the response cannot move, and the
    // connection is closed after idle (GOAWAY) plus one more idle, not held forever.
    let mut s = TcpStream::connect(("127.0.0.1", gw.port)).await.unwrap();
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    frame(&mut out, 0x4, 0, 0, &[0x00, 0x04, 0, 0, 0, 0]); // SETTINGS_INITIAL_WINDOW_SIZE = 0
    let mut block = Vec::new();
    for (n, v) in [
        (&b":method"[..], &b"GET"[..]),
        (b":scheme", b"http"),
        (b":path", b"/s"),
        (b":authority", b"x"),
    ] {
        hpack_literal(&mut block, n, v);
    }
    frame(&mut out, 0x1, 0x4 | 0x1, 1, &block);
    s.write_all(&out).await.unwrap();
    let t = Instant::now();
    let mut buf = [0u8; 4096];
    let closed = loop {
        match tokio::time::timeout(Duration::from_secs(6), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(n)) => {
                // Answer pings (type 6) so the client looks alive.
                if n >= 9 && buf[3] == 0x6 && buf[4] & 1 == 0 {
                    let mut pong = Vec::new();
                    frame(&mut pong, 0x6, 0x1, 0, &buf[9..17.min(n)]);
                    let _ = s.write_all(&pong).await;
                }
            }
            Err(_) => break false,
        }
    };
    assert!(
        closed,
        "a stalled stream held its connection for 6 s with idle 1s"
    );
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "closed after {:?}",
        t.elapsed()
    );
    task.abort();
}

// ---------------------------------------------------------------------------------------------
// 11. CONNECT

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
// 2. The embedded default enforces quotas exactly as Redis does

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
    let keygen = std::process::Command::new(bin())
        .args(["keygen", "--out"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(keygen.status.success());
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
