//! The request pipeline: the life of a request on the public listeners, top to bottom, over
//! one snapshot. Each phase lives in its own module and returns what it produced or a
//! [`Reject`] carrying its status and headers; what phases produce for later ones (the route,
//! the identity, response headers) travels in the [`Context`].
//!
//! 1. framing, host, path (`edge`, `rules`): header-field policy, framing, canonical host
//! 2. route (`route`): normalised path, `escapedSlashes`, ambiguous readings
//! 3. size limits (`edge::declared_size`): 413 before anything is spent
//! 4. authenticate (`authn`): a JWT or an API key
//! 5. authorise (`authn::authorize`): the route's `requireScopes`
//! 6. limits (`limits`): rate limit and quota
//! 7. the request upstream (`outgoing`): headers, path, body
//! 8. pick upstream and forward (`forward`): retries, one failure recorder; HTTP/1.1 or
//!    HTTP/2 (gRPC: `grpc`, its deadline and its answers)
//! 9. response policy (`forward::respond`), then response headers, metrics and access log
//!    ([`finish`])
//!
//! Adding a phase is one call in [`run`] and its module.

pub mod admission;
pub mod authn;
pub mod cors;
pub mod edge;
pub mod forward;
pub mod grpc;
pub mod header_rules;
pub mod limits;
pub mod outgoing;
pub mod retry;
pub mod rewrite;
pub mod route;
pub mod split;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use http::{header, HeaderName, HeaderValue, Method, Request, Response};
use hyper::body::Incoming;

use std::borrow::Cow;

use crate::body::Body;
use crate::error::{Reject, Side};
use crate::metrics::ServiceMetrics;
use crate::otel::{Kind, Val};
use crate::snapshot::Snapshot;
use crate::state::State;

pub use edge::request_host;

pub const X_REQUEST_ID: header::HeaderName = header::HeaderName::from_static("x-request-id");

/// Connection facts the pipeline needs.
#[derive(Clone, Copy)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    pub tls: bool,
}

/// What the phases of one request share: the snapshot it runs on, who sent it, and what the
/// phases produced for the ones after them.
pub struct Context {
    pub start: Instant,
    pub snap: Arc<Snapshot>,
    pub conn: ConnInfo,
    pub request_id: String,
    pub method: Method,
    /// Path, version and a refusal's reason for the access log, when it is on.
    access: Option<Box<crate::access_log::Access>>,
    /// The routed service's metrics (the unmatched ones until routing finds a service).
    pub metrics: Arc<ServiceMetrics>,
    /// Headers the response carries, whatever it is (the RateLimit fields of an allowed request).
    pub response_headers: Vec<(HeaderName, HeaderValue)>,
    /// Set for a gRPC request: refusals are gRPC answers, answers are counted by `grpc-status`.
    pub grpc: Option<grpc::Grpc>,
    /// The HTTP status of a refusal sent as a gRPC answer (which is an HTTP 200): what metrics
    /// count, so a refused gRPC call shows as the 429 or 503 it is.
    refused: Option<u16>,
    /// The authenticated consumer, once authentication found one (per-consumer metrics).
    pub consumer: Option<Arc<str>>,
    /// The consumer's plan, once resolved (header rules' `${plan}`).
    pub plan: Option<Arc<str>>,
    /// The client's address (the peer, or behind trusted proxies the forwarded one).
    pub client_ip: std::net::IpAddr,
    /// The routed service, for the response policies (CORS fields, response header rules).
    pub service: Option<Arc<crate::snapshot::ServiceRt>>,
    /// The request's `Origin`, when its route has `cors`.
    pub origin: Option<HeaderValue>,
    /// The request's trace, when `tracing` is on.
    pub trace: Option<crate::otel::Trace>,
    /// Facts for the server span (a sampled request only).
    span: Option<Box<SpanFacts>>,
}

