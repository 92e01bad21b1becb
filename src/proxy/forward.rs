//! Steps 8 and 9 of the pipeline: pick a backend, send, retry; then the response policy.
//!
//! Who failed decides what happens: a failure the backend caused counts towards its passive
//! ejection (`upstream::record_failure`, through [`Attempts::failed`], the one place failures
//! are recorded); one the client caused (a body that stopped arriving, broke or went over the
//! limit, a client that went away) is answered as the client's fault and never counts against
//! the backend, so no client can eject a shared backend. A backend is late only when it has not
//! answered `timeouts.request` after the whole request, body included, was sent
//! (`within_deadline`): a slow upload never spends the backend's time.
//!
//! Retries (`retryOn`, within `retries`, the request's deadline and the route's
//! `retryBudget`) go to another backend: a request never written (`connect-failure`, any
//! method); after it was sent (`reset`, a 500/502/503/504 the backend answered) only a safe
//! one: an idempotent method, no body or one still whole in the replay copy (64 KiB), neither
//! an upgrade nor gRPC. A request resent on a stale pooled connection or refused unprocessed
//! by an HTTP/2 backend is no retry: it is sent again without counting. With a
//! `circuitBreaker`, 5xx answers count towards ejection too (`Attempts::answered_5xx`), at
//! most one per backend per client request and never one that may be the client's doing;
//! without one they count for nothing, and they never reset a streak (only an answer below
//! 500 does).

use std::borrow::Cow;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{header, HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use super::outgoing::{check_switch, hop_by_hop_present, strip_hop_by_hop, Outgoing, Upgrade};
use super::retry::Why;
use crate::body::{Body, BodyFailure, BodyProgress, BodyState};
use crate::error::GatewayError;
use crate::otel::{Kind, Trace, Val};
use crate::snapshot::{ServiceRt, Snapshot};
use crate::upstream::Pool;
use crate::upstream::{Backend, ConnectError, Failure, H2Failure, PoolReturn, Sender};

/// The client's fault, when an upstream send failed because the client's body went over
/// its limit (413), stopped arriving (408) or could not be read (400: bad chunked framing, a
/// truncated body, a client that went away).
fn client_body_error(err: &hyper::Error) -> Option<GatewayError> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        match e.downcast_ref() {
            Some(crate::body::BodyError::TooLarge(limit)) => {
                return Some(GatewayError::BodyTooLarge(*limit))
            }
            Some(crate::body::BodyError::Stalled(_)) => return Some(GatewayError::RequestTimeout),
            Some(crate::body::BodyError::Hyper(h)) => {
                return Some(GatewayError::BadBody(h.to_string()))
            }
            None => cur = e.source(),
        }
    }
    None
}

/// The client's fault, read from the body's progress when the exchange's error does not carry
/// it (an HTTP/2 connection resets the stream of a body that failed and reports the reset).
fn body_failure(progress: Option<&BodyProgress>, err: &hyper::Error) -> Option<GatewayError> {
    Some(match progress?.failure()? {
        BodyFailure::TooLarge(limit) => GatewayError::BodyTooLarge(limit),
        BodyFailure::Stalled => GatewayError::RequestTimeout,
        BodyFailure::Broken => GatewayError::BadBody(err.to_string()),
    })
}

/// Whether the upstream was waiting on the client's body when the exchange failed: then the
/// failure is not evidence against the backend (it may have given up on a slow client).
fn awaiting_client(progress: Option<&BodyProgress>) -> bool {
    progress.is_some_and(|p| matches!(p.state(), BodyState::AwaitingClient | BodyState::Failed))
}

/// Whether a backend's answer may be the client's doing: its body failed (broke, stalled,
/// went over the limit, the client went away) or was still awaited from the client. Then a
/// 5xx is not counted against the backend. A client that goes away after its body is whole
/// (say while a retry is waiting for its answer) drops this request's future with it: no later
/// attempt's answer is ever read, so none is counted.
fn client_at_fault(progress: Option<&BodyProgress>) -> bool {
    // A failed body is in state Failed (`BodyProgress::fail`).
    awaiting_client(progress)
}

/// Who is late when a response has not come by its deadline.
#[derive(Debug)]
enum Late {
    /// The client's body was still arriving (a trickle that stays under the body-idle
    /// timeout): 408, nothing counted against the backend.
    Client,
    /// The whole request was sent `timeouts.request` ago: 504, a backend failure.
    Backend,
}

