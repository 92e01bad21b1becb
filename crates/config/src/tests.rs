use std::time::Duration;

use super::*;

fn errs(yaml: &str) -> Vec<ConfigError> {
    match parse(yaml, "test.yaml") {
        Ok(_) => panic!("expected errors for:\n{yaml}"),
        Err(e) => e.0,
    }
}

#[test]
fn seed_configs_load_unchanged() {
    for f in ["config/config.yaml", "config/config-static-backends.yaml"] {
        let path = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../..")).join(f);
        let cfg = load_file(&path).unwrap_or_else(|e| panic!("{f}: {e}"));
        assert_eq!(cfg.gateway_port, 8000);
        assert_eq!(cfg.health_check_interval, Duration::from_secs(5));
        assert_eq!(cfg.services[0].name, "user-service");
        assert_eq!(cfg.services[0].path, "/users/");
    }
    let path = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
        .join("config/config.yaml");
    let cfg = load_file(&path).unwrap();
    let q = cfg.services[0].quota.as_ref().unwrap();
    assert!(q.enabled);
    assert_eq!(q.limit, 5);
    assert_eq!(q.period, Duration::from_secs(60));
    assert_eq!(q.key, LimitKey::Consumer);
    assert!(cfg.authentication.enabled);
    assert_eq!(
        cfg.authentication.public_key_path.as_deref(),
        Some("./config/public.pem")
    );
    assert_eq!(
        cfg.redis.as_ref().unwrap().address.as_deref(),
        Some("redis:6379")
    );
    assert!(!cfg.tls.enabled);
    assert_eq!(cfg.tls.https_port, 8443);
    let static_cfg = load_file(
        &std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
            .join("config/config-static-backends.yaml"),
    )
    .unwrap();
    let rl = static_cfg.rate_limiting.unwrap();
    assert!(rl.enabled);
    assert_eq!(rl.rate_per_second, 1.0);
    assert_eq!(rl.burst, 3);
    assert_eq!(rl.key, LimitKey::Ip);
    assert_eq!(static_cfg.services[0].backends.len(), 2);
    assert_eq!(static_cfg.services[0].backends[0].host, "localhost");
    assert_eq!(static_cfg.services[0].backends[0].port, 8081);
}

#[test]
fn defaults() {
    let cfg = parse(
        "services:\n  - name: a\n    path: /a/\n    backends: [\"http://127.0.0.1:1\"]\n",
        "t",
    )
    .unwrap();
    assert_eq!(cfg.gateway_port, 8000);
    assert_eq!(cfg.admin_port, 9901);
    assert_eq!(cfg.admin_bind.to_string(), "127.0.0.1");
    assert_eq!(cfg.services[0].health_check_path, "/health");
    assert_eq!(cfg.services[0].load_balancing, LoadBalancing::RoundRobin);
    assert_eq!(cfg.services[0].retries, 2);
    assert!(!cfg.services[0].strip_path);
}

#[test]
fn unknown_key_has_line_path_and_hint() {
    let e = errs("gatewayPort: \"8000\"\nservices:\n  - name: a\n    path: /a/\n    backend: [\"http://x:1\"]\n");
    let unknown = e
        .iter()
        .find(|e| e.message.contains("unknown key"))
        .unwrap();
    assert_eq!(unknown.line, 5);
    assert_eq!(unknown.key, "services[0].backend");
    assert!(
        unknown.message.contains("did you mean \"backends\""),
        "{}",
        unknown.message
    );
    assert_eq!(
        unknown.to_string(),
        "test.yaml:5: services[0].backend: unknown key \"backend\" (did you mean \"backends\"?)"
    );
    let top = errs("gatwayPort: 1\nservices: []\n");
    assert!(top[0].message.contains("did you mean \"gatewayPort\""));
    assert_eq!(top[0].line, 1);
}

