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
use tokio::net::TcpListener;

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
/// in `/status-NNN`) and records the
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
    // A tracestate over 512 bytes is dropped, the parent kept; one of 512 is passed on.
    let (tp, long_trace, _) = client_context("01");
    let long = format!("k={}", "x".repeat(511));
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
    let fits = format!("k={}", "x".repeat(510));
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
    let gw = Gateway::start(&loopback_config(
        &format!(
            "{}{}",
            redis_top(redis.port, "closed"),
            tracing_block(&collector.url(), "")
        ),
        &services,
    ))
    .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while redis.calls("evalsha") == 0 {
        call(gw.port, "/open/warm", &[]).await;
        assert!(Instant::now() < deadline, "Redis never used: {}", gw.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

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
    let gw = Gateway::start(&loopback_config(
        &format!(
            "{}{}",
            redis_top(redis.port, "open"),
            tracing_block(&collector.url(), "")
        ),
        &services,
    ))
    .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while redis.calls("evalsha") == 0 {
        call(gw.port, "/open/warm2", &[]).await;
        assert!(Instant::now() < deadline, "Redis never used: {}", gw.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
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
