//! The one body type used both ways: streamed bodies from hyper, or small bodies the gateway writes.
//! A response body streamed from a pooled upstream connection hands the connection back to its pool
//! when it ends.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;

use crate::upstream::PoolReturn;

pub enum Body {
    Empty,
    Full(Option<Bytes>),
    Incoming(Incoming),
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
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            Body::Empty => Poll::Ready(None),
            Body::Full(b) => Poll::Ready(b.take().map(|d| Ok(Frame::data(d)))),
            Body::Incoming(i) => Pin::new(i).poll_frame(cx),
            Body::Pooled(i, ret) => {
                let res = Pin::new(&mut *i).poll_frame(cx);
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
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Empty => SizeHint::with_exact(0),
            Body::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Body::Full(None) => SizeHint::with_exact(0),
            Body::Incoming(i) | Body::Pooled(i, _) => i.size_hint(),
        }
    }
}
