//! Traffic policies towards the backends, through the real binary with real backends on
//! loopback: weighted splits with header and cookie matches, each split's pool with its own
//! health; the circuit breaker (5xx in a row eject a backend for `ejectFor`, never more than
//! `maxEjectedPercent` of a pool); retries on another backend by `retryOn` (never a POST with a
//! body) and the retry budget.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

use crate::support::*;

/// A backend answering every request with the status it is set to (200 at first) and the body
/// "PORT LEN" (LEN: the request body's length, read whole first); `/health` is always 200 and
/// not counted. Stopped on drop.
struct Knob {
    addr: SocketAddr,
    hits: Arc<AtomicU64>,
    status: Arc<AtomicU16>,
    task: tokio::task::JoinHandle<()>,
}

impl Knob {
    async fn start(status: u16) -> Knob {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicU64::new(0));
        let status = Arc::new(AtomicU16::new(status));
        let (h, st) = (hits.clone(), status.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (h, st) = (h.clone(), st.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let (h, st) = (h.clone(), st.clone());
                        async move {
                            if req.uri().path() == "/health" {
                                return Ok::<_, Infallible>(Response::new(Full::new(
                                    Bytes::from_static(b"OK"),
                                )));
                            }
                            h.fetch_add(1, Ordering::SeqCst);
                            let len = req
                                .into_body()
                                .collect()
                                .await
                                .map(|b| b.to_bytes().len())
                                .unwrap_or(0);
                            let mut r = Response::new(Full::new(Bytes::from(format!(
                                "{} {len}",
                                addr.port()
                            ))));
                            *r.status_mut() =
                                http::StatusCode::from_u16(st.load(Ordering::SeqCst)).unwrap();
                            Ok(r)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Knob {
            addr,
            hits,
            status,
            task,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn hits(&self) -> u64 {
        self.hits.load(Ordering::SeqCst)
    }

    fn set(&self, status: u16) {
        self.status.store(status, Ordering::SeqCst);
    }
}

impl Drop for Knob {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A request over a fresh HTTP/1.1 connection with `fields`: (status, body).
async fn call(
    port: u16,
    method: &str,
    path: &str,
    fields: &[(&str, &str)],
    body: &'static [u8],
) -> (u16, String) {
    let mut b = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost");
    for (k, v) in fields {
        b = b.header(*k, *v);
    }
    let r = request(port, b.body(Full::new(Bytes::from_static(body))).unwrap())
        .await
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    (r.0, r.2)
}

/// The value of the metric line starting with `series` (0 when absent).
fn metric(m: &str, series: &str) -> u64 {
    m.lines()
        .find_map(|l| l.strip_prefix(series))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// /admin/upstreams of `service`: the route's backends, or those of split `split`, as
/// (address, healthy).
async fn pool_health(gw: &Gateway, service: &str, split: Option<&str>) -> Vec<(String, bool)> {
    let (status, body) = get(gw.admin_port, "/admin/upstreams").await.unwrap();
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let svc = v["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["service"] == service)
        .unwrap_or_else(|| panic!("no {service} in {body}"))
        .clone();
    let backends = match split {
        None => svc["backends"].clone(),
        Some(name) => svc["splits"]
            .as_array()
            .unwrap_or_else(|| panic!("no splits in {body}"))
            .iter()
            .find(|s| s["split"] == name)
            .unwrap_or_else(|| panic!("no split {name} in {body}"))["backends"]
            .clone(),
    };
    backends
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["address"].as_str().unwrap().to_string(),
                b["healthy"].as_bool().unwrap(),
            )
        })
        .collect()
}

fn addr_of(url: &str) -> String {
    url.trim_start_matches("http://").to_string()
}

async fn healthy(gw: &Gateway, service: &str, url: &str) -> bool {
    let addr = addr_of(url);
    pool_health(gw, service, None)
        .await
        .iter()
        .find(|(a, _)| a.contains(&addr))
        .unwrap_or_else(|| panic!("{addr} not in {service}"))
        .1
}

fn split_service(stable: &str, canary: &str, extra: &str) -> String {
    format!(
        "  - name: web\n    path: /web/\n    split:\n      - {{name: stable, weight: 90, backends: [\"{stable}\"]}}\n      - {{name: canary, weight: 10, backends: [\"{canary}\"], match: {{headers: {{X-Canary: \"1\"}}, cookies: {{beta: \"yes\"}}}}}}\n{extra}"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn splits_follow_their_weights_and_matches_always_reach_the_canary() {
    let stable = TestBackend::start(Behaviour::Hello).await;
    let canary = TestBackend::start(Behaviour::Hello).await;
    let gw = Gateway::start(&loopback_config(
        "healthCheckInterval: 30\n",
        &split_service(&stable.url(), &canary.url(), ""),
    ))
    .await;
    // 2,000 requests without a match, from 8 clients at once.
    let n = 2_000u64;
    let mut tasks = Vec::new();
    for t in 0..8 {
        let port = gw.port;
        tasks.push(tokio::spawn(async move {
            let mut client = KeepAlive::new(port);
            for i in 0..n / 8 {
                let (status, body) = client.get(&format!("/web/{t}/{i}")).await.unwrap();
                assert_eq!(status, 200, "{body}");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(stable.hits() + canary.hits(), n);
    // Binomial(2000, 0.1): mean 200, sigma sqrt(2000 * 0.1 * 0.9) = 13.4; 5 sigma either side.
    let (mean, sigma) = (n as f64 * 0.1, (n as f64 * 0.1 * 0.9).sqrt());
    let got = canary.hits() as f64;
    assert!(
        (got - mean).abs() <= 5.0 * sigma,
        "canary got {got} of {n} (expected {mean} ± {:.0})",
        5.0 * sigma
    );
    let m = gw.metrics().await;
    assert_eq!(
        metric(
            &m,
            "hexgate_split_requests_total{service=\"web\",split=\"canary\",code=\"200\"} "
        ),
        canary.hits(),
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "hexgate_split_requests_total{service=\"web\",split=\"stable\",code=\"200\"} "
        ),
        stable.hits()
    );

    // Both the header and the cookie: always the canary, HTTP/1.1 and HTTP/2 (one field per
    // cookie there).
    let (s0, c0) = (stable.hits(), canary.hits());
    for i in 0..100 {
        let (status, _, _) = get_with(
            gw.port,
            &format!("/web/m/{i}"),
            &[("x-canary", "1"), ("cookie", "session=abc; beta=yes")],
        )
        .await
        .unwrap();
        assert_eq!(status, 200);
        let (status, _, _) = h2c_with(
            gw.port,
            &format!("/web/h2/{i}"),
            &[
                ("x-canary", "1"),
                ("cookie", "session=abc"),
                ("cookie", "beta=yes"),
            ],
        )
        .await;
        assert_eq!(status, 200);
    }
    assert_eq!(
        canary.hits() - c0,
        200,
        "every matching request to the canary"
    );
    assert_eq!(stable.hits(), s0);
    // Only part of the match (a header without the cookie, another cookie value): the weights.
    for i in 0..100 {
        let _ = get_with(
            gw.port,
            &format!("/web/p/{i}"),
            &[("x-canary", "1"), ("cookie", "beta=no")],
        )
        .await
        .unwrap();
    }
    assert!(
        stable.hits() - s0 > 50,
        "partial matches are spread by weight"
    );

    // /admin/upstreams lists each split's backends.
    assert_eq!(
        pool_health(&gw, "web", Some("canary")).await,
        vec![(canary.url(), true)]
    );
    assert_eq!(
        pool_health(&gw, "web", Some("stable")).await,
        vec![(stable.url(), true)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_split_pool_has_its_own_health() {
    let stable = TestBackend::start(Behaviour::Hello).await;
    let canary = TestBackend::start(Behaviour::Hello).await;
    let gw = Gateway::start(&loopback_config(
        "healthCheckInterval: 1s\n",
        &split_service(&stable.url(), &canary.url(), ""),
    ))
    .await;
    canary.stop();
    let deadline = Instant::now() + Duration::from_secs(10);
    while pool_health(&gw, "web", Some("canary")).await[0].1 {
        assert!(Instant::now() < deadline, "the canary never went down");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The stable split is untouched: its share answers 200, the canary's share gets 503 (its
    // own pool has no healthy backend), never a request moved to the other split.
    let (mut ok, mut unavailable) = (0, 0);
    for i in 0..300 {
        let (status, body) = get(gw.port, &format!("/web/{i}")).await.unwrap();
        match status {
            200 => ok += 1,
            503 => unavailable += 1,
            s => panic!("{s}: {body}"),
        }
    }
    assert_eq!(stable.hits(), ok);
    assert!(
        ok > 200 && unavailable > 5,
        "{ok} ok, {unavailable} unavailable"
    );
    for _ in 0..20 {
        let (status, _, _) = get_with(
            gw.port,
            "/web/c",
            &[("x-canary", "1"), ("cookie", "beta=yes")],
        )
        .await
        .unwrap();
        assert_eq!(status, 503, "a matched request stays with its split");
    }
    assert!(pool_health(&gw, "web", Some("stable")).await[0].1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_answering_500_is_ejected_for_eject_for_then_restored() {
    let bad = Knob::start(500).await;
    let good = Knob::start(200).await;
    // Active checks every second pass (/health is fine): they must not end the ejection.
    let gw = Gateway::start(&loopback_config(
        "healthCheckInterval: 1s\n",
        &service(
            "api",
            "/api/",
            &[&bad.url(), &good.url()],
            "    circuitBreaker: {consecutive5xx: 3, ejectFor: 3s, maxEjectedPercent: 50}\n",
        ),
    ))
    .await;
    // Round robin: the bad backend gets every other request; its third 500 ejects it.
    let mut fives = 0;
    for i in 0..6 {
        let (status, _) = call(gw.port, "GET", &format!("/api/{i}"), &[], b"").await;
        if status == 500 {
            fives += 1;
        }
    }
    assert_eq!(fives, 3, "the client sees the 500s (no retryOn for them)");
    let ejected_at = Instant::now();
    assert!(!healthy(&gw, "api", &bad.url()).await);
    // While ejected (two active checks pass meanwhile), nothing reaches it.
    let before = bad.hits();
    while ejected_at.elapsed() < Duration::from_millis(2_300) {
        let (status, _) = call(gw.port, "GET", "/api/x", &[], b"").await;
        assert_eq!(status, 200);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(bad.hits(), before);
    assert!(!healthy(&gw, "api", &bad.url()).await);
    // Restored after ejectFor.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !healthy(&gw, "api", &bad.url()).await {
        assert!(Instant::now() < deadline, "never restored");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ejected_at.elapsed() >= Duration::from_millis(2_900));
    // Fixed: it answers again and a success keeps it in.
    bad.set(200);
    for i in 0..10 {
        let (status, _) = call(gw.port, "GET", &format!("/api/ok/{i}"), &[], b"").await;
        assert_eq!(status, 200);
    }
    assert!(bad.hits() > before);
    assert!(healthy(&gw, "api", &bad.url()).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_breaker_never_ejects_more_than_max_ejected_percent() {
    let backends = [
        Knob::start(500).await,
        Knob::start(502).await,
        Knob::start(503).await,
        Knob::start(200).await,
    ];
    let urls: Vec<String> = backends.iter().map(Knob::url).collect();
    let refs: Vec<&str> = urls.iter().map(String::as_str).collect();
    let gw = Gateway::start(&loopback_config(
        "healthCheckInterval: 30\n",
        &service(
            "api",
            "/api/",
            &refs,
            "    circuitBreaker: {consecutive5xx: 2, ejectFor: 30s, maxEjectedPercent: 50}\n",
        ),
    ))
    .await;
    let mut most = 0;
    for i in 0..120 {
        let _ = call(gw.port, "GET", &format!("/api/{i}"), &[], b"").await;
        if i % 10 == 9 {
            let down = pool_health(&gw, "api", None)
                .await
                .iter()
                .filter(|(_, ok)| !ok)
                .count();
            assert!(down <= 2, "{down} of 4 ejected at 50 %");
            most = most.max(down);
        }
    }
    assert_eq!(most, 2, "two of the three failing backends are ejected");
    // The healthy one was never ejected; one failing backend still takes traffic.
    assert!(healthy(&gw, "api", &urls[3]).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_503_is_retried_on_another_backend_but_never_a_post_with_a_body() {
    let unavailable = Knob::start(503).await;
    let good = Knob::start(200).await;
    let gw = Gateway::start(&loopback_config(
        "healthCheckInterval: 30\n",
        &service(
            "api",
            "/api/",
            &[&unavailable.url(), &good.url()],
            // Retries, not the budget, are tested here: without `retryBudget` the default one
            // (at least 5 a second) would refuse some of these.
            "    retries: 1\n    retryOn: [connect-failure, \"503\"]\n    retryBudget: {percent: 100, minPerSecond: 100}\n",
        ),
    ))
    .await;
    let good_port = good.addr.port().to_string();
    // GET and PUT (its body whole in the replay copy): the client sees the good answer.
    for i in 0..10 {
        let (status, body) = call(gw.port, "GET", &format!("/api/get/{i}"), &[], b"").await;
        assert_eq!((status, body), (200, format!("{good_port} 0")));
        let (status, body) = call(
            gw.port,
            "PUT",
            &format!("/api/put/{i}"),
            &[],
            b"twelve bytes",
        )
        .await;
        assert_eq!(
            (status, body),
            (200, format!("{good_port} 12")),
            "the body is sent again whole"
        );
    }
    let retried = unavailable.hits();
    assert!(
        retried >= 8,
        "round robin sends about half the first attempts there: {retried}"
    );
    let m = gw.metrics().await;
    assert_eq!(
        metric(
            &m,
            "hexgate_upstream_retries_total{service=\"api\",reason=\"503\"} "
        ),
        retried,
        "{m}"
    );
    // A POST with a body is sent once, whatever it gets back.
    let (u0, g0) = (unavailable.hits(), good.hits());
    let mut refused = 0;
    for i in 0..10 {
        let (status, _) = call(gw.port, "POST", &format!("/api/post/{i}"), &[], b"payload").await;
        if status == 503 {
            refused += 1;
        }
    }
    assert_eq!(
        (unavailable.hits() - u0) + (good.hits() - g0),
        10,
        "one attempt each"
    );
    assert_eq!(
        refused,
        unavailable.hits() - u0,
        "a 503 to a POST is passed on"
    );
    // Every attempt answering 503: the last answer is passed on as it is.
    good.set(503);
    let (u1, g1) = (unavailable.hits(), good.hits());
    let (status, body) = call(gw.port, "GET", "/api/all", &[], b"").await;
    assert_eq!(status, 503);
    assert_eq!(
        (unavailable.hits() - u1) + (good.hits() - g1),
        2,
        "retries: 1"
    );
    assert!(body.ends_with(" 0"), "the backend's own answer: {body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_stop_at_the_budget() {
    let a = Knob::start(503).await;
    let b = Knob::start(503).await;
    let gw = Gateway::start(&loopback_config(
        "healthCheckInterval: 30\n",
        &service(
            "api",
            "/api/",
            &[&a.url(), &b.url()],
            "    retries: 1\n    retryOn: [\"503\"]\n    retryBudget: {percent: 20, minPerSecond: 3}\n",
        ),
    ))
    .await;
    let started = Instant::now();
    let n = 300u64;
    let mut client = KeepAlive::new(gw.port);
    for i in 0..n {
        let (status, _) = client.get(&format!("/api/{i}")).await.unwrap();
        assert_eq!(status, 503);
    }
    let secs = started.elapsed().as_secs_f64();
    let m = gw.metrics().await;
    let retries = metric(
        &m,
        "hexgate_upstream_retries_total{service=\"api\",reason=\"503\"} ",
    );
    let exhausted = metric(
        &m,
        "hexgate_upstream_retry_budget_exhausted_total{service=\"api\"} ",
    );
    assert_eq!(
        a.hits() + b.hits(),
        n + retries,
        "each retry is one more attempt"
    );
    assert_eq!(
        retries + exhausted,
        n,
        "every request wanted one retry: {m}"
    );
    assert!(exhausted > 0, "{m}");
    // At most max(3, 20 % of the requests) in any second: over the run, 20 % of all
    // requests plus the minimum for each second begun, and one request's slack per window.
    let bound = (n as f64 * 0.2) + 3.0 * (secs.ceil() + 1.0) + secs.ceil() + 1.0;
    assert!(
        (retries as f64) <= bound,
        "{retries} retries for {n} requests in {secs:.2}s (bound {bound:.0})"
    );
    assert!(retries >= 3, "the minimum is always allowed: {retries}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_without_a_breaker_never_resets_the_streak_it_shares() {
    let bad = Knob::start(500).await;
    let good = Knob::start(200).await;
    // Both routes share both backends; only "a" has a breaker. Before, every 500 "b" got from
    // the bad backend counted as a success and started its streak again.
    let services = format!(
        "{}{}",
        service(
            "a",
            "/a/",
            &[&bad.url(), &good.url()],
            "    circuitBreaker: {consecutive5xx: 3, ejectFor: 30s, maxEjectedPercent: 50}\n",
        ),
        service("b", "/b/", &[&bad.url(), &good.url()], ""),
    );
    let gw = Gateway::start(&loopback_config("healthCheckInterval: 30\n", &services)).await;
    // Round robin in each pool: "a" reaches the bad backend every other request; two requests
    // through "b" between two of "a" put one of b's 500s between any two of a's.
    let mut a_fives = 0;
    for i in 0..8 {
        let (status, _) = call(gw.port, "GET", &format!("/a/{i}"), &[], b"").await;
        if status == 500 {
            a_fives += 1;
        }
        for j in 0..2 {
            let _ = call(gw.port, "GET", &format!("/b/{i}/{j}"), &[], b"").await;
        }
        if a_fives == 3 {
            break;
        }
    }
    assert_eq!(a_fives, 3);
    assert!(
        !healthy(&gw, "a", &bad.url()).await,
        "three 500s through the breaker's route eject the backend, whatever b saw meanwhile"
    );
    // Shared: out of b's pool too.
    assert!(!healthy(&gw, "b", &bad.url()).await);
}

/// A backend that gives a request body 300 ms, then answers 500 (its own body timeout, as some
/// application servers answer a slow upload). Stopped on drop.
struct BodyTimeout {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl BodyTimeout {
    async fn start() -> BodyTimeout {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(async move {
                    let svc = service_fn(|req: Request<Incoming>| async move {
                        let read = tokio::time::timeout(
                            Duration::from_millis(300),
                            req.into_body().collect(),
                        )
                        .await;
                        let mut r = Response::new(Full::new(Bytes::from_static(b"body timeout")));
                        if read.is_err() {
                            *r.status_mut() = http::StatusCode::INTERNAL_SERVER_ERROR;
                        }
                        Ok::<_, Infallible>(r)
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        BodyTimeout { addr, task }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for BodyTimeout {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_5xx_to_a_client_whose_body_stalls_never_counts() {
    let (one, two) = (BodyTimeout::start().await, BodyTimeout::start().await);
    let gw = Gateway::start(&loopback_config(
        "healthCheckInterval: 30
",
        &service(
            "api",
            "/api/",
            &[&one.url(), &two.url()],
            "    circuitBreaker: {consecutive5xx: 2, ejectFor: 30s, maxEjectedPercent: 50}\n",
        ),
    ))
    .await;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    for i in 0..6 {
        // Ten bytes of a hundred, then nothing: the backend's 500 comes while the gateway
        // awaits the client. Each backend sees three such requests in a row.
        let mut s = TcpStream::connect(("127.0.0.1", gw.port)).await.unwrap();
        s.write_all(
            format!(
                "PUT /api/{i} HTTP/1.1\r\nhost: localhost\r\ncontent-length: 100\r\n\r\n0123456789"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
        let mut buf = vec![0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("no answer: {}", gw.log()))
            .unwrap();
        let head = String::from_utf8_lossy(&buf[..n]).to_string();
        assert!(head.starts_with("HTTP/1.1 500"), "{head}");
    }
    for b in [&one, &two] {
        assert!(
            healthy(&gw, "api", &b.url()).await,
            "500s to clients whose body stalled are the clients' doing"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retrying_a_status_without_a_budget_stops_at_the_default_one() {
    let a = Knob::start(503).await;
    let b = Knob::start(503).await;
    let gw = Gateway::start(&loopback_config(
        "healthCheckInterval: 30\n",
        &service(
            "api",
            "/api/",
            &[&a.url(), &b.url()],
            "    retries: 1\n    retryOn: [\"503\"]\n",
        ),
    ))
    .await;
    let started = Instant::now();
    let n = 300u64;
    let mut client = KeepAlive::new(gw.port);
    for i in 0..n {
        let (status, _) = client.get(&format!("/api/{i}")).await.unwrap();
        assert_eq!(status, 503);
    }
    let secs = started.elapsed().as_secs_f64();
    let m = gw.metrics().await;
    let retries = metric(
        &m,
        "hexgate_upstream_retries_total{service=\"api\",reason=\"503\"} ",
    );
    let exhausted = metric(
        &m,
        "hexgate_upstream_retry_budget_exhausted_total{service=\"api\"} ",
    );
    assert_eq!(
        retries + exhausted,
        n,
        "every request wanted one retry: {m}"
    );
    assert!(exhausted > 0, "no retryBudget is not unlimited: {m}");
    // The default: max(5, 20 % of the requests) in any second.
    let bound = (n as f64 * 0.2) + 5.0 * (secs.ceil() + 1.0);
    assert!(
        (retries as f64) <= bound,
        "{retries} retries for {n} requests in {secs:.2}s (bound {bound:.0})"
    );
    assert!(retries >= 5, "the default minimum is allowed: {retries}");
}