#[test]
fn all_problems_reported_at_once() {
    let e = errs(
        "gatewayPort: \"99999\"\nhealthCheckInterval: \"5x\"\nservices:\n  - name: a\n    path: users\n    backends: [\"ftp://x:1\"]\n    loadBalancing: roundrobin\nrateLimiting: {enabled: yes, ratePerSecond: -1, burst: 3}\n",
    );
    let keys: Vec<&str> = e.iter().map(|e| e.key.as_str()).collect();
    for k in [
        "gatewayPort",
        "healthCheckInterval",
        "services[0].path",
        "services[0].backends[0]",
        "services[0].loadBalancing",
        "rateLimiting.enabled",
        "rateLimiting.ratePerSecond",
    ] {
        assert!(keys.contains(&k), "missing {k} in {keys:?}");
    }
    let lb = e
        .iter()
        .find(|e| e.key == "services[0].loadBalancing")
        .unwrap();
    assert!(lb.message.contains("did you mean \"roundRobin\""));
    assert_eq!(lb.line, 7);
    let rl = e
        .iter()
        .find(|e| e.key == "rateLimiting.ratePerSecond")
        .unwrap();
    assert_eq!(rl.line, 8);
}

#[test]
fn cross_field_checks() {
    let e = errs("services:\n  - name: a\n    path: /a/\n    backends: [\"http://x:1\"]\n    quota: {enabled: true, limit: 5, period: 1m}\n");
    assert!(
        e[0].message.contains("needs authentication"),
        "{}",
        e[0].message
    );
    assert_eq!(e[0].key, "services[0].quota");

    let e = errs("services:\n  - name: a\n    path: /a/\n    backends: [\"http://x:1\"]\n  - name: a\n    path: /a/\n    backends: [\"http://x:1\"]\n");
    assert!(e
        .iter()
        .any(|e| e.message.contains("duplicate service name")));
    assert!(e.iter().any(|e| e.message.contains("already routes")));

    let e = errs("services:\n  - name: a\n    path: /a/\n");
    assert!(e[0].message.contains("needs backends, consulServiceName"));

    let e = errs("adminPort: 8000\nservices: []\n");
    assert!(e[0].message.contains("never served on the public port"));

    let e = errs("services:\n  - name: a\n    path: /a/../b/\n    backends: [\"http://x:1\"]\n");
    assert!(e[0].message.contains("normalized"));

    let e = errs("authentication: {enabled: true}\nservices: []\n");
    assert!(e[0].message.contains("no key"));

    let e = errs("authentication: {enabled: true, publicKeyPath: k.pem, algorithms: [HS256]}\nservices: []\n");
    assert!(e[0].message.contains("not allowed"));
}

#[test]
fn syntax_errors_have_a_line() {
    let e = errs("services:\n  - name: a\n    path: [/a/\n");
    assert!(e[0].message.contains("YAML syntax error"));
    assert!(e[0].line >= 3, "{:?}", e[0]);
}

#[test]
fn wrong_types() {
    let e = errs("services: {a: 1}\n");
    assert!(e[0].message.contains("expected a list"));
    let e = errs("tls: true\nservices: []\n");
    assert!(e[0].message.contains("expected a mapping"));
    let e = errs("accessLog: \"yes\"\nservices: []\n");
    assert!(e[0].message.contains("true, false or a mapping"));
}

