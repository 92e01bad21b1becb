//! The HTTP policies through the real binary and real backends: CORS (preflights answered by the
//! gateway and never forwarded, the response fields on every answer of the route, refusals
//! included, origin matching), header rules both ways with their variables (HTTP/1.1 and HTTP/2
//! alike), and path rewrites (captures, re-normalisation, an invalid result answered 500 and
//! never forwarded); what each refuses at load, with the line.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::apikeys::{call, cli_token, key_hash};
use crate::raw::{raw_request, Raw};
use crate::support::*;

// ---------------------------------------------------------------------------------------------
// Helpers

/// A backend like `Behaviour::Hello` (request headers echoed as `x-seen-*`, the target in
/// `x-path`) that also answers with what real servers add and a gateway may be asked to hide or
/// must not clobber: `Server`, `X-Powered-By`, `Vary: Accept-Encoding`.
struct LoudBackend {
    addr: SocketAddr,
    hits: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl LoudBackend {
    async fn start() -> LoudBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicU64::new(0));
        let h = hits.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let h = h.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let h = h.clone();
                        async move {
                            let mut b = Response::builder()
                                .header("server", "Apache/2.4.1 (Unix)")
                                .header("x-powered-by", "PHP/8.1")
                                .header("vary", "Accept-Encoding")
                                // A backend with its own CORS answer: the route's replaces it.
                                .header("access-control-allow-origin", "https://backend.example")
                                .header("access-control-allow-credentials", "true")
                                .header("x-path", req.uri().to_string());
                            if req.uri().path() != "/health" {
                                h.fetch_add(1, Ordering::Relaxed);
                            }
                            for (k, v) in req.headers() {
                                if k.as_str().starts_with("x-") {
                                    b = b.header(format!("x-seen-{}", k.as_str()), v.clone());
                                }
                            }
                            Ok::<_, Infallible>(b.body(Full::new(Bytes::from("loud"))).unwrap())
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        LoudBackend { addr, hits, task }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }
}

impl Drop for LoudBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The `Access-Control-*` lines of a raw response head, names lower-cased, sorted.
fn cors_lines(head: &str) -> Vec<String> {
    let mut out: Vec<String> = head
        .lines()
        .skip(1)
        .filter_map(|l| {
            let (n, v) = l.split_once(':')?;
            let n = n.trim().to_ascii_lowercase();
            n.starts_with("access-control-")
                .then(|| format!("{n}: {}", v.trim()))
        })
        .collect();
    out.sort();
    out
}

/// Every `Vary` token of a raw response head (all its `Vary` lines), lower-cased, in order.
fn vary(head: &str) -> Vec<String> {
    head.lines()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .filter(|(n, _)| n.trim().eq_ignore_ascii_case("vary"))
        .flat_map(|(_, v)| v.split(',').map(|t| t.trim().to_ascii_lowercase()))
        .collect()
}

/// A preflight written byte by byte (`Connection: close`), and its answer.
async fn preflight(port: u16, path: &str, origin: &str, method: &str, headers: &str) -> Raw {
    let acrh = if headers.is_empty() {
        String::new()
    } else {
        format!("Access-Control-Request-Headers: {headers}\r\n")
    };
    let raw = format!(
        "OPTIONS {path} HTTP/1.1\r\nHost: localhost\r\nOrigin: {origin}\r\n\
         Access-Control-Request-Method: {method}\r\n{acrh}Connection: close\r\n\r\n"
    );
    raw_request(port, raw.as_bytes()).await
}

/// A GET written byte by byte with `Origin` (none when empty) and extra lines.
async fn get_origin(port: u16, path: &str, origin: &str, extra: &str) -> Raw {
    let o = if origin.is_empty() {
        String::new()
    } else {
        format!("Origin: {origin}\r\n")
    };
    let raw =
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n{o}{extra}Connection: close\r\n\r\n");
    raw_request(port, raw.as_bytes()).await
}

/// The 1-based line of the first line of `yaml` containing `needle`.
fn line_of(yaml: &str, needle: &str) -> usize {
    yaml.lines()
        .position(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("{needle:?} not in\n{yaml}"))
        + 1
}