/// A request whose client went away before its answer (its future dropped, `finish` never
/// reached) still ends its server span, so the backend's `traceparent` names a span the
/// collector gets; attempt spans end as the forwarding state drops.
impl Drop for Context {
    fn drop(&mut self) {
        let (Some(trace), Some(facts)) = (self.trace.take(), self.span.take()) else {
            return;
        };
        let Some(tracer) = self.snap.settings.tracing.clone() else {
            return;
        };
        // 499: nginx's "client closed request".
        let (name, mut attrs, _) = server_span(self, &facts, 499);
        attrs.push(("error.type", Val::from("client_closed")));
        let error = Some(Cow::Borrowed(
            "the client closed the connection before the answer",
        ));
        trace.finish(&tracer, self.start, name, attrs, error);
    }
}

/// What the server span says about the request that the pipeline does not otherwise keep.
struct SpanFacts {
    path: String,
    user_agent: Option<HeaderValue>,
    version: &'static str,
    scheme: &'static str,
    /// The refusal's reason, when the gateway answered for the backend.
    refusal: Option<String>,
}

/// Entry point for every request on the public listeners.
pub async fn handle(
    state: Arc<State>,
    req: Request<Incoming>,
    conn: ConnInfo,
) -> Result<Response<Body>, Infallible> {
    let snap = state.snapshot.load_full();
    let trace = snap
        .settings
        .tracing
        .as_ref()
        .map(|t| t.begin(req.headers()));
    let mut cx = Context {
        start: Instant::now(),
        request_id: edge::request_id(&req),
        method: req.method().clone(),
        access: snap.settings.access_log.as_ref().map(|_| {
            Box::new(crate::access_log::Access {
                path: req.uri().path().to_string(),
                version: version_name(req.version()),
                refusal: None,
                // Without tracing, the client's trace (if any) still joins the line to it.
                trace_id: match &trace {
                    Some(t) => Some(t.trace_id),
                    None => crate::otel::context::parent(req.headers()).map(|p| p.trace_id),
                },
            })
        }),
        span: trace.as_ref().filter(|t| t.recording()).map(|_| {
            Box::new(SpanFacts {
                path: crate::otel::clip(req.uri().path()).to_string(),
                user_agent: req.headers().get(header::USER_AGENT).cloned(),
                version: match req.version() {
                    http::Version::HTTP_2 => "2",
                    http::Version::HTTP_10 => "1.0",
                    _ => "1.1",
                },
                scheme: if conn.tls { "https" } else { "http" },
                refusal: None,
            })
        }),
        trace,
        metrics: snap.unmatched.clone(),
        response_headers: Vec::new(),
        grpc: grpc::Grpc::of(req.headers()),
        refused: None,
        consumer: None,
        plan: None,
        client_ip: conn.peer.ip(),
        service: None,
        origin: None,
        conn,
        snap,
    };
    let resp = match run(&state, &mut cx, req).await {
        Ok(resp) => resp,
        Err(reject) => {
            if reject.error.side() != Side::Client {
                tracing::warn!(request_id = %cx.request_id, service = %cx.metrics.name, error = %reject.error, "request failed");
            }
            if cx.grpc.is_some() {
                cx.refused = Some(reject.error.status().as_u16());
            }
            if let Some(access) = cx.access.as_deref_mut() {
                access.refusal = Some(crate::access_log::Refusal::of(&reject.error));
            }
            if let Some(span) = cx.span.as_deref_mut() {
                span.refusal = Some(crate::otel::clip(&reject.error.to_string()).to_string());
            }
            reject.to_response(&cx.request_id, cx.grpc.is_some())
        }
    };
    Ok(finish(cx, resp))
}

