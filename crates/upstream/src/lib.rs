//! Upstream backends: keep-alive connection pools, balancing (round robin, least-request P2C),
//! passive ejection and the state that active health checks update.
//!
//! A `Backend` is shared by every snapshot that names the same address, so a reload keeps its
//! connections and health state (see `BackendSet`).
//!
//! Passive ejection has a floor (in the spirit of Envoy's panic threshold): failures seen on
//! requests never eject more than half of any pool, or a route's `circuitBreaker.maxEjectedPercent`
//! of it (see [`record_failure`]), so no stream of requests, however bad, can empty one. Active
//! health checks are not bound by it.

pub mod health;
pub mod tls;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use http::{header, Request, Response, Uri, Version};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use hexgate_config::{BackendAddr, CircuitBreaker, LoadBalancing, Scheme, UpstreamProtocol};
use hexgate_http::body::{Body, IdleSink};
pub use tls::{tls_reason, Alpn, ClientTls, TlsConfigError, TlsMaterial};

/// Idle connections kept per backend.
const MAX_IDLE_PER_BACKEND: usize = 1024;
/// How long an idle pooled connection may wait before it is dropped.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
const EJECT_BASE: Duration = Duration::from_secs(1);
const EJECT_MAX: Duration = Duration::from_secs(30);
/// A circuit breaker's ejection grows to at most this many times `ejectFor`.
const BREAKER_MAX_FACTOR: u32 = 10;
/// How long a backend whose breaker streak reached its threshold, but whose ejection did not fit
/// a pool's floor, waits before the breaker looks for room again (see [`record_failure`]).
const BREAKER_RESCAN: Duration = Duration::from_millis(100);
/// The share of a pool passive ejection may take out without a `circuitBreaker` (half).
pub const DEFAULT_MAX_EJECTED_PERCENT: u32 = 50;

/// Passive-health counters of a backend, packed in one word so that a success (every answered
/// request) checks them all with one load: bits 0-23 gateway-side failures in a row (the
/// back-off without a circuit breaker), bits 24-47 failures or 5xx answers in a row (a circuit
/// breaker's streak), bits 48-62 circuit-breaker ejections in a row, bit 63 set while the
/// ejection in force is a circuit breaker's (it ends by time only, not by an active check).
mod word {
    pub(crate) const FAILS_SHIFT: u32 = 0;
    pub(crate) const STREAK_SHIFT: u32 = 24;
    pub(crate) const EJECTIONS_SHIFT: u32 = 48;
    pub(crate) const FIELD24: u64 = (1 << 24) - 1;
    pub(crate) const FIELD15: u64 = (1 << 15) - 1;
    pub(crate) const HELD: u64 = 1 << 63;

    pub(crate) fn fails(w: u64) -> u64 {
        (w >> FAILS_SHIFT) & FIELD24
    }
    pub(crate) fn streak(w: u64) -> u64 {
        (w >> STREAK_SHIFT) & FIELD24
    }
    pub(crate) fn ejections(w: u64) -> u64 {
        (w >> EJECTIONS_SHIFT) & FIELD15
    }
    pub(crate) fn with_fails(w: u64, v: u64) -> u64 {
        (w & !(FIELD24 << FAILS_SHIFT)) | (v.min(FIELD24) << FAILS_SHIFT)
    }
    pub(crate) fn with_streak(w: u64, v: u64) -> u64 {
        (w & !(FIELD24 << STREAK_SHIFT)) | (v.min(FIELD24) << STREAK_SHIFT)
    }
    pub(crate) fn with_ejections(w: u64, v: u64) -> u64 {
        (w & !(FIELD15 << EJECTIONS_SHIFT)) | (v.min(FIELD15) << EJECTIONS_SHIFT)
    }
}

/// A connection to a backend, ready to carry requests: HTTP/1.1 (one request at a time, pooled
/// while idle) or HTTP/2 (multiplexed: one connection per backend per worker, shared).
pub enum Sender {
    Http1(http1::SendRequest<Body>),
    /// A shared HTTP/2 connection and this request's claim on one of its streams (held until
    /// the response body is done: see [`StreamSlot`]).
    Http2(http2::SendRequest<Body>, StreamSlot),
}

/// One stream counted against its HTTP/2 connection while it lives, so the pool opens another
/// connection before a backend's concurrent-stream limit queues requests behind slow ones.
pub struct StreamSlot(Arc<AtomicUsize>);

impl StreamSlot {
    fn new(active: &Arc<AtomicUsize>) -> StreamSlot {
        active.fetch_add(1, Ordering::Relaxed);
        StreamSlot(active.clone())
    }

    /// The connection this slot is on (its identity in the pool).
    fn conn(&self) -> &Arc<AtomicUsize> {
        &self.0
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Sender {
    pub fn is_http2(&self) -> bool {
        matches!(self, Sender::Http2(..))
    }

    /// Sends `req`; on an error before anything was written, the request comes back.
    ///
    /// On HTTP/2 the exchange runs in its own task until the response head arrives (or
    /// `deadline`): a client that gives up early does not reset a stream the backend has not yet
    /// accepted. Backends count such resets as an attack ("rapid reset", CVE-2023-44487; hyper
    /// and tonic allow 20) and drop the connection, which here is shared by other clients' calls.
    /// A stream the backend answered can be reset freely.
    pub async fn try_send_request(
        &mut self,
        req: Request<Body>,
        deadline: tokio::time::Instant,
    ) -> Result<Response<Incoming>, hyper::client::conn::TrySendError<Request<Body>>> {
        match self {
            Sender::Http1(s) => s.try_send_request(req).await,
            Sender::Http2(s, _) => {
                let mut s = s.clone();
                let task = tokio::spawn(async move {
                    tokio::time::timeout_at(deadline, s.try_send_request(req)).await
                });
                match task.await {
                    Ok(Ok(result)) => result,
                    // The deadline passed (the caller has given up by then) or the task was
                    // cancelled at shutdown: the caller reports its own timeout.
                    Ok(Err(_)) | Err(_) => std::future::pending().await,
                }
            }
        }
    }
}

pub use hexgate_http::worker::{set_worker, worker_slot, MAX_WORKERS};

/// Why no connection to a backend could be made. [`ConnectError::reason`] is the `reason` label
/// of `hexgate_upstream_errors_total`.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect to {0} timed out")]
    Timeout(String),
    #[error("connect to {0}: {1}")]
    Io(String, std::io::Error),
    #[error("{addr}: {detail}")]
    Tls {
        addr: String,
        reason: &'static str,
        detail: String,
    },
    #[error("{0} did not agree on HTTP/2 by ALPN (upstreamProtocol: http2)")]
    NoHttp2(String),
    #[error("handshake with {0}: {1}")]
    Handshake(String, hyper::Error),
}

impl ConnectError {
    pub fn reason(&self) -> &'static str {
        match self {
            ConnectError::Timeout(_) => "connect_timeout",
            ConnectError::Io(..) => "connect_failed",
            ConnectError::Tls { reason, .. } => reason,
            ConnectError::NoHttp2(_) => "tls_handshake",
            ConnectError::Handshake(..) => "connection_error",
        }
    }
}

