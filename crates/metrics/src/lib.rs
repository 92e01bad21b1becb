//! Prometheus metrics: names as constants, lock-free handles resolved per routing snapshot (the
//! request path never hashes a label set), and the text exposition written at scrape time.
//!
//! Two expositions, chosen per scrape ([`Format`]): the Prometheus text format 0.0.4 and
//! OpenMetrics 1.0. They carry the same series; OpenMetrics adds exemplars on the request
//! duration buckets (the trace id of a sampled request, so a dashboard can jump from a latency
//! spike to its trace), names counter families without `_total` and ends with `# EOF`.
//!
//! One series set is not fixed in advance: `hexgate_consumer_requests_total{service,consumer,code}`
//! names at most [`consumers::TOP`] consumers per service (a Space-Saving sketch picks them, see
//! [`consumers`]) and counts everyone else under `consumer="other"`, so its size stays bounded
//! whatever the number of consumers.

pub mod consumers;

use std::borrow::Cow;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Labels of `hexgate_auth_failures_total{reason}`, in a fixed order for lock-free counters.
pub const AUTH_REASONS: [&str; 21] = [
    "missing",
    "malformed",
    "too_large",
    "algorithm",
    "unknown_kid",
    "no_key",
    "bad_signature",
    "expired",
    "missing_exp",
    "not_yet_valid",
    "issuer",
    "audience",
    "no_consumer",
    "apikey_missing",
    "apikey_malformed",
    "apikey_unknown",
    "apikey_expired",
    "insufficient_scope",
    "plan_unknown",
    "plan_missing",
    "ip_denied",
];
/// Labels of `hexgate_upstream_errors_total{reason}`, in counter order.
pub const UPSTREAM_REASONS: [&str; 12] = [
    "connect_failed",
    "connect_timeout",
    "tls_unknown_ca",
    "tls_name_mismatch",
    "tls_expired",
    "tls_client_cert_required",
    "tls_client_cert_refused",
    "tls_handshake",
    "response_timeout",
    "connection_error",
    "stream_reset",
    "grpc_needs_http2",
];
/// Labels of `hexgate_upstream_retries_total{reason}`, in counter order.
pub const RETRY_REASONS: [&str; 6] = ["connect_failure", "reset", "500", "502", "503", "504"];
/// Labels of `hexgate_ratelimit_decisions_total{result}`, in counter order.
pub const LIMIT_RESULTS: [&str; 4] = ["allowed", "limited", "failed_open", "failed_closed"];
/// Labels of `hexgate_ratelimit_decisions_total{limit}`, in counter order.
pub const LIMITS: [&str; 4] = ["rate", "quota", "plan_rate", "plan_quota"];
/// Labels of `hexgate_quota_ledger_changes_total{action}`, in counter order.
pub const LEDGER_ACTIONS: [&str; 2] = ["reset", "credit"];

pub const HTTP_REQUESTS_TOTAL: &str = "hexgate_http_requests_total";
pub const HTTP_REQUEST_DURATION: &str = "hexgate_http_request_duration_seconds";
pub const UPSTREAM_REQUEST_DURATION: &str = "hexgate_upstream_request_duration_seconds";
pub const UPSTREAM_HEALTHY: &str = "hexgate_upstream_healthy";
pub const OPEN_CONNECTIONS: &str = "hexgate_open_connections";
pub const CONFIG_RELOADS_TOTAL: &str = "hexgate_config_reloads_total";
pub const CONFIG_LAST_RELOAD_SUCCESS: &str = "hexgate_config_last_reload_success_timestamp_seconds";
pub const UPSTREAM_ERRORS_TOTAL: &str = "hexgate_upstream_errors_total";
pub const GRPC_REQUESTS_TOTAL: &str = "hexgate_grpc_requests_total";
pub const AUTH_FAILURES_TOTAL: &str = "hexgate_auth_failures_total";
pub const JWKS_REFRESHES_TOTAL: &str = "hexgate_jwks_refreshes_total";
pub const RATELIMIT_DECISIONS_TOTAL: &str = "hexgate_ratelimit_decisions_total";
pub const REDIS_ERRORS_TOTAL: &str = "hexgate_redis_errors_total";
pub const REDIS_REQUEST_DURATION: &str = "hexgate_redis_request_duration_seconds";
/// Authenticated requests by service, consumer (the top [`consumers::TOP`] per service, the
/// rest as `other`) and status code.
pub const CONSUMER_REQUESTS_TOTAL: &str = "hexgate_consumer_requests_total";
/// Quota ledger changes made through the admin endpoints, by action ([`LEDGER_ACTIONS`]).
pub const QUOTA_LEDGER_CHANGES_TOTAL: &str = "hexgate_quota_ledger_changes_total";

/// Retries on another backend, by service and reason ([`RETRY_REASONS`]).
pub const UPSTREAM_RETRIES_TOTAL: &str = "hexgate_upstream_retries_total";
/// Retries refused by a route's `retryBudget`, by service.
pub const UPSTREAM_RETRY_BUDGET_EXHAUSTED_TOTAL: &str =
    "hexgate_upstream_retry_budget_exhausted_total";
/// Requests sent to a route's splits, by service, split and status code.
pub const SPLIT_REQUESTS_TOTAL: &str = "hexgate_split_requests_total";

/// Access log lines not written: the writer's queue was full, or the file could not be written.
pub const ACCESS_LOG_DROPPED_TOTAL: &str = "hexgate_access_log_dropped_total";

/// Spans the tracer dropped: its export queue was full, or the collector failed or timed out.
pub const TRACING_DROPPED_SPANS_TOTAL: &str = "hexgate_tracing_dropped_spans_total";
/// Spans the OTLP collector accepted.
pub const TRACING_EXPORTED_SPANS_TOTAL: &str = "hexgate_tracing_exported_spans_total";

/// Service label used for requests that matched no route.
pub const UNMATCHED: &str = "unmatched";

const BUCKETS: [f64; 11] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Methods with their own handle; anything else is counted as "OTHER".
pub const METHODS: [&str; 8] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "OTHER",
];

