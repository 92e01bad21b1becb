//! The quota ledger on the admin port, through real gateways and real Redis: reads that match
//! the traffic exactly, credits and resets under concurrent load across two instances sharing
//! one Redis, a three-master cluster, the memory store answering as Redis does, the audit log
//! and counter, refusals with reasons, and no key anywhere in its output.

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Empty;
use serde_json::Value;

use crate::apikeys::{call, key_hash};
use crate::daemons::{RedisCluster, RedisServer};
use crate::support::*;

const H: &str = "x-api-key";
const KEY: &str = "bob-ledger-key-0123456789abcdef";
const TOKEN: &str = "ledger-admin-token-0123456789";

/// Plan `free` (20 per hour) for bob's key; `api` applies it, `orders` applies it and has its
/// own quota of 50 per hour per consumer.
fn ledger_yaml(backend: &str, store: &str) -> String {
    format!(
        r#"gatewayPort: "{{port}}"
gatewayBind: 127.0.0.1
adminPort: "{{admin}}"
adminToken: {TOKEN}
{store}authentication:
  enabled: false
apiKeys:
  file: ./apikeys.yaml
plans:
  free: {{quota: {{limit: 20, period: 1h}}}}
services:
  - name: api
    path: /api/
    backends: ["{backend}"]
    authentication: {{enabled: true, methods: [apiKey]}}
  - name: orders
    path: /orders/
    backends: ["{backend}"]
    authentication: {{enabled: true, methods: [apiKey]}}
    quota: {{enabled: true, limit: 50, period: 1h}}
"#
    )
}

async fn start(yaml: &str) -> Gateway {
    let dir = temp_dir("ledger");
    std::fs::write(
        dir.join("apikeys.yaml"),
        format!(
            "- id: bob-1\n  consumer: bob\n  plan: free\n  hash: \"{}\"\n",
            key_hash(KEY)
        ),
    )
    .unwrap();
    Gateway::start_in(dir, yaml).await
}