/// The phases, in order.
async fn run(
    state: &State,
    cx: &mut Context,
    mut req: Request<Incoming>,
) -> Result<Response<Body>, Reject> {
    // 1. Framing, host and path: the rules every request meets, HTTP/1 and HTTP/2 alike.
    cx.snap.settings.header_policy.apply(req.headers_mut())?;
    let host = edge::check_framing(&req, cx.conn.tls)?;
    // 2. Route.
    let routed = route::route_request(&cx.snap, &req, host)?;
    let svc = routed.service.clone();
    cx.metrics = svc.metrics.clone();
    cx.service = Some(svc.clone());
    let (client_ip, client_known) = limits::client_ip(&cx.snap, cx.conn.peer.ip(), req.headers());
    cx.client_ip = client_ip;
    // 2b. Who may use the route: ipAllow, ipDeny (an unknown client is refused by them).
    admission::check_ip(svc.ip_rules.as_ref(), &svc.metrics, client_ip, client_known)?;
    // 2c. CORS: a preflight is answered here, before anything else is spent on it.
    if let Some(c) = &svc.cors {
        cx.origin = req.headers().get(header::ORIGIN).cloned();
        if let Some(answer) = cors::preflight(&svc.name, c, &req) {
            return Ok(answer);
        }
    }
    // 3. Size limits, before anything is spent on the request.
    edge::declared_size(&req, &svc)?;
    // 4. Authenticate.
    let timer = cx
        .trace
        .as_ref()
        .filter(|_| svc.auth)
        .and_then(|t| t.start());
    let mut how = authn::How::None;
    let identity = authn::authenticate(&cx.snap, &svc, &req, &mut how).await;
    if let (Some(timer), Some(t)) = (timer, &cx.trace) {
        let mut attrs = vec![("hexgate.auth.method", Val::from(how.method()))];
        if let Some(cached) = how.cached() {
            attrs.push(("hexgate.auth.cache", Val::from(cached)));
        }
        let error = identity
            .as_ref()
            .err()
            .map(|r| Cow::Owned(r.error.to_string()));
        t.end(timer, None, "authenticate", Kind::Internal, attrs, error);
    }
    let identity = identity?;
    cx.consumer = identity.as_ref().map(|i| i.consumer.clone());
    // 5. Authorise: the route's scopes; the consumer's plan.
    authn::authorize(&svc, identity.as_deref())?;
    let plan = limits::plan_of(&cx.snap, &svc, identity.as_deref())?;
    cx.plan = plan.map(|p| p.name.clone());
    // 5b. Load shedding: a place among the route's requests in flight, by plan priority.
    let _in_flight = admission::enter(svc.in_flight.as_ref(), svc.plans, plan.map(|p| &**p))?;
    // 6. Limits: the route's, and the consumer's plan's.
    if svc.limits.is_some() || plan.is_some() {
        let timer = cx.trace.as_ref().and_then(|t| t.start());
        let mut redis_failed = None;
        let verdict = limits::check(
            state,
            &svc,
            cx.client_ip,
            plan.map(|p| &**p),
            identity.as_deref(),
            &req,
            &mut redis_failed,
        )
        .await;
        if let (Some(timer), Some(t)) = (timer, &cx.trace) {
            limits_spans(t, timer, &verdict, redis_failed);
        }
        cx.response_headers = verdict?;
    }
    // 7. The request as its backend gets it (split, rewrite, header rules).
    let out = outgoing::prepare(
        &cx.snap,
        routed,
        req,
        identity.as_deref(),
        cx.conn,
        &header_rules::Vars {
            consumer: cx.consumer.as_deref(),
            request_id: &cx.request_id,
            client_ip: cx.client_ip,
            plan: cx.plan.as_deref(),
        },
        cx.grpc,
    )?;
    // 8 and 9. Pick a backend, forward (retries), response policy.
    Ok(forward::forward(&cx.snap, out, cx.trace.as_ref()).await?)
}

/// The limits phase's spans: `limits`, and when Redis was asked, its round trip (`EVALSHA`,
/// an error when Redis failed, whatever the failure mode then decided).
fn limits_spans(
    t: &crate::otel::Trace,
    timer: crate::otel::Timer,
    verdict: &Result<Vec<(HeaderName, HeaderValue)>, Reject>,
    redis_failed: Option<bool>,
) {
    let outcome = match verdict {
        Ok(_) => "allowed",
        Err(r) if r.error.status() == http::StatusCode::TOO_MANY_REQUESTS => "limited",
        Err(_) => "unavailable",
    };
    let parent = timer.span_id;
    if let (Some(failed), Some(redis)) = (redis_failed, t.start_at(&timer)) {
        let attrs = vec![
            ("db.system.name", Val::from("redis")),
            ("db.operation.name", Val::from("EVALSHA")),
        ];
        let error = failed.then_some(Cow::Borrowed("Redis failed"));
        t.end(redis, Some(parent), "EVALSHA", Kind::Client, attrs, error);
    }
    let mut attrs = vec![
        (
            "hexgate.limits.store",
            Val::from(if redis_failed.is_some() {
                "redis"
            } else {
                "memory"
            }),
        ),
        ("hexgate.limits.outcome", Val::from(outcome)),
    ];
    if redis_failed == Some(true) && outcome != "unavailable" {
        // failureMode open: what Redis could not decide was decided in memory.
        attrs.push(("hexgate.limits.failed_open", Val::from("true")));
    }
    let error = (outcome == "unavailable").then_some(Cow::Borrowed("limits unavailable"));
    t.end(timer, None, "limits", Kind::Internal, attrs, error);
}

