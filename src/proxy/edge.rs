//! Steps 1 and 3 of the pipeline: framing, host and request id, before routing; the declared
//! body size, after it (the limit is the route's).

use http::{header, Request};

use super::X_REQUEST_ID;
use crate::error::GatewayError;
use crate::rules::host::{self, Authority, HostError};
use crate::snapshot::ServiceRt;

/// Step 1: refuse requests that two HTTP parsers could read differently, and find the
/// request's canonical authority. hyper (patched, see vendor/README.md) already refuses
/// Content-Length with Transfer-Encoding, repeated Content-Length, obs-fold and bad lengths;
/// this adds the checks on parsed headers, the same for HTTP/1 and HTTP/2:
/// one Host at most (required in HTTP/1.1); a Host that is a valid `host[:port]`; when the
/// request target carries an authority (HTTP/1 absolute form, HTTP/2 `:authority`) and a
/// Host is present too, both canonicalise to the same value; CONNECT is refused (405).
pub fn check_framing<B>(req: &Request<B>, tls: bool) -> Result<Option<Authority>, GatewayError> {
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
pub fn request_id<B>(req: &Request<B>) -> String {
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
    crate::otel::context::hex32(fastrand::u128(..))
}

/// Step 3: a declared body over the route's `maxBodySize` is refused (413) before anything is
/// spent on it: no token verification, no limit charged. A body that turns out larger than it
/// declared (or chunked) is cut off while it streams (`body::ClientBody`).
pub fn declared_size<B>(req: &Request<B>, svc: &ServiceRt) -> Result<(), GatewayError> {
    let Some(max) = svc.max_body_size else {
        return Ok(());
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    match declared {
        Some(n) if n > max => Err(GatewayError::BodyTooLarge(max)),
        _ => Ok(()),
    }
}