/// Awaits `send` (a request going upstream, body included) until `deadline`, the end of
/// `timeouts.request` counted from forwarding. A client may spend most of that uploading, so
/// time running out is the backend's fault only once the backend has had `request` itself
/// after the body was complete: when the body completed at `c` and `c + request` is later than
/// `deadline`, the wait is extended once, to `c + request`. A body still incomplete at
/// `deadline` is the client's fault.
///
/// The bound a client sees: its upload must end within `request` of forwarding (else 408,
/// each gap also bounded by the body-idle timeout, `headerRead`), and the backend then has at
/// most `request` more, so a request is held at most twice `timeouts.request` after forwarding.
async fn within_deadline<F: std::future::Future>(
    send: F,
    deadline: Instant,
    request: std::time::Duration,
    progress: Option<&BodyProgress>,
) -> Result<F::Output, Late> {
    // One timer, reset for the extension (two `timeout`s would each keep a timer in this
    // future, which every request moves around).
    let send = std::pin::pin!(send);
    let mut send = send;
    let sleep = tokio::time::sleep_until(deadline.into());
    let mut sleep = std::pin::pin!(sleep);
    let mut extended = false;
    loop {
        tokio::select! {
            biased;
            out = &mut send => return Ok(out),
            () = &mut sleep => {
                if extended {
                    return Err(Late::Backend);
                }
                if awaiting_client(progress) {
                    return Err(Late::Client);
                }
                // No body (`progress` None: the request was whole when forwarded), a body the
                // backend reads too slowly (Flowing), or a body that completed early enough:
                // the deadline stands.
                let later = progress
                    .and_then(BodyProgress::completed_at)
                    .map(|c| c + request)
                    .filter(|e| *e > deadline);
                match later {
                    Some(e) => {
                        sleep.as_mut().reset(e.into());
                        extended = true;
                    }
                    None => return Err(Late::Backend),
                }
            }
        }
    }
}

/// How long an HTTP/2 exchange may run on its own after its client has gone: until the latest
/// moment the wait for its response could still end (`within_deadline` may extend once).
fn send_deadline(
    deadline: Instant,
    request: Duration,
    client_deadline: bool,
) -> tokio::time::Instant {
    let extra = if client_deadline {
        Duration::ZERO
    } else {
        request
    };
    tokio::time::Instant::from_std(deadline + extra)
}

/// Counts a request in flight on a backend for least-request balancing.
struct InFlight(Arc<Backend>);

impl InFlight {
    fn new(b: &Arc<Backend>) -> Self {
        b.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(b.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What may follow an attempt that did not give the client its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    /// Another attempt, on another backend (counted as a retry).
    Retry,
    /// None: no attempt left, the route does not retry this, the deadline has passed or the
    /// budget is spent.
    Stop,
    /// Allowed, but no other backend is healthy: nothing counted; the pick that follows fails.
    Nowhere,
}

/// The attempts of one request: which backends failed, and the one place a failure is
/// recorded (passive health, the service's error count by reason, the retry budget).
struct Attempts<'a> {
    snap: &'a Snapshot,
    svc: &'a ServiceRt,
    /// The pool this request is served from: the route's, or its split's.
    pool: &'a Pool,
    /// Backends (by pool index, first 64) that failed this request: not picked again.
    tried: u64,
    /// Attempts that failed or answered a status that is retried.
    failures: usize,
    max: usize,
    deadline: Instant,
    /// The last TLS failure: when every attempt failed, the client is told that (502), not a
    /// generic "could not connect" (503).
    tls: Option<GatewayError>,
    /// The backends (by address of their `Backend`) a 5xx of this request was counted against,
    /// so that none counts twice whatever the pool's indexes (a pool of more than 64, members
    /// that changed under a discovery update); `fives` of them are set. Beyond its length a
    /// request counts no more 5xx: fewer counts, never more. Only written on a breaker's route.
    counted: [usize; 4],
    /// Retries made for this request (the access log's `retries`).
    retried: u32,
    fives: u8,
    /// The request's trace: each attempt is a client span of it.
    trace: Option<&'a Trace>,
    /// The attempt being made, while its span is recorded.
    current: Option<AttemptSpan>,
    /// Attempts begun (a span's `http.request.resend_count`).
    begun: u32,
}

/// An upstream attempt's span, recorded when the next attempt begins or the request ends.
struct AttemptSpan {
    timer: crate::otel::Timer,
    backend: Arc<Backend>,
    method: http::Method,
    resend: u32,
    status: Option<u16>,
    error: Option<String>,
}

impl Drop for Attempts<'_> {
    fn drop(&mut self) {
        self.close();
    }
}

impl<'a> Attempts<'a> {
    fn new(
        snap: &'a Snapshot,
        svc: &'a ServiceRt,
        pool: &'a Pool,
        deadline: Instant,
        trace: Option<&'a Trace>,
    ) -> Self {
        Attempts {
            snap,
            svc,
            pool,
            tried: 0,
            failures: 0,
            max: svc.retries as usize + 1,
            deadline,
            tls: None,
            counted: [0; 4],
            retried: 0,
            fives: 0,
            trace,
            current: None,
            begun: 0,
        }
    }