/// The end of every request, answered or refused: the headers phases left for the response, the
/// request id, metrics and the access log.
fn finish(mut cx: Context, mut resp: Response<Body>) -> Response<Body> {
    for (name, value) in std::mem::take(&mut cx.response_headers) {
        resp.headers_mut().insert(name, value);
    }
    // The route's response policies, on every answer it gives (refusals included): the header
    // rules, then CORS, which owns its fields (no rule can undo the route's CORS policy).
    if let Some(svc) = &cx.service {
        if !svc.response_rules.is_empty() {
            svc.response_rules.apply(
                resp.headers_mut(),
                &header_rules::Vars {
                    consumer: cx.consumer.as_deref(),
                    request_id: &cx.request_id,
                    client_ip: cx.client_ip,
                    plan: cx.plan.as_deref(),
                },
            );
        }
        let preflight = resp.extensions().get::<cors::Preflight>().copied();
        if svc.cors.is_some() && preflight.is_none() {
            for name in &cors::OWNED {
                resp.headers_mut().remove(name);
            }
        }
        if let Some(c) = svc
            .cors
            .as_ref()
            .filter(|_| preflight.is_none_or(|p| p.granted))
        {
            // The gateway's fields replace a backend's own (two Access-Control-Allow-Origin
            // lines would make browsers refuse the answer); Vary is added to, except on a
            // preflight answer, whose own Vary names Origin.
            for (name, value) in cors::response_fields(c, cx.origin.as_ref()) {
                if name != header::VARY {
                    resp.headers_mut().insert(name, value);
                } else if preflight.is_none() {
                    resp.headers_mut().append(name, value);
                }
            }
        }
    }
    let elapsed = cx.start.elapsed();
    let code = cx.refused.unwrap_or(resp.status().as_u16());
    match cx.trace.as_ref().filter(|t| t.recording()) {
        // A sampled request's duration may be the histogram's exemplar (OpenMetrics).
        Some(t) => cx
            .metrics
            .record_traced(&cx.method, code, elapsed, t.trace_id),
        None => cx.metrics.record(&cx.method, code, elapsed),
    }
    if let Some(consumer) = &cx.consumer {
        cx.metrics.record_consumer(consumer, code);
    }
    if let Ok(v) = HeaderValue::from_str(&cx.request_id) {
        resp.headers_mut().insert(X_REQUEST_ID, v);
    }
    if cx.grpc.is_some() {
        resp = grpc::observe(cx.metrics.clone(), code, resp);
    }
    if let (Some(access), Some(sink)) = (&cx.access, &cx.snap.settings.access_log) {
        let line = if sink.format == crate::config::AccessLogFormat::Text {
            crate::access_log::text_line(
                cx.conn.peer.ip(),
                &cx.method,
                &access.path,
                access.version,
                resp.status().as_u16(),
                elapsed,
                &cx.metrics.name,
                &cx.request_id,
            )
        } else {
            use crate::access_log::{self as log, Phase};
            // `allowed` once the route's limits (or the consumer's plan's) let the request
            // through; `limited` when one refused it; null when none applied or the request
            // was refused before them.
            let limited_route =
                cx.plan.is_some() || cx.service.as_ref().is_some_and(|s| s.limits.is_some());
            let preflight = resp.extensions().get::<cors::Preflight>().is_some();
            let limit_outcome = match access.refusal.as_ref().map(|r| r.phase) {
                Some(Phase::Limited) => Some("limited"),
                None if preflight => None,
                None | Some(Phase::After) if limited_route => Some("allowed"),
                _ => None,
            };
            log::json_line(&log::Fields {
                time: std::time::SystemTime::now(),
                request_id: &cx.request_id,
                trace_id: access.trace_id,
                client_ip: cx.client_ip,
                method: &cx.method,
                path: &access.path,
                version: access.version,
                status: resp.status().as_u16(),
                bytes_sent: log::bytes_sent(&cx.method, &resp),
                duration: elapsed,
                upstream: resp.extensions().get::<log::Upstream>(),
                service: &cx.metrics.name,
                consumer: cx.consumer.as_deref(),
                limit_outcome,
                reason: access.refusal.as_ref().map(|r| r.reason.as_str()),
            })
        };
        sink.send(line);
    }
    if let (Some(trace), Some(tracer)) = (cx.trace.take(), &cx.snap.settings.tracing) {
        if let Some(facts) = cx.span.take() {
            // A refusal sent as a gRPC answer (an HTTP 200) shows as the status it stands for.
            let (name, attrs, error) = server_span(&cx, &facts, code);
            trace.finish(tracer, cx.start, name, attrs, error);
        }
    }
    resp
}

