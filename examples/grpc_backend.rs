//! A minimal gRPC backend for the benchmarks (`bench/run.sh grpc`): cleartext HTTP/2 (prior
//! knowledge) on 127.0.0.1, answering every request with one fixed gRPC message (a
//! `helloworld.HelloReply{message: "Hello world"}`), `content-type: application/grpc` and the
//! trailers `grpc-status: 0`. The request body is read to its end first, as a gRPC server would.
//!
//! cargo run --release --example grpc_backend -- --port 50051 [--threads 1] [--max-streams 4096]
//!   [--max-pending-resets N]
//!
//! `--threads 1` (the default) runs one current-thread runtime, like the one-worker nginx backend
//! of the HTTP/1 benchmarks. `--max-pending-resets` is h2's limit on streams the client resets
//! before the server has accepted them (the "rapid reset" guard: past it the server sends GOAWAY
//! and drops the connection); unset, h2's default of 20 applies, as in hyper or tonic servers left
//! at their defaults. Connection errors are printed to stderr.
//! Stops on SIGTERM or Ctrl+C.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::process::ExitCode;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::{HeaderMap, HeaderValue, CONTENT_TYPE};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};

/// `helloworld.HelloReply{message: "Hello world"}` behind the 5-byte gRPC prefix
/// (uncompressed, big-endian length 13).
const REPLY: &[u8] = b"\x00\x00\x00\x00\x0d\x0a\x0bHello world";

/// One data frame, then the trailers.
struct Reply {
    data: Option<Bytes>,
    trailers: Option<HeaderMap>,
}

impl Body for Reply {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if let Some(d) = self.data.take() {
            return Poll::Ready(Some(Ok(Frame::data(d))));
        }
        Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none() && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        let mut h = SizeHint::new();
        if let Some(d) = &self.data {
            h.set_lower(d.len() as u64);
        }
        h
    }
}

async fn handle(req: Request<Incoming>) -> Result<Response<Reply>, Infallible> {
    // Read the request message(s) to the end of the stream.
    let _ = req.into_body().collect().await;
    let mut trailers = HeaderMap::with_capacity(1);
    trailers.insert("grpc-status", HeaderValue::from_static("0"));
    let mut resp = Response::new(Reply {
        data: Some(Bytes::from_static(REPLY)),
        trailers: Some(trailers),
    });
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    Ok(resp)
}

struct Args {
    port: u16,
    threads: usize,
    max_streams: u32,
    max_pending_resets: Option<usize>,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        port: 50051,
        threads: 1,
        max_streams: 4096,
        max_pending_resets: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = |name: &str| it.next().ok_or(format!("{name} needs a value"));
        match flag.trim_start_matches('-') {
            "port" => a.port = val("--port")?.parse().map_err(|_| "--port: not a port")?,
            "threads" => {
                a.threads = val("--threads")?
                    .parse()
                    .map_err(|_| "--threads: not a number")?
            }
            "max-streams" => {
                a.max_streams = val("--max-streams")?
                    .parse()
                    .map_err(|_| "--max-streams: not a number")?
            }
            "max-pending-resets" => {
                a.max_pending_resets = Some(
                    val("--max-pending-resets")?
                        .parse()
                        .map_err(|_| "--max-pending-resets: not a number")?,
                )
            }
            "h" | "help" => {
                return Err(
                    "usage: grpc_backend --port N [--threads 1] [--max-streams 4096] \
                            [--max-pending-resets N]"
                        .into(),
                )
            }
            other => return Err(format!("unknown flag --{other}")),
        }
    }
    if a.threads == 0 {
        return Err("--threads: at least 1".into());
    }
    Ok(a)
}

async fn serve(addr: SocketAddr, args: &Args) -> std::io::Result<()> {
    // A long accept queue: nginx's grpc_pass opens one upstream connection per concurrent call,
    // hundreds at once, and a full queue costs each dropped SYN a 1 s retransmit.
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    let listener = socket.listen(4096)?;
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder.max_concurrent_streams(args.max_streams);
    if let Some(n) = args.max_pending_resets {
        builder.max_pending_accept_reset_streams(n);
    }
    let stop = shutdown();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _) = match accepted {
                    Ok(s) => s,
                    Err(e) => {
                        eprintln!("accept: {e}");
                        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let conn = builder.serve_connection(TokioIo::new(stream), service_fn(handle));
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        eprintln!("grpc_backend: connection error: {e:?}");
                    }
                });
            }
            _ = &mut stop => return Ok(()),
        }
    }
}

async fn shutdown() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let rt = if args.threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.threads)
            .enable_all()
            .build()
    };
    let rt = match rt {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let addr = SocketAddr::from(([127, 0, 0, 1], args.port));
    match rt.block_on(serve(addr, &args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cannot listen on {addr}: {e}");
            ExitCode::from(1)
        }
    }
}
