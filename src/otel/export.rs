//! The span exporter: a bounded queue the request path never waits on, and one task that
//! takes what is queued every [`EXPORT_EVERY`], encodes it as an OTLP
//! `ExportTraceServiceRequest` ([`super::proto`]) and sends it to the collector,
//! OTLP/HTTP or OTLP/gRPC, each export within [`EXPORT_TIMEOUT`].
//!
//! A request hands its spans over with `try_send`: when the queue is full (the collector is
//! slow or down and the exports back up), they are dropped and counted
//! (`hexgate_tracing_dropped_spans_total`), as are the spans of an export that failed or timed
//! out; spans the collector accepted are counted in `hexgate_tracing_exported_spans_total`.
//! The task drains the queue on a timer rather than being woken by each request: a wake-up per
//! request costs more CPU than the request itself (measured for the access log's writer, which
//! works the same way).

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use http::{header, HeaderName, HeaderValue, Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::sync::{mpsc, oneshot};

use super::Finished;
use crate::config::{OtlpProtocol, Tracing};
use crate::httpc::Endpoint;
use crate::metrics::Registry;

/// Requests (each with its spans, four or so) the queue holds before new ones are dropped.
/// With [`EXPORT_EVERY`], the most a gateway can trace without dropping while the collector
/// keeps up: 163,840 requests a second. Measured: a queue of 4,096 drained every 200 ms (20,480
/// a second) dropped a fifth of the spans of a gateway serving 30,000 sampled requests a
/// second to a collector that answered at once.
pub const CAPACITY: usize = 8192;
/// How often the exporter takes what is queued (20 wake-ups a second; none per request).
pub const EXPORT_EVERY: Duration = Duration::from_millis(50);
/// Requests' spans per export request (at most).
pub const BATCH: usize = 1024;
/// The longest one export may take (OpenTelemetry's default `OTEL_EXPORTER_OTLP_TIMEOUT`).
pub const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);
/// The most of a gRPC collector's answer that is read.
pub const MAX_ANSWER: usize = 64 * 1024;
/// Export failures are logged at most this often.
pub const WARN_EVERY: Duration = Duration::from_secs(10);

/// Where a snapshot's spans go, and as which service.
pub struct Target {
    pub protocol: OtlpProtocol,
    /// The endpoint as the logs show it (credentials are refused in it at load).
    pub shown: String,
    pub path: String,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub service_name: String,
    /// OTLP/HTTP: the client (its TLS settings made once).
    http: Option<Endpoint>,
    /// OTLP/gRPC: `None` when the TLS settings could not be made: then nothing is sent (never
    /// in the clear).
    grpc: Option<Grpc>,
}

/// Where OTLP/gRPC calls go.
struct Grpc {
    host: String,
    port: u16,
    /// For `grpcs://`: TLS with ALPN h2.
    tls: Option<Arc<rustls::ClientConfig>>,
    /// The call's URI (scheme, authority, method path), made once.
    uri: String,
}

impl Target {
    pub fn of(t: &Tracing) -> Arc<Target> {
        let authority = crate::httpc::authority(&t.host, t.port);
        let grpc = |tls: Option<Arc<rustls::ClientConfig>>| Grpc {
            host: t.host.clone(),
            port: t.port,
            uri: format!(
                "{}://{authority}{}",
                if tls.is_some() { "https" } else { "http" },
                t.path
            ),
            tls,
        };
        let (http, grpc) = match t.protocol {
            OtlpProtocol::Http => (
                Endpoint::parse(
                    &format!("{}://{authority}", if t.tls { "https" } else { "http" }),
                    t.tls,
                    None,
                )
                .ok(),
                None,
            ),
            OtlpProtocol::Grpc if t.tls => (
                None,
                crate::httpc::tls_with_roots(None).ok().map(|c| {
                    let mut c = (*c).clone();
                    c.alpn_protocols = vec![b"h2".to_vec()];
                    grpc(Some(Arc::new(c)))
                }),
            ),
            OtlpProtocol::Grpc => (None, Some(grpc(None))),
        };
        Arc::new(Target {
            protocol: t.protocol,
            shown: crate::httpc::redact_url(&t.otlp_endpoint),
            path: t.path.clone(),
            // Checked at load.
            headers: t
                .headers
                .iter()
                .filter_map(|(k, v)| {
                    Some((
                        HeaderName::from_bytes(k.as_bytes()).ok()?,
                        HeaderValue::from_str(v).ok()?,
                    ))
                })
                .collect(),
            service_name: t.service_name.clone(),
            http,
            grpc,
        })
    }
}

/// Every target a snapshot has named, by the id spans carry: a request hands over a number, not
/// an `Arc` (whose count, touched by every worker and dropped on the exporter's thread, would
/// bounce between cores on each request). Targets are kept for the life of the process, one
/// per distinct `tracing` block ever loaded.
fn targets() -> &'static Mutex<Vec<(Tracing, Arc<Target>)>> {
    static T: OnceLock<Mutex<Vec<(Tracing, Arc<Target>)>>> = OnceLock::new();
    T.get_or_init(|| Mutex::new(Vec::new()))
}

