//! Consumer plans through the real gateway and a real redis-server: the plan from an API key,
//! from the JWT's `planClaim`, the default plan, unknown and missing plans (403, counted), two
//! plans side by side, a consumer moved to another plan keeping its count, routes opting out,
//! and a route's own quota applied beside the plan's; the same traffic decided by the memory
//! store and by Redis gives the same answers.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::apikeys::{auth_failures, call, cli_token, error_text, key_hash};
use crate::daemons::RedisServer;
use crate::support::*;

const H: &str = "x-api-key";
pub(crate) const ACME: &str = "acme-pro-key-0123456789abcdef";
pub(crate) const BOB: &str = "bob-free-key-0123456789abcdef";
const GHOST: &str = "ghost-gold-key-0123456789abcdef";

/// The key file: acme on pro, bob on `bob_plan`.
pub(crate) fn key_file(bob_plan: &str) -> String {
    format!(
        "- id: acme-1\n  consumer: acme\n  plan: pro\n  hash: \"{}\"\n  scopes: [orders:write]\n\
         - id: bob-1\n  consumer: bob\n  plan: {bob_plan}\n  hash: \"{}\"\n",
        key_hash(ACME),
        key_hash(BOB),
    )
}

/// A key file with ghost's key on a plan that does not exist (its entry at line 10).
fn key_file_with_ghost() -> String {
    format!(
        "{}- id: ghost-1\n  consumer: ghost\n  plan: gold\n  hash: \"{}\"\n",
        key_file("free"),
        key_hash(GHOST)
    )
}

/// Plans `free` (3 per hour), `free2` (5 per hour: the same period) and `pro` (1000 per hour
/// and a rate limit); routes: `api` (plans), `open` (`plans: false`), `orders` (plans and its
/// own quota of 4 per hour per consumer, scope orders:write).
pub(crate) fn plans_yaml(backend: &str, store: &str) -> String {
    format!(
        r#"gatewayPort: "{{port}}"
gatewayBind: 127.0.0.1
adminPort: "{{admin}}"
{store}authentication:
  enabled: true
  publicKeyPath: "{{dir}}/keys/public.pem"
  planClaim: plan
  defaultPlan: free
apiKeys:
  file: ./apikeys.yaml
plans:
  free: {{quota: {{limit: 3, period: 1h}}}}
  free2: {{quota: {{limit: 5, period: 1h}}}}
  pro: {{rateLimiting: {{ratePerSecond: 1000, burst: 1000}}, quota: {{limit: 1000, period: 1h}}}}
services:
  - name: api
    path: /api/
    backends: ["{backend}"]
    authentication: {{enabled: true, methods: [jwt, apiKey]}}
  - name: open
    path: /open/
    backends: ["{backend}"]
    authentication: {{enabled: true, methods: [jwt, apiKey]}}
    plans: false
  - name: orders
    path: /orders/
    backends: ["{backend}"]
    authentication: {{enabled: true, methods: [jwt, apiKey]}}
    requireScopes: ["orders:write"]
    quota: {{enabled: true, limit: 4, period: 1h}}
"#
    )
}

/// Starts a gateway in a fresh directory with keys, the key file and `yaml`.
pub(crate) async fn start(yaml: &str, keys_from: Option<&Path>) -> Gateway {
    let dir = temp_dir("plans");
    match keys_from {
        Some(k) => {
            std::fs::create_dir_all(dir.join("keys")).unwrap();
            for f in ["public.pem", "private.pem"] {
                std::fs::copy(k.join(f), dir.join("keys").join(f)).unwrap();
            }
        }
        None => hexgate_keygen(&dir.join("keys")),
    }
    std::fs::write(dir.join("apikeys.yaml"), key_file("free")).unwrap();
    Gateway::start_in(dir, yaml).await
}

/// The status codes of `n` calls with `key` / `jwt` to `path`.
async fn codes(
    gw: &Gateway,
    path: &str,
    key: Option<&str>,
    jwt: Option<&str>,
    n: usize,
) -> Vec<u16> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(call(gw.port, path, H, key, jwt).await.0);
    }
    out
}

/// `hexgate_ratelimit_decisions_total{service,limit,result}` (0 when absent).
async fn decisions(gw: &Gateway, service: &str, limit: &str, result: &str) -> u64 {
    let want = format!("service=\"{service}\",limit=\"{limit}\",result=\"{result}\"}} ");
    gw.metrics()
        .await
        .lines()
        .filter(|l| l.starts_with("hexgate_ratelimit_decisions_total{"))
        .find_map(|l| l.split_once(&want).map(|(_, v)| v.trim().parse().unwrap()))
        .unwrap_or(0)
}

