//! Hot reload under load, rejected reloads, SIGHUP and graceful shutdown.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::support::*;

fn config(backends: &[&TestBackend], extra_route: bool) -> String {
    let list: Vec<String> = backends
        .iter()
        .map(|b| format!("\"{}\"", b.url()))
        .collect();
    let mut y = format!(
        "gatewayPort: \"{{port}}\"\ngatewayBind: 127.0.0.1\nadminPort: \"{{admin}}\"\nhealthCheckInterval: 1\nshutdownTimeout: 10s\nservices:\n  - name: users\n    path: /users/\n    backends: [{}]\n",
        list.join(", ")
    );
    if extra_route {
        y.push_str(&format!(
            "  - name: extra\n    path: /extra/\n    backends: [{}]\n",
            list.join(", ")
        ));
    }
    y
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_under_load_has_zero_failed_requests() {
    let a = TestBackend::start(Behaviour::Hello).await;
    let b = TestBackend::start(Behaviour::Hello).await;
    let gw = Gateway::start(&config(&[&a], false)).await;
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let stop_at = Instant::now() + Duration::from_secs(4);
    let mut workers = Vec::new();
    for _ in 0..4 {
        let (ok, failed, port) = (ok.clone(), failed.clone(), gw.port);
        workers.push(tokio::spawn(async move {
            let mut c = KeepAlive::new(port);
            let mut n = 0;
            while Instant::now() < stop_at && n < 200_000 {
                n += 1;
                match c.get("/users/1").await {
                    Ok((200, _)) => ok.fetch_add(1, Ordering::Relaxed),
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    // Swap the pool back and forth, and add/remove a route, every 250ms.
    let mut reloads = 1;
    while Instant::now() + Duration::from_millis(600) < stop_at {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let yaml = if reloads % 2 == 1 {
            config(&[&b], true)
        } else {
            config(&[&a, &b], false)
        };
        gw.rewrite_config(&yaml);
        reloads += 1;
        gw.wait_reloads(reloads).await;
    }
    for w in workers {
        w.await.unwrap();
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    assert!(reloads >= 5, "only {reloads} reloads");
    assert!(ok > 100, "too little load: {ok}");
    assert_eq!(failed, 0, "{failed} failed of {}", ok + failed);
    assert!(a.hits() > 0 && b.hits() > 0);
    let m = gw.metrics().await;
    assert!(
        m.contains(&format!(
            "hexgate_config_reloads_total{{result=\"success\"}} {reloads}"
        )),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_reload_keeps_running_config_and_sighup_reloads() {
    let a = TestBackend::start(Behaviour::Hello).await;
    let gw = Gateway::start(&config(&[&a], false)).await;
    gw.rewrite_config("services:\n  - name: broken\n    pathh: /x/\n");
    gw.wait_failed_reloads(1).await;
    assert!(
        gw.log().contains("pathh"),
        "the log names the bad key:\n{}",
        gw.log()
    );
    assert_eq!(
        get(gw.port, "/users/1").await.unwrap().0,
        200,
        "old config still serves"
    );
    let cfg = get(gw.admin_port, "/admin/config").await.unwrap().1;
    assert!(cfg.contains("\"generation\": 1"), "{cfg}");

    // An empty file (a rewrite caught half-way) is refused too, not taken as "no routes".
    std::fs::write(&gw.config, "# being rewritten\n").unwrap();
    gw.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !gw.log().contains("the file is empty") {
        assert!(
            Instant::now() < deadline,
            "empty file not refused:\n{}",
            gw.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        get(gw.port, "/users/1").await.unwrap().0,
        200,
        "old config still serves after an empty file"
    );

    // A good file, then SIGHUP: reloaded (the watcher may also see the change; both are fine).
    std::fs::write(
        &gw.config,
        config(&[&a], true)
            .replace("{port}", &gw.port.to_string())
            .replace("{admin}", &gw.admin_port.to_string()),
    )
    .unwrap();
    gw.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(5);
    while get(gw.port, "/extra/1").await.unwrap().0 != 200 {
        assert!(Instant::now() < deadline, "new route never went live");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests_and_exits_zero() {
    let slow = TestBackend::start(Behaviour::Slow(Duration::from_millis(700))).await;
    let mut gw = Gateway::start(&config(&[&slow], false)).await;
    let mut inflight = Vec::new();
    for i in 0..20 {
        let port = gw.port;
        inflight.push(tokio::spawn(async move {
            get(port, &format!("/users/{i}")).await
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    gw.signal("TERM");
    let mut ok = 0;
    for r in inflight {
        match r.await.unwrap() {
            Ok((200, _)) => ok += 1,
            other => panic!("in-flight request failed during drain: {other:?}"),
        }
    }
    assert_eq!(ok, 20);
    let code = tokio::task::block_in_place(|| gw.wait_exit(Duration::from_secs(10)));
    assert_eq!(code, Some(0), "log:\n{}", gw.log());
    assert!(
        get(gw.port, "/users/x").await.is_err(),
        "no longer accepting"
    );
}