#[test]
fn extended_keys_parse() {
    let cfg = parse(
        r#"
gatewayPort: 8080
adminPort: "9000"
adminBind: "0.0.0.0"
adminToken: "s3cret"
loadBalancing: leastRequest
timeouts: {connect: 500ms, request: 10s, idle: 2m}
retries: 3
maxHeaderSize: 32k
accessLog: true
shutdownTimeout: 1m30s
trustedProxies: ["127.0.0.1", "10.0.0.0/8"]
services:
  - name: api
    path: /api/
    stripPath: true
    hosts: ["api.example.com"]
    methods: [get, POST]
    backends: ["http://127.0.0.1:9001", "http://[::1]:9002"]
    timeouts: {request: 2s}
    maxBodySize: 10m
  - name: exact
    path: /status
    pathType: exact
    loadBalancing: roundRobin
    backends: ["http://127.0.0.1:9003"]
"#,
        "t",
    )
    .unwrap();
    assert_eq!(cfg.gateway_port, 8080);
    assert_eq!(cfg.admin_port, 9000);
    let api = &cfg.services[0];
    assert_eq!(api.load_balancing, LoadBalancing::LeastRequest);
    assert_eq!(api.methods, vec!["GET", "POST"]);
    assert_eq!(api.timeouts.request, Duration::from_secs(2));
    assert_eq!(api.timeouts.connect, Duration::from_millis(500));
    assert_eq!(api.retries, 3);
    assert_eq!(api.max_body_size, Some(10 * 1024 * 1024));
    assert_eq!(api.backends[1].host, "::1");
    assert_eq!(cfg.services[1].path_type, PathType::Exact);
    assert_eq!(cfg.services[1].load_balancing, LoadBalancing::RoundRobin);
    assert_eq!(cfg.shutdown_timeout, Duration::from_secs(90));
    assert_eq!(cfg.max_header_size, 32 * 1024);
}

#[test]
fn secrets_are_redacted_when_serialized() {
    let cfg = parse(
        "redis: {address: \"r:6379\", password: \"hunter2\"}\nconsul: {token: \"secret-token\"}\nservices: []\n",
        "t",
    )
    .unwrap();
    let json = serde_json::to_string(&cfg).unwrap();
    assert!(!json.contains("hunter2"));
    assert!(!json.contains("secret-token"));
    assert!(json.contains("<redacted>"));
}

#[test]
fn edge_policy_keys_parse_with_secure_defaults() {
    let cfg = parse(
        "services:\n  - name: a\n    path: /a/\n    backends: [\"http://127.0.0.1:1\"]\n    hosts: [\"Admin.Example.COM.\", \"*.Example.org\"]\n",
        "t",
    )
    .unwrap();
    assert_eq!(cfg.max_header_count, 100);
    assert_eq!(cfg.underscore_headers, UnderscoreHeaders::Drop);
    assert_eq!(cfg.services[0].escaped_slashes, EscapedSlashes::Reject);
    assert_eq!(cfg.services[0].allowed_upgrades, vec!["websocket"]);
    assert_eq!(
        cfg.services[0].hosts,
        vec!["admin.example.com", "*.example.org"],
        "hosts in the same canonical form as requests"
    );
    let cfg = parse(
        "maxHeaderCount: 50\nunderscoreHeaders: reject\nescapedSlashes: keep\nallowedUpgrades: [WebSocket, foo]\nservices:\n  - name: a\n    path: /a/\n    backends: [\"http://127.0.0.1:1\"]\n    escapedSlashes: decode\n  - name: b\n    path: /b/\n    backends: [\"http://127.0.0.1:1\"]\n",
        "t",
    )
    .unwrap();
    assert_eq!(cfg.max_header_count, 50);
    assert_eq!(cfg.underscore_headers, UnderscoreHeaders::Reject);
    assert_eq!(cfg.services[0].escaped_slashes, EscapedSlashes::Decode);
    assert_eq!(
        cfg.services[1].escaped_slashes,
        EscapedSlashes::Keep,
        "top-level default"
    );
    assert_eq!(cfg.services[1].allowed_upgrades, vec!["websocket", "foo"]);
}

