//! gRPC requests: how they are recognised, their deadline (`grpc-timeout`), and the
//! `grpc-status` of their answers for `hexgate_grpc_requests_total`. Refusals are turned into
//! gRPC answers by `error::Reject::to_response`; forwarding them over HTTP/2 is `forward`'s.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderName};
use http_body::Frame;

use crate::body::{Body, BodyError};
use crate::error::GRPC_STATUS;
use crate::metrics::ServiceMetrics;

/// What the pipeline knows of a gRPC request.
#[derive(Debug, Clone, Copy)]
pub struct Grpc {
    /// `grpc-timeout`: the request's deadline when shorter than the route's `timeouts.request`.
    pub deadline: Option<Duration>,
}

impl Grpc {
    /// Some for a gRPC request.
    pub fn of(headers: &HeaderMap) -> Option<Grpc> {
        is_grpc(headers).then(|| Grpc {
            deadline: timeout(headers),
        })
    }
}

static GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");

/// Whether a request is gRPC: `content-type` `application/grpc`, or `application/grpc+FORMAT`
/// or with parameters. gRPC-Web (`application/grpc-web*`) is not: it is plain HTTP/1.1-able.
pub fn is_grpc(headers: &HeaderMap) -> bool {
    let Some(ct) = headers.get(header::CONTENT_TYPE) else {
        return false;
    };
    let ct = ct.as_bytes();
    let Some(rest) = ct
        .get(..16)
        .filter(|p| p.eq_ignore_ascii_case(b"application/grpc"))
        .map(|_| &ct[16..])
    else {
        return false;
    };
    matches!(rest.first(), None | Some(b'+' | b';'))
}

/// The request's `grpc-timeout` (gRPC over HTTP/2: at most 8 digits and a unit, `H` `M` `S`
/// `m` `u` `n`); None when absent or malformed (then the route's timeout alone applies).
pub fn timeout(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get(&GRPC_TIMEOUT)?.as_bytes();
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b"H" => Duration::from_secs(n.saturating_mul(3600)),
        b"M" => Duration::from_secs(n.saturating_mul(60)),
        b"S" => Duration::from_secs(n),
        b"m" => Duration::from_millis(n),
        b"u" => Duration::from_micros(n),
        b"n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The `grpc-status` in a header block (a trailers-only answer's headers, or trailers).
pub fn status_of(headers: &HeaderMap) -> Option<u8> {
    headers.get(&GRPC_STATUS)?.to_str().ok()?.parse::<u8>().ok()
}

/// Counts a gRPC answer: at once when its `grpc-status` is in the headers (trailers-only, or a
/// refusal), else when its trailers pass (the body is wrapped to watch for them).
/// `code` is the HTTP status counted (a refusal's own, though its answer is a 200).
pub fn observe(
    metrics: Arc<ServiceMetrics>,
    code: u16,
    resp: http::Response<Body>,
) -> http::Response<Body> {
    if let Some(st) = status_of(resp.headers()) {
        metrics.grpc(code, Some(st));
        return resp;
    }
    if http_body::Body::is_end_stream(resp.body()) {
        metrics.grpc(code, None);
        return resp;
    }
    resp.map(|inner| {
        Body::Boxed(Box::pin(Watch {
            inner,
            metrics: Some(metrics),
            code,
        }))
    })
}

/// A gRPC response body on its way to the client, counted when its trailers pass (or when it
/// ends or is dropped without them).
struct Watch {
    inner: Body,
    /// Taken when counted.
    metrics: Option<Arc<ServiceMetrics>>,
    code: u16,
}

impl Watch {
    fn count(&mut self, status: Option<u8>) {
        if let Some(m) = self.metrics.take() {
            m.grpc(self.code, status);
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.count(None);
    }
}

impl http_body::Body for Watch {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        let res = Pin::new(&mut this.inner).poll_frame(cx);
        match &res {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(t) = f.trailers_ref() {
                    let st = status_of(t);
                    this.count(st);
                }
            }
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => this.count(None),
            Poll::Pending => {}
        }
        res
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn with(name: &'static str, v: &'static str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(name, HeaderValue::from_static(v));
        h
    }

    #[test]
    fn grpc_content_types_are_recognised_and_grpc_web_is_not() {
        for (ct, yes) in [
            ("application/grpc", true),
            ("application/grpc+proto", true),
            ("Application/GRPC;charset=utf-8", true),
            ("application/grpc-web", false),
            ("application/grpc-web+proto", false),
            ("application/grpcx", false),
            ("application/json", false),
            ("application/grp", false),
        ] {
            assert_eq!(is_grpc(&with("content-type", ct)), yes, "{ct}");
        }
        assert!(!is_grpc(&HeaderMap::new()));
    }

    #[test]
    fn grpc_timeouts_parse_by_the_spec() {
        for (v, d) in [
            ("1S", Some(Duration::from_secs(1))),
            ("250m", Some(Duration::from_millis(250))),
            ("2M", Some(Duration::from_secs(120))),
            ("1H", Some(Duration::from_secs(3600))),
            ("99999999u", Some(Duration::from_micros(99_999_999))),
            ("5n", Some(Duration::from_nanos(5))),
            ("123456789S", None),
            ("S", None),
            ("10", None),
            ("-1S", None),
            ("1s", None),
            ("", None),
        ] {
            assert_eq!(timeout(&with("grpc-timeout", v)), d, "{v:?}");
        }
    }
}