/// `hexgate validate` on `yaml` (real ports in place of the placeholders): asserts a refusal
/// reported as `FILE:LINE: KEY: ...` at the line holding `at_line`, with `want` in it.
fn refused_at(yaml: &str, at_line: &str, key: &str, want: &str) {
    let yaml = yaml.replace("{port}", "18080").replace("{admin}", "18081");
    let (code, out, err) = validate_yaml(&yaml, &[]);
    assert_eq!(code, 2, "validate accepted:\n{yaml}\n{out}{err}");
    let at = format!(":{}: {key}: ", line_of(&yaml, at_line));
    // A message may span lines (a regex error shows the pattern): from `at` to the next problem.
    let found = err.find(&at).map(|i| {
        let rest = &err[i + at.len()..];
        &rest[..rest.find("config.yaml:").unwrap_or(rest.len())]
    });
    assert!(
        found.is_some_and(|m| m.contains(want)),
        "want {at}...{want}\nvalidate said:\n{err}\nfor\n{yaml}"
    );
}

/// `hexgate validate` accepts `yaml`.
fn accepted(yaml: &str) {
    let yaml = yaml.replace("{port}", "18080").replace("{admin}", "18081");
    let (code, out, err) = validate_yaml(&yaml, &[]);
    assert_eq!(code, 0, "validate refused:\n{yaml}\n{out}{err}");
}

// ---------------------------------------------------------------------------------------------
// CORS

const CORS_YAML: &str = r#"gatewayPort: "{port}"
gatewayBind: 127.0.0.1
adminPort: "{admin}"
authentication:
  enabled: false
  publicKeyPath: "{dir}/keys/public.pem"
