//! Forwarding to a backend: header rewriting, retries of unsent requests on another backend,
//! timeouts, passive ejection, response streaming and WebSocket (Upgrade) pass-through.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use super::{ConnInfo, Routed, X_REQUEST_ID};
use crate::body::Body;
use crate::error::GatewayError;
use crate::snapshot::{ServiceRt, Snapshot};
use crate::upstream::{Backend, PoolReturn};

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// The fixed hop-by-hop names (RFC 9110 7.6.1) besides Connection and Upgrade, in bit order.
const HOP_BY_HOP: [&str; 6] = [
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "proxy-authorization",
];
const HOP_CONNECTION: u8 = 1 << 6;
const HOP_UPGRADE: u8 = 1 << 7;

/// A header name's hop-by-hop bit (HOP_BY_HOP order, then Connection, Upgrade), or 0.
fn hop_bit(name: &str) -> u8 {
    match name {
        "connection" => HOP_CONNECTION,
        "upgrade" => HOP_UPGRADE,
        n => HOP_BY_HOP
            .iter()
            .position(|h| *h == n)
            .map_or(0, |i| 1 << i),
    }
}

/// Which hop-by-hop headers are present, as bits: one pass over the names.
fn hop_by_hop_present(headers: &HeaderMap) -> u8 {
    headers.keys().fold(0, |bits, n| bits | hop_bit(n.as_str()))
}

/// Removes hop-by-hop headers (RFC 9110 7.6.1), including those named in Connection.
/// When `keep_upgrade` is set, `Connection: upgrade` and `Upgrade` survive (WebSocket).
/// `present` (from `hop_by_hop_present` or `scan_headers`) says which are there; only those are
/// removed (a response usually carries just `Connection: keep-alive`).
fn strip_hop_by_hop(headers: &mut HeaderMap, present: u8, keep_upgrade: bool) {
    if present & HOP_CONNECTION != 0 {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
            .filter(|n| !(keep_upgrade && n == header::UPGRADE) && n != header::HOST)
            .collect();
        for n in named {
            headers.remove(n);
        }
        headers.remove(header::CONNECTION);
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(*name);
        }
    }
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else if present & HOP_UPGRADE != 0 {
        headers.remove(header::UPGRADE);
    }
}

/// One pass over the request's header names: which hop-by-hop headers are present (as
/// `hop_by_hop_present` bits), and whether any gateway-owned identity header is. Most requests
/// carry neither, and then the removals (a hash and a probe per name) are skipped.
fn scan_headers(headers: &HeaderMap, identity: &[HeaderName]) -> (u8, bool) {
    let (mut hop, mut ident) = (0, false);
    for name in headers.keys() {
        hop |= hop_bit(name.as_str());
        ident |= identity.iter().any(|h| h == name);
    }
    (hop, ident)
}

fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
}

/// The path and query sent upstream: the normalised path (with `stripPath` applied).
/// `normalized` is set when normalisation changed the request's path.
fn upstream_uri(
    svc: &ServiceRt,
    uri: Uri,
    normalized: Option<String>,
) -> Result<Uri, GatewayError> {
    if normalized.is_none() && svc.strip_prefix.is_none() && uri.scheme().is_none() {
        return Ok(uri); // already origin-form and normal: forward as is
    }
    let path = normalized.as_deref().unwrap_or(uri.path());
    let path: &str = match &svc.strip_prefix {
        Some(p) => match path.strip_prefix(p.as_str()) {
            Some(rest) if rest.starts_with('/') => rest,
            _ => "/",
        },
        None => path,
    };
    let pq = match uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path.to_string(),
    };
    Uri::try_from(pq).map_err(|e| GatewayError::Internal(format!("bad upstream uri: {e}")))
}

