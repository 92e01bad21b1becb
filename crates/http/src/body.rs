//! The one body type used both ways: streamed bodies from hyper, or small bodies the gateway writes.
//! A response body streamed from a pooled upstream connection hands the connection back to its pool
//! when it ends. A client's request body going upstream is a [`ClientBody`]: it enforces
//! `maxBodySize` and the body-idle timeout, and records how far the client got, so a failed
//! exchange can be blamed on the side that caused it.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

/// Where a connection goes back when a response body read from it has ended: the upstream
/// crate's backend (its idle list). A trait, so this crate does not name the one above it.
pub trait IdleSink: Send + Sync {
    fn give_back(&self, sender: hyper::client::conn::http1::SendRequest<Body>);
}

/// A pooled connection on loan to a response body, handed back at end of stream.
pub struct PoolReturn {
    sink: Arc<dyn IdleSink>,
    sender: hyper::client::conn::http1::SendRequest<Body>,
}

impl PoolReturn {
    pub fn new(
        sink: Arc<dyn IdleSink>,
        sender: hyper::client::conn::http1::SendRequest<Body>,
    ) -> Self {
        PoolReturn { sink, sender }
    }

    pub fn give_back(self) {
        self.sink.give_back(self.sender);
    }
}

/// Errors a body can yield: hyper's, or the gateway's own limits.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error(transparent)]
    Hyper(#[from] hyper::Error),
    #[error("request body larger than the limit of {0} bytes")]
    TooLarge(u64),
    /// The upstream wanted more of the body and the client sent nothing for this long.
    #[error("request body stalled: no data for {0:?}")]
    Stalled(Duration),
}

pub enum Body {
    Empty,
    Full(Option<Bytes>),
    Incoming(Incoming),
    /// A client's request body on its way upstream (boxed: only requests with a body pay for it).
    Client(Pin<Box<ClientBody>>),
    /// An upstream response; `ret` gives the connection back to its pool at end of stream.
    Pooled(Incoming, Option<PoolReturn>),
    /// A body the gateway watches on its way (the gRPC status in a response's trailers).
    Boxed(Pin<Box<dyn http_body::Body<Data = Bytes, Error = BodyError> + Send>>),
}

impl Body {
    pub fn full(b: impl Into<Bytes>) -> Self {
        Body::Full(Some(b.into()))
    }
}

/// Where a client's request body stands, as seen by the upstream connection that reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyState {
    /// Not waiting on the client: not yet asked for, or the last chunk was handed upstream and
    /// the upstream has not asked for more (it is slow to read, which is not the client's doing).
    Flowing,
    /// The upstream asked for more and the client has not sent it yet.
    AwaitingClient,
    /// The client's body ended (end of stream seen).
    Complete,
    /// The body failed: the client's framing broke, it went away, it stalled or went over the
    /// size limit.
    Failed,
}

/// A [`BodyState`] shared between the body (owned by the upstream connection task) and the
/// request that sent it (`proxy::forward`), which reads it when the exchange fails or its
/// deadline passes.
#[derive(Debug, Default)]
pub struct BodyProgress {
    state: AtomicU8,
    /// When the last of the body was handed upstream: the backend's time to answer runs from
    /// here, not from when the head was forwarded (a slow upload is not the backend's time).
    completed: OnceLock<std::time::Instant>,
    /// Why the body failed. An HTTP/2 upstream connection reports a failed request body as a
    /// reset stream, without the body's error, so the exchange's blame is read from here.
    failure: OnceLock<BodyFailure>,
    /// The whole body, when it was at most `REPLAY_LIMIT` bytes with no trailers: a request an
    /// HTTP/2 backend did not process (GOAWAY, REFUSED_STREAM) can be sent again with it.
    replay: OnceLock<Vec<Bytes>>,
}

/// Largest request body kept for a resend to another connection (a small unary gRPC call, a
/// small JSON POST); larger bodies are streamed without a copy kept.
pub const REPLAY_LIMIT: u64 = 64 * 1024;

/// Why a client's body failed on its way upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFailure {
    /// Over `maxBodySize` (the limit).
    TooLarge(u64),
    /// Nothing arrived for the body-idle timeout.
    Stalled,
    /// Broken framing, or the client went away.
    Broken,
}

impl BodyProgress {
    pub fn state(&self) -> BodyState {
        match self.state.load(Ordering::Acquire) {
            1 => BodyState::AwaitingClient,
            2 => BodyState::Complete,
            3 => BodyState::Failed,
            _ => BodyState::Flowing,
        }
    }

    /// The whole body, if it was complete, small and without trailers (a copy of the chunk
    /// handles, not of the bytes).
    pub fn replay(&self) -> Option<Bytes> {
        if self.state() != BodyState::Complete {
            return None;
        }
        let chunks = self.replay.get()?;
        if chunks.len() == 1 {
            return Some(chunks[0].clone());
        }
        let mut all = Vec::with_capacity(chunks.iter().map(Bytes::len).sum());
        for c in chunks {
            all.extend_from_slice(c);
        }
        Some(Bytes::from(all))
    }

    /// Why the body failed, if it did.
    pub fn failure(&self) -> Option<BodyFailure> {
        self.failure.get().copied()
    }

    fn fail(&self, why: BodyFailure) {
        let _ = self.failure.set(why);
        self.set(BodyState::Failed);
    }

    /// When the body was complete (the state became [`BodyState::Complete`]), if it was.
    pub fn completed_at(&self) -> Option<std::time::Instant> {
        self.completed.get().copied()
    }

