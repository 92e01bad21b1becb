//! Consul through a real `consul agent -dev`: discovery (register, deregister, failing checks,
//! weights, a backend joining under load), config from KV (push, invalid, deleted, stale CAS),
//! Consul dying and coming back, self-registration, and the example backend.

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::support::*;

fn discovered_yaml(extra: &str) -> String {
    format!(
        "gatewayPort: \"{{port}}\"\ngatewayBind: 127.0.0.1\nadminPort: \"{{admin}}\"\n{extra}services:\n  - name: users\n    path: /users/\n    consulServiceName: user-service\n"
    )
}

/// Polls until `f` is true, returning how long it took.
async fn until(what: &str, limit: Duration, mut f: impl AsyncFnMut() -> bool) -> Duration {
    let t = Instant::now();
    while !f().await {
        assert!(t.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    t.elapsed()
}

async fn ports_seen(port: u16, n: usize) -> std::collections::HashSet<String> {
    let mut seen = std::collections::HashSet::new();
    for i in 0..n {
        if let Ok((200, body)) = get(port, &format!("/users/{i}")).await {
            seen.insert(body);
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_follows_registrations_and_health() {
    let consul = ConsulAgent::start();
    let a = TestBackend::start(Behaviour::Hello).await;
    let b = TestBackend::start(Behaviour::Hello).await;
    let c = TestBackend::start(Behaviour::Hello).await;
    let gw = Gateway::start_with(
        temp_dir("disc"),
        &discovered_yaml(""),
        &[("CONSUL_HTTP_ADDR", &consul.addr())],
    )
    .await;
    assert_eq!(
        get(gw.port, "/users/1").await.unwrap().0,
        503,
        "nothing registered yet"
    );

    consul.register("a", "user-service", a.addr.port());
    consul.register("b", "user-service", b.addr.port());
    let took = until(
        "both backends in the pool",
        Duration::from_secs(10),
        async || ports_seen(gw.port, 4).await.len() == 2,
    )
    .await;
    eprintln!("discovery: two registered backends taking traffic after {took:?}");

    // Deregistered: leaves the pool.
    consul.deregister("a");
    let took = until("a leaves", Duration::from_secs(5), async || {
        let seen = ports_seen(gw.port, 4).await;
        seen.len() == 1 && seen.iter().all(|s| s.contains(&b.addr.port().to_string()))
    })
    .await;
    eprintln!("discovery: deregistered backend gone after {took:?}");

    // A third backend registered under load starts taking traffic; no request fails meanwhile.
    let stop = Arc::new(AtomicBool::new(false));
    let failed = Arc::new(AtomicU64::new(0));
    let load = {
        let (stop, failed, port) = (stop.clone(), failed.clone(), gw.port);
        tokio::spawn(async move {
            let mut c = KeepAlive::new(port);
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) && n < 100_000 {
                n += 1;
                if !matches!(c.get("/users/x").await, Ok((200, _))) {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    consul.register("c", "user-service", c.addr.port());
    let t = Instant::now();
    until("c takes traffic", Duration::from_secs(10), async || {
        c.hits() > 0
    })
    .await;
    eprintln!(
        "discovery: backend registered under load took traffic after {:?}",
        t.elapsed()
    );
    // The one that fails its health check leaves the pool (the check runs every second).
    b.stop();
    let t = Instant::now();
    until(
        "b marked critical and removed",
        Duration::from_secs(10),
        async || {
            let up = get(gw.admin_port, "/admin/upstreams").await.unwrap().1;
            !up.contains(&format!("127.0.0.1:{}", b.addr.port()))
        },
    )
    .await;
    eprintln!(
        "discovery: backend failing its check removed after {:?}",
        t.elapsed()
    );
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "no failed request while backends joined and died"
    );
    let up = get(gw.admin_port, "/admin/upstreams").await.unwrap().1;
    assert!(up.contains("\"source\": \"consul\""), "{up}");
    let m = gw.metrics().await;
    assert!(
        m.contains("hexgate_consul_last_sync_timestamp_seconds{watch=\"user-service\"}"),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consul_outage_keeps_the_last_pool_and_watches_resume() {
    let mut consul = ConsulAgent::start();
    let a = TestBackend::start(Behaviour::Hello).await;
    let b = TestBackend::start(Behaviour::Hello).await;
    consul.register("a", "user-service", a.addr.port());
    let gw = Gateway::start_with(
        temp_dir("outage"),
        &discovered_yaml(""),
        &[("CONSUL_HTTP_ADDR", &consul.addr())],
    )
    .await;
    until("a in pool", Duration::from_secs(10), async || {
        get(gw.port, "/users/1").await.map(|r| r.0) == Ok(200)
    })
    .await;
    consul.kill();
    for i in 0..20 {
        assert_eq!(
            get(gw.port, &format!("/users/{i}")).await.unwrap().0,
            200,
            "last pool kept while Consul is down"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let m = gw.metrics().await;
    assert!(
        !m.contains("hexgate_consul_errors_total 0\n"),
        "errors counted: {m}"
    );
    // A fresh agent (empty catalog) with other instances: the watch resumes from a fresh index.
    consul.restart();
    consul.register("b", "user-service", b.addr.port());
    let took = until(
        "watch resumed with the new state",
        Duration::from_secs(20),
        async || {
            let seen = ports_seen(gw.port, 3).await;
            seen.len() == 1 && seen.iter().all(|s| s.contains(&b.addr.port().to_string()))
        },
    )
    .await;
    eprintln!("discovery: new state after Consul restart picked up in {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_from_kv_push_get_diff_and_bad_values() {
    let consul = ConsulAgent::start();
    let addr = consul.addr();
    let backend = TestBackend::start(Behaviour::Hello).await;
    let (port, admin) = (free_port(), free_port());
    let dir = temp_dir("kv");
    let cfg = |path: &str| {
        format!(
            "gatewayPort: \"{port}\"\ngatewayBind: 127.0.0.1\nadminPort: \"{admin}\"\nservices:\n  - name: s\n    path: {path}\n    backends: [\"{}\"]\n",
            backend.url()
        )
    };
    let f1 = dir.join("one.yaml");
    let f2 = dir.join("two.yaml");
    let bad = dir.join("bad.yaml");
    std::fs::write(&f1, cfg("/one/")).unwrap();
    std::fs::write(&f2, cfg("/two/")).unwrap();
    std::fs::write(&bad, "services:\n  - name: s\n    pth: /x/\n").unwrap();
    // `hexgate config push --key hexgate/config ARGS`
    let push = |args: &[&str]| {
        let mut all: Vec<&str> = vec!["config", "push", "--key", "hexgate/config"];
        all.extend_from_slice(args);
        hexgate_cli(&addr, &all)
    };

    // Missing key at start: a clear error and a non-zero exit.
    let (code, _, err) = hexgate_cli(&addr, &["run", "--consul-key", "hexgate/config"]);
    assert_ne!(code, 0);
    assert!(
        err.contains("does not exist") && err.contains("hexgate config push"),
        "{err}"
    );

    // An invalid file is refused by push.
    let (code, _, err) = push(&[bad.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(
        err.contains("bad.yaml:3: services[0].pth: unknown key"),
        "{err}"
    );
    let (code, out, _) = push(&[f1.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    let (_, out, _) = hexgate_cli(&addr, &["config", "get", "--key", "hexgate/config"]);
    assert_eq!(out, cfg("/one/"));
    let (_, out, _) = hexgate_cli(
        &addr,
        &[
            "config",
            "diff",
            "--key",
            "hexgate/config",
            f2.to_str().unwrap(),
        ],
    );
    assert!(
        out.contains("- ") && out.contains("/one/") && out.contains("+ ") && out.contains("/two/"),
        "{out}"
    );

    let gw = Gateway::start_consul_key(&addr, "hexgate/config", port, admin).await;
    assert_eq!(get(port, "/one/x").await.unwrap().0, 200);

    // A push goes live within about a second.
    let (code, _, _) = push(&[f2.to_str().unwrap()]);
    assert_eq!(code, 0);
    let took = until("pushed config live", Duration::from_secs(5), async || {
        get(port, "/two/x").await.map(|r| r.0) == Ok(200)
    })
    .await;
    eprintln!("config: pushed change live after {took:?}");
    assert_eq!(get(port, "/one/x").await.unwrap().0, 404);

    // A stale check-and-set index is refused: nothing is overwritten.
    let (code, _, err) = push(&["--cas", "1", f1.to_str().unwrap()]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("changed since"), "{err}");
    let (_, out, _) = hexgate_cli(&addr, &["config", "get", "--key", "hexgate/config"]);
    assert_eq!(out, cfg("/two/"));

    // An invalid value written behind push's back, then a deleted key: the running config stays.
    let (code, _) = consul.http("PUT", "/v1/kv/hexgate/config", Some("services: [oops"));
    assert_eq!(code, 200);
    gw.wait_failed_reloads(1).await;
    assert_eq!(get(port, "/two/x").await.unwrap().0, 200);
    let (code, _) = consul.http("DELETE", "/v1/kv/hexgate/config", None);
    assert_eq!(code, 200);
    gw.wait_failed_reloads(2).await;
    assert_eq!(
        get(port, "/two/x").await.unwrap().0,
        200,
        "running config kept"
    );
    assert!(gw.log().contains("deleted"), "{}", gw.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn self_registration_and_deregistration_on_sigterm() {
    let consul = ConsulAgent::start();
    let b = TestBackend::start(Behaviour::Hello).await;
    let yaml = format!(
        "gatewayPort: \"{{port}}\"\ngatewayBind: 127.0.0.1\nadminPort: \"{{admin}}\"\nconsul: {{register: true}}\nservices:\n  - name: s\n    path: /\n    backends: [\"{}\"]\n",
        b.url()
    );
    let mut gw = Gateway::start_with(
        temp_dir("reg"),
        &yaml,
        &[("CONSUL_HTTP_ADDR", &consul.addr())],
    )
    .await;
    let admin = gw.admin_port;
    until(
        "registered and passing",
        Duration::from_secs(15),
        async || {
            let (_, body) = consul.http("GET", "/v1/health/service/hexgate?passing=1", None);
            body.contains(&format!("\"Port\": {admin}"))
                || body.contains(&format!("\"Port\":{admin}"))
        },
    )
    .await;
    gw.signal("TERM");
    let code = tokio::task::block_in_place(|| gw.wait_exit(Duration::from_secs(10)));
    assert_eq!(code, Some(0));
    let (_, body) = consul.http("GET", "/v1/catalog/service/hexgate", None);
    assert_eq!(body.trim(), "[]", "deregistered on graceful shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn example_backend_registers_and_deregisters() {
    let consul = ConsulAgent::start();
    let example = example_backend();
    let port = free_port();
    let mut child = Command::new(&example)
        .args([
            "--port",
            &port.to_string(),
            "--service",
            "user-service",
            "--check-interval",
            "1s",
        ])
        .env("CONSUL_HTTP_ADDR", consul.addr())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    until(
        "example backend passing",
        Duration::from_secs(15),
        async || {
            consul
                .http("GET", "/v1/health/service/user-service?passing=1", None)
                .1
                .contains(&format!("{port}"))
        },
    )
    .await;
    let (s, body) = get(port, "/anything").await.unwrap();
    assert_eq!(
        (s, body.trim()),
        (200, format!("Hello from Backend (Port {port})").as_str())
    );
    let _ = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status();
    let status = child.wait().unwrap();
    assert!(status.success());
    let (_, body) = consul.http("GET", "/v1/catalog/service/user-service", None);
    assert_eq!(body.trim(), "[]", "deregistered on Ctrl+C");
}

/// A cleartext HTTP/2 (prior knowledge) server answering every request with its version and
/// port; aborted on drop.
struct H2cBackend {
    port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl H2cBackend {
    async fn start() -> H2cBackend {
        use hyper_util::rt::{TokioExecutor, TokioIo};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(
                        move |req: http::Request<hyper::body::Incoming>| async move {
                            let body = format!("{:?} {port}", req.version());
                            Ok::<_, std::convert::Infallible>(http::Response::new(
                                http_body_util::Full::new(bytes::Bytes::from(body)),
                            ))
                        },
                    );
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        H2cBackend { port, task }
    }
}

impl Drop for H2cBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovered_instances_are_spoken_to_in_their_declared_protocol() {
    let consul = ConsulAgent::start();
    let by_meta = H2cBackend::start().await;
    let by_tag = H2cBackend::start().await;
    let plain = TestBackend::start(Behaviour::Hello).await;
    let gw = Gateway::start_with(
        temp_dir("disc-proto"),
        &discovered_yaml(""),
        &[("CONSUL_HTTP_ADDR", &consul.addr())],
    )
    .await;
    let tcp_check =
        |port: u16| format!(r#"{{"TCP":"127.0.0.1:{port}","Interval":"1s","Timeout":"1s"}}"#);
    consul.register_json(&format!(
        r#"{{"ID":"m","Name":"user-service","Address":"127.0.0.1","Port":{},"Meta":{{"protocol":"h2c"}},"Check":{}}}"#,
        by_meta.port,
        tcp_check(by_meta.port)
    ));
    consul.register_json(&format!(
        r#"{{"ID":"t","Name":"user-service","Address":"127.0.0.1","Port":{},"Tags":["v2","grpc"],"Check":{}}}"#,
        by_tag.port,
        tcp_check(by_tag.port)
    ));
    consul.register("p", "user-service", plain.addr.port());
    let mut seen = std::collections::HashSet::new();
    until(
        "all three instances answering",
        Duration::from_secs(15),
        async || {
            if let Ok((200, body)) = get(gw.port, "/users/x").await {
                seen.insert(body);
            }
            seen.len() >= 3
        },
    )
    .await;
    assert!(
        seen.contains(&format!("HTTP/2.0 {}", by_meta.port)),
        "{seen:?}"
    );
    assert!(
        seen.contains(&format!("HTTP/2.0 {}", by_tag.port)),
        "{seen:?}"
    );
    assert!(
        seen.iter().any(|b| !b.starts_with("HTTP/2.0")),
        "the untagged instance is spoken to in HTTP/1.1: {seen:?}"
    );
}
