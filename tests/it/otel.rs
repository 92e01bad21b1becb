//! OpenTelemetry traces: a real OTLP receiver, W3C propagation through a real backend.
//!
//! The receiver is an HTTP/1.1 server (OTLP/HTTP, protobuf) or an HTTP/2 server (OTLP/gRPC)
//! on a loopback port that decodes every export with the official protobuf types; the backend
//! records the `traceparent` and `tracestate` each request brings. The gateway is the real
//! binary, Redis a real redis-server.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyVal;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::status::StatusCode as SpanStatus;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message as _;
use tokio::io::AsyncWriteExt as _;
use tokio::net::{TcpListener, TcpStream};

use hexgate::auth::keys::Alg;
use hexgate::auth::tools::{self, SigningKey};

use crate::support::*;

// ---------------------------------------------------------------------------------------------
// The OTLP receiver

/// How the receiver speaks.
#[derive(Clone, Copy, Debug)]
pub enum Wire {
    /// OTLP/HTTP: HTTP/1.1, `POST .../v1/traces`, `application/x-protobuf`; answers 200.
    Http,
    /// OTLP/gRPC: HTTP/2 with prior knowledge, gRPC framing; answers this `grpc-status` (0: a
    /// message and the status in trailers; otherwise a trailers-only answer).
    Grpc { status: u32 },
}

/// One export request the receiver got.
#[derive(Clone)]
pub struct Export {
    pub path: String,
    pub headers: HeaderMap,
    pub request: ExportTraceServiceRequest,
}

/// A span as received, with its resource's `service.name`.
#[derive(Clone, Debug)]
pub struct Got {
    pub service: String,
    pub span: Span,
}

#[derive(Default)]
struct Store {
    exports: Vec<Export>,
    /// Requests that were not valid exports (wrong content type, framing, protobuf).
    bad: Vec<String>,
}

/// A real OTLP receiver on a loopback port; stopped on drop.
pub struct Collector {
    pub addr: SocketAddr,
    wire: Wire,
    store: Arc<Mutex<Store>>,
    task: tokio::task::JoinHandle<()>,
}

impl Collector {
    pub async fn start(wire: Wire) -> Collector {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let store = Arc::new(Mutex::new(Store::default()));
        let s = store.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let s = s.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let s = s.clone();
                        async move { Ok::<_, Infallible>(receive(req, wire, &s).await) }
                    });
                    let io = TokioIo::new(stream);
                    match wire {
                        Wire::Http => {
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(io, svc)
                                .await;
                        }
                        Wire::Grpc { .. } => {
                            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                                .serve_connection(io, svc)
                                .await;
                        }
                    }
                });
            }
        });
        Collector {
            addr,
            wire,
            store,
            task,
        }
    }

    /// The endpoint to configure: `http://ADDR` or `grpc://ADDR`.
    pub fn url(&self) -> String {
        match self.wire {
            Wire::Http => format!("http://{}", self.addr),
            Wire::Grpc { .. } => format!("grpc://{}", self.addr),
        }
    }

    pub fn exports(&self) -> Vec<Export> {
        let s = self.store.lock().unwrap();
        assert!(s.bad.is_empty(), "invalid exports: {:?}", s.bad);
        s.exports.clone()
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<Got> {
        let mut out = Vec::new();
        for e in self.exports() {
            for rs in e.request.resource_spans {
                let service = rs
                    .resource
                    .as_ref()
                    .and_then(|r| r.attributes.iter().find(|a| a.key == "service.name"))
                    .and_then(|a| match a.value.as_ref()?.value.as_ref()? {
                        AnyVal::StringValue(s) => Some(s.clone()),
                        _ => None,
                    })
                    .unwrap_or_default();
                for ss in rs.scope_spans {
                    for span in ss.spans {
                        out.push(Got {
                            service: service.clone(),
                            span,
                        });
                    }
                }
            }
        }
        out
    }

    /// The spans of trace `trace` (32 hex digits) received so far.
    pub fn trace(&self, trace: &str) -> Vec<Got> {
        self.spans()
            .into_iter()
            .filter(|g| hex(&g.span.trace_id) == trace)
            .collect()
    }

    /// Waits (bounded) until trace `trace` has its server span: a request's spans are exported
    /// together, so they are all there then.
    pub async fn wait_trace(&self, trace: &str) -> Vec<Got> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let spans = self.trace(trace);
            if spans.iter().any(|g| g.span.kind == SpanKind::Server as i32) {
                return spans;
            }
            assert!(
                Instant::now() < deadline,
                "no server span of trace {trace} reached the collector; it holds: {:#?}",
                self.spans()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn answer_body(b: Bytes) -> BoxBody<Bytes, Infallible> {
    Full::new(b).boxed()
}

async fn receive(
    req: Request<Incoming>,
    wire: Wire,
    store: &Mutex<Store>,
) -> Response<BoxBody<Bytes, Infallible>> {
    let (parts, body) = req.into_parts();
    let body = body.collect().await.map(|b| b.to_bytes());
    let content_type = parts
        .headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let decoded = (|| -> Result<ExportTraceServiceRequest, String> {
        let body = body.map_err(|e| format!("body: {e}"))?;
        if parts.method != http::Method::POST {
            return Err(format!("method {}", parts.method));
        }
        let message = match wire {
            Wire::Http => {
                if content_type != "application/x-protobuf" {
                    return Err(format!("content-type {content_type:?}"));
                }
                body
            }
            Wire::Grpc { .. } => {
                if !content_type.starts_with("application/grpc") {
                    return Err(format!("content-type {content_type:?}"));
                }
                if body.len() < 5 || body[0] != 0 {
                    return Err(format!("gRPC frame head {:?}", &body[..body.len().min(5)]));
                }
                let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
                if len != body.len() - 5 {
                    return Err(format!("gRPC frame of {len} in {} bytes", body.len()));
                }
                body.slice(5..)
            }
        };
        ExportTraceServiceRequest::decode(message).map_err(|e| format!("protobuf: {e}"))
    })();
    let ok = decoded.is_ok();
    {
        let mut s = store.lock().unwrap();
        match decoded {
            Ok(request) => s.exports.push(Export {
                path: parts.uri.path().to_string(),
                headers: parts.headers.clone(),
                request,
            }),
            Err(e) => s.bad.push(e),
        }
    }
    match wire {
        Wire::Http => Response::builder()
            .status(if ok { 200 } else { 400 })
            .header("content-type", "application/x-protobuf")
            // An empty ExportTraceServiceResponse.
            .body(answer_body(Bytes::new()))
            .unwrap(),
        Wire::Grpc { status: 0 } if ok => {
            let mut trailers = HeaderMap::new();
            trailers.insert("grpc-status", HeaderValue::from_static("0"));
            // An empty ExportTraceServiceResponse in gRPC's framing, then the trailers.
            let frames = vec![
                Ok::<_, Infallible>(Frame::data(Bytes::from_static(&[0, 0, 0, 0, 0]))),
                Ok(Frame::trailers(trailers)),
            ];
            Response::builder()
                .header("content-type", "application/grpc")
                .body(StreamBody::new(futures_util::stream::iter(frames)).boxed())
                .unwrap()
        }
        Wire::Grpc { status } => {
            // Trailers-only: the status in the one HEADERS frame, which ends the stream.
            let status = if ok { status } else { 3 };
            Response::builder()
                .header("content-type", "application/grpc")
                .header("grpc-status", status.to_string())
                .header("grpc-message", "refused by the test collector")
                .body(answer_body(Bytes::new()))
                .unwrap()
        }
    }
}

/// A receiver that accepts connections and never answers (holding them open).
pub struct SilentCollector {
    pub addr: SocketAddr,
    pub accepted: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl SilentCollector {
    pub async fn start() -> SilentCollector {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicU64::new(0));
        let a = accepted.clone();
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                a.fetch_add(1, Ordering::Relaxed);
                held.push(stream);
            }
        });
        SilentCollector {
            addr,
            accepted,
            task,
        }
    }
}

