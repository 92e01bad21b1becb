//! Active health checks of static backends: `GET healthCheckPath` every `healthCheckInterval`.
//! A backend that answers with any status below 500 is healthy; a refused connection, a timeout
//! or a 5xx takes it out of rotation until a later check passes.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, StatusCode};

use super::Backend;
use crate::body::Body;
use crate::state::State;

/// One check on a fresh connection (never a pooled one, so it measures the backend, not the pool).
pub async fn check(backend: &Backend, path: &str, timeout: Duration) -> bool {
    let attempt = async {
        let mut sender = backend.connect(timeout).await.ok()?;
        let req = Request::get(path)
            .header(http::header::HOST, backend.authority.as_str())
            .header(http::header::USER_AGENT, "hexgate-health-check")
            .header(http::header::CONNECTION, "close")
            .body(Body::Empty)
            .ok()?;
        let resp = sender.send_request(req).await.ok()?;
        Some(resp.status() < StatusCode::INTERNAL_SERVER_ERROR)
    };
    matches!(tokio::time::timeout(timeout, attempt).await, Ok(Some(true)))
}

/// Runs until the process exits, checking the backends of whatever snapshot is current.
pub async fn run(state: Arc<State>) {
    loop {
        let snap = state.snapshot.load_full();
        let interval = snap.config.health_check_interval;
        let timeout = snap.config.health_check_timeout.min(interval);
        let mut seen = HashSet::new();
        let mut checks = Vec::new();
        for svc in snap.services.iter() {
            for b in &svc.pool.static_backends {
                if seen.insert(b.authority.clone()) {
                    let b = b.clone();
                    let path = svc.health_check_path.clone();
                    checks.push(tokio::spawn(async move {
                        let ok = check(&b, &path, timeout).await;
                        if ok != b.is_healthy() {
                            if ok {
                                tracing::info!(backend = %b.addr, "backend healthy again");
                            } else {
                                tracing::warn!(backend = %b.addr, "backend failed its health check");
                            }
                        }
                        b.set_active_health(ok);
                    }));
                }
            }
        }
        drop(snap);
        for c in checks {
            let _ = c.await;
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = state.health_wakeup.notified() => {}
        }
    }
}
