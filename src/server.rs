//! Listeners: the public port (HTTP/1.1 and h2c, or a redirect to HTTPS when TLS is on), the
//! HTTPS port (rustls, ALPN h2/http1.1), the admin port; connection limits and graceful drain.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use http::{header, HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio_rustls::TlsAcceptor;

use crate::body::Body;
use crate::config::Config;
use crate::proxy::{self, ConnInfo};
use crate::state::State;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {0}: {1}")]
    Bind(SocketAddr, std::io::Error),
    #[error("TLS: {0}")]
    Tls(String),
}

#[derive(Clone, Copy)]
enum Mode {
    Proxy { tls: bool },
    RedirectToHttps { https_port: u16 },
}

/// Bound listeners, ready to serve.
pub struct Listeners {
    public: TcpListener,
    https: Option<(TcpListener, TlsAcceptor)>,
    admin: TcpListener,
}

/// Accept queue of the public listeners. tokio (mio) binds with the standard library's 128, which
/// a burst of new connections overflows (nginx uses 511); the kernel caps it at
/// `net.core.somaxconn`.
const PUBLIC_BACKLOG: u32 = 1024;

/// A public listener on `addr` with [`PUBLIC_BACKLOG`] (SO_REUSEADDR as tokio sets it).
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(PUBLIC_BACKLOG)
}

impl Listeners {
    /// Binds the listeners of `cfg`; `tls` is the HTTPS acceptor the compile step built.
    pub async fn bind(cfg: &Config, tls: Option<TlsAcceptor>) -> Result<Listeners, ServerError> {
        let public_addr = SocketAddr::new(cfg.gateway_bind, cfg.gateway_port);
        let public = listen(public_addr).map_err(|e| ServerError::Bind(public_addr, e))?;
        let https = if cfg.tls.enabled {
            let acceptor = tls.ok_or_else(|| {
                ServerError::Tls("no certificate compiled for tls.enabled".into())
            })?;
            let addr = SocketAddr::new(cfg.gateway_bind, cfg.tls.https_port);
            let l = listen(addr).map_err(|e| ServerError::Bind(addr, e))?;
            Some((l, acceptor))
        } else {
            None
        };
        let admin_addr = SocketAddr::new(cfg.admin_bind, cfg.admin_port);
        let admin = TcpListener::bind(admin_addr)
            .await
            .map_err(|e| ServerError::Bind(admin_addr, e))?;
        Ok(Listeners {
            public,
            https,
            admin,
        })
    }

    pub fn public_addr(&self) -> Option<SocketAddr> {
        self.public.local_addr().ok()
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.local_addr().ok()
    }

    pub fn https_addr(&self) -> Option<SocketAddr> {
        self.https.as_ref().and_then(|(l, _)| l.local_addr().ok())
    }
}

/// The HTTP/1 and HTTP/2 connection settings; which one serves a connection is decided
/// by ALPN (TLS) or by the HTTP/2 connection preface (plain, "prior knowledge").
pub struct Builders {
    h1: http1::Builder,
    h2: http2::Builder<TokioExecutor>,
    header_read: Duration,
    idle: Duration,
}

fn http_builder(cfg: &Config) -> Builders {
    let h1 = crate::listen::http1_builder(&crate::listen::Http1Limits::of(cfg));
    let mut h2 = http2::Builder::new(TokioExecutor::new());
    h2.timer(TokioTimer::new())
        .max_concurrent_streams(256)
        // HTTP/2 counts 32 bytes more per field than rules::headers does (RFC 9113 6.5.2); with
        // that room the documented limit is the one that answers (431), as on HTTP/1.
        .max_header_list_size(
            (cfg.max_header_size + 32 * cfg.max_header_count).min(u32::MAX as u64) as u32,
        )
        .keep_alive_interval(Some(Duration::from_secs(30)));
    Builders {
        h1,
        h2,
        header_read: cfg.timeouts.header_read,
        idle: cfg.timeouts.idle,
    }
}

const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What a plain connection opens with, looked at without consuming it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Preface {
    Http2,
    Http1,
    /// Nothing (or only part of the HTTP/2 preface) within `headerRead`, or the peer closed:
    /// the connection is closed, so a silent client holds it for `headerRead` once, not twice.
    Nothing,
}

