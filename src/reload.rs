//! Hot reload of a config file: the file is watched (its modification time, size and content are
//! checked twice a second; a changed file is loaded once it has stayed the same for 100 ms) and
//! SIGHUP forces a reload. A bad or empty file is logged and counted, and the running snapshot
//! stays. The API keys are watched too: their file the same way, or their Consul KV key with
//! blocking queries (`watch_api_keys`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::auth::apikeys::ApiKeyStore;
use crate::compile::ApiKeySource;
use crate::discovery::consul::ConsulClient;
use crate::snapshot::Snapshot;
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

/// How long a blocking query on `apiKeys.consulKey` waits before Consul answers anyway.
const KEYS_WAIT: Duration = Duration::from_secs(55);
/// How often a watcher blocked on Consul looks whether a reload changed the key source.
const SOURCE_CHECK: Duration = Duration::from_millis(50);

/// Backoff after `failures` failed Consul queries in a row: 1 s, 2 s, 4 s, 8 s, then 10 s.
fn keys_backoff(failures: u32) -> Duration {
    Duration::from_secs(1u64 << failures.min(4)).min(Duration::from_secs(10))
}

/// The API key list followed in Consul KV (one `apiKeys.consulKey` feeding one store).
struct KvKeys {
    key: String,
    store: Arc<ApiKeyStore>,
    /// The X-Consul-Index to block on (0: answer at once).
    index: u64,
    /// The value last taken in (`Some(None)`: the key was missing), so an answer that changes
    /// nothing (a blocking query timing out) neither reinstalls nor logs.
    seen: Option<Option<String>>,
    /// Failed queries in a row.
    failures: u32,
}

/// Resolves once the current snapshot's API keys are no longer fed into `store` (a reload
/// changed or dropped the source: the same source always keeps its store).
async fn source_moved(state: &State, store: &Arc<ApiKeyStore>) {
    loop {
        tokio::time::sleep(SOURCE_CHECK).await;
        match &state.snapshot.load().api_keys {
            Some(k) if Arc::ptr_eq(&k.store, store) => {}
            _ => return,
        }
    }
}

