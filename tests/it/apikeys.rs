//! API keys and scope checks through the real gateway: keys made by `hexgate apikey new` and
//! written by hand, every refusal reason with its metric, routes that take a JWT, a key or
//! either, the key file watched for changes (a broken file keeps the last good set), required
//! scopes from a JWT's `scope`/`scp` or a key's `scopes`, `validate` refusals, and no key ever
//! shown in the logs or /admin/config.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Request};
use http_body_util::Empty;

use crate::support::*;

/// `sha256:` and the lower-case hex SHA-256 of `key`, as the key file stores it.
pub(crate) fn key_hash(key: &str) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, key.as_bytes());
    let hex: String = d.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// `hexgate apikey new ARGS`: (the key on stdout's first line, the YAML entry after it).
/// Asserts the key shows nowhere else (the entry, stderr).
fn apikey_new(args: &[&str]) -> (String, String) {
    let out = Command::new(bin())
        .args(["apikey", "new"])
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "apikey new {args:?}: {stdout}{stderr}"
    );
    let (key, entry) = stdout
        .split_once('\n')
        .unwrap_or_else(|| panic!("apikey new {args:?}: no entry after the key: {stdout:?}"));
    let key = key.trim_end_matches('\r').to_string();
    assert!(
        (20..=256).contains(&key.len()) && key.bytes().all(|b| b.is_ascii_graphic()),
        "apikey new printed a key the gateway would call malformed (or a short one): {key:?}"
    );
    assert!(
        entry.trim_start().starts_with("- "),
        "the lines after the key are a YAML list entry: {entry:?}"
    );
    assert!(
        entry.contains(&key_hash(&key)),
        "the entry stores sha256 of the key ({}): {entry}",
        key_hash(&key)
    );
    assert!(!entry.contains(&key), "the key shows in the entry: {entry}");
    assert!(!stderr.contains(&key), "the key shows on stderr: {stderr}");
    (key, entry.to_string())
}

/// One GET with `fields`, each value given as bytes (so non-visible bytes can be sent).
pub(crate) async fn get_raw(
    port: u16,
    path: &str,
    fields: &[(&str, &[u8])],
) -> (u16, http::HeaderMap, String) {
    let mut b = Request::get(path).header("host", "localhost");
    for (name, value) in fields {
        b = b.header(*name, HeaderValue::from_bytes(value).unwrap());
    }
    request(port, b.body(Empty::<Bytes>::new()).unwrap())
        .await
        .unwrap()
}

/// One GET with an optional API key (in `header`) and an optional bearer token.
pub(crate) async fn call(
    port: u16,
    path: &str,
    header: &str,
    key: Option<&str>,
    jwt: Option<&str>,
) -> (u16, http::HeaderMap, String) {
    let bearer = jwt.map(|t| format!("Bearer {t}"));
    let mut fields: Vec<(&str, &[u8])> = Vec::new();
    if let Some(k) = key {
        fields.push((header, k.as_bytes()));
    }
    if let Some(b) = &bearer {
        fields.push(("authorization", b.as_bytes()));
    }
    get_raw(port, path, &fields).await
}

/// `hexgate_auth_failures_total{service,reason}` (0 when absent).
pub(crate) async fn auth_failures(gw: &Gateway, service: &str, reason: &str) -> u64 {
    let want = format!("hexgate_auth_failures_total{{service=\"{service}\",reason=\"{reason}\"}} ");
    gw.metrics()
        .await
        .lines()
        .find_map(|l| l.strip_prefix(&want))
        .map_or(0, |v| v.trim().parse().unwrap())
}

/// The JSON error body's `error` text.
pub(crate) fn error_text(body: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(body)
        .unwrap_or_else(|e| panic!("not a JSON error body ({e}): {body}"));
    v["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error field: {body}"))
        .to_string()
}