services:
  - name: web
    path: /web/
    backends: ["HELLO"]
    cors:
      allowOrigins: ["https://app.example.com", "https://*.example.com", "http://[::1]:8080"]
      allowMethods: [GET, POST, put]
      allowHeaders: [Authorization, Content-Type, X-Token]
      exposeHeaders: [X-Request-Id, X-Backend-Port]
      allowCredentials: true
      maxAge: 10m
  - name: locked
    path: /locked/
    backends: ["HELLO"]
    authentication: {enabled: true}
    cors: {allowOrigins: ["https://app.example.com"], allowHeaders: [Authorization], allowCredentials: true}
  - name: star
    path: /star/
    backends: ["HELLO"]
    cors: {allowOrigins: ["*"], exposeHeaders: [X-Backend-Port]}
  - name: loud
    path: /loud/
    backends: ["LOUD"]
    cors: {allowOrigins: ["https://app.example.com"]}
  - name: plain
    path: /plain/
    backends: ["HELLO"]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_preflights_are_answered_by_the_gateway_and_never_forwarded() {
    let b = TestBackend::start(Behaviour::Hello).await;
    let dir = temp_dir("cors");
    hexgate_keygen(&dir.join("keys"));
    let yaml = CORS_YAML
        .replace("HELLO", &b.url())
        .replace("LOUD", &b.url());
    let gw = Gateway::start_in(dir, &yaml).await;
    let port = gw.port;

    // Granted: 204, the gateway's fields only, exactly these.
    let r = preflight(
        port,
        "/web/x",
        "https://app.example.com",
        "PUT",
        "x-token, Content-Type",
    )
    .await;
    assert_eq!(r.status, 204, "{}\n{}", r.head, gw.log());
    assert_eq!(
        cors_lines(&r.head),
        [
            "access-control-allow-credentials: true",
            "access-control-allow-headers: x-token, Content-Type",
            "access-control-allow-methods: GET, POST, PUT",
            "access-control-allow-origin: https://app.example.com",
            "access-control-expose-headers: x-request-id, x-backend-port",
            "access-control-max-age: 600",
        ],
        "{}",
        r.head
    );
    let mut v = vary(&r.head);
    v.sort();
    assert_eq!(
        v,
        [
            "access-control-request-headers",
            "access-control-request-method",
            "origin"
        ],
        "{}",
        r.head
    );
    assert!(r.body.is_empty(), "a 204 has no body: {:?}", r.body);
    assert!(r.header("x-request-id").is_some(), "{}", r.head);

    // A wildcard subdomain, with a method the browser never needs listed (GET) and a
    // safelisted header name: granted, the request's header list echoed.
    let r = preflight(
        port,
        "/web/x",
        "https://a.b.example.com",
        "GET",
        "Accept-Language",
    )
    .await;
    assert_eq!(r.status, 204);
    let lines = cors_lines(&r.head);
    assert!(
        lines.contains(&"access-control-allow-origin: https://a.b.example.com".to_string())
            && lines.contains(&"access-control-allow-headers: Accept-Language".to_string()),
        "{}",
        r.head
    );

    // A disallowed origin: answered (204), never forwarded, and no Access-Control-* at all.
    for origin in [
        "https://evil.com",
        "https://example.com",
        "https://evil-example.com",
        "http://app.example.com",
        "https://app.example.com:8443",
        "null",
    ] {
        let r = preflight(port, "/web/x", origin, "PUT", "x-token").await;
        assert_eq!(r.status, 204, "{origin}: {}", r.head);
        assert_eq!(
            cors_lines(&r.head),
            Vec::<String>::new(),
            "{origin}: {}",
            r.head
        );
        assert!(vary(&r.head).contains(&"origin".to_string()), "{}", r.head);
    }

    // An allowed origin asking for a method or a header the route does not allow: 204 with
    // nothing that grants it (no Allow-Methods, -Headers or -Max-Age), so the browser fails
    // it. Methods compare case-sensitively, as browsers compare them.
    for (method, headers) in [
        ("DELETE", ""),
        ("put", ""),
        ("PATCH", "x-token"),
        ("PUT", "x-token, x-evil"),
        ("POST", "range"),
    ] {
        let r = preflight(port, "/web/x", "https://app.example.com", method, headers).await;
        assert_eq!(r.status, 204, "{method} {headers}: {}", r.head);
        let lines = cors_lines(&r.head);
        // Nothing at all: not even the origin fields actual requests get.
        for granting in [
            "access-control-allow-origin",
            "access-control-allow-credentials",
            "access-control-allow-methods",
            "access-control-allow-headers",
            "access-control-max-age",
        ] {
            assert!(
                !lines.iter().any(|l| l.starts_with(granting)),
                "{method} {headers:?} granted {granting}: {}",
                r.head
            );
        }
    }

    // Before authentication: a preflight on a protected route needs no credentials.
    let r = preflight(
        port,
        "/locked/x",
        "https://app.example.com",
        "POST",
        "authorization",
    )
    .await;
    assert_eq!(r.status, 204, "{}", r.head);
    assert!(r.header("www-authenticate").is_none());
    assert_eq!(
        cors_lines(&r.head),
        [
            "access-control-allow-credentials: true",
            "access-control-allow-headers: authorization",
            "access-control-allow-methods: GET, HEAD, POST",
            "access-control-allow-origin: https://app.example.com",
        ],
        "{}",
        r.head
    );

    // `*`: answered with `*`; the default methods; listed headers only.
    let r = preflight(port, "/star/x", "https://anyone.test", "POST", "").await;
    assert_eq!(
        cors_lines(&r.head),
        [
            "access-control-allow-methods: GET, HEAD, POST",
            "access-control-allow-origin: *",
            "access-control-expose-headers: x-backend-port",
        ],
        "{}",
        r.head
    );
    let r = preflight(
        port,
        "/star/x",
        "https://anyone.test",
        "POST",
        "content-type",
    )
    .await;
    assert!(
        !cors_lines(&r.head)
            .iter()
            .any(|l| l.contains("allow-headers")),
        "Content-Type (a JSON body) must be listed: {}",
        r.head
    );

    assert_eq!(b.hits(), 0, "a preflight reached the backend");

    // Not preflights, so forwarded: OPTIONS without Access-Control-Request-Method, and a
    // preflight-looking request on a route without cors.
    let raw = "OPTIONS /web/x HTTP/1.1\r\nHost: localhost\r\nOrigin: https://app.example.com\r\nConnection: close\r\n\r\n";
    let r = raw_request(port, raw.as_bytes()).await;
    assert_eq!(r.status, 200, "{}", r.head);
    assert_eq!(b.hits(), 1);
    let r = preflight(port, "/plain/x", "https://app.example.com", "PUT", "").await;
    assert_eq!(r.status, 200, "{}", r.head);
    assert_eq!(cors_lines(&r.head), Vec::<String>::new());
    assert_eq!(b.hits(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_response_fields_on_every_answer_of_the_route() {
    let b = TestBackend::start(Behaviour::Hello).await;
    let loud = LoudBackend::start().await;
    let dir = temp_dir("cors-actual");
    hexgate_keygen(&dir.join("keys"));
    let yaml = CORS_YAML
        .replace("HELLO", &b.url())
        .replace("LOUD", &loud.url());
    let gw = Gateway::start_in(dir, &yaml).await;
    let port = gw.port;

    // Allowed: the origin echoed as sent (credentials: never `*`), credentials, exposed
    // headers, and Vary: Origin.
    for origin in [
        "https://app.example.com",
        "HTTPS://APP.Example.COM",
        "https://a.example.com",
        "https://x-1.y.example.com",
        "http://[::1]:8080",
    ] {
        let r = get_origin(port, "/web/x", origin, "").await;
        assert_eq!(r.status, 200, "{origin}: {}\n{}", r.head, gw.log());
        assert_eq!(
            cors_lines(&r.head),
            [
                "access-control-allow-credentials: true".to_string(),
                format!("access-control-allow-origin: {origin}"),
                "access-control-expose-headers: x-request-id, x-backend-port".to_string(),
            ],
            "{origin}: {}",
            r.head
        );
        assert_eq!(vary(&r.head), ["origin"], "{}", r.head);
    }

    // Not allowed: no CORS field, still Vary: Origin (the answer depends on it).
    for origin in [
        "https://example.com",
        "https://evil-example.com",
        "https://example.com.evil.com",
        "https://a.example.com:8443",
        "http://a.example.com",
        "https://a.example.com.",
        "https://app.example.com/",
        "null",
        "",
    ] {
        let r = get_origin(port, "/web/x", origin, "").await;
        assert_eq!(r.status, 200, "{origin}: {}", r.head);
        assert_eq!(
            cors_lines(&r.head),
            Vec::<String>::new(),
            "{origin}: {}",
            r.head
        );
        assert_eq!(vary(&r.head), ["origin"], "{origin}: {}", r.head);
    }

    // The gateway's own refusals carry them too: a 401 the browser can read.
    let r = get_origin(port, "/locked/x", "https://app.example.com", "").await;
    assert_eq!(r.status, 401, "{}", r.head);
    assert!(r.header("www-authenticate").is_some());
    assert_eq!(
        cors_lines(&r.head),
        [
            "access-control-allow-credentials: true",
            "access-control-allow-origin: https://app.example.com",
        ],
        "{}",
        r.head
    );
    assert_eq!(vary(&r.head), ["origin"]);
    let r = get_origin(port, "/locked/x", "https://evil.com", "").await;
    assert_eq!(r.status, 401);
    assert_eq!(cors_lines(&r.head), Vec::<String>::new(), "{}", r.head);

    // `*`: the same `*` for every origin and for requests without one, so no Vary needed.
    for origin in ["https://anyone.test", ""] {
        let r = get_origin(port, "/star/x", origin, "").await;
        assert_eq!(
            cors_lines(&r.head),
            [
                "access-control-allow-origin: *",
                "access-control-expose-headers: x-backend-port",
            ],
            "{origin:?}: {}",
            r.head
        );
        assert_eq!(vary(&r.head), Vec::<String>::new(), "{}", r.head);
    }

    // The backend's own Vary is kept: Origin is appended to it.
    let r = get_origin(port, "/loud/x", "https://app.example.com", "").await;
    assert_eq!(r.status, 200, "{}", r.head);
    assert_eq!(vary(&r.head), ["accept-encoding", "origin"], "{}", r.head);
    assert_eq!(
        cors_lines(&r.head),
        ["access-control-allow-origin: https://app.example.com"]
    );

    let r = preflight(port, "/loud/x", "https://app.example.com", "GET", "").await;
    assert_eq!(r.status, 204);
    assert_eq!(
        vary(&r.head),
        [
            "origin",
            "access-control-request-method",
            "access-control-request-headers",
        ],
        "{}",
        r.head
    );
    assert_eq!(loud.hits(), 1, "the preflight was forwarded");

    // A route without cors: nothing added.
    let r = get_origin(port, "/plain/x", "https://app.example.com", "").await;
    assert_eq!(cors_lines(&r.head), Vec::<String>::new());
    assert_eq!(vary(&r.head), Vec::<String>::new());
}

#[test]
fn cors_credentials_with_any_origin_and_bad_origins_are_refused_at_load() {
    let svc = |cors: &str| {
        loopback_config(
            "",
            &service(
                "a",
                "/a/",
                &["http://127.0.0.1:9"],
                &format!("    cors:\n{cors}"),
            ),
        )
    };
    refused_at(
        &svc("      allowOrigins: [\"*\"]\n      allowCredentials: true\n"),
        "allowCredentials",
        "services[0].cors.allowCredentials",
        "not with the origin \"*\"",
    );
    // The top-level default too.
    let top = loopback_config(
        "cors:\n  allowOrigins: [\"https://a.com\", \"*\"]\n  allowCredentials: true\n",
        &service("a", "/a/", &["http://127.0.0.1:9"], ""),
    );
    refused_at(
        &top,
        "allowCredentials",
        "cors.allowCredentials",
        "not with the origin",
    );
    refused_at(
        &svc("      allowOrigins: [\"app.example.com\"]\n"),
        "allowOrigins",
        "services[0].cors.allowOrigins",
        "is not an origin",
    );
    accepted(&svc(
        "      allowOrigins: [\"https://app.example.com\"]\n      allowCredentials: true\n",
    ));
}

// ---------------------------------------------------------------------------------------------
// Header rules

const RULES_YAML: &str = r#"gatewayPort: "{port}"
gatewayBind: 127.0.0.1
adminPort: "{admin}"
authentication:
  enabled: false
  publicKeyPath: "{dir}/keys/public.pem"
  planClaim: plan
apiKeys:
  file: ./apikeys.yaml
plans:
  pro: {rateLimiting: {ratePerSecond: 1000, burst: 1000}}
  gold: {rateLimiting: {ratePerSecond: 1000, burst: 1000}}
responseHeaders:
  set: {X-Frame-Options: DENY}
services:
  - name: rules
    path: /rules/
    backends: ["LOUD"]
    authentication: {enabled: true, methods: [jwt, apiKey]}
    requestHeaders:
      set: {X-Who: "${consumer}", X-Env: prod, X-Plan: "plan=${plan}"}
      add: {X-Trace: "rid=${request_id} ip=${client_ip}"}
      remove: [X-Debug]
    responseHeaders:
      set: {X-Served: "${consumer}/${plan}", Strict-Transport-Security: "max-age=31536000"}
      add: {X-Rid: "${request_id}", Vary: Cookie}
      remove: [Server, X-Powered-By]
  - name: anon
    path: /anon/
    backends: ["LOUD"]
    requestHeaders:
      set: {X-Who: "[${consumer}]", X-Plan: "[${plan}]"}
  - name: defaults
    path: /defaults/
    backends: ["LOUD"]
"#;

const KEY: &str = "policies-http-key-0123456789abcdef";

/// The values of `name` in `h`, as text.
fn all(h: &HeaderMap, name: &str) -> Vec<String> {
    h.get_all(name)
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_rules_both_ways_with_their_variables_over_http1_and_http2() {
    let loud = LoudBackend::start().await;
    let dir = temp_dir("header-rules");
    hexgate_keygen(&dir.join("keys"));
    std::fs::write(
        dir.join("apikeys.yaml"),
        format!(
            "- id: k1\n  consumer: keyholder\n  plan: gold\n  hash: \"{}\"\n",
            key_hash(KEY)
        ),
    )
    .unwrap();
    let jwt = cli_token(&dir, "acme", &["plan=pro"]);
    // A consumer beyond ASCII: carried as X-Consumer-Id is (a consumer no header value could
    // carry, with control characters, is refused by authentication itself; the rules' own
    // handling of one is unit-tested).
    let zoe = cli_token(&dir, "zoë", &["plan=pro"]);
    let gw = Gateway::start_in(dir, &RULES_YAML.replace("LOUD", &loud.url())).await;
    let port = gw.port;
    let client = [
        ("x-env", "dev"),
        ("x-debug", "1"),
        ("x-trace", "from-client"),
        ("x-who", "mallory"),
    ];

    // HTTP/1.1 and HTTP/2 (h2c), with a JWT: the same rules, the same results.
    let bearer = format!("Bearer {jwt}");
    let mut fields = client.to_vec();
    fields.push(("authorization", &bearer));
    let h1 = get_with(port, "/rules/a", &fields).await.unwrap();
    let h2 = h2c_with(port, "/rules/a", &fields).await;
    for (proto, (status, h, body)) in [("HTTP/1.1", h1), ("HTTP/2", h2)] {
        assert_eq!(status, 200, "{proto}: {body}\n{}", gw.log());
        let rid = h["x-request-id"].to_str().unwrap().to_string();
        // Upstream: set replaced the client's value, add appended to it, remove removed.
        assert_eq!(all(&h, "x-seen-x-who"), ["acme"], "{proto}");
        assert_eq!(all(&h, "x-seen-x-env"), ["prod"], "{proto}");
        assert_eq!(all(&h, "x-seen-x-plan"), ["plan=pro"], "{proto}");
        assert_eq!(
            all(&h, "x-seen-x-trace"),
            ["from-client".to_string(), format!("rid={rid} ip=127.0.0.1")],
            "{proto}"
        );
        assert!(!h.contains_key("x-seen-x-debug"), "{proto}: {h:?}");
        // To the client: the backend's Server and X-Powered-By gone, the rules' fields there,
        // the backend's Vary kept beside the added one; the top-level default replaced by the
        // route's own responseHeaders.
        assert!(
            !h.contains_key("server") && !h.contains_key("x-powered-by"),
            "{proto}: {h:?}"
        );
        assert_eq!(all(&h, "x-served"), ["acme/pro"], "{proto}");
        assert_eq!(all(&h, "x-rid"), [rid], "{proto}");
        assert_eq!(all(&h, "strict-transport-security"), ["max-age=31536000"]);
        assert_eq!(all(&h, "vary"), ["Accept-Encoding", "Cookie"], "{proto}");
        assert!(!h.contains_key("x-frame-options"), "{proto}");
    }

    // An API key: its consumer and its plan.
    let (status, h, body) = call(port, "/rules/b", "x-api-key", Some(KEY), None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(all(&h, "x-seen-x-who"), ["keyholder"]);
    assert_eq!(all(&h, "x-seen-x-plan"), ["plan=gold"]);
    assert_eq!(all(&h, "x-served"), ["keyholder/gold"]);

    // A refusal (401) gets the response rules too, with empty variables.
    let (status, h, _) = get_with(port, "/rules/c", &[]).await.unwrap();
    assert_eq!(status, 401);
    assert_eq!(all(&h, "x-served"), ["/"]);
    assert_eq!(all(&h, "strict-transport-security"), ["max-age=31536000"]);

    let bearer = format!("Bearer {zoe}");
    let (status, h, body) = get_with(port, "/rules/d", &[("authorization", &bearer)])
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(h["x-seen-x-who"].as_bytes(), "zoë".as_bytes());
    assert_eq!(h["x-seen-x-who"], h["x-seen-x-consumer-id"]);
    assert_eq!(h["x-served"].as_bytes(), "zoë/pro".as_bytes());

    // No consumer, no plan: empty variables. A route without rules of its own: the
    // top-level default (and the backend's Server untouched).
    for (proto, (status, h, _)) in [
        (
            "HTTP/1.1",
            get_with(port, "/anon/x", &client).await.unwrap(),
        ),
        ("HTTP/2", h2c_with(port, "/anon/x", &client).await),
    ] {
        assert_eq!(status, 200, "{proto}");
        assert_eq!(all(&h, "x-seen-x-who"), ["[]"], "{proto}");
        assert_eq!(all(&h, "x-seen-x-plan"), ["[]"], "{proto}");
        assert_eq!(all(&h, "x-frame-options"), ["DENY"], "{proto}");
    }
    let (_, h, _) = get_with(port, "/defaults/x", &client).await.unwrap();
    assert_eq!(all(&h, "x-frame-options"), ["DENY"]);
    assert_eq!(all(&h, "server"), ["Apache/2.4.1 (Unix)"]);
    assert_eq!(
        all(&h, "x-seen-x-who"),
        ["mallory"],
        "no rules: the client's own"
    );
}

#[test]
fn header_rules_naming_reserved_or_bad_fields_are_refused_at_load() {
    let svc =
        |rules: &str| loopback_config("", &service("a", "/a/", &["http://127.0.0.1:9"], rules));
    for (rules, at, key, want) in [
        (
            "    requestHeaders:\n      set: {X-Consumer-Id: admin}\n",
            "set:",
            "services[0].requestHeaders.set",
            "\"X-Consumer-Id\" is set by the gateway",
        ),
        (
            "    requestHeaders:\n      remove: [Host]\n",
            "remove:",
            "services[0].requestHeaders.remove",
            "is set by the gateway",
        ),
        (
            "    requestHeaders:\n      add: {X-Forwarded-For: 1.2.3.4}\n",
            "add:",
            "services[0].requestHeaders.add",
            "is set by the gateway",
        ),
        (
            "    responseHeaders:\n      remove: [Content-Length]\n",
            "remove:",
            "services[0].responseHeaders.remove",
            "is set by the gateway",
        ),
        (
            "    responseHeaders:\n      set: {X-Request-Id: mine}\n",
            "set:",
            "services[0].responseHeaders.set",
            "is set by the gateway",
        ),
        (
            "    responseHeaders:\n      set: {X-A: \"${nope}\"}\n",
            "set:",
            "services[0].responseHeaders.set.x-a",
            "unknown variable",
        ),
        (
            "    responseHeaders:\n      set: {\"X A\": b}\n",
            "set:",
            "services[0].responseHeaders.set",
            "is not a header name",
        ),
    ] {
        refused_at(&svc(rules), at, key, want);
    }
    accepted(&svc(
        "    requestHeaders:\n      set: {X-Env: prod}\n    responseHeaders:\n      remove: [Server, X-Powered-By]\n",
    ));
}

// ---------------------------------------------------------------------------------------------
// Rewrites

const REWRITE_YAML: &str = r#"gatewayPort: "{port}"
gatewayBind: 127.0.0.1
adminPort: "{admin}"
services:
  - name: web
    path: /web/
    backends: ["HELLO"]
    rewrite: {regex: "^/web/v1/(.*)$", replacement: "/v2/$1"}
  - name: users
    path: /u/
    backends: ["HELLO"]
    rewrite: {regex: "^/u/(?P<id>[0-9]+)/(?<rest>.*)$", replacement: "/users/${id}/items/$rest"}
  - name: dots
    path: /old/
    backends: ["HELLO"]
    rewrite: {regex: "^/old/(.*)$", replacement: "/new/../admin/./$1"}
  - name: relative
    path: /rel/
    backends: ["HELLO"]
    rewrite: {regex: "^/rel/(.*)$", replacement: "$1"}
  - name: escape
    path: /esc/
    backends: ["HELLO"]
    rewrite: {regex: "^/esc/(.*)$", replacement: "/x/%$1"}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewrites_with_captures_are_normalised_and_invalid_results_never_forwarded() {
    let b = TestBackend::start(Behaviour::Hello).await;
    let gw = Gateway::start(&REWRITE_YAML.replace("HELLO", &b.url())).await;
    let port = gw.port;
    let path_seen = |h: &HeaderMap| h["x-path"].to_str().unwrap().to_string();
    for (sent, want) in [
        (
            "/web/v1/users/7?sort=asc&x=%2F",
            "/v2/users/7?sort=asc&x=%2F",
        ),
        ("/web/v1/", "/v2/"),
        // Matched on the normalised path: `..` resolved and escapes decoded before.
        ("/web/v2/../v1/%75sers", "/v2/users"),
        // No match: forwarded as it came.
        ("/web/other", "/web/other"),
        ("/u/42/a/b?q=1", "/users/42/items/a/b?q=1"),
        ("/u/x/a", "/u/x/a"),
        // The result is normalised: `..` and `.` resolved, `//` collapsed.
        ("/old/x", "/admin/x"),
        ("/old/a/./b/../c", "/admin/a/c"),
        ("/old//y", "/admin/y"),
        ("/esc/41", "/x/A"),
    ] {
        let (status, h, body) = get_with(port, sent, &[]).await.unwrap();
        assert_eq!(status, 200, "{sent}: {body}\n{}", gw.log());
        assert_eq!(path_seen(&h), want, "{sent}");
    }
    let hits = b.hits();

    // A result that is not a path: 500, logged, never forwarded.
    for (sent, service, result) in [("/rel/x", "relative", "x"), ("/esc/zz", "escape", "/x/%zz")] {
        let (status, _, body) = get_with(port, sent, &[]).await.unwrap();
        assert_eq!(status, 500, "{sent}: {body}");
        assert!(body.contains("rewrite produced an invalid path"), "{body}");
        let (service, result) = (format!("service={service}"), format!("result={result} "));
        assert!(!body.contains(&result), "details stay in the log: {body}");
        let log = gw.log();
        assert!(
            log.lines()
                .any(|l| l.contains("rewrite produced an invalid path")
                    && l.contains(&service)
                    && l.contains(&result)),
            "{sent}: no log line with {service} {result}:\n{log}"
        );
    }
    assert_eq!(b.hits(), hits, "an invalid rewrite reached the backend");

    // HTTP/2 the same.
    let (status, h, _) = h2c_with(port, "/u/7/z", &[]).await;
    assert_eq!(status, 200);
    assert_eq!(path_seen(&h), "/users/7/items/z");
}

#[test]
fn bad_rewrites_are_refused_at_load_with_the_line() {
    let svc = |rw: &str| {
        loopback_config(
            "",
            &format!(
                "{}{}",
                service("z", "/z/", &["http://127.0.0.1:9"], ""),
                service("a", "/a/", &["http://127.0.0.1:9"], rw)
            ),
        )
    };
    for (rw, want) in [
        (
            "    rewrite:\n      regex: \"^/a/(x\"\n      replacement: /b\n",
            "unclosed group",
        ),
        (
            "    rewrite:\n      regex: \"^/a/(x)/(y)$\"\n      replacement: /b/$3\n",
            "$3 names group 3, and the regex has 2 groups",
        ),
        (
            "    rewrite:\n      regex: \"^/a/(?P<id>x)$\"\n      replacement: \"/b/${nope}\"\n",
            "no group named \"nope\"",
        ),
        (
            "    rewrite:\n      regex: \"^/a/(x)$\"\n      replacement: \"/b/$1x\"\n",
            "write ${1}x",
        ),
        (
            "    rewrite:\n      regex: \"^/a/(x)$\"\n      replacement: \"/b/$1?y=1\"\n",
            "\"?\" cannot appear in a path",
        ),
    ] {
        refused_at(&svc(rw), "regex:", "services[1].rewrite.regex", want);
    }
    // Keys the reader checks.
    refused_at(
        &svc("    rewrite:\n      regex: \"^/a/(x)$\"\n"),
        "regex:",
        "services[1].rewrite.replacement",
        "required",
    );
    accepted(&svc(
        "    rewrite:\n      regex: \"^/a/(?P<id>x)/(y)$\"\n      replacement: \"/b/${id}/$2/$$\"\n",
    ));
}

/// An HTTP/2 client's cookies, one field each (RFC 9113 section 8.2.3), reach an HTTP/1.1
/// backend as the one Cookie line HTTP/1.1 allows, joined with "; " (the backend's raw bytes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_cookie_fields_reach_http1_backends_as_one_line() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<String>(8);
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 65536 {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = s
                    .write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
                    )
                    .await;
                let text = String::from_utf8_lossy(&head).into_owned();
                if !text.starts_with("GET /health") {
                    let _ = tx.send(text).await;
                }
            });
        }
    });
    let url = format!("http://{addr}");
    let gw = Gateway::start(&loopback_config("", &service("web", "/web/", &[&url], ""))).await;
    let (status, _, _) = h2c_with(gw.port, "/web/x", &[("cookie", "a=1"), ("cookie", "b=2")]).await;
    assert_eq!(status, 200);
    let head = tokio::time::timeout(std::time::Duration::from_secs(5), rx.recv())
        .await
        .unwrap()
        .unwrap();
    let cookies: Vec<&str> = head
        .lines()
        .filter(|l| l.to_ascii_lowercase().starts_with("cookie:"))
        .collect();
    assert_eq!(cookies.len(), 1, "{head}");
    assert!(cookies[0].ends_with("a=1; b=2"), "{head}");
    task.abort();
}