/// The server span's name, attributes (OpenTelemetry's HTTP server conventions, then the
/// gateway's own) and error status (a 5xx, as the conventions say for servers). Values are
/// borrowed from the request (the span is encoded before it ends).
fn server_span<'a>(
    cx: &'a Context,
    facts: &'a SpanFacts,
    status: u16,
) -> (String, Vec<(&'static str, Val<'a>)>, Option<Cow<'a, str>>) {
    let known = crate::otel::known_method(&cx.method);
    let mut attrs: Vec<(&'static str, Val<'a>)> = Vec::with_capacity(18);
    attrs.push(("http.request.method", Val::from(known.unwrap_or("_OTHER"))));
    if known.is_none() {
        attrs.push((
            "http.request.method_original",
            Val::from(crate::otel::clip(cx.method.as_str())),
        ));
    }
    let route = cx.service.as_ref().map(|s| &*s.route);
    let name = match (route, known) {
        (Some(r), m) => {
            let m = m.unwrap_or("HTTP");
            let mut n = String::with_capacity(m.len() + 1 + r.len());
            n.push_str(m);
            n.push(' ');
            n.push_str(r);
            n
        }
        (None, Some(m)) => m.to_string(),
        (None, None) => "HTTP".to_string(),
    };
    if let Some(r) = route {
        attrs.push(("http.route", Val::from(r)));
    }
    attrs.push(("url.path", Val::from(facts.path.as_str())));
    attrs.push(("url.scheme", Val::from(facts.scheme)));
    attrs.push(("network.protocol.name", Val::from("http")));
    attrs.push(("network.protocol.version", Val::from(facts.version)));
    attrs.push(("http.response.status_code", Val::Int(i64::from(status))));
    attrs.push(("client.address", Val::Ip(cx.client_ip)));
    attrs.push(("network.peer.address", Val::Ip(cx.conn.peer.ip())));
    if let Some(v) = facts.user_agent.as_ref().and_then(crate::otel::header_val) {
        attrs.push(("user_agent.original", v));
    }
    attrs.push(("hexgate.service", Val::from(cx.metrics.name.as_str())));
    attrs.push(("hexgate.request_id", Val::from(cx.request_id.as_str())));
    if let Some(c) = &cx.consumer {
        attrs.push(("hexgate.consumer", Val::from(&**c)));
    }
    if let Some(p) = &cx.plan {
        attrs.push(("hexgate.plan", Val::from(&**p)));
    }
    if let Some(r) = &facts.refusal {
        attrs.push(("hexgate.refusal", Val::from(r.as_str())));
    }
    let error = (status >= 500).then(|| {
        attrs.push(("error.type", Val::from(status.to_string())));
        match &facts.refusal {
            Some(r) => Cow::Borrowed(r.as_str()),
            None => Cow::Owned(format!("HTTP {status}")),
        }
    });
    (name, attrs, error)
}

/// The version as the access log writes it.
fn version_name(v: http::Version) -> &'static str {
    match v {
        http::Version::HTTP_09 => "HTTP/0.9",
        http::Version::HTTP_10 => "HTTP/1.0",
        http::Version::HTTP_11 => "HTTP/1.1",
        http::Version::HTTP_2 => "HTTP/2.0",
        http::Version::HTTP_3 => "HTTP/3.0",
        _ => "HTTP/?",
    }
}