/// `hexgate token` signed with DIR/keys/private.pem for `sub`, with extra `--claim`s.
pub(crate) fn cli_token(dir: &Path, sub: &str, claims: &[&str]) -> String {
    let mut cmd = Command::new(bin());
    cmd.args(["token", "--key"])
        .arg(dir.join("keys/private.pem"))
        .args(["--sub", sub]);
    for c in claims {
        cmd.args(["--claim", c]);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "token: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// Asserts a 403 for a missing `orders:write` with the RFC 6750 challenge.
fn assert_insufficient_scope(what: &str, r: &(u16, http::HeaderMap, String)) {
    assert_eq!(r.0, 403, "{what}: {}", r.2);
    let challenge =
        r.1.get("www-authenticate")
            .unwrap_or_else(|| panic!("{what}: 403 without WWW-Authenticate"))
            .to_str()
            .unwrap();
    assert!(
        challenge.starts_with("Bearer ")
            && challenge.contains("error=\"insufficient_scope\"")
            && challenge.contains("scope=\"orders:write\""),
        "{what}: {challenge}"
    );
}

/// Three routes: `orders` takes a JWT or a key and requires orders:write, `catalog` takes keys
/// only, `jwtonly` has the default methods. The key file is named relative to the config.
fn products_yaml(backend: &str) -> String {
    format!(
        r#"gatewayPort: "{{port}}"
gatewayBind: 127.0.0.1
adminPort: "{{admin}}"
accessLog: true
authentication:
  enabled: true
  publicKeyPath: "{{dir}}/keys/public.pem"
apiKeys:
  file: ./apikeys.yaml
services:
  - name: orders
    path: /orders/
    backends: ["{backend}"]
    authentication: {{enabled: true, methods: [jwt, apiKey]}}
    requireScopes: ["orders:write"]
  - name: catalog
    path: /catalog/
    backends: ["{backend}"]
    authentication: {{enabled: true, methods: [apiKey]}}
  - name: jwtonly
    path: /jwtonly/
    backends: ["{backend}"]
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_jwts_scopes_and_refusals() {
    let b = TestBackend::start(Behaviour::Hello).await;
    let dir = temp_dir("apikeys");
    hexgate_keygen(&dir.join("keys"));

    // Keys from the CLI, entries appended to the file exactly as printed.
    let (acme, acme_entry) = apikey_new(&[
        "--consumer",
        "acme",
        "--plan",
        "pro",
        "--id",
        "acme-prod-1",
        "--scopes",
        "orders:read,orders:write",
    ]);
    for want in ["acme-prod-1", "acme", "pro", "orders:read", "orders:write"] {
        assert!(acme_entry.contains(want), "{want} missing: {acme_entry}");
    }
    let (beta, beta_entry) = apikey_new(&[
        "--consumer",
        "beta",
        "--expires",
        "2099-12-31",
        "--scopes",
        "orders:read",
    ]);
    assert!(beta_entry.contains("2099-12-31"), "{beta_entry}");
    assert!(!beta_entry.contains("orders:write"), "{beta_entry}");
    let (gamma, gamma_entry) = apikey_new(&["--consumer", "gamma"]);
    assert_ne!(acme, beta, "two runs, two keys");
    let no_consumer = Command::new(bin())
        .args(["apikey", "new"])
        .output()
        .unwrap();
    assert!(!no_consumer.status.success(), "--consumer is required");

    // Entries written by hand: the documented format, both forms of `expires`.
    let delta = "delta-0123456789-abcdefghijklmnop";
    let old_date = "old-date-key-0123456789abcdef";
    let old_time = "old-time-key-0123456789abcdef";
    let writer = "writer-scope-lookalike-0123456789";
    let file = format!(
        "{acme_entry}\n{beta_entry}\n{gamma_entry}\n\
         - id: delta-1\n  consumer: delta\n  hash: \"{}\"\n  expires: 2099-06-30T00:00:00Z\n  scopes: [orders:write]\n\
         - id: old-1\n  consumer: old\n  hash: \"{}\"\n  expires: 2020-01-01\n  scopes: [orders:write]\n\
         - id: old-2\n  consumer: old\n  hash: \"{}\"\n  expires: 2020-06-30T00:00:00Z\n  scopes: [orders:write]\n\
         - id: writer-1\n  consumer: writer\n  hash: \"{}\"\n  scopes: [orders:writes, orders:read]\n",
        key_hash(delta),
        key_hash(old_date),
        key_hash(old_time),
        key_hash(writer),
    );
    std::fs::write(dir.join("apikeys.yaml"), &file).unwrap();

    // The gateway runs in the test's working directory: ./apikeys.yaml is the config's.
    assert!(!Path::new("apikeys.yaml").exists());
    let gw = Gateway::start_in(dir.clone(), &products_yaml(&b.url())).await;
    let port = gw.port;
    let h = "x-api-key";
    let mut hits = 0;

    // A good key with the scope: forwarded as its consumer, the key header removed, a spoofed
    // consumer id replaced.
    let r = get_raw(
        port,
        "/orders/1",
        &[(h, acme.as_bytes()), ("x-consumer-id", b"mallory")],
    )
    .await;
    assert_eq!(r.0, 200, "{}\n{}", r.2, gw.log());
    hits += 1;
    assert_eq!(r.1["x-seen-x-consumer-id"], "acme");
    assert!(
        !r.1.contains_key("x-seen-x-api-key"),
        "the backend saw the key header"
    );
    let r = call(port, "/orders/1", h, Some(delta), None).await;
    assert_eq!(
        r.0, 200,
        "hand-written entry, RFC 3339 expiry ahead: {}",
        r.2
    );
    hits += 1;
    assert_eq!(r.1["x-seen-x-consumer-id"], "delta");

    // Good keys without orders:write: 403 with the challenge; on the key-only route with no
    // required scope, 200.
    assert_insufficient_scope(
        "beta (orders:read only)",
        &call(port, "/orders/1", h, Some(&beta), None).await,
    );
    assert_insufficient_scope(
        "gamma (no scopes)",
        &call(port, "/orders/1", h, Some(&gamma), None).await,
    );
    assert_insufficient_scope(
        "writer (look-alike scopes only)",
        &call(port, "/orders/1", h, Some(writer), None).await,
    );
    for (key, consumer) in [(&beta, "beta"), (&gamma, "gamma"), (&acme, "acme")] {
        let r = call(port, "/catalog/x", h, Some(key), None).await;
        assert_eq!(r.0, 200, "{consumer} on catalog: {}", r.2);
        hits += 1;
        assert_eq!(r.1["x-seen-x-consumer-id"], consumer);
        assert!(!r.1.contains_key("x-seen-x-api-key"));
    }

    // Unknown keys (a 256-byte one is still well-formed).
    let long_unknown = "k".repeat(256);
    for (i, key) in ["no-such-key-0123456789", long_unknown.as_str()]
        .iter()
        .enumerate()
    {
        let r = call(port, "/orders/1", h, Some(key), None).await;
        assert_eq!(r.0, 401, "unknown key {i}: {}", r.2);
        assert!(
            error_text(&r.2).contains("unknown API key"),
            "unknown key {i}: {}",
            r.2
        );
        assert_eq!(
            auth_failures(&gw, "orders", "apikey_unknown").await,
            i as u64 + 1,
            "unknown key {i}"
        );
    }
    // Expired keys: a date (midnight UTC) and an RFC 3339 time.
    for (i, key) in [old_date, old_time].iter().enumerate() {
        let r = call(port, "/orders/1", h, Some(key), None).await;
        assert_eq!(r.0, 401, "expired key {i}: {}", r.2);
        assert!(
            error_text(&r.2).contains("API key expired"),
            "expired key {i}: {}",
            r.2
        );
        assert_eq!(
            auth_failures(&gw, "orders", "apikey_expired").await,
            i as u64 + 1,
            "expired key {i}"
        );
    }
    // Malformed keys: empty, over 256 bytes, non-visible bytes inside.
    let long = "k".repeat(257);
    let malformed: [(&str, &[u8]); 4] = [
        ("empty", b""),
        ("257 bytes", long.as_bytes()),
        ("a tab inside", b"abc\tdef0123456789"),
        ("a non-ASCII byte inside", b"abc\xffdef0123456789"),
    ];
    for (i, (what, key)) in malformed.iter().enumerate() {
        let r = get_raw(port, "/orders/1", &[(h, key)]).await;
        assert_eq!(r.0, 401, "{what}: {}", r.2);
        assert_eq!(
            auth_failures(&gw, "orders", "apikey_malformed").await,
            i as u64 + 1,
            "{what}: not counted as apikey_malformed"
        );
    }
    // Neither a key nor a JWT.
    let r = call(port, "/orders/1", h, None, None).await;
    assert_eq!(r.0, 401, "{}", r.2);

    // JWTs on the [jwt, apiKey] route: `scope` (space-separated) or `scp` (array).
    let jwt_scope = cli_token(&dir, "bob", &["scope=orders:read orders:write"]);
    let jwt_scp = cli_token(&dir, "bob", &[r#"scp=["orders:write"]"#]);
    let jwt_read = cli_token(&dir, "bob", &["scope=orders:read"]);
    let jwt_lookalike = cli_token(&dir, "bob", &["scope=orders:writes orders:read"]);
    let jwt_bare = cli_token(&dir, "bob", &[]);
    for (what, t) in [("scope", &jwt_scope), ("scp", &jwt_scp)] {
        let r = call(port, "/orders/1", h, None, Some(t)).await;
        assert_eq!(r.0, 200, "JWT with {what}: {}", r.2);
        hits += 1;
        assert_eq!(r.1["x-seen-x-consumer-id"], "bob");
    }
    for (what, t) in [
        ("JWT scope orders:read", &jwt_read),
        ("JWT look-alike scope", &jwt_lookalike),
        ("JWT without scopes", &jwt_bare),
    ] {
        assert_insufficient_scope(what, &call(port, "/orders/1", h, None, Some(t)).await);
    }

    // The key-only route takes no JWT.
    let r = call(port, "/catalog/x", h, None, Some(&jwt_scope)).await;
    assert_eq!(r.0, 401, "a JWT on a route with methods [apiKey]: {}", r.2);

    // The default [jwt] route ignores the key header: no JWT is 401 whatever the key, and with
    // a JWT the consumer is the token's.
    let r = call(port, "/jwtonly/x", h, Some(&acme), None).await;
    assert_eq!(r.0, 401, "a key on a [jwt] route: {}", r.2);
    let r = call(port, "/jwtonly/x", h, Some(&acme), Some(&jwt_bare)).await;
    assert_eq!(r.0, 200, "{}", r.2);
    hits += 1;
    assert_eq!(r.1["x-seen-x-consumer-id"], "bob");
    let r = call(
        port,
        "/jwtonly/x",
        h,
        Some("no-such-key-0123456789"),
        Some(&jwt_bare),
    )
    .await;
    assert_eq!(
        r.0, 200,
        "an unknown key on a [jwt] route is ignored: {}",
        r.2
    );
    hits += 1;
    for reason in ["apikey_unknown", "apikey_expired", "apikey_malformed"] {
        assert_eq!(
            auth_failures(&gw, "jwtonly", reason).await,
            0,
            "the [jwt] route counted {reason}"
        );
    }

    assert_eq!(
        b.hits(),
        hits,
        "only authenticated requests with the scopes reached the backend"
    );

    // No key anywhere: /admin/config, the access log, the gateway log.
    let (s, cfg) = get(gw.admin_port, "/admin/config").await.unwrap();
    assert_eq!(s, 200, "{cfg}");
    tokio::time::sleep(Duration::from_millis(200)).await; // access-log lines flushed
    let stdout = gw.stdout();
    let log = gw.log();
    assert!(
        stdout.contains("/orders/1"),
        "the access log is where this test looks for leaks: {stdout}"
    );
    for (what, k) in [
        ("acme", acme.as_str()),
        ("beta", beta.as_str()),
        ("gamma", gamma.as_str()),
        ("delta", delta),
        ("expired (date)", old_date),
        ("expired (time)", old_time),
        ("writer", writer),
        ("unknown", "no-such-key-0123456789"),
        ("unknown 256", long_unknown.as_str()),
        ("malformed", "abc\tdef0123456789"),
    ] {
        assert!(
            !cfg.contains(k),
            "/admin/config shows the {what} key:\n{cfg}"
        );
        assert!(!stdout.contains(k), "the access log shows the {what} key");
        assert!(!log.contains(k), "the gateway log shows the {what} key");
    }
    assert!(
        !log.contains("def0123456789") && !stdout.contains("def0123456789"),
        "a malformed key shows in a log"
    );
}

/// Polls until the key's status on `path` is `want`, up to 3 s after the file change.
async fn until_status(gw: &Gateway, path: &str, header: &str, key: &str, want: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let (s, _, body) = call(gw.port, path, header, Some(key), None).await;
        if s == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: still {s} after 3 s (want {want}): {body}\n{}",
            gw.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A key file entry for `key`, its id and consumer `id`.
fn entry(id: &str, key: &str) -> String {
    format!(
        "- id: {id}\n  consumer: {id}\n  hash: \"{}\"\n",
        key_hash(key)
    )
}

/// A gateway with one key-only route on `backend`, its keys in DIR/keys.yaml (`first` written
/// there before start), named by an absolute path; `top` adds lines under `apiKeys`.
async fn watched_gateway(name: &str, backend: &TestBackend, top: &str, first: &str) -> Gateway {
    let dir = temp_dir(name);
    std::fs::write(dir.join("keys.yaml"), first).unwrap();
    let yaml = loopback_config(
        &format!("apiKeys:\n{top}  file: \"{{dir}}/keys.yaml\"\n"),
        &service(
            "s",
            "/",
            &[&backend.url()],
            "    authentication: {enabled: true, methods: [apiKey]}\n",
        ),
    );
    Gateway::start_in(dir, &yaml).await
}

/// A change made as soon as the gateway is up (before its watcher first looked at the file) is
/// applied like any other: a key revoked then must not keep working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_file_change_right_after_start_is_applied() {
    let b = TestBackend::start(Behaviour::Hello).await;
    let (k1, k2) = (
        "early-key-one-0123456789abcdef",
        "early-key-two-0123456789abcdef",
    );
    let gw = watched_gateway("apikeys-early", &b, "", &entry("one", k1)).await;
    assert_eq!(
        call(gw.port, "/a", "x-api-key", Some(k1), None).await.0,
        200
    );
    std::fs::write(gw.dir.join("keys.yaml"), entry("two", k2)).unwrap();
    until_status(
        &gw,
        "/a",
        "x-api-key",
        k2,
        200,
        "key added right after start",
    )
    .await;
    until_status(
        &gw,
        "/a",
        "x-api-key",
        k1,
        401,
        "key revoked right after start",
    )
    .await;
}

/// Keys appended one at a time, as a script running `hexgate apikey new … >> keys.yaml` for
/// several consumers does (the file changes for longer than one look of the watcher): every one
/// of them works afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_appended_one_at_a_time_all_start_working() {
    let b = TestBackend::start(Behaviour::Hello).await;
    let k0 = "append-key-zero-0123456789abcdef";
    let gw = watched_gateway("apikeys-append", &b, "", &entry("zero", k0)).await;
    // Past the watcher's first look at the file (see the test above for changes before it).
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(
        call(gw.port, "/a", "x-api-key", Some(k0), None).await.0,
        200
    );
    let mut added = Vec::new();
    for i in 0..7 {
        let (key, e) = apikey_new(&["--consumer", &format!("c{i}")]);
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(gw.dir.join("keys.yaml"))
            .unwrap();
        std::io::Write::write_all(&mut f, e.as_bytes()).unwrap();
        drop(f);
        added.push(key);
        tokio::time::sleep(Duration::from_millis(90)).await;
    }
    for (i, key) in added.iter().enumerate() {
        until_status(
            &gw,
            "/a",
            "x-api-key",
            key,
            200,
            &format!("appended key c{i}"),
        )
        .await;
    }
    assert_eq!(
        call(gw.port, "/a", "x-api-key", Some(k0), None).await.0,
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_key_file_is_watched_and_a_broken_one_keeps_the_last_good_set() {
    let b = TestBackend::start(Behaviour::Hello).await;
    let (k1, k2, k3) = (
        "watch-key-one-0123456789abcdef",
        "watch-key-two-0123456789abcdef",
        "watch-key-three-0123456789abcdef",
    );
    // A custom header.
    let gw = watched_gateway(
        "apikeys-watch",
        &b,
        "  header: X-Client-Key\n",
        &entry("one", k1),
    )
    .await;
    let keys = gw.dir.join("keys.yaml");
    let h = "x-client-key";
    let r = call(gw.port, "/a", h, Some(k1), None).await;
    assert_eq!(r.0, 200, "{}\n{}", r.2, gw.log());
    assert_eq!(r.1["x-seen-x-consumer-id"], "one");
    assert!(
        !r.1.contains_key("x-seen-x-client-key"),
        "the backend saw the configured key header"
    );
    assert_eq!(
        call(gw.port, "/a", "x-api-key", Some(k1), None).await.0,
        401,
        "the key in the default header when another is configured"
    );
    assert_eq!(call(gw.port, "/a", h, Some(k2), None).await.0, 401);
    // Past the watcher's first look at the file (a_key_file_change_right_after_start_is_applied
    // covers changes before it).
    tokio::time::sleep(Duration::from_millis(1200)).await;

    // Rewritten in place: two added, one removed.
    std::fs::write(&keys, entry("two", k2)).unwrap();
    until_status(&gw, "/a", h, k2, 200, "added key (in-place write)").await;
    until_status(&gw, "/a", h, k1, 401, "removed key (in-place write)").await;
    let r = call(gw.port, "/a", h, Some(k2), None).await;
    assert_eq!(r.1["x-seen-x-consumer-id"], "two");

    // Replaced by a rename (as editors and config tools do): one back, two kept.
    let replace = |text: &str| {
        let tmp = gw.dir.join("keys.yaml.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &keys).unwrap();
    };
    replace(&(entry("one", k1) + &entry("two", k2)));
    until_status(&gw, "/a", h, k1, 200, "added key (rename)").await;
    assert_eq!(call(gw.port, "/a", h, Some(k2), None).await.0, 200);

    // Broken files, each replacing the file whole (so no half-written state is seen here): the
    // last good set stays, for longer than the watch takes to notice a change.
    let broken = [
        (
            "a YAML syntax error",
            format!(
                "- id: three\n  consumer: [three\n  hash: \"{}\n",
                key_hash(k3)
            ),
        ),
        (
            "an entry without a hash (a half-written file)",
            format!("{}- id: three\n  consumer: three\n", entry("two", k2)),
        ),
        (
            "a bad hash",
            "- id: three\n  consumer: three\n  hash: \"sha256:1234\"\n".to_string(),
        ),
    ];
    for (what, text) in &broken {
        replace(text);
        let until = Instant::now() + Duration::from_millis(2500);
        while Instant::now() < until {
            for (k, name) in [(k1, "one"), (k2, "two")] {
                let r = call(gw.port, "/a", h, Some(k), None).await;
                assert_eq!(
                    r.0,
                    200,
                    "after {what}: key {name} stopped working: {}\n{}",
                    r.2,
                    gw.log()
                );
            }
            assert_eq!(call(gw.port, "/a", h, Some(k3), None).await.0, 401);
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    // And the watch still runs: a good file again.
    replace(&entry("three", k3));
    until_status(&gw, "/a", h, k3, 200, "added key after broken files").await;
    until_status(&gw, "/a", h, k1, 401, "removed key after broken files").await;
    assert_eq!(call(gw.port, "/a", h, Some(k2), None).await.0, 401);

    let log = gw.log() + &gw.stdout();
    for k in [k1, k2, k3] {
        assert!(!log.contains(k), "a log shows {k}");
    }
}

/// `hexgate validate` on DIR/config.yaml with `keys` (if any) as DIR/apikeys.yaml: (exit code,
/// stdout and stderr).
fn validate_with_keys(config: &str, keys: Option<&str>) -> (i32, String) {
    let dir = temp_dir("apikeys-validate");
    hexgate_keygen(&dir.join("keys"));
    let f = dir.join("config.yaml");
    std::fs::write(&f, config.replace("{dir}", &dir.display().to_string())).unwrap();
    if let Some(k) = keys {
        std::fs::write(dir.join("apikeys.yaml"), k).unwrap();
    }
    let out = Command::new(bin())
        .arg("validate")
        .arg(&f)
        .env_remove("HEXGATE_ADMIN_TOKEN")
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

#[test]
fn validate_refuses_bad_api_key_setups() {
    let with_keys = "gatewayPort: \"8000\"\nauthentication:\n  enabled: true\n  publicKeyPath: \"{dir}/keys/public.pem\"\napiKeys:\n  file: ./apikeys.yaml\nservices:\n  - name: orders\n    path: /orders/\n    backends: [\"http://127.0.0.1:1\"]\n    authentication: {enabled: true, methods: [jwt, apiKey]}\n    requireScopes: [\"orders:write\"]\n";
    let good = format!(
        "- id: a\n  consumer: acme\n  plan: pro\n  hash: \"{}\"\n  expires: 2099-06-30T00:00:00Z\n  scopes: [orders:read, orders:write]\n- id: b\n  consumer: beta\n  hash: \"{}\"\n  expires: 2099-06-30\n",
        key_hash("a"),
        key_hash("b")
    );
    let (code, out) = validate_with_keys(with_keys, Some(&good));
    assert_eq!(code, 0, "the documented setup validates: {out}");

    // methods [apiKey] without a top-level apiKeys.
    let no_section = "gatewayPort: \"8000\"\nservices:\n  - name: orders\n    path: /orders/\n    backends: [\"http://127.0.0.1:1\"]\n    authentication: {enabled: true, methods: [apiKey]}\n";
    let (code, out) = validate_with_keys(no_section, None);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("apiKeys"), "{out}");
    assert!(out.contains("services[0]"), "{out}");

    // Bad hashes, at their line of apikeys.yaml.
    let hex = &key_hash("c")["sha256:".len()..];
    for (what, hash, line) in [
        ("too short", "sha256:1234".to_string(), 13),
        ("no prefix", hex.to_string(), 13),
        ("another prefix", format!("md5:{hex}"), 13),
        ("not hex", format!("sha256:{}", "g".repeat(64)), 13),
        ("65 digits", format!("sha256:{hex}0"), 13),
    ] {
        let keys = format!("{good}- id: c\n  consumer: c\n  hash: \"{hash}\"\n");
        assert_eq!(
            keys.lines().nth(line - 1).unwrap().trim(),
            format!("hash: \"{hash}\"")
        );
        let (code, out) = validate_with_keys(with_keys, Some(&keys));
        assert_eq!(code, 2, "{what}: {out}");
        assert!(
            out.contains(&format!("apikeys.yaml:{line}")),
            "{what}: the bad hash's line not named: {out}"
        );
    }

    // A missing key file.
    let (code, out) = validate_with_keys(with_keys, None);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("apiKeys.file"), "{out}");
    assert!(out.contains("apikeys.yaml"), "{out}");
}
