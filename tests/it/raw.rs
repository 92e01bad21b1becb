//! Raw sockets, for what an HTTP client library would not send or would not show: requests
//! written byte by byte, answers read as they come (heads, status, when the peer closes),
//! hand-written HTTP/2 frames, and a raw backend that resets its connections.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What a raw backend answers to the gateway's health check (`GET /health`).
pub const HEALTH_OK: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nOK";

/// A connection to 127.0.0.1:`port`.
pub async fn connect(port: u16) -> TcpStream {
    TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap_or_else(|e| panic!("connect to 127.0.0.1:{port}: {e}"))
}

/// A fresh connection to 127.0.0.1:`port` with `raw` written on it.
pub async fn send(port: u16, raw: &[u8]) -> TcpStream {
    let mut s = connect(port).await;
    s.write_all(raw).await.expect("send the request");
    s
}

/// A connection to 127.0.0.1:`port` from the loopback source address `src`: 127.0.0.0/8 is all
/// loopback, so each source address is another peer.
pub async fn connect_from(src: [u8; 4], port: u16) -> std::io::Result<TcpStream> {
    let sock = tokio::net::TcpSocket::new_v4()?;
    sock.bind(SocketAddr::from((src, 0)))?;
    sock.connect(SocketAddr::from(([127, 0, 0, 1], port))).await
}

/// Reads from `s` until the peer closes it (or resets it), for at most `limit`: the bytes read,
/// and whether it closed.
pub async fn read_to_close(s: &mut TcpStream, limit: Duration) -> (Vec<u8>, bool) {
    let deadline = tokio::time::Instant::now() + limit;
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (out, true),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => return (out, false),
        }
    }
}

/// Reads (and discards) from `s` until the peer closes it; the time that took, or None if it is
/// still open at `limit`.
pub async fn time_to_close(s: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    let (_, closed) = read_to_close(s, limit).await;
    closed.then(|| start.elapsed())
}

/// Writes `raw` on a fresh connection and reads until the server closes it, for at most five
/// seconds: what came back, and whether the server closed the connection.
pub async fn exchange_closed(port: u16, raw: &[u8]) -> (String, bool) {
    let mut s = send(port, raw).await;
    let (out, closed) = read_to_close(&mut s, Duration::from_secs(5)).await;
    (String::from_utf8_lossy(&out).into_owned(), closed)
}

/// `exchange_closed` without the close: everything that came back.
pub async fn exchange(port: u16, raw: &[u8]) -> String {
    exchange_closed(port, raw).await.0
}

/// The status code of the first response in `resp`, or 0.
pub fn status(resp: &str) -> u16 {
    resp.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

/// The value of the field `name` (any case) in a message head; the first line (request or
/// status line) is not a field.
pub fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().skip(1).find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// A parsed raw response: status, the head as received (without the blank line), the body.
pub struct Raw {
    pub status: u16,
    pub head: String,
    pub body: String,
}

impl Raw {
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.head, name)
    }

    /// The status line, e.g. `HTTP/1.1 200 OK`.
    pub fn status_line(&self) -> &str {
        self.head.lines().next().unwrap_or("")
    }
}

/// Writes `raw` on a fresh connection and reads until the server closes it (the requests send
/// `Connection: close`), for at most five seconds; the one response.
pub async fn raw_request(port: u16, raw: &[u8]) -> Raw {
    let (text, closed) = exchange_closed(port, raw).await;
    assert!(
        closed,
        "no complete answer within 5s to {:?}",
        String::from_utf8_lossy(raw)
    );
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = status(head);
    assert_ne!(status, 0, "no status line in {text:?}");
    Raw {
        status,
        head: head.to_string(),
        body: body.to_string(),
    }
}

/// Reads one response (head, then a `Content-Length` body) from a connection that may stay
/// open; None if it is not complete within `limit` or the connection ends first.
pub async fn read_one(s: &mut TcpStream, limit: Duration) -> Option<Raw> {
    let deadline = Instant::now() + limit;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = out.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&out[..end]).into_owned();
            let mut r = Raw {
                status: head.split_whitespace().nth(1)?.parse().ok()?,
                head,
                body: String::new(),
            };
            let len: usize = r
                .header("content-length")
                .unwrap_or_else(|| panic!("no content-length in {}", r.head))
                .parse()
                .ok()?;
            if out.len() >= end + 4 + len {
                assert_eq!(
                    out.len(),
                    end + 4 + len,
                    "bytes after the response: {:?}",
                    String::from_utf8_lossy(&out)
                );
                r.body = String::from_utf8_lossy(&out[end + 4..]).into_owned();
                return Some(r);
            }
        }
        let left = deadline.checked_duration_since(Instant::now())?;
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return None,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
}