/// How a backend is spoken to on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Wire {
    /// Cleartext HTTP/1.1.
    Http1,
    /// Cleartext HTTP/2 with prior knowledge.
    H2c,
    /// TLS, then the HTTP version ALPN settles (offering these).
    Tls(Alpn),
}

/// A service's upstream settings (`upstreamProtocol`, `upstreamTls`): what any backend address of
/// its pool, static or discovered, is spoken to with.
#[derive(Debug, Clone, Default)]
pub struct Profile {
    pub protocol: UpstreamProtocol,
    /// `upstreamTls` (None: the system roots, SNI from the backend's host).
    pub tls: Option<Arc<ClientTls>>,
}

impl Profile {
    pub fn wire(&self, scheme: Scheme) -> Wire {
        match (scheme, self.protocol) {
            (Scheme::Http, UpstreamProtocol::Http2) => Wire::H2c,
            (Scheme::Http, _) => Wire::Http1,
            (Scheme::H2c, _) => Wire::H2c,
            (Scheme::Https, UpstreamProtocol::Auto) => Wire::Tls(Alpn::Both),
            (Scheme::Https, UpstreamProtocol::Http1) => Wire::Tls(Alpn::Http1),
            (Scheme::Https, UpstreamProtocol::Http2) => Wire::Tls(Alpn::Http2),
        }
    }

    /// The TLS a backend of `scheme` uses: this profile's, or the shared default (system roots).
    fn tls_for(&self, scheme: Scheme) -> Option<Arc<ClientTls>> {
        if scheme != Scheme::Https {
            return None;
        }
        self.tls.clone().or_else(default_tls)
    }
}

/// TLS for `https://` backends of services without `upstreamTls`.
fn default_tls() -> Option<Arc<ClientTls>> {
    static DEFAULT: std::sync::OnceLock<Option<Arc<ClientTls>>> = std::sync::OnceLock::new();
    DEFAULT
        .get_or_init(|| match ClientTls::build(&TlsMaterial::default()) {
            Ok(t) => Some(Arc::new(t)),
            Err(e) => {
                tracing::error!(error = %e, "default upstream TLS unavailable");
                None
            }
        })
        .clone()
}

struct Idle {
    sender: http1::SendRequest<Body>,
    since: Instant,
}

/// A shared HTTP/2 connection and how many streams it carries now.
struct H2Conn {
    sender: http2::SendRequest<Body>,
    active: Arc<AtomicUsize>,
}

/// HTTP/2 connections per backend per worker, and the streams each carries before another is
/// opened: below the concurrent-stream limits servers commonly set (nginx 128, gRPC 100), so
/// requests are not queued inside one connection while another could take them.
const H2_CONNS_PER_WORKER: usize = 4;
const H2_STREAMS_PER_CONN: usize = 90;
/// Flow-control windows of upstream HTTP/2 connections: a stream may have 1 MiB unread, the
/// connection 32 MiB, so a few clients that stop reading cannot stall the shared connection.
const H2_STREAM_WINDOW: u32 = 1 << 20;
const H2_CONN_WINDOW: u32 = 32 << 20;
/// Largest response header block accepted from an HTTP/2 backend (HTTP/1.1 backends get
/// hyper's own limit, of the same order).
const H2_MAX_HEADER_LIST: u32 = 256 << 10;

/// One backend address with its connection pool and health.
pub struct Backend {
    pub addr: BackendAddr,
    /// `host:port`, used as the URI authority upstream.
    pub authority: String,
    pub wire: Wire,
    tls: Option<Arc<ClientTls>>,
    /// Idle HTTP/1.1 connections per worker runtime (index 0: control runtime).
    idle: Box<[Mutex<Vec<Idle>>]>,
    /// The shared HTTP/2 connections per worker runtime (at most `H2_CONNS_PER_WORKER`).
    h2: Box<[Mutex<Vec<H2Conn>>]>,
    /// One HTTP/2 connect at a time per worker: requests arriving together share the connection
    /// the first one opens instead of each opening their own.
    h2_connecting: Box<[tokio::sync::Mutex<()>]>,
    /// An `https://` backend under `auto` answered ALPN with HTTP/1.1: connect without the gate.
    alpn_http1: AtomicBool,
    /// Whether the last TLS handshake saw a certificate request: 0 no, 1 yes and the
    /// configured certificate was presented, 2 yes and none is configured.
    cert_request: std::sync::atomic::AtomicU8,
    /// The TLS failure of the last active check (reason, detail), None once one passes.
    tls_failure: Mutex<Option<(&'static str, String)>>,
    pub in_flight: AtomicUsize,
    /// Set by active health checks.
    active_healthy: AtomicBool,
    /// Milliseconds since `epoch()` until which the backend is ejected (passive health).
    ejected_until_ms: AtomicU64,
    /// Failures, 5xx streak and ejections in a row (see [`word`]).
    passive: AtomicU64,
    /// Milliseconds since `epoch()` before which a circuit breaker does not look again for room
    /// to eject this backend: set when its streak reached the threshold but the ejection did not
    /// fit a pool's floor (see [`record_failure`]). Only read past the threshold.
    breaker_rescan_ms: AtomicU64,
}

fn epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_ms() -> u64 {
    epoch().elapsed().as_millis() as u64
}

impl Backend {
    /// A backend spoken to as a plain `Profile` says (HTTP/1.1 for `http://`).
    pub fn new(addr: BackendAddr) -> Self {
        Self::with_profile(addr, &Profile::default())
    }