    /// An attempt on `backend` begins: the previous one's span ends, this one's starts. The
    /// span id a `traceparent` upstream names: the attempt's, or the server span's when the
    /// request is not recorded (0 without tracing).
    fn begin(&mut self, backend: &Arc<Backend>, method: &http::Method) -> u64 {
        self.close();
        let Some(trace) = self.trace else { return 0 };
        let resend = self.begun;
        self.begun += 1;
        match trace.start() {
            Some(timer) => {
                let id = timer.span_id;
                self.current = Some(AttemptSpan {
                    timer,
                    backend: backend.clone(),
                    method: method.clone(),
                    resend,
                    status: None,
                    error: None,
                });
                id
            }
            None => trace.span_id,
        }
    }

    /// The attempt's answer (its status).
    fn answered(&mut self, status: u16) {
        if let Some(a) = &mut self.current {
            a.status = Some(status);
        }
    }

    /// Ends the current attempt's span: its backend, resend count, status or failure.
    fn close(&mut self) {
        let (Some(a), Some(trace)) = (self.current.take(), self.trace) else {
            return;
        };
        let AttemptSpan {
            timer,
            backend,
            method: m,
            resend,
            status,
            error: failure,
        } = a;
        let mut attrs: Vec<(&'static str, Val<'_>)> = Vec::with_capacity(8);
        let method = crate::otel::known_method(&m);
        attrs.push(("http.request.method", Val::from(method.unwrap_or("_OTHER"))));
        if method.is_none() {
            attrs.push((
                "http.request.method_original",
                Val::from(crate::otel::clip(m.as_str())),
            ));
        }
        let (host, port) = match backend.authority.rsplit_once(':') {
            Some((h, p)) => (h, p.parse::<i64>().ok()),
            None => (backend.authority.as_str(), None),
        };
        attrs.push(("server.address", Val::from(host.trim_matches(['[', ']']))));
        if let Some(p) = port {
            attrs.push(("server.port", Val::Int(p)));
        }
        if resend > 0 {
            attrs.push(("http.request.resend_count", Val::Int(i64::from(resend))));
        }
        let error = match (status, &failure) {
            (Some(s), _) => {
                attrs.push(("http.response.status_code", Val::Int(i64::from(s))));
                // A client span's 4xx is an error too (OpenTelemetry's HTTP conventions).
                (s >= 400).then(|| {
                    attrs.push(("error.type", Val::from(s.to_string())));
                    Cow::Owned(format!("HTTP {s}"))
                })
            }
            (None, Some(reason)) => {
                attrs.push(("error.type", Val::from(reason.as_str())));
                Some(Cow::Borrowed(reason.as_str()))
            }
            (None, None) => {
                attrs.push(("error.type", Val::from("no_response")));
                Some(Cow::Borrowed("no response"))
            }
        };
        attrs.push((
            "hexgate.upstream.outcome",
            Val::from(match status {
                Some(s) if s >= 500 => "answered_5xx",
                Some(s) if s >= 400 => "answered_4xx",
                Some(_) => "answered",
                None => "failed",
            }),
        ));
        trace.end(
            timer,
            None,
            method.unwrap_or("HTTP"),
            Kind::Client,
            attrs,
            error,
        );
    }

    /// The next backend to try, or why there is none.
    fn pick(&mut self) -> Result<(usize, Arc<Backend>), GatewayError> {
        match self.pool.pick(self.tried) {
            Some(p) => Ok(p),
            None => Err(self.exhausted()),
        }
    }

    /// Why the request failed when no attempt is left. With no backend healthy and none
    /// tried, a TLS failure the health checks found is the answer (502 with its reason), not
    /// a bare 503: the operator sees which certificate is wrong.
    fn exhausted(&mut self) -> GatewayError {
        if let Some(e) = self.tls.take() {
            return e;
        }
        if self.failures > 0 {
            return GatewayError::ConnectFailed;
        }
        let members = self.pool.members();
        match members.backends.iter().find_map(|b| b.tls_failure()) {
            Some((reason, detail)) => {
                tracing::warn!(service = %self.svc.name, reason, detail, "no healthy backend: its health checks fail TLS");
                self.errored(reason);
                GatewayError::UpstreamTls { reason, detail }
            }
            None => GatewayError::NoHealthyBackend,
        }
    }