#[test]
fn edge_policy_key_errors_name_line_and_key() {
    let text = "adminBind: 0.0.0.0\nunderscoreHeaders: maybe\nservices:\n  - name: a\n    path: /a/\n    backends: [\"http://u:hunter2@127.0.0.1:1/x?k=v\"]\n    hosts: [\"evil@x\", \"a..b\", \"x:80\"]\n    escapedSlashes: sometimes\n    allowedUpgrades: [\"a b\"]\n";
    if std::env::var(crate::ADMIN_TOKEN_ENV).is_ok() {
        return; // the environment supplies a token; the adminBind rule is covered elsewhere
    }
    let errs = parse(text, "t").unwrap_err().0;
    let keys: Vec<(usize, &str)> = errs.iter().map(|e| (e.line, e.key.as_str())).collect();
    assert!(keys.contains(&(1, "adminBind")), "{errs:?}");
    assert!(keys.contains(&(2, "underscoreHeaders")), "{errs:?}");
    assert_eq!(
        keys.iter()
            .filter(|k| **k == (7, "services[0].hosts"))
            .count(),
        3,
        "{errs:?}"
    );
    assert!(
        keys.contains(&(8, "services[0].escapedSlashes")),
        "{errs:?}"
    );
    assert!(
        keys.contains(&(9, "services[0].allowedUpgrades")),
        "{errs:?}"
    );
    let all = errs
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        !all.contains("hunter2"),
        "a backend URL's password was echoed: {all}"
    );
}

#[test]
fn a_route_path_with_a_semicolon_is_refused() {
    let e = errs("services:\n  - name: a\n    path: \"/legacy;v=1/\"\n    backends: [\"http://127.0.0.1:1\"]\n");
    assert!(
        e.iter()
            .any(|e| e.line == 3 && e.key == "services[0].path" && e.message.contains("';'")),
        "{e:?}"
    );
}

#[test]
fn backend_schemes_and_upstream_keys_parse() {
    let cfg = parse(
        "services:\n  - name: a\n    path: /a/\n    backends: [\"https://billing.internal\", \"h2c://127.0.0.1:50051\", \"http://[::1]\", \"10.0.0.1:81\"]\n    upstreamProtocol: http2\n    upstreamTls:\n      caFile: ca.pem\n      serverName: billing.internal\n      certFile: c.pem\n      keyFile: k.pem\n",
        "t.yaml",
    )
    .expect("valid");
    let s = &cfg.services[0];
    let shown: Vec<String> = s.backends.iter().map(|b| b.to_string()).collect();
    assert_eq!(
        shown,
        [
            "https://billing.internal:443",
            "h2c://127.0.0.1:50051",
            "http://[::1]:80",
            "http://10.0.0.1:81"
        ]
    );
    assert_eq!(s.upstream_protocol, UpstreamProtocol::Http2);
    let t = s.upstream_tls.as_ref().expect("upstreamTls");
    assert_eq!(t.ca_file.as_deref(), Some("ca.pem"));
    assert_eq!(t.server_name.as_deref(), Some("billing.internal"));
    assert!(!t.insecure_skip_verify);
}

#[test]
fn upstream_key_errors_name_line_and_key() {
    let e = errs("services:\n  - name: a\n    path: /a/\n    backends: [\"grpc://127.0.0.1:1\", \"ftp://x\"]\n  - name: b\n    path: /b/\n    backends: [\"h2c://127.0.0.1:1\"]\n    upstreamProtocol: http1\n    upstreamTls:\n      certFile: c.pem\n      serverName: \"not a name!\"\n");
    let got: Vec<(usize, &str)> = e.iter().map(|e| (e.line, e.key.as_str())).collect();
    assert_eq!(
        got,
        [
            (2, "services[0]"),
            (4, "services[0].backends[0]"),
            (4, "services[0].backends[1]"),
            (8, "services[1].upstreamProtocol"),
            (9, "services[1].upstreamTls"),
            (10, "services[1].upstreamTls.keyFile"),
            (11, "services[1].upstreamTls.serverName"),
        ],
        "{e:?}"
    );
    assert!(e[1].message.contains("use h2c://"), "{}", e[1].message);
}

