//! The seed walkthrough end to end against `scripts/stack.sh up --gateways 2`: nginx (TLS) in front
//! of two gateways, backends in Consul, limits shared through Redis, Prometheus finding both
//! gateways; then a gateway killed under load, restarted, and `stack.sh down` leaving nothing.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hexgate::auth::keys::Alg;
use hexgate::auth::tools::{sign_token, SigningKey};

use crate::support::*;

struct Stack {
    env: Vec<(String, String)>,
    run: PathBuf,
    keys: PathBuf,
    nginx: u16,
    prometheus: u16,
    admin_base: u16,
    backends: [u16; 3],
}

impl Stack {
    fn new() -> Stack {
        let root = temp_dir("stack");
        let consul = free_run(3);
        let gw = free_run(1);
        let admin = free_run(1);
        let backends = [free_port(), free_port(), free_port()];
        let nginx = free_port();
        let prometheus = free_port();
        let examples = example_backend();
        let env = vec![
            ("HEXGATE_RUN_DIR", root.join("run").display().to_string()),
            ("HEXGATE_KEYS_DIR", root.join("keys").display().to_string()),
            ("HEXGATE_BIN", bin().to_string()),
            ("HEXGATE_BACKEND_BIN", examples.display().to_string()),
            ("HEXGATE_STACK_QUOTA", "5".to_string()),
            ("CONSUL_PORT", consul.to_string()),
            ("REDIS_PORT", free_port().to_string()),
            ("NGINX_PORT", nginx.to_string()),
            ("PROMETHEUS_PORT", prometheus.to_string()),
            ("GATEWAY_BASE_PORT", gw.to_string()),
            ("ADMIN_BASE_PORT", admin.to_string()),
            (
                "BACKEND_PORTS",
                format!("{} {} {}", backends[0], backends[1], backends[2]),
            ),
        ];
        Stack {
            env: env.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
            run: root.join("run"),
            keys: root.join("keys"),
            nginx,
            prometheus,
            admin_base: admin,
            backends,
        }
    }

    fn script(&self, args: &[&str]) -> (bool, String) {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/stack.sh");
        let out = Command::new("bash")
            .arg(script)
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .output()
            .unwrap();
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }

