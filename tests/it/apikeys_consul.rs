//! API keys from a Consul KV key (`apiKeys.consulKey`) through the real gateway and a real
//! `consul agent -dev`: keys fetched before serving, a revoked key refused within a second or
//! two on every instance, a broken value keeping the last good set, a missing key meaning no
//! keys, Consul down at start and coming back, reloads switching between the file and Consul
//! keys, `validate --connect` fetching and parsing the value, and no key in logs or
//! /admin/config.

use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Request};
use http_body_util::Empty;

use crate::support::*;

const KV: &str = "hexgate/apikeys";

/// `hexgate apikey new --consumer CONSUMER`: (the key, its YAML entry).
fn apikey_new(consumer: &str) -> (String, String) {
    let out = Command::new(bin())
        .args(["apikey", "new", "--consumer", consumer])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "apikey new: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let (key, entry) = stdout.split_once('\n').unwrap();
    (key.trim().to_string(), entry.to_string())
}

/// One GET on `path` with `key` in X-Api-Key: (status, response headers, body).
async fn call(port: u16, path: &str, key: &str) -> (u16, http::HeaderMap, String) {
    let req = Request::get(path)
        .header("host", "localhost")
        .header("x-api-key", HeaderValue::from_str(key).unwrap())
        .body(Empty::<Bytes>::new())
        .unwrap();
    request(port, req).await.unwrap()
}