/// The id of `t`'s target, made on first use (a reload that keeps the block keeps the id).
pub fn register(t: &Tracing) -> u32 {
    let mut all = match targets().lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    };
    if let Some(i) = all.iter().position(|(c, _)| c == t) {
        return i as u32;
    }
    all.push((t.clone(), Target::of(t)));
    (all.len() - 1) as u32
}

/// The target registered as `id`.
pub fn target(id: u32) -> Option<Arc<Target>> {
    let all = match targets().lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    };
    all.get(id as usize).map(|(_, t)| t.clone())
}

struct Queue {
    tx: mpsc::Sender<Finished>,
    rx: Mutex<Option<mpsc::Receiver<Finished>>>,
    control: mpsc::Sender<oneshot::Sender<()>>,
    control_rx: Mutex<Option<mpsc::Receiver<oneshot::Sender<()>>>>,
    metrics: OnceLock<Arc<Registry>>,
}

fn queue() -> &'static Queue {
    static Q: OnceLock<Queue> = OnceLock::new();
    Q.get_or_init(|| {
        let (tx, rx) = mpsc::channel(CAPACITY);
        let (control, control_rx) = mpsc::channel(4);
        Queue {
            tx,
            rx: Mutex::new(Some(rx)),
            control,
            control_rx: Mutex::new(Some(control_rx)),
            metrics: OnceLock::new(),
        }
    })
}

fn count(f: impl FnOnce(&Registry)) {
    if let Some(m) = queue().metrics.get() {
        f(m);
    }
}

/// Hands a request's spans to the exporter; never waits. A full queue drops and counts them.
pub fn send(f: Finished) {
    if let Err(e) = queue().tx.try_send(f) {
        let n = match &e {
            mpsc::error::TrySendError::Full(f) | mpsc::error::TrySendError::Closed(f) => f.spans,
        };
        count(|m| {
            m.tracing_dropped_spans
                .fetch_add(n as u64, Ordering::Relaxed);
        });
    }
}

/// Starts the exporter task (once per process; later calls do nothing), counting into
/// `metrics`.
pub fn start(metrics: Arc<Registry>) {
    let q = queue();
    let _ = q.metrics.set(metrics);
    fn take<T>(m: &Mutex<Option<T>>) -> Option<T> {
        match m.lock() {
            Ok(mut g) => g.take(),
            Err(p) => p.into_inner().take(),
        }
    }
    let (Some(rx), Some(control)) = (take(&q.rx), take(&q.control_rx)) else {
        return;
    };
    tokio::spawn(exporter(rx, control));
}

/// Exports what is queued now, waiting at most `within` (at shutdown).
pub async fn flush(within: Duration) {
    let (done, wait) = oneshot::channel();
    if queue().control.try_send(done).is_ok() {
        let _ = tokio::time::timeout(within, wait).await;
    }
}