    pub fn with_profile(addr: BackendAddr, profile: &Profile) -> Self {
        Backend {
            authority: addr.authority(),
            wire: profile.wire(addr.scheme),
            tls: profile.tls_for(addr.scheme),
            addr,
            idle: (0..=MAX_WORKERS).map(|_| Mutex::new(Vec::new())).collect(),
            h2: (0..=MAX_WORKERS).map(|_| Mutex::new(Vec::new())).collect(),
            h2_connecting: (0..=MAX_WORKERS)
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
            alpn_http1: AtomicBool::new(false),
            cert_request: std::sync::atomic::AtomicU8::new(0),
            tls_failure: Mutex::new(None),
            in_flight: AtomicUsize::new(0),
            active_healthy: AtomicBool::new(true),
            ejected_until_ms: AtomicU64::new(0),
            passive: AtomicU64::new(0),
            breaker_rescan_ms: AtomicU64::new(0),
        }
    }

    pub fn is_healthy(&self) -> bool {
        self.active_healthy.load(Ordering::Relaxed)
            && self.ejected_until_ms.load(Ordering::Relaxed) <= now_ms()
    }

    /// Sets the result of the last active check. A passing check ends a passive ejection for
    /// gateway-side failures (the backend answers again), but not a circuit breaker's: a
    /// backend can pass `healthCheckPath` and still answer requests with 5xx, so that ejection
    /// lasts its time.
    pub fn set_active_health(&self, ok: bool) {
        self.active_healthy.store(ok, Ordering::Relaxed);
        if ok && self.passive.load(Ordering::Relaxed) != 0 {
            let _ = self
                .passive
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |w| {
                    Some(word::with_fails(w, 0))
                });
            if self.passive.load(Ordering::Relaxed) & word::HELD == 0 {
                self.ejected_until_ms.store(0, Ordering::Relaxed);
            }
        }
    }

    /// Whether a passive ejection is in force at `now` (from `now_ms`).
    fn passively_ejected(&self, now: u64) -> bool {
        self.ejected_until_ms.load(Ordering::Relaxed) > now
    }

