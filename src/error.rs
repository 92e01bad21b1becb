//! One mapping from gateway errors to status codes, with the side that failed
//! (client, upstream or gateway) for logs and metrics; and [`Reject`], the refusal a pipeline
//! phase returns: the error and the response headers that go with it.

use http::{header, HeaderName, HeaderValue, Response, StatusCode};

use crate::auth::AuthError;
use crate::body::Body;
use crate::rules::path::PathError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Upstream,
    Gateway,
}

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("no route for this path")]
    NoRoute,
    #[error("{0}")]
    Unauthorized(#[from] AuthError),
    #[error("429 Too Many Requests")]
    TooManyRequests,
    /// Authenticated, but not allowed here (a scope the route requires is not granted).
    #[error("403 Forbidden: {0}")]
    Forbidden(String),
    /// The consumer's plan is unknown, or it has none and there is no default plan.
    #[error("403 Forbidden: {0}")]
    PlanRefused(#[from] crate::limits::PlanError),
    /// The client address is not allowed on the route (`ipAllow`, `ipDeny`).
    #[error("403 Forbidden: client address not allowed on this route")]
    IpDenied,
    #[error("limit store unavailable")]
    LimitsUnavailable,
    /// The route has `maxInFlight` requests in flight (or as many as the request's plan
    /// priority may fill): refused at once, never queued.
    #[error("503 Service Unavailable: too many requests in flight on this route")]
    Overloaded,
    #[error("bad request path: {0}")]
    BadPath(#[from] PathError),
    #[error("request body larger than the limit of {0} bytes")]
    BodyTooLarge(u64),
    #[error("invalid request body: {0}")]
    BadBody(String),
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    #[error("transfer coding not implemented: only chunked is accepted")]
    UnsupportedTransferCoding,
    #[error("bad host: {0}")]
    BadHost(#[from] crate::rules::host::HostError),
    #[error("method {0} is not allowed")]
    MethodNotAllowed(&'static str),
    #[error("{0}")]
    Headers(#[from] crate::rules::headers::HeaderError),
    #[error("the request body stopped arriving before it was complete")]
    RequestTimeout,
    #[error("no healthy backend")]
    NoHealthyBackend,
    #[error("could not connect to any backend")]
    ConnectFailed,
    #[error("upstream timed out")]
    UpstreamTimeout,
    /// A gRPC call's deadline passed while its client was still sending.
    #[error("deadline exceeded while the client was still sending")]
    DeadlineExceeded,
    #[error("upstream failed: {0}")]
    Upstream(String),
    /// TLS to the backend failed; `reason` is the `hexgate_upstream_errors_total` label. The
    /// client is told the reason only; the detail (backend, certificate error) is logged.
    #[error("upstream TLS failure ({reason})")]
    UpstreamTls {
        reason: &'static str,
        detail: String,
    },
    /// A gRPC request on a route whose backends speak HTTP/1.1 only.
    #[error("this route cannot carry gRPC: its backends speak HTTP/1.1")]
    GrpcNeedsHttp2,
    /// The backend's answer to an upgrade does not complete the handshake the client asked for
    /// (or switches protocols unasked); nothing is tunnelled.
    #[error("bad upgrade from the backend: {0}")]
    BadUpgrade(&'static str),
    #[error("{0}")]
    Internal(String),
}

impl GatewayError {
    pub fn status(&self) -> StatusCode {
        match self {
            GatewayError::NoRoute => StatusCode::NOT_FOUND,
            GatewayError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            GatewayError::TooManyRequests => StatusCode::TOO_MANY_REQUESTS,
            GatewayError::Forbidden(_) | GatewayError::PlanRefused(_) | GatewayError::IpDenied => {
                StatusCode::FORBIDDEN
            }
            GatewayError::LimitsUnavailable | GatewayError::Overloaded => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            GatewayError::BadPath(_) => StatusCode::BAD_REQUEST,
            GatewayError::BodyTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            GatewayError::BadBody(_) | GatewayError::BadRequest(_) | GatewayError::BadHost(_) => {
                StatusCode::BAD_REQUEST
            }
            GatewayError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            GatewayError::Headers(e) if e.is_too_large() => {
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
            }
            GatewayError::Headers(_) => StatusCode::BAD_REQUEST,
            GatewayError::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            GatewayError::UnsupportedTransferCoding => StatusCode::NOT_IMPLEMENTED,
            GatewayError::NoHealthyBackend | GatewayError::ConnectFailed => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            GatewayError::UpstreamTimeout | GatewayError::DeadlineExceeded => {
                StatusCode::GATEWAY_TIMEOUT
            }
            GatewayError::Upstream(_)
            | GatewayError::UpstreamTls { .. }
            | GatewayError::GrpcNeedsHttp2
            | GatewayError::BadUpgrade(_) => StatusCode::BAD_GATEWAY,
            GatewayError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn side(&self) -> Side {
        match self {
            GatewayError::NoRoute
            | GatewayError::BadPath(_)
            | GatewayError::BodyTooLarge(_)
            | GatewayError::BadBody(_)
            | GatewayError::BadRequest(_)
            | GatewayError::BadHost(_)
            | GatewayError::MethodNotAllowed(_)
            | GatewayError::Headers(_)
            | GatewayError::RequestTimeout
            | GatewayError::DeadlineExceeded
            | GatewayError::UnsupportedTransferCoding
            | GatewayError::Unauthorized(_)
            | GatewayError::Forbidden(_)
            | GatewayError::PlanRefused(_)
            | GatewayError::IpDenied
            | GatewayError::TooManyRequests => Side::Client,
            // Load shedding is the policy answering as configured, like a 429, and counted
            // (`InFlight::shed`): logging each refusal would flood the log at the very moment
            // the gateway is busiest.
            GatewayError::Overloaded => Side::Client,
            GatewayError::LimitsUnavailable => Side::Gateway,
            GatewayError::NoHealthyBackend
            | GatewayError::ConnectFailed
            | GatewayError::UpstreamTimeout
            | GatewayError::Upstream(_)
            | GatewayError::UpstreamTls { .. }
            | GatewayError::BadUpgrade(_) => Side::Upstream,
            GatewayError::GrpcNeedsHttp2 => Side::Gateway,
            GatewayError::Internal(_) => Side::Gateway,
        }
    }

    /// Framing problems leave the connection in an unknown state: answer, then close it. So does
    /// a failed upgrade: the client may already be sending bytes of the protocol it asked for.
    pub fn closes_connection(&self) -> bool {
        matches!(
            self,
            GatewayError::BadBody(_)
                | GatewayError::BadUpgrade(_)
                | GatewayError::BadRequest(_)
                | GatewayError::BadHost(_)
                | GatewayError::Headers(_)
                | GatewayError::MethodNotAllowed(_)
                | GatewayError::RequestTimeout
                | GatewayError::UnsupportedTransferCoding
                | GatewayError::BodyTooLarge(_)
        )
    }

    /// The gRPC status a refusal is given to a gRPC client: 12 UNIMPLEMENTED for no route (and
    /// a route that cannot carry gRPC), else by HTTP status: 401 → 16 UNAUTHENTICATED, 403 → 7
    /// PERMISSION_DENIED, 429 and 413 → 8 RESOURCE_EXHAUSTED, 503 → 14 UNAVAILABLE, 504 → 4
    /// DEADLINE_EXCEEDED, anything else 13 INTERNAL.
    pub fn grpc_status(&self) -> u8 {
        match self {
            GatewayError::NoRoute | GatewayError::GrpcNeedsHttp2 => 12,
            e => match e.status().as_u16() {
                401 => 16,
                403 => 7,
                413 | 429 => 8,
                503 => 14,
                504 => 4,
                _ => 13,
            },
        }
    }

    /// A short JSON error body carrying the request id.
    pub fn to_response(&self, request_id: &str) -> Response<Body> {
        let mut resp = json_error(self.status(), &self.to_string(), request_id);
        if self.closes_connection() {
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        resp
    }
}

/// A phase's refusal: the error (status, body, whether the connection closes) and the headers
/// the answer carries (WWW-Authenticate, Retry-After, RateLimit fields, ...).
#[derive(Debug)]
pub struct Reject {
    pub error: GatewayError,
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

impl Reject {
    pub fn new(error: GatewayError, headers: Vec<(HeaderName, HeaderValue)>) -> Self {
        Reject { error, headers }
    }

    /// The answer to the client: JSON, or for a gRPC request a gRPC answer (HTTP 200,
    /// trailers-only, `grpc-status` and `grpc-message`).
    pub fn to_response(self, request_id: &str, grpc: bool) -> Response<Body> {
        let mut resp = if grpc {
            grpc_error(self.error.grpc_status(), &self.error.to_string())
        } else {
            self.error.to_response(request_id)
        };
        for (name, value) in self.headers {
            resp.headers_mut().insert(name, value);
        }
        resp
    }
}

impl<E: Into<GatewayError>> From<E> for Reject {
    fn from(e: E) -> Self {
        Reject {
            error: e.into(),
            headers: Vec::new(),
        }
    }
}

pub fn json_error(status: StatusCode, message: &str, request_id: &str) -> Response<Body> {
    let body = serde_json::json!({
        "error": message,
        "status": status.as_u16(),
        "requestId": request_id,
    })
    .to_string();
    let mut resp = Response::new(Body::full(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// A trailers-only gRPC answer (gRPC over HTTP/2, "Responses"): HTTP 200 and one HEADERS frame
/// ending the stream with `grpc-status` and the percent-encoded `grpc-message`.
pub fn grpc_error(status: u8, message: &str) -> Response<Body> {
    let mut resp = Response::new(Body::Empty);
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    h.insert(GRPC_STATUS.clone(), HeaderValue::from(u16::from(status)));
    if let Ok(v) = HeaderValue::from_str(&grpc_percent_encode(message)) {
        h.insert(GRPC_MESSAGE.clone(), v);
    }
    resp
}

pub static GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
pub static GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");

/// `grpc-message` encoding: bytes outside printable ASCII, and `%`, as `%XX`.
fn grpc_percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod grpc_tests {
    use super::*;

    #[test]
    fn refusals_map_to_the_grpc_codes_of_the_spec() {
        for (e, code) in [
            (GatewayError::NoRoute, 12),
            (GatewayError::TooManyRequests, 8),
            (GatewayError::BodyTooLarge(1), 8),
            (GatewayError::NoHealthyBackend, 14),
            (GatewayError::ConnectFailed, 14),
            (GatewayError::IpDenied, 7),
            (GatewayError::Overloaded, 14),
            (GatewayError::UpstreamTimeout, 4),
            (GatewayError::Upstream("x".into()), 13),
            (GatewayError::GrpcNeedsHttp2, 12),
            (GatewayError::Internal("x".into()), 13),
        ] {
            assert_eq!(e.grpc_status(), code, "{e:?}");
            let r = Reject::from(e).to_response("id", true);
            assert_eq!(r.status(), StatusCode::OK);
            assert_eq!(r.headers()["grpc-status"], code.to_string().as_str());
            assert_eq!(r.headers()["content-type"], "application/grpc");
        }
    }

    #[test]
    fn grpc_messages_are_percent_encoded() {
        assert_eq!(grpc_percent_encode("a b%c\u{e9}\n"), "a b%25c%C3%A9%0A");
    }
}
