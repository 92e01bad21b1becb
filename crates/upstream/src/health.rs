//! Active health checks of static backends (the loop that runs them over the current snapshot
//! is the gateway's `health` module): `GET healthCheckPath` every `healthCheckInterval`.
//! The check speaks the backend's own scheme, TLS settings and HTTP version (`Backend::connect`).
//! A backend that answers with any status below 500 is healthy; a refused connection, a timeout
//! or a 5xx takes it out of rotation until a later check passes.

use std::time::Duration;

use http::{Request, StatusCode};

use super::Backend;
use hexgate_http::body::Body;

/// One check on a fresh connection (never a pooled one, so it measures the backend, not the pool).
pub async fn check(backend: &Backend, path: &str, timeout: Duration) -> bool {
    let attempt = async {
        let mut sender = backend.connect(timeout).await.ok()?;
        let mut req = Request::get(path)
            .header(http::header::HOST, backend.authority.as_str())
            .header(http::header::USER_AGENT, "hexgate-health-check")
            .body(Body::Empty)
            .ok()?;
        if sender.is_http2() {
            backend.for_http2(&mut req);
        } else {
            req.headers_mut().insert(
                http::header::CONNECTION,
                http::HeaderValue::from_static("close"),
            );
        }
        let resp = sender.try_send_request(req).await.ok()?;
        Some(resp.status() < StatusCode::INTERNAL_SERVER_ERROR)
    };
    matches!(tokio::time::timeout(timeout, attempt).await, Ok(Some(true)))
}
