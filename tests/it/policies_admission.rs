//! Admission policies through the real binary: `ipAllow` and `ipDeny` (IPv4 from loopback
//! peers, IPv6 from `::1`, and the forwarded client behind `trustedProxies`, IPv6, IPv4 and
//! IPv4-mapped), the 403 byte by byte; `maxInFlight` with a backend that holds its requests
//! until told (the excess refused at once with 503 and Retry-After, the places given back when
//! the held requests end and when clients go away); and plan priority under overload (a free
//! burst leaves pro's places free, then pro fills the route to its limit).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

use crate::apikeys::{call, error_text};
use crate::plans::{ACME, BOB};
use crate::raw::{connect_from, read_to_close, Raw};
use crate::support::*;

const DENIED: &str = "403 Forbidden: client address not allowed on this route";
const SHED: &str = "503 Service Unavailable: too many requests in flight on this route";

// ---------------------------------------------------------------------------------------------
// Helpers

/// A request with `Connection: close` on a fresh connection to `to` (from `from`, when given),
/// read until the gateway closes it: the one response, or None if it did not come in 5 s.
async fn raw_get(
    to: SocketAddr,
    from: Option<[u8; 4]>,
    path: &str,
    fields: &[(&str, &str)],
) -> Raw {
    let mut s = match from {
        Some(src) => connect_from(src, to.port()).await.unwrap(),
        None => TcpStream::connect(to).await.unwrap(),
    };
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    for (n, v) in fields {
        req.push_str(&format!("{n}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let (out, closed) = read_to_close(&mut s, Duration::from_secs(5)).await;
    let text = String::from_utf8_lossy(&out).into_owned();
    assert!(closed, "no complete answer to {path} within 5 s: {text:?}");
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    Raw {
        status: crate::raw::status(head),
        head: head.to_string(),
        body: body.to_string(),
    }
}

fn v4(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// `hexgate_auth_failures_total{service,reason="ip_denied"}`, or None while the metrics crate
/// has no such reason (it is counted from the moment the label exists).
async fn ip_denied(gw: &Gateway, service: &str) -> Option<u64> {
    if !hexgate::metrics::AUTH_REASONS.contains(&"ip_denied") {
        return None;
    }
    Some(crate::apikeys::auth_failures(gw, service, "ip_denied").await)
}

/// A backend that answers paths with `/fast/` in them (and its health check) at once and holds every other
/// request while `hold` is on, until `release`: requests stay in flight at the gateway for as
/// long as the test wants, and none is answered by a timer.
struct HeldBackend {
    addr: SocketAddr,
    /// Requests that reached it (health checks aside).
    arrived: Arc<AtomicU64>,
    /// Requests it is holding now.
    holding: Arc<AtomicU64>,
    hold: Arc<AtomicBool>,
    /// Bumped by `release`; a held request waits for a generation after the one it arrived in.
    generation: tokio::sync::watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl HeldBackend {
    async fn start() -> HeldBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let arrived = Arc::new(AtomicU64::new(0));
        let holding = Arc::new(AtomicU64::new(0));
        let hold = Arc::new(AtomicBool::new(true));
        let (generation, gen_rx) = tokio::sync::watch::channel(0u64);
        let (a, h, on) = (arrived.clone(), holding.clone(), hold.clone());
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (a, h, on, gen_rx) = (a.clone(), h.clone(), on.clone(), gen_rx.clone());
                let svc = service_fn(move |req: Request<Incoming>| {
                    let (a, h, on, mut gen_rx) = (a.clone(), h.clone(), on.clone(), gen_rx.clone());
                    async move {
                        let path = req.uri().path().to_string();
                        if path != "/health" {
                            a.fetch_add(1, Ordering::SeqCst);
                        }
                        if path != "/health" && !path.contains("/fast/") {
                            let arrived_in = *gen_rx.borrow_and_update();
                            if on.load(Ordering::SeqCst) {
                                // Counted until answered, or dropped when the gateway gives up
                                // the request and its connection.
                                let _holding = Holding::new(&h);
                                // Bounded: a test that forgets to release ends anyway.
                                let _ = tokio::time::timeout(
                                    Duration::from_secs(30),
                                    gen_rx.wait_for(|g| *g > arrived_in),
                                )
                                .await;
                            }
                        }
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                    }
                });
                conns.spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc),
                );
                while conns.try_join_next().is_some() {}
            }
        });
        HeldBackend {
            addr,
            arrived,
            holding,
            hold,
            generation,
            task,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn arrived(&self) -> u64 {
        self.arrived.load(Ordering::SeqCst)
    }

    fn holding(&self) -> u64 {
        self.holding.load(Ordering::SeqCst)
    }

    /// Answers every held request; with `keep_holding` false, later ones are answered at once.
    fn release(&self, keep_holding: bool) {
        self.hold.store(keep_holding, Ordering::SeqCst);
        self.generation.send_modify(|g| *g += 1);
    }

    /// Waits (up to 10 s) until `n` requests are being held.
    async fn wait_holding(&self, n: u64) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.holding() != n {
            assert!(
                Instant::now() < deadline,
                "the backend holds {} requests, not {n}",
                self.holding()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// One request held by a [`HeldBackend`].
struct Holding(Arc<AtomicU64>);

impl Holding {
    fn new(count: &Arc<AtomicU64>) -> Holding {
        count.fetch_add(1, Ordering::SeqCst);
        Holding(count.clone())
    }
}

impl Drop for Holding {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Drop for HeldBackend {
    fn drop(&mut self) {
        self.task.abort();
        self.generation.send_modify(|g| *g += 1);
    }
}

/// A request sent on its own task, answered later: (status, body).
type Pending = tokio::task::JoinHandle<(u16, String)>;

fn spawn_get(port: u16, path: &str, key: Option<&'static str>) -> Pending {
    let path = path.to_string();
    tokio::spawn(async move {
        let (status, _, body) = call(port, &path, "x-api-key", key, None).await;
        (status, body)
    })
}

/// Checks a shedding refusal: 503 with `Retry-After: 1` and the reason.
fn assert_shed(status: u16, headers: &http::HeaderMap, body: &str) {
    assert_eq!(status, 503, "{body}");
    assert_eq!(
        headers.get("retry-after").map(|v| v.as_bytes()),
        Some(&b"1"[..])
    );
    assert_eq!(error_text(body), SHED);
}

// ---------------------------------------------------------------------------------------------
// ipAllow, ipDeny

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv4_allow_and_deny_from_loopback_peers() {
    let b = TestBackend::start(Behaviour::Hello).await;
    let u = b.url();
    let services = [
        service(
            "allowed",
            "/allowed/",
            &[&u],
            "    ipAllow: [\"127.0.0.0/8\"]\n",
        ),
        service(
            "denied",
            "/denied/",
            &[&u],
            "    ipDeny: [\"127.0.0.1/32\"]\n",
        ),
        service(
            "elsewhere",
            "/elsewhere/",
            &[&u],
            "    ipAllow: [\"10.0.0.0/8\"]\n",
        ),
        service(
            "both",
            "/both/",
            &[&u],
            "    ipAllow: [\"127.0.0.0/30\"]\n    ipDeny: [\"127.0.0.1\"]\n",
        ),
        service("open", "/open/", &[&u], ""),
    ]
    .concat();
    let gw = Gateway::start(&loopback_config("", &services)).await;
    let to = v4(gw.port);

    let cases: &[(&str, [u8; 4], u16)] = &[
        ("/allowed/x", [127, 0, 0, 1], 200),
        ("/allowed/x", [127, 9, 9, 9], 200),
        ("/denied/x", [127, 0, 0, 1], 403),
        ("/denied/x", [127, 0, 0, 2], 200),
        ("/elsewhere/x", [127, 0, 0, 1], 403),
        // Deny before allow: .1 is in both lists; .2 and .3 only in the allow list; .4 in none.
        ("/both/x", [127, 0, 0, 1], 403),
        ("/both/x", [127, 0, 0, 2], 200),
        ("/both/x", [127, 0, 0, 3], 200),
        ("/both/x", [127, 0, 0, 4], 403),
        ("/open/x", [127, 0, 0, 1], 200),
    ];
    let mut passed = 0;
    for (path, from, want) in cases {
        let r = raw_get(to, Some(*from), path, &[]).await;
        assert_eq!(
            r.status, *want,
            "{path} from {from:?}: {}\n{}",
            r.head, r.body
        );
        if *want == 200 {
            passed += 1;
        } else {
            assert_eq!(error_text(&r.body), DENIED);
        }
    }
    assert_eq!(b.hits(), passed, "refused requests never reach the backend");

    // The answer byte by byte.
    let r = raw_get(to, None, "/denied/x", &[("x-request-id", "ip-check-1")]).await;
    assert_eq!(r.status_line(), "HTTP/1.1 403 Forbidden");
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.header("x-request-id"), Some("ip-check-1"));
    assert_eq!(
        r.header("content-length")
            .map(|l| l.parse::<usize>().unwrap()),
        Some(r.body.len())
    );
    let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(
        v,
        serde_json::json!({"error": DENIED, "status": 403, "requestId": "ip-check-1"})
    );
    assert!(r.header("retry-after").is_none());

    if let Some(n) = ip_denied(&gw, "denied").await {
        assert_eq!(n, 2, "two refusals on `denied`");
        assert_eq!(ip_denied(&gw, "both").await, Some(2));
        assert_eq!(ip_denied(&gw, "allowed").await, Some(0));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_clients_from_the_ipv6_loopback() {
    // Never skipped: a machine without the IPv6 loopback fails here, saying how to enable it.
    if let Err(e) = std::net::TcpListener::bind("[::1]:0") {
        panic!("this test needs the IPv6 loopback ::1 ({e}): enable it with `sysctl -w net.ipv6.conf.lo.disable_ipv6=0`");
    }
    let b = TestBackend::start(Behaviour::Hello).await;
    let u = b.url();
    let services = [
        service("six", "/six/", &[&u], "    ipAllow: [\"::1/128\"]\n"),
        service("prefix", "/prefix/", &[&u], "    ipAllow: [\"::/127\"]\n"),
        service("no-six", "/no-six/", &[&u], "    ipDeny: [\"::/0\"]\n"),
        service(
            "four-only",
            "/four-only/",
            &[&u],
            "    ipAllow: [\"0.0.0.0/0\"]\n",
        ),
        service(
            "other-six",
            "/other-six/",
            &[&u],
            "    ipAllow: [\"2001:db8::/32\"]\n",
        ),
    ]
    .concat();
    let yaml = format!(
        "gatewayPort: \"{{port}}\"\ngatewayBind: \"::1\"\nadminPort: \"{{admin}}\"\nservices:\n{services}"
    );
    let gw = Gateway::start(&yaml).await;
    let to: SocketAddr = format!("[::1]:{}", gw.port).parse().unwrap();
    for (path, want) in [
        ("/six/x", 200),
        ("/prefix/x", 200),
        ("/no-six/x", 403),
        // `0.0.0.0/0` is every IPv4 client, no IPv6 one.
        ("/four-only/x", 403),
        ("/other-six/x", 403),
    ] {
        let r = raw_get(to, None, path, &[]).await;
        assert_eq!(r.status, want, "{path} from ::1: {}\n{}", r.head, r.body);
        if want == 403 {
            assert_eq!(error_text(&r.body), DENIED);
        }
    }
    assert_eq!(b.hits(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rules_apply_to_the_forwarded_client_behind_trusted_proxies() {
    let b = TestBackend::start(Behaviour::Hello).await;
    let u = b.url();
    let services = [
        service(
            "v6",
            "/v6/",
            &[&u],
            "    ipAllow: [\"2001:db8::/32\"]\n    ipDeny: [\"2001:db8:bad::/48\"]\n",
        ),
        service("v4", "/v4/", &[&u], "    ipAllow: [\"10.0.0.0/8\"]\n"),
        // Allows the proxy itself (and only it).
        service("lo", "/lo/", &[&u], "    ipAllow: [\"127.0.0.1/32\"]\n"),
    ]
    .concat();
    let gw = Gateway::start(&loopback_config(
        "trustedProxies: [\"127.0.0.1\"]\n",
        &services,
    ))
    .await;
    let to = v4(gw.port);
    let trusted = Some([127, 0, 0, 1]);
    let untrusted = Some([127, 0, 0, 2]);
    let cases: &[(&str, Option<[u8; 4]>, Option<&str>, u16)] = &[
        ("/v6/x", trusted, Some("2001:db8::5"), 200),
        ("/v6/x", trusted, Some("2001:db8:bad::1"), 403),
        ("/v6/x", trusted, Some("2001:db9::1"), 403),
        ("/v6/x", trusted, Some("10.1.2.3"), 403),
        ("/v4/x", trusted, Some("10.1.2.3"), 200),
        // The last untrusted hop is the client.
        ("/v4/x", trusted, Some("192.0.2.1, 10.1.2.3"), 200),
        ("/v4/x", trusted, Some("10.1.2.3, 192.0.2.1"), 403),
        // An IPv4-mapped IPv6 client is the IPv4 client it is.
        ("/v4/x", trusted, Some("::ffff:10.1.2.3"), 200),
        ("/v4/x", trusted, Some("2001:db8::5"), 403),
        // Entries with ports, as some proxies append them; empty entries skipped.
        ("/v4/x", trusted, Some("10.1.2.3:443"), 200),
        ("/v4/x", trusted, Some("192.0.2.1:443"), 403),
        ("/v6/x", trusted, Some("[2001:db8::5]:443"), 200),
        ("/v6/x", trusted, Some("[2001:db9::1]:443"), 403),
        ("/v4/x", trusted, Some("10.1.2.3,"), 200),
        // A client the proxy named unreadably is unknown: refused, never judged as the proxy
        // (whose address an allow list covering it would let through).
        ("/lo/x", trusted, Some("unknown"), 403),
        ("/lo/x", trusted, Some("fe80::1%eth0"), 403),
        ("/lo/x", trusted, Some("10.1.2.3, unknown"), 403),
        ("/lo/x", trusted, Some("10.1.2.3"), 403),
        ("/lo/x", trusted, None, 200),
        // No header: the peer itself.
        ("/v4/x", trusted, None, 403),
        // From a peer that is not trusted the header is not believed.
        ("/v4/x", untrusted, Some("10.1.2.3"), 403),
        ("/v6/x", untrusted, Some("2001:db8::5"), 403),
    ];
    let mut passed = 0;
    for (path, from, xff, want) in cases {
        let fields: Vec<(&str, &str)> = xff.iter().map(|v| ("x-forwarded-for", *v)).collect();
        let r = raw_get(to, *from, path, &fields).await;
        assert_eq!(
            r.status, *want,
            "{path} from {from:?} for {xff:?}: {}\n{}",
            r.head, r.body
        );
        if *want == 200 {
            passed += 1;
        } else {
            assert_eq!(error_text(&r.body), DENIED);
        }
    }
    assert_eq!(b.hits(), passed);
}

// ---------------------------------------------------------------------------------------------
// maxInFlight

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn max_in_flight_refuses_the_excess_at_once() {
    const N: u64 = 4;
    let b = HeldBackend::start().await;
    let services = service(
        "slow",
        "/slow/",
        &[&b.url()],
        &format!("    maxInFlight: {N}\n"),
    );
    let gw = Gateway::start(&loopback_config("", &services)).await;

    let held: Vec<Pending> = (0..N)
        .map(|_| spawn_get(gw.port, "/slow/held", None))
        .collect();
    b.wait_holding(N).await;

    // A reload while they are held: the new snapshot's route counts them too.
    gw.signal("HUP");
    gw.wait_reloads(2).await; // the first load counts as 1

    // N+1: refused while the N are held, and without reaching the backend.
    let start = Instant::now();
    let (status, headers, body) = call(gw.port, "/slow/more", "x-api-key", None, None).await;
    let took = start.elapsed();
    assert_shed(status, &headers, &body);
    assert_eq!(b.arrived(), N);
    assert!(
        held.iter().all(|h| !h.is_finished()),
        "the refusal came while the held requests were still in flight"
    );
    eprintln!("the refusal took {took:?} with {N} requests held at the backend");
    // A path the backend would answer at once is refused too: the route is full.
    let (status, headers, body) = call(gw.port, "/slow/fast/x", "x-api-key", None, None).await;
    assert_shed(status, &headers, &body);
    assert_eq!(b.arrived(), N);

    // The held ones finish; requests pass again, N at a time.
    b.release(true);
    for h in held {
        assert_eq!(h.await.unwrap(), (200, "ok".to_string()));
    }
    let again: Vec<Pending> = (0..N)
        .map(|_| spawn_get(gw.port, "/slow/held", None))
        .collect();
    b.wait_holding(N).await;
    let (status, headers, body) = call(gw.port, "/slow/more", "x-api-key", None, None).await;
    assert_shed(status, &headers, &body);
    b.release(false);
    for h in again {
        assert_eq!(h.await.unwrap().0, 200);
    }
    for _ in 0..3 {
        assert_eq!(
            call(gw.port, "/slow/x", "x-api-key", None, None).await.0,
            200
        );
    }
    assert_eq!(b.arrived(), 2 * N + 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn clients_that_go_away_give_their_places_back() {
    const N: u64 = 3;
    let b = HeldBackend::start().await;
    let services = service(
        "slow",
        "/slow/",
        &[&b.url()],
        &format!("    maxInFlight: {N}\n"),
    );
    let gw = Gateway::start(&loopback_config("", &services)).await;
    let to = v4(gw.port);

    for round in 0..10 {
        // N clients whose requests are held at the backend, then the route is full...
        let mut clients = Vec::new();
        for _ in 0..N {
            let mut s = TcpStream::connect(to).await.unwrap();
            s.write_all(b"GET /slow/held HTTP/1.1\r\nHost: localhost\r\n\r\n")
                .await
                .unwrap();
            clients.push(s);
        }
        b.wait_holding(N).await;
        let (status, _, body) = call(gw.port, "/slow/fast/x", "x-api-key", None, None).await;
        assert_eq!(status, 503, "round {round}: {body}");
        // ...until they go away: their requests end at the gateway (which gives up their
        // backend connections too), and the places are free again.
        drop(clients);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let (status, _, _) = call(gw.port, "/slow/fast/x", "x-api-key", None, None).await;
            if status == 200 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "round {round}: the places of the clients that went away were not given back"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        b.release(true);
        b.wait_holding(0).await;
    }

    // After all that, the whole capacity and no more.
    let held: Vec<Pending> = (0..N)
        .map(|_| spawn_get(gw.port, "/slow/held", None))
        .collect();
    b.wait_holding(N).await;
    let (status, headers, body) = call(gw.port, "/slow/fast/x", "x-api-key", None, None).await;
    assert_shed(status, &headers, &body);
    b.release(false);
    for h in held {
        assert_eq!(h.await.unwrap().0, 200);
    }
}

// ---------------------------------------------------------------------------------------------
// Plan priority

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_free_burst_leaves_the_places_of_pro() {
    const MAX: u64 = 10;
    let b = HeldBackend::start().await;
    // acme is on pro, bob on free (plans::key_file).
    let yaml = format!(
        r#"gatewayPort: "{{port}}"
gatewayBind: 127.0.0.1
adminPort: "{{admin}}"
authentication:
  enabled: true
  publicKeyPath: "{{dir}}/keys/public.pem"
apiKeys:
  file: ./apikeys.yaml
plans:
  free: {{priority: 0, rateLimiting: {{ratePerSecond: 1000, burst: 1000}}}}
  pro: {{priority: 10, rateLimiting: {{ratePerSecond: 1000, burst: 1000}}}}
services:
  - name: api
    path: /api/
    backends: ["{u}"]
    authentication: {{enabled: true, methods: [apiKey]}}
    maxInFlight: {MAX}
  - name: unplanned
    path: /unplanned/
    backends: ["{u}"]
    authentication: {{enabled: true, methods: [apiKey]}}
    plans: false
    maxInFlight: 3
"#,
        u = b.url()
    );
    let gw = crate::plans::start(&yaml, None).await;

    // Free fills what it may, one request at a time, until it is refused.
    let mut held = Vec::new();
    loop {
        let arrived = b.arrived();
        let h = spawn_get(gw.port, "/api/held", Some(BOB));
        let deadline = Instant::now() + Duration::from_secs(5);
        while b.arrived() == arrived && !h.is_finished() {
            assert!(Instant::now() < deadline, "neither held nor answered");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if b.arrived() == arrived {
            let (status, body) = h.await.unwrap();
            assert_eq!(status, 503, "{body}");
            assert_eq!(error_text(&body), SHED);
            break;
        }
        held.push(h);
        assert!(held.len() as u64 <= MAX, "free took every place");
    }
    let free = held.len() as u64;
    // Priorities 0 and 10 are two levels: free leaves max(1, 10 % of 10) places to pro.
    assert_eq!(free, MAX - 1, "free's share of maxInFlight {MAX}");
    b.wait_holding(free).await;
    let (status, headers, body) = call(gw.port, "/api/fast/x", "x-api-key", Some(BOB), None).await;
    assert_shed(status, &headers, &body);

    // Pro still gets in, up to the limit, and no further.
    for _ in free..MAX {
        held.push(spawn_get(gw.port, "/api/held", Some(ACME)));
    }
    b.wait_holding(MAX).await;
    let (status, headers, body) = call(gw.port, "/api/fast/x", "x-api-key", Some(ACME), None).await;
    assert_shed(status, &headers, &body);
    assert_eq!(b.arrived(), MAX);

    // When the free requests end, free gets in again; pro's places stay pro's.
    b.release(true);
    for h in held.drain(..) {
        assert_eq!(h.await.unwrap().0, 200);
    }
    assert_eq!(
        call(gw.port, "/api/fast/x", "x-api-key", Some(BOB), None)
            .await
            .0,
        200
    );

    // A route that does not apply plans: every request may use the whole maxInFlight.
    let unplanned: Vec<Pending> = (0..3)
        .map(|_| spawn_get(gw.port, "/unplanned/held", Some(BOB)))
        .collect();
    b.wait_holding(3).await;
    let (status, headers, body) =
        call(gw.port, "/unplanned/fast/x", "x-api-key", Some(ACME), None).await;
    assert_shed(status, &headers, &body);
    b.release(false);
    for h in unplanned {
        assert_eq!(h.await.unwrap().0, 200);
    }
    // Each refusal counted under its plan (free: the one that ended the burst, and the one
    // after it); nothing in flight once every request ended.
    let m = gw.metrics().await;
    for (line, want) in [
        ("hexgate_load_shed_total{service=\"api\",plan=\"free\"} ", 2),
        ("hexgate_load_shed_total{service=\"api\",plan=\"pro\"} ", 1),
        (
            "hexgate_load_shed_total{service=\"unplanned\",plan=\"\"} ",
            1,
        ),
        ("hexgate_in_flight_requests{service=\"api\"} ", 0),
    ] {
        let got = m
            .lines()
            .find_map(|l| l.strip_prefix(line))
            .map(|v| v.trim().parse::<u64>().unwrap());
        assert_eq!(got, Some(want), "{line}\n{m}");
    }
}
