//! Hot reload of a config file: the file is watched (its modification time, size and content are
//! checked twice a second; a changed file is loaded once it has stayed the same for 100 ms) and
//! SIGHUP forces a reload. A bad or empty file is logged and counted, and the running snapshot
//! stays.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::state::{Source, State};

const POLL: Duration = Duration::from_millis(500);
/// How long a changed file must stay unchanged before it is loaded.
const SETTLE: Duration = Duration::from_millis(100);

/// What says a file changed: modification time and size, and on Unix the inode and change time
/// too (a file replaced by rename, or with its times reset, still shows as changed).
type Stamp = (SystemTime, u64, u64, i64, i64);

fn stamp(path: &PathBuf) -> Option<Stamp> {
    let m = std::fs::metadata(path).ok()?;
    #[cfg(unix)]
    let (ino, ctime, ctime_ns) = {
        use std::os::unix::fs::MetadataExt;
        (m.ino(), m.ctime(), m.ctime_nsec())
    };
    #[cfg(not(unix))]
    let (ino, ctime, ctime_ns) = (0, 0, 0);
    Some((m.modified().ok()?, m.len(), ino, ctime, ctime_ns))
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
                    let text = std::fs::read(&path).ok();
                    if text.is_some() && text != last_text {
                        // Only a file that holds still is loaded: one being written (truncated,
                        // then filled) is looked at again on the next poll.
                        tokio::time::sleep(SETTLE).await;
                        if std::fs::read(&path).ok() != text || stamp(&path) != now {
                            continue;
                        }
                        last_text = text;
                        do_reload(&state, "file change");
                    }
                    last = now;
                }
            }
        }
    }
}

/// Watches the API key file (`apiKeys.file`) of the current snapshot, twice a second: a changed
/// file that parses replaces the key set at once (a revoked key stops working within a second);
/// one that does not is logged and the last good set stays. Config reloads read the file too.
pub async fn watch_api_keys(state: Arc<State>) {
    let mut seen: Option<(PathBuf, Option<Stamp>, Option<Vec<u8>>)> = None;
    loop {
        tokio::time::sleep(POLL).await;
        let snap = state.snapshot.load_full();
        let Some(keys) = &snap.api_keys else {
            seen = None;
            continue;
        };
        let now = stamp(&keys.file);
        match &seen {
            Some((path, last, _)) if *path == keys.file && *last == now => continue,
            _ => {}
        }
        let text = match std::fs::read(&keys.file) {
            Ok(t) => Some(t),
            Err(e) => {
                tracing::error!(file = %keys.file.display(), error = %e, "API key file unreadable, keeping the last good keys");
                None
            }
        };
        let unchanged =
            matches!(&seen, Some((path, _, last_text)) if *path == keys.file && *last_text == text);
        seen = Some((keys.file.clone(), now, text.clone()));
        if unchanged {
            continue;
        }
        // A file seen for the first time is read too (it may have changed since the config
        // load read it); installing the same keys again changes nothing.
        tokio::time::sleep(SETTLE).await;
        let Some(bytes) = std::fs::read(&keys.file)
            .ok()
            .filter(|t| Some(t) == text.as_ref())
        else {
            // Still being written: looked at again on the next poll.
            seen = None;
            continue;
        };
        let shown = keys.file.display().to_string();
        match crate::config::apikeys::parse_api_keys(&String::from_utf8_lossy(&bytes), &shown) {
            Ok(entries) => {
                keys.store.replace(&entries);
                tracing::info!(file = %shown, keys = entries.len(), "API keys reloaded");
            }
            Err(errors) => {
                for e in &errors.0 {
                    tracing::error!("API key file rejected, keeping the last good keys: {e}");
                }
            }
        }
    }
}