    /// Updates the passive-health word; returns the new value.
    fn update_passive(&self, f: impl Fn(u64) -> u64) -> u64 {
        let old = self
            .passive
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |w| Some(f(w)))
            .unwrap_or_else(|w| w);
        f(old)
    }

    /// Counts a gateway-side failure; returns the back-off an ejection for it would last
    /// (exponentially growing with consecutive failures, so a backend that keeps failing stays
    /// out longer).
    fn count_failure(&self) -> Duration {
        let n = word::fails(self.update_passive(|w| word::with_fails(w, word::fails(w) + 1)));
        EJECT_BASE
            .saturating_mul(1u32 << (n.max(1) - 1).min(5))
            .min(EJECT_MAX)
    }

    /// Counts a failure or 5xx answer towards a circuit breaker's streak, which never goes past
    /// `cap` (the breaker's threshold); returns the streak.
    fn count_streak(&self, cap: u64) -> u64 {
        word::streak(
            self.update_passive(|w| word::with_streak(w, (word::streak(w) + 1).min(cap.max(1)))),
        )
    }

    /// A response from the backend with a status below 500 (a 500-599 answer is never a
    /// success, whether the route has a circuit breaker or not): the failure counts and streaks
    /// start again and a passive ejection ends. A
    /// circuit breaker's ejection in force stands (the answer is to a request sent before it);
    /// only its streak restarts. One load when nothing is counted (every request).
    pub fn record_success(&self) {
        if self.passive.load(Ordering::Relaxed) != 0 {
            self.settle_success();
        }
    }

    #[cold]
    fn settle_success(&self) {
        let w = self.passive.load(Ordering::Relaxed);
        if w & word::HELD != 0 && self.passively_ejected(now_ms()) {
            self.update_passive(|w| word::with_fails(word::with_streak(w, 0), 0));
            return;
        }
        self.passive.store(0, Ordering::Relaxed);
        self.ejected_until_ms.store(0, Ordering::Relaxed);
    }

    /// Whether a circuit breaker's ejection is in force (for `/admin/upstreams`).
    pub fn breaker_ejected(&self) -> bool {
        self.passive.load(Ordering::Relaxed) & word::HELD != 0 && self.passively_ejected(now_ms())
    }

    fn pop_idle(&self) -> Option<http1::SendRequest<Body>> {
        let mut idle = self.idle[worker_slot()].lock().ok()?;
        while let Some(i) = idle.pop() {
            if !i.sender.is_closed() && i.since.elapsed() < POOL_IDLE_TIMEOUT {
                return Some(i.sender);
            }
        }
        None
    }

    fn push_idle(&self, sender: http1::SendRequest<Body>) {
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

    /// A stream on one of this worker's shared HTTP/2 connections: the least busy one, if it
    /// has room (or no other connection may be opened). Closed connections are dropped.
    fn shared_h2(&self) -> Option<Sender> {
        let mut conns = self.h2[worker_slot()].lock().ok()?;
        conns.retain(|c| !c.sender.is_closed());
        let best = conns
            .iter()
            .min_by_key(|c| c.active.load(Ordering::Relaxed))?;
        let busy = best.active.load(Ordering::Relaxed) >= H2_STREAMS_PER_CONN;
        if busy && conns.len() < H2_CONNS_PER_WORKER {
            return None;
        }
        Some(Sender::Http2(
            best.sender.clone(),
            StreamSlot::new(&best.active),
        ))
    }

    /// Forgets the shared HTTP/2 connection `sender` is on after a connection-level failure (a
    /// GOAWAY, a broken connection): new requests go elsewhere while streams still open on it
    /// finish there.
    pub fn drop_shared_h2(&self, sender: &Sender) {
        let Sender::Http2(_, slot) = sender else {
            return;
        };
        if let Ok(mut conns) = self.h2[worker_slot()].lock() {
            conns.retain(|c| !Arc::ptr_eq(&c.active, slot.conn()));
        }
    }

    /// The TLS failure that made the last active check fail: (reason, detail).
    pub fn tls_failure(&self) -> Option<(&'static str, String)> {
        self.tls_failure.lock().ok()?.clone()
    }

    pub(crate) fn set_tls_failure(&self, f: Option<(&'static str, String)>) {
        if let Ok(mut slot) = self.tls_failure.lock() {
            *slot = f;
        }
    }

    /// Whether the backend can carry HTTP/2 (gRPC): it speaks it, or may by ALPN.
    pub fn may_speak_http2(&self) -> bool {
        !matches!(self.wire, Wire::Http1 | Wire::Tls(Alpn::Http1))
    }

    /// Whether the backend asked for a client certificate and none is configured: nginx with
    /// `ssl_verify_client on` then answers 400, which the gateway reports as the TLS failure
    /// it is (`tls_client_cert_required`).
    pub fn client_cert_missing(&self) -> bool {
        self.cert_request.load(Ordering::Relaxed) == 2
    }

    /// Whether the backend asks for a client certificate (mTLS), presented or not.
    pub fn client_cert_requested(&self) -> bool {
        self.cert_request.load(Ordering::Relaxed) != 0
    }

    /// A ready connection: the shared HTTP/2 one or a pooled HTTP/1.1 one if any is still open,
    /// else a new one. The flag says whether it was reused.
    pub async fn checkout(
        self: &Arc<Self>,
        connect_timeout: Duration,
        http1_only: bool,
    ) -> Result<(Sender, bool), ConnectError> {
        let h2_likely = self.wire != Wire::Http1 && !self.alpn_http1.load(Ordering::Relaxed);
        if h2_likely && !http1_only {
            if let Some(s) = self.shared_h2() {
                return Ok((s, true));
            }
        }
        while let Some(mut s) = self.pop_idle() {
            if s.is_ready() {
                return Ok((Sender::Http1(s), true));
            }
            // A connection whose previous response just ended becomes ready within moments.
            if let Ok(Ok(())) = tokio::time::timeout(Duration::from_millis(50), s.ready()).await {
                return Ok((Sender::Http1(s), true));
            }
        }
        if http1_only {
            return Ok((self.connect_as(connect_timeout, true).await?, false));
        }
        if !h2_likely {
            return Ok((self.connect(connect_timeout).await?, false));
        }
        let deadline = tokio::time::Instant::now() + connect_timeout;
        let gate = &self.h2_connecting[worker_slot()];
        let Ok(_gate) = tokio::time::timeout_at(deadline, gate.lock()).await else {
            return Err(ConnectError::Timeout(self.authority.clone()));
        };
        // Whoever held the gate may have opened the connection this request can share.
        if let Some(s) = self.shared_h2() {
            return Ok((s, true));
        }
        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        let s = self.connect(remaining).await?;
        let s = match s {
            Sender::Http2(h, _) => {
                let active = Arc::new(AtomicUsize::new(0));
                let slot = StreamSlot::new(&active);
                if let Ok(mut conns) = self.h2[worker_slot()].lock() {
                    conns.push(H2Conn {
                        sender: h.clone(),
                        active,
                    });
                }
                Sender::Http2(h, slot)
            }
            h1 => {
                self.alpn_http1.store(true, Ordering::Relaxed);
                h1
            }
        };
        Ok((s, false))
    }

    /// A new connection (TCP, then TLS for `https://`, then the HTTP handshake), all within
    /// `timeout`.
    pub async fn connect(&self, timeout: Duration) -> Result<Sender, ConnectError> {
        self.connect_as(timeout, false).await
    }

    /// A new connection; `http1_only` (an upgrade) offers only `http/1.1` by ALPN and refuses a
    /// backend that speaks HTTP/2 only.
    async fn connect_as(
        &self,
        timeout: Duration,
        http1_only: bool,
    ) -> Result<Sender, ConnectError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let stream =
            match tokio::time::timeout_at(deadline, TcpStream::connect(self.authority.as_str()))
                .await
            {
                Err(_) => return Err(ConnectError::Timeout(self.authority.clone())),
                Ok(Err(e)) => return Err(ConnectError::Io(self.authority.clone(), e)),
                Ok(Ok(s)) => s,
            };
        let _ = stream.set_nodelay(true);
        let wire = match (self.wire, http1_only) {
            (Wire::Tls(Alpn::Both), true) => Wire::Tls(Alpn::Http1),
            (w, _) => w,
        };
        match wire {
            Wire::Http1 => self.handshake(TokioIo::new(stream), false).await,
            Wire::H2c => self.handshake(TokioIo::new(stream), true).await,
            Wire::Tls(alpn) => {
                let Some(tls) = &self.tls else {
                    return Err(ConnectError::Tls {
                        addr: self.authority.clone(),
                        reason: "tls_handshake",
                        detail: "no TLS client configuration".into(),
                    });
                };
                let name = match &tls.server_name {
                    Some(n) => n.clone(),
                    None => rustls::pki_types::ServerName::try_from(self.addr.host.clone())
                        .map_err(|e| ConnectError::Tls {
                            addr: self.authority.clone(),
                            reason: "tls_handshake",
                            detail: format!("{:?} is not a server name: {e}", self.addr.host),
                        })?,
                };
                let (cfg, asked) = tls.for_connection(alpn);
                let connector = tokio_rustls::TlsConnector::from(cfg);
                let s = match tokio::time::timeout_at(deadline, connector.connect(name, stream))
                    .await
                {
                    Err(_) => return Err(ConnectError::Timeout(self.authority.clone())),
                    Ok(Err(e)) => {
                        return Err(ConnectError::Tls {
                            addr: self.authority.clone(),
                            reason: tls_reason(&e).unwrap_or("tls_handshake"),
                            detail: e.to_string(),
                        })
                    }
                    Ok(Ok(s)) => s,
                };
                let request = match (asked.load(Ordering::Relaxed), tls.has_client_cert()) {
                    (false, _) => 0,
                    (true, true) => 1,
                    (true, false) => 2,
                };
                if self.cert_request.swap(request, Ordering::Relaxed) != 2 && request == 2 {
                    tracing::warn!(backend = %self.addr, "the backend asked for a client certificate and upstreamTls.certFile is not set");
                }
                let h2 = s.get_ref().1.alpn_protocol() == Some(b"h2");
                if alpn == Alpn::Both {
                    self.alpn_http1.store(!h2, Ordering::Relaxed);
                }
                if alpn == Alpn::Http2 && !h2 {
                    return Err(ConnectError::NoHttp2(self.authority.clone()));
                }
                self.handshake(TokioIo::new(s), h2).await
            }
        }
    }

    async fn handshake<I>(&self, io: I, h2: bool) -> Result<Sender, ConnectError>
    where
        I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        if h2 {
            let (sender, conn) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .keep_alive_interval(H2_KEEPALIVE)
                .keep_alive_timeout(H2_KEEPALIVE)
                .initial_stream_window_size(H2_STREAM_WINDOW)
                .initial_connection_window_size(H2_CONN_WINDOW)
                .max_header_list_size(H2_MAX_HEADER_LIST)
                .handshake(io)
                .await
                .map_err(|e| ConnectError::Handshake(self.authority.clone(), e))?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "upstream HTTP/2 connection ended with error");
                }
            });
            // The stream slot of a connection nobody shares (a health check's).
            let slot = StreamSlot::new(&Arc::new(AtomicUsize::new(0)));
            return Ok(Sender::Http2(sender, slot));
        }
        let (sender, conn) = http1::Builder::new()
            .handshake(io)
            .await
            .map_err(|e| ConnectError::Handshake(self.authority.clone(), e))?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "upstream connection ended with error");
            }
        });
        Ok(Sender::Http1(sender))
    }

    /// Shapes a request for an HTTP/2 connection to this backend: absolute URI (`:scheme`,
    /// `:authority` from the Host field, else the backend's address), no Host field.
    pub fn for_http2(&self, req: &mut Request<Body>) {
        let authority = req
            .headers_mut()
            .remove(header::HOST)
            .and_then(|h| h.to_str().ok().map(str::to_string))
            .unwrap_or_else(|| self.authority.clone());
        let scheme = if matches!(self.wire, Wire::Tls(_)) {
            "https"
        } else {
            "http"
        };
        let pq = req
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string();
        match Uri::builder()
            .scheme(scheme)
            .authority(authority.as_str())
            .path_and_query(pq.as_str())
            .build()
        {
            Ok(u) => *req.uri_mut() = u,
            Err(_) => {
                // A Host that is no authority (cannot happen for a routed request, whose host
                // was canonicalised): the backend's own.
                if let Ok(u) = Uri::builder()
                    .scheme(scheme)
                    .authority(self.authority.as_str())
                    .path_and_query(pq.as_str())
                    .build()
                {
                    *req.uri_mut() = u;
                }
            }
        }
        *req.version_mut() = Version::HTTP_2;
    }
}