    /// Every pool of the snapshot with the share of it passive ejection may take out (its
    /// route's `maxEjectedPercent`, half without a circuit breaker).
    fn pools(&self) -> impl Iterator<Item = (&'a Pool, u32)> + 'a {
        self.snap.services.iter().flat_map(|s| {
            let percent = s.retry.max_ejected_percent();
            s.pools().map(move |p| (&**p, percent))
        })
    }

    /// A failure `backend` caused: counted against it (its passive health or the route's
    /// circuit breaker, weighed against every pool of the snapshot, see
    /// `upstream::record_failure`) and under `reason`; the backend is not tried again.
    fn failed(&mut self, idx: usize, backend: &Backend, reason: &str) {
        crate::upstream::record_failure(
            backend,
            Failure::Gateway,
            self.svc.retry.breaker.as_ref(),
            self.pools(),
        );
        self.errored(reason);
        self.attempted(idx);
    }

    /// A 5xx (500-599, 500 included: Envoy's `consecutive_5xx` counts every 5xx, and so does
    /// `consecutive5xx`) the backend answered, on a route with a circuit breaker: counted
    /// towards its ejection (never without one: see `send`), at most once per backend per
    /// client request. A request's attempts never go to a backend twice (`tried`), but the
    /// count does not rely on it. The client-fault rule is the caller's (`client_at_fault`).
    fn answered_5xx(&mut self, backend: &Arc<Backend>) {
        let key = Arc::as_ptr(backend) as usize;
        let seen = &self.counted[..usize::from(self.fives)];
        if seen.contains(&key) || usize::from(self.fives) == self.counted.len() {
            return;
        }
        self.counted[usize::from(self.fives)] = key;
        self.fives += 1;
        crate::upstream::record_failure(
            backend,
            Failure::Status,
            self.svc.retry.breaker.as_ref(),
            self.pools(),
        );
    }

    /// An attempt spent without the client's answer: the backend is not tried again.
    fn attempted(&mut self, idx: usize) {
        self.failures += 1;
        if idx < 64 {
            self.tried |= 1 << idx;
        }
    }

    /// Whether every attempt `retries` allows is spent.
    fn spent(&self) -> bool {
        self.failures >= self.max
    }

    /// Whether the request goes to another backend after an attempt that met `why`: an
    /// attempt left, the deadline not passed, a healthy backend not yet tried, and room in the
    /// route's budget. The caller has checked that `retryOn` names `why` and that the request
    /// is safe to send again. Counts the retry, or the budget's refusal.
    fn retry(&mut self, why: Why) -> Next {
        if self.spent() || Instant::now() >= self.deadline {
            return Next::Stop;
        }
        if !self.pool.any_usable(self.tried) {
            return Next::Nowhere;
        }
        if let Some(budget) = &self.svc.retry.budget {
            if !budget.try_retry() {
                self.svc.metrics.retry_budget_exhausted();
                return Next::Stop;
            }
        }
        self.svc.metrics.retry(why.reason());
        self.retried += 1;
        Next::Retry
    }

    /// A member that cannot take this request (HTTP/1.1 only, for gRPC): not picked again,
    /// nothing counted.
    fn skip(&mut self, idx: usize) {
        if idx < 64 {
            self.tried |= 1 << idx;
        }
    }

    /// An upstream error that is no evidence against the backend (a stale pooled connection,
    /// a backend that gave up on a slow client): counted for the service only.
    fn errored(&mut self, reason: &str) {
        self.svc.metrics.upstream_error(reason);
        if let Some(a) = &mut self.current {
            a.error.get_or_insert_with(|| reason.to_string());
        }
    }
}

/// The TLS failure in an exchange's error, if it is one (an alert the backend sent after the
/// handshake: a client certificate refused or missing).
fn tls_failure(err: &hyper::Error) -> Option<GatewayError> {
    crate::upstream::tls_reason(err).map(|reason| GatewayError::UpstreamTls {
        reason,
        detail: err.to_string(),
    })
}

/// The request as it was before it was shaped for an HTTP/2 connection, to undo that when it
/// comes back unsent and goes to another backend.
struct Unshaped {
    uri: http::Uri,
    host: Option<HeaderValue>,
    version: http::Version,
}

impl Unshaped {
    fn take(req: &Request<Body>) -> Self {
        Unshaped {
            uri: req.uri().clone(),
            host: req.headers().get(header::HOST).cloned(),
            version: req.version(),
        }
    }

