//! The access log (`accessLog`): JSON lines with every field, the seed's text line, the file
//! reopened on SIGUSR1 after logrotate renamed it, a reload moving it, `validate`'s check.

use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::AsyncReadExt;

use crate::support::*;

/// Every field of a JSON line, with the types it may have.
const FIELDS: &[(&str, &[&str])] = &[
    ("time", &["string"]),
    ("request_id", &["string"]),
    ("trace_id", &["string", "null"]),
    ("client_ip", &["string"]),
    ("method", &["string"]),
    ("path", &["string"]),
    ("protocol", &["string"]),
    ("status", &["integer"]),
    ("bytes_sent", &["integer", "null"]),
    ("duration_ms", &["float"]),
    ("upstream", &["string", "null"]),
    ("upstream_ms", &["float", "null"]),
    ("service", &["string"]),
    ("consumer", &["string", "null"]),
    ("limit_outcome", &["string", "null"]),
    ("retries", &["integer", "null"]),
    ("reason", &["string", "null"]),
];

fn type_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::String(_) => "string",
        Value::Number(n) if n.is_f64() => "float",
        Value::Number(_) => "integer",
        _ => "other",
    }
}

/// `2026-12-01T12:00:00.123Z`.
fn is_rfc3339_millis(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 24
        && b.iter().enumerate().all(|(i, c)| match i {
            4 | 7 => *c == b'-',
            10 => *c == b'T',
            13 | 16 => *c == b':',
            19 => *c == b'.',
            23 => *c == b'Z',
            _ => c.is_ascii_digit(),
        })
}

/// Each line of `text` parsed on its own, checked for every field and its type.
fn parse_lines(text: &str) -> Vec<Value> {
    text.lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}"));
            let o = v
                .as_object()
                .unwrap_or_else(|| panic!("not an object: {l}"));
            assert_eq!(o.len(), FIELDS.len(), "fields of {l}");
            for (name, types) in FIELDS {
                let f = o.get(*name).unwrap_or_else(|| panic!("no {name} in {l}"));
                assert!(types.contains(&type_of(f)), "{name} is {f} in {l}");
            }
            let time = v["time"].as_str().unwrap();
            assert!(is_rfc3339_millis(time), "time {time:?}");
            if let Some(t) = v["trace_id"].as_str() {
                assert!(
                    t.len() == 32
                        && t.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'))
                        && t.bytes().any(|c| c != b'0'),
                    "trace_id {t:?}"
                );
            }
            v
        })
        .collect()
}

/// Waits (bounded) until `file` holds lines for which `done` holds; returns them.
async fn wait_lines(file: &std::path::Path, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        // Only whole lines: the writer may be between two writes.
        let whole = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
        let lines = parse_lines(whole);
        if done(&lines) {
            return lines;
        }
        assert!(
            Instant::now() < deadline,
            "{}: still waiting; it holds:\n{text}",
            file.display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn line_for<'a>(lines: &'a [Value], path: &str) -> &'a Value {
    lines
        .iter()
        .find(|l| l["path"] == path)
        .unwrap_or_else(|| panic!("no line for {path}: {lines:#?}"))
}