fn add_forwarded_headers(
    snap: &Snapshot,
    headers: &mut HeaderMap,
    conn: ConnInfo,
    host: Option<&str>,
    request_id: &str,
) {
    let peer_ip = conn.peer.ip().to_string();
    let trusted = snap.is_trusted_proxy(conn.peer.ip());
    let xff = match headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(prev) if trusted => format!("{prev}, {peer_ip}"),
        _ => peer_ip,
    };
    if let Ok(v) = HeaderValue::from_str(&xff) {
        headers.insert(X_FORWARDED_FOR.clone(), v);
    }
    if !(trusted && headers.contains_key(&X_FORWARDED_PROTO)) {
        headers.insert(
            X_FORWARDED_PROTO.clone(),
            HeaderValue::from_static(if conn.tls { "https" } else { "http" }),
        );
    }
    if !(trusted && headers.contains_key(&X_FORWARDED_HOST)) {
        match host.and_then(|h| HeaderValue::from_str(h).ok()) {
            Some(h) => {
                headers.insert(X_FORWARDED_HOST.clone(), h);
            }
            None => {
                headers.remove(&X_FORWARDED_HOST);
            }
        }
    }
    if let Ok(v) = HeaderValue::from_str(request_id) {
        headers.insert(X_REQUEST_ID, v);
    }
}

/// The client's fault, when an upstream send failed because the client's body went over
/// its limit (413) or could not be read (400: bad chunked framing, a truncated body).
fn client_body_error(err: &hyper::Error) -> Option<GatewayError> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        match e.downcast_ref() {
            Some(crate::body::BodyError::TooLarge(limit)) => {
                return Some(GatewayError::BodyTooLarge(*limit))
            }
            Some(crate::body::BodyError::Hyper(h)) => {
                return Some(GatewayError::BadBody(h.to_string()))
            }
            None => cur = e.source(),
        }
    }
    None
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

