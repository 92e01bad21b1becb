//! Prometheus metrics: names as constants, lock-free handles resolved per routing snapshot (the
//! request path never hashes a label set), and the text exposition written at scrape time.
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
use std::sync::{Arc, Mutex};
use std::time::Duration;

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

/// One counter per service and reason: HELP and TYPE, then each non-zero series (and, with
/// `first_always`, the first reason's even at zero, so every service has a series from the start).
fn render_by_reason(
    out: &mut String,
    name: &str,
    help: &str,
    services: &[Arc<ServiceMetrics>],
    reasons: &[&str],
    counts: impl Fn(&ServiceMetrics) -> &[AtomicU64],
    first_always: bool,
) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} counter");
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

#[derive(Default)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_nanos: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|b| secs <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_nanos
            .fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
    }

    /// Writes the series; `labels` may be empty (then the series carry only `le`).
    fn write(&self, out: &mut String, name: &str, labels: &str) {
        let (prefix, own) = if labels.is_empty() {
            (String::new(), String::new())
        } else {
            (format!("{labels},"), format!("{{{labels}}}"))
        };
        let mut cum = 0;
        for (i, b) in BUCKETS.iter().enumerate() {
            cum += self.buckets[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{prefix}le=\"{b}\"}} {cum}");
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{prefix}le=\"+Inf\"}} {count}");
        let sum = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "{name}_sum{own} {sum}");
        let _ = writeln!(out, "{name}_count{own} {count}");
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

    /// Writes the Prometheus text format. `health` lists (service, backend, healthy).
    pub fn render(&self, health: &[(String, String, bool)]) -> String {
        let mut out = String::with_capacity(16 * 1024);
        let mut services: Vec<Arc<ServiceMetrics>> = match self.services.lock() {
            Ok(m) => m.values().cloned().collect(),
            Err(p) => p.into_inner().values().cloned().collect(),
        };
        services.sort_by(|a, b| a.name.cmp(&b.name));

        let _ = writeln!(
            out,
            "# HELP {HTTP_REQUESTS_TOTAL} Requests handled, by service, method and status code."
        );
        let _ = writeln!(out, "# TYPE {HTTP_REQUESTS_TOTAL} counter");
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
        let _ = writeln!(out, "# HELP {HTTP_REQUEST_DURATION} Time from request to response headers, by service and method.");
        let _ = writeln!(out, "# TYPE {HTTP_REQUEST_DURATION} histogram");
        for s in &services {
            for (mi, m) in s.methods.iter().enumerate() {
                if m.duration.count.load(Ordering::Relaxed) > 0 {
                    let labels = format!("service=\"{}\",method=\"{}\"", s.name, METHODS[mi]);
                    m.duration.write(&mut out, HTTP_REQUEST_DURATION, &labels);
                }
            }
        }
        let _ = writeln!(out, "# HELP {UPSTREAM_REQUEST_DURATION} Time the upstream took to answer with headers, by service.");
        let _ = writeln!(out, "# TYPE {UPSTREAM_REQUEST_DURATION} histogram");
        for s in &services {
            if s.upstream_duration.count.load(Ordering::Relaxed) > 0 {
                let labels = format!("service=\"{}\"", s.name);
                s.upstream_duration
                    .write(&mut out, UPSTREAM_REQUEST_DURATION, &labels);
            }
        }
        // connect_failed always, so every service has a series from the start.
        render_by_reason(
            &mut out,
            UPSTREAM_ERRORS_TOTAL,
            "Failed upstream attempts (connect errors, TLS failures, resets, timeouts), by service and reason.",
            &services,
            &UPSTREAM_REASONS,
            |s| &s.upstream_errors,
            true,
        );
        render_by_reason(
            &mut out,
            UPSTREAM_RETRIES_TOTAL,
            "Requests sent again to another backend, by service and reason (what the previous attempt met).",
            &services,
            &RETRY_REASONS,
            |s| &s.retries,
            false,
        );
        let _ = writeln!(out, "# HELP {UPSTREAM_RETRY_BUDGET_EXHAUSTED_TOTAL} Retries not made because the route's retryBudget was spent, by service.");
        let _ = writeln!(
            out,
            "# TYPE {UPSTREAM_RETRY_BUDGET_EXHAUSTED_TOTAL} counter"
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
        let _ = writeln!(out, "# HELP {SPLIT_REQUESTS_TOTAL} Requests sent to a route's splits, by service, split and status code.");
        let _ = writeln!(out, "# TYPE {SPLIT_REQUESTS_TOTAL} counter");
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
        let _ = writeln!(out, "# HELP {GRPC_REQUESTS_TOTAL} gRPC requests, by service, HTTP status code and grpc-status (\"\" when the answer carried none).");
        let _ = writeln!(out, "# TYPE {GRPC_REQUESTS_TOTAL} counter");
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
            &mut out,
            AUTH_FAILURES_TOTAL,
            "Requests refused by authentication (JWT, API key) or a missing scope, by service and reason.",
            &services,
            &AUTH_REASONS,
            |s| &s.auth_failures,
            false,
        );
        let _ = writeln!(out, "# HELP {RATELIMIT_DECISIONS_TOTAL} Rate-limit and quota decisions, by service, limit and result.");
        let _ = writeln!(out, "# TYPE {RATELIMIT_DECISIONS_TOTAL} counter");
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
        let _ = writeln!(out, "# HELP {QUOTA_LEDGER_CHANGES_TOTAL} Quota ledger changes made through the admin endpoints, by action.");
        let _ = writeln!(out, "# TYPE {QUOTA_LEDGER_CHANGES_TOTAL} counter");
        for (i, action) in LEDGER_ACTIONS.iter().enumerate() {
            let _ = writeln!(
                out,
                "{QUOTA_LEDGER_CHANGES_TOTAL}{{action=\"{action}\"}} {}",
                self.ledger_changes[i].load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(out, "# HELP {CONSUMER_REQUESTS_TOTAL} Authenticated requests, by service, consumer (the top {} per service, the rest as \"other\") and status code.", consumers::TOP);
        let _ = writeln!(out, "# TYPE {CONSUMER_REQUESTS_TOTAL} counter");
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
        let _ = writeln!(
            out,
            "# HELP {REDIS_ERRORS_TOTAL} Redis limit calls that failed or timed out."
        );
        let _ = writeln!(out, "# TYPE {REDIS_ERRORS_TOTAL} counter");
        let _ = writeln!(
            out,
            "{REDIS_ERRORS_TOTAL} {}",
            self.redis_errors.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP {REDIS_REQUEST_DURATION} Time of Redis limit calls."
        );
        let _ = writeln!(out, "# TYPE {REDIS_REQUEST_DURATION} histogram");
        if self.redis_duration.count.load(Ordering::Relaxed) > 0 {
            self.redis_duration
                .write(&mut out, REDIS_REQUEST_DURATION, "");
        }
        let _ = writeln!(
            out,
            "# HELP {JWKS_REFRESHES_TOTAL} JWKS fetches, by result."
        );
        let _ = writeln!(out, "# TYPE {JWKS_REFRESHES_TOTAL} counter");
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
        let _ = writeln!(
            out,
            "# HELP {UPSTREAM_HEALTHY} 1 if the backend is in rotation, else 0."
        );
        let _ = writeln!(out, "# TYPE {UPSTREAM_HEALTHY} gauge");
        for (svc, backend, ok) in health {
            let _ = writeln!(
                out,
                "{UPSTREAM_HEALTHY}{{service=\"{svc}\",backend=\"{backend}\"}} {}",
                u8::from(*ok)
            );
        }
        let _ = writeln!(
            out,
            "# HELP {OPEN_CONNECTIONS} Client connections currently open."
        );
        let _ = writeln!(out, "# TYPE {OPEN_CONNECTIONS} gauge");
        let _ = writeln!(
            out,
            "{OPEN_CONNECTIONS} {}",
            self.open_connections.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP {CONFIG_RELOADS_TOTAL} Config reloads, by result."
        );
        let _ = writeln!(out, "# TYPE {CONFIG_RELOADS_TOTAL} counter");
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
        let _ = writeln!(
            out,
            "# HELP {CONFIG_LAST_RELOAD_SUCCESS} Unix time of the last successful config load."
        );
        let _ = writeln!(out, "# TYPE {CONFIG_LAST_RELOAD_SUCCESS} gauge");
        let _ = writeln!(
            out,
            "{CONFIG_LAST_RELOAD_SUCCESS} {}",
            self.last_reload_success.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP {ACCESS_LOG_DROPPED_TOTAL} Access log lines dropped: the writer's queue was full (the disk or stdout could not keep up) or the write failed."
        );
        let _ = writeln!(out, "# TYPE {ACCESS_LOG_DROPPED_TOTAL} counter");
        let _ = writeln!(
            out,
            "{ACCESS_LOG_DROPPED_TOTAL} {}",
            self.access_log_dropped.load(Ordering::Relaxed)
        );
        out
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
        let out = r.render(&[]);
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
        let out = r.render(&[]);
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
}