fn paths(lines: &[Value]) -> Vec<String> {
    let mut p: Vec<String> = lines
        .iter()
        .map(|l| l["path"].as_str().unwrap().to_string())
        .collect();
    p.sort();
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_lines_carry_every_field_for_answers_and_refusals() {
    let b = TestBackend::start(Behaviour::Hello).await;
    let dir = temp_dir("accesslog-json");
    hexgate_keygen(&dir.join("keys"));
    let url = b.url();
    let services = [
        service("web", "/web/", &[&url], ""),
        service(
            "limited",
            "/limited/",
            &[&url],
            "    rateLimiting: {enabled: true, ratePerSecond: 0.001, burst: 1}\n",
        ),
        service(
            "secure",
            "/secure/",
            &[&url],
            "    authentication: {enabled: true}\n",
        ),
    ]
    .concat();
    let yaml = loopback_config(
        "accessLog:\n  format: json\n  path: access.log\nauthentication:\n  publicKeyPath: \"{dir}/keys/public.pem\"\n",
        &services,
    );
    let gw = Gateway::start_in(dir.clone(), &yaml).await;
    gw.wait_ready().await;
    let port = gw.port;

    assert_eq!(get(port, "/web/a").await.unwrap().0, 200);
    assert_eq!(get(port, "/nowhere").await.unwrap().0, 404);
    assert_eq!(get(port, "/secure/x").await.unwrap().0, 401);
    assert_eq!(get(port, "/limited/1").await.unwrap().0, 200);
    assert_eq!(get(port, "/limited/2").await.unwrap().0, 429);
    let (s, v, _) = get_h2c(port, "/web/h2").await.unwrap();
    assert_eq!((s, v), (200, http::Version::HTTP_2));
    assert_eq!(
        get_h2c(port, "/limited/h2").await.unwrap().0,
        429,
        "the bucket is spent"
    );
    // Quotes, a backslash and Unicode in the request target, as received.
    let odd = "/web/q\"u\\o/\u{fc}n\u{ef}\u{2713}";
    let mut s = crate::raw::send(
        port,
        format!("GET {odd} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut answer)).await;
    let odd_status = crate::raw::status(&String::from_utf8_lossy(&answer));

    let file = dir.join("access.log");
    let lines = wait_lines(&file, |l| l.len() >= 8).await;
    assert_eq!(lines.len(), 8, "{lines:#?}");

    let ok = line_for(&lines, "/web/a");
    assert_eq!(ok["status"], 200);
    assert_eq!(ok["method"], "GET");
    assert_eq!(ok["protocol"], "HTTP/1.1");
    assert_eq!(ok["service"], "web");
    assert_eq!(ok["client_ip"], "127.0.0.1");
    assert!(ok["consumer"].is_null() && ok["reason"].is_null());
    assert!(ok["limit_outcome"].is_null(), "no limit on this route");
    assert!(ok["trace_id"].is_null(), "no tracing, no traceparent: {ok}");
    assert_eq!(
        ok["bytes_sent"].as_u64(),
        Some("Hello from Backend (Port )".len() as u64 + b.addr.port().to_string().len() as u64)
    );
    assert!(!ok["request_id"].as_str().unwrap().is_empty());
    // The backend that answered, how long it took, and no retry.
    assert_eq!(ok["upstream"].as_str(), Some(b.url().as_str()), "{ok}");
    assert!(
        ok["upstream_ms"].as_f64().is_some_and(|ms| ms >= 0.0),
        "{ok}"
    );
    assert_eq!(ok["retries"], 0, "{ok}");

    let none = line_for(&lines, "/nowhere");
    assert_eq!(none["status"], 404);
    assert_eq!(none["service"], "unmatched");
    assert_eq!(none["reason"], "no route for this path");
    assert!(none["limit_outcome"].is_null() && none["upstream"].is_null());

    let unauth = line_for(&lines, "/secure/x");
    assert_eq!(unauth["status"], 401);
    assert_eq!(unauth["service"], "secure");
    let reason = unauth["reason"].as_str().unwrap();
    assert!(reason.contains("Authorization"), "{reason}");

    let allowed = line_for(&lines, "/limited/1");
    assert_eq!(
        (&allowed["status"], &allowed["limit_outcome"]),
        (&Value::from(200), &Value::from("allowed"))
    );
    for (path, protocol) in [("/limited/2", "HTTP/1.1"), ("/limited/h2", "HTTP/2.0")] {
        let limited = line_for(&lines, path);
        assert_eq!(limited["status"], 429, "{limited}");
        assert_eq!(limited["limit_outcome"], "limited");
        assert_eq!(limited["protocol"], protocol);
        assert!(limited["reason"].as_str().unwrap().contains("429"));
    }

    let h2 = line_for(&lines, "/web/h2");
    assert_eq!(h2["protocol"], "HTTP/2.0");
    assert_eq!(h2["status"], 200);

    let odd_line = line_for(&lines, odd);
    assert_eq!(odd_line["status"], odd_status);
    // The file is UTF-8 with the path's characters as they are, escaped where JSON needs it.
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(text.contains(r#""path":"/web/q\"u\\o/ünï✓""#), "{text}");
    let m = gw.metrics().await;
    assert!(m.contains("hexgate_access_log_dropped_total 0\n"), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_true_prints_the_seed_text_line_on_stdout() {
    let b = TestBackend::start(Behaviour::Hello).await;
    let yaml = loopback_config(
        "accessLog: true\n",
        &service("web", "/web/", &[&b.url()], ""),
    );
    let gw = Gateway::start(&yaml).await;
    gw.wait_ready().await;
    let (status, headers, _) = get_with(gw.port, "/web/x?q=1", &[]).await.unwrap();
    assert_eq!(status, 200);
    let id = headers["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(get(gw.port, "/none").await.unwrap().0, 404);
    // SIGUSR1 with no file to reopen: nothing happens, the gateway goes on.
    gw.signal("USR1");
    let deadline = Instant::now() + Duration::from_secs(10);
    let out = loop {
        let out = gw.stdout();
        if out.lines().count() >= 2 {
            break out;
        }
        assert!(Instant::now() < deadline, "stdout: {out}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let lines: Vec<&str> = out.lines().collect();
    // `127.0.0.1 "GET /web/x HTTP/1.1" 200 0.412ms service=web request_id=ID`
    let first = lines[0];
    let (head, rest) = first
        .split_once(" 200 ")
        .unwrap_or_else(|| panic!("{first}"));
    assert_eq!(head, "127.0.0.1 \"GET /web/x HTTP/1.1\"");
    let (ms, tail) = rest.split_once("ms ").unwrap();
    let (whole, frac) = ms.split_once('.').unwrap();
    assert!(
        whole.bytes().all(|c| c.is_ascii_digit()) && frac.len() == 3,
        "{first}"
    );
    assert_eq!(tail, format!("service=web request_id={id}"));
    assert!(
        lines[1].starts_with("127.0.0.1 \"GET /none HTTP/1.1\" 404 ")
            && lines[1].contains("ms service=unmatched request_id="),
        "{}",
        lines[1]
    );
    assert_eq!(get(gw.port, "/web/after").await.unwrap().0, 200);
    assert!(gw.log().contains("hexgate listening"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr1_reopens_the_file_after_logrotate_renamed_it() {
    let b = TestBackend::start(Behaviour::Hello).await;
    let dir = temp_dir("accesslog-rotate");
    std::fs::create_dir_all(dir.join("logs")).unwrap();
    let svc = service("web", "/web/", &[&b.url()], "");
    let yaml = loopback_config("accessLog: {path: logs/access.log}\n", &svc);
    let mut gw = Gateway::start_in(dir.clone(), &yaml).await;
    gw.wait_ready().await;
    let file = dir.join("logs/access.log");
    let rotated = dir.join("logs/access.log.1");

    for i in 0..10 {
        assert_eq!(get(gw.port, &format!("/web/a{i}")).await.unwrap().0, 200);
    }
    wait_lines(&file, |l| l.len() == 10).await;
    std::fs::rename(&file, &rotated).unwrap();
    // Made after the rename, before the signal: the writer still holds the old file.
    for i in 0..5 {
        assert_eq!(get(gw.port, &format!("/web/b{i}")).await.unwrap().0, 200);
    }
    gw.signal("USR1");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !file.exists() {
        assert!(Instant::now() < deadline, "no fresh file after SIGUSR1");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for i in 0..10 {
        assert_eq!(get(gw.port, &format!("/web/c{i}")).await.unwrap().0, 200);
    }
    let new = wait_lines(&file, |l| l.len() >= 10).await;
    let old = wait_lines(&rotated, |l| l.len() >= 15).await;
    let want = |prefix: &str, n: usize| {
        let mut v: Vec<String> = (0..n).map(|i| format!("/web/{prefix}{i}")).collect();
        v.sort();
        v
    };
    let mut before = [want("a", 10), want("b", 5)].concat();
    before.sort();
    assert_eq!(paths(&old), before, "no line lost or written twice");
    assert_eq!(paths(&new), want("c", 10));

    // A reload that moves the log: the next requests go to the new file.
    gw.rewrite_config(&loopback_config(
        "accessLog: {path: logs/other.log, format: json}\n",
        &svc,
    ));
    gw.wait_reloads(2).await; // the start counts as the first
    assert_eq!(get(gw.port, "/web/moved").await.unwrap().0, 200);
    let other = wait_lines(&dir.join("logs/other.log"), |l| !l.is_empty()).await;
    assert_eq!(paths(&other), ["/web/moved"]);

    // Still alive after all that, and the last lines are written on a graceful stop.
    assert_eq!(get(gw.port, "/web/last").await.unwrap().0, 200);
    gw.signal("TERM");
    assert_eq!(gw.wait_exit(Duration::from_secs(15)), Some(0));
    let text = std::fs::read_to_string(dir.join("logs/other.log")).unwrap();
    assert_eq!(paths(&parse_lines(&text)), ["/web/last", "/web/moved"]);
}

#[test]
fn validate_refuses_a_file_in_a_missing_directory() {
    let yaml = "gatewayPort: 18080\nservices: []\naccessLog:\n  format: json\n  path: /nonexistent-hexgate-dir/access.log\n";
    let (code, _, err) = validate_yaml(yaml, &[]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("config.yaml:5: accessLog.path: ")
            && err.contains("/nonexistent-hexgate-dir")
            && err.contains("does not exist"),
        "{err}"
    );
    let ok = "gatewayPort: 18080\nservices: []\naccessLog: {path: here.log}\n";
    let (code, _, err) = validate_yaml(ok, &[]);
    assert_eq!(code, 0, "{err}");
}

/// `trace_id`: without `tracing`, the client's valid `traceparent`'s trace (else null); with
/// it, the request's trace as sent upstream, sampled or not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_id_is_the_clients_without_tracing_and_the_gateways_with_it() {
    use crate::otel::{Collector, TraceBackend, Traceparent, Wire};
    let b = TraceBackend::start().await;
    let svc = service("web", "/web/", &[&b.url()], "");
    let client_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let sampled = format!("00-{client_trace}-00f067aa0ba902b7-01");
    let unsampled = format!("00-{client_trace}-00f067aa0ba902b7-00");
    let send = |port: u16, path: &'static str, tp: Option<String>| async move {
        let fields: Vec<(&str, &str)> = tp.iter().map(|t| ("traceparent", t.as_str())).collect();
        let (s, _, _) = get_with(port, path, &fields).await.unwrap();
        assert_eq!(s, 200, "{path}");
    };

    // Tracing off.
    let dir = temp_dir("accesslog-trace-off");
    let gw = Gateway::start_in(
        dir.clone(),
        &loopback_config("accessLog: {format: json, path: access.log}\n", &svc),
    )
    .await;
    send(gw.port, "/web/none", None).await;
    send(gw.port, "/web/client", Some(sampled.clone())).await;
    send(gw.port, "/web/upper", Some(sampled.to_uppercase())).await;
    let lines = wait_lines(&dir.join("access.log"), |l| l.len() >= 3).await;
    assert!(line_for(&lines, "/web/none")["trace_id"].is_null());
    assert_eq!(line_for(&lines, "/web/client")["trace_id"], client_trace);
    assert!(
        line_for(&lines, "/web/upper")["trace_id"].is_null(),
        "an invalid traceparent is no trace"
    );
    // A gateway without tracing passes the client's context on untouched.
    let seen = b.seen_for("/web/client");
    assert_eq!(seen.traceparent, [sampled.as_str()]);
    assert!(b.seen_for("/web/none").traceparent.is_empty());
    drop(gw);

    // Tracing on (ratio 1): the gateway's trace, as the backend got it.
    let collector = Collector::start(Wire::Http).await;
    let dir = temp_dir("accesslog-trace-on");
    let top = format!(
        "accessLog: {{format: json, path: access.log}}\ntracing:\n  otlpEndpoint: \"{}\"\n  sampleRatio: 1\n",
        collector.url()
    );
    let gw = Gateway::start_in(dir.clone(), &loopback_config(&top, &svc)).await;
    send(gw.port, "/web/new", None).await;
    send(gw.port, "/web/joined", Some(sampled.clone())).await;
    send(gw.port, "/web/unsampled", Some(unsampled.clone())).await;
    send(gw.port, "/web/bad", Some(sampled.to_uppercase())).await;
    let lines = wait_lines(&dir.join("access.log"), |l| l.len() >= 4).await;
    for path in ["/web/new", "/web/joined", "/web/unsampled", "/web/bad"] {
        let seen = b.seen_for(path);
        assert_eq!(seen.traceparent.len(), 1, "{path}: {seen:?}");
        let up = Traceparent::parse(&seen.traceparent[0]);
        assert_eq!(
            line_for(&lines, path)["trace_id"],
            up.trace.as_str(),
            "{path}"
        );
        let want_client = matches!(path, "/web/joined" | "/web/unsampled");
        assert_eq!(up.trace == client_trace, want_client, "{path}: {up:?}");
        assert_eq!(up.flags, if path == "/web/unsampled" { "00" } else { "01" });
    }
    // The sampled ones reached the collector under the logged trace id.
    let new = line_for(&lines, "/web/new")["trace_id"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(!collector.wait_trace(&new).await.is_empty());
    drop(gw);

    // Tracing on, ratio 0: an unsampled new trace still has its id in the log.
    let dir = temp_dir("accesslog-trace-zero");
    let gw = Gateway::start_in(
        dir.clone(),
        &loopback_config(&top.replace("sampleRatio: 1", "sampleRatio: 0"), &svc),
    )
    .await;
    send(gw.port, "/web/zero", None).await;
    let lines = wait_lines(&dir.join("access.log"), |l| !l.is_empty()).await;
    let up = Traceparent::parse(&b.seen_for("/web/zero").traceparent[0]);
    assert_eq!(up.flags, "00");
    assert_eq!(line_for(&lines, "/web/zero")["trace_id"], up.trace.as_str());
}
