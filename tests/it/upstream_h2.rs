//! HTTP/2 to backends: a backend's GOAWAY drains its connection (streams already open finish,
//! new requests open a new connection), and requests share one multiplexed connection.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};

use crate::support::*;

/// A cleartext HTTP/2 backend numbering its connections. `/slow` answers after 800 ms; anything
/// else at once with `conn N`. `goaway()` makes every open connection send GOAWAY (hyper's
/// graceful shutdown: open streams finish, the connection closes after them).
struct H2Backend {
    port: u16,
    conns: Arc<AtomicU64>,
    goaway: tokio::sync::watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl H2Backend {
    async fn start() -> H2Backend {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let conns = Arc::new(AtomicU64::new(0));
        let (goaway, rx) = tokio::sync::watch::channel(0u64);
        let c = conns.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let id = c.fetch_add(1, Ordering::SeqCst) + 1;
                let mut rx = rx.clone();
                let seen = *rx.borrow();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(
                        move |req: http::Request<Incoming>| async move {
                            if req.uri().path().ends_with("/slow") {
                                tokio::time::sleep(Duration::from_millis(800)).await;
                                return Ok::<_, Infallible>(http::Response::new(Full::new(
                                    Bytes::from(format!("slow done on conn {id}")),
                                )));
                            }
                            Ok(http::Response::new(Full::new(Bytes::from(format!(
                                "conn {id}"
                            )))))
                        },
                    );
                    let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc);
                    let mut conn = std::pin::pin!(conn);
                    tokio::select! {
                        _ = conn.as_mut() => return,
                        _ = rx.wait_for(|g| *g > seen) => {}
                    }
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(Duration::from_secs(10), conn).await;
                });
            }
        });
        H2Backend {
            port,
            conns,
            goaway,
            task,
        }
    }

    fn goaway(&self) {
        self.goaway.send_modify(|g| *g += 1);
    }
}

impl Drop for H2Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn h2_gateway(backend: &H2Backend) -> Gateway {
    let yaml = loopback_config(
        "",
        &service(
            "h2",
            "/h2/",
            &[&format!("h2c://127.0.0.1:{}", backend.port)],
            "",
        ),
    );
    Gateway::start(&yaml).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_goaway_drains_its_connection_without_failing_open_streams() {
    let backend = H2Backend::start().await;
    let gw = h2_gateway(&backend).await;
    let (status, warm) = get(gw.port, "/h2/warm").await.unwrap();
    assert_eq!(status, 200, "{warm}");

    // A slow request in flight when the backend sends GOAWAY.
    let port = gw.port;
    let slow = tokio::spawn(async move { get(port, "/h2/slow").await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = backend.conns.load(Ordering::SeqCst);
    backend.goaway();

    // Requests after the GOAWAY go on, POSTs with a body (never replayed) included: a bounded
    // number, over about a second.
    let mut last = String::new();
    for i in 0..20 {
        let req = http::Request::post(format!("/h2/after/{i}"))
            .header("host", "localhost")
            .body(Full::new(Bytes::from_static(b"payload")))
            .unwrap();
        let (status, _, body) = request(gw.port, req).await.unwrap();
        assert_eq!(
            status,
            200,
            "request {i} after GOAWAY: {body}\n{}",
            gw.log()
        );
        last = body;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, body) = tokio::time::timeout(Duration::from_secs(10), slow)
        .await
        .expect("the open stream finished")
        .unwrap()
        .unwrap();
    assert_eq!(status, 200, "the stream open at the GOAWAY: {body}");
    assert!(body.starts_with("slow done"), "{body}");
    let last_conn: u64 = last
        .strip_prefix("conn ")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{last}"));
    assert!(
        last_conn > before,
        "requests after the GOAWAY go to a connection opened after it ({before} before): {last}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_share_few_http2_connections() {
    let backend = H2Backend::start().await;
    let gw = h2_gateway(&backend).await;
    // 40 requests at once, each held 800 ms by the backend: over HTTP/1.1 that would be 40
    // connections; over HTTP/2 it is at most one per gateway worker (plus a race at the start).
    let mut tasks = Vec::new();
    for _ in 0..40 {
        let port = gw.port;
        tasks.push(tokio::spawn(async move { get(port, "/h2/slow").await }));
    }
    for t in tasks {
        let (status, body) = t.await.unwrap().unwrap();
        assert_eq!(status, 200, "{body}");
    }
    let conns = backend.conns.load(Ordering::SeqCst);
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get()) as u64;
    assert!(
        conns <= 2 * workers + 1,
        "{conns} upstream connections for 40 concurrent requests ({workers} workers)"
    );
}
