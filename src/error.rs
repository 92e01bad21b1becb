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
    #[error("limit store unavailable")]
    LimitsUnavailable,
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
    #[error("upstream failed: {0}")]
    Upstream(String),
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
            GatewayError::LimitsUnavailable => StatusCode::SERVICE_UNAVAILABLE,
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
            GatewayError::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            GatewayError::Upstream(_) | GatewayError::BadUpgrade(_) => StatusCode::BAD_GATEWAY,
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
            | GatewayError::UnsupportedTransferCoding
            | GatewayError::Unauthorized(_)
            | GatewayError::TooManyRequests => Side::Client,
            GatewayError::LimitsUnavailable => Side::Gateway,
            GatewayError::NoHealthyBackend
            | GatewayError::ConnectFailed
            | GatewayError::UpstreamTimeout
            | GatewayError::Upstream(_)
            | GatewayError::BadUpgrade(_) => Side::Upstream,
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

    /// The answer to the client.
    pub fn to_response(self, request_id: &str) -> Response<Body> {
        let mut resp = self.error.to_response(request_id);
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