/// Polls until `key` gets `status` on `gw`, returning how long it took (bounded by `limit`).
async fn until_status(
    gw: &Gateway,
    key: &str,
    status: u16,
    limit: Duration,
    what: &str,
) -> Duration {
    let t = Instant::now();
    loop {
        let got = call(gw.port, "/a", key).await.0;
        if got == status {
            return t.elapsed();
        }
        assert!(
            t.elapsed() < limit,
            "{what}: still {got}, not {status}, after {limit:?}; log:\n{}",
            gw.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls until the gateway's log contains `text`.
async fn until_logged(gw: &Gateway, text: &str, limit: Duration) {
    let t = Instant::now();
    while !gw.log().contains(text) {
        assert!(
            t.elapsed() < limit,
            "{text:?} not logged within {limit:?}; log:\n{}",
            gw.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `hexgate_auth_failures_total{service="s",reason}` (0 when absent).
async fn auth_failures(gw: &Gateway, reason: &str) -> u64 {
    let want = format!("hexgate_auth_failures_total{{service=\"s\",reason=\"{reason}\"}} ");
    gw.metrics()
        .await
        .lines()
        .find_map(|l| l.strip_prefix(&want))
        .map_or(0, |v| v.trim().parse().unwrap())
}

/// Writes the key list at `key` in Consul KV.
fn put(consul: &ConsulAgent, key: &str, value: &str) {
    let (code, body) = consul.http("PUT", &format!("/v1/kv/{key}"), Some(value));
    assert_eq!(code, 200, "PUT {key}: {body}");
}

/// A config with one key-only route on `backend`; `keys` are the lines under `apiKeys`.
fn yaml(backend: &TestBackend, keys: &str) -> String {
    loopback_config(
        &format!("apiKeys:\n{keys}"),
        &service(
            "s",
            "/",
            &[&backend.url()],
            "    authentication: {enabled: true, methods: [apiKey]}\n",
        ),
    )
}

async fn start(consul: &ConsulAgent, name: &str, backend: &TestBackend, keys: &str) -> Gateway {
    Gateway::start_with(
        temp_dir(name),
        &yaml(backend, keys),
        &[("CONSUL_HTTP_ADDR", &consul.addr())],
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_in_consul_are_live_on_every_instance() {
    let consul = ConsulAgent::start();
    let b = TestBackend::start(Behaviour::Hello).await;
    let (acme, acme_entry) = apikey_new("acme");
    let (beta, beta_entry) = apikey_new("beta");
    put(&consul, KV, &format!("{acme_entry}{beta_entry}"));
    let consul_key = format!("  consulKey: {KV}\n");
    let one = start(&consul, "akc-one", &b, &consul_key).await;
    let two = start(&consul, "akc-two", &b, &consul_key).await;

    // Fetched before serving: the very first request is accepted, as its consumer, and the key
    // header does not go upstream.
    for gw in [&one, &two] {
        let r = call(gw.port, "/a", &acme).await;
        assert_eq!(r.0, 200, "{}\n{}", r.2, gw.log());
        assert_eq!(r.1["x-seen-x-consumer-id"], "acme");
        assert!(
            !r.1.contains_key("x-seen-x-api-key"),
            "the backend saw the key header"
        );
        assert_eq!(
            call(gw.port, "/a", &beta).await.1["x-seen-x-consumer-id"],
            "beta"
        );
        assert_eq!(call(gw.port, "/a", "hgk_not-a-key-0123456789").await.0, 401);
    }

    // beta revoked: refused on both instances within a second or two.
    put(&consul, KV, &acme_entry);
    let t = Instant::now();
    for gw in [&one, &two] {
        until_status(
            gw,
            &beta,
            401,
            Duration::from_secs(2),
            "revoked key on an instance",
        )
        .await;
    }
    eprintln!(
        "apikeys from Consul: revoked key refused on both instances after {:?}",
        t.elapsed()
    );
    assert!(auth_failures(&one, "apikey_unknown").await >= 2);
    assert_eq!(call(one.port, "/a", &acme).await.0, 200);

    // A broken value: logged at its line, the last good set stays.
    put(
        &consul,
        KV,
        &format!("{acme_entry}- id: broken\n  consumer: x\n  hash: \"sha256:nope\"\n"),
    );
    for gw in [&one, &two] {
        until_logged(gw, &format!("consul:{KV}:6"), Duration::from_secs(3)).await;
        assert!(
            gw.log().contains("keeping the last good keys"),
            "{}",
            gw.log()
        );
        assert_eq!(
            call(gw.port, "/a", &acme).await.0,
            200,
            "last good set kept"
        );
        assert_eq!(call(gw.port, "/a", &beta).await.0, 401);
    }

    // beta back, then the key deleted: no keys at all (logged once), then back again.
    put(&consul, KV, &format!("{acme_entry}{beta_entry}"));
    until_status(&one, &beta, 200, Duration::from_secs(2), "re-added key").await;
    let (code, _) = consul.http("DELETE", &format!("/v1/kv/{KV}"), None);
    assert_eq!(code, 200);
    until_status(&one, &acme, 401, Duration::from_secs(2), "key list deleted").await;
    until_status(&two, &acme, 401, Duration::from_secs(2), "key list deleted").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        one.log().matches("does not exist in Consul").count(),
        1,
        "{}",
        one.log()
    );
    put(&consul, KV, &acme_entry);
    until_status(&one, &acme, 200, Duration::from_secs(2), "key list back").await;

    // No key in the logs; /admin/config shows the setting, not the keys.
    let shown = get(one.admin_port, "/admin/config").await.unwrap().1;
    assert!(shown.contains(KV), "{shown}");
    for gw in [&one, &two] {
        for k in [&acme, &beta] {
            assert!(
                !gw.log().contains(k.as_str()),
                "a key in the log:\n{}",
                gw.log()
            );
            assert!(
                !shown.contains(k.as_str()),
                "a key in /admin/config: {shown}"
            );
        }
    }
    assert!(
        !shown.contains("sha256:"),
        "key material in /admin/config: {shown}"
    );
}

/// Consul down at start: the gateway serves without keys (every key refused as unknown) after a
/// few seconds at most, and takes the keys in once Consul answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consul_down_at_start_means_no_keys_until_it_answers() {
    let mut consul = ConsulAgent::start();
    consul.kill();
    let b = TestBackend::start(Behaviour::Hello).await;
    let (key, entry) = apikey_new("acme");
    let t = Instant::now();
    let gw = start(&consul, "akc-down", &b, &format!("  consulKey: {KV}\n")).await;
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "started after {:?}",
        t.elapsed()
    );
    let r = call(gw.port, "/a", &key).await;
    assert_eq!(r.0, 401, "{}", r.2);
    assert_eq!(auth_failures(&gw, "apikey_unknown").await, 1);
    assert!(
        gw.log().contains("apiKeys.consulKey failed"),
        "{}",
        gw.log()
    );

    tokio::task::block_in_place(|| consul.restart());
    put(&consul, KV, &entry);
    // The watcher backs off at most 10 s between tries.
    let took = until_status(
        &gw,
        &key,
        200,
        Duration::from_secs(15),
        "keys once Consul answers",
    )
    .await;
    eprintln!("apikeys from Consul: keys in {took:?} after Consul came back");
    assert!(gw.log().contains("Consul answers again"), "{}", gw.log());
}

/// Reloads follow the source: a file, then a Consul key, then another Consul key, then the file
/// again; each switch is live without a restart, and Consul changes keep being followed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_switch_between_the_file_and_consul_keys() {
    let consul = ConsulAgent::start();
    let b = TestBackend::start(Behaviour::Hello).await;
    let (file_key, file_entry) = apikey_new("from-file");
    let (c1_key, c1_entry) = apikey_new("from-consul-1");
    let (c2_key, c2_entry) = apikey_new("from-consul-2");
    put(&consul, "keys/one", &c1_entry);
    put(&consul, "keys/two", &c2_entry);
    let dir = temp_dir("akc-switch");
    std::fs::write(dir.join("keys.yaml"), &file_entry).unwrap();
    let with_file = yaml(&b, "  file: \"{dir}/keys.yaml\"\n");
    let gw = Gateway::start_with(dir, &with_file, &[("CONSUL_HTTP_ADDR", &consul.addr())]).await;
    assert_eq!(call(gw.port, "/a", &file_key).await.0, 200);

    gw.rewrite_config(&yaml(&b, "  consulKey: keys/one\n"));
    until_status(
        &gw,
        &c1_key,
        200,
        Duration::from_secs(5),
        "file -> keys/one",
    )
    .await;
    assert_eq!(call(gw.port, "/a", &file_key).await.0, 401);
    // Followed after the switch: a change in Consul is live.
    put(&consul, "keys/one", &format!("{c1_entry}{c2_entry}"));
    until_status(
        &gw,
        &c2_key,
        200,
        Duration::from_secs(2),
        "change after a switch",
    )
    .await;

    gw.rewrite_config(&yaml(&b, "  consulKey: keys/two\n"));
    until_status(
        &gw,
        &c1_key,
        401,
        Duration::from_secs(5),
        "keys/one -> keys/two",
    )
    .await;
    // A new Consul key starts with no keys until the watcher's first answer: a moment.
    until_status(
        &gw,
        &c2_key,
        200,
        Duration::from_secs(1),
        "keys/two fetched after the switch",
    )
    .await;
    // The old key is no longer followed; the new one is.
    put(&consul, "keys/one", &file_entry);
    put(&consul, "keys/two", &c1_entry);
    until_status(
        &gw,
        &c1_key,
        200,
        Duration::from_secs(2),
        "keys/two changed",
    )
    .await;
    assert_eq!(call(gw.port, "/a", &file_key).await.0, 401);

    // Any other reload that keeps the key keeps the keys the watcher installed.
    gw.rewrite_config(&format!(
        "accessLog: true\n{}",
        yaml(&b, "  consulKey: keys/two\n")
    ));
    gw.wait_reloads(4).await;
    assert_eq!(call(gw.port, "/a", &c1_key).await.0, 200);

    gw.rewrite_config(&with_file);
    until_status(
        &gw,
        &file_key,
        200,
        Duration::from_secs(5),
        "keys/two -> file",
    )
    .await;
    assert_eq!(call(gw.port, "/a", &c1_key).await.0, 401);
}

#[test]
fn validate_connect_fetches_and_parses_the_key_list() {
    let consul = ConsulAgent::start();
    let (_, entry) = apikey_new("acme");
    let (_, entry2) = apikey_new("beta");
    put(&consul, KV, &format!("{entry}{entry2}"));
    let dir = temp_dir("akc-validate");
    let f = dir.join("config.yaml");
    let validate = |key: &str| {
        std::fs::write(
            &f,
            format!(
                "apiKeys:\n  consulKey: {key}\nservices:\n  - name: s\n    path: /\n    backends: [\"http://127.0.0.1:9\"]\n    authentication: {{enabled: true, methods: [apiKey]}}\n"
            ),
        )
        .unwrap();
        let (code, out, err) = hexgate_cli(
            &consul.addr(),
            &["validate", "--connect", f.to_str().unwrap()],
        );
        (code, format!("{out}{err}"))
    };
    let (code, out) = validate(KV);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(&format!(
            "Consul key {KV} (apiKeys.consulKey): OK: 2 API key(s)"
        )),
        "{out}"
    );

    put(
        &consul,
        KV,
        &format!("{entry}- id: broken\n  consumer: x\n"),
    );
    let (code, out) = validate(KV);
    assert_ne!(code, 0, "{out}");
    assert!(
        out.contains(&format!("Consul key {KV} (apiKeys.consulKey): FAILED"))
            && out.contains(&format!("consul:{KV}:4: [1].hash: required")),
        "{out}"
    );

    let (code, out) = validate("hexgate/missing");
    assert_ne!(code, 0, "{out}");
    assert!(
        out.contains(
            "Consul key hexgate/missing (apiKeys.consulKey): FAILED: the key does not exist"
        ),
        "{out}"
    );

    // Offline, the value is not looked at: validate passes without Consul.
    std::fs::write(
        &f,
        format!("apiKeys:\n  consulKey: {KV}\nservices:\n  - name: s\n    path: /\n    backends: [\"http://127.0.0.1:9\"]\n    authentication: {{enabled: true, methods: [apiKey]}}\n"),
    )
    .unwrap();
    let (code, out, err) = hexgate_cli("http://127.0.0.1:1", &["validate", f.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("not read offline"), "{out}");
    let _ = std::fs::remove_dir_all(&dir);
}