async fn sniff_preface(stream: &TcpStream, limit: Duration) -> Preface {
    let deadline = tokio::time::Instant::now() + limit;
    let mut buf = [0u8; 24];
    loop {
        let peeked = tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await;
        let n = match peeked {
            Ok(Ok(n)) if n > 0 => n,
            _ => return Preface::Nothing,
        };
        if buf[..n] != H2_PREFACE[..n] {
            return Preface::Http1;
        }
        if n == H2_PREFACE.len() {
            return Preface::Http2;
        }
        // A partial preface (the client's first segment was short): wait for the rest.
        if tokio::time::Instant::now() >= deadline {
            return Preface::Nothing;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// A served connection that can be asked to finish its requests and close.
trait Graceful: Future<Output = Result<(), hyper::Error>> {
    fn begin_shutdown(self: std::pin::Pin<&mut Self>);
}

impl<I, S> Graceful for http1::UpgradeableConnection<I, S>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::HttpService<Incoming, ResBody = Tracked>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn begin_shutdown(self: std::pin::Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

impl<I, S> Graceful for http2::Connection<I, S, TokioExecutor>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::HttpService<Incoming, ResBody = Tracked> + Send,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn begin_shutdown(self: std::pin::Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

/// Tells connections to drain and waits until the last one has finished.
struct Drain {
    tx: watch::Sender<bool>,
}

/// Serves until `shutdown` resolves, then stops accepting and drains in-flight requests for up to
/// `shutdownTimeout`.
///
/// Public traffic runs on one current-thread runtime per core ("worker"), each accepting on its
/// own registration of the shared listening socket and keeping its own upstream connections (see
/// `upstream::set_worker`): no work stealing, no cross-thread wake-ups on the request path. The
/// calling runtime keeps the control plane: admin listener, health checks, reloads, discovery.
/// `cfg` is the config the listeners were bound with (their settings change only on restart).
pub async fn serve(
    state: Arc<State>,
    listeners: Listeners,
    cfg: &Config,
    shutdown: impl Future<Output = ()>,
) {
    let (stop_tx, stop_rx) = watch::channel(false);
    let drain = Arc::new(Drain {
        tx: watch::channel(false).0,
    });
    let limit = Arc::new(Semaphore::new(cfg.max_connections as usize));
    let builder = Arc::new(http_builder(cfg));
    let public_mode = if cfg.tls.enabled {
        Mode::RedirectToHttps {
            https_port: cfg.tls.https_port,
        }
    } else {
        Mode::Proxy { tls: false }
    };
    let admin_task = tokio::spawn(crate::admin::serve(state.clone(), listeners.admin));

    let workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .clamp(1, crate::upstream::MAX_WORKERS);
    let public = listeners.public.into_std();
    let https = listeners
        .https
        .map(|(l, acceptor)| l.into_std().map(|l| (l, acceptor)))
        .transpose();
    let (public, https) = match (public, https) {
        (Ok(p), Ok(h)) => (p, h),
        (Err(e), _) | (_, Err(e)) => {
            tracing::error!(error = %e, "cannot hand the listeners to the workers");
            return;
        }
    };
    let mut threads = Vec::new();
    for w in 0..workers {
        let listeners = (
            public.try_clone(),
            https
                .as_ref()
                .map(|(l, a)| l.try_clone().map(|l| (l, a.clone())))
                .transpose(),
        );
        let (public_l, https_l) = match listeners {
            (Ok(p), Ok(h)) => (p, h),
            (Err(e), _) | (_, Err(e)) => {
                tracing::error!(error = %e, "cannot share the listening socket");
                continue;
            }
        };
        let (state, builder, limit, drain, stop_rx) = (
            state.clone(),
            builder.clone(),
            limit.clone(),
            drain.clone(),
            stop_rx.clone(),
        );
        let timeout = cfg.shutdown_timeout;
        let spawned = std::thread::Builder::new()
            .name(format!("hexgate-worker-{w}"))
            .spawn(move || {
                crate::upstream::set_worker(w + 1);
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot start a worker runtime");
                        return;
                    }
                };
                rt.block_on(worker(
                    state,
                    public_l,
                    https_l,
                    public_mode,
                    builder,
                    limit,
                    drain,
                    stop_rx,
                    timeout,
                ));
            });
        match spawned {
            Ok(t) => threads.push(t),
            Err(e) => tracing::error!(error = %e, "cannot start a worker thread"),
        }
    }

    shutdown.await;
    tracing::info!(
        timeout = ?cfg.shutdown_timeout,
        "shutting down: no new connections, draining in-flight requests"
    );
    let _ = stop_tx.send(true);
    let _ = drain.tx.send(true);
    let drained = tokio::time::timeout(cfg.shutdown_timeout, drain.tx.closed()).await;
    match drained {
        Ok(()) => tracing::info!("all connections drained"),
        Err(_) => tracing::warn!(
            open = drain.tx.receiver_count(),
            "shutdown timeout reached with connections still open"
        ),
    }
    let _ = tokio::task::spawn_blocking(move || {
        for t in threads {
            let _ = t.join();
        }
    })
    .await;
    admin_task.abort();
}

/// One worker: accept loops on its registration of the listeners, until told to stop; then it
/// keeps running until every connection has drained (or the shutdown timeout).
#[allow(clippy::too_many_arguments)]
async fn worker(
    state: Arc<State>,
    public: std::net::TcpListener,
    https: Option<(std::net::TcpListener, TlsAcceptor)>,
    public_mode: Mode,
    builder: Arc<Builders>,
    limit: Arc<Semaphore>,
    drain: Arc<Drain>,
    stop: watch::Receiver<bool>,
    timeout: Duration,
) {
    state.limiter.attach_worker();
    let mut tasks = Vec::new();
    match TcpListener::from_std(public) {
        Ok(l) => tasks.push(tokio::spawn(accept_loop(
            state.clone(),
            l,
            None,
            public_mode,
            builder.clone(),
            limit.clone(),
            drain.clone(),
            stop.clone(),
        ))),
        Err(e) => tracing::error!(error = %e, "worker cannot register the public listener"),
    }
    if let Some((l, acceptor)) = https {
        match TcpListener::from_std(l) {
            Ok(l) => tasks.push(tokio::spawn(accept_loop(
                state.clone(),
                l,
                Some(acceptor),
                Mode::Proxy { tls: true },
                builder.clone(),
                limit.clone(),
                drain.clone(),
                stop.clone(),
            ))),
            Err(e) => tracing::error!(error = %e, "worker cannot register the HTTPS listener"),
        }
    }
    for t in tasks {
        let _ = t.await;
    }
    let _ = tokio::time::timeout(timeout + Duration::from_secs(1), drain.tx.closed()).await;
}

#[allow(clippy::too_many_arguments)]
async fn accept_loop(
    state: Arc<State>,
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    mode: Mode,
    builder: Arc<Builders>,
    limit: Arc<Semaphore>,
    drain: Arc<Drain>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let permit = tokio::select! {
            p = limit.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            _ = stop.changed() => return,
        };
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        let builder = builder.clone();
        let tls = tls.clone();
        let drain_rx = drain.tx.subscribe();
        tokio::spawn(async move {
            state
                .metrics
                .open_connections
                .fetch_add(1, Ordering::Relaxed);
            serve_conn(state.clone(), stream, peer, tls, mode, &builder, drain_rx).await;
            state
                .metrics
                .open_connections
                .fetch_sub(1, Ordering::Relaxed);
            drop(permit);
        });
    }
}

async fn serve_conn(
    state: Arc<State>,
    stream: TcpStream,
    peer: SocketAddr,
    tls: Option<TlsAcceptor>,
    mode: Mode,
    builder: &Builders,
    drain: watch::Receiver<bool>,
) {
    match tls {
        // Boxed: the TLS state is large, and keeping it out of the task keeps every plain
        // connection's task small.
        Some(acceptor) => {
            Box::pin(async move {
                let stream = crate::lingering::Lingering::new(stream);
                let handshake =
                    tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream));
                match handshake.await {
                    Ok(Ok(s)) => {
                        let h2 = s.get_ref().1.alpn_protocol() == Some(b"h2".as_slice());
                        let io = TokioIo::new(s);
                        // TLS: the head's time starts after the handshake (which has its own).
                        let born = tokio::time::Instant::now();
                        serve_io(state, io, h2, peer, mode, builder, drain, born).await
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                }
            })
            .await
        }
        None => {
            let born = tokio::time::Instant::now();
            let h2 = match sniff_preface(&stream, builder.header_read).await {
                Preface::Http2 => true,
                Preface::Http1 => false,
                Preface::Nothing => return,
            };
            let io = TokioIo::new(crate::lingering::Lingering::new(stream));
            serve_io(state, io, h2, peer, mode, builder, drain, born).await
        }
    }
}

/// A request's future on the public listeners, boxed per request (see `serve_io`).
type ServiceFuture = std::pin::Pin<
    Box<dyn Future<Output = Result<Response<Tracked>, std::convert::Infallible>> + Send>,
>;

/// Serves one connection; `born` is when its first request's `headerRead` budget started.
#[allow(clippy::too_many_arguments)]
async fn serve_io<I>(
    state: Arc<State>,
    io: I,
    h2: bool,
    peer: SocketAddr,
    mode: Mode,
    builder: &Builders,
    drain: watch::Receiver<bool>,
    born: tokio::time::Instant,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let watch = ConnWatch {
        activity: Arc::new(Activity::default()),
        born,
        header_read: builder.header_read,
        idle: h2.then_some(builder.idle),
    };
    let activity = watch.activity.clone();
    // The request's future is boxed: hyper keeps the service future's slot for the whole
    // connection, so this way an idle keep-alive connection holds a null pointer instead of a
    // request-sized future, and the future's memory goes with its response.
    let svc = service_fn(move |req: Request<Incoming>| -> ServiceFuture {
        let state = state.clone();
        let busy = Busy::new(&activity, born, h2);
        Box::pin(async move {
            let resp = match mode {
                Mode::Proxy { tls } => proxy::handle(state, req, ConnInfo { peer, tls }).await,
                Mode::RedirectToHttps { https_port } => Ok(redirect(&req, https_port)),
            };
            // The request stays in flight until its response body has been sent (or dropped).
            resp.map(|r| r.map(|inner| Tracked { inner, busy }))
        })
    });
    if h2 {
        // Boxed: HTTP/2 connections are few and long-lived; inline, their larger state would
        // make every HTTP/1 connection's task that much bigger too.
        Box::pin(drive(
            builder.h2.serve_connection(io, svc),
            peer,
            drain,
            watch,
        ))
        .await
    } else {
        let conn = builder.h1.serve_connection(io, svc).with_upgrades();
        drive(conn, peer, drain, watch).await
    }
}

/// What a connection's requests are doing, for the connection-level timers.
#[derive(Default)]
struct Activity {
    /// A request head has been received (the service was called at least once).
    started: std::sync::atomic::AtomicBool,
    /// Milliseconds from the connection's start to its last sign of life: a request beginning
    /// or ending, or a response frame sent.
    last_done_ms: std::sync::atomic::AtomicU64,
}

/// Marks a request in flight on its connection until dropped: with its response body, when the
/// body has been sent or abandoned.
struct Busy {
    /// Set on HTTP/2 only: HTTP/1 keeps hyper's own idle timer, so its requests only mark the
    /// connection started and skip the clock reads on every frame.
    activity: Option<Arc<Activity>>,
    born: tokio::time::Instant,
}

impl Busy {
    fn new(activity: &Arc<Activity>, born: tokio::time::Instant, h2: bool) -> Busy {
        activity.started.store(true, Ordering::Relaxed);
        let busy = Busy {
            activity: h2.then(|| activity.clone()),
            born,
        };
        busy.progress();
        busy
    }

    /// The request moved (it began, or a body frame was sent).
    fn progress(&self) {
        if let Some(a) = &self.activity {
            let ms = self.born.elapsed().as_millis() as u64;
            a.last_done_ms.store(ms, Ordering::Relaxed);
        }
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.progress();
    }
}

/// A response body that keeps its request counted as in flight until it ends, and notes each
/// frame as progress (so a stream sending a long response is not idle, and one the client
/// stalls, e.g. with a zero flow-control window, is).
pub struct Tracked {
    inner: Body,
    busy: Busy,
}

impl http_body::Body for Tracked {
    type Data = bytes::Bytes;
    type Error = crate::body::BodyError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        let polled = std::pin::Pin::new(&mut this.inner).poll_frame(cx);
        if let std::task::Poll::Ready(Some(Ok(_))) = &polled {
            this.busy.progress();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The connection-level timers hyper does not keep for us: the first request head must arrive
/// within `headerRead` of the connection's start, however it was spent (the protocol sniff
/// included), else the connection is closed; an HTTP/2 connection with no stream open for
/// `timeouts.idle` is closed gracefully (GOAWAY), as hyper's HTTP/1 idle timeout does for
/// HTTP/1. Without them a silent client could hold a connection for two `headerRead`s, and an
/// HTTP/2 client that never opens a stream (answering pings) forever.
struct ConnWatch {
    activity: Arc<Activity>,
    born: tokio::time::Instant,
    header_read: Duration,
    /// HTTP/2 only.
    idle: Option<Duration>,
}

impl ConnWatch {
    /// When to look again: the first-head deadline, or (HTTP/2) when the idle time would end.
    fn next_check(&self) -> Option<tokio::time::Instant> {
        let a = &self.activity;
        if !a.started.load(Ordering::Relaxed) {
            return Some(self.born + self.header_read);
        }
        let idle = self.idle?;
        let now = tokio::time::Instant::now();
        let last = self.born + Duration::from_millis(a.last_done_ms.load(Ordering::Relaxed));
        Some((last + idle).max(now + Duration::from_millis(10)))
    }

    fn head_overdue(&self) -> bool {
        !self.activity.started.load(Ordering::Relaxed)
            && tokio::time::Instant::now() >= self.born + self.header_read
    }

    /// HTTP/2: no request began and no response frame was sent for `idle`. Either no stream is
    /// open, or the open ones are stalled (a response the client does not read, a backend that
    /// sends nothing).
    fn idle_over(&self) -> bool {
        let Some(idle) = self.idle else { return false };
        let a = &self.activity;
        let last = self.born + Duration::from_millis(a.last_done_ms.load(Ordering::Relaxed));
        a.started.load(Ordering::Relaxed) && tokio::time::Instant::now() >= last + idle
    }
}

/// Runs a connection to its end; when the gateway starts draining, or the connection has been
/// idle too long, asks it to finish the requests in flight and close; a connection whose first
/// request head is overdue is dropped.
async fn drive<C: Graceful>(
    conn: C,
    peer: SocketAddr,
    mut drain: watch::Receiver<bool>,
    watch: ConnWatch,
) {
    tokio::pin!(conn);
    if *drain.borrow() {
        conn.as_mut().begin_shutdown();
    }
    loop {
        let wake = watch.next_check();
        tokio::select! {
            res = conn.as_mut() => {
                if let Err(e) = res {
                    tracing::debug!(%peer, error = %e, "connection ended with error");
                }
                return;
            }
            _ = drain.changed() => {
                conn.as_mut().begin_shutdown();
                break;
            }
            _ = sleep_until_opt(wake) => {
                if watch.head_overdue() {
                    tracing::debug!(%peer, "no request head within headerRead; closing");
                    return;
                }
                if watch.idle_over() {
                    conn.as_mut().begin_shutdown();
                    // GOAWAY sent; streams still open get one more idle period to finish.
                    let bound = watch.idle.unwrap_or(watch.header_read);
                    match tokio::time::timeout(bound, conn.as_mut()).await {
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "idle connection ended with error"),
                        Ok(Ok(())) => {}
                        Err(_) => tracing::debug!(%peer, "idle connection's streams still stalled; closing"),
                    }
                    return;
                }
            }
        }
    }
    if let Err(e) = conn.await {
        tracing::debug!(%peer, error = %e, "connection ended with error while draining");
    }
}

async fn sleep_until_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The seed's behaviour with TLS on: the plain port answers 301 to the same URL over HTTPS.
fn redirect(req: &Request<Incoming>, https_port: u16) -> Response<Body> {
    // Canonical (rules::host), IPv6 already in brackets; an invalid Host gets a neutral name.
    let host = proxy::request_host(req).unwrap_or_else(|| "localhost".into());
    let pq = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let location = if https_port == 443 {
        format!("https://{host}{pq}")
    } else {
        format!("https://{host}:{https_port}{pq}")
    };
    let mut resp = Response::new(Body::Empty);
    *resp.status_mut() = StatusCode::MOVED_PERMANENTLY;
    if let Ok(v) = HeaderValue::from_str(&location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    resp
}