async fn exporter(
    mut rx: mpsc::Receiver<Finished>,
    mut control: mpsc::Receiver<oneshot::Sender<()>>,
) {
    let mut tick = tokio::time::interval(EXPORT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_warning: Option<Instant> = None;
    loop {
        let flushed = tokio::select! {
            _ = tick.tick() => None,
            done = control.recv() => match done {
                Some(d) => Some(d),
                None => return,
            },
        };
        // A batch at a time, at once again while the queue holds a full batch more: what waits
        // outside the queue is one batch, and a busy gateway's spans leave as fast as the
        // collector takes them.
        loop {
            let mut items = Vec::with_capacity(BATCH);
            while items.len() < BATCH {
                match rx.try_recv() {
                    Ok(f) => items.push(f),
                    Err(_) => break,
                }
            }
            let full = items.len() == BATCH;
            // Requests grouped by target (in order; a reload changes it rarely).
            let mut rest = &items[..];
            while let Some(first) = rest.first() {
                let same = rest.iter().take_while(|f| f.target == first.target).count();
                let (batch, tail) = rest.split_at(same);
                export_batch(batch, &mut last_warning).await;
                rest = tail;
            }
            if !full {
                break;
            }
        }
        if let Some(done) = flushed {
            let _ = done.send(());
        }
    }
}

/// Exports one batch (one target's requests), counting its spans as exported or dropped.
async fn export_batch(batch: &[Finished], last_warning: &mut Option<Instant>) {
    let spans: usize = batch.iter().map(|f| f.spans).sum();
    let Some(target) = batch.first().and_then(|f| target(f.target)) else {
        count(|m| {
            m.tracing_dropped_spans
                .fetch_add(spans as u64, Ordering::Relaxed);
        });
        return;
    };
    let body = super::proto::encode(
        &super::proto::Names {
            service: &target.service_name,
            version: env!("CARGO_PKG_VERSION"),
        },
        batch,
    );
    let result = tokio::time::timeout(EXPORT_TIMEOUT, export(&target, body))
        .await
        .unwrap_or_else(|_| Err("timed out".into()));
    match result {
        Ok(()) => count(|m| {
            m.tracing_exported_spans
                .fetch_add(spans as u64, Ordering::Relaxed);
        }),
        Err(e) => {
            count(|m| {
                m.tracing_dropped_spans
                    .fetch_add(spans as u64, Ordering::Relaxed);
            });
            if last_warning.is_none_or(|t| t.elapsed() >= WARN_EVERY) {
                *last_warning = Some(Instant::now());
                tracing::warn!(collector = %target.shown, error = %e, spans, "trace export failed: spans dropped (logged at most every 10s)");
            }
        }
    }
}

/// `validate --connect`'s check: an export with no spans, which a collector accepts (an
/// OTLP/HTTP 2xx, a gRPC status 0) when it is there and takes OTLP.
pub async fn probe(t: &Tracing) -> Result<String, String> {
    let target = Target::of(t);
    let empty = super::proto::encode(
        &super::proto::Names {
            service: &target.service_name,
            version: env!("CARGO_PKG_VERSION"),
        },
        &[],
    );
    export(&target, empty)
        .await
        .map(|()| "accepted an export with no spans".into())
}

/// Sends one encoded request to the collector.
async fn export(target: &Target, body: Bytes) -> Result<(), String> {
    match (&target.http, &target.grpc) {
        (Some(endpoint), _) => {
            let headers: Vec<(&str, &str)> =
                std::iter::once(("content-type", "application/x-protobuf"))
                    .chain(
                        target
                            .headers
                            .iter()
                            .filter_map(|(k, v)| Some((k.as_str(), v.to_str().ok()?))),
                    )
                    .collect();
            let (status, _, _) = endpoint
                .send(
                    Method::POST,
                    &target.path,
                    &headers,
                    Some(body),
                    EXPORT_TIMEOUT,
                )
                .await
                .map_err(|e| e.to_string())?;
            if status.is_success() {
                Ok(())
            } else {
                Err(format!("the collector answered {status}"))
            }
        }
        (None, Some(to)) => grpc_export(target, to, body).await,
        (None, None) => Err("no usable endpoint (its TLS settings could not be made)".into()),
    }
}

/// One unary OTLP/gRPC call over a new HTTP/2 connection: the message in gRPC's length-prefixed
/// framing, the answer's `grpc-status` (in the head of a trailers-only answer, else in the
/// trailers) must be 0.
async fn grpc_export(target: &Target, to: &Grpc, body: Bytes) -> Result<(), String> {
    let Grpc {
        host,
        port,
        tls,
        uri,
    } = to;
    let (host, port) = (host.as_str(), *port);
    let mut framed = BytesMut::with_capacity(5 + body.len());
    framed.put_u8(0);
    framed.put_u32(body.len() as u32);
    framed.extend_from_slice(&body);
    let mut req = Request::builder()
        .method(Method::POST)
        .uri(uri.as_str())
        .header(header::CONTENT_TYPE, "application/grpc")
        .header(header::TE, "trailers")
        .header(header::USER_AGENT, "hexgate");
    for (k, v) in &target.headers {
        req = req.header(k, v);
    }
    let req = req
        .body(Full::new(framed.freeze()))
        .map_err(|e| e.to_string())?;
    let tcp = tokio::net::TcpStream::connect((host, port))
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let resp = match tls {
        Some(cfg) => {
            let name = rustls_pki_types::ServerName::try_from(host.to_string())
                .map_err(|e| e.to_string())?;
            let io = tokio_rustls::TlsConnector::from(cfg.clone())
                .connect(name, tcp)
                .await
                .map_err(|e| format!("TLS: {e}"))?;
            h2_call(TokioIo::new(io), req).await?
        }
        None => h2_call(TokioIo::new(tcp), req).await?,
    };
    let (parts, body) = resp.into_parts();
    if parts.status != http::StatusCode::OK {
        return Err(format!("the collector answered HTTP {}", parts.status));
    }
    let head_status = parts.headers.get("grpc-status").cloned();
    // An `ExportTraceServiceResponse` is a few bytes: a collector that sends more is not read
    // further (the answer fails, the spans count as dropped).
    let collected = http_body_util::Limited::new(body, MAX_ANSWER)
        .collect()
        .await
        .map_err(|e| e.to_string())?;
    let status = head_status.or_else(|| {
        collected
            .trailers()
            .and_then(|t| t.get("grpc-status").cloned())
    });
    match status.as_ref().map(|s| s.as_bytes()) {
        Some(b"0") => Ok(()),
        Some(s) => Err(format!(
            "the collector answered grpc-status {}",
            String::from_utf8_lossy(s)
        )),
        None => Err("the collector's answer carried no grpc-status".into()),
    }
}

async fn h2_call<I>(
    io: I,
    req: Request<Full<Bytes>>,
) -> Result<http::Response<hyper::body::Incoming>, String>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
        .await
        .map_err(|e| format!("HTTP/2: {e}"))?;
    tokio::spawn(conn);
    sender.send_request(req).await.map_err(|e| e.to_string())
}