impl Drop for SilentCollector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An OTLP/gRPC receiver that answers every export HTTP 200 `application/grpc` and then sends
/// DATA without end: 64 KiB at a time (gRPC frames of empty messages), up to `limit` bytes per
/// answer, the stream never ended until `for_at_most` after the export came (or until the
/// client goes away).
pub struct FloodCollector {
    pub addr: SocketAddr,
    /// Export requests received.
    pub requests: Arc<AtomicU64>,
    /// Bytes of answer handed to the connection, all answers together.
    pub sent: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl FloodCollector {
    pub async fn start(limit: u64, for_at_most: Duration) -> FloodCollector {
        const CHUNK: usize = 64 * 1024;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(AtomicU64::new(0));
        let sent = Arc::new(AtomicU64::new(0));
        let (r, s) = (requests.clone(), sent.clone());
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (r, s) = (r.clone(), s.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let (r, s) = (r.clone(), s.clone());
                        async move {
                            r.fetch_add(1, Ordering::Relaxed);
                            let _ = req.into_body().collect().await;
                            let until = tokio::time::Instant::now() + for_at_most;
                            let chunk = Bytes::from(vec![0u8; CHUNK]);
                            let data = futures_util::stream::unfold(0u64, move |n| {
                                let (chunk, s) = (chunk.clone(), s.clone());
                                async move {
                                    if n >= limit || tokio::time::Instant::now() >= until {
                                        // Held open until the time is up.
                                        tokio::time::sleep_until(until).await;
                                        return None;
                                    }
                                    s.fetch_add(CHUNK as u64, Ordering::Relaxed);
                                    Some((
                                        Ok::<_, Infallible>(Frame::data(chunk)),
                                        n + CHUNK as u64,
                                    ))
                                }
                            });
                            Ok::<_, Infallible>(
                                Response::builder()
                                    .header("content-type", "application/grpc")
                                    .body(StreamBody::new(data))
                                    .unwrap(),
                            )
                        }
                    });
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        FloodCollector {
            addr,
            requests,
            sent,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("grpc://{}", self.addr)
    }
}

impl Drop for FloodCollector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---------------------------------------------------------------------------------------------
// A backend that records the trace context it receives

/// What the backend saw of one request.
#[derive(Clone, Debug)]
pub struct Seen {
    pub path: String,
    /// Every `traceparent` field, in order.
    pub traceparent: Vec<String>,
    pub tracestate: Vec<String>,
}

/// A real HTTP/1.1 backend on a loopback port that answers `ok` (200, or NNN for a path ending
/// in `/status-NNN`; after 2 s for a path containing `/slow`) and records the
/// `traceparent`/`tracestate` of every request (health checks, `/health`, are only counted).
pub struct TraceBackend {
    pub addr: SocketAddr,
    pub health_checks: Arc<AtomicU64>,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
    kill: tokio::sync::watch::Sender<bool>,
}

impl TraceBackend {
    pub async fn start() -> TraceBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let health_checks = Arc::new(AtomicU64::new(0));
        let (kill, kill_rx) = tokio::sync::watch::channel(false);
        let (s, h) = (seen.clone(), health_checks.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (s, h) = (s.clone(), h.clone());
                let mut kill_rx = kill_rx.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let (s, h) = (s.clone(), h.clone());
                        async move {
                            if req.uri().path() == "/health" {
                                h.fetch_add(1, Ordering::Relaxed);
                            } else {
                                let all = |name: &str| {
                                    req.headers()
                                        .get_all(name)
                                        .iter()
                                        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                                        .collect::<Vec<_>>()
                                };
                                let seen = Seen {
                                    path: req.uri().path().to_string(),
                                    traceparent: all("traceparent"),
                                    tracestate: all("tracestate"),
                                };
                                s.lock().unwrap().push(seen);
                            }
                            // `.../slow...` answers after 2 s (a client may leave meanwhile).
                            if req.uri().path().contains("/slow") {
                                tokio::time::sleep(Duration::from_secs(2)).await;
                            }
                            // `.../status-NNN` answers NNN.
                            let status = req
                                .uri()
                                .path()
                                .rsplit_once("/status-")
                                .and_then(|(_, n)| n.parse::<u16>().ok())
                                .unwrap_or(200);
                            Ok::<_, Infallible>(
                                Response::builder()
                                    .status(status)
                                    .body(Full::new(Bytes::from_static(b"ok")))
                                    .unwrap(),
                            )
                        }
                    });
                    let conn = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc);
                    tokio::select! {
                        _ = conn => {}
                        _ = kill_rx.wait_for(|k| *k) => {}
                    }
                });
            }
        });
        TraceBackend {
            addr,
            health_checks,
            seen,
            task,
            kill,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// The one request the backend saw for `path`.
    pub fn seen_for(&self, path: &str) -> Seen {
        let all: Vec<Seen> = self.seen().into_iter().filter(|s| s.path == path).collect();
        assert_eq!(all.len(), 1, "requests for {path} at the backend: {all:?}");
        all.into_iter().next().unwrap()
    }

    /// The one `traceparent` the backend got for `path`, split.
    pub fn traceparent_for(&self, path: &str) -> Traceparent {
        let seen = self.seen_for(path);
        assert_eq!(
            seen.traceparent.len(),
            1,
            "one traceparent upstream for {path}: {seen:?}"
        );
        Traceparent::parse(&seen.traceparent[0])
    }

    /// Stops listening and drops every open connection: connects are refused from now on.
    pub fn stop(&self) {
        self.task.abort();
        let _ = self.kill.send(true);
    }
}

impl Drop for TraceBackend {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A `traceparent` the gateway wrote: `00-<trace>-<parent>-<flags>`, checked for form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Traceparent {
    pub trace: String,
    pub parent: String,
    pub flags: String,
}

impl Traceparent {
    pub fn parse(v: &str) -> Traceparent {
        let parts: Vec<&str> = v.split('-').collect();
        let lower_hex = |s: &str, n: usize| {
            s.len() == n && s.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'))
        };
        assert!(
            parts.len() == 4
                && parts[0] == "00"
                && lower_hex(parts[1], 32)
                && lower_hex(parts[2], 16)
                && lower_hex(parts[3], 2),
            "not a version-00 traceparent: {v:?}"
        );
        assert!(
            parts[1].bytes().any(|c| c != b'0') && parts[2].bytes().any(|c| c != b'0'),
            "all-zero id in {v:?}"
        );
        Traceparent {
            trace: parts[1].to_string(),
            parent: parts[2].to_string(),
            flags: parts[3].to_string(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A fresh random id of `bytes` bytes in lower-case hex (never all zero).
fn random_hex(bytes: usize) -> String {
    loop {
        let v: Vec<u8> = (0..bytes).map(|_| fastrand::u8(..)).collect();
        if v.iter().any(|b| *b != 0) {
            return hex(&v);
        }
    }
}

/// A fresh sampled client context: (traceparent, trace id, span id).
fn client_context(flags: &str) -> (String, String, String) {
    let (trace, span) = (random_hex(16), random_hex(8));
    (format!("00-{trace}-{span}-{flags}"), trace, span)
}

fn attr<'a>(s: &'a Span, key: &str) -> Option<&'a AnyVal> {
    s.attributes
        .iter()
        .find(|a| a.key == key)
        .and_then(|a| a.value.as_ref()?.value.as_ref())
}

fn str_attr<'a>(s: &'a Span, key: &str) -> Option<&'a str> {
    match attr(s, key)? {
        AnyVal::StringValue(v) => Some(v),
        other => panic!("{key} of span {:?} is not a string: {other:?}", s.name),
    }
}

fn int_attr(s: &Span, key: &str) -> Option<i64> {
    match attr(s, key)? {
        AnyVal::IntValue(v) => Some(*v),
        other => panic!("{key} of span {:?} is not an integer: {other:?}", s.name),
    }
}

/// The one span of `spans` named `name`.
fn one<'a>(spans: &'a [Got], name: &str) -> &'a Span {
    let found: Vec<&Got> = spans.iter().filter(|g| g.span.name == name).collect();
    assert_eq!(found.len(), 1, "spans named {name:?} in {spans:#?}");
    &found[0].span
}

fn of_kind(spans: &[Got], kind: SpanKind) -> Vec<&Span> {
    let mut v: Vec<&Span> = spans
        .iter()
        .filter(|g| g.span.kind == kind as i32)
        .map(|g| &g.span)
        .collect();
    v.sort_by_key(|s| s.start_time_unix_nano);
    v
}

fn is_error(s: &Span) -> bool {
    s.status
        .as_ref()
        .is_some_and(|st| st.code == SpanStatus::Error as i32)
}

/// A counter's value from the text exposition, 0 when absent.
fn counter(metrics: &str, name: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .map(|v| v.trim().parse::<f64>().unwrap() as u64)
        .unwrap_or(0)
}

const EXPORTED: &str = "hexgate_tracing_exported_spans_total";
const DROPPED: &str = "hexgate_tracing_dropped_spans_total";

