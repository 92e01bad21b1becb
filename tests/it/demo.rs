//! `hexgate demo` as a newcomer runs it: routing, balancing, auth and 429s in one command, then
//! the API key walkthrough as the banner prints it (a key on the free plan used up, the quota
//! ledger read, credited and reset).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::Empty;
use serde_json::Value;

use crate::support::*;

/// The shell words of one banner line: blanks separate, double quotes group, an unquoted `#`
/// starts a comment; `$NAME` is replaced by its value in `vars`.
fn words(line: &str, vars: &[(&str, &str)]) -> Vec<String> {
    let (mut out, mut word, mut quoted, mut started) = (Vec::new(), String::new(), false, false);
    for ch in line.chars() {
        match ch {
            '"' => (quoted, started) = (!quoted, true),
            '#' if !quoted && !started => break,
            c if c.is_whitespace() && !quoted => {
                if started {
                    out.push(std::mem::take(&mut word));
                    started = false;
                }
            }
            c => (word, started) = (word + &c.to_string(), true),
        }
    }
    if started {
        out.push(word);
    }
    out.into_iter()
        .map(|w| {
            vars.iter()
                .fold(w, |w, (k, v)| w.replace(&format!("${k}"), v))
        })
        .collect()
}

/// One `curl` of the banner, as a request: method, port, path and query, header fields.
#[derive(Debug, Clone)]
struct Curl {
    method: String,
    port: u16,
    target: String,
    fields: Vec<(String, String)>,
}

impl Curl {
    fn parse(line: &str, vars: &[(&str, &str)]) -> Curl {
        let w = words(line.trim(), vars);
        assert_eq!(w.first().map(String::as_str), Some("curl"), "{line}");
        let (mut method, mut url, mut fields) = ("GET".to_string(), None, Vec::new());
        let mut it = w.into_iter().skip(1);
        while let Some(a) = it.next() {
            match a.as_str() {
                "-s" | "-i" => {}
                "-o" | "-w" => {
                    it.next();
                }
                "-X" => method = it.next().expect("-X METHOD"),
                "-H" => {
                    let f = it.next().expect("-H FIELD");
                    let (k, v) = f.split_once(':').expect("-H NAME: VALUE");
                    fields.push((k.trim().to_string(), v.trim().to_string()));
                }
                u if u.starts_with("http://localhost:") => url = Some(u.to_string()),
                other => panic!("curl option {other:?} not understood: {line}"),
            }
        }
        let url = url.unwrap_or_else(|| panic!("no URL: {line}"));
        let rest = &url["http://localhost:".len()..];
        let slash = rest.find('/').expect("a path");
        Curl {
            method,
            port: rest[..slash].parse().expect("a port"),
            target: rest[slash..].to_string(),
            fields,
        }
    }

    async fn run(&self) -> (u16, http::HeaderMap, String) {
        let mut b = Request::builder()
            .method(self.method.as_str())
            .uri(self.target.as_str())
            .header("host", "localhost");
        for (k, v) in &self.fields {
            b = b.header(k.as_str(), v.as_str());
        }
        request(self.port, b.body(Empty::<Bytes>::new()).unwrap())
            .await
            .unwrap_or_else(|e| panic!("{self:?}: {e}"))
    }

    async fn json(&self) -> Value {
        let (s, _, body) = self.run().await;
        assert_eq!(s, 200, "{self:?}: {body}");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{self:?}: {e}: {body}"))
    }
}

/// `for i in $(seq A B); do CURL; done`: the curl once per `i`.
fn parse_loop(line: &str, vars: &[(&str, &str)]) -> Vec<Curl> {
    let rest = line.trim().strip_prefix("for i in $(seq ").expect(line);
    let (range, rest) = rest.split_once(");").expect(line);
    let (a, b) = range.split_once(' ').expect(line);
    let cmd = rest
        .trim()
        .strip_prefix("do ")
        .and_then(|c| c.split_once("; done"))
        .expect(line)
        .0;
    (a.parse::<u32>().unwrap()..=b.parse().unwrap())
        .map(|i| {
            let i = i.to_string();
            let mut v = vars.to_vec();
            v.push(("i", &i));
            Curl::parse(cmd, &v)
        })
        .collect()
}

