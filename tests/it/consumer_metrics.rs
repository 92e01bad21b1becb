//! `hexgate_consumer_requests_total{service,consumer,code}` through the real gateway: exact
//! counts for a small fleet (answers and quota refusals), at most 20 named consumers per service
//! plus `other` with nothing lost, only authenticated requests counted, and consumer names that
//! need escaping rendered so the exposition still parses.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::process::{Command, Stdio};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::json;

use hexgate::auth::keys::Alg;
use hexgate::auth::tools::{self, SigningKey};

use crate::support::*;

const METRIC: &str = "hexgate_consumer_requests_total";

/// An RS256 key pair in `dir` (public.pem for the gateway) and its signing key.
fn signing_key(dir: &std::path::Path) -> SigningKey {
    tools::keygen(dir, Alg::RS256, false).unwrap();
    SigningKey::from_pem(&std::fs::read_to_string(dir.join("private.pem")).unwrap()).unwrap()
}

/// `Bearer` and a token for consumer `sub`, valid for an hour.
fn bearer(k: &SigningKey, sub: &str) -> String {
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    let t = tools::sign_token(k, Alg::RS256, None, &json!({"sub": sub, "exp": exp})).unwrap();
    format!("Bearer {t}")
}

/// JWT authentication on; `orders` (with `extra` lines) and `public` (no authentication).
fn yaml(backend: &TestBackend, dir: &std::path::Path, extra: &str) -> String {
    format!(
        "gatewayPort: \"{{port}}\"\ngatewayBind: 127.0.0.1\nadminPort: \"{{admin}}\"\n\
         authentication:\n  enabled: true\n  publicKeyPath: \"{}/keys/public.pem\"\n\
         services:\n{}{}",
        dir.display(),
        service("orders", "/orders/", &[&backend.url()], extra),
        service(
            "public",
            "/public/",
            &[&backend.url()],
            "    authentication: {enabled: false}\n"
        ),
    )
}

/// One GET with an optional `Authorization` value: the status.
async fn send(port: u16, path: &str, auth: Option<&str>) -> u16 {
    let fields: Vec<(&str, &str)> = auth.map(|a| ("authorization", a)).into_iter().collect();
    get_with(port, path, &fields).await.unwrap().0
}

/// A series of the text format: name, labels (unescaped), value.
type Series = (String, Vec<(String, String)>, f64);

/// Parses the Prometheus text format strictly: every line a comment or `name{labels} value`, label
/// values with only the escapes `\\`, `\"` and `\n`, no series twice.
fn parse_exposition(text: &str) -> Vec<Series> {
    let mut out: Vec<Series> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for line in text.lines() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let name_end = line
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
            .unwrap_or_else(|| panic!("no value: {line:?}"));
        let name = &line[..name_end];
        assert!(!name.is_empty(), "no metric name: {line:?}");
        let mut rest = &line[name_end..];
        let mut labels = Vec::new();
        if let Some(r) = rest.strip_prefix('{') {
            let mut chars = r.char_indices();
            loop {
                let (i, c) = chars.next().unwrap_or_else(|| panic!("unclosed: {line:?}"));
                if c == '}' {
                    rest = &r[i + 1..];
                    break;
                }
                if c == ',' {
                    continue;
                }
                let eq = r[i..]
                    .find('=')
                    .unwrap_or_else(|| panic!("label without '=': {line:?}"));
                let lname = &r[i..i + eq];
                assert!(
                    lname.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                    "bad label name {lname:?}: {line:?}"
                );
                for _ in 1..eq {
                    chars.next();
                }
                assert_eq!(chars.next().map(|p| p.1), Some('='), "{line:?}");
                assert_eq!(
                    chars.next().map(|p| p.1),
                    Some('"'),
                    "unquoted value: {line:?}"
                );
                let mut value = String::new();
                loop {
                    match chars.next().map(|p| p.1) {
                        Some('"') => break,
                        Some('\\') => match chars.next().map(|p| p.1) {
                            Some('\\') => value.push('\\'),
                            Some('"') => value.push('"'),
                            Some('n') => value.push('\n'),
                            other => panic!("bad escape {other:?}: {line:?}"),
                        },
                        Some('\n') | None => panic!("unterminated value: {line:?}"),
                        Some(c) => value.push(c),
                    }
                }
                labels.push((lname.to_string(), value));
            }
        }
        let value = rest
            .strip_prefix(' ')
            .unwrap_or_else(|| panic!("no space before the value: {line:?}"));
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            v => v
                .parse()
                .unwrap_or_else(|e| panic!("bad value ({e}): {line:?}")),
        };
        assert!(
            seen.insert((name.to_string(), labels.clone())),
            "series twice: {line:?}"
        );
        out.push((name.to_string(), labels, value));
    }
    out
}

