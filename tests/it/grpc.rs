//! gRPC through the real gateway (issue 14): a real grpcio server (tests/grpc/greeter.py) behind an
//! `h2c://` backend and a real grpcio client (tests/grpc/client.py) on the gateway's public port.
//! Both run from the virtual environment `.venv` that `bash scripts/setup.sh` makes. Covered: the
//! four call shapes (unary, 1,000-message server stream, client stream, bidi), metadata and
//! trailers both ways, deadlines (the client's grpc-timeout and the route's `timeouts.request`),
//! the gateway's own refusals as gRPC statuses (no route 12, no token 16, rate limit 8, body limit
//! 8, dead backend 14, HTTP/1.1-only backend 12), a backend killed mid-stream, the
//! `hexgate_grpc_requests_total` metric, and, frame by frame with the h2 crate and raw frames,
//! that a refusal is HTTP 200 `application/grpc` trailers-only.
//!
//! Every server binds 127.0.0.1; every client run and every wait is bounded in time.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::Value;
use tokio::io::AsyncReadExt;

use crate::raw::h2_send;
use crate::support::*;

// ---------------------------------------------------------------------------------------------
// The Python side

/// `.venv/bin/python` in the repo root; fails naming the setup script when it or grpcio is missing.
fn python() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let py = root.join(".venv/bin/python");
    let ok = py.exists()
        && Command::new(&py)
            .args(["-c", "import grpc"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
    assert!(
        ok,
        "{} with grpcio is missing: run `bash scripts/setup.sh` (make setup) first",
        py.display()
    );
    py
}

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/grpc")
        .join(name)
}

/// A `greeter.py` server on a free loopback port (it binds port 0 and reports the port it got);
/// killed on drop. It exits by itself too when its stdin (held here) closes.
struct Greeter {
    child: Child,
    _stdin: Option<ChildStdin>,
    port: u16,
    dir: PathBuf,
}

impl Greeter {
    fn start(extra: &[&str]) -> Greeter {
        let dir = temp_dir("greeter");
        let err = std::fs::File::create(dir.join("greeter.log")).unwrap();
        let mut child = Command::new(python())
            .arg(script("greeter.py"))
            .args(["--port", "0", "--exit-on-stdin-close"])
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(err)
            .spawn()
            .expect("spawn greeter.py");
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(Duration::from_secs(20)).unwrap_or_default();
        let port = line
            .strip_prefix("READY port=")
            .and_then(|r| r.split_whitespace().next())
            .and_then(|p| p.parse::<u16>().ok());
        let mut g = Greeter {
            child,
            _stdin: stdin,
            port: 0,
            dir,
        };
        match port {
            Some(p) => g.port = p,
            None => {
                g.kill();
                panic!("greeter.py did not start ({line:?}); its log:\n{}", g.log());
            }
        }
        g
    }

    fn url(&self) -> String {
        format!("h2c://127.0.0.1:{}", self.port)
    }

    /// The server's stderr: one line per finished call.
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("greeter.log")).unwrap_or_default()
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits up to `limit` for `text` in the server's log.
    async fn wait_log(&self, text: &str, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if self.log().contains(text) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }
}

impl Drop for Greeter {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The longest one client run may take before the test kills it and fails.
const CLIENT_LIMIT: Duration = Duration::from_secs(60);

/// A running `client.py`, its stdout and stderr going to files.
struct ClientRun {
    child: Child,
    dir: PathBuf,
    started: Instant,
}

impl ClientRun {
    fn spawn(port: u16, call: &str, args: &[&str]) -> ClientRun {
        let dir = temp_dir("grpc-client");
        let child = Command::new(python())
            .arg(script("client.py"))
            .args(["--target", &format!("127.0.0.1:{port}"), "--call", call])
            .args(args)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.join("out")).unwrap())
            .stderr(std::fs::File::create(dir.join("err")).unwrap())
            .spawn()
            .expect("spawn client.py");
        ClientRun {
            child,
            dir,
            started: Instant::now(),
        }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.join("err")).unwrap_or_default()
    }

    /// Waits until the client exits (at most `limit`), then parses its JSON line.
    fn finish(mut self, limit: Duration) -> Result<Value, String> {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return Err(format!(
                    "client.py still running after {:?}; stderr:\n{}",
                    self.started.elapsed(),
                    self.stderr()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let out = std::fs::read_to_string(self.dir.join("out")).unwrap_or_default();
        let line = out.lines().last().unwrap_or_default();
        serde_json::from_str(line).map_err(|e| {
            format!(
                "client.py printed no JSON ({e}): {out}\nstderr:\n{}",
                self.stderr()
            )
        })
    }
}

impl Drop for ClientRun {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One client call through 127.0.0.1:`port`, off the async workers: its JSON result.
async fn grpc(port: u16, call: &str, args: &[&str]) -> Value {
    let call = call.to_string();
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        ClientRun::spawn(port, &call, &args).finish(CLIENT_LIMIT)
    })
    .await
    .unwrap()
    .unwrap_or_else(|e| panic!("{e}"))
}