/// Status codes with their own slot; others go to a small locked list (rare).
const CODES: [u16; 24] = [
    200, 201, 202, 204, 206, 301, 302, 304, 307, 308, 400, 401, 403, 404, 405, 408, 413, 429, 431,
    500, 501, 502, 503, 504,
];

/// An exposition format, chosen per scrape from the `Accept` header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// The Prometheus text format 0.0.4: what every scraper reads; no exemplars (promtool and
    /// older Prometheus refuse them there).
    Text,
    /// OpenMetrics 1.0: exemplars on the request duration buckets, counter families named
    /// without `_total`, `# EOF` at the end.
    OpenMetrics,
}

impl Format {
    /// The `Content-Type` of an exposition in this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Text => "text/plain; version=0.0.4; charset=utf-8",
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }

    /// The name of a family in its `# HELP` and `# TYPE` lines. OpenMetrics names a counter
    /// family without the `_total` its samples carry (a strict parser refuses
    /// `# TYPE x_total counter`: the family `x_total` would own a sample `x_total_total`).
    pub fn family(self, name: &str, kind: Kind) -> &str {
        match (self, kind) {
            (Format::OpenMetrics, Kind::Counter) => name.strip_suffix("_total").unwrap_or(name),
            _ => name,
        }
    }

    /// Ends an exposition: OpenMetrics requires `# EOF` as its last line (a scraper takes an
    /// exposition without it as cut short).
    pub fn finish(self, out: &mut String) {
        if self == Format::OpenMetrics {
            out.push_str("# EOF\n");
        }
    }
}

/// The type of a metric family, for its `# TYPE` line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// Writes a family's `# HELP` and `# TYPE` lines (its samples follow). `name` is the sample name
/// (`..._total` for a counter); the family name is derived per format ([`Format::family`]).
/// HELP text is escaped as the format wants: backslash and newline, and in OpenMetrics also the
/// double quote.
pub fn write_header(out: &mut String, format: Format, name: &str, kind: Kind, help: &str) {
    let family = format.family(name, kind);
    out.push_str("# HELP ");
    out.push_str(family);
    out.push(' ');
    for ch in help.chars() {
        match ch {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '"' if format == Format::OpenMetrics => out.push_str("\\\""),
            c => out.push(c),
        }
    }
    out.push('\n');
    let _ = writeln!(out, "# TYPE {family} {}", kind.as_str());
}

/// One counter per service and reason: HELP and TYPE, then each non-zero series (and, with
/// `first_always`, the first reason's even at zero, so every service has a series from the start).
#[allow(clippy::too_many_arguments)]
fn render_by_reason(
    out: &mut String,
    format: Format,
    name: &str,
    help: &str,
    services: &[Arc<ServiceMetrics>],
    reasons: &[&str],
    counts: impl Fn(&ServiceMetrics) -> &[AtomicU64],
    first_always: bool,
) {
    write_header(out, format, name, Kind::Counter, help);
    for s in services {
        for (i, (reason, c)) in reasons.iter().zip(counts(s)).enumerate() {
            let v = c.load(Ordering::Relaxed);
            if v > 0 || (first_always && i == 0) {
                let _ = writeln!(
                    out,
                    "{name}{{service=\"{}\",reason=\"{reason}\"}} {v}",
                    s.name
                );
            }
        }
    }
}

/// A label value as the text format wants it: backslash, double quote and newline escaped.
pub fn escape_label(v: &str) -> Cow<'_, str> {
    if !v.contains(['\\', '"', '\n']) {
        return Cow::Borrowed(v);
    }
    let mut out = String::with_capacity(v.len() + 8);
    for ch in v.chars() {
        match ch {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

pub fn method_index(m: &http::Method) -> usize {
    match *m {
        http::Method::GET => 0,
        http::Method::HEAD => 1,
        http::Method::POST => 2,
        http::Method::PUT => 3,
        http::Method::DELETE => 4,
        http::Method::PATCH => 5,
        http::Method::OPTIONS => 6,
        _ => 7,
    }
}

/// The latest sampled observation of one bucket: what an OpenMetrics exemplar shows.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Exemplar {
    /// A W3C trace id (never 0: an all-zero trace id is invalid).
    trace_id: u128,
    /// The observed value, in seconds: within the bucket's range by construction.
    value: f64,
    /// When it was observed, in milliseconds since the Unix epoch.
    at_ms: u64,
}

/// One exemplar slot per bucket, the last one for `+Inf` (values above the last finite bound).
/// A slot is written with `try_lock`: a request that finds it taken (another request or a
/// scrape) skips storing rather than wait.
type ExemplarSlots = [Mutex<Option<Exemplar>>; BUCKETS.len() + 1];

/// A latency histogram over [`BUCKETS`] (seconds). Observing is a few relaxed atomic adds; a
/// traced observation also leaves its trace id as the exemplar of its bucket.
#[derive(Default)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_nanos: AtomicU64,
    /// Allocated by the first traced observation, so histograms that never see one (upstream,
    /// Redis, services without tracing) carry a pointer rather than twelve slots.
    exemplars: OnceLock<Box<ExemplarSlots>>,
}

impl Histogram {
    /// Records `d`: its bucket, the count and the sum; no exemplar is touched.
    pub fn observe(&self, d: Duration) {
        self.add(d);
    }

