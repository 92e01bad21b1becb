//! `hexgate validate --connect`: after the offline checks, what needs the network is tried (the
//! JWKS URL, Redis, Consul, the OTLP collector), one line each, non-zero exit when any failed.

use std::io::{Read, Write};
use std::process::Command;

use crate::support::{bin, free_port, temp_dir, ConsulAgent, RedisServer};

const SERVICE: &str =
    "services:\n  - name: s\n    path: /\n    backends: [\"http://127.0.0.1:9\"]\n";

/// Runs `hexgate validate --connect` on `yaml`: (exit code, stdout + stderr).
fn validate_connect(yaml: &str) -> (i32, String) {
    let dir = temp_dir("validate-connect");
    let f = dir.join("config.yaml");
    std::fs::write(&f, yaml).unwrap();
    let out = Command::new(bin())
        .args(["validate", "--connect"])
        .arg(&f)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Answers every HTTP request on a loopback port with `body` (a thread; lives for the test).
fn serve_json(body: &'static str) -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    port
}

#[test]
fn redis_reachable_is_ok() {
    let redis = RedisServer::start();
    let addr = format!("127.0.0.1:{}", redis.port);
    let (code, out) = validate_connect(&format!("redis: {{address: \"{addr}\"}}\n{SERVICE}"));
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(&format!("Redis {addr}: OK")), "{out}");
    assert!(
        redis.calls("ping") >= 1,
        "no PING reached redis-server:\n{out}"
    );
}

#[test]
fn redis_wrong_password_or_db_is_reported() {
    let redis = RedisServer::start();
    assert_eq!(
        redis.cli(&["CONFIG", "SET", "requirepass", "right"]).trim(),
        "OK"
    );
    let addr = format!("127.0.0.1:{}", redis.port);
    let (code, out) = validate_connect(&format!(
        "redis: {{address: \"{addr}\", password: wrong}}\n{SERVICE}"
    ));
    assert_ne!(code, 0, "{out}");
    assert!(out.contains(&format!("Redis {addr}: FAILED")), "{out}");
    assert!(!out.contains("wrong"), "the password was echoed:\n{out}");
    let (code, out) = validate_connect(&format!(
        "redis: {{address: \"{addr}\", password: right, db: 3}}\n{SERVICE}"
    ));
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("OK"), "{out}");
}

#[test]
fn redis_on_a_closed_port_fails_naming_redis() {
    let addr = format!("127.0.0.1:{}", free_port());
    let (code, out) = validate_connect(&format!("redis: {{address: \"{addr}\"}}\n{SERVICE}"));
    assert_ne!(code, 0, "{out}");
    assert!(out.contains(&format!("Redis {addr}: FAILED")), "{out}");
    assert_eq!(
        out.lines().filter(|l| l.contains("FAILED")).count(),
        1,
        "{out}"
    );
}

#[test]
fn jwks_on_a_closed_port_fails_naming_jwks() {
    let url = format!("http://127.0.0.1:{}/jwks", free_port());
    let (code, out) = validate_connect(&format!(
        "authentication: {{enabled: true, jwksUrl: \"{url}\"}}\n{SERVICE}"
    ));
    assert_ne!(code, 0, "{out}");
    assert!(out.contains(&format!("JWKS {url}: FAILED")), "{out}");
}

#[test]
fn jwks_is_fetched_and_parsed() {
    // RFC 7517 appendix A.1's EC key.
    let good = serve_json(
        r#"{"keys":[{"kty":"EC","crv":"P-256","x":"MKBCTNIcKUSDii11ySs3526iDZ8AiTo7Tu6KPAqv7D4","y":"4Etl6SRW2YiLUrN5vfvVHuhp7x8PxltmWWlbbM4IFyM","use":"sig","kid":"1"}]}"#,
    );
    let url = format!("http://127.0.0.1:{good}/jwks");
    let (code, out) = validate_connect(&format!(
        "authentication: {{enabled: true, jwksUrl: \"{url}\"}}\n{SERVICE}"
    ));
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(&format!("JWKS {url}: OK")), "{out}");

    let bad = serve_json(r#"{"not": "a JWK set"}"#);
    let url = format!("http://127.0.0.1:{bad}/jwks");
    let (code, out) = validate_connect(&format!(
        "authentication: {{enabled: true, jwksUrl: \"{url}\"}}\n{SERVICE}"
    ));
    assert_ne!(code, 0, "{out}");
    assert!(out.contains(&format!("JWKS {url}: FAILED")), "{out}");
}

#[test]
fn consul_reachable_is_ok() {
    let consul = ConsulAgent::start();
    let (code, out) = validate_connect(&format!(
        "consul: {{address: \"{}\"}}\n{SERVICE}",
        consul.addr()
    ));
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(&format!("Consul {}: OK: leader 127.0.0.1:", consul.addr())),
        "{out}"
    );
}

#[test]
fn each_failure_on_its_own_line_and_offline_problems_first() {
    let redis = RedisServer::start();
    let jwks = format!("http://127.0.0.1:{}/jwks", free_port());
    let consul = format!("http://127.0.0.1:{}", free_port());
    let (code, out) = validate_connect(&format!(
        "redis: {{address: \"127.0.0.1:{}\"}}\nauthentication: {{enabled: true, jwksUrl: \"{jwks}\"}}\nconsul: {{address: \"{consul}\"}}\n{SERVICE}",
        redis.port
    ));
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("Redis 127.0.0.1:"), "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with(&format!("JWKS {jwks}: FAILED"))),
        "{out}"
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with(&format!("Consul {consul}: FAILED"))),
        "{out}"
    );

    // A config with offline problems is not taken to the network.
    let (code, out) = validate_connect(&format!(
        "redis: {{address: \"127.0.0.1:{}\"}}\ngatewayPort: nope\n{SERVICE}",
        redis.port
    ));
    assert_eq!(code, 2, "{out}");
    assert!(!out.contains("Redis 127.0.0.1"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_otlp_collector_is_sent_an_export_with_no_spans() {
    use crate::otel::{Collector, Wire};
    for wire in [Wire::Http, Wire::Grpc { status: 0 }] {
        let collector = Collector::start(wire).await;
        let url = collector.url();
        let yaml = format!(
            "tracing: {{otlpEndpoint: \"{url}\", headers: {{authorization: \"Bearer s3cret\"}}}}\n{SERVICE}"
        );
        let (code, out) = tokio::task::spawn_blocking(move || validate_connect(&yaml))
            .await
            .unwrap();
        assert_eq!(code, 0, "{out}");
        assert!(
            out.contains(&format!("OTLP collector {url}: ok"))
                || out.contains(&format!("OTLP collector {url}")) && out.contains("accepted"),
            "{out}"
        );
        assert!(!out.contains("s3cret"), "{out}");
        // It reached the collector as a real export: one request, well formed, no spans,
        // with the configured header.
        let exports = collector.exports();
        assert_eq!(exports.len(), 1, "{} exports", exports.len());
        assert_eq!(exports[0].headers["authorization"], "Bearer s3cret");
        assert!(collector.spans().is_empty());
    }
    let url = format!("http://127.0.0.1:{}", free_port());
    let yaml = format!("tracing: {{otlpEndpoint: \"{url}\"}}\n{SERVICE}");
    let (code, out) = tokio::task::spawn_blocking(move || validate_connect(&yaml))
        .await
        .unwrap();
    assert_ne!(code, 0, "{out}");
    assert!(
        out.contains(&format!("OTLP collector {url}: FAILED")),
        "{out}"
    );
}
