//! Service discovery from Consul: one watcher (a blocking query loop) per distinct
//! (service, tags, datacenter), shared by every route that names it, reconciled with each snapshot:
//! watchers still named keep running, removed ones stop, new ones start.

pub mod consul;
pub mod kv;

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;

use consul::{ConsulClient, Instance};
use hexgate_config::BackendAddr;
use hexgate_upstream::{BackendSet, Pool};

/// How long a blocking query waits for a change before Consul answers anyway.
const WAIT: Duration = Duration::from_secs(30);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

pub const CONSUL_LAST_SYNC: &str = "hexgate_consul_last_sync_timestamp_seconds";
pub const CONSUL_ERRORS_TOTAL: &str = "hexgate_consul_errors_total";

/// What one watcher follows.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct WatchKey {
    pub service: String,
    pub tags: Vec<String>,
    pub datacenter: Option<String>,
}

impl WatchKey {
    pub fn label(&self) -> String {
        let mut s = self.service.clone();
        if !self.tags.is_empty() {
            s.push_str(&format!("[{}]", self.tags.join(",")));
        }
        if let Some(dc) = &self.datacenter {
            s.push_str(&format!("@{dc}"));
        }
        s
    }
}

struct Watch {
    key: WatchKey,
    instances: ArcSwap<Vec<Instance>>,
    subscribers: Mutex<Vec<Weak<Pool>>>,
    last_sync: AtomicU64,
    synced: AtomicBool,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// The instances as `pool` speaks to them: an instance that declares no scheme is `https` in
/// a pool with `upstreamTls` (TLS is the operator's intent there), else `http`.
fn for_pool(pool: &Pool, instances: &[consul::Instance]) -> Vec<(BackendAddr, u32)> {
    let fallback = if pool.profile.tls.is_some() {
        hexgate_config::Scheme::Https
    } else {
        hexgate_config::Scheme::Http
    };
    instances
        .iter()
        .map(|i| {
            let mut addr = i.addr.clone();
            addr.scheme = i.declared.unwrap_or(fallback);
            (addr, i.weight)
        })
        .collect()
}

impl Watch {
    fn publish(&self, backends: &BackendSet) {
        let instances = self.instances.load();
        let mut subs = match self.subscribers.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        subs.retain(|w| match w.upgrade() {
            Some(pool) => {
                pool.set_discovered(backends, &for_pool(&pool, &instances));
                true
            }
            None => false,
        });
    }
}

/// The discovery side of a process: the Consul client and the running watchers.
pub struct Discovery {
    client: Option<ConsulClient>,
    watches: Mutex<HashMap<WatchKey, Arc<Watch>>>,
    pub errors: AtomicU64,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Discovery {
    pub fn new(client: Option<ConsulClient>) -> Arc<Discovery> {
        Arc::new(Discovery {
            client,
            watches: Mutex::new(HashMap::new()),
            errors: AtomicU64::new(0),
        })
    }

    pub fn client(&self) -> Option<&ConsulClient> {
        self.client.as_ref()
    }

    /// Attaches every discovered pool (a snapshot's, with the key it follows) to its watcher (starting new watchers) and stops
    /// watchers no route names any more. Called before the snapshot is swapped in, so new pools
    /// start with the last known members.
    pub fn reconcile<'a>(
        self: &Arc<Self>,
        pools: impl IntoIterator<Item = (&'a WatchKey, &'a Arc<Pool>)>,
        backends: &Arc<BackendSet>,
    ) {
        let Some(client) = &self.client else { return };
        let mut watches = match self.watches.lock() {
            Ok(w) => w,
            Err(p) => p.into_inner(),
        };
        let mut wanted = HashSet::new();
        for (key, pool) in pools {
            wanted.insert(key.clone());
            let watch = watches
                .entry(key.clone())
                .or_insert_with(|| {
                    let w = Arc::new(Watch {
                        key: key.clone(),
                        instances: ArcSwap::from_pointee(Vec::new()),
                        subscribers: Mutex::new(Vec::new()),
                        last_sync: AtomicU64::new(0),
                        synced: AtomicBool::new(false),
                        task: Mutex::new(None),
                    });
                    let handle = tokio::spawn(run_watch(
                        Arc::downgrade(self),
                        Arc::downgrade(&w),
                        client.clone(),
                        backends.clone(),
                    ));
                    if let Ok(mut t) = w.task.lock() {
                        *t = Some(handle);
                    }
                    tracing::info!(watch = %key.label(), "started Consul watch");
                    w
                })
                .clone();
            if let Ok(mut subs) = watch.subscribers.lock() {
                subs.push(Arc::downgrade(pool));
            }
            pool.set_discovered(backends, &for_pool(pool, &watch.instances.load()));
        }
        watches.retain(|k, w| {
            let keep = wanted.contains(k);
            if !keep {
                if let Ok(mut t) = w.task.lock() {
                    if let Some(h) = t.take() {
                        h.abort();
                    }
                }
                tracing::info!(watch = %k.label(), "stopped Consul watch (no route uses it)");
            }
            keep
        });
    }

