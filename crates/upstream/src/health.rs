//! Active health checks of static backends (the loop that runs them over the current snapshot
//! is the gateway's `health` module): `GET healthCheckPath` every `healthCheckInterval`.
//! The check speaks the backend's own scheme, TLS settings and HTTP version (`Backend::connect`).
//! A backend that answers with any status below 500 is healthy; a refused connection, a timeout
//! or a 5xx takes it out of rotation until a later check passes.

use std::time::Duration;

use http::{Request, StatusCode};

use super::Backend;
use hexgate_http::body::Body;

/// One check on a fresh connection (never a pooled one, so it measures the backend, not the pool):
/// Ok when the backend is up, else why not. A TLS failure is also kept on the backend
/// (`Backend::tls_failure`), so requests refused for want of a healthy backend can say which.
///
/// An HTTP/2 backend that resets the check's stream is up: it answered, over a working
/// connection (gRPC servers refuse a GET this way).
pub async fn check(backend: &Backend, path: &str, timeout: Duration) -> Result<(), String> {
    let attempt = async {
        let mut sender = match backend.connect(timeout).await {
            Ok(s) => s,
            Err(e) => {
                if let crate::ConnectError::Tls { reason, .. } = &e {
                    backend.set_tls_failure(Some((reason, e.to_string())));
                }
                return Err(e.to_string());
            }
        };
        backend.set_tls_failure(None);
        let mut req = Request::get(path)
            .header(http::header::HOST, backend.authority.as_str())
            .header(http::header::USER_AGENT, "hexgate-health-check")
            .body(Body::Empty)
            .map_err(|e| e.to_string())?;
        let h2 = sender.is_http2();
        if h2 {
            backend.for_http2(&mut req);
        } else {
            req.headers_mut().insert(
                http::header::CONNECTION,
                http::HeaderValue::from_static("close"),
            );
        }
        match sender
            .try_send_request(req, tokio::time::Instant::now() + timeout)
            .await
        {
            Ok(resp) if resp.status() < StatusCode::INTERNAL_SERVER_ERROR => Ok(()),
            Ok(resp) => Err(format!("{path} answered {}", resp.status())),
            Err(e) => {
                let e = e.into_error();
                if h2 && crate::h2_failure(&e) == Some(crate::H2Failure::StreamReset) {
                    Ok(())
                } else {
                    Err(e.to_string())
                }
            }
        }
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {timeout:?}")),
    }
}
