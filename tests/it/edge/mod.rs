//! Edge rules through the real binary, byte by byte: host canonicalisation (HTTP/1 Host and
//! absolute targets, HTTP/2 `:authority` and `host`), the escaped-separator policy, the
//! header-field policy (underscores, count, size, duplicate Authorization), CONNECT, silent
//! connections, and the quota of the embedded (memory) limit store beside Redis.
//!
//! HTTP/1 probes are written on raw sockets; HTTP/2 probes use the h2 crate (a frame-level
//! client: it sends the pseudo-headers and fields exactly as given) and, for bytes no URI type
//! can hold, hand-written HEADERS frames.

mod admission;
mod connections;
mod fields;
mod host;
mod path;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::raw::{h2_send, read_head_raw, RawServer, HEALTH_OK};

/// A raw HTTP/1.1 backend that records every request head it receives and answers 200 with
/// `x-backend: NAME`. Lets the tests see exactly which names and values reached a backend.
struct Capture {
    heads: Arc<Mutex<Vec<String>>>,
    server: RawServer,
}

impl Capture {
    async fn start(name: &'static str) -> Capture {
        let heads = Arc::new(Mutex::new(Vec::new()));
        let h = heads.clone();
        let server = RawServer::start(move |mut s| {
            let h = h.clone();
            async move {
                // One request per connection is enough here.
                let (head, _) = read_head_raw(&mut s, Duration::from_secs(5)).await;
                let Some(head) = head.strip_suffix("\r\n\r\n") else {
                    return;
                };
                if head.starts_with("GET /health") {
                    let _ = s.write_all(HEALTH_OK).await;
                    return;
                }
                h.lock().unwrap().push(head.to_string());
                let resp = format!(
                    "HTTP/1.1 200 OK\r\nx-backend: {name}\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok"
                );
                let _ = s.write_all(resp.as_bytes()).await;
            }
        })
        .await;
        Capture { heads, server }
    }

    fn url(&self) -> String {
        self.server.url.clone()
    }

    fn heads(&self) -> Vec<String> {
        self.heads.lock().unwrap().clone()
    }

    fn last(&self) -> String {
        self.heads().last().cloned().unwrap_or_default()
    }
}

const TOP: &str = "gatewayPort: \"{port}\"\ngatewayBind: 127.0.0.1\nadminPort: \"{admin}\"\nhealthCheckInterval: 1h\n";

// ---------------------------------------------------------------------------------------------
// HTTP/2 clients

/// One HTTP/2 request through the h2 crate: `authority` as `:authority`, `fields` as given.
async fn h2_request(
    port: u16,
    method: &str,
    authority: &str,
    path: &str,
    fields: &[(&str, &str)],
) -> Result<(u16, http::HeaderMap), String> {
    let tcp = TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| e.to_string())?;
    let (client, conn) = h2::client::handshake(tcp)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut client = client.ready().await.map_err(|e| e.to_string())?;
    let uri = if method == "CONNECT" {
        authority.to_string()
    } else {
        format!("http://{authority}{path}")
    };
    let mut b = http::Request::builder().method(method).uri(uri);
    for (n, v) in fields {
        b = b.header(*n, *v);
    }
    let req = b.body(()).map_err(|e| e.to_string())?;
    let (resp, _) = client.send_request(req, true).map_err(|e| e.to_string())?;
    let resp = tokio::time::timeout(Duration::from_secs(5), resp)
        .await
        .map_err(|_| "no response".to_string())?
        .map_err(|e| e.to_string())?;
    Ok((resp.status().as_u16(), resp.headers().clone()))
}

/// What came back for stream 1 of a hand-written HTTP/2 request.
#[derive(Debug, PartialEq)]
enum H2Outcome {
    /// A response whose `:status` was HPACK-indexed from the static table (200, 204, 206, 304,
    /// 400, 404, 500).
    Status(u16),
    /// A response with another status encoding.
    OtherStatus,
    Reset,
    GoAway,
    Nothing,
}

/// Sends one GET as raw frames with the given fields (pseudo-headers first) and reports what
/// stream 1 got.
async fn h2_raw(port: u16, fields: &[(&[u8], &[u8])]) -> H2Outcome {
    let mut s = h2_send(port, &[], fields).await;
    let mut buf = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut chunk = [0u8; 4096];
    while Instant::now() < deadline {
        // Parse whole frames already read.
        let mut at = 0;
        while buf.len() >= at + 9 {
            let len = u32::from_be_bytes([0, buf[at], buf[at + 1], buf[at + 2]]) as usize;
            if buf.len() < at + 9 + len {
                break;
            }
            let kind = buf[at + 3];
            let stream = u32::from_be_bytes([buf[at + 5], buf[at + 6], buf[at + 7], buf[at + 8]])
                & 0x7fff_ffff;
            let payload = &buf[at + 9..at + 9 + len];
            match (kind, stream) {
                (0x1, 1) => {
                    const STATIC: [(u8, u16); 7] = [
                        (0x88, 200),
                        (0x89, 204),
                        (0x8a, 206),
                        (0x8b, 304),
                        (0x8c, 400),
                        (0x8d, 404),
                        (0x8e, 500),
                    ];
                    return match payload
                        .first()
                        .and_then(|b| STATIC.iter().find(|(i, _)| i == b))
                    {
                        Some((_, code)) => H2Outcome::Status(*code),
                        None => H2Outcome::OtherStatus,
                    };
                }
                (0x3, 1) => return H2Outcome::Reset,
                (0x7, _) => return H2Outcome::GoAway,
                _ => {}
            }
            at += 9 + len;
        }
        buf.drain(..at);
        match tokio::time::timeout(Duration::from_millis(500), s.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return H2Outcome::Nothing,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => {}
        }
    }
    H2Outcome::Nothing
}
