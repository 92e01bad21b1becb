//! Lingering close for client connections (nginx's `lingering_close`).
//!
//! When the gateway answers before reading the whole request (413 for a body over
//! `maxBodySize`, 400 for broken framing) and then closes, unread bytes in the socket's
//! receive queue make the kernel send a reset, and the client can lose the response that was
//! already on its way. On shutdown this wrapper first sends FIN, then reads and discards what
//! the client still sends until it closes its side, no data arrives for [`LINGER_IDLE`], or
//! [`LINGER_TOTAL`] has passed; only then is the socket closed.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

/// Longest a closing connection is kept to drain the client's unread bytes.
pub const LINGER_TOTAL: Duration = Duration::from_secs(5);
/// A closing connection whose client sends nothing for this long is closed at once.
pub const LINGER_IDLE: Duration = Duration::from_secs(1);

pub struct Lingering {
    stream: TcpStream,
    linger: Option<Linger>,
}

struct Linger {
    until: Instant,
    timer: Pin<Box<Sleep>>,
}

impl Lingering {
    pub fn new(stream: TcpStream) -> Self {
        Lingering {
            stream,
            linger: None,
        }
    }
}

impl AsyncRead for Lingering {
    #[inline]
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Lingering {
    #[inline]
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, b)
    }

    #[inline]
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    #[inline]
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    #[inline]
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.linger.is_none() {
            ready!(Pin::new(&mut this.stream).poll_shutdown(cx))?;
            let now = Instant::now();
            this.linger = Some(Linger {
                until: now + LINGER_TOTAL,
                timer: Box::pin(tokio::time::sleep_until(now + LINGER_IDLE)),
            });
        }
        let Some(linger) = this.linger.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        let mut scratch = [0u8; 16 * 1024];
        loop {
            let mut buf = ReadBuf::new(&mut scratch);
            match Pin::new(&mut this.stream).poll_read(cx, &mut buf) {
                // The client closed its side (or the socket failed): nothing left to protect.
                Poll::Ready(Ok(())) if buf.filled().is_empty() => return Poll::Ready(Ok(())),
                Poll::Ready(Err(_)) => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(())) => {
                    let now = Instant::now();
                    if now >= linger.until {
                        return Poll::Ready(Ok(()));
                    }
                    let next = (now + LINGER_IDLE).min(linger.until);
                    linger.timer.as_mut().reset(next);
                }
                Poll::Pending => {
                    ready!(linger.timer.as_mut().poll(cx));
                    return Poll::Ready(Ok(()));
                }
            }
        }
    }
}