    fn set(&self, s: BodyState) {
        let v = match s {
            BodyState::Flowing => 0,
            BodyState::AwaitingClient => 1,
            BodyState::Complete => {
                // The first sighting counts (a body can be seen ending twice: its last data
                // frame says so, then its end of stream); set before the state is published,
                // so a reader that sees Complete also sees the instant.
                let _ = self.completed.set(std::time::Instant::now());
                2
            }
            BodyState::Failed => 3,
        };
        self.state.store(v, Ordering::Release);
    }
}

pin_project_lite::pin_project! {
    /// A client's request body: the size limit (`maxBodySize`) checked while streaming, and a
    /// body-idle timeout (nginx's `client_body_timeout`): once the upstream asks for more, the
    /// client must send some within `idle`, else the body fails with [`BodyError::Stalled`].
    /// The idle clock runs only while the upstream is waiting on the client, so a backend that
    /// reads slowly never makes a client look stalled.
    pub struct ClientBody {
        inner: Incoming,
        limit: Option<u64>,
        seen: u64,
        idle: Duration,
        // Whether `timer` is set for the current wait on the client.
        armed: bool,
        // The chunks so far while the body stays within `REPLAY_LIMIT` (None beyond it).
        kept: Option<Vec<Bytes>>,
        progress: Arc<BodyProgress>,
        #[pin]
        timer: Sleep,
    }
}

impl ClientBody {
    /// Wraps `inner`; returns the body and the handle through which its progress is read.
    pub fn wrap(inner: Incoming, limit: Option<u64>, idle: Duration) -> (Body, Arc<BodyProgress>) {
        let progress = Arc::new(BodyProgress::default());
        let body = ClientBody {
            inner,
            limit,
            seen: 0,
            idle,
            armed: false,
            kept: Some(Vec::new()),
            progress: progress.clone(),
            // Re-armed (`reset`) when a wait on the client begins; never polled before that.
            timer: tokio::time::sleep(idle),
        };
        (Body::Client(Box::pin(body)), progress)
    }
}

impl http_body::Body for ClientBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let mut this = self.project();
        match Pin::new(&mut *this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                *this.armed = false;
                if let Some(d) = frame.data_ref() {
                    *this.seen += d.len() as u64;
                    if *this.seen <= REPLAY_LIMIT {
                        if let Some(k) = this.kept.as_mut() {
                            k.push(d.clone());
                        }
                    } else {
                        *this.kept = None;
                    }
                    if let Some(limit) = *this.limit {
                        if *this.seen > limit {
                            this.progress.fail(BodyFailure::TooLarge(limit));
                            return Poll::Ready(Some(Err(BodyError::TooLarge(limit))));
                        }
                    }
                } else {
                    // Trailers are not kept: such a body is never resent.
                    *this.kept = None;
                }
                // hyper stops polling a body that says it has ended, so this is where a
                // Content-Length body is seen to be complete.
                if this.inner.is_end_stream() {
                    if let Some(k) = this.kept.take() {
                        let _ = this.progress.replay.set(k);
                    }
                    this.progress.set(BodyState::Complete);
                } else {
                    this.progress.set(BodyState::Flowing);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.progress.fail(BodyFailure::Broken);
                Poll::Ready(Some(Err(BodyError::Hyper(e))))
            }
            Poll::Ready(None) => {
                if let Some(k) = this.kept.take() {
                    let _ = this.progress.replay.set(k);
                }
                this.progress.set(BodyState::Complete);
                Poll::Ready(None)
            }
            Poll::Pending => {
                if !*this.armed {
                    *this.armed = true;
                    this.timer.as_mut().reset(Instant::now() + *this.idle);
                }
                if this.timer.poll(cx).is_ready() {
                    this.progress.fail(BodyFailure::Stalled);
                    return Poll::Ready(Some(Err(BodyError::Stalled(*this.idle))));
                }
                this.progress.set(BodyState::AwaitingClient);
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            Body::Empty => Poll::Ready(None),
            Body::Full(b) => Poll::Ready(b.take().map(|d| Ok(Frame::data(d)))),
            Body::Incoming(i) => Pin::new(i).poll_frame(cx).map_err(BodyError::from),
            Body::Client(c) => c.as_mut().poll_frame(cx),
            Body::Boxed(b) => b.as_mut().poll_frame(cx),
            Body::Pooled(i, ret) => {
                let res = Pin::new(&mut *i).poll_frame(cx).map_err(BodyError::from);
                match &res {
                    Poll::Ready(None) => {
                        if let Some(r) = ret.take() {
                            r.give_back();
                        }
                    }
                    Poll::Ready(Some(Err(_))) => {
                        ret.take();
                    }
                    Poll::Ready(Some(Ok(_))) => {
                        if http_body::Body::is_end_stream(i) {
                            if let Some(r) = ret.take() {
                                r.give_back();
                            }
                        }
                    }
                    Poll::Pending => {}
                }
                res
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Empty => true,
            Body::Full(b) => b.is_none(),
            Body::Incoming(i) | Body::Pooled(i, _) => i.is_end_stream(),
            Body::Client(c) => c.is_end_stream(),
            Body::Boxed(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Empty => SizeHint::with_exact(0),
            Body::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Body::Full(None) => SizeHint::with_exact(0),
            Body::Incoming(i) | Body::Pooled(i, _) => i.size_hint(),
            Body::Client(c) => c.size_hint(),
            Body::Boxed(b) => b.size_hint(),
        }
    }
}
