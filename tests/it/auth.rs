//! JWT authentication through the real gateway: every refusal reason, identity headers,
//! per-route override, the token cache and expiry, JWKS rotation, and tokens made by other tools.

use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::json;

use hexgate::auth::keys::{self, Alg, Material};
use hexgate::auth::tools::{self, SigningKey};

use crate::support::*;

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

struct Keys {
    dir: std::path::PathBuf,
    signing: SigningKey,
    public_pem: String,
}

fn rsa_keys(dir: &std::path::Path) -> Keys {
    tools::keygen(dir, Alg::RS256, false).unwrap();
    Keys {
        dir: dir.to_path_buf(),
        signing: SigningKey::from_pem(&std::fs::read_to_string(dir.join("private.pem")).unwrap())
            .unwrap(),
        public_pem: std::fs::read_to_string(dir.join("public.pem")).unwrap(),
    }
}

fn token(k: &SigningKey, claims: serde_json::Value) -> String {
    tools::sign_token(k, Alg::RS256, None, &claims).unwrap()
}

async fn call(
    port: u16,
    path: &str,
    auth: Option<&str>,
    extra: &[(&str, &str)],
) -> (u16, http::HeaderMap, String) {
    let mut fields: Vec<(&str, &str)> = auth.map(|a| ("authorization", a)).into_iter().collect();
    fields.extend_from_slice(extra);
    get_with(port, path, &fields).await.unwrap()
}

fn gateway_yaml(backend: &TestBackend, keys_dir: &std::path::Path) -> String {
    format!(
        r#"gatewayPort: "{{port}}"
gatewayBind: 127.0.0.1
adminPort: "{{admin}}"
authentication:
  enabled: true
  publicKeyPath: "{}/public.pem"
  issuer: "hexgate-tests"
  audience: "api"
  leeway: 0s
  forwardClaims: {{role: "X-Consumer-Role"}}
services:
  - name: users
    path: /users/
    backends: ["{b}"]
  - name: public
    path: /public/
    authentication: {{enabled: false}}
    backends: ["{b}"]
"#,
        keys_dir.display(),
        b = backend.url()
    )
}

