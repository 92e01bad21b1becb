//! The backend's time runs from the end of the upload: a slow upload is not the backend's
//! fault, a backend silent after it still is, and an upload still incomplete at
//! `timeouts.request` is the client's.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{upstream_errors, upstreams};
use crate::raw::{connect, read_head, RawServer, HEALTH_OK};
use crate::support::*;

/// A raw backend that reads each request's head and its Content-Length body, then answers 200
/// with the body's length after `delay`; `None`: never answers (holds the connection for 15 s).
/// Answers `GET /health` at once. Counts the bodies it read whole.
struct AnswerAfterBody {
    url: String,
    bodies: Arc<AtomicU64>,
    _server: RawServer,
}

impl AnswerAfterBody {
    async fn start(delay: Option<Duration>) -> AnswerAfterBody {
        let bodies = Arc::new(AtomicU64::new(0));
        let b = bodies.clone();
        let server = RawServer::start(move |mut s| {
            let b = b.clone();
            async move {
                let (head, mut body) = read_head(&mut s, Duration::from_secs(15)).await;
                if head.starts_with("get /health ") {
                    let _ = s.write_all(HEALTH_OK).await;
                    return;
                }
                let want = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse::<usize>().ok())
                    .unwrap_or(0);
                let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
                let mut buf = [0u8; 4096];
                for _ in 0..1024 {
                    if body.len() >= want {
                        break;
                    }
                    match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
                        Ok(Ok(n)) if n > 0 => body.extend_from_slice(&buf[..n]),
                        _ => return,
                    }
                }
                if body.len() < want {
                    return;
                }
                b.fetch_add(1, Ordering::Relaxed);
                let Some(delay) = delay else {
                    tokio::time::sleep(Duration::from_secs(15)).await;
                    return;
                };
                tokio::time::sleep(delay).await;
                let n = body.len().to_string();
                let reply = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{n}",
                    n.len()
                );
                let _ = s.write_all(reply.as_bytes()).await;
            }
        })
        .await;
        AnswerAfterBody {
            url: server.url.clone(),
            bodies,
            _server: server,
        }
    }

    fn bodies(&self) -> u64 {
        self.bodies.load(Ordering::Relaxed)
    }
}

/// Sends `POST {path}` with `Content-Length: {offsets.len()}` and one body byte at each offset
/// from the start (the head goes with the first byte), then reads the answer for up to
/// `wait`. Returns the head (lower-cased), the bytes after it and when the head arrived,
/// measured from the first byte.
async fn trickle_post(
    port: u16,
    path: &str,
    offsets: &[Duration],
    wait: Duration,
) -> (String, Vec<u8>, Duration) {
    let mut s = connect(port).await;
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
        offsets.len()
    );
    let start = Instant::now();
    for (i, at) in offsets.iter().enumerate() {
        tokio::time::sleep((start + *at).saturating_duration_since(Instant::now())).await;
        let mut out = if i == 0 {
            head.as_bytes().to_vec()
        } else {
            Vec::new()
        };
        out.push(b'a');
        s.write_all(&out).await.expect("send a body byte");
    }
    let (head, rest) = read_head(&mut s, wait).await;
    (head, rest, start.elapsed())
}

/// The attack: a 5-byte upload trickled so its last byte arrives at 4.8 s (every gap under
/// headerRead, 3 s), to backends that answer 0.5 s after reading the body, with
/// `timeouts.request` 5 s. The backend's 5 s run from the end of the upload, so both uploads
/// (one per backend) get their 200 at about 5.3 s, and nothing is counted against either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickled_upload_never_ejects_a_backend_that_answers_in_time() {
    let b1 = AnswerAfterBody::start(Some(Duration::from_millis(500))).await;
    let b2 = AnswerAfterBody::start(Some(Duration::from_millis(500))).await;
    let yaml = loopback_config(
        "healthCheckInterval: 30\ntimeouts: {headerRead: 3s, request: 5s}\n",
        &service("api", "/api/", &[&b1.url, &b2.url], ""),
    );
    let gw = Gateway::start(&yaml).await;
    let offsets: Vec<Duration> = [0, 1500, 3000, 4500, 4800]
        .into_iter()
        .map(Duration::from_millis)
        .collect();
    // Two at once: round robin gives one to each backend.
    let uploads: Vec<_> = (0..2)
        .map(|_| {
            let offsets = offsets.clone();
            let port = gw.port;
            tokio::spawn(async move {
                trickle_post(port, "/api/upload", &offsets, Duration::from_secs(8)).await
            })
        })
        .collect();
    for u in uploads {
        let (head, rest, took) = u.await.expect("upload task");
        assert!(head.starts_with("http/1.1 200"), "{head:?} after {took:?}");
        assert_eq!(rest, b"5", "the backend read the whole body");
        assert!(
            took >= Duration::from_millis(5200) && took < Duration::from_millis(7000),
            "answered 0.5 s after the last byte (4.8 s): {took:?}"
        );
    }
    assert_eq!((b1.bodies(), b2.bodies()), (1, 1));
    let health = upstreams(&gw, "api").await;
    assert_eq!(health.len(), 2);
    assert!(health.iter().all(|(_, ok)| *ok), "{health:?}");
    assert_eq!(upstream_errors(&gw, "api").await, 0);
}

/// The extension is bounded: a backend that never answers a body completed at 1.9 s gets its
/// 504 at completion + `timeouts.request` (2 s), about 3.9 s, and is counted as failed; and
/// an upload still incomplete at `timeouts.request` stays the client's 408.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_silent_after_a_slow_upload_is_blamed_at_completion_plus_request() {
    let hung = AnswerAfterBody::start(None).await;
    let yaml = loopback_config(
        "healthCheckInterval: 30\ntimeouts: {headerRead: 1500ms, request: 2s}\n",
        &service("api", "/api/", &[&hung.url], ""),
    );
    let gw = Gateway::start(&yaml).await;

    let ms = |v: &[u64]| {
        v.iter()
            .map(|m| Duration::from_millis(*m))
            .collect::<Vec<_>>()
    };
    let (head, _, took) = trickle_post(
        gw.port,
        "/api/upload",
        &ms(&[0, 1000, 1900]),
        Duration::from_secs(6),
    )
    .await;
    assert!(head.starts_with("http/1.1 504"), "{head:?} after {took:?}");
    assert!(
        took >= Duration::from_millis(3800) && took < Duration::from_millis(5000),
        "504 at completion (1.9 s) + request (2 s): {took:?}"
    );
    assert_eq!(hung.bodies(), 1);
    assert_eq!(upstream_errors(&gw, "api").await, 1, "the backend's fault");

    // Still uploading at 2 s (the last byte is due at 2.5 s): the client's 408, at 2 s, and
    // nothing more counted.
    let (head, _, took) = trickle_post(
        gw.port,
        "/api/upload",
        &ms(&[0, 1000, 2500]),
        Duration::from_secs(4),
    )
    .await;
    assert!(head.starts_with("http/1.1 408"), "{head:?} after {took:?}");
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_millis(3000),
        "408 at timeouts.request: {took:?}"
    );
    assert_eq!(upstream_errors(&gw, "api").await, 1);
}