    /// Records `d` as [`Self::observe`] does and keeps `trace_id` (a W3C trace id; 0, invalid,
    /// keeps none) as the exemplar of the bucket `d` falls in, replacing the one before: the
    /// OpenMetrics exposition shows the latest sampled request of each bucket. Never waits: when
    /// the bucket's slot is busy the exemplar is not stored.
    pub fn observe_with_exemplar(&self, d: Duration, trace_id: u128) {
        let i = self.add(d);
        if trace_id == 0 {
            return;
        }
        let at_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|t| t.as_millis() as u64)
            .unwrap_or(0);
        let slots = self.exemplars.get_or_init(Box::default);
        if let Some(Ok(mut slot)) = slots.get(i).map(Mutex::try_lock) {
            *slot = Some(Exemplar {
                trace_id,
                value: d.as_secs_f64(),
                at_ms,
            });
        }
    }

    /// Counts `d`; returns the index of its bucket (`BUCKETS.len()`: `+Inf` only).
    #[inline]
    fn add(&self, d: Duration) -> usize {
        let secs = d.as_secs_f64();
        let i = BUCKETS.iter().position(|b| secs <= *b);
        if let Some(i) = i {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_nanos
            .fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
        i.unwrap_or(BUCKETS.len())
    }

    /// The exemplar of bucket `i` (`BUCKETS.len()`: `+Inf`), if one was kept.
    fn exemplar(&self, i: usize) -> Option<Exemplar> {
        let slot = self.exemplars.get()?.get(i)?;
        match slot.lock() {
            Ok(e) => *e,
            Err(p) => *p.into_inner(),
        }
    }

    /// Writes the series; `labels` may be empty (then the series carry only `le`). OpenMetrics
    /// gets canonical `le` values (`1.0`, not `1`) and each bucket's exemplar.
    fn write(&self, out: &mut String, format: Format, name: &str, labels: &str) {
        let (prefix, own) = if labels.is_empty() {
            (String::new(), String::new())
        } else {
            (format!("{labels},"), format!("{{{labels}}}"))
        };
        let mut cum = 0;
        for (i, b) in BUCKETS.iter().enumerate() {
            cum += self.buckets[i].load(Ordering::Relaxed);
            match format {
                Format::Text => {
                    let _ = write!(out, "{name}_bucket{{{prefix}le=\"{b}\"}} {cum}");
                }
                Format::OpenMetrics => {
                    let _ = write!(
                        out,
                        "{name}_bucket{{{prefix}le=\"{}\"}} {cum}",
                        canonical_float(*b)
                    );
                    self.write_exemplar(out, i);
                }
            }
            out.push('\n');
        }
        // Read after the buckets: an observation counted in its bucket but not yet in `count`
        // must not make the +Inf bucket smaller than the one before it.
        let count = self.count.load(Ordering::Relaxed).max(cum);
        let _ = write!(out, "{name}_bucket{{{prefix}le=\"+Inf\"}} {count}");
        if format == Format::OpenMetrics {
            self.write_exemplar(out, BUCKETS.len());
        }
        out.push('\n');
        let sum = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "{name}_sum{own} {sum}");
        let _ = writeln!(out, "{name}_count{own} {count}");
    }

    /// Appends ` # {trace_id="<32 hex>"} <value> <unix seconds.ms>` when bucket `i` has an
    /// exemplar (its labels are 40 characters, under OpenMetrics' 128).
    fn write_exemplar(&self, out: &mut String, i: usize) {
        if let Some(e) = self.exemplar(i) {
            let _ = write!(
                out,
                " # {{trace_id=\"{:032x}\"}} {} {}.{:03}",
                e.trace_id,
                e.value,
                e.at_ms / 1000,
                e.at_ms % 1000
            );
        }
    }
}

/// A float as OpenMetrics' canonical numbers write it (Go's `%g` with `.0` added to whole
/// numbers): `1.0`, `0.005`, `+Inf`; what strict parsers expect in `le`.
fn canonical_float(v: f64) -> String {
    if v == f64::INFINITY {
        return "+Inf".into();
    }
    let s = v.to_string();
    if s.contains(['.', 'e', 'N', 'i']) {
        s
    } else {
        s + ".0"
    }
}

/// Requests by status code: a lock-free slot per common code, a small locked list for others.
#[derive(Default)]
pub struct CodeCounts {
    codes: [AtomicU64; CODES.len()],
    other_codes: Mutex<Vec<(u16, u64)>>,
}

impl CodeCounts {
    pub fn count(&self, code: u16) {
        match CODES.iter().position(|c| *c == code) {
            Some(i) => {
                self.codes[i].fetch_add(1, Ordering::Relaxed);
            }
            None => {
                if let Ok(mut others) = self.other_codes.lock() {
                    match others.iter_mut().find(|(c, _)| *c == code) {
                        Some((_, n)) => *n += 1,
                        None => others.push((code, 1)),
                    }
                }
            }
        }
    }

    /// (code, count) for every code counted, in code order.
    pub fn counts(&self) -> Vec<(u16, u64)> {
        let mut out: Vec<(u16, u64)> = CODES
            .iter()
            .zip(&self.codes)
            .map(|(c, n)| (*c, n.load(Ordering::Relaxed)))
            .filter(|(_, n)| *n > 0)
            .collect();
        if let Ok(others) = self.other_codes.lock() {
            out.extend(others.iter().copied());
        }
        out.sort_unstable();
        out
    }
}

#[derive(Default)]
pub struct MethodMetrics {
    codes: [AtomicU64; CODES.len()],
    other_codes: Mutex<Vec<(u16, u64)>>,
    pub duration: Histogram,
}

impl MethodMetrics {
    pub fn count(&self, code: u16) {
        match CODES.iter().position(|c| *c == code) {
            Some(i) => {
                self.codes[i].fetch_add(1, Ordering::Relaxed);
            }
            None => {
                if let Ok(mut others) = self.other_codes.lock() {
                    match others.iter_mut().find(|(c, _)| *c == code) {
                        Some((_, n)) => *n += 1,
                        None => others.push((code, 1)),
                    }
                }
            }
        }
    }
}

/// Handles for one service, kept across reloads so counters never reset.
/// A route's requests in flight (`maxInFlight`), kept with the service's metrics so the count
/// carries over reloads (a new snapshot's route counts the requests the old one let in); alone
/// on its cache lines, since every request of the route writes it.
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct InFlightCount(pub AtomicU64);