/// How an HTTP/2 exchange failed, when the error says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum H2Failure {
    /// The backend did not process the stream (RFC 9113 8.7: a GOAWAY whose last stream id is
    /// below it, or REFUSED_STREAM): safe to send again, to another connection.
    Unprocessed,
    /// The backend reset this stream only: no sign that the backend or the connection is
    /// unwell.
    StreamReset,
    /// The connection failed (GOAWAY with an error, I/O): it is not used again.
    Connection,
}

/// What an HTTP/2 error in an exchange's error chain says, if there is one.
pub fn h2_failure(err: &(dyn std::error::Error + 'static)) -> Option<H2Failure> {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if let Some(h) = e.downcast_ref::<h2::Error>() {
            let reason = h.reason();
            let unprocessed = h.is_remote()
                && ((h.is_go_away() && reason == Some(h2::Reason::NO_ERROR))
                    || (h.is_reset() && reason == Some(h2::Reason::REFUSED_STREAM)));
            return Some(if unprocessed {
                H2Failure::Unprocessed
            } else if h.is_reset() && h.is_remote() {
                H2Failure::StreamReset
            } else {
                H2Failure::Connection
            });
        }
        cur = e.source();
    }
    None
}

/// HTTP/2 PING interval (and answer timeout) on upstream connections: a backend that vanished
/// without closing is found within twice this.
const H2_KEEPALIVE: Duration = Duration::from_secs(20);

/// Gives a connection back to its backend's pool when a response body has been read to the end
/// (the body type lives below this crate, so it names the pool through [`IdleSink`]).
pub type PoolReturn = hexgate_http::body::PoolReturn;

impl IdleSink for Backend {
    fn give_back(&self, sender: http1::SendRequest<Body>) {
        self.push_idle(sender);
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
    /// How the pool's backends, discovered ones included, are spoken to.
    pub profile: Profile,
    members: ArcSwap<Members>,
    lb: LoadBalancing,
    next: AtomicUsize,
}

impl Pool {
    pub fn new(backends: Vec<Arc<Backend>>, lb: LoadBalancing) -> Self {
        Self::with_profile(backends, lb, Profile::default())
    }

