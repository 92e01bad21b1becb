//! HTTP/2 to backends: a backend's GOAWAY drains its connection (streams already open finish,
//! new requests open a new connection), and requests share one multiplexed connection.

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
                            let path = req.uri().path().to_string();
                            if path.contains("/reset") {
                                // hyper resets the stream (RST_STREAM) of a failed service call.
                                return Err("reset this stream".to_string());
                            }
                            if path.contains("/slow") {
                                tokio::time::sleep(Duration::from_millis(800)).await;
                                return Ok::<_, String>(http::Response::new(Full::new(
                                    Bytes::from(format!("slow done on conn {id}")),
                                )));
                            }
                            Ok(http::Response::new(Full::new(Bytes::from(format!(
                                "conn {id} port {port}"
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
    h2_gateway_over(&[backend]).await
}

async fn h2_gateway_over(backends: &[&H2Backend]) -> Gateway {
    let urls: Vec<String> = backends
        .iter()
        .map(|b| format!("h2c://127.0.0.1:{}", b.port))
        .collect();
    let urls: Vec<&str> = urls.iter().map(String::as_str).collect();
    let yaml = loopback_config("", &service("h2", "/h2/", &urls, ""));
    Gateway::start(&yaml).await
}

/// The ports of the backends that answered `n` requests to `/h2/ok/i`.
async fn ports_answering(gw: &Gateway, n: usize) -> std::collections::HashSet<String> {
    let mut seen = std::collections::HashSet::new();
    for i in 0..n {
        let (status, body) = get(gw.port, &format!("/h2/ok/{i}")).await.unwrap();
        assert_eq!(status, 200, "{body}");
        seen.insert(body.rsplit(' ').next().unwrap_or_default().to_string());
    }
    seen
}

fn metric(m: &str, line_start: &str) -> u64 {
    m.lines()
        .find_map(|l| l.strip_prefix(line_start))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_resetting_streams_is_not_ejected() {
    let (a, b) = (H2Backend::start().await, H2Backend::start().await);
    let gw = h2_gateway_over(&[&a, &b]).await;
    // Every worker's connections open first.
    assert_eq!(ports_answering(&gw, 20).await.len(), 2);
    let conns = a.conns.load(Ordering::SeqCst) + b.conns.load(Ordering::SeqCst);
    for i in 0..10 {
        let (status, body) = get(gw.port, &format!("/h2/reset/{i}")).await.unwrap();
        assert_eq!(status, 502, "{body}");
        assert!(body.contains("reset the stream"), "{body}");
    }
    let m = gw.metrics().await;
    assert_eq!(
        metric(
            &m,
            "hexgate_upstream_errors_total{service=\"h2\",reason=\"stream_reset\"} "
        ),
        10,
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "hexgate_upstream_errors_total{service=\"h2\",reason=\"connection_error\"} "
        ),
        0,
        "{m}"
    );
    // Both backends still take traffic, and the resets opened no new connections (a health
    // check round may open one per backend meanwhile; dropping the connection at each reset
    // would open ten).
    assert_eq!(ports_answering(&gw, 20).await.len(), 2);
    let after = a.conns.load(Ordering::SeqCst) + b.conns.load(Ordering::SeqCst);
    assert!(
        after <= conns + 2,
        "stream resets keep the shared connections: {conns} before, {after} after"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clients_own_grpc_deadline_never_counts_against_the_backend() {
    let (a, b) = (H2Backend::start().await, H2Backend::start().await);
    let gw = h2_gateway_over(&[&a, &b]).await;
    for i in 0..6 {
        let req = http::Request::post(format!("/h2/slow/{i}"))
            .header("host", "localhost")
            .header("content-type", "application/grpc")
            .header("grpc-timeout", "100m")
            .body(Full::new(Bytes::from_static(b"\0\0\0\0\0")))
            .unwrap();
        let (status, headers, _) = request(gw.port, req).await.unwrap();
        assert_eq!(status, 200);
        assert_eq!(
            headers["grpc-status"], "4",
            "DEADLINE_EXCEEDED: {headers:?}"
        );
    }
    let m = gw.metrics().await;
    assert!(
        !m.lines().any(
            |l| l.starts_with("hexgate_upstream_errors_total{service=\"h2\"") && !l.ends_with(" 0")
        ),
        "{m}"
    );
    assert_eq!(
        ports_answering(&gw, 20).await.len(),
        2,
        "no backend ejected"
    );
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
        .and_then(|n| n.split(' ').next()?.parse().ok())
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

/// A cleartext HTTP/2 backend on its own one-thread runtime, with hyper's default server
/// settings (among them its rapid-reset protection: 20 streams reset before they were
/// accepted, then GOAWAY). `/block` stalls the whole backend for 400 ms, as a busy backend
/// does, so frames pile up unread; anything else is answered at once.
fn busy_backend() -> (u16, Arc<AtomicU64>, std::sync::mpsc::Sender<()>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let (stop, stopped) = std::sync::mpsc::channel::<()>();
    let conns = Arc::new(AtomicU64::new(0));
    let counted = conns.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                if stopped.try_recv().is_ok() {
                    return;
                }
                let Ok(Ok((stream, _))) =
                    tokio::time::timeout(Duration::from_millis(100), listener.accept()).await
                else {
                    continue;
                };
                counted.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let svc =
                        hyper::service::service_fn(|req: http::Request<Incoming>| async move {
                            if req.uri().path().contains("/block") {
                                // Blocks the backend's only thread: nothing is read meanwhile.
                                std::thread::sleep(Duration::from_millis(400));
                            }
                            Ok::<_, String>(http::Response::new(Full::new(Bytes::from_static(
                                b"ok",
                            ))))
                        });
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
    });
    (port, conns, stop)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_cancelling_at_once_do_not_get_the_shared_connection_dropped() {
    // The gateway must not turn its clients' cancellations into resets of streams the backend
    // has not accepted yet: past 20 of them the backend drops the connection, which other
    // clients' calls share.
    let (port, conns, stop) = busy_backend();
    let yaml = loopback_config(
        "",
        &service("busy", "/b/", &[&format!("h2c://127.0.0.1:{port}")], ""),
    );
    let gw = Gateway::start(&yaml).await;
    for i in 0..10 {
        let (status, _) = get(gw.port, &format!("/b/warm/{i}")).await.unwrap();
        assert_eq!(status, 200);
    }
    let before = conns.load(Ordering::SeqCst);
    for round in 0..3 {
        // A call that stalls the backend, in flight on the shared connection.
        let gw_port = gw.port;
        let steady = tokio::spawn(async move { get(gw_port, "/b/block").await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        // Meanwhile a client opens 60 streams and cancels them all.
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", gw.port))
            .await
            .unwrap();
        let (client, conn) = h2::client::handshake(tcp).await.unwrap();
        let driver = tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut client = client.ready().await.unwrap();
        let mut pending = Vec::new();
        for i in 0..60 {
            let req = http::Request::get(format!("http://localhost/b/x{i}"))
                .body(())
                .unwrap();
            match client.send_request(req, true) {
                Ok((resp, _)) => pending.push(resp),
                Err(_) => break,
            }
            client = client.ready().await.unwrap();
        }
        // Let the gateway forward them, then cancel every one (RST_STREAM CANCEL).
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(pending);
        drop(client);
        let (status, body) = tokio::time::timeout(Duration::from_secs(10), steady)
            .await
            .expect("the stalled call ended")
            .unwrap()
            .unwrap();
        assert_eq!(
            status,
            200,
            "round {round}: the call sharing the connection survived: {body}\n{}",
            gw.log()
        );
        driver.abort();
    }
    // A health check may open one connection meanwhile; a connection dropped by the backend
    // in each round would add three more.
    let after = conns.load(Ordering::SeqCst);
    assert!(
        after <= before + 1,
        "the backend kept the shared connection: {before} connections before, {after} after\n{}",
        gw.log()
    );
    let _ = stop.send(());
}
