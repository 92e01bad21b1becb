//! OpenMetrics exposition and exemplars on the request duration histogram, through the real
//! gateway: /metrics answers OpenMetrics 1.0 when the scraper's `Accept` asks for it (as
//! Prometheus does) and the Prometheus text format 0.0.4 otherwise. The OpenMetrics text is
//! checked with python prometheus_client's strict parser (from the `.venv` that
//! `bash scripts/setup.sh` makes), the text format with `promtool check metrics`; a sampled
//! request's trace id appears as the exemplar of its duration bucket, in OpenMetrics only.

use std::collections::BTreeSet;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value;

use crate::consumer_metrics::promtool_parses;
use crate::support::*;

/// What Prometheus sends when it scrapes (its default `scrape_protocols`).
const PROMETHEUS_ACCEPT: &str = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
const OPENMETRICS_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const TEXT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
const DURATION: &str = "hexgate_http_request_duration_seconds";
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

// ---------------------------------------------------------------------------------------------
// The checkers

/// `.venv/bin/python` in the repo root; fails naming the setup script when it or
/// prometheus_client is missing (never skips: an unchecked exposition is no test).
fn python() -> PathBuf {
    let py = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    let ok = py.exists()
        && Command::new(&py)
            .args(["-c", "import prometheus_client.openmetrics.parser"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
    assert!(
        ok,
        "{} with prometheus_client is missing: run `bash scripts/setup.sh` (make setup) first",
        py.display()
    );
    py
}

/// Parses stdin with the OpenMetrics parser (`om`) or the text format parser, and prints the
/// families as JSON.
const PARSE: &str = r#"
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families as om
from prometheus_client.parser import text_string_to_metric_families as text
parse = om if sys.argv[1] == "om" else text
families = []
for f in parse(sys.stdin.read()):
    samples = []
    for s in f.samples:
        e = s.exemplar
        samples.append({
            "name": s.name, "labels": s.labels, "value": s.value,
            "exemplar": None if e is None else {
                "labels": e.labels, "value": e.value,
                "timestamp": None if e.timestamp is None else float(e.timestamp),
            },
        })
    families.append({"name": f.name, "type": f.type, "samples": samples})
print(json.dumps(families))
"#;

/// The families python's parser finds in `text` (`om`: the strict OpenMetrics parser, else the
/// text format's); fails with the parser's error and the text when it refuses it.
fn parse(text: &str, om: bool) -> Vec<Value> {
    let mut child = Command::new(python())
        .args(["-c", PARSE, if om { "om" } else { "text" }])
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
    assert!(
        out.status.success(),
        "prometheus_client refused the exposition: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice::<Value>(&out.stdout)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

/// GET /metrics with `Accept` when given: (Content-Type, Vary, body).
async fn scrape(gw: &Gateway, accept: Option<&str>) -> (String, String, String) {
    let fields: Vec<(&str, &str)> = accept.map(|a| ("accept", a)).into_iter().collect();
    let (status, headers, body) = get_with(gw.admin_port, "/metrics", &fields).await.unwrap();
    assert_eq!(status, 200, "{body}");
    let header = |name: &str| {
        headers
            .get(name)
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default()
    };
    (header("content-type"), header("vary"), body)
}

/// The family called `name` (as the parser names it).
fn family<'a>(families: &'a [Value], name: &str) -> &'a Value {
    families
        .iter()
        .find(|f| f["name"] == name)
        .unwrap_or_else(|| panic!("no family {name}"))
}

/// The samples of `name` whose labels include every pair of `labels`.
fn samples<'a>(families: &'a [Value], name: &str, labels: &[(&str, &str)]) -> Vec<&'a Value> {
    families
        .iter()
        .flat_map(|f| f["samples"].as_array().unwrap())
        .filter(|s| s["name"] == name && labels.iter().all(|(k, v)| s["labels"][*k] == *v))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The gateway

/// Backends, the gateway, and the API key of consumer `acme`.
struct Setup {
    gw: Gateway,
    key: String,
    /// The backends of `down`: healthy at start, stopped by [`traffic`].
    down: [TestBackend; 2],
    _backends: [TestBackend; 2],
}

/// `hexgate apikey new --consumer acme`: (the key, its YAML entry).
fn apikey_new() -> (String, String) {
    let out = Command::new(bin())
        .args(["apikey", "new", "--consumer", "acme"])
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

/// A gateway with a route for each kind of series: `web` (plain), `limited` (a rate limit),
/// `keys` (API keys, so consumer series), `down` (backends that die after the first health
/// check, retried), `slow` (maxInFlight 1, so load shedding), `canary` (splits). `top` adds
/// top-level lines.
async fn start(name: &str, top: &str) -> Setup {
    let hello = TestBackend::start(Behaviour::Hello).await;
    let slow = TestBackend::start(Behaviour::Slow(Duration::from_millis(600))).await;
    let dir = temp_dir(name);
    let (key, entry) = apikey_new();
    std::fs::write(dir.join("keys.yaml"), entry).unwrap();
    let down = [
        TestBackend::start(Behaviour::Hello).await,
        TestBackend::start(Behaviour::Hello).await,
    ];
    let h = hello.url();
    let services = [
        service("web", "/web/", &[&h], ""),
        service(
            "limited",
            "/limited/",
            &[&h],
            "    rateLimiting: {enabled: true, ratePerSecond: 1, burst: 1}\n",
        ),
        service(
            "keys",
            "/keys/",
            &[&h],
            "    authentication: {enabled: true, methods: [apiKey]}\n",
        ),
        service(
            "down",
            "/down/",
            &[&down[0].url(), &down[1].url()],
            "    retries: 1\n    retryOn: [connect-failure]\n",
        ),
        service("slow", "/slow/", &[&slow.url()], "    maxInFlight: 1\n"),
        format!(
            "  - name: canary\n    path: /canary/\n    split:\n      - {{name: stable, weight: 50, backends: [\"{h}\"]}}\n      - {{name: beta, weight: 50, backends: [\"{h}\"]}}\n"
        ),
    ]
    .concat();
    let yaml = loopback_config(
        &format!("healthCheckInterval: 30\napiKeys: {{file: \"{{dir}}/keys.yaml\"}}\n{top}"),
        &services,
    );
    let gw = Gateway::start_in(dir, &yaml).await;
    Setup {
        gw,
        key,
        down,
        _backends: [hello, slow],
    }
}

/// Traffic that gives every family of the registry a series: answers, a 404 (no route), a 429
/// (rate limit), a 401 (no API key), a consumer's request, 503s (backends gone since their
/// health check: a connect failure, retried; maxInFlight), requests to splits.
async fn traffic(s: &Setup) {
    let port = s.gw.port;
    let status = |path: &'static str, fields: Vec<(&'static str, String)>| async move {
        let fields: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
        get_with(port, path, &fields).await.unwrap().0
    };
    for _ in 0..3 {
        assert_eq!(status("/web/a", vec![]).await, 200);
    }
    assert_eq!(status("/nowhere", vec![]).await, 404);
    let limited = [
        status("/limited/a", vec![]).await,
        status("/limited/a", vec![]).await,
    ];
    assert!(limited.contains(&429), "{limited:?}\n{}", s.gw.log());
    assert_eq!(status("/keys/a", vec![]).await, 401);
    assert_eq!(
        status("/keys/a", vec![("x-api-key", s.key.clone())]).await,
        200,
        "{}",
        s.gw.log()
    );
    for b in &s.down {
        b.stop();
    }
    // Every backend refused the connection: 503.
    assert_eq!(status("/down/a", vec![]).await, 503, "{}", s.gw.log());
    for _ in 0..4 {
        assert_eq!(status("/canary/a", vec![]).await, 200);
    }
    // One request held at the slow backend, the next one refused by maxInFlight.
    let held = tokio::spawn(get(port, "/slow/a"));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(status("/slow/b", vec![]).await, 503, "{}", s.gw.log());
    assert_eq!(held.await.unwrap().unwrap().0, 200);
}

// ---------------------------------------------------------------------------------------------
// The tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openmetrics_when_prometheus_asks_and_the_strict_parser_accepts_it() {
    let s = start("om-strict", "").await;
    traffic(&s).await;
    let (content_type, vary, om) = scrape(&s.gw, Some(PROMETHEUS_ACCEPT)).await;
    assert_eq!(content_type, OPENMETRICS_TYPE);
    assert!(vary.eq_ignore_ascii_case("accept"), "{vary:?}");
    assert!(om.ends_with("\n# EOF\n"), "{om}");
    assert!(!om.contains("\n\n"), "a blank line:\n{om}");
    let families = parse(&om, true);

    // Counter families are named without `_total`, their samples with it; no other family
    // ends in `_total`.
    let mut counters = BTreeSet::new();
    for f in &families {
        let name = f["name"].as_str().unwrap();
        assert!(!name.ends_with("_total"), "{name}");
        assert!(
            ["counter", "gauge", "histogram"].contains(&f["type"].as_str().unwrap()),
            "{f}"
        );
        if f["type"] == "counter" {
            counters.insert(name.to_string());
            for sample in f["samples"].as_array().unwrap() {
                assert_eq!(sample["name"], format!("{name}_total"), "{sample}");
            }
        }
    }
    // Every counter of the exposition, each with a series from the traffic above (or always
    // rendered).
    for (counter, labels) in [
        (
            "hexgate_http_requests",
            vec![("service", "web"), ("code", "200")],
        ),
        (
            "hexgate_http_requests",
            vec![("service", "unmatched"), ("code", "404")],
        ),
        (
            "hexgate_http_requests",
            vec![("service", "limited"), ("code", "429")],
        ),
        (
            "hexgate_http_requests",
            vec![("service", "slow"), ("code", "503")],
        ),
        (
            "hexgate_upstream_errors",
            vec![("service", "down"), ("reason", "connect_failed")],
        ),
        (
            "hexgate_upstream_retries",
            vec![("service", "down"), ("reason", "connect_failure")],
        ),
        ("hexgate_split_requests", vec![("service", "canary")]),
        (
            "hexgate_auth_failures",
            vec![("service", "keys"), ("reason", "apikey_missing")],
        ),
        (
            "hexgate_ratelimit_decisions",
            vec![("service", "limited"), ("result", "limited")],
        ),
        (
            "hexgate_consumer_requests",
            vec![("service", "keys"), ("consumer", "acme")],
        ),
        ("hexgate_quota_ledger_changes", vec![("action", "reset")]),
        ("hexgate_redis_errors", vec![]),
        ("hexgate_jwks_refreshes", vec![("result", "success")]),
        ("hexgate_config_reloads", vec![("result", "success")]),
        ("hexgate_access_log_dropped", vec![]),
        ("hexgate_tracing_dropped_spans", vec![]),
        ("hexgate_tracing_exported_spans", vec![]),
        ("hexgate_consul_errors", vec![]),
        ("hexgate_load_shed", vec![("service", "slow")]),
    ] {
        assert!(
            counters.contains(counter),
            "{counter} is not a counter:\n{om}"
        );
        let found = samples(&families, &format!("{counter}_total"), &labels);
        assert!(!found.is_empty(), "no {counter}_total{labels:?}:\n{om}");
    }
    // The families without a series here (gRPC) are declared all the same.
    assert!(counters.contains("hexgate_grpc_requests"), "{om}");
    assert_eq!(
        family(&families, "hexgate_in_flight_requests")["type"],
        "gauge"
    );
    assert_eq!(
        family(&families, "hexgate_upstream_healthy")["type"],
        "gauge"
    );
    assert_eq!(
        family(&families, "hexgate_upstream_request_duration_seconds")["type"],
        "histogram"
    );

    // The duration histogram: canonical `le` values, ascending to +Inf, the count equal to it.
    assert_eq!(family(&families, DURATION)["type"], "histogram");
    let buckets = samples(
        &families,
        &format!("{DURATION}_bucket"),
        &[("service", "web"), ("method", "GET")],
    );
    let les: Vec<&str> = buckets
        .iter()
        .map(|b| b["labels"]["le"].as_str().unwrap())
        .collect();
    assert_eq!(
        les,
        [
            "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1.0", "2.5", "5.0", "10.0",
            "+Inf"
        ]
    );
    assert_eq!(buckets[11]["value"], 3.0);
    let count = samples(
        &families,
        &format!("{DURATION}_count"),
        &[("service", "web"), ("method", "GET")],
    );
    assert_eq!(count[0]["value"], 3.0);
    // Nothing sampled a trace here: no exemplars.
    assert!(!om.contains(" # {"), "{om}");

    // The same series as the text format (its `le` written 1 where OpenMetrics writes 1.0).
    let (_, _, text) = scrape(&s.gw, None).await;
    let series = |families: &[Value]| -> BTreeSet<String> {
        families
            .iter()
            .flat_map(|f| f["samples"].as_array().unwrap().clone())
            .filter(|s| !s["name"].as_str().unwrap().ends_with("_created"))
            .map(|s| {
                let mut labels = s["labels"].as_object().unwrap().clone();
                if let Some(le) = labels.get_mut("le") {
                    let v: f64 = match le.as_str().unwrap() {
                        "+Inf" => f64::INFINITY,
                        x => x.parse().unwrap(),
                    };
                    *le = Value::String(v.to_string());
                }
                format!("{}{:?}", s["name"].as_str().unwrap(), labels)
            })
            .collect()
    };
    assert_eq!(series(&families), series(&parse(&text, false)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_text_format_otherwise_and_promtool_accepts_it() {
    let s = start("om-text", "").await;
    traffic(&s).await;
    for accept in [
        None,
        Some("text/plain"),
        Some("text/plain;version=0.0.4;q=1,*/*;q=0.1"),
        Some("*/*"),
        // Listed, but not acceptable.
        Some("application/openmetrics-text;version=1.0.0;q=0,text/plain;q=0.5"),
    ] {
        let (content_type, vary, text) = scrape(&s.gw, accept).await;
        assert_eq!(content_type, TEXT_TYPE, "Accept: {accept:?}");
        assert!(vary.eq_ignore_ascii_case("accept"), "{vary:?}");
        assert!(
            !text.contains(" # {"),
            "an exemplar in the text format:\n{text}"
        );
        assert!(!text.contains("# EOF"), "{text}");
        // The text format names counter families with `_total`, as before.
        assert!(
            text.contains("# TYPE hexgate_http_requests_total counter\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "hexgate_http_requests_total{service=\"limited\",method=\"GET\",code=\"429\"} "
            ),
            "{text}"
        );
        promtool_parses(&text);
    }
}

/// Needs the tracing half of the issue: the gateway records a sampled request's duration with
/// its trace id (`ServiceMetrics::record_traced`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exemplars_carry_sampled_trace_ids() {
    // The collector's port is closed: spans are dropped, exemplars are kept all the same.
    let top = format!(
        "tracing: {{otlpEndpoint: \"http://127.0.0.1:{}\", sampleRatio: 1.0}}\n",
        free_port()
    );
    let s = start("om-exemplars", &top).await;
    // A sampled incoming trace is always kept.
    let (status, _, body) = get_with(s.gw.port, "/web/traced", &[("traceparent", TRACEPARENT)])
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");

    let (content_type, _, om) = scrape(&s.gw, Some(PROMETHEUS_ACCEPT)).await;
    assert_eq!(content_type, OPENMETRICS_TYPE);
    let want = format!("trace_id=\"{TRACE_ID}\"");
    let line = om
        .lines()
        .find(|l| {
            l.starts_with(&format!("{DURATION}_bucket{{service=\"web\",")) && l.contains(&want)
        })
        .unwrap_or_else(|| panic!("no exemplar with {want}:\n{om}\n{}", s.gw.log()));
    assert!(line.contains(" # {"), "{line}");

    // Python's parser takes it as the exemplar of one bucket, with the request's duration
    // (within that bucket) and a recent timestamp.
    let families = parse(&om, true);
    let with: Vec<&Value> = samples(
        &families,
        &format!("{DURATION}_bucket"),
        &[("service", "web")],
    )
    .into_iter()
    .filter(|b| b["exemplar"]["labels"]["trace_id"] == TRACE_ID)
    .collect();
    assert_eq!(with.len(), 1, "{om}");
    let bucket = with[0];
    let exemplar = &bucket["exemplar"];
    let le = match bucket["labels"]["le"].as_str().unwrap() {
        "+Inf" => f64::INFINITY,
        x => x.parse::<f64>().unwrap(),
    };
    let value = exemplar["value"].as_f64().unwrap();
    assert!(value > 0.0 && value <= le, "{bucket}");
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let at = exemplar["timestamp"].as_f64().unwrap();
    assert!((now - at).abs() < 60.0, "{bucket}");
    // Exemplars only on buckets.
    for f in &families {
        for sample in f["samples"].as_array().unwrap() {
            if !sample["exemplar"].is_null() {
                assert!(
                    sample["name"].as_str().unwrap().ends_with("_bucket"),
                    "{sample}"
                );
            }
        }
    }

    // Never in the text format.
    let (_, _, text) = scrape(&s.gw, None).await;
    assert!(!text.contains(TRACE_ID), "{text}");
    promtool_parses(&text);
}