    pub fn with_profile(backends: Vec<Arc<Backend>>, lb: LoadBalancing, profile: Profile) -> Self {
        let n = backends.len();
        Pool {
            profile,
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
        let profile = self.profile.clone();
        let mut all: Vec<(Arc<Backend>, u32)> = self
            .static_backends
            .iter()
            .map(|b| (b.clone(), 1))
            .collect();
        for (addr, weight) in discovered {
            if self.static_backends.iter().any(|b| &b.addr == addr) {
                continue;
            }
            all.push((set.get_or_create(addr, &profile), (*weight).max(1)));
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

    /// How many members are passively ejected now.
    pub fn passive_ejections(&self) -> usize {
        let now = now_ms();
        self.members
            .load()
            .backends
            .iter()
            .filter(|b| b.passively_ejected(now))
            .count()
    }

    /// Whether ejecting `backend` keeps this pool within its floor: at most
    /// floor(n · `max_percent` / 100) of its n members passively ejected (50: floor(n/2); 0:
    /// never; a pool of 3 at 50 % loses at most 1). True when `backend` is not a member.
    fn ejection_fits(&self, backend: &Backend, now: u64, max_percent: u32) -> bool {
        let m = self.members.load();
        let (mut member, mut others) = (false, 0usize);
        for b in &m.backends {
            if std::ptr::eq(&**b, backend) {
                member = true;
            } else if b.passively_ejected(now) {
                others += 1;
            }
        }
        !member || others < max_ejected(m.backends.len(), max_percent)
    }

    /// Whether some healthy member is not in `tried` (no side effect on the balancing).
    pub fn any_usable(&self, tried: u64) -> bool {
        let m = self.members.load();
        m.backends
            .iter()
            .enumerate()
            .any(|(i, b)| (i >= 64 || tried & (1 << i) == 0) && b.is_healthy())
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

/// Serialises ejection decisions: two failures recorded at once must not both see room under a
/// pool's floor and together go over it. Taken only when a backend fails.
static EJECTIONS: Mutex<()> = Mutex::new(());

/// How many of a pool of `n` may be passively ejected at once: floor(n · percent / 100).
pub fn max_ejected(n: usize, percent: u32) -> usize {
    n.saturating_mul(percent.min(100) as usize) / 100
}

/// What a failure recorded by [`record_failure`] was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The backend failed to answer (connect error, reset, broken response, timeout).
    Gateway,
    /// The backend answered 500-599 (counted only on a route with a circuit breaker).
    Status,
}

/// Passive health: counts a failure that `backend` caused and may eject it.
///
/// Without a circuit breaker (`breaker` None, the route's): every gateway-side failure ejects
/// for a back-off (1 s doubling to 30 s); 5xx answers are not failures. With one: failures and
/// 5xx answers in a row count, and the `consecutive5xx`-th ejects for `ejectFor`, doubled for
/// each ejection in a row up to 10x (a success starts the count again); that ejection lasts
/// its time, whatever active checks say.
///
/// No ejection may leave some pool with more passively ejected members than its floor
/// (`pools`: each pool with its route's `maxEjectedPercent`, [`DEFAULT_MAX_EJECTED_PERCENT`]
/// without a breaker, see [`max_ejected`]); then the failure only counts and the backend stays
/// in rotation. Returns whether the backend was ejected. A breaker's streak stops at its
/// threshold, and a backend whose ejection did not fit is not considered again for
/// [`BREAKER_RESCAN`]: its further 5xx take no lock (see the body).
///
/// `pools` are the pools that may list `backend`: every pool of the snapshot, since a `Backend`
/// is shared by all pools naming its address and its ejection takes it out of all of them. The
/// floor must hold in each, so an ejection counts in every pool the backend is a member of: a
/// backend failing through one service cannot empty another that shares it. The floor counts
/// passive ejections in force only, and binds only them: active health checks take a backend
/// found down out of rotation whatever the pool's state.
///
/// Must be called only for failures the backend caused: a client whose body stalled or who went
/// away is never a reason.
pub fn record_failure<'a>(
    backend: &Backend,
    failure: Failure,
    breaker: Option<&CircuitBreaker>,
    pools: impl IntoIterator<Item = (&'a Pool, u32)>,
) -> bool {
    let Some(cb) = breaker else {
        if failure == Failure::Status {
            return false;
        }
        let backoff = backend.count_failure();
        let _guard = ejections_lock();
        let now = now_ms();
        if backend.passive.load(Ordering::Relaxed) & word::HELD != 0
            && backend.passively_ejected(now)
        {
            // A circuit breaker's ejection is in force: it keeps its length.
            return false;
        }
        if !fits(backend, now, pools) {
            return false;
        }
        backend.update_passive(|w| w & !word::HELD);
        backend
            .ejected_until_ms
            .store(now + backoff.as_millis() as u64, Ordering::Relaxed);
        return true;
    };
    if failure == Failure::Gateway {
        // Also lengthens a later ejection by a route without a breaker that shares the backend.
        backend.count_failure();
    }
    let threshold = u64::from(cb.consecutive_5xx.max(1));
    let streak = backend.count_streak(threshold);
    if cb.max_ejected_percent == 0 || streak < threshold {
        return false;
    }
    // Past the threshold, and kept there (`count_streak` caps it): every further 5xx would
    // take the global EJECTIONS lock and scan every pool of the snapshot. Two cheap checks
    // spare that on the hot path of a failing backend: an ejection already in force (answers
    // to requests sent before it), and a recent scan that found no room under some pool's
    // floor (`breaker_rescan_ms`, BREAKER_RESCAN later). So a backend held in rotation by a
    // floor costs at most one locked scan per BREAKER_RESCAN, not one per 5xx; once room frees
    // up (another ejection ends), its next 5xx after the pause ejects it, and a success resets
    // the streak as always.
    let now = now_ms();
    if backend.passively_ejected(now) || backend.breaker_rescan_ms.load(Ordering::Relaxed) > now {
        return false;
    }
    let _guard = ejections_lock();
    let now = now_ms();
    if backend.passively_ejected(now) {
        // Answers to requests sent before the ejection: it is in force already.
        return false;
    }
    if !fits(backend, now, pools) {
        backend
            .breaker_rescan_ms
            .store(now + BREAKER_RESCAN.as_millis() as u64, Ordering::Relaxed);
        return false;
    }
    let w = backend.update_passive(|w| {
        word::with_ejections(word::with_streak(w, 0), word::ejections(w) + 1) | word::HELD
    });
    let k = word::ejections(w).clamp(1, 31) as u32;
    let length = cb
        .eject_for
        .saturating_mul(1u32 << (k - 1).min(4))
        .min(cb.eject_for.saturating_mul(BREAKER_MAX_FACTOR));
    backend
        .ejected_until_ms
        .store(now + length.as_millis() as u64, Ordering::Relaxed);
    tracing::info!(backend = %backend.addr, streak, ejection = k, seconds = length.as_secs_f64(), "circuit breaker: backend ejected");
    true
}

fn ejections_lock() -> std::sync::MutexGuard<'static, ()> {
    match EJECTIONS.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// Whether ejecting `backend` at `now` keeps every pool within its floor.
fn fits<'a>(backend: &Backend, now: u64, pools: impl IntoIterator<Item = (&'a Pool, u32)>) -> bool {
    let ok = pools
        .into_iter()
        .all(|(p, percent)| p.ejection_fits(backend, now, percent));
    if !ok {
        tracing::debug!(backend = %backend.addr, "not ejected: the pool is at its passive-ejection floor");
    }
    ok
}

/// Every backend alive in any snapshot, by address, so a reload reuses pools and health state.
#[derive(Default)]
pub struct BackendSet {
    /// By address and what the backend is spoken to with (`transport_key`): two services that
    /// reach one address with different TLS settings never share its connections.
    map: Mutex<HashMap<(BackendAddr, u64), Weak<Backend>>>,
}

/// What distinguishes how an address is spoken to: the wire and, for TLS, the settings.
fn transport_key(addr: &BackendAddr, profile: &Profile) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    profile.wire(addr.scheme).hash(&mut h);
    if addr.scheme == Scheme::Https {
        profile.tls.as_ref().map(|t| t.fingerprint).hash(&mut h);
    }
    h.finish()
}

impl BackendSet {
    pub fn get_or_create(&self, addr: &BackendAddr, profile: &Profile) -> Arc<Backend> {
        let key = (addr.clone(), transport_key(addr, profile));
        let mut map = match self.map.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        if let Some(b) = map.get(&key).and_then(Weak::upgrade) {
            return b;
        }
        let b = Arc::new(Backend::with_profile(addr.clone(), profile));
        map.insert(key, Arc::downgrade(&b));
        map.retain(|_, w| w.strong_count() > 0);
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(port: u16) -> Arc<Backend> {
        Arc::new(Backend::new(BackendAddr {
            scheme: Scheme::Http,
            host: "127.0.0.1".into(),
            port,
        }))
    }

    fn pool(members: &[Arc<Backend>]) -> Pool {
        Pool::new(members.to_vec(), LoadBalancing::RoundRobin)
    }

    fn healthy(members: &[Arc<Backend>]) -> usize {
        members.iter().filter(|b| b.is_healthy()).count()
    }

    #[test]
    fn passive_failures_never_eject_more_than_half_a_pool() {
        for n in 1..=7u16 {
            let members: Vec<_> = (0..n).map(|i| backend(10_000 + i)).collect();
            let p = pool(&members);
            // Every member fails, three times over: only floor(n/2) may end up ejected.
            let mut ejected = 0;
            for _ in 0..3 {
                for b in &members {
                    if record_failure(b, Failure::Gateway, None, [(&p, 50)]) {
                        ejected += 1;
                    }
                }
            }
            let floor = usize::from(n) / 2;
            assert_eq!(p.passive_ejections(), floor, "pool of {n}");
            assert_eq!(healthy(&members), usize::from(n) - floor, "pool of {n}");
            assert!(ejected >= floor, "pool of {n}: {ejected} ejections");
        }
    }

    #[test]
    fn a_failure_over_the_floor_still_counts() {
        let (a, b) = (backend(10_100), backend(10_101));
        let p = pool(&[a.clone(), b.clone()]);
        assert!(record_failure(&a, Failure::Gateway, None, [(&p, 50)]));
        for _ in 0..3 {
            assert!(
                !record_failure(&b, Failure::Gateway, None, [(&p, 50)]),
                "b would be the second of two"
            );
        }
        assert_eq!(word::fails(b.passive.load(Ordering::Relaxed)), 3);
        assert!(b.is_healthy());
        // Once a is back (a success ends its ejection), b's next failure may eject it, for the
        // back-off its four consecutive failures earned (8 s).
        a.record_success();
        let before = now_ms();
        assert!(record_failure(&b, Failure::Gateway, None, [(&p, 50)]));
        let until = b.ejected_until_ms.load(Ordering::Relaxed);
        assert!(
            until >= before + 8_000 && until < before + 9_000,
            "{until} - {before}"
        );
        assert!(!b.is_healthy() && a.is_healthy());
    }

    #[test]
    fn a_shared_backend_is_ejected_only_where_every_pool_allows_it() {
        let (a, b, c) = (backend(10_200), backend(10_201), backend(10_202));
        let p = pool(&[a.clone(), b.clone()]);
        let q = pool(&[b.clone(), c.clone()]);
        let all = || [(&p, 50), (&q, 50)];
        assert!(record_failure(&a, Failure::Gateway, None, all()));
        // b is in both: ejecting it fits q (nothing ejected there) but not p (a is out).
        assert!(!record_failure(&b, Failure::Gateway, None, all()));
        assert!(b.is_healthy());
        // c is only in q, where nothing is ejected yet.
        assert!(record_failure(&c, Failure::Gateway, None, all()));
        assert_eq!((p.passive_ejections(), q.passive_ejections()), (1, 1));
        // A pool that does not list the backend does not constrain it.
        let other = pool(&[backend(10_203)]);
        let d = backend(10_204);
        let r = pool(&[d.clone(), backend(10_205)]);
        assert!(record_failure(
            &d,
            Failure::Gateway,
            None,
            [(&other, 50), (&r, 50)]
        ));
    }

    #[test]
    fn active_checks_take_out_any_number_of_members() {
        let members: Vec<_> = (0..3).map(|i| backend(10_300 + i)).collect();
        let p = pool(&members);
        assert!(record_failure(
            &members[0],
            Failure::Gateway,
            None,
            [(&p, 50)]
        ));
        for b in &members {
            b.set_active_health(false);
        }
        assert_eq!(healthy(&members), 0);
        assert!(p.pick(0).is_none(), "an all-down pool has nothing to pick");
        // A passing check ends the passive ejection too.
        for b in &members {
            b.set_active_health(true);
        }
        assert_eq!(healthy(&members), 3);
        assert_eq!(p.passive_ejections(), 0);
    }

    fn breaker(n: u32, percent: u32) -> CircuitBreaker {
        CircuitBreaker {
            consecutive_5xx: n,
            eject_for: Duration::from_secs(10),
            max_ejected_percent: percent,
        }
    }

    fn ejected_for_ms(b: &Backend) -> u64 {
        b.ejected_until_ms
            .load(Ordering::Relaxed)
            .saturating_sub(now_ms())
    }

    #[test]
    fn a_breaker_ejects_after_its_streak_and_doubles_up_to_ten_times() {
        let members: Vec<_> = (0..2).map(|i| backend(10_500 + i)).collect();
        let p = pool(&members);
        let cb = breaker(3, 50);
        let b = &members[0];
        let fail = |f| record_failure(b, f, Some(&cb), [(&p, 50)]);
        assert!(!fail(Failure::Status));
        assert!(
            !fail(Failure::Gateway),
            "gateway failures count in the streak too"
        );
        assert!(fail(Failure::Status), "the third in a row ejects");
        let first = ejected_for_ms(b);
        assert!((9_000..=10_000).contains(&first), "{first}");
        // An active check that passes does not end a breaker's ejection.
        b.set_active_health(true);
        assert!(!b.is_healthy());
        // Later ejections double: 20 s, 40 s, 80 s, then 100 s (10x) at most.
        for want in [20_000u64, 40_000, 80_000, 100_000, 100_000] {
            b.ejected_until_ms.store(0, Ordering::Relaxed);
            for _ in 0..2 {
                assert!(!fail(Failure::Status));
            }
            assert!(fail(Failure::Status));
            let got = ejected_for_ms(b);
            assert!(got <= want && got + 1_000 >= want, "{got} for {want}");
        }
        // A success (once the ejection is over) starts everything again.
        b.ejected_until_ms.store(0, Ordering::Relaxed);
        b.record_success();
        assert_eq!(b.passive.load(Ordering::Relaxed), 0);
        for _ in 0..2 {
            assert!(!fail(Failure::Status));
        }
        assert!(fail(Failure::Status));
        assert!((9_000..=10_000).contains(&ejected_for_ms(b)));
    }

    #[test]
    fn a_success_breaks_the_streak_and_a_late_one_keeps_the_ejection() {
        let members: Vec<_> = (0..2).map(|i| backend(10_600 + i)).collect();
        let p = pool(&members);
        let cb = breaker(2, 50);
        let b = &members[0];
        assert!(!record_failure(b, Failure::Status, Some(&cb), [(&p, 50)]));
        b.record_success();
        assert!(!record_failure(b, Failure::Status, Some(&cb), [(&p, 50)]));
        assert!(record_failure(b, Failure::Status, Some(&cb), [(&p, 50)]));
        // The answer to a request sent before the ejection does not end it.
        b.record_success();
        assert!(!b.is_healthy());
    }

    #[test]
    fn without_a_breaker_5xx_answers_are_not_failures() {
        let members: Vec<_> = (0..2).map(|i| backend(10_700 + i)).collect();
        let p = pool(&members);
        for _ in 0..10 {
            assert!(!record_failure(
                &members[0],
                Failure::Status,
                None,
                [(&p, 50)]
            ));
        }
        assert_eq!(members[0].passive.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_breaker_never_ejects_more_than_its_percentage() {
        for (n, percent, most) in [
            (3, 50, 1),
            (4, 50, 2),
            (10, 30, 3),
            (1, 50, 0),
            (1, 100, 1),
            (5, 0, 0),
            (5, 100, 5),
        ] {
            let members: Vec<_> = (0..n).map(|i| backend(10_800 + i)).collect();
            let p = pool(&members);
            let cb = breaker(1, percent);
            for _ in 0..3 {
                for b in &members {
                    record_failure(b, Failure::Status, Some(&cb), [(&p, percent)]);
                }
            }
            assert_eq!(p.passive_ejections(), most, "{percent} % of {n}");
            assert_eq!(max_ejected(n as usize, percent), most);
        }
    }

    #[test]
    fn a_streak_held_by_the_floor_takes_no_lock_until_the_pause_ends() {
        let members: Vec<_> = (0..2).map(|i| backend(10_900 + i)).collect();
        let p = pool(&members);
        let cb = breaker(2, 50);
        let (a, b) = (&members[0], &members[1]);
        let fail = |x: &Backend| record_failure(x, Failure::Status, Some(&cb), [(&p, 50)]);
        assert!(!fail(a));
        assert!(fail(a), "a is ejected: the pool of 2 is at its floor");
        assert!(!fail(b));
        assert!(
            !fail(b),
            "b's ejection does not fit: one scan, then a pause"
        );
        assert_eq!(word::streak(b.passive.load(Ordering::Relaxed)), 2);
        // While the global lock is held elsewhere, b's further 5xx neither wait for it nor
        // grow the streak past the threshold.
        let (tx, rx) = std::sync::mpsc::channel();
        let held = ejections_lock();
        std::thread::scope(|s| {
            s.spawn(|| {
                for _ in 0..100 {
                    fail(b);
                }
                tx.send(()).unwrap();
            });
            let done = rx.recv_timeout(Duration::from_secs(2));
            drop(held);
            assert!(
                done.is_ok(),
                "a 5xx past the threshold waited for the ejection lock"
            );
        });
        assert_eq!(word::streak(b.passive.load(Ordering::Relaxed)), 2);
        assert!(b.is_healthy());
        // Once a is back and the pause is over, b's next 5xx ejects it.
        a.ejected_until_ms.store(0, Ordering::Relaxed);
        std::thread::sleep(BREAKER_RESCAN + Duration::from_millis(20));
        assert!(fail(b));
        assert!(!b.is_healthy());
    }

    #[test]
    fn concurrent_failures_respect_the_floor() {
        let members: Vec<_> = (0..4).map(|i| backend(10_400 + i)).collect();
        let p = Arc::new(pool(&members));
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let (p, members) = (p.clone(), members.clone());
                std::thread::spawn(move || {
                    for i in 0..50 {
                        record_failure(
                            &members[(t + i) % members.len()],
                            Failure::Gateway,
                            None,
                            [(&*p, 50)],
                        );
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("a failing thread");
        }
        assert_eq!(p.passive_ejections(), 2);
    }
}