/// One admin request: (status, body as JSON, raw body).
async fn admin(
    gw: &Gateway,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> (u16, Value, String) {
    let mut b = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost");
    if let Some(t) = token {
        b = b.header("authorization", format!("Bearer {t}"));
    }
    let (status, _, body) = request(gw.admin_port, b.body(Empty::<Bytes>::new()).unwrap())
        .await
        .unwrap();
    let json = serde_json::from_str(&body).unwrap_or(Value::Null);
    (status, json, body)
}

/// bob's counter in `scope` from GET /admin/quotas.
async fn counter(gw: &Gateway, scope: &str) -> Value {
    let (status, v, body) = admin(gw, "GET", "/admin/quotas?consumer=bob", Some(TOKEN)).await;
    assert_eq!(status, 200, "{body}");
    assert!(!body.contains(KEY), "a key in the ledger: {body}");
    v["quotas"]
        .as_array()
        .unwrap_or_else(|| panic!("no quotas: {body}"))
        .iter()
        .find(|q| q["scope"] == scope)
        .cloned()
        .unwrap_or_else(|| panic!("no {scope} counter: {body}"))
}

fn num(v: &Value, field: &str) -> i64 {
    v[field]
        .as_i64()
        .unwrap_or_else(|| panic!("{field} is not a number: {v}"))
}

/// `n` calls by bob to `path`, spread over `gws` in turn, from `tasks` concurrent tasks: how many
/// were answered 200 (every other answer must be 429).
async fn load(gws: &[&Gateway], path: &'static str, n: usize, tasks: usize) -> usize {
    let ports: Vec<u16> = gws.iter().map(|g| g.port).collect();
    let mut handles = Vec::new();
    for t in 0..tasks {
        let ports = ports.clone();
        handles.push(tokio::spawn(async move {
            let mut ok = 0;
            for i in (t..n).step_by(tasks) {
                let (code, _, body) = call(ports[i % ports.len()], path, H, Some(KEY), None).await;
                assert!(code == 200 || code == 429, "{code}: {body}");
                ok += usize::from(code == 200);
            }
            ok
        }));
    }
    let mut ok = 0;
    for h in handles {
        ok += h.await.unwrap();
    }
    ok
}

/// The ledger's fields but the clock-dependent one.
fn without_reset(mut v: Value) -> Value {
    if let Some(o) = v.as_object_mut() {
        o.remove("resetSeconds");
    }
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ledger_matches_traffic_and_corrects_it_under_load_across_two_instances() {
    let redis = RedisServer::start();
    let b = TestBackend::start(Behaviour::Hello).await;
    let store = format!(
        "redis:\n  address: 127.0.0.1:{}\n  timeout: 2s\n",
        redis.port
    );
    let a = start(&ledger_yaml(&b.url(), &store)).await;
    let c = start(&ledger_yaml(&b.url(), &store)).await;

    // Reads match the traffic exactly, on both instances.
    assert_eq!(load(&[&a, &c], "/api/x", 7, 1).await, 7);
    assert_eq!(load(&[&a, &c], "/orders/x", 2, 1).await, 2);
    let plan = counter(&a, "plan").await;
    assert_eq!(plan["plan"], "free", "{plan}");
    assert_eq!(
        (
            num(&plan, "limit"),
            num(&plan, "used"),
            num(&plan, "remaining")
        ),
        (20, 9, 11),
        "{plan}"
    );
    assert!((1..=3660).contains(&num(&plan, "resetSeconds")), "{plan}");
    assert_eq!(num(&plan, "periodSeconds"), 3600);
    let orders = counter(&a, "orders").await;
    assert_eq!(
        (
            num(&orders, "limit"),
            num(&orders, "used"),
            num(&orders, "remaining")
        ),
        (50, 2, 48),
        "{orders}"
    );
    assert_eq!(
        without_reset(counter(&c, "plan").await),
        without_reset(plan)
    );

    // A credit of 10 on one instance while four tasks hammer both: exactly limit + 10 requests
    // pass in all (the 9 before, then until the quota refuses for good).
    let hammer = tokio::spawn({
        let (pa, pc) = (a.port, c.port);
        async move {
            let gws = [pa, pc];
            let mut ok = 0;
            for i in 0..40 {
                let (code, _, _) = call(gws[i % 2], "/api/x", H, Some(KEY), None).await;
                ok += usize::from(code == 200);
            }
            ok
        }
    });
    let during = load(&[&a, &c], "/api/x", 20, 3).await;
    let (status, v, body) = admin(
        &c,
        "POST",
        "/admin/quotas/credit?consumer=bob&scope=plan&amount=10",
        Some(TOKEN),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(v["credited"], 10, "{body}");
    let during = during + hammer.await.unwrap();
    let after = load(&[&a, &c], "/api/x", 20, 2).await;
    assert_eq!(
        9 + during + after,
        30,
        "limit 20 plus a credit of 10, across both instances"
    );
    let plan = counter(&a, "plan").await;
    assert_eq!(
        (
            num(&plan, "used"),
            num(&plan, "credit"),
            num(&plan, "remaining")
        ),
        (30, 10, 0),
        "{plan}"
    );
    // Credits are capped per window; a refused credit changes nothing.
    let (status, _, body) = admin(
        &c,
        "POST",
        "/admin/quotas/credit?consumer=bob&scope=plan&amount=1000000000",
        Some(TOKEN),
    )
    .await;
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("at most 1000000000"), "{body}");
    assert_eq!(num(&counter(&a, "plan").await, "credit"), 10);

    // A reset while load runs: every request that passed after it is counted, and nothing else
    // (the quota was spent, so none passed before it).
    assert_eq!(load(&[&a, &c], "/api/x", 4, 2).await, 0, "spent");
    let runner = tokio::spawn({
        let (pa, pc) = (a.port, c.port);
        async move {
            let mut ok = 0;
            for i in 0..60 {
                let (code, _, _) = call([pa, pc][i % 2], "/api/x", H, Some(KEY), None).await;
                ok += usize::from(code == 200);
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
            ok
        }
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    let (status, v, body) = admin(
        &a,
        "DELETE",
        "/admin/quotas?consumer=bob&scope=plan",
        Some(TOKEN),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(v["reset"], serde_json::json!(["plan"]), "{body}");
    let passed = runner.await.unwrap();
    assert!(
        passed > 0 && passed <= 20,
        "{passed} passed after the reset"
    );
    assert_eq!(num(&counter(&c, "plan").await, "used"), passed as i64);
    assert_eq!(
        num(&counter(&c, "orders").await, "used"),
        2,
        "the reset was for the plan only"
    );

    // Audited with who asked (the admin token, never the token itself, and the peer), and
    // counted.
    let log_a = a.log();
    let log_c = c.log();
    assert!(
        log_a.contains("quota reset") && log_a.contains("by=\"admin token from 127.0.0.1\""),
        "{log_a}"
    );
    assert!(
        log_c.contains("quota credited") && log_c.contains("amount=10"),
        "{log_c}"
    );
    for log in [&log_a, &log_c] {
        assert!(
            !log.contains(TOKEN) && !log.contains(KEY),
            "a secret in the log"
        );
    }
    let m = admin(&c, "GET", "/metrics", Some(TOKEN)).await.2;
    assert!(
        m.contains("hexgate_quota_ledger_changes_total{action=\"credit\"} 1"),
        "{m}"
    );
    let m = admin(&a, "GET", "/metrics", Some(TOKEN)).await.2;
    assert!(
        m.contains("hexgate_quota_ledger_changes_total{action=\"reset\"} 1"),
        "{m}"
    );

    // Refusals, each with its reason.
    for (method, path, token, want, reason) in [
        (
            "GET",
            "/admin/quotas?consumer=bob",
            None,
            401,
            "admin token required",
        ),
        (
            "GET",
            "/admin/quotas",
            Some(TOKEN),
            400,
            "consumer parameter is required",
        ),
        (
            "GET",
            "/admin/quotas?consumer=bob&scope=nope",
            Some(TOKEN),
            404,
            "no quota in scope",
        ),
        (
            "GET",
            "/admin/quotas?consumer=%ff",
            Some(TOKEN),
            400,
            "is not UTF-8",
        ),
        (
            "DELETE",
            "/admin/quotas?consumer=bob&scope=plan&plan=nosuch",
            Some(TOKEN),
            404,
            "no counter of plan",
        ),
        (
            "GET",
            "/admin/quotas?consumer=bob&bogus=1",
            Some(TOKEN),
            400,
            "unknown parameter",
        ),
        (
            "POST",
            "/admin/quotas/credit?consumer=bob&scope=plan&amount=0",
            Some(TOKEN),
            400,
            "amount must be",
        ),
        (
            "POST",
            "/admin/quotas/credit?consumer=bob&scope=plan&amount=x",
            Some(TOKEN),
            400,
            "amount must be",
        ),
        (
            "POST",
            "/admin/quotas/credit?consumer=bob&amount=1",
            Some(TOKEN),
            400,
            "scope parameter is required",
        ),
        (
            "PUT",
            "/admin/quotas?consumer=bob",
            Some(TOKEN),
            405,
            "GET or DELETE",
        ),
        (
            "POST",
            "/admin/quotas?consumer=bob",
            Some(TOKEN),
            405,
            "GET or DELETE",
        ),
    ] {
        let (status, _, body) = admin(&a, method, path, token).await;
        assert_eq!(status, want, "{method} {path}: {body}");
        assert!(body.contains(reason), "{method} {path}: {body}");
    }
    let (_, _, shown) = admin(&a, "GET", "/admin/config", Some(TOKEN)).await;
    assert!(!shown.contains(KEY) && !shown.contains(TOKEN), "{shown}");
}

/// The same small sequence (3 calls, read, credit 2, calls until refused, reset, read) on a
/// gateway: the ledger's answers, clock-dependent fields removed.
async fn sequence(gw: &Gateway) -> Vec<Value> {
    let mut out = Vec::new();
    assert_eq!(load(&[gw], "/api/x", 3, 1).await, 3);
    out.push(without_reset(counter(gw, "plan").await));
    let (status, v, body) = admin(
        gw,
        "POST",
        "/admin/quotas/credit?consumer=bob&scope=plan&amount=2",
        Some(TOKEN),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    out.push(without_reset(v["quota"].clone()));
    assert_eq!(
        load(&[gw], "/api/x", 30, 1).await,
        19,
        "17 left of 20, plus the credit of 2"
    );
    out.push(without_reset(counter(gw, "plan").await));
    let (status, _, body) = admin(gw, "DELETE", "/admin/quotas?consumer=bob", Some(TOKEN)).await;
    assert_eq!(status, 200, "{body}");
    out.push(without_reset(counter(gw, "plan").await));
    out.push(without_reset(counter(gw, "orders").await));
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ledger_answers_alike_in_memory_and_in_a_redis_cluster() {
    let b = TestBackend::start(Behaviour::Hello).await;
    let memory = start(&ledger_yaml(&b.url(), "")).await;
    let in_memory = sequence(&memory).await;
    assert_eq!(in_memory[0]["used"], 3, "{:?}", in_memory);
    assert_eq!(in_memory[1]["remaining"], 19, "{:?}", in_memory);
    assert_eq!(in_memory[3]["used"], 0, "reset: {:?}", in_memory);

    let cluster = RedisCluster::start();
    let gw = start(&ledger_yaml(&b.url(), &cluster.config())).await;
    // Requests made before the cluster connection is up fail open into memory: wait until the
    // ledger (which reads the cluster) answers.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while admin(&gw, "GET", "/admin/quotas?consumer=warm", Some(TOKEN))
        .await
        .0
        != 200
    {
        assert!(
            std::time::Instant::now() < deadline,
            "cluster never answered: {}",
            gw.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let in_cluster = sequence(&gw).await;
    assert_eq!(
        in_memory, in_cluster,
        "memory and the cluster answered differently"
    );
}