pub struct ServiceMetrics {
    pub name: String,
    /// Requests in flight on the route, when it sets `maxInFlight`.
    pub in_flight: InFlightCount,
    pub methods: [MethodMetrics; METHODS.len()],
    pub upstream_duration: Histogram,
    /// Indexed like [`UPSTREAM_REASONS`].
    pub upstream_errors: [AtomicU64; UPSTREAM_REASONS.len()],
    /// gRPC requests by (HTTP code, grpc-status; 255: none seen): few distinct pairs, locked
    /// only for gRPC requests.
    grpc: Mutex<Vec<((u16, u8), u64)>>,
    /// Indexed like `auth::REASONS`.
    pub auth_failures: [AtomicU64; AUTH_REASONS.len()],
    /// [limit][result], indexed like `limits::LIMITS` and `limits::RESULTS`.
    pub limit_decisions: [[AtomicU64; 4]; LIMITS.len()],
    /// Authenticated requests by consumer and code, bounded (see [`consumers`]).
    consumers: Mutex<consumers::ConsumerTable>,
    /// Indexed like [`RETRY_REASONS`].
    pub retries: [AtomicU64; RETRY_REASONS.len()],
    pub retry_budget_exhausted: AtomicU64,
    /// Requests by split name and code; handles resolved when a snapshot is built.
    splits: Mutex<Vec<(String, Arc<CodeCounts>)>>,
}

impl ServiceMetrics {
    fn new(name: &str) -> Self {
        ServiceMetrics {
            name: name.to_string(),
            in_flight: InFlightCount::default(),
            methods: Default::default(),
            upstream_duration: Histogram::default(),
            upstream_errors: Default::default(),
            grpc: Mutex::new(Vec::new()),
            auth_failures: Default::default(),
            limit_decisions: Default::default(),
            consumers: Mutex::new(consumers::ConsumerTable::new()),
            retries: Default::default(),
            retry_budget_exhausted: AtomicU64::new(0),
            splits: Mutex::new(Vec::new()),
        }
    }