fn code(v: &Value) -> &str {
    v["code"].as_str().unwrap_or("?")
}

fn code_value(v: &Value) -> i64 {
    v["code_value"].as_i64().unwrap_or(-1)
}

fn details(v: &Value) -> &str {
    v["details"].as_str().unwrap_or("")
}

fn messages(v: &Value) -> Vec<String> {
    v["messages"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|m| m.as_str().unwrap_or("").to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// The first value of metadata key `k` in `v[which]` (initial_metadata or trailing_metadata).
fn md<'a>(v: &'a Value, which: &str, k: &str) -> Option<&'a str> {
    v[which][k].as_array()?.first()?.as_str()
}

fn elapsed(v: &Value) -> Duration {
    Duration::from_millis(v["elapsed_ms"].as_u64().unwrap_or(u64::MAX))
}

// ---------------------------------------------------------------------------------------------
// The gateway side

/// A gateway whose `/helloworld.Greeter/` route goes to `backend` (with `extra` service lines),
/// after `top` lines and before `more` services.
async fn gateway(top: &str, backend: &str, extra: &str, more: &str) -> Gateway {
    let services = service("greeter", "/helloworld.Greeter/", &[backend], extra) + more;
    Gateway::start(&loopback_config(top, &services)).await
}

/// Context for a failed assertion: the gateway's log and the server's.
fn logs(gw: &Gateway, g: Option<&Greeter>) -> String {
    format!(
        "\n--- gateway log:\n{}\n--- greeter log:\n{}",
        gw.log(),
        g.map(Greeter::log).unwrap_or_default()
    )
}

/// Sum of the `hexgate_grpc_requests_total` series whose labels include all of `want`.
/// (Only the service and grpc_status labels are pinned for refusals: the spec's `code="HTTP
/// code"` may mean the 200 on the wire or the refusal's own status.)
fn grpc_metric(metrics: &str, want: &[(&str, &str)]) -> f64 {
    metric_sum(metrics, "hexgate_grpc_requests_total", want)
}

/// Sum of the series of counter `name` whose labels include all of `want`.
fn metric_sum(metrics: &str, name: &str, want: &[(&str, &str)]) -> f64 {
    let prefix = format!("{name}{{");
    metrics
        .lines()
        .filter_map(|l| l.strip_prefix(prefix.as_str()))
        .filter_map(|rest| {
            let (labels, value) = rest.split_once('}')?;
            let has_all = want
                .iter()
                .all(|(k, v)| labels.split(',').any(|kv| kv == format!("{k}=\"{v}\"")));
            has_all.then(|| value.trim().parse::<f64>().ok()).flatten()
        })
        .sum()
}

/// What one gRPC request over HTTP/2 (the h2 crate) got back.
#[derive(Debug)]
struct H2Reply {
    status: u16,
    headers: http::HeaderMap,
    /// END_STREAM was on the response HEADERS: a trailers-only response.
    end_on_headers: bool,
    data: Vec<u8>,
    trailers: Option<http::HeaderMap>,
    took: Duration,
}

impl H2Reply {
    /// grpc-status from the trailers, or from the headers of a trailers-only response.
    fn grpc_status(&self) -> Option<&str> {
        self.trailers
            .as_ref()
            .and_then(|t| t.get("grpc-status"))
            .or_else(|| self.headers.get("grpc-status"))
            .and_then(|v| v.to_str().ok())
    }
}

