//! Process-wide state: the current snapshot (swapped atomically on reload), the metric registry
//! and the backends shared across snapshots.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::sync::Notify;

use crate::compile::{compile, Compiled, Disk, Scope};
use crate::config::{self, Config, ConfigErrors};
use crate::metrics::Registry;
use crate::snapshot::{Fixed, Snapshot};
use crate::upstream::BackendSet;

/// Where the configuration comes from.
#[derive(Debug, Clone)]
pub enum Source {
    File(PathBuf),
    /// A Consul KV key, watched by `discovery::kv::watch`.
    ConsulKv(String),
    /// Built in (the demo); never reloaded.
    Embedded,
}

/// Settings given on the command line that win over every config version (so several instances
/// can share one config in Consul KV, each on its own ports).
#[derive(Debug, Clone, Copy, Default)]
pub struct Overrides {
    pub gateway_port: Option<u16>,
    pub admin_port: Option<u16>,
}

impl Overrides {
    pub fn apply(&self, cfg: &mut Config) {
        if let Some(p) = self.gateway_port {
            cfg.gateway_port = p;
        }
        if let Some(p) = self.admin_port {
            cfg.admin_port = p;
        }
    }
}

pub struct State {
    pub overrides: Overrides,
    pub snapshot: ArcSwap<Snapshot>,
    /// Limit state outlives snapshots: a reload does not reset anyone's limits.
    pub limiter: crate::limits::Limiter,
    pub metrics: Arc<Registry>,
    pub backends: Arc<BackendSet>,
    pub discovery: Arc<crate::discovery::Discovery>,
    pub health_wakeup: Notify,
    pub source: Source,
    /// What the process started with that a reload cannot change: every reload is compared
    /// with this, not with the reload before it.
    started: Fixed,
    generation: AtomicU64,
}

impl State {
    /// The state of a starting gateway, from its compiled config (overrides already applied).
    pub fn new(
        compiled: Compiled,
        source: Source,
        consul: Option<crate::discovery::consul::ConsulClient>,
        overrides: Overrides,
    ) -> Arc<State> {
        let metrics = Arc::new(Registry::default());
        let backends = Arc::new(BackendSet::default());
        let limiter = crate::limits::Limiter::new(&compiled.config, metrics.clone());
        let discovery = crate::discovery::Discovery::new(consul);
        let started = Fixed::of(&compiled.config);
        let snap = Snapshot::build(compiled, 1, &metrics, &backends, None, None);
        discovery.reconcile(snap.discovered_pools(), &backends);
        metrics.record_reload(true);
        Arc::new(State {
            overrides,
            limiter,
            snapshot: ArcSwap::from_pointee(snap),
            metrics,
            backends,
            discovery,
            health_wakeup: Notify::new(),
            source,
            started,
            generation: AtomicU64::new(1),
        })
    }

    /// Compiles `config` (as every reload does: `compile::Scope::Reload`), builds a snapshot
    /// from it and swaps it in; in-flight requests keep the old one.
    pub fn apply(&self, mut config: Config) -> Result<u64, ConfigErrors> {
        self.overrides.apply(&mut config);
        let compiled = compile(config, &Disk, Scope::Reload)?;
        let old = self.snapshot.load_full();
        let fixed = Fixed::of(&compiled.config);
        if let Some(reason) = self.started.restart_needed(&fixed) {
            tracing::warn!(%reason, "config change needs a restart to take effect; the rest is applied");
        }
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        let snap = Snapshot::build(
            compiled,
            generation,
            &self.metrics,
            &self.backends,
            old.auth.as_ref(),
            old.api_keys.as_ref(),
        );
        self.discovery
            .reconcile(snap.discovered_pools(), &self.backends);
        self.snapshot.store(Arc::new(snap));
        self.metrics.record_reload(true);
        self.health_wakeup.notify_one();
        Ok(generation)
    }

    /// Re-reads the source. On error the running snapshot stays and the failure is counted.
    pub fn reload(&self) -> Result<u64, ConfigErrors> {
        let Source::File(path) = &self.source else {
            return Ok(self.snapshot.load().generation);
        };
        let result = config::load_file_for_reload(path).and_then(|cfg| self.apply(cfg));
        if result.is_err() {
            self.metrics.record_reload(false);
        }
        result
    }
}

impl crate::discovery::kv::ConfigTarget for State {
    fn apply(&self, config: Config) -> Result<u64, ConfigErrors> {
        State::apply(self, config)
    }

    fn reload_failed(&self) {
        self.metrics.record_reload(false);
    }

    fn consul_error(&self) {
        self.discovery
            .errors
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}
