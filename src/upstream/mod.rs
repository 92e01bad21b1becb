//! Upstream backends: keep-alive connection pools, balancing (round robin, least-request P2C),
//! passive ejection and the state that active health checks update.
//!
//! A `Backend` is shared by every snapshot that names the same address, so a reload keeps its
//! connections and health state (see `BackendSet`).

pub mod health;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::body::Body;
use crate::config::{BackendAddr, LoadBalancing};

/// Idle connections kept per backend.
const MAX_IDLE_PER_BACKEND: usize = 1024;
/// How long an idle pooled connection may wait before it is dropped.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
const EJECT_BASE: Duration = Duration::from_secs(1);
const EJECT_MAX: Duration = Duration::from_secs(30);

pub type Sender = http1::SendRequest<Body>;

/// Most worker runtimes a process runs; slot 0 is the control runtime.
pub const MAX_WORKERS: usize = 64;

thread_local! {
    static WORKER: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Marks the current thread as worker `id` (1-based), so it uses its own idle-connection list:
/// a connection is driven by the runtime that opened it, so it is reused only from there.
pub fn set_worker(id: usize) {
    WORKER.with(|w| w.set(id.min(MAX_WORKERS)));
}

/// The current thread's worker id (0 for the control runtime).
pub fn worker_slot() -> usize {
    WORKER.with(|w| w.get())
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect to {0} timed out")]
    Timeout(String),
    #[error("connect to {0}: {1}")]
    Io(String, std::io::Error),
    #[error("handshake with {0}: {1}")]
    Handshake(String, hyper::Error),
}

struct Idle {
    sender: Sender,
    since: Instant,
}

/// One backend address with its connection pool and health.
pub struct Backend {
    pub addr: BackendAddr,
    /// `host:port`, used as the URI authority upstream.
    pub authority: String,
    /// Idle connections per worker runtime (index 0: control runtime).
    idle: Box<[Mutex<Vec<Idle>>]>,
    pub in_flight: AtomicUsize,
    /// Set by active health checks.
    active_healthy: AtomicBool,
    /// Milliseconds since `epoch()` until which the backend is ejected (passive health).
    ejected_until_ms: AtomicU64,
    consecutive_failures: AtomicU32,
}

fn epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_ms() -> u64 {
    epoch().elapsed().as_millis() as u64
}

impl Backend {
    pub fn new(addr: BackendAddr) -> Self {
        Backend {
            authority: addr.authority(),
            addr,
            idle: (0..=MAX_WORKERS).map(|_| Mutex::new(Vec::new())).collect(),
            in_flight: AtomicUsize::new(0),
            active_healthy: AtomicBool::new(true),
            ejected_until_ms: AtomicU64::new(0),
            consecutive_failures: AtomicU32::new(0),
        }
    }

    pub fn is_healthy(&self) -> bool {
        self.active_healthy.load(Ordering::Relaxed)
            && self.ejected_until_ms.load(Ordering::Relaxed) <= now_ms()
    }

    pub fn set_active_health(&self, ok: bool) {
        self.active_healthy.store(ok, Ordering::Relaxed);
        if ok {
            self.consecutive_failures.store(0, Ordering::Relaxed);
            self.ejected_until_ms.store(0, Ordering::Relaxed);
        }
    }

    /// Passive health: eject for an exponentially growing back-off after a failure.
    pub fn record_failure(&self) {
        let n = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        let backoff = EJECT_BASE
            .saturating_mul(1u32 << (n - 1).min(5))
            .min(EJECT_MAX);
        self.ejected_until_ms
            .store(now_ms() + backoff.as_millis() as u64, Ordering::Relaxed);
    }

    pub fn record_success(&self) {
        if self.consecutive_failures.load(Ordering::Relaxed) != 0 {
            self.consecutive_failures.store(0, Ordering::Relaxed);
            self.ejected_until_ms.store(0, Ordering::Relaxed);
        }
    }

    fn pop_idle(&self) -> Option<Sender> {
        let mut idle = self.idle[worker_slot()].lock().ok()?;
        while let Some(i) = idle.pop() {
            if !i.sender.is_closed() && i.since.elapsed() < POOL_IDLE_TIMEOUT {
                return Some(i.sender);
            }
        }
        None
    }

    fn push_idle(&self, sender: Sender) {
        if sender.is_closed() {
            return;
        }
        if let Ok(mut idle) = self.idle[worker_slot()].lock() {
            if idle.len() < MAX_IDLE_PER_BACKEND {
                idle.push(Idle {
                    sender,
                    since: Instant::now(),
                });
            }
        }
    }

    pub fn idle_count(&self) -> usize {
        self.idle
            .iter()
            .map(|i| i.lock().map(|i| i.len()).unwrap_or(0))
            .sum()
    }

    /// A ready connection: a pooled one if any is still open, else a new one.
    pub async fn checkout(
        self: &Arc<Self>,
        connect_timeout: Duration,
    ) -> Result<(Sender, bool), ConnectError> {
        while let Some(mut s) = self.pop_idle() {
            if s.is_ready() {
                return Ok((s, true));
            }
            // A connection whose previous response just ended becomes ready within moments.
            if let Ok(Ok(())) = tokio::time::timeout(Duration::from_millis(50), s.ready()).await {
                return Ok((s, true));
            }
        }
        Ok((self.connect(connect_timeout).await?, false))
    }

    pub async fn connect(&self, timeout: Duration) -> Result<Sender, ConnectError> {
        let stream = match tokio::time::timeout(
            timeout,
            TcpStream::connect(self.authority.as_str()),
        )
        .await
        {
            Err(_) => return Err(ConnectError::Timeout(self.authority.clone())),
            Ok(Err(e)) => return Err(ConnectError::Io(self.authority.clone(), e)),
            Ok(Ok(s)) => s,
        };
        let _ = stream.set_nodelay(true);
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ConnectError::Handshake(self.authority.clone(), e))?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "upstream connection ended with error");
            }
        });
        Ok(sender)
    }
}