    fn restore(self, req: &mut Request<Body>) {
        *req.uri_mut() = self.uri;
        *req.version_mut() = self.version;
        if let Some(h) = self.host {
            req.headers_mut().insert(header::HOST, h);
        }
    }
}

/// A request sent again from the copy of its head and `body`.
fn rebuild(
    (method, uri, headers): (http::Method, http::Uri, http::HeaderMap),
    body: Body,
) -> Request<Body> {
    let mut r = Request::new(body);
    *r.method_mut() = method;
    *r.uri_mut() = uri;
    *r.headers_mut() = headers;
    r
}

static TE: http::HeaderName = http::HeaderName::from_static("te");

/// The body to send a request again with, when it is safe to: none, or the whole body kept
/// in its replay copy (complete, at most 64 KiB, no trailers).
fn resend_body(progress: Option<&BodyProgress>) -> Option<Body> {
    match progress {
        None => Some(Body::Empty),
        Some(p) => p.replay().map(Body::full),
    }
}

/// Lets go of an answer that is not passed on (a retried status): its connection goes back to
/// the pool if the body is already over, else it is closed with it (HTTP/2: the stream reset).
fn discard(resp: Response<Incoming>, backend: &Arc<Backend>, sender: Sender) {
    if let Sender::Http1(s) = sender {
        if http_body::Body::is_end_stream(resp.body()) {
            PoolReturn::new(backend.clone(), s).give_back();
        }
    }
}

/// Sends `out` to a backend of its service (see [`send`]); counts the answer of a split.
pub async fn forward(
    snap: &Snapshot,
    out: Outgoing,
    trace: Option<&Trace>,
) -> Result<Response<Body>, GatewayError> {
    let Some(counts) = out
        .split
        .and_then(|i| out.service.splits.get(i))
        .map(|s| s.metrics.clone())
    else {
        return send(snap, out, trace).await;
    };
    let result = send(snap, out, trace).await;
    counts.count(match &result {
        Ok(resp) => resp.status().as_u16(),
        Err(e) => e.status().as_u16(),
    });
    result
}

/// Sends `out` to a backend of its service, retrying on another backend what `retryOn`
/// allows (a request never written, a safe request after a reset or a retried status), within
/// `timeouts.request` (or a gRPC request's shorter `grpc-timeout`).
async fn send(
    snap: &Snapshot,
    out: Outgoing,
    trace: Option<&Trace>,
) -> Result<Response<Body>, GatewayError> {
    let Outgoing {
        service,
        mut req,
        progress,
        upgrade,
        host_per_backend,
        replayable,
        grpc,
        pool,
        split: _,
    } = out;
    let svc = &*service;
    let request_timeout = match grpc.and_then(|g| g.deadline) {
        Some(d) => d.min(svc.timeouts.request),
        None => svc.timeouts.request,
    };
    // A client's gRPC deadline shorter than the route's is the client's to run out of: never a
    // failure of the backend, never stretched for a slow body.
    let client_deadline = request_timeout < svc.timeouts.request;
    let deadline = Instant::now() + request_timeout;
    let mut attempts = Attempts::new(snap, svc, &pool, deadline, trace);
    if let Some(budget) = &svc.retry.budget {
        budget.request();
    }
    // Whether the request may be sent again after it was sent (a reset, a retried status):
    // then each attempt keeps a copy of its head.
    let resendable = svc.retry.after_sending()
        && upgrade.is_none()
        && grpc.is_none()
        && req.method().is_idempotent();
    if grpc.is_some() && !pool.members().backends.iter().any(|b| b.may_speak_http2()) {
        tracing::warn!(service = %svc.name, "a gRPC request on a route whose backends speak HTTP/1.1 only");
        attempts.errored("grpc_needs_http2");
        return Err(GatewayError::GrpcNeedsHttp2);
    }
    // Stale pooled connections are retried without counting; this bounds the loop regardless.
    for _ in 0..(attempts.max + pool.len() + 8) {
        let (idx, backend) = attempts.pick()?;
        if grpc.is_some() && !backend.may_speak_http2() {
            // A mixed pool: this member cannot carry gRPC; another may.
            attempts.skip(idx);
            continue;
        }
        let _in_flight = InFlight::new(&backend);
        let span_id = attempts.begin(&backend, req.method());
        if let Some(t) = trace {
            // Each attempt names its own span as the backend's parent.
            t.inject(req.headers_mut(), span_id);
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        let connect_timeout = svc.timeouts.connect.min(remaining);
        let cut_by_client = client_deadline && remaining < svc.timeouts.connect;
        let (mut sender, reused) = match backend.checkout(connect_timeout, upgrade.is_some()).await
        {
            Ok(s) => s,
            Err(ConnectError::Timeout(_)) if cut_by_client => {
                return Err(GatewayError::DeadlineExceeded);
            }
            Err(e) => {
                tracing::debug!(backend = %backend.addr, error = %e, "connect failed");
                if let ConnectError::Tls { reason, .. } = &e {
                    tracing::warn!(backend = %backend.addr, reason, error = %e, "upstream TLS failure");
                    attempts.tls = Some(GatewayError::UpstreamTls {
                        reason,
                        detail: e.to_string(),
                    });
                }
                attempts.failed(idx, &backend, e.reason());
                if attempts.spent() {
                    return Err(attempts.exhausted());
                }
                if Instant::now() >= deadline {
                    return Err(GatewayError::UpstreamTimeout);
                }
                if !svc.retry.connect || attempts.retry(Why::ConnectFailure) == Next::Stop {
                    return Err(attempts.exhausted());
                }
                continue;
            }
        };
        if upgrade.is_some() && sender.is_http2() {
            return Err(GatewayError::BadUpgrade(
                "the backend speaks HTTP/2: upgrades are tunnelled to HTTP/1.1 backends only",
            ));
        }
        if grpc.is_some() && !sender.is_http2() {
            // An `https://` backend that chose HTTP/1.1 by ALPN.
            if let Sender::Http1(s) = sender {
                PoolReturn::new(backend.clone(), s).give_back();
            }
            tracing::warn!(service = %svc.name, backend = %backend.addr, "a gRPC request to a backend that chose HTTP/1.1 by ALPN");
            attempts.skip(idx);
            continue;
        }
        if host_per_backend {
            // A retry overwrites the previous backend's value.
            match HeaderValue::from_str(&backend.authority) {
                Ok(h) => {
                    req.headers_mut().insert(header::HOST, h);
                }
                Err(_) => {
                    req.headers_mut().remove(header::HOST);
                }
            }
        }
        // A copy of the head to send the request again: an idempotent request without a body
        // after a broken connection, any request an HTTP/2 backend did not process, a safe
        // request on a route that retries after sending.
        let replay = (replayable || sender.is_http2() || resendable).then(|| {
            (
                req.method().clone(),
                req.uri().clone(),
                req.headers().clone(),
            )
        });
        let unshaped = sender.is_http2().then(|| Unshaped::take(&req));
        if sender.is_http2() {
            backend.for_http2(&mut req);
            if grpc.is_some() {
                // gRPC servers expect `te: trailers` (the only TE value HTTP/2 allows).
                req.headers_mut()
                    .insert(TE.clone(), HeaderValue::from_static("trailers"));
            }
        }
        let sent_at = Instant::now();
        let result = within_deadline(
            sender.try_send_request(
                req,
                send_deadline(deadline, request_timeout, client_deadline),
            ),
            deadline,
            // The wait is not extended past a client's own deadline.
            if client_deadline {
                Duration::ZERO
            } else {
                request_timeout
            },
            progress.as_deref(),
        )
        .await;
        let resp = match result {
            Err(Late::Client) if grpc.is_some() => {
                // A gRPC deadline is the whole call's, however the time was spent.
                return Err(GatewayError::DeadlineExceeded);
            }
            Err(Late::Client) => {
                tracing::debug!(backend = %backend.addr, "request timed out waiting on the client's body");
                return Err(GatewayError::RequestTimeout);
            }
            Err(Late::Backend) if client_deadline => {
                // The client's `grpc-timeout` ran out first: its deadline, not the backend's
                // fault.
                return Err(GatewayError::DeadlineExceeded);
            }
            Err(Late::Backend) => {
                // No retry: the time is spent.
                attempts.failed(idx, &backend, "response_timeout");
                return Err(GatewayError::UpstreamTimeout);
            }
            Ok(Ok(resp)) => resp,
            Ok(Err(mut e)) => {
                if let Some(mut unsent) = e.take_message() {
                    // Never written: safe to retry, on another backend unless the connection
                    // was a stale pooled one.
                    backend.drop_shared_h2(&sender);
                    if let Some(u) = unshaped {
                        u.restore(&mut unsent);
                    }
                    req = unsent;
                    if !reused {
                        attempts.failed(idx, &backend, "connection_error");
                        if !svc.retry.connect || attempts.retry(Why::ConnectFailure) == Next::Stop {
                            return Err(attempts.exhausted());
                        }
                    }
                    continue;
                }
                let err = e.into_error();
                if let Some(client_fault) =
                    client_body_error(&err).or_else(|| body_failure(progress.as_deref(), &err))
                {
                    // The client's body failed: the backend and its connection are fine.
                    return Err(client_fault);
                }
                if awaiting_client(progress.as_deref()) {
                    // The backend gave up while the client was still sending (say its own body
                    // timeout fired): no evidence the backend is unwell.
                    tracing::debug!(backend = %backend.addr, error = %err, "upstream failed while waiting on the client's body");
                    attempts.errored("connection_error");
                    return Err(GatewayError::Upstream(err.to_string()));
                }
                if let Some(tls) = tls_failure(&err) {
                    if let GatewayError::UpstreamTls { reason, .. } = &tls {
                        tracing::warn!(backend = %backend.addr, reason, error = %err, "upstream TLS failure");
                        attempts.failed(idx, &backend, reason);
                    }
                    return Err(tls);
                }
                let h2 = if sender.is_http2() {
                    crate::upstream::h2_failure(&err)
                } else {
                    None
                };
                match h2 {
                    Some(H2Failure::StreamReset) => {
                        // One stream refused (a header the backend will not take, a method it
                        // does not serve): no sign the backend or the connection is unwell.
                        tracing::debug!(backend = %backend.addr, error = %err, "the backend reset the stream");
                        attempts.errored("stream_reset");
                        // With `reset`, a safe request goes to another backend (the reset is
                        // still not counted against this one).
                        let again = (svc.retry.reset && resendable)
                            .then(|| resend_body(progress.as_deref()))
                            .flatten();
                        if let (Some(head), Some(body)) = (replay, again) {
                            attempts.attempted(idx);
                            if attempts.retry(Why::Reset) == Next::Retry {
                                req = rebuild(head, body);
                                continue;
                            }
                        }
                        return Err(GatewayError::Upstream(
                            "the backend reset the stream".into(),
                        ));
                    }
                    Some(H2Failure::Unprocessed) => {
                        // Not processed (a GOAWAY that raced the request, REFUSED_STREAM): sent
                        // again on another connection if the request can be rebuilt, never
                        // counted against the backend.
                        backend.drop_shared_h2(&sender);
                        attempts.errored("connection_error");
                        let body = match progress.as_deref() {
                            None => Some(Body::Empty),
                            Some(p) => p.replay().map(Body::full),
                        };
                        match (replay, body) {
                            (Some(head), Some(body)) => {
                                req = rebuild(head, body);
                                continue;
                            }
                            _ => return Err(GatewayError::Upstream(err.to_string())),
                        }
                    }
                    Some(H2Failure::Connection) | None => {}
                }
                backend.drop_shared_h2(&sender);
                if reused {
                    // A pooled connection the backend had closed: an idempotent request
                    // without a body is sent again, not counted as a retry.
                    attempts.errored("connection_error");
                    match replay {
                        Some(head) if replayable => {
                            req = rebuild(head, Body::Empty);
                            continue;
                        }
                        _ => return Err(GatewayError::Upstream(err.to_string())),
                    }
                }
                attempts.failed(idx, &backend, "connection_error");
                // The connection closed before a response head: an idempotent request without
                // a body is sent again under `connect-failure` (HexGate always did) or `reset`;
                // with `reset`, one whose body is still whole in its replay copy too.
                let again = if replayable && (svc.retry.connect || svc.retry.reset) {
                    Some(Body::Empty)
                } else if svc.retry.reset && resendable {
                    resend_body(progress.as_deref())
                } else {
                    None
                };
                match (replay, again) {
                    (Some(head), Some(body)) if attempts.retry(Why::Reset) != Next::Stop => {
                        req = rebuild(head, body);
                        continue;
                    }
                    _ => return Err(GatewayError::Upstream(err.to_string())),
                }
            }
        };
        let resp = if resp.status() == StatusCode::BAD_REQUEST && backend.client_cert_requested() {
            match client_cert_refusal(resp, &backend).await {
                Inspected::Pass(resp) => resp,
                Inspected::Buffered(resp) => {
                    backend.record_success();
                    if let Sender::Http1(s) = sender {
                        PoolReturn::new(backend.clone(), s).give_back();
                    }
                    return Ok(resp);
                }
                Inspected::Broken(detail) => {
                    attempts.errored("connection_error");
                    return Err(GatewayError::Upstream(detail));
                }
                Inspected::Refused(reason, detail) => {
                    // The gateway's configuration is at fault, not the backend's health.
                    tracing::warn!(backend = %backend.addr, reason, detail, "the backend refused the gateway's TLS client certificate");
                    attempts.errored(reason);
                    return Err(GatewayError::UpstreamTls { reason, detail });
                }
            }
        } else {
            resp
        };
        let status = resp.status().as_u16();
        if (500..600).contains(&status) {
            // A 5xx neither resets the backend's streak nor ends its ejection: on a route
            // without a breaker it is passed on and nothing else (else alternate requests
            // through such a route would keep a failing backend that it shares with a
            // breaker's route from ever being ejected). On a breaker's route it counts, unless
            // the client's body had failed or was still awaited (a backend may answer 5xx to a
            // client that stalled or went away: the client-fault rule).
            if svc.retry.breaker.is_some() && !client_at_fault(progress.as_deref()) {
                attempts.answered_5xx(&backend);
            }
        } else {
            backend.record_success();
        }
        svc.metrics.upstream_duration.observe(sent_at.elapsed());
        attempts.answered(status);
        if resendable && svc.retry.on_status(status) {
            // Decided on the head: nothing of this answer has reached the client. The last
            // attempt's answer is passed on as it is.
            if let (Some(head), Some(body)) = (replay, resend_body(progress.as_deref())) {
                attempts.attempted(idx);
                if attempts.retry(Why::Status(status)) == Next::Retry {
                    tracing::debug!(backend = %backend.addr, status, "retried on another backend");
                    discard(resp, &backend, sender);
                    req = rebuild(head, body);
                    continue;
                }
            }
        }
        let mut resp = resp;
        if snap.settings.access_log.is_some() {
            // For the access log's upstream, upstream_ms and retries.
            resp.extensions_mut().insert(crate::access_log::Upstream {
                backend: backend.clone(),
                took: sent_at.elapsed(),
                retries: Some(attempts.retried),
            });
        }
        return respond(resp, backend, sender, upgrade);
    }
    Err(GatewayError::ConnectFailed)
}

/// What a 400 from a backend that asks for client certificates turned out to be.
enum Inspected {
    /// Not inspected (too large, or streamed): passed on as it is.
    Pass(Response<Incoming>),
    /// An ordinary 400, read whole to look at it: passed on.
    Buffered(Response<Body>),
    /// The backend refused the TLS client certificate (or its absence): the `reason` and what
    /// the log says.
    Refused(&'static str, String),
    /// The 400's body broke off.
    Broken(String),
}

/// Largest 400 body read to tell a TLS client-certificate refusal from an ordinary 400.
const REFUSAL_PEEK: u64 = 4096;

/// nginx (`ssl_verify_client on`) refuses a missing or untrusted client certificate after the
/// TLS 1.3 handshake, with a 400 page rather than a TLS alert; so a small 400 from a backend
/// that asked for a certificate is read and its text checked. The refusal is the operator's
/// problem (the gateway's certificate), reported as a 502 with its reason, never passed on
/// as the client's 400.
async fn client_cert_refusal(resp: Response<Incoming>, backend: &Backend) -> Inspected {
    use http_body_util::BodyExt;
    let missing = || {
        Inspected::Refused(
            "tls_client_cert_required",
            format!(
                "{} requires a client certificate (set upstreamTls.certFile and keyFile)",
                backend.addr
            ),
        )
    };
    let small = resp
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        .is_some_and(|n| n <= REFUSAL_PEEK);
    if !small {
        return Inspected::Pass(resp);
    }
    let (mut parts, body) = resp.into_parts();
    let read = tokio::time::timeout(std::time::Duration::from_secs(2), body.collect()).await;
    let Ok(Ok(collected)) = read else {
        return Inspected::Broken(format!("{}: a 400 whose body did not arrive", backend.addr));
    };
    let bytes = collected.to_bytes();
    let text = String::from_utf8_lossy(&bytes);
    if text.contains("No required SSL certificate was sent") {
        return missing();
    }
    if text.contains("The SSL certificate error") {
        return Inspected::Refused(
            "tls_client_cert_refused",
            format!(
                "{} refused the client certificate of upstreamTls.certFile",
                backend.addr
            ),
        );
    }
    let present = hop_by_hop_present(&parts.headers);
    strip_hop_by_hop(&mut parts.headers, present, false);
    Inspected::Buffered(Response::from_parts(parts, Body::full(bytes)))
}

/// A response body read from a shared HTTP/2 connection, holding its stream's place in the
/// connection's count until it is done.
struct OnStream {
    body: Incoming,
    _slot: crate::upstream::StreamSlot,
}

impl http_body::Body for OnStream {
    type Data = bytes::Bytes;
    type Error = crate::body::BodyError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        std::pin::Pin::new(&mut self.body)
            .poll_frame(cx)
            .map_err(crate::body::BodyError::from)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// Step 9, the response policy: hop-by-hop fields go; a 101 opens the tunnel only when it
/// completes the upgrade the client asked for; a streamed body gives its connection back to the
/// pool when it ends.
fn respond(
    mut resp: Response<Incoming>,
    backend: Arc<Backend>,
    sender: Sender,
    upgrade: Option<(Upgrade, hyper::upgrade::OnUpgrade)>,
) -> Result<Response<Body>, GatewayError> {
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        // Dropping `resp` on an error drops the backend's connection: nothing is tunnelled.
        let Some((upgrade, client_upgrade)) = upgrade else {
            return Err(GatewayError::BadUpgrade(
                "101 Switching Protocols to a request that asked for no upgrade",
            ));
        };
        check_switch(resp.headers(), &upgrade)?;
        let upstream_upgrade = hyper::upgrade::on(&mut resp);
        tokio::spawn(async move {
            match tokio::try_join!(client_upgrade, upstream_upgrade) {
                Ok((c, u)) => {
                    let mut c = TokioIo::new(c);
                    let mut u = TokioIo::new(u);
                    let _ = tokio::io::copy_bidirectional(&mut c, &mut u).await;
                }
                Err(e) => tracing::debug!(error = %e, "upgrade failed"),
            }
        });
        let (mut parts, _) = resp.into_parts();
        let present = hop_by_hop_present(&parts.headers);
        strip_hop_by_hop(&mut parts.headers, present, true);
        return Ok(Response::from_parts(parts, Body::Empty));
    }
    let (mut parts, body) = resp.into_parts();
    let present = hop_by_hop_present(&parts.headers);
    strip_hop_by_hop(&mut parts.headers, present, false);
    let body = match sender {
        // HTTP/2 connections are shared, never lent to one response; the stream is counted on
        // its connection until the body is done.
        Sender::Http2(_, slot) => Body::Boxed(Box::pin(OnStream { body, _slot: slot })),
        Sender::Http1(sender) if http_body::Body::is_end_stream(&body) => {
            PoolReturn::new(backend, sender).give_back();
            Body::Incoming(body)
        }
        Sender::Http1(sender) => Body::Pooled(body, Some(PoolReturn::new(backend, sender))),
    };
    Ok(Response::from_parts(parts, body))
}