/// `promtool check metrics` on the exposition: it parses (lint findings are printed, not fatal).
pub fn promtool_parses(text: &str) {
    require_tool("promtool");
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Exit 1 and "error while linting": the text did not parse; 3: lint findings only.
    assert!(
        out.status.success() || !said.contains("error while linting"),
        "promtool refused the exposition: {said}\n{text}"
    );
}

/// The consumer series of `service`: (consumer, code) -> count, from a strict parse.
fn consumer_series(text: &str, service: &str) -> BTreeMap<(String, String), u64> {
    let mut m = BTreeMap::new();
    for (name, labels, v) in parse_exposition(text) {
        if name != METRIC {
            continue;
        }
        let get = |k: &str| {
            labels
                .iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.clone())
                .unwrap_or_else(|| panic!("{METRIC} without {k}: {labels:?}"))
        };
        assert_eq!(labels.len(), 3, "{labels:?}");
        if get("service") == service {
            m.insert((get("consumer"), get("code")), v as u64);
        }
    }
    m
}

fn key(consumer: &str, code: u16) -> (String, String) {
    (consumer.to_string(), code.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_fleet_is_counted_exactly_by_consumer_and_code() {
    let b = TestBackend::start(Behaviour::Hello).await;
    let dir = temp_dir("consumers-small");
    let k = signing_key(&dir.join("keys"));
    // A quota of 3 per consumer: the 4th request on is a 429, counted for its consumer.
    let gw = Gateway::start_in(
        dir.clone(),
        &yaml(
            &b,
            &dir,
            "    quota: {enabled: true, limit: 3, period: 1h, key: consumer}\n",
        ),
    )
    .await;
    let port = gw.port;

    // The metric is declared before any request.
    let m = gw.metrics().await;
    assert!(m.contains(&format!("# TYPE {METRIC} counter\n")), "{m}");
    assert!(consumer_series(&m, "orders").is_empty(), "{m}");

    let mut want = BTreeMap::new();
    for (consumer, n) in [("alice", 5u64), ("bob", 2), ("carol", 4)] {
        let auth = bearer(&k, consumer);
        for i in 0..n {
            let s = send(port, &format!("/orders/{i}"), Some(&auth)).await;
            let expect = if i < 3 { 200 } else { 429 };
            assert_eq!(s, expect, "{consumer} request {i}\n{}", gw.log());
            *want.entry(key(consumer, expect)).or_insert(0) += 1;
        }
    }
    // Not counted: refused by authentication (no consumer), or a route without authentication.
    assert_eq!(send(port, "/orders/x", None).await, 401);
    assert_eq!(
        send(port, "/orders/x", Some("Bearer not.a.token")).await,
        401
    );
    assert_eq!(send(port, "/public/x", None).await, 200);

    let m = gw.metrics().await;
    let got = consumer_series(&m, "orders");
    assert_eq!(got, want, "{m}");
    assert!(consumer_series(&m, "public").is_empty(), "{m}");
    assert!(consumer_series(&m, "unmatched").is_empty(), "{m}");
    // The same counts as the service's request counter, as one would cross-check them.
    assert!(
        m.contains("hexgate_http_requests_total{service=\"orders\",method=\"GET\",code=\"429\"} 3"),
        "{m}"
    );
    // The ledger counter is declared, at zero for both actions.
    for action in ["reset", "credit"] {
        let line = format!("hexgate_quota_ledger_changes_total{{action=\"{action}\"}} 0");
        assert!(m.lines().any(|l| l == line), "{line} missing:\n{m}");
    }
    promtool_parses(&m);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_most_twenty_named_consumers_and_the_rest_as_other() {
    let b = TestBackend::start(Behaviour::Hello).await;
    let dir = temp_dir("consumers-many");
    let k = signing_key(&dir.join("keys"));
    let gw = Gateway::start_in(dir.clone(), &yaml(&b, &dir, "")).await;

    // 25 consumers, one after the other, 1 to 4 requests each.
    let mut sent = 0u64;
    let mut per_consumer = Vec::new();
    for i in 0..25u64 {
        let consumer = format!("c{i:02}");
        let auth = bearer(&k, &consumer);
        let n = i % 4 + 1;
        for _ in 0..n {
            assert_eq!(send(gw.port, "/orders/1", Some(&auth)).await, 200);
        }
        sent += n;
        per_consumer.push((consumer, n));
    }

    let m = gw.metrics().await;
    let got = consumer_series(&m, "orders");
    let named: std::collections::BTreeSet<&str> = got
        .keys()
        .map(|(c, _)| c.as_str())
        .filter(|c| *c != "other")
        .collect();
    assert!(named.len() <= 20, "{} named: {named:?}", named.len());
    let other = got.get(&key("other", 200)).copied().unwrap_or(0);
    assert!(other > 0, "nothing counted as other:\n{m}");
    let total: u64 = got.values().sum();
    assert_eq!(total, sent, "every request counted once:\n{m}");
    // The first 20 took the 20 places at their first request, so their counts are exact; the
    // last 5 are in other.
    for (consumer, n) in &per_consumer[..20] {
        assert_eq!(got.get(&key(consumer, 200)), Some(n), "{consumer}:\n{m}");
    }
    let late: u64 = per_consumer[20..].iter().map(|(_, n)| n).sum();
    assert_eq!(other, late, "{m}");
    promtool_parses(&m);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_names_are_escaped_in_the_exposition() {
    let b = TestBackend::start(Behaviour::Hello).await;
    let dir = temp_dir("consumers-escape");
    let k = signing_key(&dir.join("keys"));
    let gw = Gateway::start_in(dir.clone(), &yaml(&b, &dir, "")).await;

    let odd = [
        "we\"ird",
        "back\\slash",
        "both\\\"}{,=",
        "ends with a backslash\\",
        "ünïcødé",
    ];
    for (i, consumer) in odd.iter().enumerate() {
        let auth = bearer(&k, consumer);
        for _ in 0..=i {
            assert_eq!(
                send(gw.port, "/orders/1", Some(&auth)).await,
                200,
                "{consumer}: {}",
                gw.log()
            );
        }
    }
    // A consumer with a control character is refused by authentication, so never a label value.
    assert_eq!(
        send(gw.port, "/orders/1", Some(&bearer(&k, "new\nline"))).await,
        401
    );
    // A consumer called `other` cannot be told apart from the rest: it is counted there.
    assert_eq!(
        send(gw.port, "/orders/1", Some(&bearer(&k, "other"))).await,
        200
    );

    let m = gw.metrics().await;
    assert!(
        m.contains(&format!(
            "{METRIC}{{service=\"orders\",consumer=\"we\\\"ird\",code=\"200\"}} 1\n"
        )),
        "{m}"
    );
    assert!(
        m.contains(&format!(
            "{METRIC}{{service=\"orders\",consumer=\"back\\\\slash\",code=\"200\"}} 2\n"
        )),
        "{m}"
    );
    let got = consumer_series(&m, "orders");
    let mut want: BTreeMap<(String, String), u64> = odd
        .iter()
        .enumerate()
        .map(|(i, c)| (key(c, 200), i as u64 + 1))
        .collect();
    want.insert(key("other", 200), 1);
    assert_eq!(got, want, "{m}");
    promtool_parses(&m);
}