    fn pid(&self, name: &str) -> u32 {
        std::fs::read_to_string(self.run.join("pids").join(format!("{name}.pid")))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    fn pids(&self) -> Vec<u32> {
        std::fs::read_dir(self.run.join("pids"))
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter_map(|e| std::fs::read_to_string(e.path()).ok())
                    .filter_map(|t| t.trim().parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// curl -k through nginx: (status, body); without a response, status 0 and curl's error.
    fn https(&self, path: &str, token: Option<&str>) -> (u16, String) {
        let mut cmd = Command::new("curl");
        cmd.args(["-sSk", "-m", "10", "-w", "\n%{http_code}"]);
        if let Some(t) = token {
            cmd.args(["-H", &format!("Authorization: Bearer {t}")]);
        }
        cmd.arg(format!("https://localhost:{}{path}", self.nginx));
        let out = cmd.output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
        match code.trim().parse() {
            Ok(0) | Err(_) => (0, String::from_utf8_lossy(&out.stderr).trim().to_string()),
            Ok(code) => (code, body.trim().to_string()),
        }
    }

    fn token(&self, sub: &str) -> String {
        let key =
            SigningKey::from_pem(&std::fs::read_to_string(self.keys.join("private.pem")).unwrap())
                .unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        sign_token(
            &key,
            Alg::RS256,
            None,
            &serde_json::json!({"sub": sub, "exp": now + 600}),
        )
        .unwrap()
    }

    fn prometheus_query(&self, q: &str) -> serde_json::Value {
        let out = Command::new("curl")
            .args(["-s", "-m", "5", "--data-urlencode", &format!("query={q}")])
            .arg(format!("http://127.0.0.1:{}/api/v1/query", self.prometheus))
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        let _ = self.script(&["down"]);
    }
}

/// 240 authenticated requests through nginx from 4 threads (one consumer each, so no rate limit
/// applies); `fault` runs once 60 are done. Returns how many did not get a 200.
fn load_while(stack: &Stack, tag: &str, fault: impl FnOnce()) -> u64 {
    let tokens: Vec<String> = (0..240)
        .map(|i| stack.token(&format!("{tag}-{i}")))
        .collect();
    let tokens = Arc::new(tokens);
    let failed = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let nginx = stack.nginx;
    let mut workers = Vec::new();
    for w in 0..4 {
        let (tokens, failed, done) = (tokens.clone(), failed.clone(), done.clone());
        workers.push(std::thread::spawn(move || {
            for i in (w..tokens.len()).step_by(4) {
                let out = Command::new("curl")
                    .args([
                        "-sk",
                        "-m",
                        "10",
                        "-o",
                        "/dev/null",
                        "-w",
                        "%{http_code}",
                        "-H",
                    ])
                    .arg(format!("Authorization: Bearer {}", tokens[i]))
                    .arg(format!("https://localhost:{nginx}/users/load"))
                    .output()
                    .unwrap();
                if String::from_utf8_lossy(&out.stdout) != "200" {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    while done.load(Ordering::Relaxed) < 60 {
        std::thread::sleep(Duration::from_millis(10));
    }
    fault();
    for w in workers {
        w.join().unwrap();
    }
    failed.load(Ordering::Relaxed)
}

fn hello(port: u16) -> String {
    format!("Hello from Backend (Port {port})")
}

#[test]
fn seed_walkthrough_through_the_stack() {
    for tool in [
        "consul",
        "redis-server",
        "nginx",
        "prometheus",
        "curl",
        "openssl",
    ] {
        require_tool(tool);
    }
    let stack = Stack::new();
    let (ok, out) = stack.script(&["up", "--gateways", "2"]);
    assert!(ok, "stack.sh up failed:\n{out}");
    let (ok, out) = stack.script(&["up", "--gateways", "2"]);
    assert!(
        ok && out.contains("nginx already running") && !out.contains("nginx reloaded"),
        "up is idempotent:\n{out}"
    );
    let [u1, u2, p1] = stack.backends;

    // /products/abc reaches the product backend (a public route in the stack config).
    assert_eq!(stack.https("/products/abc", None), (200, hello(p1)));
    // No token: the seed's 401.
    let (s, body) = stack.https("/users/1", None);
    assert_eq!(s, 401);
    assert!(
        body.contains("401 Unauthorized: Missing Authorization header"),
        "{body}"
    );
    // A token from `hexgate token` (the README's way) is accepted, and /users/ spreads over both
    // user backends (each gateway balances on its own, so the order depends on nginx's choice).
    let out = Command::new(bin())
        .args(["token", "--key"])
        .arg(stack.keys.join("private.pem"))
        .args(["--sub", "alice"])
        .output()
        .unwrap();
    let alice = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let mut seen = HashSet::new();
    for i in 1..=3 {
        let (s, body) = stack.https(&format!("/users/{i}"), Some(&alice));
        assert_eq!(s, 200, "{body}");
        seen.insert(body);
    }
    assert_eq!(
        seen,
        HashSet::from([hello(u1), hello(u2)]),
        "both user backends serve /users/"
    );

    // Four rapid requests with one token: 200 200 200 429, although nginx spreads them over both
    // gateways: the rate limit lives in Redis.
    let bob = stack.token("bob");
    let codes: Vec<u16> = (1..=4)
        .map(|i| stack.https(&format!("/users/{i}"), Some(&bob)).0)
        .collect();
    assert_eq!(codes, vec![200, 200, 200, 429]);

    // The quota (5 per minute per consumer in this run) is shared by both gateways too.
    let carol = stack.token("carol");
    let mut ok = 0;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(12) {
        match stack.https("/users/q", Some(&carol)).0 {
            200 => ok += 1,
            429 => {}
            other => panic!("status {other}"),
        }
        std::thread::sleep(Duration::from_millis(350));
    }
    assert_eq!(ok, 5, "exactly the quota across both gateways");

    // A killed user backend stops receiving traffic within its check interval (1s) plus a second.
    let _ = Command::new("kill")
        .arg(stack.pid(&format!("backend-{u1}")).to_string())
        .status();
    std::thread::sleep(Duration::from_secs(2));
    for i in 0..6 {
        let (s, body) = stack.https("/users/3", Some(&stack.token(&format!("dave{i}"))));
        assert_eq!((s, body), (200, hello(u2)));
    }

    // Prometheus sees both gateways as healthy targets, and requests counted by each.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let up = stack.prometheus_query("up{job=\"hexgate\"} == 1");
        let per_instance =
            stack.prometheus_query("sum by (instance) (hexgate_http_requests_total)");
        let n_up = up["data"]["result"]
            .as_array()
            .map(|a| a.len())
            .unwrap_or(0);
        let n_counted = per_instance["data"]["result"]
            .as_array()
            .map(|a| a.len())
            .unwrap_or(0);
        if n_up == 2 && n_counted == 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus: {n_up} targets up, {n_counted} instances counted"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    // Every dashboard panel's PromQL is accepted by this Prometheus.
    let dash: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/grafana/dashboards/hexgate.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let mut exprs = 0;
    for panel in dash["panels"].as_array().unwrap() {
        for t in panel["targets"].as_array().unwrap() {
            let expr = t["expr"].as_str().unwrap();
            let r = stack.prometheus_query(expr);
            assert_eq!(
                r["status"], "success",
                "panel {:?}: {expr}: {r}",
                panel["title"]
            );
            exprs += 1;
        }
    }
    assert!(exprs >= 12);

    // Failover: SIGKILL one gateway during a bounded load through nginx.
    let failed = load_while(&stack, "kill1", || {
        let _ = Command::new("kill")
            .args(["-KILL", &stack.pid("gateway-1").to_string()])
            .status();
    });
    eprintln!("failover: {failed} failed of 240 requests with one gateway SIGKILLed mid-load");
    assert!(failed <= 1, "{failed} failed requests during failover");

    // Restarted (up is idempotent: it starts what is not running), it takes traffic again.
    let (ok, out) = stack.script(&["up", "--gateways", "2"]);
    assert!(ok, "{out}");
    let metrics = || {
        Command::new("curl")
            .args([
                "-s",
                &format!("http://127.0.0.1:{}/metrics", stack.admin_base),
            ])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let _ = stack.https("/products/again", None);
        if metrics().contains("service=\"product-service\",method=\"GET\",code=\"200\"") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "restarted gateway never took traffic"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // A gateway SIGTERMed under load drains its requests while nginx moves on: zero failures.
    let failed = load_while(&stack, "term2", || {
        let _ = Command::new("kill")
            .args(["-TERM", &stack.pid("gateway-2").to_string()])
            .status();
    });
    eprintln!("failover: {failed} failed of 240 requests with one gateway SIGTERMed mid-load");
    assert_eq!(
        failed, 0,
        "graceful shutdown behind nginx must cost no request"
    );

    let pids = stack.pids();
    assert!(pids.len() >= 8, "{pids:?}");
    let (ok, out) = stack.script(&["down"]);
    assert!(ok, "{out}");
    std::thread::sleep(Duration::from_millis(300));
    for pid in pids {
        // Gone, or a zombie not yet reaped by init (its resources are released).
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| {
                s.rsplit_once(')')
                    .map(|(_, r)| r.trim().chars().next().unwrap_or('?'))
            });
        let alive = matches!(state, Some(c) if c != 'Z');
        assert!(!alive, "pid {pid} still running after stack.sh down");
    }
    let (_, status) = stack.script(&["status"]);
    assert!(status.contains("stack is down"), "{status}");
}

#[test]
fn docker_compose_file_is_accepted() {
    require_tool("docker-compose");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("docker-compose")
        .args(["-f"])
        .arg(root.join("docker-compose.yml"))
        .args(["config", "-q"])
        .current_dir(root)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "docker-compose config: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The Compose stack's gateway config is valid too, with the files it names (mounted into
    // the containers there) at temporary paths here: validate checks them as run does.
    let files = temp_dir("compose-config");
    hexgate_keygen(&files);
    std::fs::write(files.join("admin-token"), "t0ken\n").unwrap();
    let text = std::fs::read_to_string(root.join("deploy/docker/config.yaml"))
        .unwrap()
        .replace(
            "/config/public.pem",
            &files.join("public.pem").display().to_string(),
        )
        .replace(
            "/run/hexgate/admin-token",
            &files.join("admin-token").display().to_string(),
        );
    std::fs::write(files.join("config.yaml"), text).unwrap();
    let out = Command::new(bin())
        .arg("validate")
        .arg(files.join("config.yaml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // hexgate scales: no container_name and no fixed host port on the hexgate service.
    let text = std::fs::read_to_string(root.join("docker-compose.yml")).unwrap();
    let svc = text
        .split("\n  hexgate:\n")
        .nth(1)
        .unwrap()
        .split("\n\n")
        .next()
        .unwrap();
    assert!(
        !svc.contains("container_name") && !svc.contains("ports:"),
        "{svc}"
    );
}