/// Everything the plans do, run on `store` (memory or Redis): the transcript of status codes,
/// compared across stores by the caller.
async fn scenario(gw: &Gateway) -> Vec<(String, Vec<u16>)> {
    let dir = &gw.dir;
    let mut log = Vec::new();
    let jwt_pro = cli_token(dir, "carol", &["plan=pro"]);
    let jwt_none = cli_token(dir, "dave", &[]);
    let jwt_gold = cli_token(dir, "erin", &["plan=gold"]);
    let jwt_num = cli_token(dir, "frank", &["plan=7"]);

    // Two plans side by side: bob (free, 3) is refused at his quota while acme (pro) goes on.
    let bob = codes(gw, "/api/x", Some(BOB), None, 5).await;
    assert_eq!(bob, [200, 200, 200, 429, 429], "bob on free");
    let acme = codes(gw, "/api/x", Some(ACME), None, 5).await;
    assert_eq!(acme, [200; 5], "acme on pro, beside bob");
    log.push(("bob free".into(), bob));
    log.push(("acme pro".into(), acme));
    let r = call(gw.port, "/api/x", H, Some(BOB), None).await;
    assert_eq!(r.0, 429);
    assert!(r.1.contains_key("retry-after"), "{:?}", r.1);
    let fields = r.1["ratelimit"].to_str().unwrap();
    assert!(fields.contains("\"plan-quota\";r=0"), "{fields}");
    let policy = r.1["ratelimit-policy"].to_str().unwrap();
    assert!(policy.contains("\"plan-quota\";q=3;w=3600"), "{policy}");

    // The plan from the JWT claim, and the default plan for a token naming none.
    let carol = codes(gw, "/api/x", None, Some(&jwt_pro), 5).await;
    assert_eq!(carol, [200; 5], "carol's token names pro");
    let dave = codes(gw, "/api/x", None, Some(&jwt_none), 4).await;
    assert_eq!(
        dave,
        [200, 200, 200, 429],
        "dave has the default plan, free"
    );
    log.push(("carol pro".into(), carol));
    log.push(("dave default".into(), dave));

    // A key file naming a plan that is not configured is refused (logged at its line) and the
    // last good keys stay: ghost's key never works, bob's still does.
    std::fs::write(dir.join("apikeys.yaml"), key_file_with_ghost()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !gw
        .log()
        .contains("names plan \"gold\", which is not in plans")
    {
        assert!(
            Instant::now() < deadline,
            "key file not refused: {}",
            gw.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(gw.log().contains("apikeys.yaml:10: plan:"), "{}", gw.log());
    assert_eq!(call(gw.port, "/open/x", H, Some(GHOST), None).await.0, 401);
    assert_eq!(call(gw.port, "/open/x", H, Some(ACME), None).await.0, 200);
    std::fs::write(dir.join("apikeys.yaml"), key_file("free")).unwrap();

    // Unknown plans from a claim (a number is no plan name, and no plan is named "<7>"): 403
    // with the reason, counted; the backend never sees them. An empty claim names no plan.
    let jwt_empty = cli_token(dir, "gus", &["plan="]);
    assert_eq!(
        call(gw.port, "/api/x", H, None, Some(&jwt_empty)).await.0,
        200,
        "default plan"
    );
    for (what, key, jwt, n) in [
        ("erin (claim names gold)", None, Some(jwt_gold.as_str()), 1),
        ("frank (claim is 7)", None, Some(jwt_num.as_str()), 2),
    ] {
        let r = call(gw.port, "/api/x", H, key, jwt).await;
        assert_eq!(r.0, 403, "{what}: {}", r.2);
        assert!(error_text(&r.2).contains("unknown plan"), "{what}: {}", r.2);
        assert_eq!(auth_failures(gw, "api", "plan_unknown").await, n, "{what}");
        log.push((what.into(), vec![r.0]));
    }

    // A route that opts out: bob, refused on /api/, passes here, and erin's plan is not read.
    let open = codes(gw, "/open/x", Some(BOB), None, 4).await;
    assert_eq!(open, [200; 4], "plans: false");
    assert_eq!(
        call(gw.port, "/open/x", H, None, Some(&jwt_gold)).await.0,
        200
    );
    log.push(("open".into(), open));

    // The route's own quota (4 per consumer) applies beside acme's plan; a refusal by the route
    // quota gives back the plan's slot.
    let orders = codes(gw, "/orders/x", Some(ACME), None, 6).await;
    assert_eq!(
        orders,
        [200, 200, 200, 200, 429, 429],
        "orders quota beside pro"
    );
    log.push(("acme orders".into(), orders));
    let r = call(gw.port, "/orders/x", H, Some(ACME), None).await;
    let policy = r.1["ratelimit-policy"].to_str().unwrap();
    assert!(
        policy.contains("\"quota\";q=4;w=3600") && policy.contains("\"plan-quota\";q=1000"),
        "{policy}"
    );
    assert!(decisions(gw, "api", "plan_quota", "limited").await >= 3);
    assert!(decisions(gw, "orders", "quota", "limited").await >= 2);

    // Scopes from both claim forms on the scoped route.
    let scope = cli_token(dir, "gina", &["plan=pro", "scope=orders:read orders:write"]);
    let scp = cli_token(dir, "hank", &["plan=pro", r#"scp=["orders:write"]"#]);
    let none = cli_token(dir, "ivan", &["plan=pro", "scope=orders:read"]);
    let s = vec![
        call(gw.port, "/orders/x", H, None, Some(&scope)).await.0,
        call(gw.port, "/orders/x", H, None, Some(&scp)).await.0,
        call(gw.port, "/orders/x", H, None, Some(&none)).await.0,
    ];
    assert_eq!(
        s,
        [200, 200, 403],
        "scope, scp, and a token without orders:write"
    );
    log.push(("scopes".into(), s));

    // A consumer moved to another plan keeps its count: bob has used 3 of free's 3; on free2
    // (5 per hour, the same period) he gets 2 more.
    std::fs::write(dir.join("apikeys.yaml"), key_file("free2")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let first = loop {
        let c = call(gw.port, "/api/x", H, Some(BOB), None).await.0;
        if c == 200 || Instant::now() > deadline {
            break c;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        first,
        200,
        "the key file's new plan never applied: {}",
        gw.log()
    );
    let rest = codes(gw, "/api/x", Some(BOB), None, 3).await;
    assert_eq!(
        rest,
        [200, 429, 429],
        "bob on free2 keeps his count of 3 (then 4, 5)"
    );
    log.push(("bob moved".into(), rest));
    log
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plans_apply_per_consumer_in_memory_and_in_redis_alike() {
    let b = TestBackend::start(Behaviour::Hello).await;
    let memory = start(&plans_yaml(&b.url(), ""), None).await;
    let in_memory = scenario(&memory).await;

    let redis = RedisServer::start();
    let store = format!(
        "redis:\n  address: 127.0.0.1:{}\n  timeout: 2s\n",
        redis.port
    );
    let shared = start(
        &plans_yaml(&b.url(), &store),
        Some(&memory.dir.join("keys")),
    )
    .await;
    let in_redis = scenario(&shared).await;
    assert_eq!(in_memory, in_redis, "memory and Redis decided differently");

    // In Redis: one rate and one quota counter per consumer whatever the plan, and no key.
    let keys = redis.cli(&["KEYS", "*"]);
    assert!(keys.contains("{q:@plan/3600:bob}"), "{keys}");
    assert!(keys.contains("{r:@plan:acme}"), "{keys}");
    for secret in [ACME, BOB, GHOST] {
        assert!(!keys.contains(secret), "a key in Redis key names: {keys}");
        assert!(!shared.log().contains(secret), "a key in the log");
    }
}

#[test]
fn plan_settings_are_checked_at_load() {
    let cases = [
        (
            "authentication:\n  enabled: true\n  publicKeyPath: /k.pem\n  defaultPlan: gold\nplans:\n  free: {quota: {limit: 1, period: 1h}}\n",
            "authentication.defaultPlan: \"gold\" is not a plan",
        ),
        (
            "authentication:\n  enabled: true\n  publicKeyPath: /k.pem\n  planClaim: plan\n",
            "authentication.planClaim",
        ),
        ("plans:\n  free: {quota: {limit: 1}}\n", "plans.free.quota.period: required"),
        ("plans:\n  free: {quota: {limit: 1, period: 10ms}}\n", "at least 1s"),
        ("plans:\n  free: {rateLimiting: {burst: 2}}\n", "plans.free.rateLimiting.ratePerSecond: required"),
        ("plans:\n  free: {qouta: {limit: 1, period: 1h}}\n", "did you mean \"quota\""),
        ("plans:\n  \"fr ee\": {}\n", "a plan name is letters"),
        ("plans:\n  free: {}\n", "a plan needs rateLimiting or quota"),
        ("plans:\n  free:\n", "a plan needs rateLimiting or quota"),
        ("plans:\n  free: {quota: {limit: 1, period: 1500ms}}\n", "a whole number of seconds"),
        (
            "plans:\n  free: {quota: {limit: 1, period: 1h}}\n  pro: {quota: {limit: 9, period: 24h}}\n",
            "every plan's quota needs the same period",
        ),
        ("plans: [free]\n", "expected a mapping of plan names"),
    ];
    for (top, want) in cases {
        let yaml = loopback_config(top, &service("a", "/a/", &["http://127.0.0.1:9"], ""));
        let (code, out, err) = validate_yaml(&yaml, &[]);
        assert_ne!(code, 0, "{top}: accepted\n{out}{err}");
        assert!(
            err.contains(want) || out.contains(want),
            "{top}: want {want:?}\n{out}{err}"
        );
    }
}

#[test]
fn keys_naming_unknown_plans_and_a_service_named_plan_are_refused_at_load() {
    let dir = temp_dir("plans-validate");
    let keys = dir.join("keys.yaml");
    std::fs::write(&keys, key_file_with_ghost()).unwrap();
    let top = format!(
        "apiKeys: {{file: \"{}\"}}\nplans:\n  free: {{quota: {{limit: 1, period: 1h}}}}\n  free2: {{quota: {{limit: 2, period: 1h}}}}\n  pro: {{quota: {{limit: 9, period: 1h}}}}\n",
        keys.display()
    );
    let ports = |y: String| y.replace("{port}", "18080").replace("{admin}", "18081");
    let yaml = ports(loopback_config(
        &top,
        &service("a", "/a/", &["http://127.0.0.1:9"], ""),
    ));
    let (code, out, err) = validate_yaml(&yaml, &[]);
    assert_ne!(code, 0, "{out}{err}");
    let want = format!(
        "{}:10: plan: key \"ghost-1\" names plan \"gold\"",
        keys.display()
    );
    assert!(err.contains(&want), "want {want:?}\n{out}{err}");

    std::fs::write(&keys, key_file("free")).unwrap();
    let (code, out, err) = validate_yaml(&yaml, &[]);
    assert_eq!(code, 0, "{out}{err}");
    let named_plan = ports(loopback_config(
        &top,
        &service("plan", "/a/", &["http://127.0.0.1:9"], ""),
    ));
    let (code, out, err) = validate_yaml(&named_plan, &[]);
    assert_ne!(code, 0, "{out}{err}");
    assert!(
        err.contains("services[0].name: \"plan\" names the plans' counters"),
        "{out}{err}"
    );
}

/// A request Redis fails one limit of, under `failureMode: closed`, is not served and uses no
/// quota of the limits Redis did count: here the plan's quota counter is not a hash (a script
/// error on that key only) while the route's quota is counted, then given back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_failed_closed_uses_no_quota() {
    let b = TestBackend::start(Behaviour::Hello).await;
    let redis = RedisServer::start();
    let store = format!(
        "redis:\n  address: 127.0.0.1:{}\n  timeout: 2s\n  failureMode: closed\n",
        redis.port
    );
    let gw = start(&plans_yaml(&b.url(), &store), None).await;
    // acme's plan counter becomes a string: its script fails, the route's does not.
    assert_eq!(call(gw.port, "/orders/x", H, Some(ACME), None).await.0, 200);
    let plan_key = "hexgate:{q:@plan/3600:acme}";
    redis.cli(&["DEL", plan_key]);
    redis.cli(&["SET", plan_key, "x"]);
    let failed = codes(&gw, "/orders/x", Some(ACME), None, 5).await;
    assert_eq!(failed, [503; 5], "{}", gw.log());
    redis.cli(&["DEL", plan_key]);
    // The route's quota is 4: one used before, so three more, whatever the 503s did.
    let after = codes(&gw, "/orders/x", Some(ACME), None, 4).await;
    assert_eq!(after, [200, 200, 200, 429], "the 503s used route quota");
}
