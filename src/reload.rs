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

/// A file watched by polling, for both watchers below: what a poll found.
enum Seen {
    Same,
    /// New contents that held still for `SETTLE`.
    Changed(Vec<u8>),
    Unreadable(std::io::Error),
}

/// The last stamp and contents of a watched file. A file is reported changed only when its
/// contents differ and held still for `SETTLE` (one being written, truncated then filled, is
/// looked at again on the next poll); an unreadable file is reported once per stamp.
struct FileWatch {
    path: PathBuf,
    stamp: Option<Stamp>,
    /// None until the first contents were taken in: the first poll then reports them.
    text: Option<Vec<u8>>,
}

impl FileWatch {
    /// Watching from what the file holds now (the caller has just read it).
    fn from_now(path: PathBuf) -> FileWatch {
        let mut w = FileWatch {
            path,
            stamp: None,
            text: None,
        };
        w.rebase();
        w
    }

    /// Watching from nothing: the first poll reports the file as changed.
    fn from_nothing(path: PathBuf) -> FileWatch {
        FileWatch {
            path,
            stamp: None,
            text: None,
        }
    }

    /// Takes what the file holds now as seen.
    fn rebase(&mut self) {
        self.stamp = stamp(&self.path);
        self.text = std::fs::read(&self.path).ok();
    }

    async fn poll(&mut self) -> Seen {
        let now = stamp(&self.path);
        if self.text.is_some() && now == self.stamp {
            return Seen::Same;
        }
        let text = match std::fs::read(&self.path) {
            Ok(t) => t,
            Err(e) => {
                let first = now != self.stamp || self.text.is_none();
                self.stamp = now;
                return if first {
                    Seen::Unreadable(e)
                } else {
                    Seen::Same
                };
            }
        };
        if self.text.as_ref() == Some(&text) {
            self.stamp = now;
            return Seen::Same;
        }
        tokio::time::sleep(SETTLE).await;
        if std::fs::read(&self.path).ok().as_ref() != Some(&text) || stamp(&self.path) != now {
            return Seen::Same;
        }
        self.stamp = now;
        self.text = Some(text.clone());
        Seen::Changed(text)
    }
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
    let mut file = FileWatch::from_now(path);
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
                file.rebase();
                do_reload(&state, "SIGHUP");
            }
            _ = tokio::time::sleep(POLL) => {
                if let Seen::Changed(_) = file.poll().await {
                    do_reload(&state, "file change");
                }
            }
        }
    }
}

/// Watches the API key file (`apiKeys.file`) of the current snapshot, twice a second: a changed
/// file that parses replaces the key set at once (a revoked key stops working within a second);
/// one that does not is logged and the last good set stays. Config reloads read the file too.
pub async fn watch_api_keys(state: Arc<State>) {
    let mut file: Option<FileWatch> = None;
    loop {
        tokio::time::sleep(POLL).await;
        let snap = state.snapshot.load_full();
        let Some(keys) = &snap.api_keys else {
            file = None;
            continue;
        };
        // A file seen for the first time is read too (it may have changed since the config
        // load read it); installing the same keys again changes nothing.
        let w = match &mut file {
            Some(w) if w.path == keys.file => w,
            _ => file.insert(FileWatch::from_nothing(keys.file.clone())),
        };
        let shown = keys.file.display().to_string();
        match w.poll().await {
            Seen::Same => {}
            Seen::Unreadable(e) => {
                tracing::error!(file = %shown, error = %e, "API key file unreadable, keeping the last good keys");
            }
            Seen::Changed(bytes) => {
                match crate::config::apikeys::parse_api_keys(
                    &String::from_utf8_lossy(&bytes),
                    &shown,
                ) {
                    Ok(entries) => {
                        keys.store.replace(&entries);
                        tracing::info!(file = %shown, keys = entries.len(), "API keys reloaded");
                    }
                    Err(errors) => {
                        for e in &errors.0 {
                            tracing::error!(
                                "API key file rejected, keeping the last good keys: {e}"
                            );
                        }
                    }
                }
            }
        }
    }
}