    /// Counts a retry on another backend by its reason (an index into [`RETRY_REASONS`]).
    pub fn retry(&self, reason: usize) {
        if let Some(c) = self.retries.get(reason) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts a retry the route's budget refused.
    pub fn retry_budget_exhausted(&self) {
        self.retry_budget_exhausted.fetch_add(1, Ordering::Relaxed);
    }

    /// The counters of split `name` (created on first use, kept across reloads).
    pub fn split(&self, name: &str) -> Arc<CodeCounts> {
        let mut splits = match self.splits.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        if let Some((_, c)) = splits.iter().find(|(n, _)| n == name) {
            return c.clone();
        }
        let c = Arc::new(CodeCounts::default());
        splits.push((name.to_string(), c.clone()));
        c
    }

    pub fn limit_decision(&self, limit: usize, result: usize) {
        if let Some(c) = self.limit_decisions.get(limit).and_then(|l| l.get(result)) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts a failed upstream attempt by its reason (one of [`UPSTREAM_REASONS`]).
    pub fn upstream_error(&self, reason: &str) {
        let i = UPSTREAM_REASONS
            .iter()
            .position(|r| *r == reason)
            .or_else(|| {
                UPSTREAM_REASONS
                    .iter()
                    .position(|r| *r == "connection_error")
            })
            .unwrap_or(0);
        self.upstream_errors[i].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a gRPC request by its HTTP code and `grpc-status` (None: the answer carried none).
    pub fn grpc(&self, code: u16, grpc_status: Option<u8>) {
        let key = (code, grpc_status.unwrap_or(u8::MAX));
        let mut g = match self.grpc.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        match g.iter_mut().find(|(k, _)| *k == key) {
            Some((_, n)) => *n += 1,
            None => g.push((key, 1)),
        }
    }

    pub fn auth_failure(&self, reason: &str) {
        if let Some(i) = AUTH_REASONS.iter().position(|r| *r == reason) {
            self.auth_failures[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts an authenticated request of `consumer` answered with `code`: one short lock, no
    /// allocation for a consumer already named.
    pub fn record_consumer(&self, consumer: &Arc<str>, code: u16) {
        self.record_consumer_at(consumer, code, now_us());
    }

    /// [`Self::record_consumer`] at `now_us` (µs since the Unix epoch, as
    /// `hexgate_http::clock::Clock::now_us` gives it): epochs end by this time.
    pub fn record_consumer_at(&self, consumer: &Arc<str>, code: u16, now_us: u64) {
        let mut t = match self.consumers.lock() {
            Ok(t) => t,
            Err(p) => p.into_inner(),
        };
        t.record(consumer, code, now_us);
    }

    pub fn record(&self, method: &http::Method, code: u16, elapsed: Duration) {
        let m = &self.methods[method_index(method)];
        m.count(code);
        m.duration.observe(elapsed);
    }

    /// [`Self::record`] for a sampled request: the same counting, and `trace_id` becomes the
    /// exemplar of the duration bucket `elapsed` falls in (shown in the OpenMetrics exposition,
    /// so a latency spike links to a trace).
    pub fn record_traced(
        &self,
        method: &http::Method,
        code: u16,
        elapsed: Duration,
        trace_id: u128,
    ) {
        let m = &self.methods[method_index(method)];
        m.count(code);
        m.duration.observe_with_exemplar(elapsed, trace_id);
    }
}

/// All metrics of one gateway process.
#[derive(Default)]
pub struct Registry {
    services: Mutex<HashMap<String, Arc<ServiceMetrics>>>,
    pub open_connections: AtomicI64,
    pub reloads_success: AtomicU64,
    pub reloads_failure: AtomicU64,
    pub last_reload_success: AtomicU64,
    pub jwks_refresh_success: AtomicU64,
    pub jwks_refresh_failure: AtomicU64,
    pub redis_errors: AtomicU64,
    pub redis_duration: Histogram,
    /// Indexed like [`LEDGER_ACTIONS`].
    pub ledger_changes: [AtomicU64; LEDGER_ACTIONS.len()],
    /// [`ACCESS_LOG_DROPPED_TOTAL`].
    pub access_log_dropped: AtomicU64,
    /// [`TRACING_DROPPED_SPANS_TOTAL`].
    pub tracing_dropped_spans: AtomicU64,
    /// [`TRACING_EXPORTED_SPANS_TOTAL`].
    pub tracing_exported_spans: AtomicU64,
}

impl Registry {
    /// Resolves (or creates) the handles of a service; called when a snapshot is built.
    pub fn service(&self, name: &str) -> Arc<ServiceMetrics> {
        let mut map = match self.services.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        map.entry(name.to_string())
            .or_insert_with(|| Arc::new(ServiceMetrics::new(name)))
            .clone()
    }

    pub fn record_reload(&self, ok: bool) {
        if ok {
            self.reloads_success.fetch_add(1, Ordering::Relaxed);
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            self.last_reload_success.store(now, Ordering::Relaxed);
        } else {
            self.reloads_failure.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts a quota ledger change by its action (one of [`LEDGER_ACTIONS`]; others are
    /// ignored).
    pub fn record_ledger_change(&self, action: &str) {
        if let Some(i) = LEDGER_ACTIONS.iter().position(|a| *a == action) {
            self.ledger_changes[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn record_jwks_refresh(&self, ok: bool) {
        if ok {
            self.jwks_refresh_success.fetch_add(1, Ordering::Relaxed);
        } else {
            self.jwks_refresh_failure.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The whole exposition in `format` (ended by `# EOF` in OpenMetrics). `health` lists
    /// (service, backend, healthy).
    pub fn render(&self, health: &[(String, String, bool)], format: Format) -> String {
        let mut out = String::with_capacity(16 * 1024);
        self.render_families(&mut out, health, format);
        format.finish(&mut out);
        out
    }

    /// Appends the registry's families in `format`, without an end: the admin listener adds
    /// other components' families, then [`Format::finish`].
    pub fn render_families(
        &self,
        out: &mut String,
        health: &[(String, String, bool)],
        format: Format,
    ) {
        let mut services: Vec<Arc<ServiceMetrics>> = match self.services.lock() {
            Ok(m) => m.values().cloned().collect(),
            Err(p) => p.into_inner().values().cloned().collect(),
        };
        services.sort_by(|a, b| a.name.cmp(&b.name));

        write_header(
            out,
            format,
            HTTP_REQUESTS_TOTAL,
            Kind::Counter,
            "Requests handled, by service, method and status code.",
        );
        for s in &services {
            for (mi, m) in s.methods.iter().enumerate() {
                for (ci, c) in m.codes.iter().enumerate() {
                    let v = c.load(Ordering::Relaxed);
                    if v > 0 {
                        let _ = writeln!(
                            out,
                            "{HTTP_REQUESTS_TOTAL}{{service=\"{}\",method=\"{}\",code=\"{}\"}} {v}",
                            s.name, METHODS[mi], CODES[ci]
                        );
                    }
                }
                if let Ok(others) = m.other_codes.lock() {
                    for (code, v) in others.iter() {
                        let _ = writeln!(
                            out,
                            "{HTTP_REQUESTS_TOTAL}{{service=\"{}\",method=\"{}\",code=\"{code}\"}} {v}",
                            s.name, METHODS[mi]
                        );
                    }
                }
            }
        }
        write_header(
            out,
            format,
            HTTP_REQUEST_DURATION,
            Kind::Histogram,
            "Time from request to response headers, by service and method.",
        );
        for s in &services {
            for (mi, m) in s.methods.iter().enumerate() {
                if m.duration.count.load(Ordering::Relaxed) > 0 {
                    let labels = format!("service=\"{}\",method=\"{}\"", s.name, METHODS[mi]);
                    m.duration
                        .write(out, format, HTTP_REQUEST_DURATION, &labels);
                }
            }
        }
        write_header(
            out,
            format,
            UPSTREAM_REQUEST_DURATION,
            Kind::Histogram,
            "Time the upstream took to answer with headers, by service.",
        );
        for s in &services {
            if s.upstream_duration.count.load(Ordering::Relaxed) > 0 {
                let labels = format!("service=\"{}\"", s.name);
                s.upstream_duration
                    .write(out, format, UPSTREAM_REQUEST_DURATION, &labels);
            }
        }
        // connect_failed always, so every service has a series from the start.
        render_by_reason(
            out,
            format,
            UPSTREAM_ERRORS_TOTAL,
            "Failed upstream attempts (connect errors, TLS failures, resets, timeouts), by service and reason.",
            &services,
            &UPSTREAM_REASONS,
            |s| &s.upstream_errors,
            true,
        );
        render_by_reason(
            out,
            format,
            UPSTREAM_RETRIES_TOTAL,
            "Requests sent again to another backend, by service and reason (what the previous attempt met).",
            &services,
            &RETRY_REASONS,
            |s| &s.retries,
            false,
        );
        write_header(
            out,
            format,
            UPSTREAM_RETRY_BUDGET_EXHAUSTED_TOTAL,
            Kind::Counter,
            "Retries not made because the route's retryBudget was spent, by service.",
        );
        for s in &services {
            let v = s.retry_budget_exhausted.load(Ordering::Relaxed);
            if v > 0 {
                let _ = writeln!(
                    out,
                    "{UPSTREAM_RETRY_BUDGET_EXHAUSTED_TOTAL}{{service=\"{}\"}} {v}",
                    s.name
                );
            }
        }
        write_header(
            out,
            format,
            SPLIT_REQUESTS_TOTAL,
            Kind::Counter,
            "Requests sent to a route's splits, by service, split and status code.",
        );
        for s in &services {
            let mut splits: Vec<(String, Arc<CodeCounts>)> = match s.splits.lock() {
                Ok(v) => v.clone(),
                Err(p) => p.into_inner().clone(),
            };
            splits.sort_by(|a, b| a.0.cmp(&b.0));
            for (name, counts) in &splits {
                let name = escape_label(name);
                for (code, v) in counts.counts() {
                    let _ = writeln!(
                        out,
                        "{SPLIT_REQUESTS_TOTAL}{{service=\"{}\",split=\"{name}\",code=\"{code}\"}} {v}",
                        s.name
                    );
                }
            }
        }
        write_header(
            out,
            format,
            GRPC_REQUESTS_TOTAL,
            Kind::Counter,
            "gRPC requests, by service, HTTP status code and grpc-status (\"\" when the answer carried none).",
        );
        for s in &services {
            if let Ok(g) = s.grpc.lock() {
                for ((code, st), v) in g.iter() {
                    let st = if *st == u8::MAX {
                        String::new()
                    } else {
                        st.to_string()
                    };
                    let _ = writeln!(
                        out,
                        "{GRPC_REQUESTS_TOTAL}{{service=\"{}\",code=\"{code}\",grpc_status=\"{st}\"}} {v}",
                        s.name
                    );
                }
            }
        }
        render_by_reason(
            out,
            format,
            AUTH_FAILURES_TOTAL,
            "Requests refused by authentication (JWT, API key) or a missing scope, by service and reason.",
            &services,
            &AUTH_REASONS,
            |s| &s.auth_failures,
            false,
        );
        write_header(
            out,
            format,
            RATELIMIT_DECISIONS_TOTAL,
            Kind::Counter,
            "Rate-limit and quota decisions, by service, limit and result.",
        );
        for s in &services {
            for (li, limit) in LIMITS.iter().enumerate() {
                for (ri, result) in LIMIT_RESULTS.iter().enumerate() {
                    let v = s.limit_decisions[li][ri].load(Ordering::Relaxed);
                    if v > 0 {
                        let _ = writeln!(
                            out,
                            "{RATELIMIT_DECISIONS_TOTAL}{{service=\"{}\",limit=\"{limit}\",result=\"{result}\"}} {v}",
                            s.name
                        );
                    }
                }
            }
        }
        write_header(
            out,
            format,
            QUOTA_LEDGER_CHANGES_TOTAL,
            Kind::Counter,
            "Quota ledger changes made through the admin endpoints, by action.",
        );
        for (i, action) in LEDGER_ACTIONS.iter().enumerate() {
            let _ = writeln!(
                out,
                "{QUOTA_LEDGER_CHANGES_TOTAL}{{action=\"{action}\"}} {}",
                self.ledger_changes[i].load(Ordering::Relaxed)
            );
        }
        write_header(
            out,
            format,
            CONSUMER_REQUESTS_TOTAL,
            Kind::Counter,
            &format!(
                "Authenticated requests, by service, consumer (the top {} per service, the rest \
                 as \"other\") and status code.",
                consumers::TOP
            ),
        );
        for s in &services {
            // Copied out, so the request path waits for the copy only, not for the writing.
            let mut series = match s.consumers.lock() {
                Ok(t) => t.series(),
                Err(p) => p.into_inner().series(),
            };
            // Named consumers by name, then other.
            series.sort_by(|a, b| match (&a.0, &b.0) {
                (Some(x), Some(y)) => x.cmp(y),
                (Some(_), None) => std::cmp::Ordering::Less,
                (None, Some(_)) => std::cmp::Ordering::Greater,
                (None, None) => std::cmp::Ordering::Equal,
            });
            for (consumer, codes) in &series {
                let consumer = consumer
                    .as_deref()
                    .map_or(Cow::Borrowed(consumers::OTHER), escape_label);
                let mut codes: Vec<(u16, u64)> = codes.iter().collect();
                codes.sort_unstable();
                for (code, v) in codes {
                    let _ = writeln!(
                        out,
                        "{CONSUMER_REQUESTS_TOTAL}{{service=\"{}\",consumer=\"{consumer}\",code=\"{code}\"}} {v}",
                        s.name
                    );
                }
            }
        }
        write_header(
            out,
            format,
            REDIS_ERRORS_TOTAL,
            Kind::Counter,
            "Redis limit calls that failed or timed out.",
        );
        let _ = writeln!(
            out,
            "{REDIS_ERRORS_TOTAL} {}",
            self.redis_errors.load(Ordering::Relaxed)
        );
        write_header(
            out,
            format,
            REDIS_REQUEST_DURATION,
            Kind::Histogram,
            "Time of Redis limit calls.",
        );
        if self.redis_duration.count.load(Ordering::Relaxed) > 0 {
            self.redis_duration
                .write(out, format, REDIS_REQUEST_DURATION, "");
        }
        write_header(
            out,
            format,
            JWKS_REFRESHES_TOTAL,
            Kind::Counter,
            "JWKS fetches, by result.",
        );
        let _ = writeln!(
            out,
            "{JWKS_REFRESHES_TOTAL}{{result=\"success\"}} {}",
            self.jwks_refresh_success.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "{JWKS_REFRESHES_TOTAL}{{result=\"failure\"}} {}",
            self.jwks_refresh_failure.load(Ordering::Relaxed)
        );
        write_header(
            out,
            format,
            UPSTREAM_HEALTHY,
            Kind::Gauge,
            "1 if the backend is in rotation, else 0.",
        );
        for (svc, backend, ok) in health {
            let _ = writeln!(
                out,
                "{UPSTREAM_HEALTHY}{{service=\"{svc}\",backend=\"{backend}\"}} {}",
                u8::from(*ok)
            );
        }
        write_header(
            out,
            format,
            OPEN_CONNECTIONS,
            Kind::Gauge,
            "Client connections currently open.",
        );
        let _ = writeln!(
            out,
            "{OPEN_CONNECTIONS} {}",
            self.open_connections.load(Ordering::Relaxed)
        );
        write_header(
            out,
            format,
            CONFIG_RELOADS_TOTAL,
            Kind::Counter,
            "Config reloads, by result.",
        );
        let _ = writeln!(
            out,
            "{CONFIG_RELOADS_TOTAL}{{result=\"success\"}} {}",
            self.reloads_success.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "{CONFIG_RELOADS_TOTAL}{{result=\"failure\"}} {}",
            self.reloads_failure.load(Ordering::Relaxed)
        );
        write_header(
            out,
            format,
            CONFIG_LAST_RELOAD_SUCCESS,
            Kind::Gauge,
            "Unix time of the last successful config load.",
        );
        let _ = writeln!(
            out,
            "{CONFIG_LAST_RELOAD_SUCCESS} {}",
            self.last_reload_success.load(Ordering::Relaxed)
        );
        write_header(
            out,
            format,
            ACCESS_LOG_DROPPED_TOTAL,
            Kind::Counter,
            "Access log lines dropped: the writer's queue was full (the disk or stdout could not keep up) or the write failed.",
        );
        let _ = writeln!(
            out,
            "{ACCESS_LOG_DROPPED_TOTAL} {}",
            self.access_log_dropped.load(Ordering::Relaxed)
        );
        write_header(
            out,
            format,
            TRACING_DROPPED_SPANS_TOTAL,
            Kind::Counter,
            "Spans dropped: the export queue was full or the collector failed or timed out.",
        );
        let _ = writeln!(
            out,
            "{TRACING_DROPPED_SPANS_TOTAL} {}",
            self.tracing_dropped_spans.load(Ordering::Relaxed)
        );
        write_header(
            out,
            format,
            TRACING_EXPORTED_SPANS_TOTAL,
            Kind::Counter,
            "Spans the collector accepted.",
        );
        let _ = writeln!(
            out,
            "{TRACING_EXPORTED_SPANS_TOTAL} {}",
            self.tracing_exported_spans.load(Ordering::Relaxed)
        );
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert!(matches!(escape_label("plain-name.1"), Cow::Borrowed(_)));
        assert_eq!(escape_label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

    #[test]
    fn retry_and_split_series_are_rendered() {
        let r = Registry::default();
        let s = r.service("web");
        s.retry(4);
        s.retry(4);
        s.retry(0);
        s.retry(99);
        s.retry_budget_exhausted();
        let canary = s.split("canary");
        canary.count(200);
        canary.count(200);
        canary.count(599);
        assert!(Arc::ptr_eq(&canary, &s.split("canary")));
        s.split("stable");
        let out = r.render(&[], Format::Text);
        for want in [
            "# TYPE hexgate_upstream_retries_total counter\n",
            "hexgate_upstream_retries_total{service=\"web\",reason=\"503\"} 2\n",
            "hexgate_upstream_retries_total{service=\"web\",reason=\"connect_failure\"} 1\n",
            "hexgate_upstream_retry_budget_exhausted_total{service=\"web\"} 1\n",
            "hexgate_split_requests_total{service=\"web\",split=\"canary\",code=\"200\"} 2\n",
            "hexgate_split_requests_total{service=\"web\",split=\"canary\",code=\"599\"} 1\n",
        ] {
            assert!(out.contains(want), "{want} missing:\n{out}");
        }
        assert!(!out.contains("split=\"stable\""), "{out}");
    }

    #[test]
    fn consumer_and_ledger_series_are_rendered() {
        let r = Registry::default();
        let s = r.service("orders");
        let quote: Arc<str> = Arc::from("we\"ird\\name");
        let alice: Arc<str> = Arc::from("alice");
        s.record_consumer(&alice, 200);
        s.record_consumer(&alice, 200);
        s.record_consumer(&alice, 429);
        s.record_consumer(&quote, 200);
        r.record_ledger_change("credit");
        r.record_ledger_change("nonsense");
        let out = r.render(&[], Format::Text);
        for want in [
            "# TYPE hexgate_consumer_requests_total counter\n",
            "hexgate_consumer_requests_total{service=\"orders\",consumer=\"alice\",code=\"200\"} 2\n",
            "hexgate_consumer_requests_total{service=\"orders\",consumer=\"alice\",code=\"429\"} 1\n",
            "hexgate_consumer_requests_total{service=\"orders\",consumer=\"we\\\"ird\\\\name\",code=\"200\"} 1\n",
            "# TYPE hexgate_quota_ledger_changes_total counter\n",
            "hexgate_quota_ledger_changes_total{action=\"reset\"} 0\n",
            "hexgate_quota_ledger_changes_total{action=\"credit\"} 1\n",
        ] {
            assert!(out.contains(want), "{want} missing:\n{out}");
        }
        assert!(!out.contains("consumer=\"other\""), "{out}");
    }

    const TRACE: u128 = 0x4bf92f3577b34da6a3ce929d0e0e4736;

    /// The bucket lines of `name` whose labels contain `labels`.
    fn bucket_lines<'a>(out: &'a str, name: &str, labels: &str) -> Vec<&'a str> {
        let prefix = format!("{name}_bucket{{{labels}");
        out.lines().filter(|l| l.starts_with(&prefix)).collect()
    }

    #[test]
    fn exemplars_land_in_the_bucket_of_their_value() {
        let r = Registry::default();
        let s = r.service("web");
        s.record(&http::Method::GET, 200, Duration::from_millis(3));
        s.record_traced(&http::Method::GET, 200, Duration::from_micros(7100), TRACE);
        // Later in the same bucket: replaces the one before.
        s.record_traced(&http::Method::GET, 200, Duration::from_micros(7200), 0xabc);
        // Above the last finite bound: the +Inf bucket's.
        s.record_traced(&http::Method::GET, 503, Duration::from_secs(12), TRACE);
        // 0 is not a trace id: counted, no exemplar.
        s.record_traced(&http::Method::GET, 200, Duration::from_millis(30), 0);
        let out = r.render(&[], Format::OpenMetrics);
        let lines = bucket_lines(
            &out,
            HTTP_REQUEST_DURATION,
            "service=\"web\",method=\"GET\"",
        );
        assert_eq!(lines.len(), BUCKETS.len() + 1, "{out}");
        for l in &lines {
            let with = l.contains(" # {");
            let want = l.contains("le=\"0.01\"") || l.contains("le=\"+Inf\"");
            assert_eq!(with, want, "{l}");
        }
        let (sample, exemplar) = lines[1].split_once(" # ").unwrap();
        assert_eq!(
            sample,
            "hexgate_http_request_duration_seconds_bucket{service=\"web\",method=\"GET\",\
             le=\"0.01\"} 3"
        );
        let mut parts = exemplar.split(' ');
        assert_eq!(
            parts.next(),
            Some("{trace_id=\"00000000000000000000000000000abc\"}")
        );
        assert_eq!(parts.next(), Some("0.0072"));
        let ts = parts.next().unwrap();
        let (secs, ms) = ts.split_once('.').unwrap();
        assert_eq!(ms.len(), 3, "{ts}");
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert!(now.abs_diff(secs.parse().unwrap()) < 60, "{ts}");
        assert_eq!(parts.next(), None);
        assert!(
            lines[BUCKETS.len()].starts_with(
                "hexgate_http_request_duration_seconds_bucket{service=\"web\",method=\"GET\",\
                 le=\"+Inf\"} 5 # {trace_id=\"4bf92f3577b34da6a3ce929d0e0e4736\"} 12 "
            ),
            "{out}"
        );
        // Counted as `record` counts.
        assert!(
            out.contains(
                "hexgate_http_requests_total{service=\"web\",method=\"GET\",code=\"200\"} 4\n"
            ),
            "{out}"
        );
        assert!(
            out.contains(
                "hexgate_http_requests_total{service=\"web\",method=\"GET\",code=\"503\"} 1\n"
            ),
            "{out}"
        );
        assert!(
            out.contains(
                "hexgate_http_request_duration_seconds_count{service=\"web\",method=\"GET\"} 5\n"
            ),
            "{out}"
        );
    }

    #[test]
    fn text_format_has_no_exemplars_and_stays_as_it_was() {
        let r = Registry::default();
        let s = r.service("web");
        s.record_traced(&http::Method::POST, 201, Duration::from_millis(700), TRACE);
        s.record_traced(&http::Method::POST, 201, Duration::from_secs(30), TRACE);
        let out = r.render(&[], Format::Text);
        assert!(!out.contains(" # {"), "{out}");
        assert!(!out.contains("# EOF"), "{out}");
        assert!(!out.contains("trace_id"), "{out}");
        let lines = bucket_lines(
            &out,
            HTTP_REQUEST_DURATION,
            "service=\"web\",method=\"POST\"",
        );
        let les: Vec<&str> = lines
            .iter()
            .map(|l| l.split("le=\"").nth(1).unwrap().split('"').next().unwrap())
            .collect();
        assert_eq!(
            les,
            [
                "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1", "2.5", "5", "10",
                "+Inf"
            ]
        );
        assert!(lines[7].ends_with("} 1"), "{out}");
        assert!(lines[11].ends_with("} 2"), "{out}");
        assert!(
            out.contains(
                "# HELP hexgate_http_requests_total Requests handled, by service, method and \
                 status code.\n# TYPE hexgate_http_requests_total counter\n"
            ),
            "{out}"
        );
        // Double quotes in HELP are left as they are in the text format.
        assert!(out.contains("(\"\" when the answer carried none)"), "{out}");
        for want in [
            "# TYPE hexgate_tracing_dropped_spans_total counter\nhexgate_tracing_dropped_spans_total 0\n",
            "# TYPE hexgate_tracing_exported_spans_total counter\nhexgate_tracing_exported_spans_total 0\n",
        ] {
            assert!(out.contains(want), "{want} missing:\n{out}");
        }
    }

    #[test]
    fn openmetrics_names_counter_families_without_total() {
        let r = Registry::default();
        let s = r.service("web");
        s.record(&http::Method::GET, 200, Duration::from_millis(1));
        s.retry(0);
        r.tracing_dropped_spans.fetch_add(3, Ordering::Relaxed);
        r.tracing_exported_spans.fetch_add(7, Ordering::Relaxed);
        let out = r.render(
            &[("web".into(), "127.0.0.1:1".into(), true)],
            Format::OpenMetrics,
        );
        assert!(out.ends_with("\n# EOF\n"), "{out}");
        assert_eq!(out.matches("# EOF").count(), 1, "{out}");
        assert!(!out.contains("\n\n"), "{out}");
        for want in [
            "# HELP hexgate_tracing_dropped_spans Spans dropped: the export queue was full or \
             the collector failed or timed out.\n# TYPE hexgate_tracing_dropped_spans counter\n\
             hexgate_tracing_dropped_spans_total 3\n",
            "# HELP hexgate_tracing_exported_spans Spans the collector accepted.\n\
             # TYPE hexgate_tracing_exported_spans counter\n\
             hexgate_tracing_exported_spans_total 7\n",
            "# TYPE hexgate_http_requests counter\nhexgate_http_requests_total{",
            "# TYPE hexgate_upstream_retries counter\n",
            "# TYPE hexgate_http_request_duration_seconds histogram\n",
            "# TYPE hexgate_upstream_healthy gauge\n",
            "le=\"1.0\"} 1\n",
            "le=\"10.0\"} 1\n",
            // OpenMetrics escapes double quotes in HELP.
            "(\\\"\\\" when the answer carried none)",
        ] {
            assert!(out.contains(want), "{want} missing:\n{out}");
        }
        // No family is named with `_total` (a gauge so named would read as a counter), and
        // each counter's samples are its family name and `_total`.
        let mut family = ("", "");
        for line in out.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                family = rest.split_once(' ').unwrap();
                assert!(!family.0.ends_with("_total"), "{line}");
            } else if !line.starts_with('#') && family.1 == "counter" {
                let name = line.split(['{', ' ']).next().unwrap();
                assert_eq!(name, format!("{}_total", family.0), "{line}");
            }
        }
    }

    #[test]
    fn canonical_floats() {
        let got: Vec<String> = BUCKETS.iter().map(|b| canonical_float(*b)).collect();
        assert_eq!(
            got,
            ["0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1.0", "2.5", "5.0", "10.0"]
        );
        assert_eq!(canonical_float(f64::INFINITY), "+Inf");
        assert_eq!(canonical_float(0.0), "0.0");
    }

    #[test]
    fn a_busy_exemplar_slot_is_skipped_not_waited_for() {
        let h = Histogram::default();
        h.observe_with_exemplar(Duration::from_millis(2), 1);
        let slots = h.exemplars.get().unwrap();
        let held = slots[0].lock().unwrap();
        h.observe_with_exemplar(Duration::from_millis(3), 2);
        drop(held);
        assert_eq!(h.exemplar(0).map(|e| e.trace_id), Some(1));
        assert_eq!(h.count.load(Ordering::Relaxed), 2);
        // A plain observation never touches the exemplars.
        let plain = Histogram::default();
        plain.observe(Duration::from_millis(2));
        assert!(plain.exemplars.get().is_none());
    }
}