/// Gives a connection back to its backend's pool when a response body has been read to the end.
pub struct PoolReturn {
    backend: Arc<Backend>,
    sender: Sender,
}

impl PoolReturn {
    pub fn new(backend: Arc<Backend>, sender: Sender) -> Self {
        PoolReturn { backend, sender }
    }

    pub fn give_back(self) {
        self.backend.push_idle(self.sender);
    }
}

/// The current members of a pool: static backends first, then discovered ones; `schedule` repeats
/// each member's index by its weight (Consul's `Weights.Passing`), so balancing honours weights.
pub struct Members {
    pub backends: Vec<Arc<Backend>>,
    /// How many of `backends` (from the start) are static.
    pub static_count: usize,
    schedule: Vec<u32>,
}

impl Members {
    fn new(backends: Vec<(Arc<Backend>, u32)>, static_count: usize) -> Members {
        let mut schedule = Vec::new();
        // Interleave by weight (1, 2, ..., max) so a heavy backend's turns are spread out.
        let max = backends.iter().map(|(_, w)| *w).max().unwrap_or(1);
        for round in 1..=max {
            for (i, (_, w)) in backends.iter().enumerate() {
                if *w >= round {
                    schedule.push(i as u32);
                }
            }
        }
        Members {
            backends: backends.into_iter().map(|(b, _)| b).collect(),
            static_count,
            schedule,
        }
    }
}

/// The backends of one service and how to choose among them.
pub struct Pool {
    pub static_backends: Vec<Arc<Backend>>,
    members: ArcSwap<Members>,
    lb: LoadBalancing,
    next: AtomicUsize,
}

impl Pool {
    pub fn new(backends: Vec<Arc<Backend>>, lb: LoadBalancing) -> Self {
        let n = backends.len();
        Pool {
            members: ArcSwap::from_pointee(Members::new(
                backends.iter().map(|b| (b.clone(), 1)).collect(),
                n,
            )),
            static_backends: backends,
            lb,
            next: AtomicUsize::new(0),
        }
    }

    /// Replaces the discovered part of the pool. Backends are looked up in `set`, so one that
    /// stays keeps its connections and passive-health state.
    pub fn set_discovered(&self, set: &BackendSet, discovered: &[(BackendAddr, u32)]) {
        let mut all: Vec<(Arc<Backend>, u32)> = self
            .static_backends
            .iter()
            .map(|b| (b.clone(), 1))
            .collect();
        for (addr, weight) in discovered {
            if self.static_backends.iter().any(|b| &b.addr == addr) {
                continue;
            }
            all.push((set.get_or_create(addr), (*weight).max(1)));
        }
        self.members
            .store(Arc::new(Members::new(all, self.static_backends.len())));
    }

    pub fn members(&self) -> Arc<Members> {
        self.members.load_full()
    }

    pub fn len(&self) -> usize {
        self.members.load().backends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Picks a healthy backend not in `tried` (a bitmask of member indexes already attempted).
    pub fn pick(&self, tried: u64) -> Option<(usize, Arc<Backend>)> {
        let m = self.members.load();
        let n = m.schedule.len();
        if n == 0 {
            return None;
        }
        let usable = |i: usize| (i >= 64 || tried & (1 << i) == 0) && m.backends[i].is_healthy();
        let at = |k: usize| m.schedule[k % n] as usize;
        let chosen = match self.lb {
            LoadBalancing::RoundRobin => {
                let start = self.next.fetch_add(1, Ordering::Relaxed);
                (0..n).map(|k| at(start + k)).find(|i| usable(*i))
            }
            LoadBalancing::LeastRequest => {
                let a = at(fastrand::usize(..n));
                let b = at(fastrand::usize(..n));
                match (usable(a), usable(b)) {
                    (true, true) => {
                        let la = m.backends[a].in_flight.load(Ordering::Relaxed);
                        let lb = m.backends[b].in_flight.load(Ordering::Relaxed);
                        Some(if lb < la { b } else { a })
                    }
                    (true, false) => Some(a),
                    (false, true) => Some(b),
                    (false, false) => {
                        let start = fastrand::usize(..n);
                        (0..n).map(|k| at(start + k)).find(|i| usable(*i))
                    }
                }
            }
        };
        chosen.map(|i| (i, m.backends[i].clone()))
    }
}

/// Every backend alive in any snapshot, by address, so a reload reuses pools and health state.
#[derive(Default)]
pub struct BackendSet {
    map: Mutex<HashMap<BackendAddr, Weak<Backend>>>,
}

impl BackendSet {
    pub fn get_or_create(&self, addr: &BackendAddr) -> Arc<Backend> {
        let mut map = match self.map.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        if let Some(b) = map.get(addr).and_then(Weak::upgrade) {
            return b;
        }
        let b = Arc::new(Backend::new(addr.clone()));
        map.insert(addr.clone(), Arc::downgrade(&b));
        map.retain(|_, w| w.strong_count() > 0);
        b
    }
}
