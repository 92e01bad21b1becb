//! The request pipeline, one fixed sequence over one snapshot:
//! load snapshot → normalise path and route → (auth, limits: later phases) → pick backend →
//! forward with retries → metrics and access log.

pub mod forward;
pub mod route;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use http::{header, HeaderValue, Request, Response};
use hyper::body::Incoming;

use crate::body::Body;
use crate::config::EscapedSlashes;
use crate::error::GatewayError;
use crate::rules::host::{self, Authority, HostError};
use crate::rules::path::{self, PathError};
use crate::snapshot::Snapshot;
use crate::state::State;

pub const X_REQUEST_ID: header::HeaderName = header::HeaderName::from_static("x-request-id");

/// Connection facts the pipeline needs.
#[derive(Clone, Copy)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    pub tls: bool,
}

/// Entry point for every request on the public listeners.
pub async fn handle(
    state: Arc<State>,
    mut req: Request<Incoming>,
    conn: ConnInfo,
) -> Result<Response<Body>, Infallible> {
    let start = Instant::now();
    let snap = state.snapshot.load_full();
    let request_id = request_id(&req);
    let method = req.method().clone();
    let access = snap
        .settings
        .access_log
        .then(|| (req.uri().path().to_string(), format!("{:?}", req.version())));

    let mut limit_headers = Vec::new();
    let mut retry_after = None;
    let routed = snap.settings.header_policy.apply(req.headers_mut());
    let routed = match routed {
        Ok(()) => route_request(&snap, &req, conn.tls),
        Err(e) => Err(e.into()),
    };
    let (metrics, result) = match routed {
        Ok(routed) => {
            let metrics = routed.service.metrics.clone();
            let res = pipeline(
                &state,
                &snap,
                routed,
                req,
                conn,
                &request_id,
                &mut limit_headers,
                &mut retry_after,
            )
            .await;
            (metrics, res)
        }
        Err(e) => (snap.unmatched.clone(), Err(e)),
    };
    let mut resp = match result {
        Ok(r) => r,
        Err(e) => {
            if e.side() != crate::error::Side::Client {
                tracing::warn!(request_id = %request_id, service = %metrics.name, error = %e, "request failed");
            }
            e.to_response(&request_id)
        }
    };
    for (name, value) in limit_headers {
        resp.headers_mut().insert(name, value);
    }
    if let Some(secs) = retry_after {
        resp.headers_mut()
            .insert(http::header::RETRY_AFTER, HeaderValue::from(secs));
    }
    let elapsed = start.elapsed();
    metrics.record(&method, resp.status().as_u16(), elapsed);
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        resp.headers_mut().insert(X_REQUEST_ID, v);
    }
    if let Some((path, version)) = access {
        println!(
            "{} \"{} {} {}\" {} {:.3}ms service={} request_id={}",
            conn.peer.ip(),
            method,
            path,
            version,
            resp.status().as_u16(),
            elapsed.as_secs_f64() * 1000.0,
            metrics.name,
            request_id
        );
    }
    Ok(resp)
}

/// Steps 3 to 6 for a routed request: authenticate, apply limits, forward.
#[allow(clippy::too_many_arguments)]
async fn pipeline(
    state: &State,
    snap: &Snapshot,
    routed: Routed,
    req: Request<Incoming>,
    conn: ConnInfo,
    request_id: &str,
    limit_headers: &mut Vec<(http::HeaderName, HeaderValue)>,
    retry_after: &mut Option<u64>,
) -> Result<Response<Body>, GatewayError> {
    let svc = &routed.service;
    // A declared body over the route's limit is refused before anything is spent on it (no
    // token verification, no limit charged).
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
    let identity = authenticate(snap, svc, &req).await?;
    if let Some(policies) = &svc.limits {
        let ip = client_ip(snap, conn.peer.ip(), req.headers());
        // Boxed, so a route without limits does not carry the limiter's state in its future.
        let verdict = Box::pin(state.limiter.check(
            policies,
            &svc.metrics,
            ip,
            identity.as_ref().map(|i| &*i.consumer),
            req.headers(),
        ))
        .await;
        if verdict.unavailable {
            return Err(GatewayError::LimitsUnavailable);
        }
        *limit_headers = verdict.headers;
        if verdict.retry_after.is_some() {
            *retry_after = verdict.retry_after;
            return Err(GatewayError::TooManyRequests);
        }
    }
    forward::forward(snap, routed, req, identity, conn, request_id).await
}