/// One gRPC call with the h2 crate: POST `path`, `application/grpc`, `te: trailers`, `fields`,
/// and one length-prefixed message `payload` (none: the request ends with its HEADERS).
async fn h2_grpc(
    port: u16,
    path: &str,
    fields: &[(&str, &str)],
    payload: Option<&[u8]>,
) -> Result<H2Reply, String> {
    let start = Instant::now();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| e.to_string())?;
    let (client, conn) = h2::client::handshake(tcp)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut client = client.ready().await.map_err(|e| e.to_string())?;
    let mut b = http::Request::post(format!("http://127.0.0.1:{port}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (n, v) in fields {
        b = b.header(*n, *v);
    }
    let req = b.body(()).map_err(|e| e.to_string())?;
    let (resp, mut send) = client
        .send_request(req, payload.is_none())
        .map_err(|e| e.to_string())?;
    if let Some(p) = payload {
        let mut msg = vec![0u8];
        msg.extend_from_slice(&(p.len() as u32).to_be_bytes());
        msg.extend_from_slice(p);
        // A refusal may come (and close the stream, RST_STREAM NO_ERROR) before the message is
        // sent: then sending fails and the answer is read all the same.
        let _ = send.send_data(Bytes::from(msg), true);
    }
    let limit = Duration::from_secs(15);
    let resp = tokio::time::timeout(limit, resp)
        .await
        .map_err(|_| "no response headers".to_string())?
        .map_err(|e| e.to_string())?;
    let (parts, mut body) = resp.into_parts();
    let end_on_headers = body.is_end_stream();
    let mut data = Vec::new();
    while let Some(chunk) = tokio::time::timeout(limit, body.data())
        .await
        .map_err(|_| "response body stalled".to_string())?
    {
        let chunk = chunk.map_err(|e| e.to_string())?;
        let _ = body.flow_control().release_capacity(chunk.len());
        data.extend_from_slice(&chunk);
    }
    let trailers = tokio::time::timeout(limit, body.trailers())
        .await
        .map_err(|_| "no trailers".to_string())?
        .map_err(|e| e.to_string())?;
    Ok(H2Reply {
        status: parts.status.as_u16(),
        headers: parts.headers,
        end_on_headers,
        data,
        trailers,
        took: start.elapsed(),
    })
}

/// Asserts, with the h2 crate, that a gRPC request to `path` is refused with HTTP 200,
/// `application/grpc`, trailers-only (END_STREAM on the one HEADERS), grpc-status `want` and a
/// grpc-message; and, in raw frames, that stream 1 gets one HEADERS frame with END_STREAM and
/// no DATA frame.
async fn assert_trailers_only(gw: &Gateway, path: &str, fields: &[(&str, &str)], want: &str) {
    let r = h2_grpc(gw.port, path, fields, Some(b"x"))
        .await
        .unwrap_or_else(|e| panic!("{path}: {e}{}", logs(gw, None)));
    let ctx = format!("{path}: {r:?}{}", logs(gw, None));
    assert_eq!(r.status, 200, "{ctx}");
    let ct = r
        .headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    assert!(
        ct.starts_with("application/grpc"),
        "content-type {ct:?}: {ctx}"
    );
    assert!(
        r.end_on_headers,
        "trailers-only: END_STREAM on HEADERS: {ctx}"
    );
    assert!(r.data.is_empty() && r.trailers.is_none(), "{ctx}");
    assert_eq!(
        r.headers.get("grpc-status").and_then(|v| v.to_str().ok()),
        Some(want),
        "{ctx}"
    );
    assert!(
        r.headers.get("grpc-message").is_some_and(|v| !v.is_empty()),
        "grpc-message: {ctx}"
    );

    // The same, frame by frame: stream 1 gets HEADERS (END_STREAM set) and nothing else.
    let mut fields_raw: Vec<(&str, &str)> = vec![
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path),
        (":authority", "localhost"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ];
    fields_raw.extend_from_slice(fields);
    let frames = stream1_frames(gw.port, &fields_raw).await;
    let ctx = format!(
        "{path}: stream 1 frames (type, flags, length) {frames:?}{}",
        logs(gw, None)
    );
    let first = frames.first().copied();
    assert!(
        matches!(first, Some((0x1, flags, _)) if flags & 0x1 != 0),
        "one HEADERS with END_STREAM first: {ctx}"
    );
    assert!(
        !frames
            .iter()
            .any(|(kind, _, _)| *kind == 0x0 || *kind == 0x3),
        "no DATA, no RST_STREAM: {ctx}"
    );
}

