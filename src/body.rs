//! The one body type used both ways: streamed bodies from hyper, or small bodies the gateway writes.
//! A response body streamed from a pooled upstream connection hands the connection back to its pool
//! when it ends.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;

use crate::upstream::PoolReturn;

/// Errors a body can yield: hyper's, or the gateway's own size limit.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error(transparent)]
    Hyper(#[from] hyper::Error),
    #[error("request body larger than the limit of {0} bytes")]
    TooLarge(u64),
}

pub enum Body {
    Empty,
    Full(Option<Bytes>),
    Incoming(Incoming),
    /// A client body with a size limit (`maxBodySize`) enforced while streaming:
    /// (body, limit, bytes seen so far).
    Limited(Incoming, u64, u64),
    /// An upstream response; `ret` gives the connection back to its pool at end of stream.
    Pooled(Incoming, Option<PoolReturn>),
}

impl Body {
    pub fn full(b: impl Into<Bytes>) -> Self {
        Body::Full(Some(b.into()))
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
            Body::Limited(i, limit, seen) => match Pin::new(i).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    if let Some(d) = frame.data_ref() {
                        *seen += d.len() as u64;
                        if *seen > *limit {
                            return Poll::Ready(Some(Err(BodyError::TooLarge(*limit))));
                        }
                    }
                    Poll::Ready(Some(Ok(frame)))
                }
                other => other.map_err(BodyError::from),
            },
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
            Body::Incoming(i) | Body::Pooled(i, _) | Body::Limited(i, _, _) => i.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Empty => SizeHint::with_exact(0),
            Body::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Body::Full(None) => SizeHint::with_exact(0),
            Body::Incoming(i) | Body::Pooled(i, _) | Body::Limited(i, _, _) => i.size_hint(),
        }
    }
}
