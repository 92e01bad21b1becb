//! The Redis store's transports against a real redis-server: a single Redis over TLS (the
//! pipelined client with rustls), its certificate check, and the refusal of TLS to a cluster.
//! Plain TCP to a single Redis and plain TCP to a cluster are covered in `limits.rs`
//! (`quota_window_through_redis_and_refusals_are_free`, `redis_cluster_hosts_the_limits`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::Empty;

use crate::support::*;

async fn status(port: u16, key: &str) -> u16 {
    let req = Request::get("/users/x")
        .header("host", "localhost")
        .header("x-api-key", key)
        .body(Empty::<Bytes>::new())
        .unwrap();
    request(port, req).await.unwrap().0
}

/// A gateway with a quota of 3 per API key through the Redis at `redis` (a `redis:` block body).
fn yaml(backend: &TestBackend, redis: &str) -> String {
    format!(
        "gatewayPort: \"{{port}}\"\ngatewayBind: 127.0.0.1\nadminPort: \"{{admin}}\"\nredis:\n{redis}services:\n  - name: users\n    path: /users/\n    backends: [\"{}\"]\n    quota: {{enabled: true, limit: 3, period: 1h, key: \"header:x-api-key\"}}\n",
        backend.url()
    )
}

/// A private CA and a server certificate it signed for 127.0.0.1 and localhost, in `dir`: (CA
/// certificate, server certificate, server key). The CA is `self_signed_cert`'s; the server
/// certificate is separate because rustls refuses a CA certificate as a server's
/// (`CaUsedAsEndEntity`).
fn private_ca_and_server_cert(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let (ca, ca_key) = self_signed_cert(dir, "ca");
    let (cert, key, csr) = (
        dir.join("servercert.pem"),
        dir.join("serverkey.pem"),
        dir.join("server.csr"),
    );
    let ext = dir.join("server.ext");
    std::fs::write(
        &ext,
        "basicConstraints=CA:FALSE\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n",
    )
    .unwrap();
    let run = |cmd: &mut Command| {
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(Command::new("openssl")
        .args([
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=localhost",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&csr));
    run(Command::new("openssl")
        .args(["x509", "-req", "-days", "1", "-set_serial", "2"])
        .arg("-in")
        .arg(&csr)
        .arg("-CA")
        .arg(&ca)
        .arg("-CAkey")
        .arg(&ca_key)
        .arg("-extfile")
        .arg(&ext)
        .arg("-out")
        .arg(&cert));
    (ca, cert, key)
}

/// Fails (naming `make setup`) unless redis-server and redis-cli are installed and redis-server
/// was built with TLS (Debian's is): one without TLS refuses the `tls-port` directive.
fn require_tls_redis() {
    require_tool("redis-server");
    require_tool("redis-cli");
    let out = Command::new("redis-server")
        .args(["--port", "0", "--tls-port", "0", "--save", ""])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
    assert!(
        !text.contains("Bad directive"),
        "redis-server has no TLS support: run `make setup` (scripts/setup.sh) for Debian's \
         redis-server, which is built with TLS\n{text}"
    );
}

/// Removes a directory when dropped.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A redis-server with TLS on a second port (its plain port stays for `redis-cli`), serving
/// `cert`/`key` (signed by `ca`); returns the server and its TLS port.
fn tls_redis(ca: &Path, cert: &Path, key: &Path) -> (RedisServer, u16) {
    require_tls_redis();
    let tls_port = free_port();
    let (ca, cert, key) = (
        ca.display().to_string(),
        cert.display().to_string(),
        key.display().to_string(),
    );
    let redis = RedisServer::start_with(&[
        "--tls-port",
        &tls_port.to_string(),
        "--tls-cert-file",
        &cert,
        "--tls-key-file",
        &key,
        "--tls-ca-cert-file",
        &ca,
        "--tls-auth-clients",
        "no",
    ]);
    (redis, tls_port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_over_tls_hosts_the_limits() {
    let certs = RemoveOnDrop(temp_dir("redis-tls"));
    let (ca, cert, key) = private_ca_and_server_cert(&certs.0);
    let (redis, tls_port) = tls_redis(&ca, &cert, &key);
    let b = TestBackend::start(Behaviour::Hello).await;
    let block = format!(
        "  address: \"127.0.0.1:{tls_port}\"\n  tls: true\n  timeout: 2s\n  failureMode: closed\n"
    );
    // The private CA is trusted the way the system roots are replaced: SSL_CERT_FILE (the
    // config has no CA-file key for Redis).
    let ca_env = ca.display().to_string();
    let gw = Gateway::start_with(
        temp_dir("gw-redis-tls"),
        &yaml(&b, &block),
        &[("SSL_CERT_FILE", &ca_env)],
    )
    .await;
    // Connecting is in the background; fail-closed answers 503 until it is up.
    let deadline = Instant::now() + Duration::from_secs(10);
    while status(gw.port, "warm").await != 200 {
        assert!(
            Instant::now() < deadline,
            "never connected to Redis over TLS: {}",
            gw.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let before = redis.calls("evalsha");
    assert!(before > 0, "the warm-up call went through Redis");
    let mut codes = Vec::new();
    for _ in 0..4 {
        codes.push(status(gw.port, "alice").await);
    }
    assert_eq!(codes, vec![200, 200, 200, 429]);
    assert_eq!(
        redis.calls("evalsha"),
        before + 4,
        "one EVALSHA per request"
    );
    assert_eq!(
        redis
            .cli(&["EXISTS", &header_limit_key('q', "users", "alice")])
            .trim(),
        "1"
    );
    // The gateway's connections are on the TLS port (the plain one only serves redis-cli).
    let clients = redis.cli(&["CLIENT", "LIST"]);
    assert!(
        clients
            .lines()
            .any(|l| l.contains(&format!("laddr=127.0.0.1:{tls_port}"))),
        "{clients}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_over_tls_refuses_an_untrusted_certificate() {
    let certs = RemoveOnDrop(temp_dir("redis-tls-untrusted"));
    let (ca, cert, key) = private_ca_and_server_cert(&certs.0);
    let (redis, tls_port) = tls_redis(&ca, &cert, &key);
    let b = TestBackend::start(Behaviour::Hello).await;
    let block = format!(
        "  address: \"127.0.0.1:{tls_port}\"\n  tls: true\n  timeout: 2s\n  failureMode: closed\n"
    );
    // The system roots only: the fresh private CA is in none of them.
    let gw = Gateway::start(&yaml(&b, &block)).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !gw.log().contains("cannot connect to Redis yet") {
        assert!(Instant::now() < deadline, "no connect error: {}", gw.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(gw.log().contains("Redis TLS"), "{}", gw.log());
    assert_eq!(status(gw.port, "alice").await, 503, "fail closed");
    assert_eq!(redis.calls("evalsha"), 0);
}

#[test]
fn redis_cluster_with_tls_is_refused_with_a_reason() {
    let block = format!(
        "  cluster: [\"127.0.0.1:{}\"]\n  tls: true\n  timeout: 2s\n",
        free_port()
    );
    let yaml = format!(
        "gatewayPort: \"{}\"\nadminPort: \"{}\"\nredis:\n{block}services: []\n",
        free_port(),
        free_port()
    );
    // Refused by validate (and so by run and every reload), at the key, before anything starts.
    let (code, _, err) = validate_yaml(&yaml, &[]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains(":5: redis.tls: TLS to a Redis Cluster is not supported"),
        "{err}"
    );
}