/// The client's address: the peer, or, when the peer is a trusted proxy, the right-most
/// address in X-Forwarded-For that is not itself a trusted proxy.
pub fn client_ip(
    snap: &Snapshot,
    peer: std::net::IpAddr,
    headers: &http::HeaderMap,
) -> std::net::IpAddr {
    if !snap.is_trusted_proxy(peer) {
        return peer;
    }
    let mut ip = peer;
    let hops = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect::<Vec<_>>();
    for hop in hops.iter().rev() {
        match hop.parse::<std::net::IpAddr>() {
            Ok(addr) => {
                ip = addr;
                if !snap.is_trusted_proxy(addr) {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    ip
}

/// Step 3: the consumer identity when the route requires a token.
async fn authenticate(
    snap: &Snapshot,
    svc: &crate::snapshot::ServiceRt,
    req: &Request<Incoming>,
) -> Result<Option<Arc<crate::auth::Identity>>, GatewayError> {
    if !svc.auth {
        return Ok(None);
    }
    let Some(auth) = &snap.auth else {
        return Err(GatewayError::Internal(
            "authentication not configured".into(),
        ));
    };
    match auth.authenticate(req.headers()).await {
        Ok(identity) => Ok(Some(identity)),
        Err(e) => {
            svc.metrics.auth_failure(e.label());
            Err(GatewayError::Unauthorized(e))
        }
    }
}

/// What routing found out about a request, reused by the later steps.
pub struct Routed {
    pub service: Arc<crate::snapshot::ServiceRt>,
    /// The normalised path, when it differs from the request's.
    pub normalized: Option<String>,
    /// The request's canonical authority (`rules::host`), sent upstream as Host and
    /// X-Forwarded-Host.
    pub host: Option<Authority>,
}

/// Step 2: the route for a request. Host and path go through `rules` first, so HTTP/1 and
/// HTTP/2 requests are matched on the same canonical values.
fn route_request(
    snap: &Snapshot,
    req: &Request<Incoming>,
    tls: bool,
) -> Result<Routed, GatewayError> {
    let host = check_framing(req, tls)?;
    let raw_path = req.uri().path();
    let escapes = path::scan(raw_path)?;
    let norm = path::normalize_path(raw_path)?;
    let host_name = host.as_ref().map(Authority::host);
    let route = snap
        .router
        .find(host_name, req.method(), &norm)
        .ok_or(GatewayError::NoRoute)?;
    let (route, norm) = if !escapes.separators {
        (route, norm)
    } else {
        match route.service.escaped_slashes {
            EscapedSlashes::Keep => (route, norm),
            EscapedSlashes::Reject => return Err(PathError::EncodedSeparator.into()),
            EscapedSlashes::Decode => {
                // Separators count as separators: route again on the decoded path, and only a
                // route that also decodes may take it.
                let decoded = path::normalize_path_decoding_separators(raw_path)?;
                let route = snap
                    .router
                    .find(host_name, req.method(), &decoded)
                    .ok_or(GatewayError::NoRoute)?;
                if route.service.escaped_slashes != EscapedSlashes::Decode {
                    return Err(PathError::EncodedSeparator.into());
                }
                (route, std::borrow::Cow::Owned(decoded.into_owned()))
            }
        }
    };
    // The same request must route the same however the backend reads the path: with `;`
    // segment parameters removed (servlet containers), and, on a `keep` route, with its escaped
    // separators decoded. A reading that reaches another route is refused.
    // (A reading that reaches no route reaches only this route's backend, under this route's
    // checks: not ambiguous.)
    let ambiguous = |alt: &str| {
        snap.router
            .find(host_name, req.method(), alt)
            .is_some_and(|r| !Arc::ptr_eq(r, route))
    };
    if let Some(alt) = path::without_segment_params(&norm) {
        if ambiguous(&alt) {
            return Err(PathError::Ambiguous.into());
        }
    }
    if escapes.separators && route.service.escaped_slashes == EscapedSlashes::Keep {
        // Both orders a backend may take, from the path that goes upstream: parameters removed
        // then separators decoded (Tomcat), and decoded then parameters removed.
        let params_first = path::strip_segment_params(&norm)
            .map(|p| path::normalize_path_decoding_separators(&p).map(|c| c.into_owned()))
            .transpose()?;
        let decoded = path::normalize_path_decoding_separators(&norm)?;
        let decode_first =
            path::without_segment_params(&decoded).unwrap_or_else(|| decoded.into_owned());
        if params_first.iter().any(|p| ambiguous(p)) || ambiguous(&decode_first) {
            return Err(PathError::Ambiguous.into());
        }
    }
    let changed = match norm {
        std::borrow::Cow::Owned(p) => Some(p),
        std::borrow::Cow::Borrowed(_) => None,
    };
    Ok(Routed {
        service: route.service.clone(),
        normalized: changed,
        host,
    })
}

/// Step 1: refuse requests that two HTTP parsers could read differently, and find the
/// request's canonical authority. hyper (patched, see vendor/README.md) already refuses
/// Content-Length with Transfer-Encoding, repeated Content-Length, obs-fold and bad lengths;
/// this adds the checks on parsed headers, the same for HTTP/1 and HTTP/2:
/// one Host at most (required in HTTP/1.1); a Host that is a valid `host[:port]`; when the
/// request target carries an authority (HTTP/1 absolute form, HTTP/2 `:authority`) and a
/// Host is present too, both canonicalise to the same value; CONNECT is refused (405).
fn check_framing<B>(req: &Request<B>, tls: bool) -> Result<Option<Authority>, GatewayError> {
    if req.method() == http::Method::CONNECT {
        return Err(GatewayError::MethodNotAllowed("CONNECT"));
    }
    let headers = req.headers();
    let mut hosts = headers.get_all(header::HOST).iter();
    let host_header = hosts.next();
    if hosts.next().is_some() {
        return Err(GatewayError::BadRequest("more than one Host header"));
    }
    if host_header.is_none() && req.version() == http::Version::HTTP_11 {
        return Err(GatewayError::BadRequest(
            "HTTP/1.1 request without a Host header",
        ));
    }
    let port = host::default_port(tls);
    let from_header = host_header
        .map(|h| host::canonicalize(h.as_bytes(), port))
        .transpose()?;
    let from_target = req
        .uri()
        .authority()
        .map(|a| host::canonicalize(a.as_str().as_bytes(), port))
        .transpose()?;
    let host = match (from_header, from_target) {
        (Some(h), Some(t)) if h != t => return Err(HostError::Mismatch.into()),
        (Some(h), _) => Some(h),
        (None, t) => t,
    };
    let mut codings = headers.get_all(header::TRANSFER_ENCODING).iter();
    if let Some(te) = codings.next() {
        if !te.as_bytes().eq_ignore_ascii_case(b"chunked") || codings.next().is_some() {
            return Err(GatewayError::UnsupportedTransferCoding);
        }
    }
    Ok(host)
}

/// The request's canonical host without port (Host header, or the HTTP/2 authority); None
/// when absent or invalid.
pub fn request_host<B>(req: &Request<B>) -> Option<String> {
    check_framing(req, false)
        .ok()
        .flatten()
        .map(|a| a.host().to_string())
}

/// The client's X-Request-Id if it is sane (1-128 of `[A-Za-z0-9._:-]`), else a new random one.
fn request_id<B>(req: &Request<B>) -> String {
    if let Some(v) = req.headers().get(X_REQUEST_ID) {
        let b = v.as_bytes();
        if !b.is_empty()
            && b.len() <= 128
            && b.iter()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b':' | b'-'))
        {
            if let Ok(s) = v.to_str() {
                return s.to_string();
            }
        }
    }
    format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..))
}