#[test]
fn traffic_policies_parse_with_top_level_defaults() {
    let c = parse(
        r#"
cors: {allowOrigins: ["https://app.example.com", "https://*.Example.com"], allowCredentials: true, maxAge: 10m}
requestHeaders: {set: {X-Env: "prod ${request_id}"}, remove: [X-Debug]}
ipDeny: ["10.0.0.0/8", "2001:db8::/32"]
maxInFlight: 200
retryOn: [connect-failure, "503"]
retryBudget: {percent: 20, minPerSecond: 5}
circuitBreaker: {consecutive5xx: 3}
plans:
  free: {priority: 1, quota: {limit: 5, period: 1h}}
services:
  - name: a
    path: /a/
    backends: ["http://127.0.0.1:1"]
  - name: b
    path: /b/
    split:
      - {name: stable, weight: 90, backends: ["http://127.0.0.1:2"]}
      - {name: canary, weight: 10, backends: ["http://127.0.0.1:3"], match: {headers: {X-Canary: "1"}, cookies: {canary: "yes"}}}
    rewrite: {regex: "^/b/v1/(.*)$", replacement: "/v2/$1"}
    cors: {allowOrigins: ["*"]}
    ipDeny: []
    maxInFlight: 5
    retryOn: [reset]
"#,
        "t.yaml",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let a = &c.services[0].policies;
    let cors = a.cors.as_ref().unwrap();
    assert_eq!(
        cors.allow_origins,
        ["https://app.example.com", "https://*.example.com"]
    );
    assert_eq!(cors.allow_methods, ["GET", "HEAD", "POST"]);
    assert_eq!(cors.max_age, Some(Duration::from_secs(600)));
    assert_eq!(a.request_headers.set[0].0, "x-env");
    assert_eq!(
        a.request_headers.set[0].1.pieces,
        [
            crate::Piece::Text("prod ".into()),
            crate::Piece::Var(crate::Var::RequestId)
        ]
    );
    assert_eq!(a.request_headers.remove, ["x-debug"]);
    assert_eq!(a.ip_deny.len(), 2);
    assert_eq!(a.max_in_flight, Some(200));
    assert_eq!(
        a.retry_on,
        [crate::RetryOn::ConnectFailure, crate::RetryOn::Status(503)]
    );
    assert_eq!(a.circuit_breaker.unwrap().consecutive_5xx, 3);
    assert_eq!(a.circuit_breaker.unwrap().max_ejected_percent, 50);
    assert_eq!(c.plans["free"].priority, 1);
    // A service's own keys replace the defaults; the others are inherited.
    let b = &c.services[1];
    assert_eq!(b.policies.cors.as_ref().unwrap().allow_origins, ["*"]);
    assert!(b.policies.ip_deny.is_empty());
    assert_eq!(b.policies.max_in_flight, Some(5));
    assert_eq!(b.policies.retry_on, [crate::RetryOn::Reset]);
    assert_eq!(b.policies.request_headers.remove, ["x-debug"]);
    assert_eq!(b.split.len(), 2);
    assert_eq!(
        b.split[1].matches.headers,
        [("x-canary".into(), "1".into())]
    );
    assert_eq!(
        b.split[1].matches.cookies,
        [("canary".into(), "yes".into())]
    );
    assert_eq!(b.rewrite.as_ref().unwrap().replacement, "/v2/$1");
    // Without policies: retries on connect failures only, nothing else.
    let d = parse("services: []\n", "t.yaml").unwrap();
    assert_eq!(d.policies, crate::Policies::default());
}

#[test]
fn traffic_policy_errors_name_line_and_key() {
    let svc = "services:\n  - name: a\n    path: /a/\n    backends: [\"http://127.0.0.1:1\"]\n";
    let cases: &[(&str, &str, &str)] = &[
        (
            "cors: {allowOrigins: [\"*\"], allowCredentials: true}\n",
            "cors.allowCredentials",
            "CORS protocol forbids",
        ),
        (
            "cors: {allowOrigins: [\"https://a.com/path\"]}\n",
            "cors.allowOrigins",
            "is not an origin",
        ),
        (
            "requestHeaders: {set: {Host: x}}\n",
            "requestHeaders.set",
            "set by the gateway",
        ),
        (
            "requestHeaders: {remove: [X-Consumer-Id]}\n",
            "requestHeaders.remove",
            "set by the gateway",
        ),
        (
            "responseHeaders: {add: {Transfer-Encoding: x}}\n",
            "responseHeaders.add",
            "set by the gateway",
        ),
        (
            "requestHeaders: {set: {X-A: \"${user}\"}}\n",
            "requestHeaders.set.x-a",
            "unknown variable ${user}",
        ),
        (
            "requestHeaders: {set: {X-A: \"${consumer\"}}\n",
            "requestHeaders.set.x-a",
            "without its",
        ),
        (
            "requestHeaders: {set: {\"Bad Name\": x}}\n",
            "requestHeaders.set",
            "not a header name",
        ),
        ("ipAllow: [\"10.0.0.0/33\"]\n", "ipAllow", "expected an IP address or CIDR"),
        ("cors: {maxAge: 1500ms}\n", "cors.maxAge", "a whole number of seconds"),
        ("cors: {allowOrigins: [\"https://*.com\"]}\n", "cors.allowOrigins", "is not an origin"),
        ("cors: {allowOrigins: [\"https://a.com:443\"]}\n", "cors.allowOrigins", "is not an origin"),
        ("cors: {allowOrigins: [\"https://a.com:0\"]}\n", "cors.allowOrigins", "is not an origin"),
        ("cors: {allowOrigins: [\"https://a.com:99999\"]}\n", "cors.allowOrigins", "is not an origin"),
        ("cors: {allowMethods: [\"GET, DELETE\"]}\n", "cors.allowMethods", "is not a method"),
        (
            "cors: {allowOrigins: [\"https://a.com\"], allowCredentials: true, exposeHeaders: [\"*\"]}\n",
            "cors.exposeHeaders",
            "browsers read it as a name",
        ),
        ("requestHeaders: {set: {X-A: one, x-a: two}}\n", "requestHeaders.set", "named twice"),
        ("requestHeaders: {set: {Proxy-Authorization: x}}\n", "requestHeaders.set", "set by the gateway"),
        ("responseHeaders: {remove: [Retry-After]}\n", "responseHeaders.remove", "set by the gateway"),
        ("responseHeaders: {set: {RateLimit: x}}\n", "responseHeaders.set", "set by the gateway"),
        ("retryOn: [\"501\"]\n", "retryOn", "is not"),
        ("retryBudget: {percent: 120}\n", "retryBudget.percent", "at most 100"),
        ("circuitBreaker: {maxEjectedPercent: 101}\n", "circuitBreaker.maxEjectedPercent", ""),
        ("circuitBreaker: {ejectFor: 1ms}\n", "circuitBreaker.ejectFor", "at least 100ms"),
        ("maxInFlight: 0\n", "maxInFlight", ""),
        (
            "authentication: {forwardClaims: {role: X-Role}}\nrequestHeaders: {set: {X-Role: admin}}\n",
            "services[0].requestHeaders",
            "forwardClaims",
        ),
    ];
    for (top, key, want) in cases {
        let e = errs(&format!("{top}{svc}"));
        assert!(
            e.iter()
                .any(|e| e.key == *key && e.message.contains(want) && e.line > 0),
            "{top}: want {key}: {want}, got {e:?}"
        );
    }
    let split = "services:\n  - name: a\n    path: /a/\n    backends: [\"http://127.0.0.1:1\"]\n    split:\n      - {name: s, weight: 1, backends: [\"http://127.0.0.1:2\"]}\n";
    let e = errs(split);
    assert!(
        e.iter()
            .any(|e| e.key == "services[0].split" && e.line == 5),
        "{e:?}"
    );
    let zero = "services:\n  - name: a\n    path: /a/\n    split:\n      - {name: s, weight: 0, backends: [\"http://127.0.0.1:2\"]}\n      - {name: s, weight: 0, backends: []}\n";
    let e = errs(zero);
    assert!(
        e.iter().any(|e| e.message.contains("every weight is 0")),
        "{e:?}"
    );
    assert!(
        e.iter().any(|e| e.message.contains("duplicate split")),
        "{e:?}"
    );
    assert!(
        e.iter().any(|e| e.message.contains("at least one backend")),
        "{e:?}"
    );
    let strip = "services:\n  - name: a\n    path: /a/\n    stripPath: true\n    backends: [\"http://127.0.0.1:1\"]\n    rewrite: {regex: \"^/a/(.*)\", replacement: \"/$1\"}\n";
    let e = errs(strip);
    assert!(
        e.iter()
            .any(|e| e.key == "services[0].rewrite" && e.message.contains("stripPath")),
        "{e:?}"
    );
    let no_regex = "services:\n  - name: a\n    path: /a/\n    backends: [\"http://127.0.0.1:1\"]\n    rewrite: {replacement: \"/x\"}\n";
    let e = errs(no_regex);
    assert!(
        e.iter().any(|e| e.key == "services[0].rewrite.regex"),
        "{e:?}"
    );
}

#[test]
fn access_log_takes_a_bool_or_a_mapping() {
    let svc = "services: []\n";
    let read = |top: &str| parse(&format!("{top}\n{svc}"), "t").unwrap().access_log;
    let off = AccessLog {
        enabled: false,
        format: AccessLogFormat::Text,
        path: None,
    };
    assert_eq!(read(""), off);
    assert_eq!(read("accessLog: false"), off);
    assert_eq!(read("accessLog: ~"), off);
    // The seed's form: today's text line on stdout.
    assert_eq!(
        read("accessLog: true"),
        AccessLog {
            enabled: true,
            ..off.clone()
        }
    );
    // The mapping: on, JSON, stdout unless a path is given.
    assert_eq!(
        read("accessLog: {}"),
        AccessLog {
            enabled: true,
            format: AccessLogFormat::Json,
            path: None
        }
    );
    assert_eq!(
        read("accessLog:\n  format: text\n  path: logs/access.log"),
        AccessLog {
            enabled: true,
            format: AccessLogFormat::Text,
            path: Some("logs/access.log".into())
        }
    );
    assert_eq!(read("accessLog: {path: \"-\"}").path, None);
    assert!(!read("accessLog: {enabled: false, format: json}").enabled);
    let a = read("accessLog: {path: a.log}");
    assert_eq!(
        a.file(Some(std::path::Path::new("/etc/hexgate"))),
        Some(std::path::PathBuf::from("/etc/hexgate/a.log"))
    );
    let a = read("accessLog: {path: /var/log/a.log}");
    assert_eq!(
        a.file(Some(std::path::Path::new("/etc/hexgate"))),
        Some(std::path::PathBuf::from("/var/log/a.log"))
    );

    let e = errs("accessLog: {format: xml}\nservices: []\n");
    assert_eq!(e[0].key, "accessLog.format");
    assert!(e[0].message.contains("json, text"), "{e:?}");
    let e = errs("services: []\naccessLog:\n  fromat: json\n");
    assert_eq!((e[0].line, e[0].key.as_str()), (3, "accessLog.fromat"));
    assert!(e[0].message.contains("did you mean \"format\""), "{e:?}");
    let e = errs("accessLog: [true]\nservices: []\n");
    assert!(e[0].message.contains("true, false or a mapping"), "{e:?}");
    let e = errs("accessLog: {enabled: \"yes\"}\nservices: []\n");
    assert_eq!(e[0].key, "accessLog.enabled");
}

#[test]
fn tracing_endpoints_headers_and_ratio() {
    let svc = "services: [{name: a, path: /a, backends: [\"http://127.0.0.1:1\"]}]";
    let read = |t: &str| parse(&format!("tracing: {t}\n{svc}"), "t.yaml");
    let t = read("{otlpEndpoint: \"http://c:4318\"}")
        .unwrap()
        .tracing
        .unwrap();
    assert_eq!(
        (t.host.as_str(), t.port, t.path.as_str()),
        ("c", 4318, "/v1/traces")
    );
    assert_eq!((t.sample_ratio, t.service_name.as_str()), (1.0, "hexgate"));
    let t = read("{otlpEndpoint: \"https://o.example.com/otlp/\"}")
        .unwrap()
        .tracing
        .unwrap();
    assert_eq!(
        (t.port, t.tls, t.path.as_str()),
        (443, true, "/otlp/v1/traces")
    );
    let t = read("{otlpEndpoint: \"http://c/v1/traces\"}")
        .unwrap()
        .tracing
        .unwrap();
    assert_eq!(t.path, "/v1/traces");
    let t = read("{otlpEndpoint: \"grpcs://[::1]\", sampleRatio: 0}")
        .unwrap()
        .tracing
        .unwrap();
    assert_eq!(
        (t.protocol, t.host.as_str(), t.port),
        (crate::OtlpProtocol::Grpc, "::1", 4317)
    );
    assert_eq!(t.path, crate::OTLP_GRPC_PATH);
    assert!(read("{otlpEndpoint: \"http://c\", enabled: false}")
        .unwrap()
        .tracing
        .is_none());
    // Headers: names lower-cased; values never shown.
    let t = read("{otlpEndpoint: \"http://c\", headers: {Authorization: \"Bearer s3cret\"}}")
        .unwrap()
        .tracing
        .unwrap();
    assert_eq!(
        t.headers,
        vec![("authorization".to_string(), "Bearer s3cret".to_string())]
    );
    assert!(!format!("{t:?}").contains("s3cret"));
    let shown = serde_json::to_string(&t).unwrap();
    assert!(
        !shown.contains("s3cret") && shown.contains("<redacted>"),
        "{shown}"
    );
    for (bad, key, says) in [
        (
            "{otlpEndpoint: \"ftp://c\"}",
            "tracing.otlpEndpoint",
            "http://, https://, grpc://",
        ),
        (
            "{otlpEndpoint: \"http://u:p@c\"}",
            "tracing.otlpEndpoint",
            "credentials",
        ),
        (
            "{otlpEndpoint: \"http://c?a=1\"}",
            "tracing.otlpEndpoint",
            "a query",
        ),
        (
            "{otlpEndpoint: \"grpc://c/x\"}",
            "tracing.otlpEndpoint",
            "no path",
        ),
        (
            "{otlpEndpoint: \"http://c\", sampleRatio: 1.5}",
            "tracing.sampleRatio",
            "from 0 to 1",
        ),
        (
            "{otlpEndpoint: \"http://c\", sampleRatio: -0.1}",
            "tracing.sampleRatio",
            "from 0 to 1",
        ),
        (
            "{otlpEndpoint: \"http://c\", headers: {content-type: x}}",
            "tracing.headers.content-type",
            "exporter",
        ),
        (
            "{otlpEndpoint: \"http://c\", headers: {\"a b\": x}}",
            "tracing.headers.a b",
            "valid header name",
        ),
        (
            "{otlpEndpoint: \"http://c\", headers: {a: \"x\\ny\"}}",
            "tracing.headers.a",
            "control character",
        ),
        (
            "{otlpEndpoint: \"http://c\", serviceName: \"\"}",
            "tracing.serviceName",
            "empty",
        ),
        ("{serviceName: x}", "tracing.otlpEndpoint", ""),
    ] {
        let e = read(bad).unwrap_err().to_string();
        assert!(e.contains(key) && e.contains(says), "{bad}: {e}");
        assert!(e.contains("t.yaml:1"), "{bad}: {e}");
        assert!(!e.contains("u:p@"), "{e}");
    }
}