/// Polls /metrics (bounded, `limit`) until `done` holds for the metrics text; returns it.
async fn wait_metrics(gw: &Gateway, limit: Duration, done: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + limit;
    loop {
        let m = gw.metrics().await;
        if done(&m) {
            return m;
        }
        assert!(
            Instant::now() < deadline,
            "metrics never got there: exported {} dropped {}\nlog:\n{}",
            counter(&m, EXPORTED),
            counter(&m, DROPPED),
            gw.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `tracing:` with `otlpEndpoint` and `extra` lines (indented two spaces).
fn tracing_block(endpoint: &str, extra: &str) -> String {
    format!("tracing:\n  otlpEndpoint: \"{endpoint}\"\n{extra}")
}

async fn call(port: u16, path: &str, fields: &[(&str, &str)]) -> (u16, HeaderMap) {
    let (s, h, body) = get_with(port, path, fields)
        .await
        .unwrap_or_else(|e| panic!("{path}: {e}"));
    assert!(s != 200 || body == "ok", "{path}: {s} {body}");
    (s, h)
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Server, authenticate, limits, EVALSHA, one upstream attempt.
fn check_parents(spans: &[Got], server: &Span) {
    for g in spans {
        let s = &g.span;
        assert_eq!(s.trace_id, server.trace_id, "{s:?}");
        assert!(
            s.start_time_unix_nano <= s.end_time_unix_nano,
            "{:?} ends before it starts",
            s.name
        );
        if s.span_id != server.span_id {
            assert!(
                s.start_time_unix_nano >= server.start_time_unix_nano
                    && s.end_time_unix_nano <= server.end_time_unix_nano,
                "{:?} outside the server span: {s:?} {server:?}",
                s.name
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_reach_the_collector_with_parents_and_attributes() {
    let redis = RedisServer::start();
    let collector = Collector::start(Wire::Http).await;
    let backend = TraceBackend::start().await;
    let dir = temp_dir("otel-spans");
    tools::keygen(&dir.join("keys"), Alg::RS256, false).unwrap();
    let signing =
        SigningKey::from_pem(&std::fs::read_to_string(dir.join("keys/private.pem")).unwrap())
            .unwrap();
    let token = |exp: u64| {
        let claims = serde_json::json!({"sub": "alice", "exp": now_secs() + exp});
        format!(
            "Bearer {}",
            tools::sign_token(&signing, Alg::RS256, None, &claims).unwrap()
        )
    };
    let top = format!(
        "authentication:\n  publicKeyPath: \"{{dir}}/keys/public.pem\"\nredis:\n  address: \"127.0.0.1:{}\"\n  timeout: 1s\n{}",
        redis.port,
        tracing_block(
            &collector.url(),
            "  serviceName: edge-gw\n  sampleRatio: 1.0\n  headers: {authorization: \"Bearer s3cret\"}\n"
        )
    );
    let svc = service(
        "users",
        "/users/",
        &[&backend.url()],
        "    authentication: {enabled: true}\n    rateLimiting: {enabled: true, ratePerSecond: 1000, burst: 1000}\n",
    );
    let gw = Gateway::start_in(dir, &loopback_config(&top, &svc)).await;

    // Redis connects in the background: warm up (with another token, so the one below is new
    // to the token cache) until the gateway has used it.
    let warm = token(900);
    let deadline = Instant::now() + Duration::from_secs(10);
    while redis.calls("evalsha") == 0 {
        assert_eq!(
            call(gw.port, "/users/warm", &[("authorization", &warm)])
                .await
                .0,
            200,
            "{}",
            gw.log()
        );
        assert!(
            Instant::now() < deadline,
            "the gateway never used Redis: {}",
            gw.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let alice = token(600);
    let (traceparent, trace, client_span) = client_context("01");
    let tracestate = "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7";
    let (status, headers) = call(
        gw.port,
        "/users/traced",
        &[
            ("authorization", &alice),
            ("traceparent", &traceparent),
            ("tracestate", tracestate),
            ("user-agent", "otel-it/1.0"),
        ],
    )
    .await;
    assert_eq!(status, 200, "{}", gw.log());
    let request_id = headers["x-request-id"].to_str().unwrap().to_string();

    // What the backend got: the client's trace, the gateway's attempt span as parent, sampled,
    // and the tracestate unchanged.
    let up = backend.traceparent_for("/users/traced");
    assert_eq!(up.trace, trace);
    assert_eq!(up.flags, "01");
    assert_ne!(
        up.parent, client_span,
        "the gateway's span, not the client's"
    );
    assert_eq!(backend.seen_for("/users/traced").tracestate, [tracestate]);

    let spans = collector.wait_trace(&trace).await;
    assert_eq!(spans.len(), 5, "{spans:#?}");
    for g in &spans {
        assert_eq!(g.service, "edge-gw", "resource service.name");
        assert_eq!(g.span.trace_state, tracestate, "{:?}", g.span.name);
    }
    let server = one(&spans, "GET /users/");
    assert_eq!(server.kind, SpanKind::Server as i32);
    assert_eq!(hex(&server.parent_span_id), client_span);
    assert_eq!(hex(&server.trace_id), trace);
    assert!(!is_error(server), "{server:?}");
    // OTLP's span flags: sampled, the parent's remoteness known, and remote for the server
    // span only (its parent is the client's span).
    assert_eq!(server.flags, 0x301, "{server:?}");
    for g in spans.iter().filter(|g| g.span.span_id != server.span_id) {
        assert_eq!(g.span.flags, 0x101, "{:?}", g.span);
    }
    assert_eq!(str_attr(server, "http.request.method"), Some("GET"));
    assert_eq!(str_attr(server, "http.route"), Some("/users/"));
    assert_eq!(str_attr(server, "url.path"), Some("/users/traced"));
    assert_eq!(str_attr(server, "url.scheme"), Some("http"));
    assert_eq!(str_attr(server, "network.protocol.version"), Some("1.1"));
    assert_eq!(int_attr(server, "http.response.status_code"), Some(200));
    assert_eq!(str_attr(server, "client.address"), Some("127.0.0.1"));
    assert_eq!(str_attr(server, "network.peer.address"), Some("127.0.0.1"));
    assert_eq!(str_attr(server, "user_agent.original"), Some("otel-it/1.0"));
    assert_eq!(str_attr(server, "hexgate.service"), Some("users"));
    assert_eq!(
        str_attr(server, "hexgate.request_id"),
        Some(request_id.as_str())
    );
    assert_eq!(str_attr(server, "hexgate.consumer"), Some("alice"));
    assert_eq!(str_attr(server, "hexgate.refusal"), None);
    assert_eq!(str_attr(server, "error.type"), None);

    let auth = one(&spans, "authenticate");
    assert_eq!(auth.kind, SpanKind::Internal as i32);
    assert_eq!(auth.parent_span_id, server.span_id);
    assert_eq!(str_attr(auth, "hexgate.auth.method"), Some("jwt"));
    assert_eq!(str_attr(auth, "hexgate.auth.cache"), Some("miss"));
    assert!(!is_error(auth));

    let limits = one(&spans, "limits");
    assert_eq!(limits.kind, SpanKind::Internal as i32);
    assert_eq!(limits.parent_span_id, server.span_id);
    assert_eq!(str_attr(limits, "hexgate.limits.store"), Some("redis"));
    assert_eq!(str_attr(limits, "hexgate.limits.outcome"), Some("allowed"));

    let evalsha = one(&spans, "EVALSHA");
    assert_eq!(evalsha.kind, SpanKind::Client as i32);
    assert_eq!(
        evalsha.parent_span_id, limits.span_id,
        "EVALSHA under limits"
    );
    assert_eq!(str_attr(evalsha, "db.system.name"), Some("redis"));
    assert!(!is_error(evalsha));

    let attempt = one(&spans, "GET");
    assert_eq!(attempt.kind, SpanKind::Client as i32);
    assert_eq!(attempt.parent_span_id, server.span_id);
    assert_eq!(
        hex(&attempt.span_id),
        up.parent,
        "the backend's parent is the attempt's span"
    );
    assert_eq!(str_attr(attempt, "server.address"), Some("127.0.0.1"));
    assert_eq!(
        int_attr(attempt, "server.port"),
        Some(i64::from(backend.addr.port()))
    );
    // `hexgate.backend`, when given, names the same backend (server.address and server.port
    // already do).
    assert!(
        str_attr(attempt, "hexgate.backend")
            .is_none_or(|b| b.contains(&backend.addr.port().to_string())),
        "{attempt:?}"
    );
    assert_eq!(int_attr(attempt, "http.response.status_code"), Some(200));
    assert_eq!(int_attr(attempt, "http.request.resend_count"), None);
    assert_eq!(str_attr(attempt, "error.type"), None);
    assert_eq!(
        str_attr(attempt, "hexgate.upstream.outcome"),
        Some("answered")
    );
    check_parents(&spans, server);
    // Every span id is distinct.
    let mut ids: Vec<&Vec<u8>> = spans.iter().map(|g| &g.span.span_id).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), spans.len());

    // How the exports were sent: path, content type, the configured header.
    let exports = collector.exports();
    assert!(!exports.is_empty());
    for e in &exports {
        assert_eq!(e.path, "/v1/traces");
        assert_eq!(e.headers["content-type"], "application/x-protobuf");
        assert_eq!(e.headers["authorization"], "Bearer s3cret");
    }
    let m = wait_metrics(&gw, Duration::from_secs(10), |m| counter(m, EXPORTED) >= 5).await;
    assert_eq!(counter(&m, DROPPED), 0, "{m}");

    // The same token again: the token cache answers, and the span says so.
    let (traceparent, trace2, _) = client_context("01");
    let (status, _) = call(
        gw.port,
        "/users/again",
        &[("authorization", &alice), ("traceparent", &traceparent)],
    )
    .await;
    assert_eq!(status, 200);
    let spans = collector.wait_trace(&trace2).await;
    let auth = one(&spans, "authenticate");
    assert_eq!(str_attr(auth, "hexgate.auth.cache"), Some("hit"));
    assert_eq!(
        str_attr(one(&spans, "GET /users/"), "hexgate.consumer"),
        Some("alice")
    );

    // A refused request (no token) is a server span with the refusal and an error-free 401.
    let (traceparent, trace3, _) = client_context("01");
    let (status, _) = call(gw.port, "/users/anon", &[("traceparent", &traceparent)]).await;
    assert_eq!(status, 401);
    let spans = collector.wait_trace(&trace3).await;
    let server = one(&spans, "GET /users/");
    assert_eq!(int_attr(server, "http.response.status_code"), Some(401));
    assert!(str_attr(server, "hexgate.refusal").is_some(), "{server:?}");
    assert!(!is_error(server), "a 4xx is no server error");
    let auth = one(&spans, "authenticate");
    assert!(is_error(auth), "{auth:?}");
    assert!(
        of_kind(&spans, SpanKind::Client).is_empty(),
        "nothing went upstream"
    );
    assert!(backend.seen().iter().all(|s| s.path != "/users/anon"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sampling_is_parent_based_and_bad_traceparents_start_new_traces() {
    let backend = TraceBackend::start().await;
    let svc = service("web", "/web/", &[&backend.url()], "");

    // sampleRatio 0, and an endpoint with a path: /v1/traces is appended.
    let none = Collector::start(Wire::Http).await;
    let gw = Gateway::start(&loopback_config(
        &tracing_block(&format!("{}/otlp", none.url()), "  sampleRatio: 0\n"),
        &svc,
    ))
    .await;
    assert_eq!(call(gw.port, "/web/unsampled", &[]).await.0, 200);
    let up = backend.traceparent_for("/web/unsampled");
    assert_eq!(up.flags, "00", "a new trace not sampled at ratio 0");
    assert!(backend.seen_for("/web/unsampled").tracestate.is_empty());
    // Four export periods: nothing is sent.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(none.exports().is_empty(), "{:#?}", none.spans());
    // A client's sampled trace is kept whatever the ratio.
    let (traceparent, trace, client_span) = client_context("01");
    assert_eq!(
        call(gw.port, "/web/parent", &[("traceparent", &traceparent)])
            .await
            .0,
        200
    );
    let up = backend.traceparent_for("/web/parent");
    assert_eq!(
        (up.trace.as_str(), up.flags.as_str()),
        (trace.as_str(), "01")
    );
    let spans = none.wait_trace(&trace).await;
    assert_eq!(spans.len(), 2, "server and upstream attempt: {spans:#?}");
    let server = one(&spans, "GET /web/");
    assert_eq!(hex(&server.parent_span_id), client_span);
    assert_eq!(hex(&one(&spans, "GET").span_id), up.parent);
    assert_eq!(
        none.trace(&up.trace).len(),
        2,
        "the unsampled request exported nothing"
    );
    assert!(none.exports().iter().all(|e| e.path == "/otlp/v1/traces"));
    let m = wait_metrics(&gw, Duration::from_secs(5), |m| counter(m, EXPORTED) == 2).await;
    assert_eq!(counter(&m, DROPPED), 0);
    drop(gw);

    // sampleRatio 1, and an endpoint already ending with /v1/traces.
    let all = Collector::start(Wire::Http).await;
    let mem = service(
        "mem",
        "/mem/",
        &[&backend.url()],
        "    rateLimiting: {enabled: true, ratePerSecond: 1000, burst: 1000}\n",
    );
    let gw = Gateway::start(&loopback_config(
        &tracing_block(&format!("{}/v1/traces", all.url()), "  sampleRatio: 1.0\n"),
        &format!("{svc}{mem}"),
    ))
    .await;
    // Limits in memory: a limits span, no Redis span; no authentication span on a route
    // without it. Over HTTP/2 (h2c): the protocol version says so.
    let (tp, mem_trace, _) = client_context("01");
    let (status, _, body) = h2c_with(gw.port, "/mem/h2", &[("traceparent", &tp)]).await;
    assert_eq!((status, body.as_str()), (200, "ok"));
    let spans = all.wait_trace(&mem_trace).await;
    assert_eq!(spans.len(), 3, "server, limits, attempt: {spans:#?}");
    let server = one(&spans, "GET /mem/");
    assert_eq!(str_attr(server, "network.protocol.version"), Some("2"));
    assert_eq!(str_attr(server, "hexgate.service"), Some("mem"));
    assert_eq!(str_attr(server, "hexgate.consumer"), None);
    let limits = one(&spans, "limits");
    assert_eq!(limits.parent_span_id, server.span_id);
    assert_eq!(str_attr(limits, "hexgate.limits.store"), Some("memory"));
    assert_eq!(str_attr(limits, "hexgate.limits.outcome"), Some("allowed"));
    assert_eq!(
        hex(&one(&spans, "GET").span_id),
        backend.traceparent_for("/mem/h2").parent
    );
    // A client's unsampled trace is continued (flags 00) and not exported.
    let (unsampled, unsampled_trace, client_span) = client_context("00");
    let (status, _) = call(
        gw.port,
        "/web/flags00",
        &[("traceparent", &unsampled), ("tracestate", "k=v")],
    )
    .await;
    assert_eq!(status, 200);
    let up = backend.traceparent_for("/web/flags00");
    assert_eq!(up.trace, unsampled_trace);
    assert_eq!(up.flags, "00");
    assert_ne!(up.parent, client_span, "the gateway's server span id");
    assert_eq!(backend.seen_for("/web/flags00").tracestate, ["k=v"]);

    // Invalid traceparents start a new trace (sampled at ratio 1) and drop the tracestate.
    let (good, good_trace, _) = client_context("01");
    let bad = [
        ("upper", good.to_uppercase()),
        (
            "zero-trace",
            format!("00-{}-b7ad6b7169203331-01", "0".repeat(32)),
        ),
        ("zero-span", format!("00-{good_trace}-0000000000000000-01")),
        ("short", good[..54].to_string()),
        ("ff", good.replacen("00-", "ff-", 1)),
    ];
    for (name, value) in &bad {
        let path = format!("/web/bad-{name}");
        let (status, _) = call(
            gw.port,
            &path,
            &[("traceparent", value), ("tracestate", "k=v")],
        )
        .await;
        assert_eq!(status, 200, "{name}");
        let up = backend.traceparent_for(&path);
        assert_ne!(up.trace, good_trace, "{name}: {value}");
        assert_eq!(up.flags, "01", "{name}");
        assert!(
            backend.seen_for(&path).tracestate.is_empty(),
            "{name}: no parent, no tracestate"
        );
        let spans = all.wait_trace(&up.trace).await;
        let server = one(&spans, "GET /web/");
        assert!(server.parent_span_id.is_empty(), "{name}: a root span");
        assert_eq!(hex(&one(&spans, "GET").span_id), up.parent, "{name}");
    }

    // Two traceparent fields: no parent either.
    let (status, _) = call(
        gw.port,
        "/web/two",
        &[("traceparent", &good), ("traceparent", &good)],
    )
    .await;
    assert_eq!(status, 200);
    let up = backend.traceparent_for("/web/two");
    assert_ne!(up.trace, good_trace, "two traceparent fields are no parent");
    // A tracestate over 512 bytes is dropped, the parent kept; one of 512 is passed on (two
    // members: a value is at most 256 characters).
    let (tp, long_trace, _) = client_context("01");
    let long = format!("a={},b={}", "x".repeat(254), "y".repeat(254));
    assert_eq!(long.len(), 513);
    assert_eq!(
        call(
            gw.port,
            "/web/long",
            &[("traceparent", &tp), ("tracestate", &long)]
        )
        .await
        .0,
        200
    );
    let up = backend.traceparent_for("/web/long");
    assert_eq!(up.trace, long_trace);
    assert!(backend.seen_for("/web/long").tracestate.is_empty());
    let (tp, fits_trace, _) = client_context("01");
    let fits = format!("a={},b={}", "x".repeat(254), "y".repeat(253));
    assert_eq!(fits.len(), 512);
    assert_eq!(
        call(
            gw.port,
            "/web/fits",
            &[("traceparent", &tp), ("tracestate", &fits)]
        )
        .await
        .0,
        200
    );
    assert_eq!(backend.seen_for("/web/fits").tracestate, [fits.as_str()]);
    let spans = all.wait_trace(&fits_trace).await;
    assert_eq!(one(&spans, "GET /web/").trace_state, fits);
    // A tracestate that is not a list as Trace Context writes it is dropped, the parent kept.
    for (i, bad) in [
        "Upper=1",
        "novalue",
        "a=1,b",
        &format!("k={}", "x".repeat(300)),
    ]
    .into_iter()
    .enumerate()
    {
        let (tp, bad_trace, _) = client_context("01");
        let path = format!("/web/badstate{i}");
        assert_eq!(
            call(gw.port, &path, &[("traceparent", &tp), ("tracestate", bad)])
                .await
                .0,
            200
        );
        assert_eq!(backend.traceparent_for(&path).trace, bad_trace, "{bad}");
        assert!(backend.seen_for(&path).tracestate.is_empty(), "{bad}");
    }

    // Exports are in order: once this last request's spans are in, nothing more is coming
    // for the unsampled trace.
    all.wait_trace(&fits_trace).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        all.trace(&unsampled_trace).is_empty(),
        "an unsampled client trace is not exported at ratio 1"
    );
    assert!(all.exports().iter().all(|e| e.path == "/v1/traces"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_upstream_attempt_is_a_client_span_and_the_retry_is_the_parent() {
    let dead = TraceBackend::start().await;
    let live = TraceBackend::start().await;
    let collector = Collector::start(Wire::Http).await;
    let svc = service(
        "web",
        "/web/",
        &[&dead.url(), &live.url()],
        "    retries: 1\n    retryOn: [connect-failure]\n",
    );
    let gw = Gateway::start(&loopback_config(
        &format!(
            "healthCheckInterval: 3600\n{}",
            tracing_block(&collector.url(), "")
        ),
        &svc,
    ))
    .await;
    // Both healthy at the start's health check; then the first one goes away (connects are
    // refused), unnoticed until a request tries it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while dead.health_checks.load(Ordering::Relaxed) == 0
        || live.health_checks.load(Ordering::Relaxed) == 0
    {
        assert!(Instant::now() < deadline, "no health checks: {}", gw.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    dead.stop();
    // Round robin: one of the first two requests tries the dead backend first.
    let mut traces = Vec::new();
    for i in 0..4 {
        let (tp, trace, _) = client_context("01");
        let path = format!("/web/r{i}");
        assert_eq!(
            call(gw.port, &path, &[("traceparent", &tp)]).await.0,
            200,
            "{}",
            gw.log()
        );
        traces.push((path, trace));
    }
    let mut retried = 0;
    for (path, trace) in &traces {
        let spans = collector.wait_trace(trace).await;
        let server = one(&spans, "GET /web/");
        assert_eq!(int_attr(server, "http.response.status_code"), Some(200));
        assert!(!is_error(server));
        let attempts = of_kind(&spans, SpanKind::Client);
        let up = live.traceparent_for(path);
        let last = attempts.last().unwrap();
        assert_eq!(
            hex(&last.span_id),
            up.parent,
            "{path}: the answering attempt"
        );
        assert_eq!(int_attr(last, "http.response.status_code"), Some(200));
        assert_eq!(
            int_attr(last, "server.port"),
            Some(i64::from(live.addr.port()))
        );
        for a in &attempts {
            assert_eq!(a.parent_span_id, server.span_id);
            assert_eq!(a.name, "GET");
        }
        match attempts.len() {
            1 => assert_eq!(int_attr(last, "http.request.resend_count"), None),
            2 => {
                retried += 1;
                let first = attempts[0];
                assert_eq!(
                    int_attr(first, "server.port"),
                    Some(i64::from(dead.addr.port()))
                );
                assert!(
                    str_attr(first, "error.type").is_some_and(|e| !e.is_empty()),
                    "{first:?}"
                );
                assert!(is_error(first));
                assert_eq!(int_attr(first, "http.response.status_code"), None);
                assert_eq!(int_attr(first, "http.request.resend_count"), None);
                assert_eq!(str_attr(first, "hexgate.upstream.outcome"), Some("failed"));
                assert_eq!(int_attr(last, "http.request.resend_count"), Some(1));
                assert_eq!(str_attr(last, "error.type"), None);
                assert!(!is_error(last));
                assert!(first.end_time_unix_nano <= last.start_time_unix_nano);
            }
            n => panic!("{n} attempts for {path}: {spans:#?}"),
        }
        check_parents(&spans, server);
    }
    assert!(retried >= 1, "no request tried the dead backend first");
    assert!(dead.seen().is_empty());

    // A backend's 5xx: the attempt and the server span are errors.
    let (tp, trace, _) = client_context("01");
    assert_eq!(
        call(gw.port, "/web/status-500", &[("traceparent", &tp)])
            .await
            .0,
        500
    );
    let spans = collector.wait_trace(&trace).await;
    let server = one(&spans, "GET /web/");
    assert!(is_error(server));
    assert_eq!(str_attr(server, "error.type"), Some("500"));
    assert_eq!(int_attr(server, "http.response.status_code"), Some(500));
    let attempts = of_kind(&spans, SpanKind::Client);
    let last = attempts.last().unwrap();
    assert_eq!(int_attr(last, "http.response.status_code"), Some(500));
    assert_eq!(str_attr(last, "error.type"), Some("500"));
    assert_eq!(
        str_attr(last, "hexgate.upstream.outcome"),
        Some("answered_5xx")
    );
    assert!(is_error(last));

    // No route: a server span named by the method alone, no http.route.
    let (tp, trace, _) = client_context("01");
    assert_eq!(
        call(gw.port, "/nowhere", &[("traceparent", &tp)]).await.0,
        404
    );
    let spans = collector.wait_trace(&trace).await;
    assert_eq!(spans.len(), 1, "{spans:#?}");
    let server = one(&spans, "GET");
    assert_eq!(server.kind, SpanKind::Server as i32);
    assert_eq!(str_attr(server, "http.route"), None);
    assert_eq!(int_attr(server, "http.response.status_code"), Some(404));
    assert!(str_attr(server, "hexgate.refusal").is_some());
    assert!(!is_error(server));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_is_down_costs_requests_nothing_and_drops_are_counted() {
    let backend = TraceBackend::start().await;
    // Nothing listens there.
    let closed = free_port();
    let gw = Gateway::start(&loopback_config(
        &tracing_block(&format!("http://127.0.0.1:{closed}"), ""),
        &service("web", "/web/", &[&backend.url()], ""),
    ))
    .await;
    let mut client = KeepAlive::new(gw.port);
    let started = Instant::now();
    for i in 0..200 {
        let (s, body) = client.get(&format!("/web/{i}")).await.unwrap();
        assert_eq!((s, body.as_str()), (200, "ok"));
    }
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    // Every request's two spans (server, upstream attempt) are dropped and counted.
    let m = wait_metrics(&gw, Duration::from_secs(10), |m| counter(m, DROPPED) >= 400).await;
    assert_eq!(counter(&m, DROPPED), 400, "{m}");
    assert_eq!(counter(&m, EXPORTED), 0, "{m}");
    // The failure is logged, but not once per export.
    let log = gw.log();
    let warnings = log.matches("trace export failed").count() as u64;
    let most = 2 + started.elapsed().as_secs() / 10;
    assert!(
        (1..=most).contains(&warnings),
        "{warnings} warnings:\n{log}"
    );
    assert!(log.contains(&format!("127.0.0.1:{closed}")), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_never_answers_does_not_slow_requests() {
    let backend = TraceBackend::start().await;
    let silent = SilentCollector::start().await;
    let gw = Gateway::start(&loopback_config(
        &tracing_block(&format!("http://{}", silent.addr), ""),
        &service("web", "/web/", &[&backend.url()], ""),
    ))
    .await;
    let mut client = KeepAlive::new(gw.port);
    let started = Instant::now();
    let mut times = Vec::new();
    for i in 0..200 {
        let t = Instant::now();
        let (s, body) = client.get(&format!("/web/{i}")).await.unwrap();
        times.push(t.elapsed());
        assert_eq!((s, body.as_str()), (200, "ok"));
        if i == 0 {
            // Let the exporter start an export that will hang, then go on.
            tokio::time::sleep(Duration::from_millis(400)).await;
        }
    }
    let total = started.elapsed();
    times.sort();
    let median = times[times.len() / 2];
    let worst = *times.last().unwrap();
    // The export hangs for 10 s; requests never wait on it.
    assert!(
        total < Duration::from_secs(8),
        "200 requests took {total:?}"
    );
    assert!(
        median < Duration::from_millis(250) && worst < Duration::from_secs(2),
        "median {median:?}, worst {worst:?}"
    );
    assert!(
        silent.accepted.load(Ordering::Relaxed) >= 1,
        "no export tried"
    );
    // The admin port answers meanwhile; once the hung export times out (10 s), its spans are
    // counted as dropped, none as exported.
    let m = wait_metrics(&gw, Duration::from_secs(13), |m| counter(m, DROPPED) > 0).await;
    assert_eq!(counter(&m, EXPORTED), 0, "{m}");
    assert!(counter(&m, DROPPED) <= 400, "{m}");
    assert!(gw.log().contains("timed out"), "{}", gw.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_grpc_exports_and_a_refusing_collector_counts_drops() {
    let backend = TraceBackend::start().await;
    let svc = service("web", "/web/", &[&backend.url()], "");
    let collector = Collector::start(Wire::Grpc { status: 0 }).await;
    let gw = Gateway::start(&loopback_config(
        &tracing_block(
            &collector.url(),
            "  headers: {authorization: \"Bearer grpc-s3cret\", x-tenant: acme}\n",
        ),
        &svc,
    ))
    .await;
    let (tp, trace, client_span) = client_context("01");
    assert_eq!(
        call(gw.port, "/web/g", &[("traceparent", &tp)]).await.0,
        200
    );
    let spans = collector.wait_trace(&trace).await;
    assert_eq!(spans.len(), 2, "{spans:#?}");
    let server = one(&spans, "GET /web/");
    assert_eq!(hex(&server.parent_span_id), client_span);
    assert_eq!(
        hex(&one(&spans, "GET").span_id),
        backend.traceparent_for("/web/g").parent
    );
    assert!(spans.iter().all(|g| g.service == "hexgate"), "the default");
    for e in collector.exports() {
        assert_eq!(
            e.path,
            "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
        );
        assert_eq!(e.headers["content-type"], "application/grpc");
        assert_eq!(e.headers["te"], "trailers");
        assert_eq!(e.headers["authorization"], "Bearer grpc-s3cret");
        assert_eq!(e.headers["x-tenant"], "acme");
    }
    let m = wait_metrics(&gw, Duration::from_secs(10), |m| counter(m, EXPORTED) >= 2).await;
    assert_eq!(counter(&m, DROPPED), 0, "{m}");
    drop(gw);

    // grpc-status 14 (UNAVAILABLE): the spans reached the collector but count as dropped.
    let refusing = Collector::start(Wire::Grpc { status: 14 }).await;
    let gw = Gateway::start(&loopback_config(&tracing_block(&refusing.url(), ""), &svc)).await;
    for i in 0..3 {
        assert_eq!(call(gw.port, &format!("/web/u{i}"), &[]).await.0, 200);
    }
    let m = wait_metrics(&gw, Duration::from_secs(10), |m| counter(m, DROPPED) >= 6).await;
    assert_eq!(counter(&m, DROPPED), 6, "{m}");
    assert_eq!(counter(&m, EXPORTED), 0, "{m}");
    assert_eq!(refusing.spans().len(), 6, "the exports were well formed");
    assert!(gw.log().contains("grpc-status 14"), "{}", gw.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exporter_headers_are_secrets() {
    let backend = TraceBackend::start().await;
    let secret = "Bearer hush-9f8e7d6c5b4a";
    let closed = free_port();
    let gw = Gateway::start(&loopback_config(
        &tracing_block(
            &format!("http://127.0.0.1:{closed}"),
            &format!("  headers: {{authorization: \"{secret}\"}}\n  sampleRatio: 0.5\n"),
        ),
        &service("web", "/web/", &[&backend.url()], ""),
    ))
    .await;
    let (s, cfg) = get(gw.admin_port, "/admin/config").await.unwrap();
    assert_eq!(s, 200);
    let v: serde_json::Value = serde_json::from_str(&cfg).unwrap();
    let t = &v["config"]["tracing"];
    assert_eq!(t["headers"]["authorization"], "<redacted>", "{cfg}");
    assert_eq!(t["sampleRatio"], 0.5, "{cfg}");
    assert_eq!(t["serviceName"], "hexgate", "{cfg}");
    assert!(!cfg.contains("hush-9f8e7d6c5b4a"), "{cfg}");
    // A failed export is logged, the secret is not.
    let (tp, _, _) = client_context("01");
    assert_eq!(
        call(gw.port, "/web/x", &[("traceparent", &tp)]).await.0,
        200
    );
    wait_metrics(&gw, Duration::from_secs(10), |m| counter(m, DROPPED) >= 2).await;
    let log = gw.log();
    assert!(log.contains("trace export failed"), "{log}");
    assert!(!log.contains("hush-9f8e7d6c5b4a"), "{log}");
    assert!(!gw.stdout().contains("hush-9f8e7d6c5b4a"));
}

#[test]
fn tracing_config_errors_name_the_line_and_the_key() {
    let base = "gatewayPort: 18080\nservices: []\ntracing:\n";
    let check = |body: &str, want: &[&str], never: &str| {
        let (code, out, err) = validate_yaml(&format!("{base}{body}"), &[]);
        assert_eq!(code, 2, "{body}: {out}{err}");
        for w in want {
            assert!(err.contains(w), "{body}: want {w:?} in {err}");
        }
        if !never.is_empty() {
            assert!(!err.contains(never), "{body}: {err}");
            assert!(!out.contains(never), "{body}: {out}");
        }
    };
    check(
        "  otlpEndpoint: \"http://127.0.0.1:4318\"\n  sampleRatio: 1.5\n",
        &["config.yaml:5: tracing.sampleRatio"],
        "",
    );
    check(
        "  otlpEndpoint: \"http://127.0.0.1:4318\"\n  sampleRatio: -0.1\n",
        &["config.yaml:5: tracing.sampleRatio"],
        "",
    );
    check(
        "  otlpEndpoint: \"ftp://x\"\n",
        &["config.yaml:4: tracing.otlpEndpoint"],
        "",
    );
    check(
        "  otlpEndpoint: \"http://user:pa55word@127.0.0.1:4318\"\n",
        &["config.yaml:4: tracing.otlpEndpoint", "credentials"],
        "pa55word",
    );
    check(
        "  otlpEndpoint: \"grpc://127.0.0.1:4317/some/path\"\n",
        &["config.yaml:4: tracing.otlpEndpoint"],
        "",
    );
    check(
        "  otlpEndpoint: \"http://127.0.0.1:4318\"\n  headers:\n    content-type: text/plain\n",
        &["config.yaml:6: tracing.headers.content-type"],
        "",
    );
    check("  sampleRatio: 0.5\n", &["tracing.otlpEndpoint"], "");
    // A header value that is not a valid field value: named by key, never shown.
    check(
        "  otlpEndpoint: \"http://127.0.0.1:4318\"\n  headers: {authorization: \"Bearer s3cr\\u0001et\"}\n",
        &["tracing.headers.authorization"],
        "s3cr",
    );
    for ok in [
        "  otlpEndpoint: \"http://127.0.0.1:4318\"\n  sampleRatio: 0\n  headers: {authorization: \"Bearer s3cret\"}\n",
        "  otlpEndpoint: \"grpc://127.0.0.1:4317\"\n  sampleRatio: 1\n  serviceName: edge\n",
        "  otlpEndpoint: \"https://collector.example:4318/v1/traces\"\n  sampleRatio: \"0.25\"\n",
    ] {
        let (code, out, err) = validate_yaml(&format!("{base}{ok}"), &[]);
        assert_eq!(code, 0, "{ok}: {out}{err}");
        assert!(!out.contains("s3cret") && !err.contains("s3cret"), "{out}{err}");
    }
}

/// `redis:` on `port` with `failureMode`, a short timeout.
fn redis_top(port: u16, failure_mode: &str) -> String {
    format!("redis:\n  address: \"127.0.0.1:{port}\"\n  timeout: 200ms\n  failureMode: {failure_mode}\n")
}

/// A gateway whose limits go through `redis` with `failure_mode`, once Redis has seen its first
/// limit call (requests to `warm`, bounded to 10 s).
async fn gateway_using_redis(
    redis: &RedisServer,
    failure_mode: &str,
    collector: &str,
    services: &str,
    warm: &str,
) -> Gateway {
    let gw = Gateway::start(&loopback_config(
        &format!(
            "{}{}",
            redis_top(redis.port, failure_mode),
            tracing_block(collector, "")
        ),
        services,
    ))
    .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while redis.calls("evalsha") == 0 {
        call(gw.port, warm, &[]).await;
        assert!(Instant::now() < deadline, "Redis never used: {}", gw.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    gw
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_spans_show_a_refusal_and_a_redis_outage() {
    let mut redis = RedisServer::start();
    let backend = TraceBackend::start().await;
    let collector = Collector::start(Wire::Http).await;
    let services = [
        service(
            "open",
            "/open/",
            &[&backend.url()],
            "    rateLimiting: {enabled: true, ratePerSecond: 1000, burst: 1000}\n",
        ),
        service(
            "tight",
            "/tight/",
            &[&backend.url()],
            "    rateLimiting: {enabled: true, ratePerSecond: 0.001, burst: 1}\n",
        ),
    ]
    .concat();
    let gw = gateway_using_redis(&redis, "closed", &collector.url(), &services, "/open/warm").await;

    // Limited: the limits span says so; nothing went upstream; a 429 is no server error.
    assert_eq!(call(gw.port, "/tight/1", &[]).await.0, 200);
    let (tp, trace, _) = client_context("01");
    assert_eq!(
        call(gw.port, "/tight/2", &[("traceparent", &tp)]).await.0,
        429
    );
    let spans = collector.wait_trace(&trace).await;
    assert_eq!(spans.len(), 3, "server, limits, EVALSHA: {spans:#?}");
    let server = one(&spans, "GET /tight/");
    assert_eq!(int_attr(server, "http.response.status_code"), Some(429));
    assert!(!is_error(server));
    assert!(str_attr(server, "hexgate.refusal").is_some());
    let limits = one(&spans, "limits");
    assert_eq!(str_attr(limits, "hexgate.limits.outcome"), Some("limited"));
    assert_eq!(str_attr(limits, "hexgate.limits.store"), Some("redis"));
    assert!(!is_error(limits));
    let evalsha = one(&spans, "EVALSHA");
    assert_eq!(evalsha.parent_span_id, limits.span_id);
    assert!(!is_error(evalsha), "Redis answered");
    check_parents(&spans, server);

    // Redis gone, failureMode closed: 503; the limits and Redis spans are errors, and so is
    // the server span (a 5xx).
    redis.kill();
    let (tp, trace, _) = client_context("01");
    assert_eq!(
        call(gw.port, "/open/down", &[("traceparent", &tp)]).await.0,
        503,
        "{}",
        gw.log()
    );
    let spans = collector.wait_trace(&trace).await;
    let server = one(&spans, "GET /open/");
    assert_eq!(int_attr(server, "http.response.status_code"), Some(503));
    assert!(is_error(server), "{server:?}");
    assert_eq!(str_attr(server, "error.type"), Some("503"));
    let limits = one(&spans, "limits");
    assert_eq!(
        str_attr(limits, "hexgate.limits.outcome"),
        Some("unavailable")
    );
    assert!(is_error(limits));
    assert!(is_error(one(&spans, "EVALSHA")));
    assert!(of_kind(&spans, SpanKind::Client)
        .iter()
        .all(|s| s.name == "EVALSHA"));
    drop(gw);

    // failureMode open: Redis fails under a running gateway and the request is served from
    // memory, yet the Redis call failed: a Redis span, if there is one, must say so.
    redis.restart();
    let gw = gateway_using_redis(&redis, "open", &collector.url(), &services, "/open/warm2").await;
    redis.kill();
    let (tp, trace, _) = client_context("01");
    assert_eq!(
        call(gw.port, "/open/fallback", &[("traceparent", &tp)])
            .await
            .0,
        200,
        "failureMode open serves"
    );
    let spans = collector.wait_trace(&trace).await;
    let limits = one(&spans, "limits");
    assert_eq!(str_attr(limits, "hexgate.limits.outcome"), Some("allowed"));
    let server = one(&spans, "GET /open/");
    assert!(!is_error(server));
    for s in spans.iter().filter(|g| g.span.name == "EVALSHA") {
        assert!(
            is_error(&s.span),
            "Redis was down: its span must be an error: {:?}",
            s.span
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_turns_tracing_on_and_moves_it_and_a_stop_flushes() {
    let backend = TraceBackend::start().await;
    let first = Collector::start(Wire::Http).await;
    let second = Collector::start(Wire::Http).await;
    let svc = service("web", "/web/", &[&backend.url()], "");
    let mut gw = Gateway::start(&loopback_config("", &svc)).await;
    let (tp, _, _) = client_context("01");
    assert_eq!(
        call(gw.port, "/web/off", &[("traceparent", &tp)]).await.0,
        200
    );
    assert_eq!(
        backend.seen_for("/web/off").traceparent,
        [tp.as_str()],
        "without tracing the client's traceparent passes untouched"
    );

    gw.rewrite_config(&loopback_config(&tracing_block(&first.url(), ""), &svc));
    gw.wait_reloads(2).await;
    let (tp, trace, _) = client_context("01");
    assert_eq!(
        call(gw.port, "/web/on", &[("traceparent", &tp)]).await.0,
        200
    );
    assert_eq!(first.wait_trace(&trace).await.len(), 2);
    assert_eq!(backend.traceparent_for("/web/on").trace, trace);

    gw.rewrite_config(&loopback_config(
        &tracing_block(&second.url(), "  serviceName: moved\n"),
        &svc,
    ));
    gw.wait_reloads(3).await;
    let (tp, trace, _) = client_context("01");
    assert_eq!(
        call(gw.port, "/web/moved", &[("traceparent", &tp)]).await.0,
        200
    );
    let spans = second.wait_trace(&trace).await;
    assert!(spans.iter().all(|g| g.service == "moved"), "{spans:#?}");
    assert!(first.trace(&trace).is_empty());

    // The last request's spans are sent on a graceful stop, right after it.
    let (tp, trace, _) = client_context("01");
    assert_eq!(
        call(gw.port, "/web/last", &[("traceparent", &tp)]).await.0,
        200
    );
    gw.signal("TERM");
    assert_eq!(
        gw.wait_exit(Duration::from_secs(15)),
        Some(0),
        "{}",
        gw.log()
    );
    assert_eq!(second.trace(&trace).len(), 2, "flushed at stop");
}

/// A method outside HTTP's known set: `_OTHER` with the original beside it, and spans named
/// `HTTP ...` (OpenTelemetry's HTTP conventions), on the server span and the attempt alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_methods_follow_the_http_conventions() {
    let backend = TraceBackend::start().await;
    let collector = Collector::start(Wire::Http).await;
    let gw = Gateway::start(&loopback_config(
        &tracing_block(&collector.url(), ""),
        &service("web", "/web/", &[&backend.url()], ""),
    ))
    .await;
    let (tp, trace, _) = client_context("01");
    let req = Request::builder()
        .method("PURGE")
        .uri("/web/cache")
        .header("host", "localhost")
        .header("traceparent", &tp)
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    let (status, _, _) = request(gw.port, req).await.unwrap();
    assert_eq!(status, 200);
    let spans = collector.wait_trace(&trace).await;
    let server = one(&spans, "HTTP /web/");
    assert_eq!(str_attr(server, "http.request.method"), Some("_OTHER"));
    assert_eq!(
        str_attr(server, "http.request.method_original"),
        Some("PURGE")
    );
    let attempts = of_kind(&spans, SpanKind::Client);
    assert_eq!(attempts.len(), 1, "{spans:#?}");
    let attempt = attempts[0];
    assert_eq!(attempt.name, "HTTP", "{attempt:?}");
    assert_eq!(str_attr(attempt, "http.request.method"), Some("_OTHER"));
    assert_eq!(
        str_attr(attempt, "http.request.method_original"),
        Some("PURGE")
    );
}

// ---------------------------------------------------------------------------------------------
// Clients that leave, gRPC refusals, client spans' 4xx, collectors that flood, long values

/// Waits (bounded) until `backend` has seen a request for `path`.
async fn wait_seen(backend: &TraceBackend, path: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !backend.seen().iter().any(|s| s.path == path) {
        assert!(
            Instant::now() < deadline,
            "{path} never reached the backend"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The spans of a request to `path` (a 2 s backend) whose client left at `left`, 200 ms or so
/// after sending it: the server span (499, `client_closed`, an error, ended when the client
/// left rather than when the backend would have answered) and the one attempt, which the
/// backend's `traceparent` names.
async fn check_left(
    collector: &Collector,
    backend: &TraceBackend,
    trace: &str,
    client_span: &str,
    path: &str,
) {
    let spans = collector.wait_trace(trace).await;
    assert_eq!(spans.len(), 2, "server and attempt: {spans:#?}");
    let server = one(&spans, "GET /web/");
    assert_eq!(hex(&server.parent_span_id), client_span);
    assert_eq!(str_attr(server, "url.path"), Some(path));
    assert_eq!(
        int_attr(server, "http.response.status_code"),
        Some(499),
        "{server:?}"
    );
    assert_eq!(str_attr(server, "error.type"), Some("client_closed"));
    assert!(is_error(server), "{server:?}");
    let took = Duration::from_nanos(server.end_time_unix_nano - server.start_time_unix_nano);
    assert!(
        took >= Duration::from_millis(100) && took < Duration::from_millis(1500),
        "the server span ends when the client leaves: {took:?}"
    );
    let attempts = of_kind(&spans, SpanKind::Client);
    assert_eq!(attempts.len(), 1, "{spans:#?}");
    let attempt = attempts[0];
    assert_eq!(attempt.name, "GET");
    assert_eq!(attempt.parent_span_id, server.span_id);
    assert_eq!(
        hex(&attempt.span_id),
        backend.traceparent_for(path).parent,
        "the backend's parent is the attempt's span, and the collector has it"
    );
    assert_eq!(int_attr(attempt, "http.response.status_code"), None);
    assert!(is_error(attempt), "no answer came: {attempt:?}");
    check_parents(&spans, server);
}

/// A client that goes away before the answer (HTTP/1.1: it closes its connection; HTTP/2: it
/// resets its stream) while the backend takes 2 s: the server span is exported all the same
/// (499, `client_closed`, an error), and so is the attempt the backend was told is its parent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_before_the_answer_still_has_its_spans_exported() {
    let backend = TraceBackend::start().await;
    let collector = Collector::start(Wire::Http).await;
    let gw = Gateway::start(&loopback_config(
        &tracing_block(&collector.url(), ""),
        &service("web", "/web/", &[&backend.url()], ""),
    ))
    .await;

    // HTTP/1.1: the connection closes 200 ms after the request, the backend holding it.
    let (tp, trace, client_span) = client_context("01");
    let mut conn = TcpStream::connect(("127.0.0.1", gw.port)).await.unwrap();
    conn.write_all(
        format!("GET /web/slow-h1 HTTP/1.1\r\nhost: localhost\r\ntraceparent: {tp}\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let sent = Instant::now();
    wait_seen(&backend, "/web/slow-h1").await;
    tokio::time::sleep(Duration::from_millis(200).saturating_sub(sent.elapsed())).await;
    drop(conn);
    check_left(&collector, &backend, &trace, &client_span, "/web/slow-h1").await;

    // HTTP/2: the stream is reset (CANCEL), the connection stays.
    let (tp, trace, client_span) = client_context("01");
    let tcp = TcpStream::connect(("127.0.0.1", gw.port)).await.unwrap();
    let (client, h2conn) = h2::client::handshake(tcp).await.unwrap();
    let driver = tokio::spawn(async move {
        let _ = h2conn.await;
    });
    let mut client = client.ready().await.unwrap();
    let req = Request::get(format!("http://localhost:{}/web/slow-h2", gw.port))
        .header("traceparent", &tp)
        .body(())
        .unwrap();
    let (resp, mut stream) = client.send_request(req, true).unwrap();
    let sent = Instant::now();
    wait_seen(&backend, "/web/slow-h2").await;
    tokio::time::sleep(Duration::from_millis(200).saturating_sub(sent.elapsed())).await;
    stream.send_reset(h2::Reason::CANCEL);
    drop(resp);
    check_left(&collector, &backend, &trace, &client_span, "/web/slow-h2").await;
    drop(client);
    driver.abort();

    // The gateway goes on serving.
    assert_eq!(call(gw.port, "/web/after", &[]).await.0, 200);
}

/// What came back for a gRPC call: the HTTP status, and the head's fields with the trailers'.
struct GrpcReply {
    status: u16,
    fields: HeaderMap,
}

/// One gRPC call (h2c, prior knowledge) with an empty message: `traceparent` given.
async fn grpc_call(port: u16, path: &str, traceparent: &str) -> GrpcReply {
    let limit = Duration::from_secs(10);
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.unwrap();
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut client = client.ready().await.unwrap();
    let req = Request::post(format!("http://localhost:{port}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("traceparent", traceparent)
        .body(())
        .unwrap();
    let (resp, mut send) = client.send_request(req, false).unwrap();
    // A refusal may come (and end the stream) before the message is sent.
    let _ = send.send_data(Bytes::from_static(&[0, 0, 0, 0, 0]), true);
    let resp = tokio::time::timeout(limit, resp)
        .await
        .unwrap_or_else(|_| panic!("{path}: no answer"))
        .unwrap_or_else(|e| panic!("{path}: {e}"));
    let (parts, mut body) = resp.into_parts();
    let mut fields = parts.headers;
    while let Some(chunk) = tokio::time::timeout(limit, body.data()).await.unwrap() {
        let chunk = chunk.unwrap();
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    if let Some(t) = tokio::time::timeout(limit, body.trailers())
        .await
        .unwrap()
        .unwrap()
    {
        fields.extend(t);
    }
    driver.abort();
    GrpcReply {
        status: parts.status.as_u16(),
        fields,
    }
}

/// `hexgate_http_requests_total` for `service` and POST, by `code` label.
fn post_codes(metrics: &str, service: &str) -> std::collections::BTreeMap<String, u64> {
    let head =
        format!("hexgate_http_requests_total{{service=\"{service}\",method=\"POST\",code=\"");
    metrics
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(&head)?;
            let (code, value) = rest.split_once("\"} ")?;
            Some((code.to_string(), value.trim().parse::<f64>().ok()? as u64))
        })
        .collect()
}

/// A gRPC call the gateway refuses is answered HTTP 200 with a `grpc-status` in its head: the
/// server span says the HTTP status the refusal stands for (the one the metrics count), not the
/// 200 it was sent as.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_grpc_call_spans_the_status_the_refusal_stands_for() {
    // HTTP/1.1 only: gRPC cannot be forwarded to it.
    let backend = TraceBackend::start().await;
    let collector = Collector::start(Wire::Http).await;
    let services = [
        service("plain", "/plain.Service/", &[&backend.url()], ""),
        service(
            "tight",
            "/tight.Service/",
            &[&backend.url()],
            "    rateLimiting: {enabled: true, ratePerSecond: 0.001, burst: 1}\n",
        ),
    ]
    .concat();
    let gw = Gateway::start(&loopback_config(
        &tracing_block(&collector.url(), ""),
        &services,
    ))
    .await;
    // (path, metrics service label, server span name, the status the refusal stands for,
    // grpc-status): a backend that speaks HTTP/1.1 only, no route, the rate limit (its burst
    // spent by the first call, itself refused for the backend).
    let cases = [
        (
            "/plain.Service/Call",
            "plain",
            "POST /plain.Service/",
            502,
            "12",
        ),
        ("/nowhere.Service/Call", "unmatched", "POST", 404, "12"),
        (
            "/tight.Service/One",
            "tight",
            "POST /tight.Service/",
            502,
            "12",
        ),
        (
            "/tight.Service/Two",
            "tight",
            "POST /tight.Service/",
            429,
            "8",
        ),
    ];
    for (path, label, name, want, grpc_status) in cases {
        let before = post_codes(&gw.metrics().await, label);
        let (tp, trace, _) = client_context("01");
        let reply = grpc_call(gw.port, path, &tp).await;
        assert_eq!(reply.status, 200, "{path}: a gRPC refusal is an HTTP 200");
        assert_eq!(
            reply.fields.get("grpc-status").map(|v| v.to_str().unwrap()),
            Some(grpc_status),
            "{path}: {:?}",
            reply.fields
        );
        // The code the metrics counted for it.
        let after = post_codes(&gw.metrics().await, label);
        let counted: Vec<&String> = after
            .iter()
            .filter(|(code, n)| **n > before.get(*code).copied().unwrap_or(0))
            .map(|(code, _)| code)
            .collect();
        assert_eq!(counted.len(), 1, "{path}: {before:?} then {after:?}");
        let code: i64 = counted[0].parse().unwrap();
        assert_eq!(code, want, "{path}: the metrics' code");

        let spans = collector.wait_trace(&trace).await;
        let server = one(&spans, name);
        assert_eq!(server.kind, SpanKind::Server as i32);
        assert_eq!(
            int_attr(server, "http.response.status_code"),
            Some(code),
            "{path}: the span agrees with the metrics, not the HTTP 200: {server:?}"
        );
        assert!(str_attr(server, "hexgate.refusal").is_some(), "{server:?}");
        assert_eq!(is_error(server), code >= 500, "{path}: {server:?}");
        if code >= 500 {
            assert_eq!(
                str_attr(server, "error.type"),
                Some(code.to_string().as_str())
            );
        } else {
            assert_eq!(str_attr(server, "error.type"), None, "{server:?}");
        }
        assert!(
            of_kind(&spans, SpanKind::Client).is_empty(),
            "{path}: nothing was sent upstream: {spans:#?}"
        );
    }
    assert!(backend.seen().is_empty(), "{:?}", backend.seen());
}

/// `validate` on `tracing:` lines (the block starts on line 4 of config.yaml): its exit code,
/// and its output.
fn validate_tracing(body: &str) -> (i32, String) {
    let (code, out, err) = validate_yaml(
        &format!("gatewayPort: 18080\nservices: []\ntracing:\n{body}"),
        &[],
    );
    (code, format!("{out}{err}"))
}

#[test]
fn tracing_endpoints_ports_and_header_entries_are_checked_where_written() {
    let refused = |body: &str, want: &str, never: &str| {
        let (code, out) = validate_tracing(body);
        assert_eq!(code, 2, "{body}: {out}");
        assert!(out.contains(want), "{body}: want {want:?} in {out}");
        if !never.is_empty() {
            assert!(!out.contains(never), "{body}: {never:?} shown in {out}");
        }
    };
    // A port that is written must be one (`http::Uri` reads 79999 as no port at all: the
    // exports, and their headers, would go to port 80).
    for port in ["79999", "0", "65536", "99999999999", "43a1"] {
        for scheme in ["http", "grpc"] {
            refused(
                &format!("  otlpEndpoint: \"{scheme}://127.0.0.1:{port}\"\n"),
                "config.yaml:4: tracing.otlpEndpoint",
                "",
            );
        }
    }
    // A fragment has no meaning here.
    for endpoint in [
        "http://127.0.0.1:4318/v1/traces#frag",
        "http://127.0.0.1:4318#frag",
        "grpc://127.0.0.1:4317#frag",
    ] {
        refused(
            &format!("  otlpEndpoint: \"{endpoint}\"\n"),
            "config.yaml:4: tracing.otlpEndpoint",
            "",
        );
    }
    // A header value with a character outside visible ASCII (escaped, or written as UTF-8):
    // named by its key and line, never shown.
    for value in ["Bearer s3cr\\u00f6t", "Bearer s3cr\u{f6}t"] {
        refused(
            &format!(
                "  otlpEndpoint: \"http://127.0.0.1:4318\"\n  headers: {{authorization: \"{value}\"}}\n"
            ),
            "config.yaml:5: tracing.headers.authorization",
            "s3cr",
        );
    }
    // A block mapping, one header a line: an error on the third entry names its own line (8).
    let block = |third: &str| {
        format!(
            "  otlpEndpoint: \"http://127.0.0.1:4318\"\n  headers:\n    x-one: a\n    x-two: b\n    {third}\n"
        )
    };
    refused(
        &block("content-type: text/plain"),
        "config.yaml:8: tracing.headers.content-type",
        "",
    );
    refused(
        &block("x-three: \"s3cr\\u00f6t\""),
        "config.yaml:8: tracing.headers.x-three",
        "s3cr",
    );
    refused(
        &block("x-three: \"s3cr\\u0001t\""),
        "config.yaml:8: tracing.headers.x-three",
        "s3cr",
    );
    refused(
        &block("X-One: c"),
        "config.yaml:8: tracing.headers.X-One",
        "",
    );
    refused(
        &block("grpc-timeout: 1S"),
        "config.yaml:8: tracing.headers.grpc-timeout",
        "",
    );
    // An entry before it that is not a string (refused itself) does not shift the lines.
    refused(
        "  otlpEndpoint: \"http://127.0.0.1:4318\"\n  headers:\n    x-one: a\n    x-two: [b]\n    content-type: text/plain\n",
        "config.yaml:8: tracing.headers.content-type",
        "",
    );

    for ok in [
        "  otlpEndpoint: \"GRPC://127.0.0.1:4317\"\n",
        "  otlpEndpoint: \"Grpcs://collector.example:4317\"\n",
        "  otlpEndpoint: \"HTTP://127.0.0.1:4318\"\n",
        "  otlpEndpoint: \"HTTPS://collector.example/v1/traces\"\n",
        "  otlpEndpoint: \"http://127.0.0.1:65535\"\n",
        "  otlpEndpoint: \"grpc://127.0.0.1:1\"\n",
        "  otlpEndpoint: \"http://127.0.0.1:4318\"\n  headers:\n    x-one: a\n    x-two: b\n    authorization: \"Bearer s3cret\\tx\"\n",
    ] {
        let (code, out) = validate_tracing(ok);
        assert_eq!(code, 0, "{ok}: {out}");
        assert!(!out.contains("s3cret"), "{out}");
    }
}

/// OpenTelemetry's HTTP conventions: a 4xx is an error of the client span (the attempt that got
/// it), not of the server span (the client's request was answered as asked).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_4xx_is_an_error_of_the_client_span_only() {
    let backend = TraceBackend::start().await;
    let collector = Collector::start(Wire::Http).await;
    let gw = Gateway::start(&loopback_config(
        &tracing_block(&collector.url(), ""),
        &service("web", "/web/", &[&backend.url()], ""),
    ))
    .await;
    let (tp, trace, _) = client_context("01");
    assert_eq!(
        call(gw.port, "/web/status-404", &[("traceparent", &tp)])
            .await
            .0,
        404
    );
    let spans = collector.wait_trace(&trace).await;
    assert_eq!(spans.len(), 2, "{spans:#?}");
    let server = one(&spans, "GET /web/");
    assert_eq!(int_attr(server, "http.response.status_code"), Some(404));
    assert!(!is_error(server), "a 4xx is no server error: {server:?}");
    assert_eq!(str_attr(server, "error.type"), None);
    assert_eq!(str_attr(server, "hexgate.refusal"), None, "the backend's");
    let attempt = one(&spans, "GET");
    assert_eq!(attempt.kind, SpanKind::Client as i32);
    assert_eq!(
        hex(&attempt.span_id),
        backend.traceparent_for("/web/status-404").parent
    );
    assert_eq!(int_attr(attempt, "http.response.status_code"), Some(404));
    assert!(is_error(attempt), "a client span's 4xx: {attempt:?}");
    assert_eq!(str_attr(attempt, "error.type"), Some("404"));
    assert_eq!(
        str_attr(attempt, "hexgate.upstream.outcome"),
        Some("answered_4xx")
    );

    // Below 400 neither is an error.
    let (tp, trace, _) = client_context("01");
    assert_eq!(
        call(gw.port, "/web/status-302", &[("traceparent", &tp)])
            .await
            .0,
        302
    );
    let spans = collector.wait_trace(&trace).await;
    let attempt = one(&spans, "GET");
    assert!(!is_error(attempt), "{attempt:?}");
    assert_eq!(str_attr(attempt, "error.type"), None);
    assert_eq!(
        str_attr(attempt, "hexgate.upstream.outcome"),
        Some("answered")
    );
    assert!(!is_error(one(&spans, "GET /web/")));
}

/// A gRPC collector that answers 200 and then streams without end: the gateway reads a bounded
/// part of the answer (its memory stays flat), counts the spans as dropped, and serves
/// requests meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_collector_that_answers_without_end_costs_no_memory() {
    const MIB: u64 = 1024 * 1024;
    let backend = TraceBackend::start().await;
    // At most 256 MiB an answer: far past the bound below, and bounded even for a gateway
    // that would read it all.
    let flood = FloodCollector::start(256 * MIB, Duration::from_secs(10)).await;
    let gw = Gateway::start(&loopback_config(
        &tracing_block(&flood.url(), "  sampleRatio: 0\n"),
        &service("web", "/web/", &[&backend.url()], ""),
    ))
    .await;
    // Unsampled requests (ratio 0, no parent) export nothing: the gateway warms up.
    for i in 0..5 {
        assert_eq!(call(gw.port, &format!("/web/warm{i}"), &[]).await.0, 200);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(flood.requests.load(Ordering::Relaxed), 0);
    let before = gw.rss_kib();

    // Three sampled requests: six spans, exported to the flood.
    for i in 0..3 {
        let (tp, _, _) = client_context("01");
        assert_eq!(
            call(gw.port, &format!("/web/s{i}"), &[("traceparent", &tp)])
                .await
                .0,
            200
        );
    }
    let deadline = Instant::now() + Duration::from_secs(13);
    let mut peak = before;
    let mut i = 0;
    let m = loop {
        peak = peak.max(gw.rss_kib());
        let m = gw.metrics().await;
        if counter(&m, DROPPED) >= 6 {
            break m;
        }
        assert!(
            Instant::now() < deadline,
            "the spans never counted as dropped: {m}\n{}",
            gw.log()
        );
        // Requests are answered while the export runs.
        let t = Instant::now();
        assert_eq!(call(gw.port, &format!("/web/during{i}"), &[]).await.0, 200);
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        i += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    peak = peak.max(gw.rss_kib());
    assert_eq!(counter(&m, DROPPED), 6, "{m}");
    assert_eq!(counter(&m, EXPORTED), 0, "{m}");
    assert!(flood.requests.load(Ordering::Relaxed) >= 1);
    let sent = flood.sent.load(Ordering::Relaxed);
    assert!(
        sent > 64 * 1024,
        "the collector sent more than an answer needs: {sent}"
    );
    let growth = peak.saturating_sub(before);
    eprintln!("flooding collector: RSS {before} KiB, peak {peak} KiB, answer bytes sent {sent}");
    assert!(
        growth < 50 * 1024,
        "RSS grew by {growth} KiB ({before} KiB then {peak} KiB) for one export"
    );
    assert!(gw.log().contains("trace export failed"), "{}", gw.log());
    assert_eq!(call(gw.port, "/web/after", &[]).await.0, 200);
}

/// One request with method `method` and `fields` over a fresh HTTP/1.1 connection: its status
/// (the body `ok` when 200).
async fn call_method(port: u16, method: &str, path: &str, fields: &[(&str, &str)]) -> u16 {
    let mut b = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost");
    for (n, v) in fields {
        b = b.header(*n, *v);
    }
    let (status, _, body) = request(port, b.body(http_body_util::Empty::<Bytes>::new()).unwrap())
        .await
        .unwrap_or_else(|e| panic!("{path}: {e}"));
    assert!(status != 200 || body == "ok", "{path}: {status} {body}");
    status
}

/// A 30 KB method and a 30 KB user agent: the spans keep at most 1,024 bytes of each, and 300
/// such requests (with a short tracestate) queued behind a collector that never answers cost
/// the gateway little memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_methods_and_user_agents_are_clipped_and_queued_spans_stay_small() {
    const MAX: usize = 1024;
    let backend = TraceBackend::start().await;
    let svc = service("web", "/web/", &[&backend.url()], "");
    let method = "X".repeat(30_000);
    let agent = format!("otel-it/{}", "a".repeat(30_000 - 8));

    // What the spans hold, at a collector that answers.
    let collector = Collector::start(Wire::Http).await;
    let gw = Gateway::start(&loopback_config(&tracing_block(&collector.url(), ""), &svc)).await;
    let (tp, trace, _) = client_context("01");
    assert_eq!(
        call_method(
            gw.port,
            &method,
            "/web/long",
            &[("traceparent", &tp), ("user-agent", &agent)]
        )
        .await,
        200,
        "a 30 KB extension method is taken: {}",
        gw.log()
    );
    let spans = collector.wait_trace(&trace).await;
    assert_eq!(spans.len(), 2);
    for g in &spans {
        for a in &g.span.attributes {
            if let Some(AnyVal::StringValue(v)) = a.value.as_ref().and_then(|v| v.value.as_ref()) {
                assert!(
                    v.len() <= MAX,
                    "{} of {:?}: {} bytes",
                    a.key,
                    g.span.name,
                    v.len()
                );
            }
        }
    }
    let server = one(&spans, "HTTP /web/");
    assert_eq!(str_attr(server, "http.request.method"), Some("_OTHER"));
    assert!(
        str_attr(server, "http.request.method_original") == Some(&method[..MAX]),
        "the method's first 1,024 bytes"
    );
    assert!(
        str_attr(server, "user_agent.original") == Some(&agent[..MAX]),
        "the user agent's first 1,024 bytes"
    );
    let attempt = one(&spans, "HTTP");
    assert!(
        str_attr(attempt, "http.request.method_original") == Some(&method[..MAX]),
        "the attempt's method: its first 1,024 bytes"
    );
    drop(gw);

    // 300 such requests queued behind a collector that never answers.
    let silent = SilentCollector::start().await;
    let gw = Gateway::start(&loopback_config(
        &tracing_block(&format!("http://{}", silent.addr), ""),
        &svc,
    ))
    .await;
    let fields = |tp: &str| -> Vec<(String, String)> {
        vec![
            ("traceparent".into(), tp.to_string()),
            ("tracestate".into(), "k=v".into()),
            ("user-agent".into(), agent.clone()),
        ]
    };
    // Warm up, until an export hangs (everything after it waits in the queue).
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut i = 0;
    while silent.accepted.load(Ordering::Relaxed) == 0 || i < 5 {
        assert!(Instant::now() < deadline, "no export tried: {}", gw.log());
        let (tp, _, _) = client_context("01");
        let f = fields(&tp);
        let f: Vec<(&str, &str)> = f.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
        assert_eq!(
            call_method(gw.port, &method, &format!("/web/warm{i}"), &f).await,
            200
        );
        i += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let before = gw.rss_kib();
    let started = Instant::now();
    for i in 0..300 {
        let (tp, _, _) = client_context("01");
        let f = fields(&tp);
        let f: Vec<(&str, &str)> = f.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
        assert_eq!(
            call_method(gw.port, &method, &format!("/web/q{i}"), &f).await,
            200
        );
    }
    let after = gw.rss_kib();
    eprintln!(
        "300 queued requests: RSS {before} KiB then {after} KiB, in {:?}",
        started.elapsed()
    );
    // Measured: about 0 with the spans' values copied and clipped; about 51 MiB when each kept
    // its 30 KB method twice and, through its tracestate, hyper's whole read buffer.
    assert!(
        after.saturating_sub(before) < 25 * 1024,
        "RSS grew from {before} KiB to {after} KiB for 300 queued requests"
    );
    // Queued, not dropped (the hung export holds the exporter for 10 s).
    if started.elapsed() < Duration::from_secs(5) {
        let m = gw.metrics().await;
        assert_eq!(counter(&m, DROPPED), 0, "{m}");
    }
}
