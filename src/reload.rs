//! Hot reload of a config file: the file is watched (its modification time, size and content are
//! checked twice a second) and SIGHUP forces a reload. A bad file is logged and counted, and the
//! running snapshot stays.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::state::{Source, State};

const POLL: Duration = Duration::from_millis(500);

fn stamp(path: &PathBuf) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

fn do_reload(state: &State, why: &str) {
    match state.reload() {
        Ok(generation) => tracing::info!(generation, trigger = why, "config reloaded"),
        Err(errors) => {
            for e in &errors.0 {
                tracing::error!(
                    trigger = why,
                    "config reload rejected, keeping the running config: {e}"
                );
            }
        }
    }
}

/// Watches the config file and SIGHUP until the process exits.
pub async fn watch(state: Arc<State>) {
    let Source::File(path) = state.source.clone() else {
        return;
    };
    let mut last = stamp(&path);
    let mut last_text = std::fs::read(&path).ok();
    #[cfg(unix)]
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    loop {
        #[cfg(unix)]
        let sighup = async {
            match hup.as_mut() {
                Some(h) => {
                    h.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        #[cfg(not(unix))]
        let sighup = std::future::pending::<()>();
        tokio::select! {
            _ = sighup => {
                last = stamp(&path);
                last_text = std::fs::read(&path).ok();
                do_reload(&state, "SIGHUP");
            }
            _ = tokio::time::sleep(POLL) => {
                let now = stamp(&path);
                if now != last {
                    last = now;
                    let text = std::fs::read(&path).ok();
                    if text.is_some() && text != last_text {
                        last_text = text;
                        do_reload(&state, "file change");
                    }
                }
            }
        }
    }
}
