//! The admin token: without it every path but /healthz and /readyz answers 401 and closes the
//! connection; only a client that sent it keeps its connection; it follows reloads and can come
//! from a file or the environment.

use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;

use super::{admin_get, config, TOKEN};
use crate::raw::*;
use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_token_unauthenticated_answers_close_the_connection() {
    let b = TestBackend::start(Behaviour::Hello).await;
    let yaml = config(
        &format!("adminToken: \"{TOKEN}\"\ntimeouts: {{headerRead: 20s, idle: 60s}}\n"),
        &b.url(),
    );
    let gw = Gateway::start(&yaml).await;
    let good = format!("Authorization: Bearer {TOKEN}\r\n");
    let cases: [(&str, &str, u16); 6] = [
        ("/healthz", "", 200),
        ("/readyz", "", 200),
        ("/healthz", "Authorization: Bearer wrong\r\n", 200),
        ("/metrics", "", 401),
        ("/metrics", "Authorization: Bearer wrong\r\n", 401),
        ("/admin/config", "Authorization: Basic x\r\n", 401),
    ];
    for (path, auth, want) in cases {
        let mut s = connect(gw.admin_port).await;
        // Keep-alive requests: nothing from the client asks to close.
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n{auth}\r\n").as_bytes())
            .await
            .unwrap();
        let r = read_one(&mut s, Duration::from_secs(2))
            .await
            .unwrap_or_else(|| panic!("{path} {auth:?}: no answer"));
        assert_eq!(r.status, want, "{path} {auth:?}: {}", r.head);
        assert_eq!(
            r.header("connection"),
            Some("close"),
            "{path} {auth:?}: {}",
            r.head
        );
        let closed = time_to_close(&mut s, Duration::from_secs(2)).await;
        assert!(
            closed.is_some(),
            "{path} {auth:?}: the server left the connection open"
        );
    }
    // A header error without the token closes too.
    let mut s = send(gw.admin_port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer a\r\nAuthorization: Bearer b\r\n\r\n").await;
    let r = read_one(&mut s, Duration::from_secs(2))
        .await
        .expect("no answer to two Authorization fields");
    assert_eq!(r.status, 400, "{}", r.head);
    assert_eq!(r.header("connection"), Some("close"), "{}", r.head);
    assert!(time_to_close(&mut s, Duration::from_secs(2))
        .await
        .is_some());

    // A health checker that sends the token keeps its connection.
    let mut s = connect(gw.admin_port).await;
    for path in ["/healthz", "/readyz", "/healthz"] {
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n{good}\r\n").as_bytes())
            .await
            .unwrap();
        let r = read_one(&mut s, Duration::from_secs(2))
            .await
            .unwrap_or_else(|| panic!("{path} with the token: no answer on the kept connection"));
        assert_eq!(r.status, 200, "{}", r.head);
        assert_eq!(r.header("connection"), None, "{}", r.head);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authenticated_keep_alive_admin_connection_serves_two_requests() {
    let b = TestBackend::start(Behaviour::Hello).await;
    let yaml = config(
        &format!("adminToken: \"{TOKEN}\"\ntimeouts: {{idle: 60s}}\n"),
        &b.url(),
    );
    let gw = Gateway::start(&yaml).await;
    let mut s = connect(gw.admin_port).await;
    for (path, marker) in [
        ("/metrics", "hexgate_open_connections"),
        ("/admin/config", "\"generation\""),
        ("/metrics", "hexgate_open_connections"),
    ] {
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
        let r = read_one(&mut s, Duration::from_secs(2))
            .await
            .unwrap_or_else(|| panic!("{path}: no answer on the kept connection"));
        assert_eq!(r.status, 200, "{path}: {}", r.head);
        assert_eq!(r.header("connection"), None, "{path}: {}", r.head);
        assert!(r.body.contains(marker), "{path}: {}", r.body);
    }
    // Still open: the server did not close it after the last answer.
    assert_eq!(
        time_to_close(&mut s, Duration::from_millis(500)).await,
        None,
        "the authenticated connection was closed"
    );
}

/// Every guarded path answers 401 with the challenge without the token or with a wrong one,
/// and not 401 with `good`; /healthz and /readyz answer 200 without.
async fn assert_guarded(port: u16, good: &str) {
    for path in [
        "/metrics",
        "/admin/config",
        "/admin/upstreams",
        "/admin/sd",
        "/nope",
    ] {
        for (auth, why) in [
            (None, "no Authorization"),
            (Some("Bearer wrong-token".to_string()), "wrong token"),
            (Some(format!("Bearer {good}x")), "token with a suffix"),
            (Some(format!("Basic {good}")), "Basic scheme"),
            (Some("Bearer".to_string()), "empty bearer"),
        ] {
            let r = admin_get(port, path, auth.as_deref()).await;
            assert_eq!(r.status, 401, "{path} with {why}: {}\n{}", r.head, r.body);
            assert_eq!(
                r.header("www-authenticate"),
                Some("Bearer realm=\"hexgate-admin\""),
                "{path} with {why}: {}",
                r.head
            );
            assert!(!r.body.trim().is_empty(), "401 without a reason");
            assert!(!r.body.contains(good), "the 401 echoes the token");
        }
        let r = admin_get(port, path, Some(&format!("Bearer {good}"))).await;
        let want = match path {
            "/admin/sd" | "/nope" => 404,
            _ => 200,
        };
        assert_eq!(
            r.status, want,
            "{path} with the right token: {}\n{}",
            r.head, r.body
        );
        // The scheme is case-insensitive.
        let r = admin_get(port, path, Some(&format!("bearer {good}"))).await;
        assert_eq!(r.status, want, "{path} with `bearer`: {}", r.head);
    }
    for path in ["/healthz", "/readyz"] {
        let r = admin_get(port, path, None).await;
        assert_eq!(
            r.status, 200,
            "{path} without a token: {}\n{}",
            r.head, r.body
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_token_guards_every_path_but_health_and_follows_reloads() {
    let b = TestBackend::start(Behaviour::Hello).await;
    let gw = Gateway::start(&config(&format!("adminToken: \"{TOKEN}\"\n"), &b.url())).await;
    assert_guarded(gw.admin_port, TOKEN).await;

    // HEAD is guarded too; a method other than GET/HEAD with the token is 405, without it 401.
    let head = raw_request(
        gw.admin_port,
        b"HEAD /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(head.status, 401, "{}", head.head);
    let post = raw_request(
        gw.admin_port,
        format!("POST /metrics HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await;
    assert_eq!(post.status, 405, "{}", post.head);

    // /admin/config shows neither the token nor a way to get it.
    let cfg = admin_get(
        gw.admin_port,
        "/admin/config",
        Some(&format!("Bearer {TOKEN}")),
    )
    .await;
    assert_eq!(cfg.status, 200);
    assert!(!cfg.body.contains(TOKEN), "{}", cfg.body);
    assert!(
        cfg.body.contains("\"adminToken\": \"<redacted>\""),
        "{}",
        cfg.body
    );

    // The token is reloaded with the config: the new one works, the old one stops working.
    let rotated = "adm-rotated-77aa";
    gw.rewrite_config(&config(&format!("adminToken: \"{rotated}\"\n"), &b.url()));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = admin_get(
            gw.admin_port,
            "/metrics",
            Some(&format!("Bearer {rotated}")),
        )
        .await;
        if r.status == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "rotated token never accepted; log:\n{}",
            gw.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let old = admin_get(gw.admin_port, "/metrics", Some(&format!("Bearer {TOKEN}"))).await;
    assert_eq!(
        old.status, 401,
        "the old token still works after the reload"
    );
    assert!(
        !gw.log().contains(TOKEN) && !gw.log().contains(rotated),
        "a token was logged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_token_from_file_and_from_the_environment() {
    let b = TestBackend::start(Behaviour::Hello).await;

    // adminTokenFile, relative to the config's directory; the first line, trimmed.
    let dir = temp_dir("admin-token-file");
    std::fs::write(dir.join("admin-token"), "file-token-93e1\n").unwrap();
    let gw = Gateway::start_in(dir, &config("adminTokenFile: admin-token\n", &b.url())).await;
    assert_guarded(gw.admin_port, "file-token-93e1").await;
    let cfg = admin_get(
        gw.admin_port,
        "/admin/config",
        Some("Bearer file-token-93e1"),
    )
    .await;
    assert!(!cfg.body.contains("file-token-93e1"), "{}", cfg.body);
    drop(gw);

    // HEXGATE_ADMIN_TOKEN, with no token in the config.
    let dir = temp_dir("admin-token-env");
    let gw = Gateway::start_with(
        dir,
        &config("", &b.url()),
        &[("HEXGATE_ADMIN_TOKEN", "env-token-5d2c")],
    )
    .await;
    assert_guarded(gw.admin_port, "env-token-5d2c").await;
    let cfg = admin_get(
        gw.admin_port,
        "/admin/config",
        Some("Bearer env-token-5d2c"),
    )
    .await;
    assert_eq!(cfg.status, 200);
    assert!(!cfg.body.contains("env-token-5d2c"), "{}", cfg.body);

    // No token anywhere: the loopback admin listener stays open, as before.
    let gw = Gateway::start(&config("", &b.url())).await;
    assert_eq!(admin_get(gw.admin_port, "/metrics", None).await.status, 200);
    assert_eq!(
        admin_get(gw.admin_port, "/admin/config", None).await.status,
        200
    );
}