    /// True when every watcher has answered at least once.
    pub fn synced(&self) -> bool {
        match self.watches.lock() {
            Ok(w) => w.values().all(|w| w.synced.load(Ordering::Relaxed)),
            Err(_) => false,
        }
    }

    pub fn watch_count(&self) -> usize {
        self.watches.lock().map(|w| w.len()).unwrap_or(0)
    }

    /// Appends the discovery families to a metrics exposition. `openmetrics`: the OpenMetrics
    /// format, where a counter family is named without the `_total` of its sample (this crate
    /// does not depend on the metrics crate's `Format` for one name).
    pub fn render(&self, out: &mut String, openmetrics: bool) {
        let _ = writeln!(out, "# HELP {CONSUL_LAST_SYNC} Unix time of the last successful answer for each Consul watch.");
        let _ = writeln!(out, "# TYPE {CONSUL_LAST_SYNC} gauge");
        if let Ok(w) = self.watches.lock() {
            let mut list: Vec<_> = w.values().collect();
            list.sort_by_key(|w| w.key.label());
            for w in list {
                let _ = writeln!(
                    out,
                    "{CONSUL_LAST_SYNC}{{watch=\"{}\"}} {}",
                    w.key.label(),
                    w.last_sync.load(Ordering::Relaxed)
                );
            }
        }
        let family = if openmetrics {
            CONSUL_ERRORS_TOTAL
                .strip_suffix("_total")
                .unwrap_or(CONSUL_ERRORS_TOTAL)
        } else {
            CONSUL_ERRORS_TOTAL
        };
        let _ = writeln!(
            out,
            "# HELP {family} Failed Consul queries (discovery and config)."
        );
        let _ = writeln!(out, "# TYPE {family} counter");
        let _ = writeln!(
            out,
            "{CONSUL_ERRORS_TOTAL} {}",
            self.errors.load(Ordering::Relaxed)
        );
    }
}

/// Exponential back-off with jitter, capped.
pub fn backoff(failures: u32) -> Duration {
    let base = Duration::from_millis(250).saturating_mul(1u32 << failures.min(6));
    let capped = base.min(BACKOFF_MAX);
    capped.mul_f64(0.5 + fastrand::f64())
}

async fn run_watch(
    discovery: Weak<Discovery>,
    watch: Weak<Watch>,
    client: ConsulClient,
    backends: Arc<BackendSet>,
) {
    let mut index = 0u64;
    let mut failures = 0u32;
    loop {
        let Some(key) = watch.upgrade().map(|w| w.key.clone()) else {
            return;
        };
        let res = client
            .health_service(
                &key.service,
                &key.tags,
                key.datacenter.as_deref(),
                index,
                WAIT,
            )
            .await;
        let Some(w) = watch.upgrade() else { return };
        match res {
            Ok((instances, new_index)) => {
                if failures > 0 {
                    tracing::info!(watch = %key.label(), "Consul reachable again");
                }
                failures = 0;
                // An index that goes backwards (Consul restarted) means: start over.
                index = if new_index < index { 0 } else { new_index };
                w.last_sync.store(unix_now(), Ordering::Relaxed);
                w.synced.store(true, Ordering::Relaxed);
                if **w.instances.load() != instances {
                    tracing::info!(
                        watch = %key.label(),
                        backends = ?instances.iter().map(|i| i.addr.to_string()).collect::<Vec<_>>(),
                        "discovered pool changed"
                    );
                    w.instances.store(Arc::new(instances));
                    w.publish(&backends);
                }
                if index == 0 {
                    // Without an index Consul does not block; avoid a busy loop.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
            Err(e) => {
                if let Some(d) = discovery.upgrade() {
                    d.errors.fetch_add(1, Ordering::Relaxed);
                }
                let wait = backoff(failures);
                if failures == 0 || failures.is_power_of_two() {
                    tracing::warn!(watch = %key.label(), error = %e, retry_in = ?wait, "Consul query failed; keeping the last known pool");
                }
                failures += 1;
                index = 0;
                drop(w);
                tokio::time::sleep(wait).await;
            }
        }
    }
}