/// The demo process, killed if the test fails before it stops it.
struct Demo(std::process::Child);

impl Drop for Demo {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// The `plan` entry of a ledger answer.
fn plan_quota(ledger: &Value) -> &Value {
    ledger["quotas"]
        .as_array()
        .and_then(|q| q.iter().find(|q| q["scope"] == "plan"))
        .unwrap_or_else(|| panic!("no plan quota: {ledger}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_shows_routing_balancing_auth_and_429() {
    let ports: Vec<u16> = (0..5).map(|_| free_port()).collect();
    let child = Command::new(bin())
        .args([
            "demo",
            "--port",
            &ports[0].to_string(),
            "--admin-port",
            &ports[1].to_string(),
        ])
        .args([
            "--backend-ports",
            &format!("{},{},{}", ports[2], ports[3], ports[4]),
        ])
        .env("HEXGATE_LOG", "warn")
        .env_remove("HEXGATE_ADMIN_TOKEN")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut child = Demo(child);
    let child = &mut child.0;
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut token = None;
    let mut banner = String::new();
    loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("demo banner");
        banner.push_str(&line);
        banner.push('\n');
        if let Some(t) = line.trim().strip_prefix("export TOKEN=") {
            token = Some(t.to_string());
        }
        if line.starts_with("Press Ctrl+C") {
            break;
        }
    }
    let token = token.expect("export TOKEN= in the banner");
    assert!(
        banner.contains(&format!("curl http://localhost:{}/products/abc", ports[0])),
        "{banner}"
    );
    let gw = ports[0];
    let bearer = format!("Bearer {token}");
    let get_auth = |path: &'static str, auth: bool| {
        let fields = if auth {
            vec![("authorization", bearer.as_str())]
        } else {
            vec![]
        };
        async move { get_with(gw, path, &fields).await }
    };
    let (s, _, body) = get_auth("/products/abc", false).await.unwrap();
    assert_eq!(
        (s, body.trim()),
        (
            200,
            format!("Hello from Backend (Port {})", ports[4]).as_str()
        )
    );
    let (s, _, body) = get_auth("/users/1", false).await.unwrap();
    assert_eq!(s, 401);
    assert!(body.contains("401 Unauthorized: Missing Authorization header"));
    let (_, _, b1) = get_auth("/users/1", true).await.unwrap();
    let (_, _, b2) = get_auth("/users/2", true).await.unwrap();
    assert_eq!(b1.trim(), format!("Hello from Backend (Port {})", ports[2]));
    assert_eq!(b2.trim(), format!("Hello from Backend (Port {})", ports[3]));
    tokio::time::sleep(Duration::from_millis(3100)).await;
    let mut codes = Vec::new();
    for _ in 0..4 {
        codes.push(get_auth("/users/1", true).await.unwrap().0);
    }
    assert_eq!(codes, vec![200, 200, 200, 429]);

    api_key_walkthrough(&banner, ports[1], ports[4]).await;
    // The default plan covers JWT consumers on the key route too; user-service opts out of plans.
    let (s, h, _) = get_auth("/orders/1", true).await.unwrap();
    assert_eq!(s, 200);
    assert_eq!(h["x-backend-saw-consumer-id"], "alice");
    let _ = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            assert!(st.success(), "demo exits cleanly on Ctrl+C");
            break;
        }
        assert!(Instant::now() < deadline, "demo did not stop");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The banner's API key section, run as printed: the key works (its consumer seen upstream), the
/// free plan refuses at its limit, the ledger shows it used up, a credit of 2 lets exactly 2 more
/// through, a reset brings it back to 0.
async fn api_key_walkthrough(banner: &str, admin: u16, order_backend: u16) {
    let section = &banner[banner.find("export KEY=").expect(banner)..];
    let key = section["export KEY=".len()..]
        .lines()
        .next()
        .unwrap()
        .trim();
    let vars = [("KEY", key)];
    let lines: Vec<&str> = section.lines().map(str::trim).collect();
    let find = |what: &str, f: &dyn Fn(&str) -> bool| -> String {
        lines
            .iter()
            .find(|l| l.starts_with("curl") && f(l))
            .unwrap_or_else(|| panic!("no {what} in the banner:\n{banner}"))
            .to_string()
    };
    let call = Curl::parse(&find("key call", &|l| l.contains("$KEY")), &vars);
    let repeat = parse_loop(
        lines
            .iter()
            .find(|l| l.starts_with("for i in"))
            .expect(banner),
        &vars,
    );
    let ledger = Curl::parse(
        &find("ledger read", &|l| {
            l.contains("/admin/quotas?") && !l.contains("-X")
        }),
        &vars,
    );
    let credit = Curl::parse(&find("credit", &|l| l.contains("-X POST")), &vars);
    let reset = Curl::parse(&find("reset", &|l| l.contains("-X DELETE")), &vars);
    for c in [&ledger, &credit, &reset] {
        assert_eq!(c.port, admin, "{c:?}");
        assert!(c.target.contains("consumer=demo"), "{c:?}");
    }
    assert!(credit.target.contains("amount=2"), "{credit:?}");

    // The key: 200 from order-service's backend, which was told the consumer.
    let (s, h, body) = call.run().await;
    assert_eq!(s, 200, "{call:?}: {body}");
    assert_eq!(
        body.trim(),
        format!("Hello from Backend (Port {order_backend})")
    );
    assert_eq!(h["x-backend-saw-consumer-id"], "demo");
    assert!(
        banner.contains("X-Backend-Saw-Consumer-Id: demo"),
        "{banner}"
    );
    let mut wrong = call.clone();
    wrong.fields = vec![("X-Api-Key".into(), "not-the-demo-key".into())];
    assert_eq!(wrong.run().await.0, 401, "an unknown key");

    // Repeat until the plan's quota (5 per hour, one used above) refuses.
    let mut codes = Vec::new();
    for c in &repeat {
        let (s, h, _) = c.run().await;
        if s == 429 {
            assert!(h.contains_key("retry-after"), "{h:?}");
        }
        codes.push(s);
    }
    assert_eq!(codes, [200, 200, 200, 200, 429], "{repeat:?}");
    assert!(banner.contains("# 200 200 200 200 429"), "{banner}");

    // The ledger: used up.
    let l = ledger.json().await;
    assert_eq!(l["consumer"], "demo", "{l}");
    let q = plan_quota(&l);
    assert_eq!(q["plan"], "free", "{l}");
    assert_eq!(q["limit"], 5, "{l}");
    assert_eq!(q["used"], q["limit"], "{l}");
    assert_eq!(q["remaining"], 0, "{l}");
    assert_eq!(q["periodSeconds"], 3600, "{l}");
    // The window counts in 60 sub-buckets, so the oldest request leaves it within a period and
    // one sub-bucket (3600 s + 60 s).
    let reset_in = q["resetSeconds"].as_u64().expect("resetSeconds");
    assert!((1..=3660).contains(&reset_in), "{l}");

    // A credit of 2: exactly two more.
    let c = credit.json().await;
    assert_eq!(c["credited"], 2, "{c}");
    assert_eq!(c["quota"]["remaining"], 2, "{c}");
    let mut codes = Vec::new();
    for _ in 0..3 {
        codes.push(call.run().await.0);
    }
    assert_eq!(codes, [200, 200, 429], "after a credit of 2");
    let q = plan_quota(&ledger.json().await).clone();
    assert_eq!(
        (&q["used"], &q["credit"], &q["remaining"]),
        (&7.into(), &2.into(), &0.into()),
        "{q}"
    );

    // A reset: nothing used, and the key goes through again.
    let r = reset.json().await;
    assert_eq!(r["reset"], serde_json::json!(["plan"]), "{r}");
    let q = plan_quota(&ledger.json().await).clone();
    assert_eq!((&q["used"], &q["remaining"]), (&0.into(), &5.into()), "{q}");
    assert_eq!(call.run().await.0, 200, "after the reset");
}
