//! The active health-check loop: every `healthCheckInterval`, one check
//! (`upstream::health::check`) per distinct static backend of the current snapshot.

use std::collections::HashSet;
use std::sync::Arc;

use crate::state::State;
use hexgate_upstream::health::check;

/// Runs until the process exits, checking the backends of whatever snapshot is current.
pub async fn run(state: Arc<State>) {
    loop {
        let snap = state.snapshot.load_full();
        let interval = snap.settings.health_check_interval;
        let timeout = snap.settings.health_check_timeout.min(interval);
        let mut seen = HashSet::new();
        let mut checks = Vec::new();
        for svc in snap.services.iter() {
            for b in svc.pools().flat_map(|p| p.static_backends.iter()) {
                // One check per backend (an address reached two ways is two backends).
                if seen.insert(Arc::as_ptr(b) as usize) {
                    let b = b.clone();
                    let path = svc.health_check_path.clone();
                    checks.push(tokio::spawn(async move {
                        let result = check(&b, &path, timeout).await;
                        let ok = result.is_ok();
                        if ok != b.is_healthy() {
                            match result {
                                Ok(()) => tracing::info!(backend = %b.addr, "backend healthy again"),
                                Err(e) => tracing::warn!(backend = %b.addr, error = %e, "backend failed its health check"),
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