fn good_claims() -> serde_json::Value {
    json!({"sub": "alice", "iss": "hexgate-tests", "aud": "api", "exp": now() + 600, "role": "admin"})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_identity_and_override() {
    let b = TestBackend::start(Behaviour::Hello).await;
    let dir = temp_dir("auth");
    let k = rsa_keys(&dir.join("keys"));
    let other = rsa_keys(&dir.join("other"));
    let gw = Gateway::start_in(dir.clone(), &gateway_yaml(&b, &k.dir)).await;

    // Missing header: the seed's wording, and a challenge without an error code.
    let (s, h, body) = call(gw.port, "/users/1", None, &[]).await;
    assert_eq!(s, 401);
    assert!(
        body.contains("401 Unauthorized: Missing Authorization header"),
        "{body}"
    );
    assert_eq!(h["www-authenticate"], "Bearer realm=\"hexgate\"");

    // A good token: 200, consumer and claim forwarded, spoofed identity replaced.
    let good = format!("Bearer {}", token(&k.signing, good_claims()));
    let (s, h, _) = call(
        gw.port,
        "/users/1",
        Some(&good),
        &[("x-consumer-id", "mallory"), ("x-consumer-role", "root")],
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(h["x-seen-x-consumer-id"], "alice");
    assert_eq!(h["x-seen-x-consumer-role"], "admin");
    let (s, h, _) = call(
        gw.port,
        "/users/1",
        Some(&good.replace("Bearer", "bearer")),
        &[],
    )
    .await;
    assert_eq!(s, 200, "scheme is case-insensitive");
    assert_eq!(h["x-seen-x-consumer-id"], "alice");

    // Public route: no token needed, and identity headers from the client never pass.
    let (s, h, _) = call(gw.port, "/public/x", None, &[("x-consumer-id", "mallory")]).await;
    assert_eq!(s, 200);
    assert!(
        !h.contains_key("x-seen-x-consumer-id"),
        "spoofed X-Consumer-Id must be removed"
    );

    let t = now();
    let hs256 = {
        let header = URL_SAFE_NO_PAD.encode(r#"{"alg":"HS256","typ":"JWT"}"#);
        let payload = URL_SAFE_NO_PAD.encode(good_claims().to_string());
        let input = format!("{header}.{payload}");
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, k.public_pem.as_bytes());
        let sig = ring::hmac::sign(&key, input.as_bytes());
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()))
    };
    let none = format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#),
        URL_SAFE_NO_PAD.encode(good_claims().to_string())
    );
    let good_tok = token(&k.signing, good_claims());
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "expired",
            token(
                &k.signing,
                json!({"sub":"alice","iss":"hexgate-tests","aud":"api","exp": t - 60}),
            ),
            "expired",
        ),
        (
            "nbf in the future",
            token(
                &k.signing,
                json!({"sub":"alice","iss":"hexgate-tests","aud":"api","exp": t + 600, "nbf": t + 300}),
            ),
            "not_yet_valid",
        ),
        (
            "wrong key",
            token(&other.signing, good_claims()),
            "bad_signature",
        ),
        (
            "wrong iss",
            token(
                &k.signing,
                json!({"sub":"alice","iss":"evil","aud":"api","exp": t + 600}),
            ),
            "issuer",
        ),
        (
            "wrong aud",
            token(
                &k.signing,
                json!({"sub":"alice","iss":"hexgate-tests","aud":"other","exp": t + 600}),
            ),
            "audience",
        ),
        (
            "no exp",
            token(
                &k.signing,
                json!({"sub":"alice","iss":"hexgate-tests","aud":"api"}),
            ),
            "missing_exp",
        ),
        (
            "no sub",
            token(
                &k.signing,
                json!({"iss":"hexgate-tests","aud":"api","exp": t + 600}),
            ),
            "no_consumer",
        ),
        ("alg none", none, "algorithm"),
        ("HS256 with the public key as secret", hs256, "algorithm"),
        ("garbage", "not-a-token".to_string(), "malformed"),
        (
            "truncated signature",
            good_tok[..good_tok.len() - 12].to_string(),
            "bad_signature",
        ),
        (
            "oversized",
            format!(
                "{}.{}.{}",
                "a".repeat(4000),
                "b".repeat(4000),
                "c".repeat(1000)
            ),
            "too_large",
        ),
    ];
    for (what, tok, reason) in &cases {
        let (s, h, body) = call(gw.port, "/users/1", Some(&format!("Bearer {tok}")), &[]).await;
        assert_eq!(s, 401, "{what}: {body}");
        let challenge = h["www-authenticate"].to_str().unwrap();
        assert!(
            challenge.contains("error=\"invalid_token\"")
                && challenge.contains("error_description=\""),
            "{what}: {challenge}"
        );
        let m = gw.metrics().await;
        assert!(
            m.contains(&format!(
                "hexgate_auth_failures_total{{service=\"users\",reason=\"{reason}\"}}"
            )),
            "{what}: no {reason} in metrics"
        );
    }
    let (s, _, _) = call(gw.port, "/users/1", Some("Basic YWxpY2U6cHc="), &[]).await;
    assert_eq!(s, 401, "non-Bearer scheme");
    assert_eq!(
        b.hits() as usize,
        3,
        "only the authenticated and public requests reached the backend"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_token_is_refused_once_expired() {
    let b = TestBackend::start(Behaviour::Hello).await;
    let dir = temp_dir("authexp");
    let k = rsa_keys(&dir.join("keys"));
    let gw = Gateway::start_in(dir.clone(), &gateway_yaml(&b, &k.dir)).await;
    let t = now();
    let short = format!(
        "Bearer {}",
        token(
            &k.signing,
            json!({"sub":"alice","iss":"hexgate-tests","aud":"api","exp": t + 2})
        )
    );
    assert_eq!(call(gw.port, "/users/1", Some(&short), &[]).await.0, 200);
    assert_eq!(
        call(gw.port, "/users/1", Some(&short), &[]).await.0,
        200,
        "served from the cache"
    );
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (s, _, body) = call(gw.port, "/users/1", Some(&short), &[]).await;
    assert_eq!(s, 401, "the cache must not outlive exp: {body}");
    assert!(body.contains("expired"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_from_the_cli_and_from_openssl_are_accepted() {
    require_tool("openssl");
    let b = TestBackend::start(Behaviour::Hello).await;
    let dir = temp_dir("authcli");
    // Keys and token from the hexgate binary, exactly as the README shows.
    hexgate_keygen(&dir.join("keys"));
    let again = Command::new(bin())
        .args(["keygen", "--out"])
        .arg(dir.join("keys"))
        .output()
        .unwrap();
    assert_eq!(
        again.status.code(),
        Some(2),
        "refuses to overwrite without --force"
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join("keys/private.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let out = Command::new(bin())
        .args(["token", "--key"])
        .arg(dir.join("keys/private.pem"))
        .args([
            "--sub",
            "bob",
            "--iss",
            "hexgate-tests",
            "--aud",
            "api",
            "--claim",
            "role=viewer",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    let cli_token = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        cli_token.lines().count(),
        1,
        "stdout carries the token only"
    );
    let gw = Gateway::start_in(dir.clone(), &gateway_yaml(&b, &dir.join("keys"))).await;
    let (s, h, _) = call(
        gw.port,
        "/users/1",
        Some(&format!("Bearer {}", cli_token.trim())),
        &[],
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(h["x-seen-x-consumer-id"], "bob");
    assert_eq!(h["x-seen-x-consumer-role"], "viewer");

    // An independent signer: openssl, with its own key written into the same public.pem slot
    // of a second gateway.
    let od = dir.join("openssl");
    std::fs::create_dir_all(&od).unwrap();
    let run = |args: &[&str]| {
        let o = Command::new("openssl")
            .args(args)
            .current_dir(&od)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    run(&[
        "genpkey",
        "-algorithm",
        "RSA",
        "-pkeyopt",
        "rsa_keygen_bits:2048",
        "-out",
        "private.pem",
    ]);
    run(&[
        "pkey",
        "-in",
        "private.pem",
        "-pubout",
        "-out",
        "public.pem",
    ]);
    let header = URL_SAFE_NO_PAD.encode(r#"{"alg":"RS256","typ":"JWT"}"#);
    let payload = URL_SAFE_NO_PAD.encode(
        json!({"sub":"carol","iss":"hexgate-tests","aud":"api","exp": now() + 600}).to_string(),
    );
    std::fs::write(od.join("input"), format!("{header}.{payload}")).unwrap();
    run(&[
        "dgst",
        "-sha256",
        "-sign",
        "private.pem",
        "-out",
        "sig.bin",
        "input",
    ]);
    let sig = std::fs::read(od.join("sig.bin")).unwrap();
    let openssl_token = format!("{header}.{payload}.{}", URL_SAFE_NO_PAD.encode(sig));
    let b2 = TestBackend::start(Behaviour::Hello).await;
    let gw2 = Gateway::start(&gateway_yaml(&b2, &od)).await;
    let (s, h, body) = call(
        gw2.port,
        "/users/1",
        Some(&format!("Bearer {openssl_token}")),
        &[],
    )
    .await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(h["x-seen-x-consumer-id"], "carol");
    // And the hexgate-made token is refused by the gateway holding openssl's key.
    assert_eq!(
        call(
            gw2.port,
            "/users/1",
            Some(&format!("Bearer {}", cli_token.trim())),
            &[]
        )
        .await
        .0,
        401
    );
}

/// A JWKS endpoint on loopback whose document the test can change, and stop.
struct JwksServer {
    port: u16,
    doc: Arc<Mutex<String>>,
    task: tokio::task::JoinHandle<()>,
}

impl JwksServer {
    async fn start(doc: String) -> JwksServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let doc = Arc::new(Mutex::new(doc));
        let d = doc.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((s, _)) = listener.accept().await else {
                    continue;
                };
                let d = d.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |_req| {
                        let body = d.lock().unwrap().clone();
                        async move {
                            Ok::<_, std::convert::Infallible>(
                                http::Response::builder()
                                    .header("cache-control", "max-age=3600")
                                    .body(Full::new(Bytes::from(body)))
                                    .unwrap(),
                            )
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        JwksServer { port, doc, task }
    }
}

fn ed_jwk(kid: &str) -> (SigningKey, serde_json::Value) {
    let (private, public) = tools::generate(Alg::EdDSA).unwrap();
    let k = keys::from_pem(&public, "t").unwrap().remove(0);
    let Material::Ed25519(x) = k.material else {
        panic!("not ed25519")
    };
    (
        SigningKey::from_pem(&private).unwrap(),
        json!({"kty": "OKP", "crv": "Ed25519", "kid": kid, "use": "sig", "x": URL_SAFE_NO_PAD.encode(x)}),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_rotation_and_outage() {
    let b = TestBackend::start(Behaviour::Hello).await;
    let (k1, jwk1) = ed_jwk("key-1");
    let (k2, jwk2) = ed_jwk("key-2");
    let jwks = JwksServer::start(json!({"keys": [jwk1.clone()]}).to_string()).await;
    let yaml = format!(
        "gatewayPort: \"{{port}}\"\ngatewayBind: 127.0.0.1\nadminPort: \"{{admin}}\"\nauthentication:\n  enabled: true\n  jwksUrl: \"http://127.0.0.1:{}/.well-known/jwks.json\"\n  algorithms: [EdDSA, RS256]\nservices:\n  - name: users\n    path: /users/\n    backends: [\"{}\"]\n",
        jwks.port,
        b.url()
    );
    let gw = Gateway::start(&yaml).await;
    let claims = json!({"sub": "dave", "exp": now() + 600});
    let t1 = format!(
        "Bearer {}",
        tools::sign_token(&k1, Alg::EdDSA, Some("key-1"), &claims).unwrap()
    );
    let t2 = format!(
        "Bearer {}",
        tools::sign_token(&k2, Alg::EdDSA, Some("key-2"), &claims).unwrap()
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while call(gw.port, "/users/1", Some(&t1), &[]).await.0 != 200 {
        assert!(
            Instant::now() < deadline,
            "initial JWKS never loaded: {}",
            gw.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (s, _, body) = call(gw.port, "/users/1", Some(&t2), &[]).await;
    assert_eq!(s, 401, "key-2 not published yet");
    assert!(body.contains("no key with id"), "{body}");

    // Rotation: key-2 published, key-1 removed. An unknown kid triggers a refresh (at most once
    // per 5 seconds), so key-2 is accepted within that window without waiting for max-age.
    *jwks.doc.lock().unwrap() = json!({"keys": [jwk2.clone()]}).to_string();
    let deadline = Instant::now() + Duration::from_secs(12);
    while call(gw.port, "/users/1", Some(&t2), &[]).await.0 != 200 {
        assert!(
            Instant::now() < deadline,
            "new kid never picked up: {}",
            gw.log()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(
        call(gw.port, "/users/1", Some(&t1), &[]).await.0,
        401,
        "removed key refused, even though its token was cached"
    );

    // Outage: the JWKS server goes away; the last good set stays in use.
    jwks.task.abort();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let t3 = format!(
        "Bearer {}",
        tools::sign_token(&k2, Alg::EdDSA, Some("key-3"), &claims).unwrap()
    );
    assert_eq!(
        call(gw.port, "/users/1", Some(&t3), &[]).await.0,
        401,
        "unknown kid while JWKS is down"
    );
    assert_eq!(
        call(gw.port, "/users/1", Some(&t2), &[]).await.0,
        200,
        "last good key set kept"
    );
    let m = gw.metrics().await;
    assert!(
        m.contains("hexgate_jwks_refreshes_total{result=\"success\"}"),
        "{m}"
    );
}
