//! Who gets blamed when an exchange fails, and which upgrades are tunnelled, through the real
//! binary on raw sockets.
//!
//! A client whose body stalls, trickles or breaks off is answered as the client's fault and never
//! counts against the backend; backends that really fail are still ejected, but passive signals
//! never take out more than half a pool; active health checks still take down backends out.
//! Upgrades: only allowed tokens are forwarded, and a tunnel opens only on a 101 that completes
//! the handshake the client asked for.

mod blame;
mod origin;
mod slow_upload;
mod upgrades;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::raw::{header, read_head_raw, RawServer, HEALTH_OK};
use crate::support::*;

/// (address, healthy) of every backend of `service`, from /admin/upstreams.
async fn upstreams(gw: &Gateway, service: &str) -> Vec<(String, bool)> {
    let (status, body) = get(gw.admin_port, "/admin/upstreams")
        .await
        .expect("GET /admin/upstreams");
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("upstreams JSON");
    let services = v["services"].as_array().cloned().unwrap_or_default();
    let svc = services
        .iter()
        .find(|s| s["service"] == service)
        .unwrap_or_else(|| panic!("no service {service} in {body}"));
    svc["backends"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|b| {
            (
                b["address"].as_str().unwrap_or_default().to_string(),
                b["healthy"].as_bool().expect("healthy is a bool"),
            )
        })
        .collect()
}

/// The gateway's `hexgate_upstream_errors_total` for `service`, all reasons summed.
async fn upstream_errors(gw: &Gateway, service: &str) -> u64 {
    let m = gw.metrics().await;
    let prefix = format!("hexgate_upstream_errors_total{{service=\"{service}\",reason=");
    let counts: Vec<u64> = m
        .lines()
        .filter(|l| l.starts_with(&prefix))
        .filter_map(|l| l.rsplit(' ').next()?.trim().parse().ok())
        .collect();
    assert!(
        !counts.is_empty(),
        "no upstream error count for {service}: {m}"
    );
    counts.iter().sum()
}

// ---- A raw backend for upgrades, and one that records what it is told ----

/// How the raw upgrade backend answers a request.
#[derive(Clone, Copy)]
enum Answer {
    /// 101 websocket with the accept the request's key calls for.
    WebSocketRight,
    /// 101 websocket with the accept for some other key.
    WebSocketWrong,
    /// 101 websocket without Sec-WebSocket-Accept.
    WebSocketMissing,
    /// 101 naming this protocol.
    Switch(&'static str),
    /// An ordinary 200.
    Ordinary,
}

/// A raw-TCP backend for upgrades: records each request head and every byte received after it,
/// answers as `answer` says and, after a 101, echoes what it receives.
struct UpgradeBackend {
    url: String,
    heads: Arc<Mutex<Vec<String>>>,
    after: Arc<Mutex<Vec<u8>>>,
    _server: RawServer,
}

impl UpgradeBackend {
    async fn start(answer: Answer) -> UpgradeBackend {
        let heads = Arc::new(Mutex::new(Vec::new()));
        let after = Arc::new(Mutex::new(Vec::new()));
        let (h, a) = (heads.clone(), after.clone());
        let server = RawServer::start(move |mut s| {
            let (h, a) = (h.clone(), a.clone());
            async move {
                let (head, rest) = read_head_raw(&mut s, Duration::from_secs(5)).await;
                if head.is_empty() {
                    return;
                }
                // Active health checks are not part of what the tests look at.
                if head.starts_with("GET /health ") {
                    let _ = s.write_all(HEALTH_OK).await;
                    return;
                }
                // The key as sent (base64 is case-sensitive): header names are not.
                let key = header(&head, "sec-websocket-key").unwrap_or_default();
                h.lock().expect("heads").push(head.to_ascii_lowercase());
                a.lock().expect("after").extend_from_slice(&rest);
                let reply = match answer {
                    Answer::WebSocketRight => format!(
                        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
                        websocket_accept(key.as_bytes())
                    ),
                    Answer::WebSocketWrong => format!(
                        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
                        websocket_accept(b"AAAAAAAAAAAAAAAAAAAAAA==")
                    ),
                    Answer::WebSocketMissing => "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n".to_string(),
                    Answer::Switch(p) => format!(
                        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: {p}\r\nConnection: Upgrade\r\n\r\n"
                    ),
                    Answer::Ordinary => "HTTP/1.1 200 OK\r\nContent-Length: 8\r\nConnection: close\r\n\r\nordinary".to_string(),
                };
                if s.write_all(reply.as_bytes()).await.is_err() {
                    return;
                }
                if matches!(answer, Answer::Ordinary) {
                    return;
                }
                // Echo until the peer closes or 5 s pass (bounded in count too).
                let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
                let mut buf = [0u8; 4096];
                for _ in 0..1024 {
                    match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
                        Ok(Ok(n)) if n > 0 => {
                            a.lock().expect("after").extend_from_slice(&buf[..n]);
                            if s.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                        _ => return,
                    }
                }
            }
        })
        .await;
        UpgradeBackend {
            url: server.url.clone(),
            heads,
            after,
            _server: server,
        }
    }

    fn heads(&self) -> Vec<String> {
        self.heads.lock().expect("heads").clone()
    }

    fn after(&self) -> Vec<u8> {
        self.after.lock().expect("after").clone()
    }
}