pub async fn forward(
    snap: &Snapshot,
    routed: Routed,
    mut req: Request<Incoming>,
    identity: Option<Arc<crate::auth::Identity>>,
    conn: ConnInfo,
    request_id: &str,
) -> Result<Response<Body>, GatewayError> {
    let Routed {
        service,
        normalized,
        host,
    } = routed;
    let svc = &service;
    if let Some(max) = svc.max_body_size {
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > max) {
            return Err(GatewayError::BodyTooLarge(max));
        }
    }
    let upgrade = is_upgrade(&req);
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    // HTTP/2 carries the host in the authority: give the backend a Host header.
    let authority_host = if req.headers().contains_key(header::HOST) {
        None
    } else {
        req.uri()
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    };

    let (mut parts, body) = req.into_parts();
    parts.uri = upstream_uri(svc, std::mem::take(&mut parts.uri), normalized)?;
    parts.version = Version::HTTP_11;
    let (hop, spoofed) = scan_headers(&parts.headers, &snap.identity_headers);
    if hop != 0 || upgrade {
        strip_hop_by_hop(&mut parts.headers, hop, upgrade);
    }
    add_forwarded_headers(snap, &mut parts.headers, conn, host.as_deref(), request_id);
    // Identity headers come from the gateway only: whatever the client sent is dropped, always.
    if spoofed {
        for h in &snap.identity_headers {
            parts.headers.remove(h);
        }
    }
    if let Some(id) = &identity {
        for (name, value) in &id.headers {
            parts.headers.insert(name.clone(), value.clone());
        }
        if snap.auth.as_ref().is_some_and(|a| a.strip_authorization) {
            parts.headers.remove(header::AUTHORIZATION);
        }
    }
    if let Some(h) = authority_host {
        parts.headers.insert(header::HOST, h);
    }
    // A request with no body and an idempotent method can be replayed if the connection dies
    // after it was written (e.g. a pooled connection the backend closed at that moment).
    let replayable = parts.method.is_idempotent() && http_body::Body::is_end_stream(&body);
    let body = match svc.max_body_size {
        Some(max) if !http_body::Body::is_end_stream(&body) => Body::Limited(body, max, 0),
        _ => Body::Incoming(body),
    };
    let mut req = Request::from_parts(parts, body);

    let deadline = Instant::now() + svc.timeouts.request;
    let max_attempts = svc.retries as usize + 1;
    let mut tried: u64 = 0;
    let mut failures = 0usize;
    // Stale pooled connections are retried without counting; this bounds the loop regardless.
    for _ in 0..(max_attempts + svc.pool.len() + 8) {
        let Some((idx, backend)) = svc.pool.pick(tried) else {
            return Err(if failures == 0 {
                GatewayError::NoHealthyBackend
            } else {
                GatewayError::ConnectFailed
            });
        };
        let _in_flight = InFlight::new(&backend);
        let remaining = deadline.saturating_duration_since(Instant::now());
        let connect_timeout = svc.timeouts.connect.min(remaining);
        let (mut sender, reused) = match backend.checkout(connect_timeout).await {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(backend = %backend.addr, error = %e, "connect failed");
                backend.record_failure();
                svc.metrics.upstream_errors.fetch_add(1, Ordering::Relaxed);
                failures += 1;
                if idx < 64 {
                    tried |= 1 << idx;
                }
                if failures >= max_attempts {
                    return Err(GatewayError::ConnectFailed);
                }
                if Instant::now() >= deadline {
                    return Err(GatewayError::UpstreamTimeout);
                }
                continue;
            }
        };
        let replay = replayable.then(|| {
            (
                req.method().clone(),
                req.uri().clone(),
                req.headers().clone(),
            )
        });
        let sent_at = Instant::now();
        let remaining = deadline.saturating_duration_since(sent_at);
        let result = tokio::time::timeout(remaining, sender.try_send_request(req)).await;
        let mut resp = match result {
            Err(_) => {
                backend.record_failure();
                svc.metrics.upstream_errors.fetch_add(1, Ordering::Relaxed);
                return Err(GatewayError::UpstreamTimeout);
            }
            Ok(Ok(resp)) => resp,
            Ok(Err(mut e)) => match e.take_message() {
                Some(unsent) => {
                    // Never written: safe to retry, on another backend unless the connection
                    // was a stale pooled one.
                    req = unsent;
                    if !reused {
                        backend.record_failure();
                        svc.metrics.upstream_errors.fetch_add(1, Ordering::Relaxed);
                        failures += 1;
                        if idx < 64 {
                            tried |= 1 << idx;
                        }
                        if failures >= max_attempts {
                            return Err(GatewayError::ConnectFailed);
                        }
                    }
                    continue;
                }
                None => {
                    let err = e.into_error();
                    if let Some(client_fault) = client_body_error(&err) {
                        return Err(client_fault);
                    }
                    svc.metrics.upstream_errors.fetch_add(1, Ordering::Relaxed);
                    if !reused {
                        backend.record_failure();
                        failures += 1;
                        if idx < 64 {
                            tried |= 1 << idx;
                        }
                    }
                    match replay {
                        Some((method, uri, headers)) if failures < max_attempts => {
                            let mut r = Request::new(Body::Empty);
                            *r.method_mut() = method;
                            *r.uri_mut() = uri;
                            *r.headers_mut() = headers;
                            req = r;
                            continue;
                        }
                        _ => return Err(GatewayError::Upstream(err.to_string())),
                    }
                }
            },
        };
        backend.record_success();
        svc.metrics.upstream_duration.observe(sent_at.elapsed());

        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            let Some(client_upgrade) = client_upgrade else {
                return Err(GatewayError::Upstream(
                    "101 Switching Protocols to a request that asked for no upgrade".into(),
                ));
            };
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
        let body = if http_body::Body::is_end_stream(&body) {
            PoolReturn::new(backend, sender).give_back();
            Body::Incoming(body)
        } else {
            Body::Pooled(body, Some(PoolReturn::new(backend, sender)))
        };
        return Ok(Response::from_parts(parts, body));
    }
    Err(GatewayError::ConnectFailed)
}