/// One query on the key list in Consul (blocking once an index is known), raced against a
/// reload moving the source, and what it found installed: a value that parses replaces the key
/// set, one that does not is logged (file:line: key, as for the file) and the last good set
/// stays, a missing key is an empty set (logged once). A failed query keeps the last good set
/// and backs off.
async fn follow_consul_keys(state: &State, client: &ConsulClient, w: &mut KvKeys) {
    // Without an index the query answers at once (and times out after 10 s, not 65).
    let wait = if w.index == 0 {
        Duration::ZERO
    } else {
        KEYS_WAIT
    };
    let answer = tokio::select! {
        a = client.kv_get(&w.key, w.index, wait) => a,
        _ = source_moved(state, &w.store) => return,
    };
    match answer {
        Ok((value, index)) => {
            if w.failures > 0 {
                tracing::info!(key = %w.key, "Consul answers again for apiKeys.consulKey");
            }
            w.failures = 0;
            // An index going backwards (Consul restored or restarted): start over.
            w.index = if index < w.index { 0 } else { index };
            let value = value.map(|(text, _)| text);
            if w.seen.as_ref() != Some(&value) {
                install_consul_keys(w, value.as_deref(), &state.snapshot.load());
                w.seen = Some(value);
            }
            if w.index == 0 {
                // Nothing to block on: do not spin.
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        Err(e) => {
            state
                .discovery
                .errors
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let wait = keys_backoff(w.failures);
            if w.failures == 0 || w.failures.is_power_of_two() {
                tracing::warn!(key = %w.key, error = %e, retry_in = ?wait, keys = w.store.len(), "Consul query for apiKeys.consulKey failed, keeping the last good keys");
            }
            w.failures += 1;
            w.index = 0;
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = source_moved(state, &w.store) => {}
            }
        }
    }
}

/// Installs a value of the key list read from Consul (None: the key does not exist).
fn install_consul_keys(w: &KvKeys, value: Option<&str>, snap: &Snapshot) {
    let Some(text) = value else {
        w.store.replace(&[]);
        tracing::warn!(key = %w.key, "apiKeys.consulKey does not exist in Consul: no API keys (every key refused) until it does");
        return;
    };
    let shown = crate::discovery::kv::source_name(&w.key);
    match crate::config::apikeys::parse_api_keys(text, &shown)
        .and_then(|e| known_plans(snap, e, &shown))
    {
        Ok(entries) => {
            w.store.replace(&entries);
            tracing::info!(key = %w.key, keys = entries.len(), "API keys loaded from Consul");
        }
        Err(errors) => {
            for e in &errors.0 {
                tracing::error!(
                    keys = w.store.len(),
                    "API keys in Consul rejected, keeping the last good keys: {e}"
                );
            }
        }
    }
}

/// Watches the API keys of the current snapshot until the process exits, following reloads
/// (a changed `apiKeys.file` or `apiKeys.consulKey`, or a switch between them, is followed from
/// the next poll; the same source keeps its store, see `Snapshot::build`).
///
/// `apiKeys.file` is polled twice a second: a changed file that parses replaces the key set at
/// once (a revoked key stops working within a second); one that does not is logged and the last
/// good set stays. Config reloads read the file too.
///
/// `apiKeys.consulKey` is followed with Consul blocking queries through `consul` (the process's
/// Consul client, made at start from the `consul` settings: a later change of those needs a
/// restart, as for discovery), so a change is live within a second on every instance; see
/// [`follow_consul_keys`]. `ready` is sent once the first answer for a Consul key was taken in
/// (or failed), or at once for a file: `run` waits for it, briefly, before serving.
pub async fn watch_api_keys(
    state: Arc<State>,
    consul: Option<ConsulClient>,
    ready: Option<tokio::sync::oneshot::Sender<()>>,
) {
    let mut ready = ready;
    let mut signal = move || {
        if let Some(r) = ready.take() {
            let _ = r.send(());
        }
    };
    let mut file: Option<FileWatch> = None;
    let mut kv: Option<KvKeys> = None;
    let mut no_client_logged = false;
    let mut pause = false;
    loop {
        if pause {
            tokio::time::sleep(POLL).await;
        }
        pause = true;
        let snap = state.snapshot.load_full();
        let Some(keys) = &snap.api_keys else {
            file = None;
            kv = None;
            signal();
            continue;
        };
        match &keys.source {
            ApiKeySource::File(path) => {
                kv = None;
                signal();
                // A file seen for the first time is read too (it may have changed since the
                // config load read it); installing the same keys again changes nothing.
                let w = match &mut file {
                    Some(w) if w.path == *path => w,
                    _ => file.insert(FileWatch::from_nothing(path.clone())),
                };
                poll_key_file(w, &keys.store, &snap).await;
            }
            ApiKeySource::Consul(key) => {
                file = None;
                let Some(client) = &consul else {
                    if !no_client_logged {
                        tracing::error!(key = %key, "apiKeys.consulKey needs Consul, which this process has no client for (bad consul settings at start): no API keys until a restart");
                        no_client_logged = true;
                    }
                    signal();
                    continue;
                };
                no_client_logged = false;
                let w = match &mut kv {
                    Some(w) if w.key == *key && Arc::ptr_eq(&w.store, &keys.store) => w,
                    _ => kv.insert(KvKeys {
                        key: key.clone(),
                        store: keys.store.clone(),
                        index: 0,
                        seen: None,
                        failures: 0,
                    }),
                };
                drop(snap);
                follow_consul_keys(&state, client, w).await;
                signal();
                pause = false;
            }
        }
    }
}

/// `entries` when every plan they name is one of the snapshot's plans (or no plans are
/// configured), else the keys naming others, by line: the list is refused and the last good set
/// stays, as for a list that does not parse.
fn known_plans(
    snap: &Snapshot,
    entries: Vec<crate::config::apikeys::ApiKeyEntry>,
    shown: &str,
) -> Result<Vec<crate::config::apikeys::ApiKeyEntry>, crate::config::ConfigErrors> {
    if let Some(plans) = &snap.plans {
        crate::config::apikeys::check_plans(&entries, shown, &|p| plans.get(p).is_some())?;
    }
    Ok(entries)
}

/// One poll of the key file: a change that parses replaces the key set in `store`.
async fn poll_key_file(w: &mut FileWatch, store: &ApiKeyStore, snap: &Snapshot) {
    let shown = w.path.display().to_string();
    match w.poll().await {
        Seen::Same => {}
        Seen::Unreadable(e) => {
            tracing::error!(file = %shown, error = %e, "API key file unreadable, keeping the last good keys");
        }
        Seen::Changed(bytes) => {
            match crate::config::apikeys::parse_api_keys(&String::from_utf8_lossy(&bytes), &shown)
                .and_then(|e| known_plans(snap, e, &shown))
            {
                Ok(entries) => {
                    store.replace(&entries);
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
}