/// Reads from `s` until the end of a message head (or `limit`); returns the head, lower-cased,
/// and the bytes read after it. Empty head if the connection closed first.
pub async fn read_head(s: &mut TcpStream, limit: Duration) -> (String, Vec<u8>) {
    let (head, rest) = read_head_raw(s, limit).await;
    (head.to_ascii_lowercase(), rest)
}

/// `read_head` without the lower-casing. The head ends with its blank line.
pub async fn read_head_raw(s: &mut TcpStream, limit: Duration) -> (String, Vec<u8>) {
    let deadline = tokio::time::Instant::now() + limit;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while got.len() < 1 << 20 {
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&got[..end + 4]).into_owned();
            return (head, got[end + 4..].to_vec());
        }
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    (String::new(), got)
}

// ---------------------------------------------------------------------------------------------
// HTTP/2 as raw frames, for bytes no URI or header type can hold

/// HPACK literal field without indexing, new name, no Huffman (RFC 7541 6.2.2).
pub fn hpack_literal(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    assert!(
        name.len() < 127 && value.len() < 127,
        "one-byte lengths only"
    );
    out.push(0x00);
    out.push(name.len() as u8);
    out.extend_from_slice(name);
    out.push(value.len() as u8);
    out.extend_from_slice(value);
}

/// One HTTP/2 frame: length, type, flags, stream, payload.
pub fn frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    let len = payload.len() as u32;
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
}

/// Opens an HTTP/2 connection (prior knowledge) and sends the preface, a SETTINGS frame with
/// `settings`, and one request on stream 1: a HEADERS frame (END_HEADERS | END_STREAM) with
/// `fields` as HPACK literals exactly as given, pseudo-headers first. Returns the connection.
pub async fn h2_send<N, V>(port: u16, settings: &[u8], fields: &[(N, V)]) -> TcpStream
where
    N: AsRef<[u8]>,
    V: AsRef<[u8]>,
{
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    frame(&mut out, 0x4, 0, 0, settings); // SETTINGS
    let mut block = Vec::new();
    for (n, v) in fields {
        hpack_literal(&mut block, n.as_ref(), v.as_ref());
    }
    frame(&mut out, 0x1, 0x4 | 0x1, 1, &block); // HEADERS, END_HEADERS | END_STREAM
    send(port, &out).await
}

// ---------------------------------------------------------------------------------------------
// Raw backends

/// A raw TCP server on a loopback port: `handler` gets each accepted connection, on a task of its
/// own. Stopped (with every connection task it started) when dropped.
pub struct RawServer {
    /// `http://127.0.0.1:PORT`
    pub url: String,
    task: tokio::task::JoinHandle<()>,
}

impl RawServer {
    pub async fn start<F, Fut>(handler: F) -> RawServer
    where
        F: Fn(TcpStream) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = l.local_addr().expect("local addr").port();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((s, _)) = l.accept().await else {
                    continue;
                };
                conns.spawn(handler(s));
                // Forget the ones that are done.
                while conns.try_join_next().is_some() {}
            }
        });
        RawServer {
            url: format!("http://127.0.0.1:{port}"),
            task,
        }
    }
}

impl Drop for RawServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A backend that answers its health check (`GET /health`) with 200 and resets every other
/// request after reading it, counting those: passive failures only the requests can see.
pub struct ResettingBackend {
    pub url: String,
    resets: Arc<AtomicU64>,
    _server: RawServer,
}

impl ResettingBackend {
    pub async fn start() -> ResettingBackend {
        let resets = Arc::new(AtomicU64::new(0));
        let r = resets.clone();
        let server = RawServer::start(move |mut s| {
            let r = r.clone();
            async move {
                let (head, _) = read_head(&mut s, Duration::from_secs(5)).await;
                if head.starts_with("get /health ") {
                    let _ = s.write_all(HEALTH_OK).await;
                    return;
                }
                #[allow(deprecated)]
                let _ = s.set_linger(Some(Duration::ZERO));
                r.fetch_add(1, Ordering::Relaxed);
                drop(s);
            }
        })
        .await;
        ResettingBackend {
            url: server.url.clone(),
            resets,
            _server: server,
        }
    }

    pub fn resets(&self) -> u64 {
        self.resets.load(Ordering::Relaxed)
    }
}