/// Sends one request as raw frames (HEADERS with END_STREAM) and collects the frames of stream 1
/// (type, flags, length) until one ends it, a GOAWAY comes, or 5 s pass.
async fn stream1_frames(port: u16, fields: &[(&str, &str)]) -> Vec<(u8, u8, usize)> {
    let mut s = h2_send(port, &[], fields).await;
    let mut out = Vec::new();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        let mut at = 0;
        while buf.len() >= at + 9 {
            let len = u32::from_be_bytes([0, buf[at], buf[at + 1], buf[at + 2]]) as usize;
            if buf.len() < at + 9 + len {
                break;
            }
            let (kind, flags) = (buf[at + 3], buf[at + 4]);
            let stream = u32::from_be_bytes([buf[at + 5], buf[at + 6], buf[at + 7], buf[at + 8]])
                & 0x7fff_ffff;
            at += 9 + len;
            if kind == 0x7 {
                out.push((kind, flags, len));
                return out;
            }
            if stream == 1 {
                out.push((kind, flags, len));
                let ends = kind == 0x3 || ((kind == 0x0 || kind == 0x1) && flags & 0x1 != 0);
                if ends {
                    return out;
                }
            }
        }
        buf.drain(..at);
        match tokio::time::timeout(Duration::from_millis(500), s.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return out,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => {}
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Calls that go through

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unary_with_metadata_both_ways_and_metric() {
    let g = Greeter::start(&[]);
    let gw = gateway("", &g.url(), "", "").await;

    let r = grpc(
        gw.port,
        "unary",
        &[
            "--message",
            "gateway",
            "--metadata",
            "x-a=1",
            "--metadata",
            "x-want-trailer=yes",
        ],
    )
    .await;
    let ctx = format!("{r}{}", logs(&gw, Some(&g)));
    assert_eq!(code(&r), "OK", "{ctx}");
    assert_eq!(messages(&r), ["hello gateway"], "{ctx}");
    // Request metadata reached the server (it echoes x-* keys in its initial metadata), and its
    // initial and trailing metadata came back.
    assert_eq!(md(&r, "initial_metadata", "x-seen-x-a"), Some("1"), "{ctx}");
    assert_eq!(
        md(&r, "trailing_metadata", "x-trailer-echo"),
        Some("yes"),
        "{ctx}"
    );

    // What the server saw of the request: the client's metadata, passed on unchanged.
    let r = grpc(gw.port, "metadata", &["--metadata", "x-request-tag=abc"]).await;
    let ctx = format!("{r}{}", logs(&gw, Some(&g)));
    assert_eq!(code(&r), "OK", "{ctx}");
    let seen: Value = serde_json::from_str(&messages(&r)[0]).unwrap();
    assert_eq!(seen["x-request-tag"][0], "abc", "{ctx}");

    let m = gw.metrics().await;
    let ok = grpc_metric(
        &m,
        &[
            ("service", "greeter"),
            ("code", "200"),
            ("grpc_status", "0"),
        ],
    );
    assert!(ok >= 2.0, "two OK calls counted: {ok}\n{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_stream_of_1000_messages() {
    let g = Greeter::start(&[]);
    let gw = gateway("", &g.url(), "", "").await;
    // 1,000 messages of 1 KiB: about 1 MiB, well past HTTP/2's initial 64 KiB flow-control
    // windows on both hops.
    let r = grpc(
        gw.port,
        "server_stream",
        &["--count", "1000", "--size", "1024", "--timeout", "30"],
    )
    .await;
    let ctx = format!(
        "code {} count {} details {}{}",
        code(&r),
        r["count"],
        details(&r),
        logs(&gw, Some(&g))
    );
    assert_eq!(code(&r), "OK", "{ctx}");
    let msgs = messages(&r);
    assert_eq!(msgs.len(), 1000, "{ctx}");
    for (i, m) in msgs.iter().enumerate() {
        assert_eq!(m.len(), 1024, "message {i}");
        assert!(
            m.starts_with(&format!("msg {i}.")),
            "message {i} in order: {m:.20}"
        );
    }
    assert!(elapsed(&r) < Duration::from_secs(20), "{:?}", elapsed(&r));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_stream_and_bidi() {
    let g = Greeter::start(&[]);
    let gw = gateway("", &g.url(), "", "").await;

    let r = grpc(
        gw.port,
        "client_stream",
        &["--count", "500", "--size", "100"],
    )
    .await;
    let ctx = format!("{r}{}", logs(&gw, Some(&g)));
    assert_eq!(code(&r), "OK", "{ctx}");
    assert_eq!(messages(&r), ["count=500 bytes=50000"], "{ctx}");

    let r = grpc(gw.port, "bidi", &["--count", "200"]).await;
    let ctx = format!("{} {}{}", code(&r), details(&r), logs(&gw, Some(&g)));
    assert_eq!(code(&r), "OK", "{ctx}");
    let want: Vec<String> = (0..200).map(|i| format!("echo m{i}")).collect();
    assert_eq!(messages(&r), want, "{ctx}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trailers_and_backend_statuses_pass_through() {
    let g = Greeter::start(&[
        "--trailer",
        "x-served-by=greeter",
        "--trailer",
        "x-build=42",
    ]);
    let gw = gateway("", &g.url(), "", "").await;

    for (call, args) in [
        ("unary", &[][..]),
        ("server_stream", &["--count", "5"][..]),
        ("bidi", &["--count", "3"][..]),
    ] {
        let r = grpc(gw.port, call, args).await;
        let ctx = format!("{call}: {r}{}", logs(&gw, Some(&g)));
        assert_eq!(code(&r), "OK", "{ctx}");
        assert_eq!(
            md(&r, "trailing_metadata", "x-served-by"),
            Some("greeter"),
            "{ctx}"
        );
        assert_eq!(md(&r, "trailing_metadata", "x-build"), Some("42"), "{ctx}");
    }

    // A status the backend ends a call with (not the gateway's) comes through as it is, with its
    // message and trailers.
    let r = grpc(gw.port, "fail", &["--message", "9:not ready yet"]).await;
    let ctx = format!("{r}{}", logs(&gw, Some(&g)));
    assert_eq!(code(&r), "FAILED_PRECONDITION", "{ctx}");
    assert_eq!(details(&r), "not ready yet", "{ctx}");
    assert_eq!(
        md(&r, "trailing_metadata", "x-served-by"),
        Some("greeter"),
        "{ctx}"
    );

    // The h2 crate's view: HTTP 200 with the message in DATA and grpc-status 0 in real trailers.
    let reply = h2_grpc(gw.port, "/helloworld.Greeter/SayHello", &[], Some(b"h2"))
        .await
        .unwrap();
    let ctx = format!("{reply:?}{}", logs(&gw, Some(&g)));
    assert_eq!(reply.status, 200, "{ctx}");
    assert!(!reply.end_on_headers, "{ctx}");
    assert_eq!(&reply.data[..], b"\0\0\0\0\x08hello h2", "{ctx}");
    let t = reply.trailers.as_ref().expect("trailers");
    assert_eq!(t["grpc-status"], "0", "{ctx}");
    assert_eq!(t["x-served-by"], "greeter", "{ctx}");

    let m = gw.metrics().await;
    assert!(
        grpc_metric(&m, &[("service", "greeter"), ("grpc_status", "9")]) >= 1.0,
        "the backend's status 9 counted:\n{m}"
    );
}

// ---------------------------------------------------------------------------------------------
// Deadlines

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_deadline_exceeded_and_cancel_reaches_backend() {
    let g = Greeter::start(&[]);
    let gw = gateway("", &g.url(), "", "").await;

    // The client's deadline (grpc-timeout 500 ms) is shorter than the 5 s call.
    let r = grpc(gw.port, "slow", &["--sleep", "5", "--timeout", "0.5"]).await;
    let ctx = format!("{r}{}", logs(&gw, Some(&g)));
    assert_eq!(code(&r), "DEADLINE_EXCEEDED", "{ctx}");
    assert_eq!(code_value(&r), 4, "{ctx}");
    assert!(elapsed(&r) < Duration::from_secs(3), "{ctx}");
    // The backend learns of it (the deadline forwarded, or the stream reset) and stops working.
    assert!(
        g.wait_log("Slow stopped early", Duration::from_secs(4))
            .await,
        "the backend kept working on an abandoned call{ctx}"
    );

    // The gateway itself honours grpc-timeout: a client that does not enforce its own deadline
    // (the h2 crate) gets grpc-status 4 from the gateway at about that time.
    let reply = h2_grpc(
        gw.port,
        "/helloworld.Greeter/Slow",
        &[("grpc-timeout", "500m")],
        Some(b"5"),
    )
    .await
    .unwrap();
    let ctx = format!("{reply:?}{}", logs(&gw, Some(&g)));
    assert_eq!(reply.status, 200, "{ctx}");
    assert_eq!(reply.grpc_status(), Some("4"), "{ctx}");
    assert!(
        reply.took >= Duration::from_millis(400) && reply.took < Duration::from_secs(3),
        "{ctx}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_request_timeout_is_deadline_exceeded() {
    let g = Greeter::start(&[]);
    let gw = gateway("", &g.url(), "    timeouts: {request: 500ms}\n", "").await;

    // The client allows 30 s; the route allows 500 ms.
    let r = grpc(gw.port, "slow", &["--sleep", "5", "--timeout", "30"]).await;
    let ctx = format!("{r}{}", logs(&gw, Some(&g)));
    assert_eq!(code(&r), "DEADLINE_EXCEEDED", "{ctx}");
    assert_eq!(code_value(&r), 4, "{ctx}");
    assert!(
        elapsed(&r) >= Duration::from_millis(400) && elapsed(&r) < Duration::from_secs(3),
        "{ctx}"
    );
    // A call within the limit still works.
    let r = grpc(gw.port, "slow", &["--sleep", "0.1"]).await;
    assert_eq!(code(&r), "OK", "{r}{}", logs(&gw, Some(&g)));

    let m = gw.metrics().await;
    assert!(
        grpc_metric(&m, &[("service", "greeter"), ("grpc_status", "4")]) >= 1.0,
        "{m}"
    );
}

// ---------------------------------------------------------------------------------------------
// The gateway's refusals as gRPC statuses

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_route_is_unimplemented_trailers_only() {
    let g = Greeter::start(&[]);
    let gw = gateway("", &g.url(), "", "").await;

    let r = grpc(gw.port, "unary", &["--method", "/other.Service/Call"]).await;
    let ctx = format!("{r}{}", logs(&gw, Some(&g)));
    assert_eq!(code(&r), "UNIMPLEMENTED", "{ctx}");
    assert_eq!(code_value(&r), 12, "{ctx}");
    assert!(!details(&r).is_empty(), "{ctx}");
    assert!(!g.log().contains("OK"), "nothing reached the backend{ctx}");

    assert_trailers_only(&gw, "/other.Service/Call", &[], "12").await;
    // The same route still serves its own methods.
    let r = grpc(gw.port, "unary", &[]).await;
    assert_eq!(code(&r), "OK", "{r}{}", logs(&gw, Some(&g)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_or_bad_token_is_unauthenticated() {
    let g = Greeter::start(&[]);
    let dir = temp_dir("grpc-auth");
    hexgate_keygen(&dir.join("keys"));
    let out = Command::new(bin())
        .args(["token", "--key"])
        .arg(dir.join("keys/private.pem"))
        .args(["--sub", "alice"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let top = "authentication:\n  enabled: true\n  publicKeyPath: \"{dir}/keys/public.pem\"\n";
    let services = service("greeter", "/helloworld.Greeter/", &[&g.url()], "");
    let gw = Gateway::start_in(dir.clone(), &loopback_config(top, &services)).await;

    let r = grpc(gw.port, "unary", &[]).await;
    let ctx = format!("{r}{}", logs(&gw, Some(&g)));
    assert_eq!(code(&r), "UNAUTHENTICATED", "{ctx}");
    assert_eq!(code_value(&r), 16, "{ctx}");
    assert!(!details(&r).is_empty(), "{ctx}");

    let r = grpc(
        gw.port,
        "unary",
        &["--metadata", "authorization=Bearer not.a.token"],
    )
    .await;
    assert_eq!(code_value(&r), 16, "{r}{}", logs(&gw, Some(&g)));
    assert!(!g.log().contains("SayHello"), "nothing reached the backend");

    // With a token from `hexgate token`, the call goes through and the consumer is forwarded.
    let bearer = format!("authorization=Bearer {token}");
    let r = grpc(gw.port, "unary", &["--metadata", &bearer]).await;
    let ctx = format!("{r}{}", logs(&gw, Some(&g)));
    assert_eq!(code(&r), "OK", "{ctx}");
    assert_eq!(messages(&r), ["hello world"], "{ctx}");
    let r = grpc(gw.port, "metadata", &["--metadata", &bearer]).await;
    let seen: Value = serde_json::from_str(&messages(&r)[0]).unwrap();
    assert_eq!(seen["x-consumer-id"][0], "alice", "{seen}");

    assert_trailers_only(&gw, "/helloworld.Greeter/SayHello", &[], "16").await;
    let m = gw.metrics().await;
    assert!(
        grpc_metric(&m, &[("service", "greeter"), ("grpc_status", "16")]) >= 2.0,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_is_resource_exhausted() {
    let g = Greeter::start(&[]);
    // Two calls at once, then one every 100 s: the third call is refused.
    let gw = gateway(
        "rateLimiting: {enabled: true, ratePerSecond: 0.01, burst: 2}\n",
        &g.url(),
        "",
        "",
    )
    .await;
    let mut codes = Vec::new();
    let mut last = Value::Null;
    for _ in 0..3 {
        last = grpc(gw.port, "unary", &[]).await;
        codes.push(code_value(&last));
    }
    let ctx = format!("{codes:?} {last}{}", logs(&gw, Some(&g)));
    assert_eq!(codes, [0, 0, 8], "{ctx}");
    assert_eq!(code(&last), "RESOURCE_EXHAUSTED", "{ctx}");
    assert!(!details(&last).is_empty(), "{ctx}");

    assert_trailers_only(&gw, "/helloworld.Greeter/SayHello", &[], "8").await;
    let m = gw.metrics().await;
    assert!(
        grpc_metric(&m, &[("service", "greeter"), ("grpc_status", "8")]) >= 1.0,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_limit_is_resource_exhausted() {
    let g = Greeter::start(&[]);
    let gw = gateway("", &g.url(), "    maxBodySize: 10k\n", "").await;
    // 100 messages of 1,000 bytes stream past the 10 KiB limit.
    let r = grpc(
        gw.port,
        "client_stream",
        &["--count", "100", "--size", "1000"],
    )
    .await;
    let ctx = format!("{r}{}", logs(&gw, Some(&g)));
    assert_eq!(code(&r), "RESOURCE_EXHAUSTED", "{ctx}");
    assert_eq!(code_value(&r), 8, "{ctx}");
    // Under the limit: fine.
    let r = grpc(gw.port, "client_stream", &["--count", "5", "--size", "100"]).await;
    assert_eq!(
        messages(&r),
        ["count=5 bytes=500"],
        "{r}{}",
        logs(&gw, Some(&g))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_backend_is_unavailable() {
    // Nothing listens on this port.
    let dead = format!("h2c://127.0.0.1:{}", free_port());
    let gw = gateway("", &dead, "", "").await;
    for call in ["unary", "server_stream"] {
        let r = grpc(gw.port, call, &["--timeout", "20"]).await;
        let ctx = format!("{call}: {r}{}", logs(&gw, None));
        assert_eq!(code(&r), "UNAVAILABLE", "{ctx}");
        assert_eq!(code_value(&r), 14, "{ctx}");
        assert!(elapsed(&r) < Duration::from_secs(10), "{ctx}");
    }
    assert_trailers_only(&gw, "/helloworld.Greeter/SayHello", &[], "14").await;
    let m = gw.metrics().await;
    assert!(
        grpc_metric(&m, &[("service", "greeter"), ("grpc_status", "14")]) >= 2.0,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_only_backend_is_unimplemented_with_a_message() {
    let plain = TestBackend::start(Behaviour::Hello).await;
    let gw = Gateway::start(&loopback_config(
        "",
        &service("plain", "/plain.Service/", &[&plain.url()], ""),
    ))
    .await;
    let r = grpc(gw.port, "unary", &["--method", "/plain.Service/Call"]).await;
    let ctx = format!("{r}{}", logs(&gw, None));
    assert_eq!(code(&r), "UNIMPLEMENTED", "{ctx}");
    assert_eq!(code_value(&r), 12, "{ctx}");
    assert!(
        details(&r).to_ascii_lowercase().contains("http/1"),
        "the message says the backend speaks HTTP/1.1 only: {ctx}"
    );
    assert_eq!(plain.hits(), 0, "nothing forwarded to the HTTP/1.1 backend");
    // The same route still serves plain HTTP.
    let (s, body) = get(gw.port, "/plain.Service/page").await.unwrap();
    assert_eq!(s, 200, "{body}");

    assert_trailers_only(&gw, "/plain.Service/Call", &[], "12").await;
    let m = gw.metrics().await;
    assert!(
        grpc_metric(&m, &[("service", "plain"), ("grpc_status", "12")]) >= 1.0,
        "{m}"
    );
    // 502 semantics: counted as an upstream error of the route (whatever the reason label).
    assert!(
        metric_sum(&m, "hexgate_upstream_errors_total", &[("service", "plain")]) >= 1.0,
        "{m}"
    );
}

// ---------------------------------------------------------------------------------------------
// A backend that dies, and health checks

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_killed_mid_stream_ends_the_call_with_an_error() {
    let mut g = Greeter::start(&[]);
    let gw = gateway("", &g.url(), "", "").await;

    let run = ClientRun::spawn(
        gw.port,
        "stream_hang",
        &["--count", "3", "--progress", "--timeout", "60"],
    );
    // Wait for the three messages to reach the client, then kill the server (SIGKILL).
    let deadline = Instant::now() + Duration::from_secs(15);
    while !run.stderr().contains("recv 3") {
        assert!(
            Instant::now() < deadline,
            "the first messages never arrived: {}{}",
            run.stderr(),
            logs(&gw, Some(&g))
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(g.log().contains("StreamThenHang sent 3"));
    g.kill();
    let killed = Instant::now();

    // The call ends with an error well before its own 60 s deadline.
    let r = tokio::task::spawn_blocking(move || run.finish(Duration::from_secs(15)))
        .await
        .unwrap()
        .unwrap_or_else(|e| {
            panic!(
                "no end to the call after the backend died: {e}{}",
                logs(&gw, None)
            )
        });
    let ctx = format!("{r} after {:?}{}", killed.elapsed(), logs(&gw, None));
    assert!(
        ["UNAVAILABLE", "INTERNAL"].contains(&code(&r)),
        "an error status, not OK and not a hang: {ctx}"
    );
    assert_eq!(r["count"], 3, "{ctx}");
    assert!(killed.elapsed() < Duration::from_secs(10), "{ctx}");

    // With the backend gone, a new call is refused as unavailable.
    let r = grpc(gw.port, "unary", &["--timeout", "20"]).await;
    assert_eq!(code(&r), "UNAVAILABLE", "{r}{}", logs(&gw, None));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_backend_stays_in_rotation_across_health_checks() {
    // A gRPC server answers no GET /health (grpcio resets such a stream): the active health
    // check must not take an h2c gRPC backend out of rotation for that.
    let g = Greeter::start(&[]);
    let gw = gateway("healthCheckInterval: 1s\n", &g.url(), "", "").await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    for i in 0..3 {
        let r = grpc(gw.port, "unary", &["--message", &format!("n{i}")]).await;
        let ctx = format!("{r}{}", logs(&gw, Some(&g)));
        assert_eq!(code(&r), "OK", "{ctx}");
        assert_eq!(messages(&r), [format!("hello n{i}")], "{ctx}");
    }
}
